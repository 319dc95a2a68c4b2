"""The one flat config: defaults here, then `--config recipe.yaml`, then `--key value` flags.

Every field is read somewhere; the resolved config is written to out_dir/config.json. The defaults
are the reference setup: Qwen2.5-1.5B-Instruct on GSM8K, 16 chains per prompt, temperature 1.0,
learning rate 5e-6, 786 completion tokens, 256 prompt tokens.

    python config.py --config configs/tiny.yaml --max_steps 3     # prints the resolved config
"""
import dataclasses
import difflib
import json
import os
import sys
import typing
from dataclasses import dataclass, field

import yaml

GSM8K_SYSTEM_PROMPT = ("Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n"
                       "</answer>")


@dataclass
class Config:
    # --- model (llms.py)
    model_name: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub name, local folder, or "tiny" (built in)
    dtype: str = "auto"                # auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32
    gradient_checkpointing: bool = True
    lora_r: int = 0                    # 0 = full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train_only: list = field(default_factory=list)  # GRPO trains only weights whose name holds one of these
                                                    # (e.g. [norm]); empty = all (the warm start trains all)
    liger: bool = False                # Liger's fused linear GRPO loss (+ its kernels on GPU)
    trust_remote_code: bool = False    # model code from the hub is never run unless you say so
    tiny_hidden: int = 128             # size of the built-in tiny model
    tiny_layers: int = 4
    tiny_vocab_size: int = 512
    # --- data (data.py)
    dataset: str = "openai/gsm8k"      # hub name, local jsonl/parquet file or folder, or "arithmetic"
    dataset_config: str = "main"
    train_split: str = "train"
    test_split: str = "test"
    test_dataset: str = ""             # a separate held-out file, needed when `dataset` is one file
    question_field: str = "question"
    answer_field: str = "answer"       # GSM8K layout: solution steps, then "#### <answer>"
    system_prompt: str = GSM8K_SYSTEM_PROMPT
    task: str = "math"                 # math (checked by rewards.is_correct), judge_pointwise, judge_pairwise
    prompt_template: str = ""          # file whose {placeholders} make the user message (data.py); "" = the
    #                                    question as-is for math, configs/prompts/<task>.txt for judges
    skip_bad_rows: bool = False        # skip and count malformed records instead of stopping at the first
    arithmetic_train_size: int = 4000  # the built-in task
    arithmetic_test_size: int = 200
    arithmetic_min_steps: int = 2
    arithmetic_max_steps: int = 4
    arithmetic_max_value: int = 99     # no number in a problem exceeds it: smaller is easier
    # --- sampling (rollout.py)
    rollout: str = "plain"             # plain, guided or ghpo (guidance.py), verifier (verifier.py)
    prompts_per_step: int = 4          # B questions per step
    num_chains: int = 16               # G chains per question
    max_prompt_tokens: int = 256
    max_completion_tokens: int = 786
    temperature: float = 1.0           # sampling and training log-probs use the same temperature
    top_p: float = 1.0
    sampler: str = "dynamic"           # dynamic: plain HF generate; static: static KV cache, compiled (CUDA graphs)
    # --- guided sampling (guidance.py), used when rollout is "guided"
    guide_min_prefix_tokens: int = 16  # prefix budget per prompt, drawn in [min, max] new tokens, then cut
    guide_max_prefix_tokens: int = 256  # back to its last sentence boundary (capped so guidance fits)
    guide_prefix_retries: int = 2      # extra prefix candidates (budget halved each) for EOS or no boundary
    min_guide_tokens: int = 2          # guidance tokens per chain, drawn per prompt in [min, max]
    max_guide_tokens: int = 8          # Guide-GRPO's default; must stay below max_completion_tokens
    guide_loss_on: str = "guidance"    # trained tokens: guidance (Guide-GRPO), guidance+postfix, all (prefix too)
    guide_position_weight: bool = False  # scale rewards by guidance.position_weight: later guidance, more reward
    # --- GHPO hints (guidance.py), used when rollout is "ghpo"
    ghpo_accuracy_reward: str = "correctness"  # a group is all wrong when this reward is <= 0 on every chain
    ghpo_hint_ratios: list = field(default_factory=lambda: [0.25, 0.5, 0.75])  # share of the solution
    # given as a hint at each stage, increasing; each stage regenerates the groups still all wrong
    ghpo_hint_unit: str = "steps"      # hints count solution steps (lines) or chars
    ghpo_hint_in: str = "user"         # user: after the question, with an instruction (GHPO); assistant: the
    # response starts with the hint and the model continues it (suits a model never shown hints)
    ghpo_start_step: int = 1           # plain GRPO before this step
    # --- verifier turns (verifier.py, verifier_backends.py), used when rollout is "verifier"
    verifier_backend: str = "rules"    # rules (built-in task, no model), hf (a local model), http (OpenAI-compatible)
    verifier_model: str = "policy"     # hf: hub name, folder, or policy (itself; with LoRA its base); http: served name
    verifier_8bit: bool = False        # hf: load verifier_model in 8-bit (bitsandbytes, CUDA only)
    verifier_base_url: str = "http://127.0.0.1:8000/v1"  # http: the server; `python verifier.py serve` runs one
    verifier_api_key_env: str = "VERIFIER_API_KEY"  # http: NAME of the environment variable holding the key
    verifier_timeout_s: float = 60.0   # http: per request
    verifier_retries: int = 2          # http: retries per request, with exponential backoff
    verifier_concurrency: int = 16     # http: requests in flight at once
    verifier_max_tokens: int = 128     # hf, http: reply budget
    verifier_temperature: float = 0.0  # hf, http: 0 = greedy
    verifier_prompt: str = ""          # system prompt template ({question}, {answer}, {stop}) or a file; "" = ours
    verifier_nudge: str = "Please give the final answer."  # sent after a STOP when no final answer was given
    verifier_turn_tokens: int = 128    # new tokens per policy turn at most
    verifier_max_turns: int = 8        # policy turns per conversation (a final turn after a nudge is extra)
    verifier_step_end: str = "newline"  # a turn ends at: newline, sentence (. ! ? or newline), eos (whole attempts)
    verifier_train_on: str = "all"     # trained tokens: all policy turns, or last_turn (the paper's choice)
    # --- rewards (rewards.py): name -> weight
    rewards: dict = field(default_factory=lambda: {
        "correctness": 2.0, "strict_format": 0.5, "soft_format": 0.5, "integer_answer": 0.5})
    # reward settings, passed to the rewards that use them (formulas in rewards.py and the README)
    think_fault_penalty: float = 0.5   # think_format: subtracted per format fault
    think_min_chars: int = 200         # short_think: a shorter think is penalised ...
    think_short_penalty: float = 0.5   # ... by up to this much (an empty think), linearly less up to think_min_chars
    answer_exact_reward: float = 2.0   # think_answer: the answer equals the reference (case-insensitive)
    answer_contains_reward: float = 1.0  # think_answer: the answer contains the reference as a whole word
    answer_wrong_reward: float = -1.0  # think_answer: anything else, or no answer tags
    overlong_buffer_tokens: int = 128  # overlong (DAPO): 0 up to max_completion_tokens - this, then down to -1
    # --- loss (train.py)
    loss_type: str = "grpo"            # grpo, bnpo, dr_grpo, dapo, gspo, cispo, reinforce
    adv_scale: str = "group"           # divide advantages by: group std, batch std, or none (Dr. GRPO)
    beta: float = 0.0                  # k3 KL weight; 0 loads no reference model
    eps_low: float = 0.2               # clip ratio to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2              # DAPO's clip-higher: 0.28; CISPO caps its weight at 1 + eps_high
    num_iterations: int = 1            # optimizer steps per rollout (>1 uses stored old log-probs)
    micro_batch_size: int = 8          # chains per forward/backward; gradients accumulate over the step
    sort_micro_batches: bool = True    # chains of similar length share a micro-batch, cropped after its longest
    #                                    (faster; the same loss, except bnpo's per-micro-batch normaliser)
    logp_chunk: int = 64               # positions per log-prob chunk: the logits memory is about 16 bytes x
    #                                    micro_batch_size x this x vocab (Qwen2.5, 8 x 64: 1.2 GB; x 256: 4.7 GB)
    # --- optimizer
    optimizer: str = "adamw8bit"       # adamw8bit (bitsandbytes) or adamw
    kahan_updates: bool = True         # bf16 weights keep each step's rounding error (kahan.py): lr 5e-6 counts
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    warmup_steps: int = 10
    lr_schedule: str = "constant"      # constant or cosine (after warmup)
    max_grad_norm: float = 1.0
    # --- supervised warm start on the reference solutions, before GRPO (0 = none)
    sft_steps: int = 0
    sft_batch_size: int = 32
    sft_learning_rate: float = 1e-3
    sft_warmup_steps: int = 10         # then cosine decay to 0 at sft_steps
    sft_answer_only_frac: float = 0.0  # share of targets that are the final answer alone (no worked steps)
    sft_slip_rate: float = 0.0         # built-in task: chance that a target's step result is off by one (carried on)
    # --- evaluation (evaluator.py)
    eval_every: int = 25
    eval_n: int = 0                    # 0 = the whole test split, else a fixed seeded subset
    eval_temperature: float = 0.0      # 0 = greedy
    eval_samples: int = 1              # chains per question; pass@k uses k = eval_samples
    eval_batch_size: int = 64          # questions per generate call
    # --- run
    out_dir: str = "out/run"
    max_steps: int = 200
    save_every: int = 50
    keep_last: int = 2
    max_bad_steps: int = 5             # stop (with a checkpoint) after this many non-finite updates in a row
    log_samples: int = 4               # chains written to samples.jsonl per step
    seed: int = 0
    device: str = "auto"               # auto, cpu, cuda
    resume: str = ""                   # a run folder: continue it from its latest checkpoint


CHOICES = {
    "rollout": ["plain", "guided", "ghpo", "verifier"], "guide_loss_on": ["guidance", "guidance+postfix", "all"],
    "verifier_backend": ["rules", "hf", "http"], "verifier_step_end": ["newline", "sentence", "eos"],
    "verifier_train_on": ["all", "last_turn"],
    "task": ["math", "judge_pointwise", "judge_pairwise"], "sampler": ["dynamic", "static"],
    "ghpo_hint_unit": ["steps", "chars"], "ghpo_hint_in": ["user", "assistant"],
    "loss_type": ["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce"],
    "adv_scale": ["group", "batch", "none"], "optimizer": ["adamw8bit", "adamw"],
    "lr_schedule": ["constant", "cosine"], "dtype": ["auto", "bf16", "fp16", "fp32"],
    "device": ["auto", "cpu", "cuda"],
}
LIGER_LOSSES = ["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo"]


def _convert(key: str, value, kind):
    """A flag's string (or a YAML value) as the field's type, or an error naming the key."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind in (int, float, str):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return kind(value)
        if kind is list:
            return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        if kind is dict:  # --rewards correctness=1,strict_format=0.5
            if isinstance(value, str):
                value = dict(item.split("=", 1) for item in value.split(",") if item.strip())
            return {str(k).strip(): float(v) for k, v in value.items()}
    except (ValueError, TypeError, AttributeError):
        pass
    raise ValueError(f"config key {key!r} wants a {kind.__name__}, got {value!r}")


def _unknown(key: str, valid) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown config key {key!r}.{hint} (python config.py --help lists all keys)")


def update(cfg: Config, values: dict) -> Config:
    types = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    for key, value in values.items():
        if key not in types:
            raise _unknown(key, list(types))
        setattr(cfg, key, _convert(key, value, typing.get_origin(types[key]) or types[key]))
    return cfg


def parse_flags(argv: list[str]) -> dict:
    """['--a', '1', '--b=2', '--liger'] -> {'a': '1', 'b': '2', 'liger': 'true'}."""
    flags, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"  # a bare flag switches a bool on
        flags[key.replace("-", "_")] = value
        i += 1
    return flags


def validate(cfg: Config) -> None:
    for key, options in CHOICES.items():
        if getattr(cfg, key) not in options:
            raise ValueError(f"{key} must be one of {options}, got {getattr(cfg, key)!r}")
    if cfg.liger and cfg.loss_type not in LIGER_LOSSES:
        raise ValueError(f"--liger supports loss_type in {LIGER_LOSSES}; drop --liger for {cfg.loss_type!r}")
    if cfg.num_chains < 2 and cfg.adv_scale != "none":
        raise ValueError("group-normalised advantages need num_chains >= 2")
    for key in ("prompts_per_step", "num_chains", "micro_batch_size", "max_steps", "eval_every",
                "save_every", "max_completion_tokens", "max_prompt_tokens", "num_iterations", "keep_last",
                "max_bad_steps", "sft_warmup_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"training samples need temperature > 0 and 0 < top_p <= 1 (log-probs are taken at "
                         f"that temperature), got {cfg.temperature} and {cfg.top_p}; greedy is for eval only")
    if cfg.lora_r > 0 and cfg.train_only:
        raise ValueError(f"lora_r {cfg.lora_r} and train_only {cfg.train_only} both pick the weights that train: "
                         f"for LoRA pass --train_only '' (configs/tiny.yaml sets it), else --lora_r 0")
    if cfg.lora_r > 0 and not cfg.lora_target_modules:
        raise ValueError("lora_r > 0 needs lora_target_modules (e.g. q_proj,v_proj); or set lora_r 0 for "
                         "full fine-tuning")
    for key in ("think_min_chars", "overlong_buffer_tokens"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be at least 0, got {getattr(cfg, key)}")
    for key in ("sft_answer_only_frac", "sft_slip_rate"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ValueError(f"{key} is a share of the warm-start targets, between 0 and 1; got {getattr(cfg, key)}")
    if cfg.sft_slip_rate > 0 and cfg.dataset != "arithmetic":
        raise ValueError("sft_slip_rate reworks the built-in task's solutions (dataset arithmetic); set it to 0 "
                         f"for {cfg.dataset!r}")
    if cfg.dataset == "arithmetic" and cfg.arithmetic_max_value < 12:
        raise ValueError(f"arithmetic_max_value must be at least 12 (problems start from up to 12 items), "
                         f"got {cfg.arithmetic_max_value}")
    if cfg.rollout == "guided":
        if not 1 <= cfg.min_guide_tokens <= cfg.max_guide_tokens:
            raise ValueError(f"guided sampling needs 1 <= min_guide_tokens <= max_guide_tokens, got "
                             f"{cfg.min_guide_tokens} and {cfg.max_guide_tokens}")
        if cfg.max_guide_tokens >= cfg.max_completion_tokens:
            raise ValueError(f"max_guide_tokens ({cfg.max_guide_tokens}) must be below max_completion_tokens "
                             f"({cfg.max_completion_tokens}): prefix + guidance + postfix share that budget")
        if not 0 <= cfg.guide_min_prefix_tokens <= cfg.guide_max_prefix_tokens:
            raise ValueError(f"guided sampling needs 0 <= guide_min_prefix_tokens <= guide_max_prefix_tokens, got "
                             f"{cfg.guide_min_prefix_tokens} and {cfg.guide_max_prefix_tokens}")
        if cfg.guide_prefix_retries < 0:
            raise ValueError(f"guide_prefix_retries must be at least 0, got {cfg.guide_prefix_retries}")
    if cfg.rollout == "verifier":
        for key in ("verifier_turn_tokens", "verifier_max_turns", "verifier_concurrency", "verifier_max_tokens"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(cfg, key)}")
        if cfg.verifier_retries < 0 or cfg.verifier_timeout_s <= 0:
            raise ValueError("verifier_retries must be >= 0 and verifier_timeout_s > 0")
    elif "verifier_score" in cfg.rewards:
        raise ValueError("the verifier_score reward reads the verifier's [SCORE] lines: use it with --rollout verifier")
    if cfg.rollout == "ghpo":
        if cfg.ghpo_accuracy_reward not in cfg.rewards:
            raise ValueError(f"ghpo_accuracy_reward {cfg.ghpo_accuracy_reward!r} must be one of the rewards "
                             f"{list(cfg.rewards)}: add it to --rewards (weight 0 scores it without adding it in)")
        try:  # flags give strings ("0.25,0.5"), YAML gives numbers
            cfg.ghpo_hint_ratios = [float(r) for r in cfg.ghpo_hint_ratios]
        except ValueError:
            raise ValueError(f"ghpo_hint_ratios must be numbers, got {cfg.ghpo_hint_ratios}") from None
        ratios = cfg.ghpo_hint_ratios
        if not ratios or sorted(set(ratios)) != ratios or not 0 < ratios[0] <= ratios[-1] < 1:
            raise ValueError(f"ghpo_hint_ratios must increase strictly within (0, 1), e.g. 0.25,0.5,0.75; "
                             f"got {ratios}")
    if cfg.eval_temperature == 0 and cfg.eval_samples > 1:
        raise ValueError("greedy evaluation (eval_temperature 0) gives one answer per question: "
                         "set eval_samples 1 or eval_temperature > 0")


def load(argv: list[str]) -> Config:
    """Defaults, then the YAML recipe (--config), then flags; --resume starts from the run's config."""
    flags = parse_flags(argv)
    cfg = Config()
    if "resume" in flags:
        if not os.path.isfile(f"{flags['resume']}/config.json"):
            raise FileNotFoundError(f"--resume {flags['resume']}: no run there ({flags['resume']}/config.json "
                                    f"is missing); pass the out_dir of an earlier run")
        with open(f"{flags['resume']}/config.json") as f:
            update(cfg, json.load(f))
    if "config" in flags:
        if not os.path.isfile(flags["config"]):
            raise FileNotFoundError(f"--config {flags['config']}: no such file (the recipes are in configs/)")
        with open(flags.pop("config")) as f:
            update(cfg, yaml.safe_load(f) or {})
    update(cfg, flags)
    validate(cfg)
    return cfg


def save(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"  # written whole, then renamed: a crash never leaves half a config
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    if "--help" in sys.argv or "-h" in sys.argv:
        for f in dataclasses.fields(Config):
            print(f"--{f.name} ({typing.get_type_hints(Config)[f.name].__name__})")
        sys.exit()
    print(json.dumps(dataclasses.asdict(load(sys.argv[1:])), indent=2))
