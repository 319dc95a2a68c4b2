"""GRPO training, top to bottom like an algorithm box. Nothing imports this file.

    python train.py --config configs/tiny.yaml                      # CPU demo, built-in model and task
    python train.py --model_name Qwen/Qwen2.5-1.5B-Instruct          # the reference GSM8K setup
    python train.py --resume out/run                                 # continue from the last checkpoint
    torchrun --nproc_per_node 4 train.py --config X                  # 4 GPUs: the same run (distributed.py)

For each step: take B questions, sample G chains for each with the sampling idea `--sampler` names
(samplers.py), score every chain with the reward functions (rewards.py), normalise rewards within
each question's group into advantages, and take an optimizer step on the policy loss over the tokens
the policy sampled (Rollout.loss_mask): grpo.step, the algorithm box, with the loss family and the update.
Under torchrun each rank samples its share of the B questions and the update is the one of all ranks'
chains (distributed.py); rank 0 writes.

Where this differs from the papers, on purpose:
- One optimizer step per rollout by default (num_iterations 1): the ratio is then exactly 1 and
  clipping never acts, so a loss near 0 is expected; the gradient is still the policy gradient.
- Group std is the population std (no Bessel correction), so a group of 2 chains is well defined.
- The built-in tiny model is first warm-started by a short supervised pass on reference solutions
  (sft_steps, sft.py), so that GRPO starts from a policy that sometimes succeeds.
"""
import math
import random
import sys
import time

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import checkpoint
import config
import data
import distributed
import fsdp
import evaluator
import grpo
import llms
import optim
import plot
import rewards
import rollout
import samplers
import sft
import vision


def load_policy(cfg, run: checkpoint.Run, device, train_set: list[dict], eval_set: list[dict]):
    """The policy: a fresh run starts from model_name (warm-started if sft_steps), a resumed one from its latest
    checkpoint; then LoRA or train_only, the frozen reference when beta > 0, and --fsdp's sharding."""
    with distributed.errors_stop_every_rank():
        shots = data.run_shots(cfg, train_set)  # the plain format's solved examples
        corpus = data.tiny_corpus(train_set, cfg.system_prompt)  # the built-in tiny model's tokenizer trains on it
        model, tokenizer = llms.from_config(cfg, run.model_path, device, shots=shots, tiny_corpus=corpus)
        rollout.check_prompts_fit(tokenizer, cfg, train_set + eval_set)  # a judge prompt must keep its instructions
        vision.check(tokenizer, cfg, train_set + eval_set)  # images need a VL model (and no Liger)
        if run.fresh and cfg.sft_steps > 0:
            sft.warm_start_cached(model, tokenizer, train_set, cfg)
    if run.fresh and (cfg.sft_steps > 0 or cfg.model_name in (llms.TINY, llms.TINY_VL)):
        run.save_base(model, tokenizer)  # the starting weights: resume, LoRA and the reference load them
    with distributed.errors_stop_every_rank():
        policy = llms.for_training(model, tokenizer, cfg, adapter_path=run.adapter_path, load_reference=lambda: (
            llms.from_config(cfg, run.base, device, shots=shots, tiny_corpus=corpus, gradient_checkpointing=False)[0]))
    distributed.broadcast_weights(policy.model)  # torchrun: every rank starts from rank 0's weights
    fsdp.shard_policy(policy, cfg)  # --fsdp: layers and root sharded over the ranks, the reference too
    return policy, tokenizer


def main(argv: list[str]) -> None:
    hf_logging.disable_progress_bar()  # keep the terminal to our own bar
    cfg = config.load(argv)
    rewards.check_names(cfg.rewards | ({cfg.eval_format: 0.0} if cfg.eval_format else {}))
    samplers.check(cfg)
    device = distributed.setup(cfg, llms.pick_device(cfg.device))  # torchrun: join the other ranks
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run = checkpoint.Run(cfg)  # a fresh run, or --resume: its latest checkpoint and trimmed logs

    with distributed.errors_stop_every_rank():  # an error on any rank stops every rank, printed once
        # 1. data: train and held-out test examples {"question", "answer", "solution"}
        train_set, test_set = data.load(cfg)
        eval_set = evaluator.subset(test_set, cfg.eval_n, cfg.seed)
        print(f"data: {len(train_set)} train questions, evaluating on {len(eval_set)} held-out questions")
        # the sampling idea, its start-up checks done (GHPO's solutions, the verifier backend) before the policy
        sample = samplers.make(cfg, device=device, train_set=train_set)
        llms.check_context(cfg)

    policy, tokenizer = load_policy(cfg, run, device, train_set, eval_set)  # 2. the policy
    with distributed.errors_stop_every_rank():
        optimizer, scheduler = optim.make_optimizer(policy.model, cfg)
        first_step = run.restore(optimizer, scheduler)

    def evaluate(step: int) -> float:  # held-out accuracy with plain sampling, logged and plotted
        metrics, records = evaluator.evaluate(policy.model, tokenizer, eval_set, cfg)
        run.log_eval(step, metrics, records)
        if run.writes:
            plot.plot([run.dir], run.dir)
        return metrics["accuracy"]

    # 3. the loop
    accuracy = evaluate(0) if first_step == 1 else math.nan
    rank, world = distributed.rank(), distributed.world()
    bar = tqdm(range(first_step, cfg.max_steps + 1), initial=first_step - 1, total=cfg.max_steps, desc="GRPO",
               disable=rank > 0)
    with checkpoint.Guard(run, policy, optimizer, scheduler, cfg) as guard:
        for step in bar:
            t0 = time.time()
            questions = data.step_batch(train_set, step, cfg.prompts_per_step, cfg.seed)  # B questions
            batch = distributed.shard(questions)  # this rank's B / N of them (all of them for one process)
            distributed.seed_step(cfg.seed, step)
            out = grpo.step(policy, sample, batch, step, optimizer, cfg,  # sample, score, advantages, update
                            refill=lambda n, k: data.refill(train_set, step, k, n, cfg.seed, taken=questions,
                                                            per_round=len(batch), rank=rank, world=world))
            scheduler.step()
            guard.applied(step, out.metrics["skipped"])

            # 4. log, evaluate, plot, checkpoint
            dt = time.time() - t0
            tokens = distributed.all_sum([sum(d["completion_len"] for d in out.rollout.info)])[0]  # all ranks
            run.log({"step": step, "split": "train", **out.metrics, "lr": scheduler.get_last_lr()[0],
                     "step_time_s": dt, "tokens_per_s": tokens / dt, "peak_mem_gb": checkpoint.peak_mem_gb()})
            run.log_samples(step, out, cfg.log_samples)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                accuracy = evaluate(step)
            if guard.end_of_step(step):  # Ctrl-C: checkpoint saved, stop here
                break
            bar.set_postfix(reward=f"{out.metrics['reward']:.2f}", acc=f"{accuracy:.2f}",
                            loss=f"{out.metrics['loss']:.3f}")
    run.close()  # the trackers of report_to
    distributed.teardown()
    if not guard.interrupted:
        print(f"done: {run.dir}/metrics.jsonl, curves in {run.dir}/reward.png and accuracy.png")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except distributed.OtherRankFailed:  # torchrun: the rank that failed printed why
        sys.exit(1)
    except checkpoint.RunStopped as e:
        sys.exit(f"stopped: {e}" if distributed.reports(e) else 1)
    except config.UserError as e:  # a mistake in what was asked: its message names the fix, no traceback
        sys.exit(f"error: {e}" if distributed.reports(e) else 1)
    distributed.leave()  # torchrun: the rank ends here, past the interpreter's teardown (distributed.leave)
