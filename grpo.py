"""One GRPO step: sample, score, group advantages, update. train.py, bench.py and grad_agreement.py
all take their steps through `step`, so what they run and measure is the same algorithm.

    r          = sample(model, tokenizer, batch, step)              B questions x G chains -> Rollout
    rewards    = rewards.score(r.texts, answers, r.info, ...)       (N, K) raw values, one column per reward
    total      = weighted sum (N,), times r.reward_weight if the idea sets one
    advantages = total normalised within each question's group     (N,)
    stats      = losses.update(...)                                 micro-batches, guards, optimizer step

With `dynamic_sampling` (DAPO, arXiv 2503.14476, sec. 3.2) the groups whose rewards are all equal, which
give no gradient, are dropped after scoring, and more questions (from `refill`) are sampled and scored,
one batched sample call per round, until the step holds prompts_per_step informative groups or
max_sampling_rounds rounds are done; it then trains on the informative groups it has (on the first
round's groups, all zero-advantage, if it found none). Any sampler works: a round is one sample call.
The reward figures of the train line are over every chain sampled in the step, all rounds (the update
figures over the trained chains); `sampling_rounds` and `filtered_frac` (the share of sampled groups
dropped) say what the filter did.

    python grpo.py     # two steps of plain GRPO on the untrained tiny model, with their figures
"""
import math
from dataclasses import dataclass

import torch

import distributed
import losses
import rewards
import rollout


@dataclass
class Step:
    rollout: rollout.Rollout
    batch: list[dict]         # the questions trained on; rollout.group indexes it
    answers: list[str]        # N: each chain's reference answer
    rewards: torch.Tensor     # (N, K) raw values of the rewards `names`
    names: list[str]
    advantages: torch.Tensor  # (N,)
    figures: dict             # the train line: rewards, GRPO health signals, update stats, the idea's stats


@dataclass
class Scored:  # one sample call's chains and their rewards
    rollout: rollout.Rollout
    batch: list[dict]
    answers: list[str]
    rewards: torch.Tensor  # (N, K) raw values of the rewards `names`
    names: list[str]
    total: torch.Tensor    # (N,) weighted, times the rollout's reward_weight
    errors: dict


def sample_and_score(policy, sample, batch: list[dict], step: int, cfg) -> Scored:
    r = sample(policy.model, policy.tokenizer, batch, step)
    answers = [batch[g]["answer"] for g in r.group.tolist()]
    per_fn, names, errors = rewards.score(r.texts, answers, r.info, cfg.rewards, rewards.settings(cfg))
    total = rewards.total(per_fn, names, cfg.rewards)  # (N,)
    if r.reward_weight is not None:
        total = total * r.reward_weight.to(total.device)
    return Scored(r, batch, answers, per_fn, names, total, errors)


def informative_groups(s: Scored) -> list[int]:
    """The groups whose rewards are not all equal (the others get zero advantages: group_advantages)."""
    group, total = s.rollout.group.cpu(), s.total.cpu()
    return [g for g in range(len(s.batch)) if total[group == g].std(unbiased=False) >= 1e-6]


def keep_groups(parts: list[tuple[Scored, list[int]]], pad_id: int) -> Scored:
    """The chosen groups of several rounds' Scored as one; groups renumbered in order."""
    rows, group, batch = [], [], []
    for s, keep in parts:
        rows.append([i for i, g in enumerate(s.rollout.group.tolist()) if g in keep])
        group += [len(batch) + keep.index(s.rollout.group[i].item()) for i in rows[-1]]
        batch += [s.batch[g] for g in keep]
    r = rollout.concat([(s.rollout, rs) for (s, _), rs in zip(parts, rows)],
                       torch.tensor(group, device=parts[0][0].rollout.group.device), pad_id)
    n = len(group)  # the idea's own figures: averaged over the rounds, weighted by their chains
    r.stats = {key: sum(s.rollout.stats[key] * len(rs) for (s, _), rs in zip(parts, rows)) / n
               for key in parts[0][0].rollout.stats}
    return Scored(r, batch, [s.answers[i] for (s, _), rs in zip(parts, rows) for i in rs],
                  torch.cat([s.rewards[rs] for (s, _), rs in zip(parts, rows)]), parts[0][0].names,
                  torch.cat([s.total[rs] for (s, _), rs in zip(parts, rows)]), {})


def dynamic_sampling(policy, sample, batch: list[dict], step: int, cfg, refill) -> tuple[Scored, list[Scored], dict]:
    """(the informative groups, every round's Scored, the filter's figures): DAPO's dynamic sampling."""
    want, parts, sampled, kept = len(batch), [], 0, 0
    while True:
        s = sample_and_score(policy, sample, batch, step, cfg)
        keep = informative_groups(s)[:want - kept]
        parts.append((s, keep))
        sampled, kept = sampled + len(batch), kept + len(keep)
        if kept == want or len(parts) == cfg.max_sampling_rounds:
            break
        # the next round: as many questions as the informative share so far says are missing, at most B
        batch = refill(want if kept == 0 else min(want, math.ceil((want - kept) * sampled / kept)), len(parts))
        if not batch:  # the train set has no question left that this step has not taken
            break
    rounds = [s for s, _ in parts]
    if kept == 0:  # nothing informative: the first round's groups, which give no policy gradient
        parts = [(rounds[0], list(range(len(rounds[0].batch))))]
    trained = keep_groups([(s, keep) for s, keep in parts if keep], policy.tokenizer.pad_token_id)
    return trained, rounds, {"sampling_rounds": len(rounds), "filtered_frac": 1 - kept / sampled}


def step(policy, sample, batch: list[dict], step: int, optimizer, cfg, refill=None) -> Step:
    """One step on `batch` with the sample function of samplers.make and an llms.Policy. With
    cfg.dynamic_sampling, refill(n, round) gives n more questions for a later round, none this step has
    taken (train.py: data.refill), or [] when there are none left."""
    if cfg.dynamic_sampling and refill is None:
        raise ValueError("dynamic_sampling needs more questions than the step's batch, and this caller gives "
                         "none (refill): train with train.py, or set dynamic_sampling false")
    with distributed.together():  # an error while any rank samples or scores stops every rank here
        if cfg.dynamic_sampling:
            s, rounds, filtered = dynamic_sampling(policy, sample, batch, step, cfg, refill)
        else:
            s = sample_and_score(policy, sample, batch, step, cfg)
            rounds, filtered = [s], {}
    r = s.rollout
    batch_std = torch.cat(distributed.gather(s.total.cpu())).std() if cfg.adv_scale == "batch" else None
    advantages, zero_adv_frac = losses.group_advantages(s.total, r.group.cpu(), cfg.adv_scale, batch_std)
    stats = losses.update(policy.model, policy.ref_model, r, advantages, optimizer, cfg)  # the whole step's
    # the sampling figures are over every chain sampled in the step (all rounds of dynamic sampling), on
    # every rank: each rank's part, gathered (one process: its own)
    info = [d for x in rounds for d in x.rollout.info]
    lengths = rollout.prompt_lengths(policy.tokenizer, rollout.prompts_of(
        policy.tokenizer, cfg.system_prompt, [ex for x in rounds for ex in x.batch]))
    parts = distributed.gather({
        "total": torch.cat([x.total for x in rounds]).cpu(), "per_fn": torch.cat([x.rewards for x in rounds]).cpu(),
        "errors": {k: sum(x.errors[k] for x in rounds) for k in s.names},
        "completion_len": [d["completion_len"] for d in info], "truncated": [d["truncated"] for d in info],
        "cut": [n > cfg.max_prompt_tokens for n in lengths], "groups": len(s.batch), "zero_adv_frac": zero_adv_frac,
        "sampled": sum(len(x.batch) for x in rounds), **filtered, "chains": len(r),
        **r.stats})  # the idea's figures are named with a slash (guide/..., ghpo/...): no clash
    total, per_fn = torch.cat([p["total"] for p in parts]), torch.cat([p["per_fn"] for p in parts])
    completion_lens = torch.tensor([n for p in parts for n in p["completion_len"]], dtype=torch.float)  # (N,)
    truncated, cut = [t for p in parts for t in p["truncated"]], [c for p in parts for c in p["cut"]]
    errors = {k: sum(p["errors"][k] for p in parts) for k in s.names}
    figures = {"reward": total.mean().item(),
               **{f"reward/{k}": per_fn[:, i].mean().item() for i, k in enumerate(s.names)},
               **{f"reward_errors/{k}": n for k, n in errors.items() if n},
               "reward_std": total.std().item(), "zero_adv_frac": mean_of(parts, "zero_adv_frac", "groups"),
               **({"sampling_rounds": mean_of(parts, "sampling_rounds"),
                   "filtered_frac": mean_of(parts, "filtered_frac", "sampled")} if filtered else {}),
               "completion_len": completion_lens.mean().item(), "truncated_frac": sum(truncated) / len(truncated),
               "prompt_truncated_frac": sum(cut) / len(cut), **stats,
               **{k: mean_of(parts, k, "chains") for k in r.stats}}
    return Step(r, s.batch, s.answers, s.rewards, s.names, advantages, figures)


def mean_of(parts: list[dict], key: str, weight: str = "") -> float:
    """The ranks' figure `key`, averaged with the weights parts[k][weight] (equal weights without one);
    one process's figure as it is."""
    if len(parts) == 1:
        return parts[0][key]
    w = [p[weight] if weight else 1 for p in parts]
    return sum(p[key] * wk for p, wk in zip(parts, w)) / max(1, sum(w))


if __name__ == "__main__":
    import config
    import builtin_tasks
    import data
    import llms
    import samplers

    cfg = config.Config(model_name=llms.TINY, device="cpu", optimizer="adamw", system_prompt="", num_chains=4,
                        max_completion_tokens=16, max_prompt_tokens=96, rewards={"integer_answer": 1.0})
    train, _ = builtin_tasks.arithmetic_task(200, 10, seed=0)
    model, tok = llms.from_config(cfg, llms.TINY, "cpu", tiny_corpus=data.tiny_corpus(train, cfg.system_prompt))
    policy = llms.for_training(model, tok, cfg, load_reference=lambda: None)
    optimizer, _ = losses.make_optimizer(model, cfg)
    sample = samplers.make(cfg, device="cpu", train_set=train)
    for s in (1, 2):
        out = step(policy, sample, data.step_batch(train, s, 2, cfg.seed), s, optimizer, cfg)
        print(f"step {s}:", {k: round(v, 4) if isinstance(v, float) else v for k, v in out.figures.items()})
