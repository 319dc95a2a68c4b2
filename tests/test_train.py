"""End to end on the tiny model: a short run writes every log, and resume reproduces the next step."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import checkpoint
import config
from helpers import FAST, ROOT, read, run_train


def test_short_run_writes_all_logs(tmp_path):
    out = str(tmp_path / "run")
    run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--save_every", "2", "--optimizer", "adamw8bit"])
    rows = read(f"{out}/metrics.jsonl")
    evals = [r for r in rows if r["split"] == "eval"]
    trains = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in evals] == [0, 2] and [r["step"] for r in trains] == [1, 2]
    for key in ("reward", "reward/correctness", "reward_std", "zero_adv_frac", "completion_len", "loss",
                "grad_norm", "lr", "kl", "clip_frac", "step_time_s", "tokens_per_s", "peak_mem_gb",
                "prompt_truncated_frac"):
        assert key in trains[0], key
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == 6 and "pass@2" in r for r in evals)
    assert len(read(f"{out}/samples.jsonl")) == 2 * 4  # log_samples chains per step
    assert len(read(f"{out}/eval/step_000002.jsonl")) == 6
    for png in ("reward.png", "accuracy.png", "health.png"):
        assert os.path.getsize(f"{out}/{png}") > 1000
    assert json.load(open(f"{out}/config.json"))["max_steps"] == 2
    assert checkpoint.latest(out).endswith("step_000002")
    with pytest.raises(config.UserError, match="--resume"):  # a second fresh run never overwrites this one
        run_train(FAST + ["--out_dir", out, "--max_steps", "2"])


@pytest.mark.parametrize("extra", [[], ["--lora_r", "4", "--beta", "0.05", "--train_only", ""]],
                         ids=["norms", "lora+kl"])
def test_resume_reproduces_the_next_step(tmp_path, extra):
    """Stop after step 2, resume, and step 3 equals step 3 of an uninterrupted run."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train(FAST + extra + ["--out_dir", straight, "--max_steps", "3", "--save_every", "2"])
    run_train(FAST + extra + ["--out_dir", resumed, "--max_steps", "2", "--save_every", "2"])
    with open(f"{resumed}/metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "train", "reward": 99}\n{"step": 4, "spl')  # as if killed mid-write
    run_train(["--resume", resumed, "--max_steps", "3"])
    a, b = read(f"{straight}/metrics.jsonl"), read(f"{resumed}/metrics.jsonl")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    step3 = [(r for r in rows if r["step"] == 3 and r["split"] == "train") for rows in (a, b)]
    ra, rb = (next(g) for g in step3)
    for key in ("reward", "loss", "grad_norm", "completion_len", "kl"):
        assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key


def test_a_raising_reward_never_stops_the_run(tmp_path, monkeypatch):
    import rewards

    def broken(completion, answer, **info):
        raise ZeroDivisionError("user bug")
    monkeypatch.setitem(rewards.REWARDS, "correctness", broken)
    out = str(tmp_path / "run")
    run_train(FAST + ["--out_dir", out, "--max_steps", "1", "--eval_every", "5", "--save_every", "5"])
    row = [r for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"][0]
    assert row["reward_errors/correctness"] == 2 * 4 and row["reward"] == 0.0  # every chain, scored 0


def test_train_only_changes_the_named_weights_alone(tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--save_every", "2", "--train_only", "norm",
                       "--learning_rate", "0.01", "--sft_slip_rate", "0.2",
                       "--rewards", "integer_answer=1"])  # varies between chains of the untrained model
    before = load_file(f"{out}/base_model/model.safetensors")
    after = load_file(f"{checkpoint.latest(out)}/model.safetensors")
    norms = [k for k in before if "norm" in k]
    assert norms and any(not before[k].equal(after[k]) for k in norms)
    assert all(before[k].equal(after[k]) for k in before if "norm" not in k)
    with pytest.raises(ValueError, match="matches no parameter"):
        run_train(FAST + ["--out_dir", str(tmp_path / "bad"), "--max_steps", "1", "--train_only", "nothing_named"])


@pytest.mark.parametrize("argv, message", [
    (["--num_chains", "many"], "config key 'num_chains' wants a int"),
    (["--num_chain", "4"], "unknown config key 'num_chain'. Did you mean num_chains?"),
    (["--config", "configs/tiny.yaml", "--sft_slip_rate", "0", "--dataset", "nope.jsonl"],
     "dataset file 'nope.jsonl' does not exist"),
])
def test_a_users_mistake_prints_one_message_without_a_traceback(tmp_path, argv, message):
    run = subprocess.run([sys.executable, "train.py", *argv, "--out_dir", str(tmp_path / "run")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().startswith("error: ") and len(run.stderr.strip().splitlines()) == 1


def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    # anything but config.UserError is a bug to report: train.py lets it through whole
    script = ("import runpy, sys, data\n"
              "def broken(cfg): raise TypeError('a bug')\n"
              "data.load = broken\n"
              "sys.argv = ['train.py', '--config', 'configs/tiny.yaml', '--out_dir', sys.argv[1]]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" in run.stderr and "TypeError: a bug" in run.stderr


def test_a_cpu_lora_run_asks_for_no_remote_code(tmp_path):
    # its own process, since an earlier 8-bit AdamW test may have imported bitsandbytes in this one: that
    # import is what logs "Failed to load CPU gemm_4bit_forward ... trust_remote_code" (on an AVX512-BF16
    # CPU); the run ends by saying whether bitsandbytes was imported at all, whatever the CPU
    script = ("import runpy, sys\n"
              "runpy.run_path('train.py', run_name='train')['main'](sys.argv[1:])\n"
              "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules)\n")
    argv = FAST + ["--out_dir", str(tmp_path / "run"), "--max_steps", "1", "--sft_steps", "0", "--eval_n", "2",
                   "--eval_samples", "1", "--max_completion_tokens", "8", "--lora_r", "8", "--lora_alpha", "16",
                   "--train_only", "", "--save_every", "1"]
    run = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    assert not [line for line in output.splitlines() if "trust_remote_code" in line or "Failed to load" in line]
    assert "bitsandbytes imported: False" in run.stdout


def test_warm_start_probe_sees_every_kth_step_and_changes_nothing(tiny, task):
    """sft.warm_start's probe (python sft.py --probe_every k) runs evals mid-way; the weights it ends with
    are those of a warm start without a probe, so a probed run tells what train.py's warm start reaches."""
    import copy

    import torch

    import sft
    cfg = config.Config(system_prompt="", sft_steps=6, sft_batch_size=8, sft_learning_rate=3e-3,
                        sft_warmup_steps=2, max_prompt_tokens=96, max_completion_tokens=32, logp_chunk=64)
    plain, probed = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[0])
    sft.warm_start(plain, tiny[1], task[0], cfg)
    seen = []

    def probe(step, nll):
        seen.append(step)
        torch.rand(10)  # what an eval would draw from the global stream
        probed(torch.tensor([[1, 2, 3]]))
    sft.warm_start(probed, tiny[1], task[0], cfg, probe, 2)
    assert seen == [2, 4, 6]
    assert all(a.equal(b) for a, b in zip(plain.state_dict().values(), probed.state_dict().values()))


def test_sft_script_probes_the_recipe_warm_start():
    out = subprocess.run([sys.executable, "sft.py", "--config", "configs/tiny.yaml", "--tiny_hidden", "32",
                          "--tiny_layers", "2", "--sft_steps", "4", "--probe_every", "2", "--eval_n", "4",
                          "--eval_samples", "1", "--arithmetic_train_size", "100", "--arithmetic_test_size", "10"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["2", "4"]
    assert all("greedy" in line and "T=1" in line for line in lines)


def test_sft_cache_gives_the_warm_start_a_run_would_compute(tiny, task, tmp_path):
    """sft_cache: the first run trains and saves, a run whose recipe differs only after the warm start
    loads the same weights, and the global random stream afterwards is where training leaves it; what
    shapes the warm start (its steps, the seed, the model, the data) makes another entry."""
    import copy

    import torch

    import sft
    cfg = config.Config(system_prompt="", sft_steps=4, sft_batch_size=8, sft_learning_rate=3e-3,
                        sft_warmup_steps=2, max_prompt_tokens=96, max_completion_tokens=32,
                        sft_cache=str(tmp_path / "cache"))
    trained, loaded = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[0])
    torch.manual_seed(5)
    sft.warm_start(trained, tiny[1], task[0], dataclasses.replace(cfg, sft_cache=""))
    after_training = torch.rand(3)
    sft.warm_start_cached(copy.deepcopy(tiny[0]), tiny[1], task[0], cfg)  # trains and saves
    assert len(os.listdir(tmp_path / "cache")) == 1
    other_recipe = dataclasses.replace(cfg, sampler="guided", guide_loss_on="guidance+postfix", learning_rate=0.1,
                                       rewards={"correctness": 1.0}, loss_type="dapo", out_dir="elsewhere",
                                       eval_samples=8, train_only=["norm"], verifier_max_turns=2)
    assert sft.cache_key(other_recipe) == sft.cache_key(cfg)
    torch.manual_seed(5)
    sft.warm_start_cached(loaded, tiny[1], task[0], other_recipe)
    assert torch.rand(3).equal(after_training)
    assert all(a.equal(b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))
    assert not all(a.equal(b) for a, b in zip(tiny[0].state_dict().values(), loaded.state_dict().values()))
    keys = {sft.cache_key(dataclasses.replace(cfg, **change)) for change in (
        {}, {"sft_steps": 5}, {"seed": 1}, {"tiny_hidden": 64}, {"arithmetic_max_steps": 5}, {"system_prompt": "x"},
        {"sft_weight_decay": 0.1}, {"max_completion_tokens": 48})}
    assert len(keys) == 8


def test_the_warm_start_reads_no_config_key_outside_its_cache_key(tiny, task):
    """sft.cache_key hashes the config keys that shape the warm start (sft.shaping_keys); a key that
    warm_start reads and the hash leaves out would share warm starts that differ in it. The keys of the
    sections read after the warm start (a sampling idea's, the loss's, evaluation's) stay out, so a new
    idea or loss key needs no list."""
    import copy

    import sft
    read = set()

    class Recording:  # the config, noting each key warm_start reads
        def __init__(self, cfg):
            self.__dict__["cfg"] = cfg

        def __getattr__(self, key):
            read.add(key)
            return getattr(self.cfg, key)
    cfg = config.Config(system_prompt="", sft_steps=2, sft_batch_size=4, max_prompt_tokens=96, max_completion_tokens=32)
    sft.warm_start(copy.deepcopy(tiny[0]), tiny[1], task[0][:20], Recording(cfg))
    assert {"sft_steps", "seed", "max_grad_norm", "logp_chunk"} <= read
    assert read <= set(sft.shaping_keys()), read - set(sft.shaping_keys())
    fields = {f.name for f in dataclasses.fields(config.Config)}
    assert set(sft.WARM_START_READS) | set(sft.APPLIED_AFTER) <= fields  # no misspelt key
    assert {"model_name", "dataset", "system_prompt", "tiny_hidden"} <= set(sft.shaping_keys())
    assert not {"sampler", "loss_type", "learning_rate", "eval_n", "train_only", "lora_r", "guide_loss_on",
                "ghpo_hint_ratios", "verifier_max_turns", "rewards"} & set(sft.shaping_keys())
