"""The one flat config: defaults here, then `--config recipe.yaml`, then `--key value` flags.

Every field is read somewhere and its help text is the comment beside it (continued on the indented
comment lines below it): `python config.py --help` prints them all. Choice fields are `Literal`s, so
the choices are written once; a sampling idea's own fields are checked by its sampler constructor
(samplers.py), which knows what they mean. The resolved config is written to out_dir/config.json.
The defaults are the reference setup: Qwen2.5-1.5B-Instruct on GSM8K, 16 chains per prompt,
temperature 1.0, learning rate 5e-6, 786 completion tokens, 256 prompt tokens.

    python config.py --help                                       # every key, its type, default and help
    python config.py --config configs/tiny.yaml --max_steps 3     # prints the resolved config
"""
import dataclasses
import difflib
import inspect
import io
import json
import os
import sys
import tokenize
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

GSM8K_SYSTEM_PROMPT = ("Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n"
                       "</answer>")


# Keys that were renamed: a recipe or flag that still uses one gets an error naming the new key. A run
# folder's config.json written before the rename is read with the new names (--resume, compare.py).
RENAMED = {"rollout": "sampler"}  # `sampler` was the KV cache, now kv_cache (samplers.check names it)


class UserError(ValueError):
    """A mistake in what a run was asked to do (a config key or value, a dataset field, a file or model
    that cannot be reached, a bad row): train.py prints its message alone, which names the cause and
    the fix. Unexpected errors keep their traceback."""


LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce"]
# Each loss type's own values from its paper, taken by load() for the keys a run does not set itself
# (in its recipe, its flags, or its resumed config.json):
LOSS_DEFAULTS = {
    "dapo": {"eps_high": 0.28},  # DAPO (arXiv 2503.14476) sec. 3.1, clip-higher
    # GSPO (arXiv 2507.18071) sec. 5.1: a sequence ratio is a geometric mean of token ratios and moves by
    # about 1e-3 per update, so the token range 0.2 would never clip it
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4},
    "dr_grpo": {"adv_scale": "none"},  # Dr. GRPO (arXiv 2503.20783) sec. 3.2: no division by the group std
}


@dataclass
class Config:
    # --- model (llms.py)
    model_name: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub name, local folder, a .gguf file (or a folder holding
    #                                    one), a shipped real model (gemma-3-270m, smollm2-135m-instruct: see
    #                                    gguf_models.py), "tiny" or "tiny_vl" (built in; tiny_vl: a random Qwen2-VL);
    #                                    Qwen2-VL / Qwen2.5-VL / Qwen3-VL load with their images and videos
    model_cache: str = "~/.cache/grpo-workbench"  # where GGUF models are converted (once) to HF folders
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (fp16 is refused:
    #                                    no loss scaler here)
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, more time
    lora_r: int = 0                    # LoRA rank; 0 = full fine-tuning
    lora_alpha: int = 32               # LoRA scale (alpha / r)
    lora_dropout: float = 0.0          # dropout on the LoRA input
    lora_target_modules: list[str] = field(default_factory=lambda: [  # layers that get LoRA adapters
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train_only: list[str] = field(default_factory=list)  # GRPO trains only weights whose name holds one of these
    #                                    (e.g. [norm]); empty = all (the warm start trains all)
    liger: bool = False                # Liger's fused linear GRPO loss (+ its kernels on GPU)
    trust_remote_code: bool = False    # model code from the hub is never run unless you say so
    chat_template_kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)  # switches of the
    #                                    chat template, wherever it renders (llms.render), e.g. Qwen3's
    #                                    {enable_thinking: false}; --chat_template_kwargs enable_thinking=false
    tiny_hidden: int = 128             # width of the built-in tiny model
    tiny_layers: int = 4               # layers of the built-in tiny model
    tiny_vocab_size: int = 512         # vocabulary of the tiny model's tokenizer (trained on the train set)
    min_pixels: int = 0                # VL models: an image is resized to at least this many pixels (0: the
    #                                    checkpoint's image processor setting); 28 x 28 pixels make one token
    max_pixels: int = 0                # VL models: ... and at most this many, which bounds the visual tokens
    train_vision: bool = False         # VL models, full fine-tuning: train the vision tower too (frozen by default)
    # --- data (data.py)
    dataset: str = "openai/gsm8k"      # hub name, local jsonl/parquet file or folder, or a built-in task:
    #                                    "arithmetic" (word problems), "addition" ("What is 47 + 38?"),
    #                                    "digits" (the sum of the numbers drawn in an image) or "clips" (the
    #                                    same, the numbers one after another in a video)
    dataset_config: str = "main"       # the hub dataset's configuration
    train_split: str = "train"         # split trained on
    test_split: str = "test"           # split evaluated on
    test_dataset: str = ""             # a separate held-out file, needed when `dataset` is one file
    question_field: str = "question"   # the column that holds the question
    answer_field: str = "answer"       # the column with the answer; GSM8K layout: solution steps, then "#### <answer>"
    image_field: str = "images"        # the column with a row's images, if any (paths relative to the data file,
    #                                    bytes, {bytes, path} dicts); the question's <image> marks where they go
    video_field: str = "videos"        # the column with a row's videos, if any: each a list of frames (as images
    #                                    are given) or a video file's path (decoded with PyAV); <video> marks
    fps: float = 2.0                   # frames per second of videos given as frame lists (a row's own "fps"
    #                                    column wins); a video file has its own
    max_frames: int = 16               # a video keeps at most this many frames, picked evenly through the clip
    #                                    (each frame within min_pixels and max_pixels)
    system_prompt: str = GSM8K_SYSTEM_PROMPT  # the system message of every prompt ("" = none, also for a chat
    #                                    template that would add its own default one)
    prompt_format: Literal["auto", "chat", "plain"] = "auto"  # chat: the tokenizer's chat template; plain: the
    #                                    system prompt as text, then "Question: ...\nAnswer:" (for a base model,
    #                                    no special tokens but its own BOS and EOS); auto: chat where the
    #                                    tokenizer has a template, else plain
    few_shot: int = 0                  # plain format: this many solved training examples (seeded) open every
    #                                    prompt, each ending with a blank line, where answers stop (llms.PLAIN_STOP)
    task: Literal["math", "judge_pointwise", "judge_pairwise"] = "math"  # math: checked by answers.is_correct;
    #                                    judge_*: the verdict parsers of judge_rewards.py
    prompt_template: str = ""          # file whose {placeholders} make the user message (data.py); "" = the
    #                                    question as-is for math, configs/prompts/<task>.txt for judges
    skip_bad_rows: bool = False        # skip and count malformed records instead of stopping at the first
    arithmetic_train_size: int = 4000  # the built-in arithmetic and addition tasks: train questions
    arithmetic_test_size: int = 200    # the built-in arithmetic and addition tasks: held-out questions
    arithmetic_min_steps: int = 2      # the built-in task: fewest steps per problem
    arithmetic_max_steps: int = 4      # the built-in task: most steps per problem
    arithmetic_max_value: int = 99     # no number in a problem exceeds it: smaller is easier
    addition_digits: int = 2           # the built-in addition task: digits of each number (2: 10 to 99)
    digits_count: int = 2              # the built-in visual tasks: one-digit numbers per image or clip (10**count
    #                                    problems)
    digits_train_size: int = 80        # the built-in visual task: train questions
    digits_test_size: int = 20         # the built-in visual task: held-out questions
    # --- sampling (samplers.py picks the idea; rollout.py holds plain sampling)
    sampler: str = "plain"             # the sampling idea, a name in samplers.SAMPLERS: plain, guided, ghpo, verifier
    prompts_per_step: int = 4          # B questions per step
    num_chains: int = 16               # G chains per question
    max_prompt_tokens: int = 256       # longer prompts keep their end (counted: prompt_truncated_frac); a judge
    #                                    prompt, whose instructions come first, must fit
    max_completion_tokens: int = 786   # new tokens per chain at most
    temperature: float = 1.0           # sampling and training log-probs use the same temperature
    top_p: float = 1.0                 # nucleus sampling (1 = off); log-probs stay over the whole vocabulary,
    #                                    so top_p < 1 is refused with num_iterations > 1
    kv_cache: Literal["dynamic", "static"] = "dynamic"  # generate's KV cache: dynamic (HF's default) or static
    #                                    (allocated once, decode step compiled, CUDA graphs on GPU)
    dynamic_sampling: bool = False     # DAPO's dynamic sampling (grpo.py): groups whose rewards are all equal are
    #                                    dropped and more questions sampled until prompts_per_step are informative
    max_sampling_rounds: int = 3       # dynamic sampling: sample calls per step at most, then train on what it kept
    # --- guided sampling (guidance.py), used when sampler is "guided"
    guide_min_prefix_tokens: int = 16  # prefix budget per prompt, drawn in [min, max] new tokens, then cut
    guide_max_prefix_tokens: int = 256  # back to its last sentence boundary (capped so guidance fits)
    guide_prefix_retries: int = 2      # extra prefix candidates (budget halved each) for EOS or no boundary
    min_guide_tokens: int = 2          # guidance tokens per chain, drawn per prompt in [min, max]
    max_guide_tokens: int = 8          # Guide-GRPO's default; must stay below max_completion_tokens
    guide_loss_on: Literal["guidance", "guidance+postfix", "all"] = "guidance"  # trained tokens: the guidance
    #                                    (Guide-GRPO), guidance and postfix, or all (the prefix too)
    guide_position_weight: bool = False  # scale rewards by guidance.position_weight: later guidance, more reward
    # --- GHPO hints (ghpo.py), used when sampler is "ghpo"
    ghpo_accuracy_reward: str = "correctness"  # a group is all wrong when this reward is <= 0 on every chain
    ghpo_hint_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # share of the solution
    #                                    given as a hint at each stage, increasing; each stage regenerates
    #                                    the groups still all wrong
    ghpo_hint_unit: Literal["steps", "chars"] = "steps"  # hints count solution steps (lines) or characters
    ghpo_hint_in: Literal["user", "assistant"] = "user"  # user: after the question, with an instruction
    #                                    (GHPO); assistant: the response starts with the hint and the model
    #                                    continues it (suits a model never shown hints)
    ghpo_start_step: int = 1           # plain GRPO before this step
    # --- verifier turns (verifier.py, verifier_backends.py), used when sampler is "verifier"
    verifier_backend: Literal["rules", "hf", "http"] = "rules"  # rules (built-in task, no model), hf (a local
    #                                    model), http (an OpenAI-compatible server)
    verifier_model: str = "policy"     # hf: hub name, folder, or policy (itself; with LoRA its base); http: served name
    verifier_8bit: bool = False        # hf: load verifier_model in 8-bit (bitsandbytes, CUDA only)
    verifier_base_url: str = "http://127.0.0.1:8000/v1"  # http: the server; `python verifier.py serve` runs one
    verifier_api_key_env: str = "VERIFIER_API_KEY"  # http: NAME of the environment variable holding the key
    verifier_timeout_s: float = 60.0   # http: per request
    verifier_turn_timeout_s: float = 180.0  # http: a turn waits at most this long for all its replies; a
    #                                    later reply counts as a failed call (the turn goes on without it)
    verifier_retries: int = 2          # http: retries per request, with exponential backoff
    verifier_concurrency: int = 16     # http: requests in flight at once
    verifier_max_tokens: int = 128     # hf, http: reply budget
    verifier_temperature: float = 0.0  # hf, http: 0 = greedy
    verifier_prompt: str = ""          # system prompt template ({question}, {answer}, {stop}) or a file; "" = ours
    verifier_nudge: str = "Please give the final answer."  # sent after a STOP when no final answer was given
    verifier_turn_tokens: int = 128    # new tokens per policy turn at most
    verifier_max_turns: int = 8        # policy turns per conversation (a final turn after a nudge is extra)
    verifier_step_end: Literal["newline", "sentence", "eos"] = "newline"  # a turn ends at a newline, a
    #                                    sentence end (. ! ? or newline), or EOS (whole attempts)
    verifier_train_on: Literal["all", "last_turn"] = "all"  # trained tokens: all policy turns, or the last
    #                                    turn (the paper's choice)
    # --- rewards (rewards.py)
    rewards: dict[str, float] = field(default_factory=lambda: {  # reward name -> weight (names in rewards.REWARDS)
        "correctness": 2.0, "strict_format": 0.5, "soft_format": 0.5, "integer_answer": 0.5})
    think_fault_penalty: float = 0.5   # think_format: subtracted per format fault
    think_min_chars: int = 200         # short_think: a shorter think is penalised ...
    think_short_penalty: float = 0.5   # ... by up to this much (an empty think), linearly less up to think_min_chars
    answer_exact_reward: float = 2.0   # think_answer: the answer equals the reference (case-insensitive)
    answer_contains_reward: float = 1.0  # think_answer: the answer contains the reference as a whole word
    answer_wrong_reward: float = -1.0  # think_answer: anything else, or no answer tags
    overlong_buffer_tokens: int = 128  # overlong (DAPO): 0 up to max_completion_tokens - this, then down to -1
    # --- loss and update (grpo.py; the log-prob paths: logprobs.py)
    loss_type: LossType = "grpo"       # grpo, bnpo, dr_grpo, dapo, gspo, cispo, reinforce
    adv_scale: Literal["group", "batch", "none"] = "group"  # divide advantages by: group std, batch std, or
    #                                    nothing (dr_grpo's default, LOSS_DEFAULTS)
    beta: float = 0.0                  # k3 KL weight; 0 loads no reference model
    eps_low: float = 0.2               # clip ratio to [1 - eps_low, 1 + eps_high] (gspo: 3e-4, LOSS_DEFAULTS)
    eps_high: float = 0.2              # (dapo: 0.28, DAPO's clip-higher; gspo: 4e-4, LOSS_DEFAULTS)
    cispo_max_weight: float = 5.0      # cispo: its stop-gradient ratio weight is capped here, with no lower bound
    #                                    (MiniMax-M1, arXiv 2506.13585); 5.0 is ScaleRL's eps_max (arXiv 2510.13786)
    num_iterations: int = 1            # optimizer steps per rollout (>1 uses stored old log-probs)
    micro_batch_size: int = 8          # chains per forward/backward; gradients accumulate over the step
    share_prompt: bool = True          # the loss pass runs each group's prompt once, not once per chain (its keys
    #                                    and values, with their gradient, go to every chain of the group);
    #                                    text models without gradient checkpointing (logprobs.shared_prompt_hidden)
    sort_micro_batches: bool = True    # chains of similar length share a micro-batch, cropped after its longest
    #                                    (faster; the same loss, except bnpo's per-micro-batch normaliser,
    #                                    which under torchrun also differs from one process: distributed.py)
    logp_chunk: int = 64               # positions per log-prob chunk, at most: the logits memory is about 16 bytes x
    #                                    micro_batch_size x this x vocab (BENCHMARKS.md)
    logp_chunk_mb: float = 64.0        # ... and fewer positions where one chunk's fp32 logits (chains x positions x
    #                                    vocab x 4 bytes) would pass this many MB: a wide vocabulary (Gemma 3's
    #                                    262,144) keeps the same peak; 0 = no cap
    # --- optimizer (optim.make_optimizer)
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"  # adamw8bit (bitsandbytes) or adamw (torch)
    kahan_updates: bool = True         # bf16 weights keep each step's rounding error (optim.py): lr 5e-6 counts
    learning_rate: float = 5e-6        # peak learning rate of GRPO
    weight_decay: float = 0.0          # AdamW's decoupled weight decay
    adam_beta1: float = 0.9            # AdamW's first-moment decay
    adam_beta2: float = 0.99           # AdamW's second-moment decay
    warmup_steps: int = 10             # linear warmup of the learning rate over this many steps
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"  # after warmup: constant, cosine to 0 at max_steps,
    #                                    or wsd (warmup-stable-decay): constant, then linear toward 0 (lr_decay_steps)
    lr_decay_steps: int = 20           # wsd: the last this many steps decay linearly (the final step at 1/this)
    max_grad_norm: float = 1.0         # gradients are clipped to this norm (logged before clipping)
    # --- warm start: supervised steps on the reference solutions, before GRPO (sft.py)
    sft_steps: int = 0                 # supervised steps (0 = no warm start)
    sft_batch_size: int = 32           # examples per supervised step
    sft_learning_rate: float = 1e-3    # peak learning rate of the warm start
    sft_warmup_steps: int = 10         # then cosine decay to 0 at sft_steps
    sft_weight_decay: float = 0.01     # AdamW's decoupled weight decay in the warm start (torch's default)
    sft_answer_only_frac: float = 0.0  # share of targets that are the final answer alone (no worked steps)
    sft_slip_rate: float = 0.0         # built-in task: chance that a target's step result is off by one (carried on)
    sft_cache: str = ""                # a folder keeping finished warm starts by what shapes them (sft.cache_key);
    #                                    a run that matches one loads it; "" = off (compare.py turns it on)
    # --- evaluation (evaluator.py)
    eval_every: int = 25               # steps between held-out evaluations (and one at step 0)
    eval_n: int = 0                    # 0 = the whole test split, else a fixed seeded subset
    eval_temperature: float = 0.0      # 0 = greedy
    eval_samples: int = 1              # chains per question; pass@k uses k = eval_samples
    eval_batch_size: int = 64          # questions per generate call
    eval_format: str = ""              # a reward (rewards.py) whose 1.0 means the answer is laid out as the
    #                                    system prompt asks (bare_number, strict_format, ...): eval lines add
    #                                    "format", the share of samples that score 1.0 on it; "" = none
    # --- run (checkpoint.py)
    out_dir: str = "out/run"           # the run's folder: logs, plots, checkpoints
    max_steps: int = 200               # GRPO steps
    save_every: int = 50               # steps between checkpoints (and one at the end)
    keep_last: int = 2                 # checkpoints kept
    max_bad_steps: int = 5             # stop (with a checkpoint) after this many non-finite updates in a row
    log_samples: int = 4               # chains written to samples.jsonl per step
    seed: int = 0                      # seeds the data order, sampling, and the tiny model's weights
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is there, else cpu
    resume: str = ""                   # a run folder: continue it from its latest checkpoint
    report_to: list[str] = field(default_factory=list)  # also log to tensorboard and/or wandb (tracking.py);
    #                                    metrics.jsonl is always written
    wandb_project: str = "grpo"        # wandb: the project the runs go to
    # --- torchrun (distributed.py)
    fsdp: bool = False                 # under torchrun, shard weights, gradients and optimizer state over the ranks
    #                                    (FSDP2): for a model that does not fit one GPU; one process runs as without
    fsdp_sampling: Literal["unshard", "per_layer"] = "unshard"  # --fsdp sampling: unshard the whole model once per
    #                                    step (fast, needs it to fit a GPU while sampling) or gather layer by layer at
    #                                    every generated token (a shard's memory, one all-gather per layer per token)


def _types() -> dict:
    return typing.get_type_hints(Config)


def _type_name(kind) -> str:
    return str(kind).replace("typing.", "") if typing.get_origin(kind) else kind.__name__


def choices(kind) -> tuple | None:
    """The options of a Literal field type, else None."""
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def options(key: str) -> tuple:
    """The choices of a Literal field, e.g. options("loss_type")."""
    return choices(_types()[key])


def _convert(key: str, value, kind):
    """A flag's string (or a YAML value) as the field's type, or an error naming the key."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
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
        if origin is list:  # --lora_target_modules q_proj,v_proj
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            return [args[0](v) for v in items]
        if origin is dict:  # --rewards correctness=1,strict_format=0.5, or as YAML / JSON: {"correctness": 1}
            if isinstance(value, str) and value.strip().startswith("{"):
                value = yaml.safe_load(value)
            elif isinstance(value, str):
                value = dict(item.split("=", 1) for item in value.split(",") if item.strip())
            if args[1] is float:
                return {str(k).strip(): float(v) for k, v in value.items()}
            # any other value type (chat_template_kwargs): "false" from a flag reads as YAML does
            return {str(k).strip(): yaml.safe_load(v) if isinstance(v, str) else v for k, v in value.items()}
    except (ValueError, TypeError, AttributeError, yaml.YAMLError):
        pass
    if origin is dict and args[1] is not float:
        raise UserError(f"config key {key!r} wants name=value pairs, e.g. --{key} enable_thinking=false (or a "
                        f"mapping: in a recipe {key}: {{enable_thinking: false}}); got {value!r}")
    if origin is dict:
        raise UserError(f"config key {key!r} wants name=weight pairs, e.g. --{key} correctness=1.0,soft_format=0.5 "
                        f"(or a mapping: '{{\"correctness\": 1.0}}', in a recipe {key}: {{correctness: 1.0}}); "
                        f"got {value!r}")
    items = " (its items must be numbers)" if origin is list and args[0] is float else ""
    raise UserError(f"config key {key!r} wants a {_type_name(kind)}{items}, got {value!r}")


def _unknown(key: str, valid) -> UserError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown config key {key!r}.{hint} (python config.py --help lists all keys)")


def renamed(values: dict) -> dict:
    """A config.json written before keys were renamed, with today's names (the old KV-cache key `sampler`
    becomes kv_cache where the sampling idea was still called rollout)."""
    if "rollout" not in values:
        return values
    values = dict(values)
    if "sampler" in values:
        values["kv_cache"] = values.pop("sampler")
    return {RENAMED.get(k, k): v for k, v in values.items()}


def update(cfg: Config, values: dict) -> Config:
    types = _types()
    for key, value in values.items():
        if key in RENAMED:
            raise UserError(f"config key {key!r} is now {RENAMED[key]!r}: write {RENAMED[key]}: {value} in the "
                            f"recipe (--{RENAMED[key]} {value} as a flag)")
        if key not in types:
            raise _unknown(key, list(types))
        setattr(cfg, key, _convert(key, value, types[key]))
    return cfg


def parse_flags(argv: list[str]) -> dict:
    """['--a', '1', '--b=2', '--liger'] -> {'a': '1', 'b': '2', 'liger': 'true'}."""
    flags, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"expected --key value, got {arg!r}")
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
    """Checks of the fields every run uses; a sampling idea's own fields are checked by its constructor."""
    for key, kind in _types().items():  # Literal fields set directly, as Config(...) in code
        if (options := choices(kind)) and getattr(cfg, key) not in options:
            raise UserError(f"{key} must be one of {list(options)}, got {getattr(cfg, key)!r}")
    if cfg.liger and cfg.loss_type == "reinforce":  # logprobs.liger_loss maps every other loss type onto Liger's
        raise UserError("Liger's fused loss has no plain REINFORCE (no ratio): drop --liger for loss_type reinforce")
    if cfg.num_chains < 2 and cfg.adv_scale != "none":
        raise UserError("group-normalised advantages need num_chains >= 2")
    for key in ("prompts_per_step", "num_chains", "micro_batch_size", "max_steps", "eval_every",
                "save_every", "max_completion_tokens", "max_prompt_tokens", "num_iterations", "keep_last",
                "max_bad_steps", "sft_warmup_steps", "lr_decay_steps", "max_sampling_rounds", "sft_batch_size",
                "eval_samples", "eval_batch_size", "logp_chunk", "tiny_hidden", "tiny_layers", "tiny_vocab_size",
                "arithmetic_train_size", "arithmetic_test_size", "arithmetic_min_steps", "addition_digits",
                "digits_count", "digits_train_size", "digits_test_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.max_frames < 2:
        raise UserError(f"max_frames must be at least 2 (a video's temporal patch is two frames), got {cfg.max_frames}")
    for key in ("learning_rate", "sft_learning_rate", "max_grad_norm", "cispo_max_weight", "fps"):
        if not getattr(cfg, key) > 0:  # a rate of 0 trains nothing, a negative one climbs the loss (NaN too)
            raise UserError(f"{key} must be above 0, got {getattr(cfg, key)}")
    for key in ("adam_beta1", "adam_beta2", "lora_dropout"):
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if not 0 <= cfg.eps_low < 1:  # the ratio is clipped from below at 1 - eps_low, which must stay above 0
        raise UserError(f"eps_low must be in [0, 1), got {cfg.eps_low}")
    if cfg.arithmetic_max_steps < cfg.arithmetic_min_steps:
        raise UserError(f"arithmetic_max_steps ({cfg.arithmetic_max_steps}) must be at least arithmetic_min_steps "
                        f"({cfg.arithmetic_min_steps})")
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise UserError(f"training samples need temperature > 0 and 0 < top_p <= 1 (log-probs are taken at "
                        f"that temperature), got {cfg.temperature} and {cfg.top_p}; greedy is for eval only")
    if cfg.top_p < 1 and cfg.num_iterations > 1:
        raise UserError(f"top_p {cfg.top_p} samples from the nucleus while the log-probs, and so the ratio that "
                        f"num_iterations {cfg.num_iterations} clips, are over the whole vocabulary: set top_p 1, "
                        f"or num_iterations 1 (its ratio is exactly 1)")
    if cfg.dtype == "fp16":
        raise UserError("dtype fp16 would train without a loss scaler, and small gradients underflow to 0 in "
                        "fp16: use bf16 (GPUs since Ampere: RTX 30xx/40xx, A100, H100) or fp32")
    if cfg.few_shot and cfg.prompt_format == "chat":
        raise UserError("few_shot examples are part of the plain prompt format: set prompt_format plain (or auto "
                        "for a model without a chat template), or few_shot 0")
    if cfg.lora_r > 0 and cfg.train_only:
        raise UserError(f"lora_r {cfg.lora_r} and train_only {cfg.train_only} both pick the weights that train: "
                        f"for LoRA pass --train_only '' (configs/tiny.yaml sets it), else --lora_r 0")
    if cfg.lora_r > 0 and cfg.train_vision:
        raise UserError("train_vision trains the vision tower's own weights, which LoRA leaves frozen: set "
                        "lora_r 0 (full fine-tuning) to train it, or drop train_vision")
    if cfg.lora_r > 0 and not cfg.lora_target_modules:
        raise UserError("lora_r > 0 needs lora_target_modules (e.g. q_proj,v_proj); or set lora_r 0 for "
                        "full fine-tuning")
    for key in ("think_min_chars", "overlong_buffer_tokens", "weight_decay", "sft_weight_decay", "beta", "eps_high",
                "warmup_steps", "sft_steps", "eval_n", "eval_temperature", "log_samples", "lora_r", "min_pixels",
                "max_pixels", "logp_chunk_mb", "few_shot"):
        if not getattr(cfg, key) >= 0:
            raise UserError(f"{key} must be at least 0, got {getattr(cfg, key)}")
    for key in ("sft_answer_only_frac", "sft_slip_rate"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"{key} is a share of the warm-start targets, between 0 and 1; got {getattr(cfg, key)}")
    if cfg.sft_slip_rate > 0 and cfg.dataset not in ("arithmetic", "digits", "clips"):
        raise UserError("sft_slip_rate reworks the built-in tasks' solutions (dataset arithmetic, digits or clips); "
                        f"set it to 0 for {cfg.dataset!r}")
    if cfg.dataset == "arithmetic" and cfg.arithmetic_max_value < 12:
        raise UserError(f"arithmetic_max_value must be at least 12 (problems start from up to 12 items), "
                        f"got {cfg.arithmetic_max_value}")
    if cfg.sampler != "verifier" and "verifier_score" in cfg.rewards:
        raise UserError("the verifier_score reward reads the verifier's [SCORE] lines: use it with --sampler verifier")
    if cfg.eval_temperature == 0 and cfg.eval_samples > 1:
        raise UserError("greedy evaluation (eval_temperature 0) gives one answer per question: "
                        "set eval_samples 1 or eval_temperature > 0")


def read_recipe(path: str) -> dict:
    """A YAML recipe as {key: value}, or an error that names the file, the line and the layout."""
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"--config {path}: not valid YAML{where} ({problem}): fix that line. A recipe holds one "
                            f"`key: value` per line, lists as [a, b], mappings as {{name: 1.0}} (see configs/tiny.yaml)"
                            ) from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UserError(f"--config {path}: a recipe is `key: value` lines (a mapping of config keys), but this file "
                        f"holds a {type(recipe).__name__}")
    return recipe


def load(argv: list[str]) -> Config:
    """Defaults, then the YAML recipe (--config), then flags; --resume starts from the run's config.
    Then the loss type's LOSS_DEFAULTS, for the keys none of those set."""
    flags, recipe, resumed = parse_flags(argv), {}, {}
    cfg = Config()
    if "resume" in flags:
        if not os.path.isfile(f"{flags['resume']}/config.json"):
            raise UserError(f"--resume {flags['resume']}: no run there ({flags['resume']}/config.json "
                            f"is missing); pass the out_dir of an earlier run")
        with open(f"{flags['resume']}/config.json") as f:
            try:
                resumed = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"--resume {flags['resume']}: its config.json is not valid JSON ({e}); train.py "
                                f"writes it whole, so it was edited by hand: fix it there") from None
        resumed = renamed(resumed)
        update(cfg, resumed)
    if "config" in flags:
        path = flags.pop("config")
        if not os.path.isfile(path):
            raise UserError(f"--config {path}: no such file (the recipes are in configs/)")
        recipe = read_recipe(path)
        update(cfg, recipe)
    update(cfg, flags)
    given = set(flags) | set(recipe) | set(resumed)
    for key, value in LOSS_DEFAULTS.get(cfg.loss_type, {}).items():
        if key not in given:
            setattr(cfg, key, value)
    if cfg.loss_type == "dr_grpo" and cfg.adv_scale != "none":
        print(f"warning: loss_type dr_grpo with adv_scale {cfg.adv_scale!r} divides advantages by a std, which "
              f"Dr. GRPO removes (its default is adv_scale none): this is dr_grpo's length normaliser alone",
              file=sys.stderr)
    validate(cfg)
    return cfg


def save(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"  # written whole, then renamed: a crash never leaves half a config
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    os.replace(tmp, path)


def _read_fields() -> tuple[dict[str, str], dict[str, str]]:
    """({field: its help}, {field: the first word of its section}), read once from Config's source: a
    field's help is its trailing comment, then the comment-only lines under it; a `# --- name (...)` line
    starts a section (model, data, sampling, guided, GHPO, verifier, rewards, loss, optimizer, warm,
    evaluation, run)."""
    names, texts, sections, field, section = {f.name for f in dataclasses.fields(Config)}, {}, {}, None, ""
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(Config)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            field = tok.string  # a field's first line starts at column 4 with its name
            sections[field] = section
        elif tok.type == tokenize.COMMENT and tok.string.startswith("# ---"):
            field, section = None, tok.string[len("# ---"):].split()[0]
        elif tok.type == tokenize.COMMENT and field:
            texts[field] = (texts.get(field, "") + " " + tok.string.lstrip("# ").strip()).strip()
    return texts, sections


def help_texts() -> dict[str, str]:
    """{field: its help} (_read_fields)."""
    return _read_fields()[0]


def sections() -> dict[str, str]:
    """{field: the first word of its section} (_read_fields): sft.py derives its cache key from them."""
    return _read_fields()[1]


def print_help() -> None:
    texts, types, defaults = help_texts(), _types(), dataclasses.asdict(Config())
    print(__doc__.split("\n\n")[0] + "\n")
    for f in dataclasses.fields(Config):
        kind = types[f.name]
        kind = "|".join(choices(kind)) if choices(kind) else _type_name(kind)
        default = json.dumps(defaults[f.name]) if not isinstance(defaults[f.name], str) else repr(defaults[f.name])
        print(f"--{f.name} ({kind}, default {default[:60]})\n    {texts.get(f.name, '')}")


if __name__ == "__main__":
    if "--help" in sys.argv or "-h" in sys.argv:
        print_help()
        sys.exit()
    print(json.dumps(dataclasses.asdict(load(sys.argv[1:])), indent=2))
