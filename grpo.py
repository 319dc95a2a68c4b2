"""THE ALGORITHM BOX: one GRPO step, and what a researcher changes in it.

    r          = sample(model, tokenizer, batch, step)              B questions x G chains -> Rollout
    rewards    = rewards.score(r.texts, answers, r.info, ...)       (N, K) raw values, one column per reward
    total      = weighted sum (N,), times r.reward_weight if the idea sets one
    advantages = group_advantages(total, r.group)                   (N,) normalised within each group
    update:      for each micro-batch: log-probs -> policy_loss -> backward;  one optimizer step

The advantage (group_advantages), the loss family and its KL term (policy_loss) and the update loop
(update) are written out here; which tokens the loss trains on is r.loss_mask, set by the sampling
idea and cut further in update where a change should apply to every idea. The machinery around them
is one named call each: the memory-saving log-prob paths (logprobs.token_logps, logprobs.liger_loss), the
micro-batches that halve when memory runs out and the optimizer step that skips a non-finite update
(guards.py), the normalisers summed over torchrun's ranks (distributed.all_sum), the train line's
figures gathered from the ranks (tracking.train_metrics).

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
import fsdp
import guards
import logprobs
import rewards
import rollout
import tracking


@dataclass
class Step:
    rollout: rollout.Rollout
    batch: list[dict]         # the questions trained on; rollout.group indexes it
    answers: list[str]        # N: each chain's reference answer
    rewards: torch.Tensor     # (N, K) raw values of the rewards `names`
    names: list[str]
    advantages: torch.Tensor  # (N,)
    metrics: dict             # the train line: rewards, GRPO health signals, update stats, the idea's stats


# ----------------------------------------------------------------------------------------------
# Sample and score; DAPO's dynamic sampling


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
    # an error while any rank samples or scores stops them all here; --fsdp: the ranks' generate calls match
    with distributed.errors_stop_every_rank(), fsdp.sampling(policy.model):
        if cfg.dynamic_sampling:
            s, rounds, filtered = dynamic_sampling(policy, sample, batch, step, cfg, refill)
        else:
            s = sample_and_score(policy, sample, batch, step, cfg)
            rounds, filtered = [s], {}
    r = s.rollout
    batch_std = torch.cat(distributed.gather(s.total.cpu())).std() if cfg.adv_scale == "batch" else None
    advantages, zero_adv_frac = group_advantages(s.total, r.group.cpu(), cfg.adv_scale, batch_std)
    stats = update(policy.model, policy.ref_model, r, advantages, optimizer, cfg)
    metrics = tracking.train_metrics(rounds, s, zero_adv_frac, filtered, stats, policy.tokenizer, cfg)
    return Step(r, s.batch, s.answers, s.rewards, s.names, advantages, metrics)


# ----------------------------------------------------------------------------------------------
# Advantages and the loss family


def group_advantages(rewards_total, group, scale: str, batch_std=None):
    """(advantages (N,), share of groups whose rewards are all equal: they give no gradient).
    scale "batch" divides by batch_std, the std of the whole step's rewards (default: of rewards_total)."""
    n_groups = int(group.max()) + 1
    count = torch.bincount(group, minlength=n_groups).float()
    mean = torch.zeros(n_groups).index_add_(0, group, rewards_total) / count
    centred = rewards_total - mean[group]
    std = (torch.zeros(n_groups).index_add_(0, group, centred ** 2) / count).sqrt()
    zero_frac = (std < 1e-6).float().mean().item()
    centred = torch.where(std[group] < 1e-6, 0.0, centred)  # exactly 0, not float residue / 1e-4
    if scale == "group":
        return centred / (std[group] + 1e-4), zero_frac
    if scale == "batch":
        return centred / ((rewards_total.std() if batch_std is None else batch_std) + 1e-4), zero_frac
    return centred, zero_frac


def policy_loss(logps, old_logps, ref_logps, advantages, mask, cfg, num_seqs, num_tokens, num_micro):
    """The loss of one micro-batch, scaled so that the sum over micro-batches is the step's loss.

    logps, old_logps, ref_logps, mask: (n, T); advantages: (n,). The step has num_seqs chains with
    num_tokens trained tokens in num_micro micro-batches. Per-token terms, then one normalisation:
      grpo, gspo, reinforce: mean over each chain's tokens, then mean over chains
      bnpo: mean over the micro-batch's tokens;   dapo, cispo: mean over all tokens of the step
      dr_grpo: sum over tokens / (chains x max_completion_tokens), no length bias
    """
    A = advantages.unsqueeze(1)  # (n, 1)
    log_ratio = logps - old_logps
    if cfg.loss_type == "gspo":  # one ratio per sequence: the geometric mean of its token ratios
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio)
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    if cfg.loss_type == "cispo":  # REINFORCE weighted by a capped, stop-gradient ratio
        per_token = -torch.clamp(ratio, max=cfg.cispo_max_weight).detach() * A * logps
    elif cfg.loss_type == "reinforce":  # plain policy gradient: no ratio, no clipping
        per_token = -A * logps
    else:  # PPO's clipped surrogate
        per_token = -torch.min(ratio * A, torch.clamp(ratio, lo, hi) * A)
    if cfg.loss_type == "reinforce":
        clipped = torch.zeros_like(mask)
    elif cfg.loss_type == "cispo":  # the cap scales a token's weight whatever the sign of its advantage
        clipped = (ratio > cfg.cispo_max_weight).float() * torch.ones_like(mask)
    else:
        clipped = (((ratio < lo) & (A < 0)) | ((ratio > hi) & (A > 0))).float() * torch.ones_like(mask)
    kl = torch.zeros_like(logps)
    if cfg.beta > 0:  # k3 estimator of KL(policy || reference), always >= 0
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + cfg.beta * kl

    masked = per_token * mask
    if cfg.loss_type in ("grpo", "gspo", "reinforce"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_seqs
    elif cfg.loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1) / num_micro
    elif cfg.loss_type == "dr_grpo":
        loss = masked.sum() / (num_seqs * cfg.max_completion_tokens)
    else:  # dapo, cispo
        loss = masked.sum() / num_tokens
    stats = {"kl": (kl.detach() * mask).sum().item(), "clip": (clipped * mask).sum().item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# The update: log-probs, loss and backward over micro-batches, then one optimizer step


def update(model, ref_model, r: rollout.Rollout, advantages, optimizer, cfg) -> dict:
    """num_iterations optimizer steps on one rollout, in micro-batches (guards.MicroBatches: cropped
    after their last trained column); returns the logged figures. Log-probs are at each chain's sampling
    temperature. Every loss but bnpo has normalisers of the whole step, so micro-batching changes only
    the speed. Under torchrun r holds this rank's chains; the normalisers and gradients are summed over
    the ranks, so every rank takes the step one process would take on all ranks' chains."""
    start = logprobs.first_trained_column(r.loss_mask)  # columns before it are prompt in every chain
    mask = r.loss_mask[:, start:]                     # (N, T) 1 on the tokens trained on
    adv = advantages.to(mask.device)                  # (N,)
    temps = (torch.full((len(r),), float(cfg.temperature)) if r.temperature is None
             else r.temperature.float().cpu())       # (N,) each chain's sampling temperature
    if cfg.liger:
        logprobs.one_temperature(temps)  # Liger's fused loss takes one: every rank's chains must share it
    batches = guards.MicroBatches(r.loss_mask, start, cfg.micro_batch_size, cfg.sort_micro_batches)
    # the step's normalisers: chains, trained tokens and micro-batches of all ranks (one process: its own)
    n, num_tokens, batches.total = distributed.all_sum([len(r), mask.sum().item(), len(batches)])

    # per rollout: the old policy's log-probs (reused over num_iterations) and the reference's (beta > 0)
    old, ref = guards.retry_smaller_on_oom(
        lambda: (rollout_logps(model, r, batches, start, temps, cfg) if cfg.num_iterations > 1 else None,
                 reference_logps(model, ref_model, r, batches, start, temps, cfg) if cfg.beta > 0 else None),
        batches, optimizer)

    def loss_and_backward():  # this rank's micro-batches; the sums of its figures
        sums = {"loss": 0.0, "kl": 0.0, "clip": 0.0}
        for rows, end in batches:
            cols = slice(0, end - start)
            old_mb = None if old is None else old[rows, cols]
            ref_mb = None if ref is None else ref[rows, cols]
            if cfg.liger:  # log-probs and loss in one fused kernel, no logits tensor (logprobs.liger_loss)
                loss, st = logprobs.liger_loss(model, r.input_ids[rows, :end], r.attention_mask[rows, :end],
                                            mask[rows, cols], start, adv[rows], old_mb, ref_mb, cfg, n, num_tokens,
                                            batches.total, r.visual_of(rows), temperature=temps[0].item())
            else:
                new = micro_batch_logps(model, r, rows, end, start, temps, cfg)
                loss, st = policy_loss(new, new.detach() if old_mb is None else old_mb, ref_mb, adv[rows],
                                       mask[rows, cols], cfg, n, num_tokens, batches.total)
            loss.backward()
            sums["loss"] += loss.item()
            sums["kl"] += st["kl"]
            sums["clip"] += st["clip"]
        return sums

    steps = []
    for _ in range(cfg.num_iterations):  # out of memory: retried in smaller micro-batches (guards.py)
        sums = guards.retry_smaller_on_oom(loss_and_backward, batches, optimizer)
        steps.append(guards.optimizer_step(model, optimizer, sums, cfg.max_grad_norm))  # skips a non-finite step
    tokens = max(1, num_tokens * len(steps))
    return {"loss": sum(s["loss"] for s in steps) / len(steps),
            "grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
            "kl": sum(s["kl"] for s in steps) / tokens, "clip_frac": sum(s["clip"] for s in steps) / tokens,
            "skipped": int(any(s["skipped"] for s in steps)), "micro_batch_size": batches.size}


def micro_batch_logps(model, r: rollout.Rollout, rows, end: int, start: int, temps, cfg):
    """(n, end - start): log p of the chains `rows` of r under `model`, columns start .. end - 1, each at
    its sampling temperature (temps (N,))."""
    return logprobs.token_logps(model, r.input_ids[rows, :end], r.attention_mask[rows, :end], start, temps[rows.cpu()],
                                cfg.logp_chunk, r.visual_of(rows), chunk_mb=cfg.logp_chunk_mb,
                                share_prompt=cfg.share_prompt)


@torch.no_grad()
def rollout_logps(model, r: rollout.Rollout, batches, start: int, temps, cfg) -> torch.Tensor:
    """(N, T): every chain's log-probs under `model`, micro-batch by micro-batch, 0 after a cropped end."""
    out = torch.zeros(r.loss_mask[:, start:].shape, device=r.loss_mask.device)
    for rows, end in batches:
        out[rows, :end - start] = micro_batch_logps(model, r, rows, end, start, temps, cfg)
    return out


def reference_logps(model, ref_model, r: rollout.Rollout, batches, start: int, temps, cfg) -> torch.Tensor:
    """(N, T) the frozen reference's log-probs for the KL term; with LoRA (ref_model None) the reference
    is the base model, the adapter switched off."""
    if ref_model is not None:
        return rollout_logps(ref_model, r, batches, start, temps, cfg)
    with model.disable_adapter():
        return rollout_logps(model, r, batches, start, temps, cfg)


if __name__ == "__main__":
    import builtin_tasks
    import config
    import data
    import llms
    import optim
    import samplers

    cfg = config.Config(model_name=llms.TINY, device="cpu", optimizer="adamw", system_prompt="", num_chains=4,
                        max_completion_tokens=16, max_prompt_tokens=96, rewards={"integer_answer": 1.0})
    train, _ = builtin_tasks.arithmetic_task(200, 10, seed=0)
    model, tok = llms.from_config(cfg, llms.TINY, "cpu", tiny_corpus=data.tiny_corpus(train, cfg.system_prompt))
    policy = llms.for_training(model, tok, cfg, load_reference=lambda: None)
    optimizer, _ = optim.make_optimizer(model, cfg)
    sample = samplers.make(cfg, device="cpu", train_set=train)
    for s in (1, 2):
        out = step(policy, sample, data.step_batch(train, s, 2, cfg.seed), s, optimizer, cfg)
        print(f"step {s}:", {k: round(v, 4) if isinstance(v, float) else v for k, v in out.metrics.items()})
