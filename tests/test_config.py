"""Config: defaults, then YAML, then flags; unknown keys and bad values are clear errors."""
import glob
import json
import os

import pytest

import config
from helpers import ROOT


def test_defaults_are_the_reference_setup():
    cfg = config.load([])
    assert (cfg.model_name, cfg.num_chains, cfg.temperature) == ("Qwen/Qwen2.5-1.5B-Instruct", 16, 1.0)
    assert (cfg.learning_rate, cfg.max_completion_tokens, cfg.max_prompt_tokens) == (5e-6, 786, 256)
    assert cfg.dataset == "openai/gsm8k" and cfg.sampler == "plain"


def test_yaml_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_chains: 4\nlearning_rate: 1.0e-4\nrewards: {correctness: 1.0}\nliger: false\n")
    cfg = config.load(["--config", str(recipe), "--num_chains", "8", "--liger", "--beta=0.04",
                       "--lora_target_modules", "q_proj,v_proj"])
    assert cfg.num_chains == 8 and cfg.learning_rate == 1e-4 and cfg.liger is True and cfg.beta == 0.04
    assert cfg.rewards == {"correctness": 1.0} and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert config.load(["--rewards", "correctness=2,soft_format=0.5"]).rewards == {
        "correctness": 2.0, "soft_format": 0.5}


def test_unknown_key_names_close_matches(tmp_path):
    with pytest.raises(config.UserError, match=r"unknown config key 'num_chain'\. Did you mean num_chains\?"):
        config.load(["--num_chain", "4"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1\n")
    with pytest.raises(config.UserError, match="'learning_rat'. Did you mean learning_rate"):
        config.load(["--config", str(recipe)])


def test_a_recipe_that_is_not_valid_yaml_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_chains: 4\nlr: [1, 2\n")
    with pytest.raises(config.UserError, match=f"--config {recipe}: not valid YAML at line 3.*key: value"):
        config.load(["--config", str(recipe)])
    recipe.write_text("- num_chains\n- 4\n")
    with pytest.raises(config.UserError, match="holds a list"):
        config.load(["--config", str(recipe)])


def test_rewards_take_a_mapping_as_yaml_and_json_users_write_it():
    assert config.load(["--rewards", '{"correctness": 1.0, "soft_format": 0.5}']).rewards == {
        "correctness": 1.0, "soft_format": 0.5}
    assert config.load(["--rewards", "{correctness: 2}"]).rewards == {"correctness": 2.0}
    with pytest.raises(config.UserError, match="correctness=1.0,soft_format=0.5"):
        config.load(["--rewards", "correctness"])


@pytest.mark.parametrize("argv, message", [
    (["--num_chains", "many"], "num_chains.*int"),
    (["--liger", "maybe"], "liger.*bool"),
    (["--loss_type", "ppo"], "loss_type must be one of"),
    (["--liger", "--loss_type", "reinforce"], "drop --liger"),
    (["--num_chains", "1"], "num_chains >= 2"),
    (["--eval_samples", "4"], "greedy"),
    (["--temperature", "0"], "temperature > 0"),
    (["--top_p", "1.5"], "top_p"),
    (["--top_p", "0.9", "--num_iterations", "2"], "over the whole vocabulary: set top_p 1"),
    (["--dtype", "fp16"], "without a loss scaler"),
    (["--lora_r", "8", "--lora_target_modules", ""], "lora_target_modules"),
    (["--max_bad_steps", "0"], "max_bad_steps must be at least 1"),
    (["--keep_last", "0"], "keep_last must be at least 1"),
    (["--dataset", "arithmetic", "--sft_slip_rate", "1.5"], "sft_slip_rate is a share"),
    (["--config", "configs/tiny.yaml", "--lora_r", "8"], "for LoRA pass --train_only ''"),
    (["--sft_slip_rate", "0.2"], "sft_slip_rate reworks the built-in task"),
    (["--config", "configs/nope.yaml"], "configs/nope.yaml: no such file"),
    (["--resume", "out/never_ran"], "no run there"),
    # values that cannot make sense, refused before any model loads: rates, ...
    (["--learning_rate", "-1"], "learning_rate must be above 0, got -1"),
    (["--sft_learning_rate", "0"], "sft_learning_rate must be above 0"),
    (["--max_grad_norm", "0"], "max_grad_norm must be above 0"),
    (["--weight_decay", "-0.1"], "weight_decay must be at least 0"),
    (["--beta", "-0.04"], "beta must be at least 0"),
    (["--adam_beta2", "1"], r"adam_beta2 must be in \[0, 1\)"),
    (["--eps_low", "1.5"], r"eps_low must be in \[0, 1\)"),
    # ... chains and batch sizes, ...
    (["--prompts_per_step", "0"], "prompts_per_step must be at least 1"),
    (["--eval_samples", "0"], "eval_samples must be at least 1"),
    (["--sft_batch_size", "0"], "sft_batch_size must be at least 1"),
    (["--eval_batch_size", "-2"], "eval_batch_size must be at least 1"),
    # ... steps, ...
    (["--max_steps", "0"], "max_steps must be at least 1"),
    (["--warmup_steps", "-1"], "warmup_steps must be at least 0"),
    (["--sft_steps", "-5"], "sft_steps must be at least 0"),
    (["--arithmetic_min_steps", "3", "--arithmetic_max_steps", "2"], "arithmetic_max_steps .* at least"),
    # ... and token limits
    (["--max_completion_tokens", "0"], "max_completion_tokens must be at least 1"),
    (["--max_prompt_tokens", "-1"], "max_prompt_tokens must be at least 1"),
    (["--logp_chunk", "0"], "logp_chunk must be at least 1"),
])
def test_bad_values_say_what_is_wrong(argv, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        config.load(argv)


def test_resume_reads_the_runs_config(tmp_path):
    config.save(config.load(["--num_chains", "6", "--out_dir", str(tmp_path)]), str(tmp_path / "config.json"))
    cfg = config.load(["--resume", str(tmp_path), "--max_steps", "7"])
    assert cfg.num_chains == 6 and cfg.max_steps == 7 and cfg.resume == str(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_chains"] == 6


def test_renamed_keys_name_the_new_one_and_old_runs_resume(tmp_path):
    """--rollout is now --sampler and the KV cache, once --sampler, is --kv_cache: an old recipe or flag gets an
    error naming the new key; a run folder written before the rename resumes with its settings."""
    import dataclasses

    import samplers
    with pytest.raises(config.UserError, match="'rollout' is now 'sampler': write sampler: ghpo"):
        config.load(["--rollout", "ghpo"])
    recipe = tmp_path / "old.yaml"
    recipe.write_text("rollout: guided\n")
    with pytest.raises(config.UserError, match="is now 'sampler'"):
        config.load(["--config", str(recipe)])
    with pytest.raises(config.UserError, match="the KV cache is now kv_cache: write kv_cache: static"):
        samplers.check(config.load(["--sampler", "static"]))
    old = {**json.loads(json.dumps(dataclasses.asdict(config.Config()))), "rollout": "ghpo",
           "sampler": "static", "num_chains": 6}
    del old["kv_cache"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = config.load(["--resume", str(tmp_path)])
    assert (cfg.sampler, cfg.kv_cache, cfg.num_chains) == ("ghpo", "static", 6)


def test_every_field_is_read_somewhere():
    import dataclasses
    import glob
    source = "".join(open(p).read() for p in glob.glob("*.py") if p != "config.py")
    unread = [f.name for f in dataclasses.fields(config.Config) if f"cfg.{f.name}" not in source]
    assert unread == [], f"config fields nobody reads: {unread}"


def test_untrusted_by_default():
    """Hub model code never runs unless asked for, and no reward runs model output as code."""
    import glob
    assert config.Config().trust_remote_code is False
    for path in glob.glob("reward*.py"):
        source = open(path).read()
        assert "eval(" not in source and "exec(" not in source, path


def test_loss_defaults_apply_only_to_keys_the_run_did_not_set(tmp_path, capsys):
    cfg = config.load(["--loss_type", "gspo", "--eps_low", "0.1"])
    assert (cfg.eps_low, cfg.eps_high) == (0.1, 4e-4)  # the flag wins; the other bound is GSPO's
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss_type: gspo\neps_high: 0.3\n")
    cfg = config.load(["--config", str(recipe)])
    assert (cfg.eps_low, cfg.eps_high) == (3e-4, 0.3)  # the recipe's key wins
    # a resumed run keeps what its config.json says, whatever the loss type's defaults
    run = tmp_path / "run"
    run.mkdir()
    config.save(config.Config(loss_type="gspo", eps_low=0.2, eps_high=0.2), str(run / "config.json"))
    cfg = config.load(["--resume", str(run)])
    assert (cfg.eps_low, cfg.eps_high) == (0.2, 0.2)
    # dr_grpo with the std scaling it removes: allowed, for ablations, with a warning that says so
    cfg = config.load(["--loss_type", "dr_grpo", "--adv_scale", "group"])
    assert cfg.adv_scale == "group" and "Dr. GRPO removes" in capsys.readouterr().err


def test_every_recipe_loads():
    recipes = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert len(recipes) > 10
    for path in recipes:
        config.load(["--config", path])  # unknown keys or bad values would raise, naming the key
