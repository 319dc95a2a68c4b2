"""GRPO training, top to bottom like an algorithm box.

    python train.py --config configs/tiny.yaml                      # CPU demo, built-in model and task
    python train.py --model_name Qwen/Qwen2.5-1.5B-Instruct          # the reference GSM8K setup
    python train.py --resume out/run                                 # continue from the last checkpoint

For each step: take B questions, sample G chains for each (rollout.py), score every chain with the
reward functions (rewards.py), normalise rewards within each question's group into advantages, and
take an optimizer step on the policy loss over the tokens the policy sampled (Rollout.loss_mask);
advantages, the loss family and the update live in losses.py.

Where this differs from the papers, on purpose:
- One optimizer step per rollout by default (num_iterations 1): the ratio is then exactly 1 and
  clipping never acts, so a loss near 0 is expected; the gradient is still the policy gradient.
- Group std is the population std (no Bessel correction), so a group of 2 chains is well defined.
- The built-in tiny model is first warm-started by a short supervised pass on reference solutions
  (sft_steps), so that GRPO starts from a policy that sometimes succeeds.
"""
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import checkpoint
import config
import data
import evaluator
import guidance
import kahan
import llms
import losses
import plot
import rewards
import rollout
import verifier
import verifier_backends

# ----------------------------------------------------------------------------------------------
# Setup: optimizer, schedule, supervised warm start


def make_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params, **kwargs)
    if cfg.kahan_updates:  # bf16 weights: carry each update's rounding error instead of dropping it
        kahan.attach(optimizer)

    def factor(step):  # step counts GRPO steps; linear warmup, then constant or cosine to 0
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warm_start(model, tokenizer, examples, cfg, device) -> None:
    """Supervised pass on reference solutions (cross-entropy on the completion tokens only).

    Learning rate: linear warmup over sft_warmup_steps, then cosine decay to 0 at sft_steps; the
    decay matters (tiny demo on clean targets, step-0 accuracy: 26.8% against 14.6% at a constant
    rate). A share sft_answer_only_frac of the targets is the final answer alone, without the worked
    steps; sft_slip_rate puts carried one-off slips into the built-in task's solutions (data.with_slips).
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft_learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.sft_warmup_steps)
                                                  * 0.5 * (1 + math.cos(math.pi * s / cfg.sft_steps)))
    rng = random.Random(cfg.seed)
    for _ in tqdm(range(cfg.sft_steps), desc="warm start (SFT)", leave=False):
        batch = rng.sample(examples, min(cfg.sft_batch_size, len(examples)))
        prompts = [llms.chat_prompt(tokenizer, cfg.system_prompt, ex["question"]) for ex in batch]
        targets = [data.target_text(ex, rng.random() < cfg.sft_answer_only_frac, cfg.sft_slip_rate, rng)
                   for ex in batch]
        r = rollout.teacher_forced(tokenizer, prompts, targets, cfg.max_prompt_tokens, cfg.max_completion_tokens)
        start = losses.first_trained_column(r.loss_mask)
        mask = r.loss_mask[:, start:].to(device)
        logps = losses.token_logps(model, r.input_ids.to(device), r.attention_mask.to(device), start, 1.0,
                                 cfg.logp_chunk)
        nll = -(logps * mask).sum() / mask.sum()  # mean over the target tokens
        nll.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def pick_device(cfg) -> str:
    """cfg.device, with "auto" resolved to cuda when a GPU is there, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def load_data(cfg) -> tuple[list[dict], list[dict]]:
    """(train, test) examples {"question", "answer", "solution"} of cfg.task, as data.load reads them."""
    return data.load(cfg.dataset, cfg.dataset_config, cfg.train_split, cfg.test_split, cfg.test_dataset,
                     cfg.question_field, cfg.answer_field, cfg.seed, cfg.arithmetic_train_size,
                     cfg.arithmetic_test_size, cfg.arithmetic_min_steps, cfg.arithmetic_max_steps,
                     cfg.arithmetic_max_value, cfg.task, cfg.prompt_template, cfg.skip_bad_rows)


def reward_settings(cfg) -> dict:
    """The config values reward functions take as keyword arguments (next to each chain's info)."""
    return {"think_fault_penalty": cfg.think_fault_penalty, "think_min_chars": cfg.think_min_chars,
            "think_short_penalty": cfg.think_short_penalty, "answer_exact_reward": cfg.answer_exact_reward,
            "answer_contains_reward": cfg.answer_contains_reward, "answer_wrong_reward": cfg.answer_wrong_reward,
            "overlong_max_tokens": cfg.max_completion_tokens, "overlong_buffer_tokens": cfg.overlong_buffer_tokens}


def step_batch(examples, step: int, size: int, seed: int) -> list[dict]:
    """The questions of a step: a fresh seeded shuffle per epoch, so a resumed run sees the same order."""
    epoch_len = max(1, len(examples) // size)
    epoch, pos = divmod(step - 1, epoch_len)
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [examples[i] for i in order[pos * size:(pos + 1) * size]]


def peak_mem_gb() -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def append_jsonl(path: str, row: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # a full disk: say so; a half-written line is dropped on resume
        raise RunStopped(f"could not append to {path}: {e.strerror or e}. Free disk space, then continue with "
                         f"--resume {os.path.dirname(path)} (steps after the last checkpoint are redone)") from e


class RunStopped(RuntimeError):
    """The run cannot go on (repeated non-finite steps, out of memory, full disk); the message says why
    and what to change. What the run wrote so far, its last checkpoint included, is intact."""


class StopOnCtrlC:
    """From creation to restore(), the first Ctrl-C only asks the loop to stop after the current step
    (which then saves a checkpoint); a second one interrupts at once, the previous checkpoint intact."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)")

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ----------------------------------------------------------------------------------------------
# The loop


def main(argv: list[str]) -> None:
    hf_logging.disable_progress_bar()  # keep the terminal to our own bar
    cfg = config.load(argv)
    if cfg.resume:
        cfg.out_dir = cfg.resume
    device = pick_device(cfg)
    rewards.check_names(cfg.rewards)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if not cfg.resume and os.path.exists(metrics_path):  # never mix two runs or overwrite one
        raise FileExistsError(f"{cfg.out_dir} already holds a run: continue it with --resume {cfg.out_dir}, "
                              f"or start a new one with another --out_dir (or delete the folder)")
    os.makedirs(cfg.out_dir, exist_ok=True)

    # 1. data: train and held-out test examples {"question", "answer", "solution"} of cfg.task
    train_set, test_set = load_data(cfg)
    if cfg.rollout == "ghpo":  # hints are cut from reference solutions: fail now, not at the first hint
        guidance.check_solutions(train_set, cfg.dataset)
    eval_set = evaluator.subset(test_set, cfg.eval_n, cfg.seed)
    print(f"data: {len(train_set)} train questions, evaluating on {len(eval_set)} held-out questions")
    verifier_backend = None  # built before the policy, so that an unreachable server fails the run at once
    if cfg.rollout == "verifier":
        verifier_backend = verifier_backends.make(
            cfg.verifier_backend, cfg.verifier_model, cfg.verifier_base_url, cfg.verifier_api_key_env,
            cfg.verifier_timeout_s, cfg.verifier_retries, cfg.verifier_concurrency, cfg.verifier_max_tokens,
            cfg.verifier_temperature, cfg.verifier_prompt, cfg.verifier_8bit, device, cfg.dtype, cfg.trust_remote_code)

    context = llms.context_length(cfg.model_name, cfg.trust_remote_code)  # reads config.json only
    if context and cfg.max_prompt_tokens + cfg.max_completion_tokens > context:
        raise ValueError(f"max_prompt_tokens + max_completion_tokens = {cfg.max_prompt_tokens} + "
                         f"{cfg.max_completion_tokens} exceeds {cfg.model_name}'s context of {context} tokens: "
                         f"lower one of them")

    # 2. model: a fresh run starts from model_name; a resumed one from its latest checkpoint
    ckpt = checkpoint.latest(cfg.out_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:  # stopped before its first checkpoint: nothing to keep, start over
        print(f"--resume {cfg.resume}: no complete checkpoint yet, so the run starts over in the same folder")
        for name in ("metrics.jsonl", "samples.jsonl"):
            checkpoint.truncate_log(os.path.join(cfg.out_dir, name), -1)
    base_dir = os.path.join(cfg.out_dir, "base_model")  # the model after its warm start, if any
    base_name = base_dir if ckpt is not None and os.path.isdir(base_dir) else cfg.model_name
    lora_resume = ckpt is not None and checkpoint.is_adapter(ckpt)
    if ckpt is not None and lora_resume != (cfg.lora_r > 0):
        raise ValueError(f"{ckpt} holds {'a LoRA adapter' if lora_resume else 'full weights'}, but lora_r is "
                         f"{cfg.lora_r}: resume with the run's own lora_r (drop --lora_r from the command)")
    config.save(cfg, os.path.join(cfg.out_dir, "config.json"))  # before the model: --resume works from here on
    model_kwargs = dict(device=device, dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing,
                        liger=cfg.liger, trust_remote_code=cfg.trust_remote_code,
                        tiny_vocab_size=cfg.tiny_vocab_size, tiny_hidden=cfg.tiny_hidden,
                        tiny_layers=cfg.tiny_layers, seed=cfg.seed,
                        tiny_corpus=[f"system\n{cfg.system_prompt}\nuser\n{ex['question']}\nassistant\n"
                                     f"{data.target_text(ex)}" for ex in train_set]
                        if cfg.model_name == llms.TINY else None)  # only the tiny tokenizer trains on it
    model, tokenizer = llms.load(ckpt if (ckpt and not lora_resume) else base_name, **model_kwargs)

    # 3. warm start (fresh runs only); the starting weights are kept: resume, LoRA and the reference use them
    if ckpt is None and cfg.sft_steps > 0:
        warm_start(model, tokenizer, train_set, cfg, device)
    if ckpt is None and (cfg.sft_steps > 0 or cfg.model_name == llms.TINY):
        checkpoint.save_model(base_dir, model, tokenizer, what="the warm-started model")
        base_name = base_dir
    if cfg.lora_r > 0:
        model = llms.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                              adapter_path=ckpt if lora_resume else "")
    if cfg.train_only:  # e.g. the RMSNorm scales alone; the warm start above trained every weight
        print(f"GRPO trains {llms.train_only(model, cfg.train_only):,} weights: those named {cfg.train_only}")
    ref_model = None
    if cfg.beta > 0 and cfg.lora_r == 0:  # full fine-tuning needs a frozen copy; LoRA disables its adapter
        ref_model, _ = llms.load(base_name, **{**model_kwargs, "gradient_checkpointing": False})
        ref_model.eval().requires_grad_(False)
    optimizer, scheduler = make_optimizer(model, cfg)

    first_step = 1
    if ckpt is not None:
        state = checkpoint.load_state(ckpt, optimizer, scheduler)
        first_step = state["step"] + 1
        for name in ("metrics.jsonl", "samples.jsonl"):
            checkpoint.truncate_log(os.path.join(cfg.out_dir, name), state["step"])
        checkpoint.set_rng_state(state["rng"])  # last, so that loading consumed no randomness
        print(f"resumed from {ckpt} at step {state['step']}")

    def run_eval(step):
        # its own fixed-seed RNG: every eval samples alike, and training's random stream is untouched
        with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):
            torch.manual_seed(cfg.seed)
            metrics, records = evaluator.evaluate(
                model, tokenizer, eval_set, cfg.system_prompt, cfg.max_prompt_tokens,
                cfg.max_completion_tokens, cfg.eval_temperature, cfg.eval_samples, cfg.eval_batch_size, cfg.task)
        append_jsonl(metrics_path, {"step": step, "split": "eval", **metrics})
        os.makedirs(os.path.join(cfg.out_dir, "eval"), exist_ok=True)
        with open(os.path.join(cfg.out_dir, "eval", f"step_{step:06d}.jsonl"), "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)
        plot.plot([cfg.out_dir], cfg.out_dir)
        return metrics["accuracy"]

    accuracy = run_eval(0) if first_step == 1 else float("nan")
    bar = tqdm(range(first_step, cfg.max_steps + 1), initial=first_step - 1, total=cfg.max_steps, desc="GRPO")
    last_done = first_step - 1  # the last step whose update is applied: what a checkpoint holds
    bad_steps = 0  # updates skipped in a row for a non-finite loss or gradient
    ctrl_c = StopOnCtrlC()  # a first Ctrl-C stops after the current step
    try:
        for step in bar:
            t0 = time.time()
            # 4. sample B questions x G chains
            batch = step_batch(train_set, step, cfg.prompts_per_step, cfg.seed)
            prompts = [llms.chat_prompt(tokenizer, cfg.system_prompt, ex["question"]) for ex in batch]
            if cfg.rollout == "plain":  # each sampling idea is one branch here that returns a Rollout
                r = rollout.sample(model, tokenizer, prompts, cfg.num_chains, cfg.max_prompt_tokens,
                                   cfg.max_completion_tokens, cfg.temperature, cfg.top_p, sampler=cfg.sampler)
            elif cfg.rollout == "guided":  # Guide-GRPO: shared prefix, guidance tokens, postfix (guidance.py)
                r = guidance.three_phase(model, tokenizer, prompts, cfg.num_chains, cfg.max_prompt_tokens,
                                         cfg.max_completion_tokens, cfg.temperature, cfg.top_p,
                                         cfg.guide_min_prefix_tokens, cfg.guide_max_prefix_tokens,
                                         cfg.guide_prefix_retries, cfg.min_guide_tokens, cfg.max_guide_tokens,
                                         cfg.guide_loss_on)
            elif cfg.rollout == "ghpo":  # GHPO: all-wrong groups sampled again with part of the solution as a hint
                r = guidance.ghpo(model, tokenizer, batch, cfg.system_prompt, cfg.num_chains, cfg.max_prompt_tokens,
                                  cfg.max_completion_tokens, cfg.temperature, cfg.top_p, cfg.rewards,
                                  reward_settings(cfg), cfg.ghpo_accuracy_reward,
                                  cfg.ghpo_hint_ratios if step >= cfg.ghpo_start_step else [], cfg.ghpo_hint_unit,
                                  cfg.ghpo_hint_in, cfg.sampler)
            elif cfg.rollout == "verifier":  # Guided-GRPO: a verifier corrects each step (verifier.py)
                r = verifier.guided(model, tokenizer, prompts, [ex["question"] for ex in batch],
                                    [ex["answer"] for ex in batch], cfg.num_chains, verifier_backend,
                                    cfg.max_prompt_tokens, cfg.max_completion_tokens, cfg.temperature, cfg.top_p,
                                    cfg.verifier_turn_tokens, cfg.verifier_max_turns, cfg.verifier_step_end,
                                    cfg.verifier_train_on, cfg.verifier_nudge)
            # 5. rewards (N, K) from plain functions, weighted sum (N,), group-normalised advantages (N,)
            answers = [batch[g]["answer"] for g in r.group.tolist()]
            per_fn, names, reward_errors = rewards.score(r.texts, answers, r.info, cfg.rewards,
                                                         reward_settings(cfg))
            total = rewards.total(per_fn, names, cfg.rewards)
            if cfg.rollout == "guided" and cfg.guide_position_weight:  # weighted by where the guidance sits
                total = guidance.weight_rewards(total, r.info)
            advantages, zero_adv_frac = losses.group_advantages(total, r.group.cpu(), cfg.adv_scale)
            # 6. policy update on the sampled tokens only
            stats = losses.train_on_rollout(model, ref_model, r, advantages, optimizer, cfg)
            scheduler.step()
            last_done = step
            bad_steps = bad_steps + 1 if stats["skipped"] else 0
            if stats["skipped"]:
                tqdm.write(f"step {step}: loss or gradient not finite, update skipped ({bad_steps} in a row)")

            # 7. log, evaluate, plot, checkpoint
            dt = time.time() - t0
            completion_lens = torch.tensor([d["completion_len"] for d in r.info], dtype=torch.float)  # (N,)
            row = {"step": step, "split": "train", "reward": total.mean().item(),
                   **{f"reward/{k}": per_fn[:, i].mean().item() for i, k in enumerate(names)},
                   **{f"reward_errors/{k}": n for k, n in reward_errors.items() if n},
                   "reward_std": total.std().item(), "zero_adv_frac": zero_adv_frac,
                   "completion_len": completion_lens.mean().item(),
                   "truncated_frac": sum(d["truncated"] for d in r.info) / len(r), **stats,
                   "lr": scheduler.get_last_lr()[0], "step_time_s": dt,
                   "tokens_per_s": completion_lens.sum().item() / dt, "peak_mem_gb": peak_mem_gb()}
            if cfg.rollout == "guided":
                row.update(guidance.summary(r.info))  # guide/prefix_len, guidance_len, postfix_len, fallback
            elif cfg.rollout == "ghpo":
                row.update(guidance.ghpo_summary(r.info, cfg.ghpo_hint_ratios))  # ghpo/hinted@r, accuracy before/after
            elif cfg.rollout == "verifier":
                row.update(verifier.summary(r.info))  # verifier/turns, stop_rate, latency_s, failed_calls, ...
            append_jsonl(metrics_path, row)
            for i in range(min(cfg.log_samples, len(r))):
                append_jsonl(os.path.join(cfg.out_dir, "samples.jsonl"), {
                    "step": step, "question": batch[r.group[i]]["question"], "answer": answers[i],
                    "completion": r.texts[i], "rewards": dict(zip(names, per_fn[i].tolist())),
                    "advantage": advantages[i].item(), "info": r.info[i]})
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                accuracy = run_eval(step)
            stop = ctrl_c.requested or bad_steps >= cfg.max_bad_steps
            if step % cfg.save_every == 0 or step == cfg.max_steps or stop:
                checkpoint.save(cfg.out_dir, step, model, tokenizer, optimizer, scheduler, cfg.keep_last)
            if bad_steps >= cfg.max_bad_steps:  # the weights saved are those of the last good step
                raise RunStopped(
                    f"{bad_steps} steps in a row (to step {step}) had a non-finite loss or gradient, so their "
                    f"updates were skipped; checkpoint of step {step} saved with the last good weights. "
                    f"Look at reward/* and grad_norm in {metrics_path}; lower learning_rate "
                    f"({cfg.learning_rate}) or max_grad_norm, or use dtype fp32 or bf16 instead of fp16; "
                    f"then continue with --resume {cfg.out_dir} (or raise max_bad_steps)")
            if ctrl_c.requested:
                break
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{accuracy:.2f}", loss=f"{row['loss']:.3f}")
    except torch.OutOfMemoryError:  # train_on_rollout and rollout.generate already retried in smaller pieces
        losses.free_memory()
        checkpoint.save(cfg.out_dir, last_done, model, tokenizer, optimizer, scheduler, cfg.keep_last)
        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
        raise RunStopped(
            f"out of memory at step {last_done + 1}, even in micro-batches of 1 chain (peak {peak_mem_gb():.1f} GB "
            f"of {total:.1f} GB). Checkpoint of step {last_done} saved. Lower max_completion_tokens "
            f"({cfg.max_completion_tokens}), num_chains ({cfg.num_chains}), prompts_per_step "
            f"({cfg.prompts_per_step}) or logp_chunk ({cfg.logp_chunk}); or turn on gradient_checkpointing, "
            f"liger, optimizer adamw8bit, lora_r > 0. Then continue with --resume {cfg.out_dir}") from None
    finally:
        ctrl_c.restore()
    if ctrl_c.requested:
        print(f"stopped by Ctrl-C after step {last_done}: continue with --resume {cfg.out_dir}")
        return
    print(f"done: {cfg.out_dir}/metrics.jsonl, curves in {cfg.out_dir}/reward.png and accuracy.png")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except RunStopped as e:
        sys.exit(f"stopped: {e}")
