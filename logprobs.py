"""Log-probs of the sampled tokens, computed so that memory stays small: one function, one result,
whichever path runs.

    token_logps   log p(token) at each chain's sampling temperature, (n, L - start) fp32:
                  - the output projection (chains x positions x vocab logits) runs on a chunk of
                    positions at a time and is recomputed in backward (head_logps), so the whole
                    logits tensor never exists, in fp32 or otherwise;
                  - with share_prompt, the prompt columns every chain of a group shares run once per
                    distinct prompt and their keys and values go to each chain (shared_prompt_hidden);
                  - a VL model's chains come with their images, encoded once per question (vision.py).
    liger_loss    Liger's fused linear GRPO kernel: log-probs and the loss in one pass from the hidden
                  states, no logits tensor at all; the same loss as grpo.policy_loss on the same chains.
    first_trained_column, last_trained_column   where a rollout's trained tokens start and end, so that
                  the loss pass skips the prompt and crops what comes after a chain's last trained token.

    python logprobs.py     # the chunked, shared-prompt and plain paths agree on the untrained tiny model
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

import distributed
import fsdp
import llms
import rollout
import vision


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
    chunk of logits ever exists. Under --fsdp it runs inside the root's forward (fsdp.as_forward),
    where the head weight it reads directly is whole.
    """
    return fsdp.as_forward(model, _token_logps, model, input_ids, attention_mask, start, temperature, chunk,
                                  visual, chunk_mb=chunk_mb, share_prompt=share_prompt)


def _token_logps(model, input_ids, attention_mask, start, temperature, chunk, visual, *, chunk_mb, share_prompt):
    if input_ids.shape[0] == 0:  # a micro-batch of no chain (--fsdp: guards.MicroBatches): one row of token 0
        # runs instead, so that its forward and backward gather and reduce with the other ranks'; (0, L - start)
        row = torch.zeros((1, input_ids.shape[1]), dtype=input_ids.dtype, device=input_ids.device)
        return _token_logps(model, row, torch.ones_like(row), start, 1.0, chunk, None, chunk_mb=chunk_mb,
                            share_prompt=False)[:0]
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
    bytes x n x chunk x vocab (measured: BENCHMARKS.md). chunk_mb > 0 caps one chunk's fp32 logits (n x positions x
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


def one_temperature(temperatures: torch.Tensor) -> float:
    """The one temperature every chain of the step (all ranks) was sampled at: Liger's fused loss takes
    one; an error naming the temperatures seen when the chains differ (a sampler that varies them)."""
    seen = sorted({t for part in distributed.gather(sorted(set(temperatures.tolist()))) for t in part})
    if len(seen) > 1:
        raise ValueError(f"--liger's fused loss takes one temperature for every chain, and this step's chains "
                         f"were sampled at {', '.join(f'{t:g}' for t in seen)}: drop --liger for this sampler")
    return seen[0]


def first_trained_column(loss_mask) -> int:
    """Columns before it are prompt for every chain: no log-probs are needed there."""
    return max(1, int(loss_mask.sum(0).nonzero()[0]))


def last_trained_column(loss_mask) -> torch.Tensor:
    """(N,) the index of each row's last trained column (0 for a row with none). By causality the
    columns after it cannot change the row's loss: a guided chain that trains its 2 to 8 guidance
    tokens needs no forward pass over its postfix."""
    cols = torch.arange(loss_mask.shape[1], device=loss_mask.device)
    return (loss_mask.bool() * cols).max(1).values


if __name__ == "__main__":
    import builtin_tasks
    import data

    train, _ = builtin_tasks.arithmetic_task(200, 10, seed=0)
    model, tok = llms.load(llms.TINY, "cpu", tiny_corpus=[ex["question"] + "\n" + data.target_text(ex) for ex in train])
    prompts = rollout.prompts_of(tok, "Solve step by step.", train[:2])
    r = rollout.sample(model, tok, prompts, 4, max_prompt_tokens=96, max_new_tokens=16, temperature=1.0)
    start = first_trained_column(r.loss_mask)
    with torch.no_grad():
        whole = token_logps(model, r.input_ids, r.attention_mask, start, 1.0, chunk=10_000)
        chunked = token_logps(model, r.input_ids, r.attention_mask, start, 1.0, chunk=4)
        shared = token_logps(model, r.input_ids, r.attention_mask, start, 1.0, chunk=4, share_prompt=True)
    mask = r.loss_mask[:, start:].bool()
    print(f"{len(r)} chains, {int(mask.sum())} trained tokens; largest difference from one unchunked pass: "
          f"chunked {(whole - chunked)[mask].abs().max():.2e}, shared prompt {(whole - shared)[mask].abs().max():.2e}")
