"""Run by tests/test_fsdp.py as one process (`python tests/fsdp_worker.py OUT`, the reference: nothing is
sharded) and as two ranks with --fsdp (`torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT`).
Rank 0 writes what the tests compare to OUT/<name>_world<N>.pt.

exact: one update on fixed teacher-forced chains for each case of CASES (rank k trains on its share of the
chains; the "uneven" case gives rank 1 one group of three, so the ranks' micro-batches differ in number).
checkpoint: two updates, a checkpoint between them (checkpoint.save, as train.py saves); the reverse run
starts its second update from the checkpoint the other world size wrote (OUT/ckpt_world<M>).
sampling: for each fsdp_sampling, one grpo.step of each sampler, of plain sampling with LoRA, and of
dynamic sampling where rank 1 needs every round and rank 0 one; a greedy evaluation of 5 questions in batches of 2 (rank 0 makes two
generate calls, rank 1 one).
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_tasks  # noqa: E402
import checkpoint  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import fsdp  # noqa: E402
import evaluator  # noqa: E402
import grpo  # noqa: E402
import llms  # noqa: E402
import optim  # noqa: E402
import rewards  # noqa: E402
import rollout  # noqa: E402
import samplers  # noqa: E402
from dist_worker import IDEA_SETTINGS, chains  # noqa: E402

LR = 1e-2
BASE = {"optimizer": "adamw", "kahan_updates": False, "fsdp": True, "learning_rate": LR, "micro_batch_size": 2,
        "max_completion_tokens": 40, "logp_chunk": 16}
CASES = {t: {"loss_type": t} for t in ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce")}
CASES["bnpo"] |= {"sort_micro_batches": False}  # its normaliser is per micro-batch: the same ones on 1 or 2 ranks
CASES["grpo_beta"] = {"loss_type": "grpo", "beta": 0.1}
CASES["dapo_lora_beta"] = {"loss_type": "dapo", "beta": 0.1, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
CASES["grpo_iterations"] = {"loss_type": "grpo", "num_iterations": 2}
CASES["dapo_checkpointing"] = {"loss_type": "dapo", "gradient_checkpointing": True}
CASES["dapo_uneven"] = {"loss_type": "dapo"}  # rank 0: 3 groups (6 chains), rank 1: 1 group (2 chains)
CASES["grpo_bf16"] = {"loss_type": "grpo", "dtype": "bf16"}  # --fsdp: fp32 master weights, bf16 compute


def tiny(examples, seed=0):
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in examples]
    return llms.load(llms.TINY, "cpu", tiny_corpus=corpus, tiny_hidden=32, tiny_layers=2, seed=seed)


def trained_weights(model) -> dict:
    """The trained weights, whole (a collective under --fsdp: every rank calls it)."""
    return {k: fsdp.full(v).detach().float().clone() for k, v in model.named_parameters() if v.requires_grad}


def policy_of(base, tokenizer, cfg):
    torch.manual_seed(1)
    model, _ = llms.prepare(copy.deepcopy(base).to(torch.bfloat16 if cfg.dtype == "bf16" else torch.float32),
                            tokenizer, "cpu", cfg.gradient_checkpointing)
    policy = llms.for_training(model, tokenizer, cfg, load_reference=lambda: copy.deepcopy(model))
    fsdp.shard_policy(policy, cfg)  # one process: nothing
    return policy


def save(out: str, name: str, obj) -> None:
    if distributed.is_main():
        torch.save(obj, os.path.join(out, f"{name}_world{distributed.world()}.pt"))


def exact(out: str) -> None:
    train, _ = builtin_tasks.arithmetic_task(64, 4, seed=0)
    base, tokenizer = tiny(train)
    r, totals = chains(tokenizer, train)
    for name, change in CASES.items():
        cfg = config.Config(**BASE, **change)
        uneven = name == "dapo_uneven"
        mine = ([0, 1, 2, 3, 4, 5] if distributed.rank() == 0 else [6, 7]) if uneven and distributed.world() == 2 \
            else distributed.shard(list(range(8)))
        part = rollout.concat([(r, mine)], r.group[mine] - r.group[mine].min(), tokenizer.pad_token_id)
        adv = grpo.group_advantages(totals[mine], part.group, cfg.adv_scale)[0]
        policy = policy_of(base, tokenizer, cfg)
        optimizer, _ = optim.make_optimizer(policy.model, cfg)
        figures = grpo.update(policy.model, policy.ref_model, part, adv, optimizer, cfg)
        save(out, name, {"weights": trained_weights(policy.model), "figures": figures})


def two_updates(out: str) -> None:
    """Update 1, a checkpoint, update 2; and update 2 again from the other world size's checkpoint."""
    train, _ = builtin_tasks.arithmetic_task(64, 4, seed=0)
    base, tokenizer = tiny(train)
    r, totals = chains(tokenizer, train)
    mine = distributed.shard(list(range(8)))
    part = rollout.concat([(r, mine)], r.group[mine] - r.group[mine].min(), tokenizer.pad_token_id)
    cfg = config.Config(**BASE, loss_type="dapo", weight_decay=0.1)
    adv = grpo.group_advantages(totals[mine], part.group, cfg.adv_scale)[0]
    policy = policy_of(base, tokenizer, cfg)
    optimizer, scheduler = optim.make_optimizer(policy.model, cfg)
    grpo.update(policy.model, policy.ref_model, part, adv, optimizer, cfg)
    scheduler.step()
    out_dir = os.path.join(out, f"ckpt_world{distributed.world()}")
    whole = fsdp.full_state(policy.model, optimizer)
    if distributed.is_main():
        checkpoint.save(out_dir, 1, policy.model, tokenizer, optimizer, scheduler, 1, whole)
    grpo.update(policy.model, policy.ref_model, part, adv, optimizer, cfg)
    save(out, "continued", trained_weights(policy.model))
    other = os.path.join(out, f"ckpt_world{3 - distributed.world()}", "checkpoints", "step_000001")
    if os.path.isdir(other):  # the one-process run comes first: it has no other checkpoint to read
        save(out, "resumed", resume(other, cfg, tokenizer, part, adv))


def resume(path: str, cfg, tokenizer, part, adv) -> dict:
    """Update 2 from the checkpoint at `path`, loaded as a resumed run loads it; its trained weights."""
    model, _ = llms.load(path, "cpu")
    policy = llms.for_training(model, tokenizer, cfg, load_reference=lambda: None)
    fsdp.shard_policy(policy, cfg)
    optimizer, scheduler = optim.make_optimizer(policy.model, cfg)
    checkpoint.load_state(path, optimizer, scheduler)
    grpo.update(policy.model, policy.ref_model, part, adv, optimizer, cfg)
    return trained_weights(policy.model)


def sampling(out: str) -> None:
    train, test = builtin_tasks.arithmetic_task(64, 8, seed=0)
    base, tokenizer = tiny(train)
    rewards.REWARDS["length_mod_3"] = lambda completion, answer, **info: len(completion) % 3  # never all equal
    # rank 0's groups are informative, rank 1's never: rank 1 samples max_sampling_rounds rounds, rank 0 one
    rewards.REWARDS["rank_0_only"] = lambda completion, answer, **info: (
        len(completion) % 3 if distributed.rank() == 0 else 1.0)
    results = {}
    for mode in ("unshard", "per_layer"):
        runs = {name: IDEA_SETTINGS.get(name, {}) | {"sampler": name} for name in samplers.SAMPLERS}
        runs["dynamic"] = {"dynamic_sampling": True, "max_sampling_rounds": 3, "rewards": {"rank_0_only": 1.0}}
        runs["plain_lora"] = {"lora_r": 4, "lora_alpha": 8}  # generate through the PeftModel over the sharded base
        for name, change in runs.items():
            cfg = config.Config(**{**BASE, "fsdp_sampling": mode, "device": "cpu", "system_prompt": "",
                                   "num_chains": 4, "max_prompt_tokens": 96, "max_completion_tokens": 24,
                                   "micro_batch_size": 8, "rewards": {"length_mod_3": 1.0}, **change})
            policy = policy_of(base, tokenizer, cfg)
            optimizer, _ = optim.make_optimizer(policy.model, cfg)
            idea, calls = samplers.make(cfg, device="cpu", train_set=train), []

            def sample(*args):  # counts this rank's sample calls (dynamic sampling: its rounds)
                calls.append(1)
                return idea(*args)
            distributed.seed_step(cfg.seed, 1)
            questions = train[:4]
            step = grpo.step(policy, sample, distributed.shard(questions), 1, optimizer, cfg,
                             refill=lambda n, k: data.refill(train, 1, k, n, cfg.seed, taken=questions, per_round=2,
                                                             rank=distributed.rank(), world=distributed.world()))
            results[f"{mode}/{name}"] = {"figures": step.metrics, "calls": distributed.gather(len(calls)),
                                         "texts": distributed.gather(step.rollout.texts)}
        cfg = config.Config(fsdp=True, fsdp_sampling=mode, system_prompt="", max_prompt_tokens=96,
                            max_completion_tokens=16, eval_temperature=0.0, eval_samples=1, eval_batch_size=2)
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        with torch.no_grad():  # larger random weights: greedy completions that differ from question to question
            for p in model.parameters():
                p.normal_(0, 0.3)
        policy = llms.Policy(model, tokenizer)
        fsdp.shard_policy(policy, cfg)
        results[f"{mode}/eval"] = evaluator.evaluate(policy.model.eval(), tokenizer, test[:5], cfg)
    save(out, "sampling", results)


if __name__ == "__main__":
    distributed.setup(config.Config(**BASE, prompts_per_step=4), "cpu")
    exact(sys.argv[1])
    two_updates(sys.argv[1])
    sampling(sys.argv[1])
    distributed.teardown()
    distributed.leave()
