"""The supervised warm start: a short pass on reference solutions before GRPO (sft_steps > 0).

GRPO learns only from groups where some chains succeed; a policy that never succeeds gets no
gradient. The built-in tiny model starts from random weights, so its recipes first imitate the
reference solutions for a few hundred steps (cross-entropy on the completion tokens only).
FINDINGS.md has what the recipe's settings (decay, answer-only targets, slips) did to the demo.

    python sft.py --config configs/tiny.yaml --probe_every 150   # the demo's warm start alone, probed (7 min)

The probe prints, every probe_every steps, the running target NLL and the held-out accuracy greedy and
at eval_temperature (the eval protocol of train.py): the gap between the two is what GRPO's
sharpening has to work with, and whether greedy accuracy has stopped rising says whether the warm
start ended past the steep climb where the tiny model learns the sums (FINDINGS.md).

With `sft_cache: DIR` (compare.py sets it for its runs) a finished warm start is kept in DIR under a
hash of what shapes it (cache_key), and a later run with the same hash loads it instead of training
again: recipes that differ only after the warm start (the sampling idea, rewards, loss, GRPO's
optimizer, evaluation) then start from the same weights, and a comparison over seeds pays for each
seed's warm start once.
"""
import hashlib
import json
import math
import os
import random

import torch
import transformers
from tqdm import tqdm

import builtin_tasks
import config
import data
import llms
import logprobs
import rollout
import vision

# What shapes the warm-started weights, and so names its cached copy (cache_key): the config's model,
# data and warm-start sections (config.sections), but for what applies after the warm start (LoRA,
# train_only) and the cache's own folder; and the keys of other sections that warm_start reads
# (tests/test_train.py runs it and checks that it reads no other). A new key in those sections counts.
SHAPING_SECTIONS = ("model", "data", "warm")
APPLIED_AFTER = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "train_only", "sft_cache")
WARM_START_READS = ("seed", "device", "max_prompt_tokens", "max_completion_tokens", "logp_chunk", "logp_chunk_mb",
                    "max_grad_norm")
# the code the warm start runs: an edit to any of these files makes a new key
WARM_START_CODE = (builtin_tasks, data, llms, logprobs, rollout, vision)


def warm_start(model, tokenizer, examples: list[dict], cfg, probe=None, probe_every: int = 0) -> None:
    """cfg.sft_steps supervised steps on batches of examples' targets (data.target_text), in place.

    Learning rate: linear warmup over sft_warmup_steps, then cosine decay to 0 at sft_steps. A share
    sft_answer_only_frac of the targets is the final answer alone, without the worked steps;
    sft_slip_rate puts carried one-off slips into the built-in tasks' solutions (builtin_tasks.with_slips).
    probe(step, nll) is called every probe_every steps, nll a running mean of the target NLL.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft_learning_rate,
                                  weight_decay=cfg.sft_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.sft_warmup_steps)
                                                  * 0.5 * (1 + math.cos(math.pi * s / cfg.sft_steps)))
    rng = random.Random(cfg.seed)
    running = None
    for step in tqdm(range(1, cfg.sft_steps + 1), desc="warm start (SFT)", leave=False, disable=probe is not None):
        batch = rng.sample(examples, min(cfg.sft_batch_size, len(examples)))
        prompts = rollout.prompts_of(tokenizer, cfg.system_prompt, batch)
        targets = [data.target_text(ex, rng.random() < cfg.sft_answer_only_frac, cfg.sft_slip_rate, rng)
                   for ex in batch]
        r = rollout.teacher_forced(tokenizer, prompts, targets, cfg.max_prompt_tokens, cfg.max_completion_tokens,
                                   images=rollout.images_of(batch))
        start = logprobs.first_trained_column(r.loss_mask)
        mask = r.loss_mask[:, start:].to(device)
        logps = logprobs.token_logps(model, r.input_ids.to(device), r.attention_mask.to(device), start, 1.0,
                                   cfg.logp_chunk, r.visual, chunk_mb=cfg.logp_chunk_mb)
        nll = -(logps * mask).sum() / mask.sum()  # mean over the target tokens
        nll.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if probe is not None:  # the running NLL costs a device sync per step: only when probed
            running = nll.item() if running is None else 0.9 * running + 0.1 * nll.item()
            if step % probe_every == 0:
                probe(step, running)


def shaping_keys() -> list[str]:
    """The config keys that shape the warm-started weights (see SHAPING_SECTIONS)."""
    return sorted(k for k, section in config.sections().items()
                  if (section in SHAPING_SECTIONS and k not in APPLIED_AFTER) or k in WARM_START_READS)


def cache_key(cfg, prompt_layout: str = "") -> str:
    """A hash of everything that shapes the warm-started weights: the config's shaping_keys, the prompt
    layout installed on the tokenizer (its chat template: few-shot examples included), the source of
    this file and of WARM_START_CODE, and the torch and transformers versions."""
    keys = {k: getattr(cfg, k) for k in shaping_keys()}
    h = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode())
    h.update((prompt_layout or "").encode())
    for path in (__file__, *(module.__file__ for module in WARM_START_CODE)):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    return h.hexdigest()[:16]


def warm_start_cached(model, tokenizer, examples: list[dict], cfg) -> None:
    """warm_start, or with cfg.sft_cache the weights a run with the same cache_key left there."""
    if not cfg.sft_cache:
        return warm_start(model, tokenizer, examples, cfg)
    path = os.path.join(cfg.sft_cache, f"{cache_key(cfg, tokenizer.chat_template)}.pt")
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location=next(model.parameters()).device))
        print(f"warm start: loaded {path} (sft_cache)")
        return
    warm_start(model, tokenizer, examples, cfg)
    os.makedirs(cfg.sft_cache, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # torchrun's ranks may save the same warm start at once
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # whole or absent: a run killed while saving leaves no half file
    print(f"warm start: saved to {path} (sft_cache)")


if __name__ == "__main__":
    import dataclasses
    import sys
    import time

    import evaluator

    argv = sys.argv[1:] or ["--config", "configs/tiny.yaml"]
    every = 150
    if "--probe_every" in argv:
        i = argv.index("--probe_every")
        every = int(argv[i + 1])
        del argv[i:i + 2]
    cfg = config.load(argv)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_set, test_set = data.load(cfg)
    eval_set = evaluator.subset(test_set, cfg.eval_n, cfg.seed)
    shots = data.run_shots(cfg, train_set)
    model, tokenizer = llms.from_config(cfg, cfg.model_name, llms.pick_device(cfg.device), shots=shots,
                                       tiny_corpus=data.tiny_corpus(train_set, cfg.system_prompt))
    greedy = dataclasses.replace(cfg, eval_temperature=0.0, eval_samples=1)
    start, probing = time.time(), 0.0

    def probe(step: int, nll: float) -> None:
        global probing
        t = time.time()
        g = evaluator.evaluate(model, tokenizer, eval_set, greedy)[0]["accuracy"]
        s = evaluator.evaluate(model, tokenizer, eval_set, cfg)[0]["accuracy"]
        probing += time.time() - t
        print(f"step {step:5d}  nll {nll:.3f}  greedy {100 * g:5.1f}%  T={cfg.eval_temperature:g} {100 * s:5.1f}%  "
              f"({time.time() - start - probing:.0f} s of training)", flush=True)

    warm_start(model, tokenizer, train_set, cfg, probe, every)
