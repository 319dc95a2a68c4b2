"""Run by tests/test_distributed.py as one process (`python tests/dist_worker.py OUT`) and as two ranks
(`torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT`).

exact: one update on fixed teacher-forced chains (4 groups x 2 chains, fixed advantages) for each case
below; rank k trains on its share of the groups. Rank 0 saves the trained weights and the update's
figures to OUT/<case>_world<N>.pt, for the test to compare one process with two ranks.
figures: grpo.step with a sampler whose rewards differ by rank; rank 0 saves the train line.
ideas: one grpo.step of every sampler in samplers.SAMPLERS; whether the ranks' weights stay equal, and
the idea's own figures (its Rollout.stats keys);
a greedy evaluation of 7 questions in batches of 2 (rank k: batches k, k + N, ...).
"""
import copy
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_tasks  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import evaluator  # noqa: E402
import grpo  # noqa: E402
import llms  # noqa: E402
import optim  # noqa: E402
import rewards  # noqa: E402
import rollout  # noqa: E402
import samplers  # noqa: E402

LR = 1e-2
CASES = {f"{t}": {"loss_type": t} for t in ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce")}
CASES["bnpo"] |= {"sort_micro_batches": False}  # its normaliser is per micro-batch: the same ones on 1 or 2 ranks
CASES["grpo_beta"] = {"loss_type": "grpo", "beta": 0.1}
CASES["dapo_lora_beta"] = {"loss_type": "dapo", "beta": 0.1, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
CASES["grpo_batch_std"] = {"loss_type": "grpo", "adv_scale": "batch", "num_iterations": 2}
CASES["dapo_checkpointing"] = {"loss_type": "dapo", "gradient_checkpointing": True}
CASES["grpo_liger_beta"] = {"loss_type": "grpo", "liger": True, "beta": 0.1}
CASES["cispo_liger"] = {"loss_type": "cispo", "liger": True}
CASES["grpo_bf16_kahan"] = {"loss_type": "grpo", "dtype": "bf16", "kahan_updates": True}
# a trained weight no chain reaches (a VL model's vision tower on text questions): no gradient on any
# rank, so AdamW's weight decay must leave it alone on 2 ranks as on one
UNUSED_WEIGHT = "grpo_unused_weight_decay"
CASES[UNUSED_WEIGHT] = {"loss_type": "grpo", "weight_decay": 0.1}


def chains(tokenizer, examples):
    """4 questions x 2 chains of different lengths, and their rewards (8,)."""
    prompts = rollout.prompts_of(tokenizer, "", [ex for ex in examples[:4] for _ in range(2)])
    targets = [data.target_text(ex) if i % 2 else ex["answer"] for i, ex in enumerate(examples[:8])]
    r = rollout.teacher_forced(tokenizer, prompts, targets, 96, 40)
    r.group = torch.arange(8) // 2
    return r, torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.5, 1.0, 0.2])


def exact(out: str) -> None:
    train, _ = builtin_tasks.arithmetic_task(64, 4, seed=0)
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    base, tokenizer = llms.load(llms.TINY, "cpu", tiny_corpus=corpus, tiny_hidden=32, tiny_layers=2, seed=0)
    r, totals = chains(tokenizer, train)
    mine = distributed.shard(list(range(8)))  # this rank's groups' chains
    part = rollout.concat([(r, mine)], r.group[mine] - r.group[mine].min(), tokenizer.pad_token_id)
    for name, change in CASES.items():
        cfg = config.Config(**{"optimizer": "adamw", "kahan_updates": False, "learning_rate": LR,
                               "micro_batch_size": 2, "max_completion_tokens": 40, "logp_chunk": 16, **change})
        batch_std = torch.cat(distributed.gather(totals[mine])).std()  # the whole step's, as grpo.step takes it
        adv = grpo.group_advantages(totals[mine], part.group, cfg.adv_scale, batch_std)[0]
        torch.manual_seed(1)
        model, _ = llms.prepare(copy.deepcopy(base).to(torch.bfloat16 if cfg.dtype == "bf16" else torch.float32),
                                tokenizer, "cpu", cfg.gradient_checkpointing, cfg.liger)
        if name == UNUSED_WEIGHT:
            model.unused = torch.nn.Parameter(torch.ones(4))
        policy = llms.for_training(model, tokenizer, cfg, load_reference=lambda: copy.deepcopy(model))
        optimizer, _ = optim.make_optimizer(policy.model, cfg)
        figures = grpo.update(policy.model, policy.ref_model, part, adv, optimizer, cfg)
        if distributed.is_main():
            # a bf16 weight with Kahan updates is w + its residual: the weight the optimizer meant
            weights = {k: v.detach().float() + optimizer.state[v].get("residual", torch.zeros(())).float()
                       for k, v in policy.model.named_parameters() if v.requires_grad}
            torch.save({"weights": weights, "figures": figures},
                       os.path.join(out, f"{name}_world{distributed.world()}.pt"))


def figures(out: str) -> None:
    """grpo.step's train line under two ranks: rank 0's chains score 0, rank 1's score 1."""
    train, _ = builtin_tasks.arithmetic_task(64, 4, seed=0)
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    model, tokenizer = llms.load(llms.TINY, "cpu", tiny_corpus=corpus, tiny_hidden=32, tiny_layers=2, seed=0)
    cfg = config.Config(optimizer="adamw", kahan_updates=False, micro_batch_size=4, system_prompt="",
                        max_completion_tokens=40, rewards={"correctness": 1.0})
    policy = llms.for_training(model, tokenizer, cfg, load_reference=lambda: None)
    optimizer, _ = optim.make_optimizer(model, cfg)

    def sample(model, tokenizer, batch, step):  # 2 chains per question: the answer, or a wrong one
        good = distributed.rank() == 1
        texts = [f"#### {ex['answer'] if good or i else 'nope'}" for ex in batch for i in range(2)]
        r = rollout.teacher_forced(tokenizer, rollout.prompts_of(tokenizer, "", [ex for ex in batch for _ in "ab"]),
                                   texts, 96, 40)
        r.group = torch.arange(len(texts)) // 2
        r.stats = {"idea/rank": float(distributed.rank())}
        return r
    step = grpo.step(policy, sample, distributed.shard(train[:4]), 1, optimizer, cfg)
    if distributed.is_main():
        torch.save(step.metrics, os.path.join(out, f"figures_world{distributed.world()}.pt"))


# each idea's settings for one short step (an idea not named here runs with its defaults)
IDEA_SETTINGS = {"guided": {"min_guide_tokens": 2, "max_guide_tokens": 4, "guide_min_prefix_tokens": 4,
                    "guide_max_prefix_tokens": 8},
                 "ghpo": {"ghpo_start_step": 1, "ghpo_hint_ratios": [0.5], "ghpo_accuracy_reward": "correctness",
                          "rewards": {"correctness": 1.0, "length_mod_3": 1.0}},
                 "verifier": {"verifier_backend": "rules", "verifier_turn_tokens": 8, "verifier_max_turns": 3}}


def ideas(out: str) -> None:
    """One grpo.step of each sampling idea on the untrained tiny model (rank k: its 2 of the 4 questions),
    then whether every rank holds the same weights; and a greedy evaluation sharded over the ranks."""
    train, test = builtin_tasks.arithmetic_task(64, 8, seed=0)
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    base, tokenizer = llms.load(llms.TINY, "cpu", tiny_corpus=corpus, tiny_hidden=32, tiny_layers=2, seed=0)
    rewards.REWARDS["length_mod_3"] = lambda completion, answer, **info: len(completion) % 3  # never all equal
    results = {}
    for name in samplers.SAMPLERS:
        change = IDEA_SETTINGS.get(name, {})
        cfg = config.Config(**{"sampler": name, "device": "cpu", "optimizer": "adamw", "kahan_updates": False,
                               "system_prompt": "", "num_chains": 4, "max_prompt_tokens": 96,
                               "max_completion_tokens": 24, "micro_batch_size": 8, "learning_rate": 1e-2,
                               "rewards": {"length_mod_3": 1.0}, **change})
        policy = llms.for_training(copy.deepcopy(base), tokenizer, cfg, load_reference=lambda: None)
        optimizer, _ = optim.make_optimizer(policy.model, cfg)
        idea, stats_keys = samplers.make(cfg, device="cpu", train_set=train), set()

        def sample(*args):  # the idea's own figures, which the train line must carry
            r = idea(*args)
            stats_keys.update(r.stats)
            return r
        distributed.seed_step(cfg.seed, 1)
        step = grpo.step(policy, sample, distributed.shard(train[:4]), 1, optimizer, cfg)
        weights = distributed.gather([p.detach().clone() for p in policy.model.parameters()])
        results[name] = {"figures": step.metrics, "stats_keys": stats_keys, "in_sync": all(
            torch.equal(a, b) for other in weights[1:] for a, b in zip(weights[0], other))}
    cfg = config.Config(system_prompt="", max_prompt_tokens=96, max_completion_tokens=16, eval_temperature=0.0,
                        eval_samples=1, eval_batch_size=2)
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: greedy completions that differ from question to question
        for p in base.parameters():
            p.normal_(0, 0.3)
    results["eval"] = evaluator.evaluate(base.eval(), tokenizer, test[:7], cfg)
    if distributed.is_main():
        torch.save(results, os.path.join(out, f"ideas_world{distributed.world()}.pt"))


if __name__ == "__main__":
    distributed.setup(dataclasses.replace(config.Config(), prompts_per_step=4), "cpu")
    exact(sys.argv[1])
    figures(sys.argv[1])
    ideas(sys.argv[1])
    distributed.teardown()
    distributed.leave()
