"""Run by tests/test_distributed.py as one process (`python tests/dist_worker.py OUT`) and as two ranks
(`torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT`).

exact: one update on fixed teacher-forced chains (4 groups x 2 chains, fixed advantages) for each case
below; rank k trains on its share of the groups. Rank 0 saves the trained weights and the update's
figures to OUT/<case>_world<N>.pt, for the test to compare one process with two ranks.
figures: grpo.step with a sampler whose rewards differ by rank; rank 0 saves the train line.
"""
import copy
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import grpo  # noqa: E402
import llms  # noqa: E402
import losses  # noqa: E402
import rollout  # noqa: E402

CASES = {f"{t}": {"loss_type": t} for t in ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce")}
CASES["bnpo"] |= {"sort_micro_batches": False}  # its normaliser is per micro-batch: the same ones on 1 or 2 ranks
CASES["grpo_beta"] = {"loss_type": "grpo", "beta": 0.1}
CASES["dapo_lora_beta"] = {"loss_type": "dapo", "beta": 0.1, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
CASES["grpo_batch_std"] = {"loss_type": "grpo", "adv_scale": "batch", "num_iterations": 2}


def chains(tokenizer, examples):
    """4 questions x 2 chains of different lengths, and their rewards (8,)."""
    prompts = rollout.prompts_of(tokenizer, "", [ex for ex in examples[:4] for _ in range(2)])
    targets = [data.target_text(ex) if i % 2 else ex["answer"] for i, ex in enumerate(examples[:8])]
    r = rollout.teacher_forced(tokenizer, prompts, targets, 96, 40)
    r.group = torch.arange(8) // 2
    return r, torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.5, 1.0, 0.2])


def exact(out: str) -> None:
    train, _ = data.arithmetic_task(64, 4, seed=0)
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    base, tokenizer = llms.load(llms.TINY, "cpu", tiny_corpus=corpus, tiny_hidden=32, tiny_layers=2, seed=0)
    r, totals = chains(tokenizer, train)
    mine = distributed.shard(list(range(8)))  # this rank's groups' chains
    part = rollout.concat([(r, mine)], r.group[mine] - r.group[mine].min(), tokenizer.pad_token_id)
    for name, change in CASES.items():
        cfg = config.Config(optimizer="adamw", kahan_updates=False, learning_rate=1e-2, micro_batch_size=2,
                            max_completion_tokens=40, logp_chunk=16, **change)
        batch_std = torch.cat(distributed.gather(totals[mine])).std()  # the whole step's, as grpo.step takes it
        adv = losses.group_advantages(totals[mine], part.group, cfg.adv_scale, batch_std)[0]
        torch.manual_seed(1)
        policy = llms.for_training(copy.deepcopy(base), tokenizer, cfg, load_reference=lambda: copy.deepcopy(base))
        optimizer, _ = losses.make_optimizer(policy.model, cfg)
        figures = losses.update(policy.model, policy.ref_model, part, adv, optimizer, cfg)
        if distributed.is_main():
            weights = {k: v.detach().clone() for k, v in policy.model.named_parameters() if v.requires_grad}
            torch.save({"weights": weights, "figures": figures},
                       os.path.join(out, f"{name}_world{distributed.world()}.pt"))


def figures(out: str) -> None:
    """grpo.step's train line under two ranks: rank 0's chains score 0, rank 1's score 1."""
    train, _ = data.arithmetic_task(64, 4, seed=0)
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    model, tokenizer = llms.load(llms.TINY, "cpu", tiny_corpus=corpus, tiny_hidden=32, tiny_layers=2, seed=0)
    cfg = config.Config(optimizer="adamw", kahan_updates=False, micro_batch_size=4, system_prompt="",
                        max_completion_tokens=40, rewards={"correctness": 1.0})
    policy = llms.for_training(model, tokenizer, cfg, load_reference=lambda: None)
    optimizer, _ = losses.make_optimizer(model, cfg)

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
        torch.save(step.figures, os.path.join(out, f"figures_world{distributed.world()}.pt"))


if __name__ == "__main__":
    distributed.setup(dataclasses.replace(config.Config(), prompts_per_step=4), "cpu")
    exact(sys.argv[1])
    figures(sys.argv[1])
    distributed.teardown()
