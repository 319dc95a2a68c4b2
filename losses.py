"""Log-probs, advantages, the GRPO loss family, and one policy update on a rollout.

Everything a step does after the rewards are known, written by hand in one place:
    token_logps        log p(token) at the sampling temperature, logits chunked (never all in fp32)
    group_advantages   rewards normalised within each prompt's group of G chains
    policy_loss        grpo, bnpo, dr_grpo, dapo, gspo, cispo, reinforce (+ k3 KL when beta > 0)
    liger_loss         the same through Liger's fused linear kernel (no logits tensor at all)
    update             micro-batches, gradient accumulation, clipping, the optimizer step, and its
                       guards: a non-finite update is skipped, out-of-memory retries smaller pieces
    make_optimizer     AdamW (torch or bitsandbytes' 8-bit), compensated bf16 updates, the schedule
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute
from tqdm import tqdm

import distributed
import kahan
import llms
import rollout
import vision

# ----------------------------------------------------------------------------------------------
# Log-probs at the sampling temperature, never materialising the whole (n, L, vocab) fp32 logits


def _chunk_logps(hidden, weight, bias, targets, temperature, banned=None):
    # contiguous: with a frozen head (LoRA), a sliced 3-D input makes torch's matmul expand the
    # weight once per chain (bmm) instead of one mm: 3.7 GB per chunk at Qwen2.5's vocab on CPU
    # temperature: a float, or (n, 1, 1), each chain's own
    logits = F.linear(hidden.contiguous(), weight, bias).float() / temperature  # (n, c, V), one chunk only
    # tokens that sampling never draws (a VL model's vision tokens: vision.banned_ids) leave the
    # normaliser; a prompt's own vision tokens, which are never trained, keep a finite value
    norm = logits if banned is None else logits.index_fill(-1, banned, float("-inf"))
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - norm.logsumexp(-1)


def hidden_states(body, input_ids, attention_mask, visual=None):
    """The body's final hidden states (n, L, H). Text: positions that skip the left padding, as generate
    used; a VL model's chains (visual, Rollout.visual_of) come with their images, and the model
    computes its own 3-D positions from them."""
    if visual is not None:
        return body(input_ids=input_ids, attention_mask=attention_mask,
                    **vision.model_inputs(body, input_ids, visual)).last_hidden_state
    return body(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=rollout.position_ids(attention_mask)).last_hidden_state


def shared_prompt_hidden(body, input_ids, attention_mask, start: int):
    """The body's final hidden states (n, L - start + 1, H) at positions start - 1 .. L - 1, with the
    columns before `start` (the prompt, which every chain of a group shares) run once per distinct
    prompt: their keys and values, which keep their gradient, are then indexed out to each chain
    (a KV cache) for the rest of the columns. Equal to hidden_states(...)[:, start - 1:] up to float
    rounding, in a fraction of the work when G chains share each prompt; None when no two rows share
    their first `start` columns."""
    keys = torch.cat([input_ids[:, :start], attention_mask[:, :start].to(input_ids.dtype)], 1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    if len(unique) == len(input_ids):
        return None
    prompt_mask = unique[:, start:].to(attention_mask.dtype)
    out = body(input_ids=unique[:, :start], attention_mask=prompt_mask, position_ids=rollout.position_ids(prompt_mask),
               use_cache=True)
    out.cache.batch_select_indices(inverse)  # (u, ...) -> (n, ...): indexing, so the gradient flows back to u rows
    rest = body(input_ids=input_ids[:, start:], attention_mask=attention_mask,
                position_ids=rollout.position_ids(attention_mask)[:, start:], cache=out.cache,
                use_cache=True).last_hidden_state
    return torch.cat([out.last_hidden_state[inverse, start - 1:], rest], 1)


def token_logps(model, input_ids, attention_mask, start: int, temperature, chunk: int, visual=None, *,
                chunk_mb: float = 0.0, share_prompt: bool = False):
    """log p(x_t | x_<t) for positions t >= start: (n, L - start) fp32, at `temperature`: one float for
    every chain, or an (n,) tensor, each chain's own (Rollout.temperature).

    The body runs once (share_prompt: the shared prompt columns once per distinct prompt, then the rest,
    shared_prompt_hidden); the output projection runs on `chunk` positions at a time (fewer under
    chunk_mb, see head_logps) and is recomputed in backward (activation checkpointing), so only one
    chunk of logits ever exists.
    """
    body, head = llms.decoder_and_head(model)
    banned = vision.banned_ids(model)
    # share_prompt: text only, and not under gradient checkpointing, which turns the KV cache off
    if share_prompt and visual is None and start > 1 and not body.is_activation_checkpointing:
        hidden = shared_prompt_hidden(body, input_ids, attention_mask, start)  # (n, L - start + 1, H)
        if hidden is not None:
            return head_logps(hidden, head, input_ids[:, start - 1:], 1, temperature, chunk, banned, chunk_mb=chunk_mb)
    hidden = hidden_states(body, input_ids, attention_mask, visual)  # (n, L, H)
    return head_logps(hidden, head, input_ids, start, temperature, chunk, banned, chunk_mb=chunk_mb)


def head_logps(hidden, head, input_ids, start: int, temperature, chunk: int, banned: list[int] | None = None,
               *, chunk_mb: float = 0.0):
    """token_logps from the final hidden states (n, L, H): the output projection, chunk by chunk;
    temperature a float or (n,).

    Its memory, beyond the weights and gradients, is one chunk's logits and their gradient: about 16
    bytes x n x chunk x vocab, measured on CPU in bf16 by `python bench_head.py --device cpu --dtype bf16
    --logp_chunk N` (figures in BENCHMARKS.md). chunk_mb > 0 caps one chunk's fp32 logits (n x positions x
    vocab x 4 bytes) at that many MB by taking fewer positions, so that a wide vocabulary (Gemma 3's
    262,144) or many chains do not raise the peak; 0 = `chunk` positions whatever their size.
    """
    out = []
    if chunk_mb > 0:
        chunk = max(1, min(chunk, int(chunk_mb * 2 ** 20) // (4 * input_ids.shape[0] * head.weight.shape[0])))
    banned = None if banned is None else torch.tensor(banned, device=input_ids.device)
    if torch.is_tensor(temperature):  # (n,) -> (n, 1, 1), to divide each chain's (c, V) logits
        temperature = temperature.to(input_ids.device, torch.float).view(-1, 1, 1)
    for s in range(start, input_ids.shape[1], chunk):
        e = min(s + chunk, input_ids.shape[1])
        args = (hidden[:, s - 1:e - 1], head.weight, head.bias, input_ids[:, s:e], temperature, banned)
        out.append(recompute(_chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                   else _chunk_logps(*args))
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------------------------
# Advantages and the GRPO loss family


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


def liger_loss(model, ids, attn, mask, start, advantages, old_logps, ref_logps, cfg,
               num_seqs, num_tokens, num_micro, visual=None, *, temperature: float | None = None):
    """The same loss through Liger's fused linear GRPO kernel: hidden states in, no logits tensor. Its
    log-probs are at one temperature for every chain: `temperature` (None: cfg.temperature)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    body, head = llms.decoder_and_head(model)
    hidden = hidden_states(body, ids, attn, visual)
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=cfg.beta, use_ref_model=cfg.beta > 0, compiled=ids.is_cuda,
        loss_type="grpo" if cfg.loss_type == "gspo" else cfg.loss_type,
        importance_sampling_level="sequence" if cfg.loss_type == "gspo" else "token",
        epsilon_low=cfg.eps_low, epsilon_high=cfg.cispo_max_weight if cfg.loss_type == "cispo" else cfg.eps_high,
        max_completion_length=cfg.max_completion_tokens,
        temperature=cfg.temperature if temperature is None else temperature)
    loss, metrics = loss_fn(hidden[:, start - 1:-1], head.weight, ids[:, start:], mask, advantages,
                            bias=head.bias, ref_per_token_logps=ref_logps, old_per_token_logps=old_logps,
                            # Liger divides this by the world size (DDP averages gradients; we sum them)
                            num_items_in_batch=num_tokens * distributed.world() if cfg.loss_type in ("dapo", "cispo")
                            else None)
    # Liger normalises over the micro-batch it sees; rescale to the step's normalisers as above
    n = ids.shape[0]
    if cfg.loss_type in ("grpo", "gspo", "dr_grpo"):
        loss = loss * n / num_seqs
    elif cfg.loss_type == "bnpo":
        loss = loss / num_micro
    active = mask.sum().item()
    kl = metrics[0].item() * active if cfg.beta > 0 else 0.0
    return loss, {"kl": kl, "clip": metrics[-1].item() * active}


def first_trained_column(loss_mask) -> int:
    """Columns before it are prompt for every chain: no log-probs are needed there."""
    return max(1, int(loss_mask.sum(0).nonzero()[0]))


def last_trained_column(loss_mask) -> torch.Tensor:
    """(N,) the index of each row's last trained column (0 for a row with none). By causality the
    columns after it cannot change the row's loss: a guided chain that trains its 2 to 8 guidance
    tokens needs no forward pass over its postfix."""
    cols = torch.arange(loss_mask.shape[1], device=loss_mask.device)
    return (loss_mask.bool() * cols).max(1).values


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def update(model, ref_model, r: rollout.Rollout, advantages, optimizer, cfg) -> dict:
    """num_iterations optimizer steps on one rollout, in micro-batches; returns the logged figures.

    Each micro-batch is cropped after the last trained column of its chains: the padding after the
    chains that ended early, and the untrained tail of a guided chain, cost nothing. With
    cfg.sort_micro_batches, chains are first sorted by that width, longest first, so that chains of
    similar length share a micro-batch (and the first one is the largest: if it fits
    in memory, all do). Every loss but bnpo sums per-chain or per-token terms with normalisers of
    the whole step, so sorting changes nothing but the speed; bnpo's normaliser is the micro-batch's
    token count, so sorting changes which chains share it.
    Guards: an update whose loss or gradient is not finite is skipped ("skipped": 1), and CUDA
    out-of-memory retries the pass with micro-batches of half the size, down to one chain; only then
    does the error reach the caller. No optimizer step has been taken when a pass is retried. Under
    torchrun the ranks agree after each pass: if any ran out of memory, every rank retries at half its
    size, or every rank stops (distributed.OtherRankFailed on the ranks that did not run out); out of
    memory in the optimizer step (or the gradient all-reduce's zeros) stops every rank the same way.
    Log-probs are at each chain's sampling temperature (r.temperature; None: cfg.temperature for all);
    Liger's fused loss takes one temperature, so with Liger the chains must share one.
    Under torchrun (distributed.py) r holds this rank's chains; the normalisers (chains, tokens,
    micro-batches) and the gradients are summed over the ranks, so every rank takes the step one
    process would take on all ranks' chains, and the figures returned are the whole step's.
    """
    device = r.input_ids.device
    start = first_trained_column(r.loss_mask)
    mask = r.loss_mask[:, start:]
    local_n = len(r)
    adv = advantages.to(device)
    temps = torch.full((local_n,), float(cfg.temperature)) if r.temperature is None else r.temperature.float().cpu()
    if cfg.liger:  # over every rank's chains, so that the ranks refuse together, as one process would
        seen = sorted({t for part in distributed.gather(sorted(set(temps.tolist()))) for t in part})
        if len(seen) > 1:
            raise ValueError(f"--liger's fused loss takes one temperature for every chain, and this step's chains "
                             f"were sampled at {', '.join(f'{t:g}' for t in seen)}: drop --liger for this sampler")
    size = min(cfg.micro_batch_size, local_n)  # shrinks on out-of-memory, for the rest of this step
    ends = last_trained_column(r.loss_mask).clamp(min=start) + 1  # (N,) a chain's columns end before it
    order = (torch.argsort(ends, descending=True, stable=True) if cfg.sort_micro_batches
             else torch.arange(local_n, device=device))

    def micro_batches():  # (rows (n,), end): the chains of each micro-batch and its cropped width
        return [(rows, int(ends[rows].max())) for rows in order.split(size)]

    # the step's normalisers: chains, trained tokens and micro-batches of all ranks (one process: its own)
    n, num_tokens, num_micro = distributed.all_sum([local_n, mask.sum().item(), len(micro_batches())])

    def inputs(mb):  # (ids, attention mask) of the micro-batch's chains, cropped
        rows, end = mb
        return r.input_ids[rows, :end], r.attention_mask[rows, :end]

    def logps_of(m, mb):  # (n, end - start)
        return token_logps(m, *inputs(mb), start, temps[mb[0].cpu()], cfg.logp_chunk, r.visual_of(mb[0]),
                           chunk_mb=cfg.logp_chunk_mb, share_prompt=cfg.share_prompt)

    def all_logps(m):  # (N, T): every chain's log-probs in rollout order, 0 after a cropped chain's end
        out = torch.zeros(mask.shape, device=device)
        for rows, end in micro_batches():
            out[rows, :end - start] = logps_of(m, (rows, end))
        return out

    def retry_on_oom(fn):  # fn holds no collective call: the ranks agree on its outcome after it
        nonlocal size, num_micro
        while True:
            try:
                out, error = fn(), None
            except torch.OutOfMemoryError as e:
                out, error = None, e
            notes = distributed.gather((error is not None, size))  # every rank retries, or stops, together
            ran_out = [oom for oom, _ in notes]
            if not any(ran_out):
                return out
            optimizer.zero_grad(set_to_none=True)
            free_memory()
            if any(oom and k == 1 for oom, k in notes):  # a rank out of memory with one chain a micro-batch
                first = next(rank for rank, (oom, k) in enumerate(notes) if oom and k == 1)
                if error is not None and distributed.rank() == first:
                    raise error
                raise distributed.OtherRankFailed(f"rank {first} ran out of memory in the loss pass",
                                                  out_of_memory=True)
            size = max(1, size // 2)
            num_micro = distributed.all_sum([len(micro_batches())])[0]  # bnpo's normaliser, at the new size
            tqdm.write(f"out of memory in the loss pass: retrying with micro_batch_size {size}")

    @torch.no_grad()
    def fixed_logps():  # per rollout: old policy (if reused) and reference log-probs, (N, T) each
        old = all_logps(model) if cfg.num_iterations > 1 else None
        ref = None
        if cfg.beta > 0 and ref_model is not None:
            ref = all_logps(ref_model)
        elif cfg.beta > 0:  # LoRA: the reference is the base model, i.e. the adapter switched off
            with model.disable_adapter():
                ref = all_logps(model)
        return old, ref

    def pick(t, mb):  # the micro-batch's rows of an (N, T) tensor, cropped to its width
        rows, end = mb
        return None if t is None else t[rows, :end - start]

    def backward():  # forward + backward over this rank's micro-batches; the figures' local sums
        mbs = micro_batches()
        step = {"loss": 0.0, "kl": 0.0, "clip": 0.0}
        for mb in mbs:
            rows, _ = mb
            if cfg.liger:
                loss, st = liger_loss(model, *inputs(mb), pick(mask, mb), start, adv[rows], pick(old, mb),
                                      pick(ref, mb), cfg, n, num_tokens, num_micro, r.visual_of(rows),
                                      temperature=temps[0].item())
            else:
                logps = logps_of(model, mb)
                old_mb = pick(old, mb) if old is not None else logps.detach()
                loss, st = policy_loss(logps, old_mb, pick(ref, mb), adv[rows], pick(mask, mb), cfg, n, num_tokens,
                                       num_micro)
            loss.backward()
            step["loss"] += loss.item()
            step["kl"] += st["kl"]
            step["clip"] += st["clip"]
        return step

    def apply(step):  # the step's gradient and figures over all ranks, then one optimizer step (or a skip)
        params = [p for p in model.parameters() if p.requires_grad]
        distributed.all_reduce_grads(params)  # the step's gradient: every rank's share, summed
        step["loss"], step["kl"], step["clip"] = distributed.all_sum([step["loss"], step["kl"], step["clip"]])
        error, stepped = None, False
        try:  # the optimizer's first step allocates its state: out of memory here is agreed on like the loss pass's
            step["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()  # before clipping
            step["skipped"] = not (math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]))
            if not step["skipped"]:  # a NaN or inf would poison the weights and the optimizer's moments
                optimizer.step()
                stepped = True
        except torch.OutOfMemoryError as e:
            error = e
        optimizer.zero_grad(set_to_none=True)
        distributed.agree_on_oom(error, "in the optimizer step", applied=stepped)
        return step

    old, ref = retry_on_oom(fixed_logps)
    steps = [apply(retry_on_oom(backward)) for _ in range(cfg.num_iterations)]
    tokens = max(1, num_tokens * len(steps))
    return {"loss": sum(s["loss"] for s in steps) / len(steps),
            "grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
            "kl": sum(s["kl"] for s in steps) / tokens, "clip_frac": sum(s["clip"] for s in steps) / tokens,
            "skipped": int(any(s["skipped"] for s in steps)), "micro_batch_size": size}


# ----------------------------------------------------------------------------------------------
# The optimizer and its schedule


def make_optimizer(model, cfg):
    """(optimizer, scheduler) over the trainable weights; the scheduler steps once per GRPO step."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params, **kwargs)
    if cfg.kahan_updates:  # bf16 weights: carry each update's rounding error instead of dropping it
        kahan.attach(optimizer)

    def factor(step):  # step counts GRPO steps from 0; linear warmup, then constant, cosine to 0 or wsd's tail
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "wsd":  # the last lr_decay_steps steps: 1, ..., 1/lr_decay_steps
            return max(0.0, min(1.0, (cfg.max_steps - step) / cfg.lr_decay_steps))
        return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
