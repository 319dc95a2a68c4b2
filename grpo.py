"""One GRPO step: sample, score, group advantages, update. train.py, bench.py and grad_agreement.py
all take their steps through `step`, so what they run and measure is the same algorithm.

    r          = sample(model, tokenizer, batch, step)              B questions x G chains -> Rollout
    rewards    = rewards.score(r.texts, answers, r.info, ...)       (N, K) raw values, one column per reward
    total      = weighted sum (N,), times r.reward_weight if the idea sets one
    advantages = total normalised within each question's group     (N,)
    stats      = losses.update(...)                                 micro-batches, guards, optimizer step

    python grpo.py     # two steps of plain GRPO on the untrained tiny model, with their figures
"""
from dataclasses import dataclass

import torch

import losses
import rewards
import rollout


@dataclass
class Step:
    rollout: rollout.Rollout
    answers: list[str]        # N: each chain's reference answer
    rewards: torch.Tensor     # (N, K) raw values of the rewards `names`
    names: list[str]
    advantages: torch.Tensor  # (N,)
    figures: dict             # the train line: rewards, GRPO health signals, update stats, the idea's stats


def step(policy, sample, batch: list[dict], step: int, optimizer, cfg) -> Step:
    """One step on `batch` with the sample function of samplers.make and an llms.Policy."""
    r = sample(policy.model, policy.tokenizer, batch, step)
    answers = [batch[g]["answer"] for g in r.group.tolist()]
    per_fn, names, errors = rewards.score(r.texts, answers, r.info, cfg.rewards, rewards.settings(cfg))
    total = rewards.total(per_fn, names, cfg.rewards)  # (N,)
    if r.reward_weight is not None:
        total = total * r.reward_weight.to(total.device)
    advantages, zero_adv_frac = losses.group_advantages(total, r.group.cpu(), cfg.adv_scale)
    stats = losses.update(policy.model, policy.ref_model, r, advantages, optimizer, cfg)
    completion_lens = torch.tensor([d["completion_len"] for d in r.info], dtype=torch.float)  # (N,)
    figures = {"reward": total.mean().item(),
               **{f"reward/{k}": per_fn[:, i].mean().item() for i, k in enumerate(names)},
               **{f"reward_errors/{k}": n for k, n in errors.items() if n},
               "reward_std": total.std().item(), "zero_adv_frac": zero_adv_frac,
               "completion_len": completion_lens.mean().item(),
               "truncated_frac": sum(d["truncated"] for d in r.info) / len(r), **stats, **r.stats}
    return Step(r, answers, per_fn, names, advantages, figures)


if __name__ == "__main__":
    import config
    import data
    import llms
    import samplers

    cfg = config.Config(model_name=llms.TINY, device="cpu", optimizer="adamw", system_prompt="", num_chains=4,
                        max_completion_tokens=16, max_prompt_tokens=96, rewards={"integer_answer": 1.0})
    train, _ = data.arithmetic_task(200, 10, seed=0)
    model, tok = llms.from_config(cfg, llms.TINY, "cpu", train)
    policy = llms.for_training(model, tok, cfg, load_reference=lambda: None)
    optimizer, _ = losses.make_optimizer(model, cfg)
    sample = samplers.make(cfg, device="cpu", train_set=train)
    for s in (1, 2):
        out = step(policy, sample, data.step_batch(train, s, 2, cfg.seed), s, optimizer, cfg)
        print(f"step {s}:", {k: round(v, 4) if isinstance(v, float) else v for k, v in out.figures.items()})
