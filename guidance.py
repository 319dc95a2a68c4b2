"""Three-phase guided sampling (Guide-GRPO): a shared prefix, a few guidance tokens, a free postfix.

It builds an ordinary Rollout, so the loss never learns about it (`--sampler guided`, make_sampler).

For B prompts x G chains, all prompts of a step go through each phase together, one batched
`rollout.generate` call per phase:

1. prefix    per prompt, one partial solution sampled with a random budget drawn in
             [min_prefix_tokens, max_prefix_tokens], then cut back to its LAST sentence boundary.
2. guidance  the prefix is branched into the G chains; each samples k new tokens, k drawn per prompt
             in [min_guide_tokens, max_guide_tokens]. A chain that samples EOS here is finished.
3. postfix   every unfinished chain completes until EOS or the completion budget.

Budgets count completion tokens only: prefix + guidance + postfix <= max_completion_tokens (the
prefix budget is capped at max_completion_tokens - k). `loss_on` selects the trained tokens:
"guidance" (Guide-GRPO's default), "guidance+postfix", or "all" (the prefix too).

Boundary tokens: every token whose decoded text, trailing spaces and tabs stripped, ends with a
newline, ".", ",", "!" or "?" (so ". ", ".\\n" and "..." count; '."' does not). Stripping is right
because the space after a full stop belongs to the boundary, not to the next sentence. Qwen splits
numbers into digits, so a decimal point is a boundary too: a cut can fall inside "3.5".

Where this differs from Guide-GRPO, on purpose:
- The cut takes the last boundary of any kind (theirs stopped at the first punctuation kind found).
- Prefix retries are drawn up front in the one prefix call: each prompt gets 1 + prefix_retries
  candidates, candidate j with budget n >> j (halved per retry, as theirs shortened on EOS). The
  first candidate with no EOS within its budget and at least one boundary is cut and used; if none
  qualifies the prefix is empty and the chain's info says prefix_fallback. So the prefix call has
  B x (1 + prefix_retries) rows.
- Budgets never mix prompt and completion lengths, and evaluation stays plain (evaluator.py).

    python guidance.py     # the three phases on the untrained tiny model
"""
import functools

import torch

import config
import llms
import rollout

BOUNDARY_CHARS = ("\n", ".", ",", "!", "?")


@functools.lru_cache(maxsize=8)  # one pass over the vocabulary (151k tokens for Qwen) per tokenizer
def boundary_ids(tokenizer, chars: tuple[str, ...] = BOUNDARY_CHARS) -> frozenset[int]:
    """Ids whose decoded text, trailing spaces and tabs stripped, ends with one of `chars`."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)
    return frozenset(i for i, t in enumerate(texts)
                     if i not in special and t.rstrip(" \t").endswith(chars))


def cut_at_boundary(ids: list[int], boundaries) -> list[int]:
    """ids up to and including the last boundary token of any kind; [] when there is none."""
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] in boundaries:
            return ids[:j + 1]
    return []


def until_eos(ids: list[int], stops) -> tuple[list[int], bool]:
    """(ids up to and including the end of the first stop (rollout.as_stops), whether there was one)."""
    for j in range(len(ids)):
        if rollout.ends_at(ids, j, stops):
            return ids[:j + 1], True
    return ids, False


def pick_prefix(candidates: list[list[int]], budgets: list[int], boundaries, eos_ids) -> tuple[list[int], bool]:
    """(prefix, fallback) from one prompt's candidates, tried in order, each cut to its own budget.

    A candidate that hits EOS within its budget is a whole solution, not a partial one: skip it. So is
    one without any boundary. When every candidate fails the prefix is empty (fallback True).
    """
    for ids, budget in zip(candidates, budgets):
        ids, hit_eos = until_eos(ids[:budget], eos_ids)
        cut = cut_at_boundary(ids, boundaries)
        if cut and not hit_eos:
            return cut, False
    return [], True


def three_phase(model, tokenizer, prompts: list[str], num_chains: int, *, max_prompt_tokens: int,
                max_completion_tokens: int, temperature: float, top_p: float, min_prefix_tokens: int,
                max_prefix_tokens: int, prefix_retries: int, min_guide_tokens: int, max_guide_tokens: int,
                loss_on: str = "guidance", kv_cache: str = "dynamic",
                images: list[list] | None = None) -> rollout.Rollout:
    """B prompts x G chains sampled in three phases (module docstring); one generate call per phase.
    loss_on: "guidance", "guidance+postfix" or "all"; the budgets as make_sampler checks them. images:
    each prompt's (a VL policy), shown with it in every phase."""
    device = next(model.parameters()).device
    eos = rollout.stops_of(model)
    pad, boundaries = tokenizer.pad_token_id, boundary_ids(tokenizer)
    B, G, M, C = len(prompts), num_chains, max_completion_tokens, 1 + prefix_retries
    prompt_ids, prompt_mask, visual = rollout.encode_prompts(tokenizer, prompts, max_prompt_tokens, device,
                                                             images)  # (B, P)
    prompt_rows = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]  # B lists, unpadded

    # budgets, drawn from torch's CPU generator (restored on resume): guidance k per prompt, then a
    # prefix budget n per prompt that leaves room for k, so prefix + guidance <= M before the postfix
    guide_k = torch.randint(min_guide_tokens, max_guide_tokens + 1, (B,)).tolist()
    prefix_n = []
    for k in guide_k:
        hi = min(max_prefix_tokens, M - k)
        prefix_n.append(int(torch.randint(min(min_prefix_tokens, hi), hi + 1, ()).item()))

    # 1. prefix: C candidates per prompt, (B * C) rows; candidate j of prompt b has budget n_b >> j
    budgets = [n >> j for n in prefix_n for j in range(C)]
    ids, mask = rollout.left_pad([row for row in prompt_rows for _ in range(C)], pad, device)
    out = rollout.generate(model, ids, mask, max_new_tokens=max(1, max(budgets)), temperature=temperature,
                           top_p=top_p, kv_cache=kv_cache,
                           visual=rollout.visual_rows(visual, [b for b in range(B) for _ in range(C)])).tolist()
    picked = [pick_prefix(out[b * C:(b + 1) * C], budgets[b * C:(b + 1) * C], boundaries, eos) for b in range(B)]
    prefixes = [p for p, _ in picked]

    # 2. guidance: chain i of N = B * G continues prompt + prefix of prompt chains[i] for k tokens
    chains = [b for b in range(B) for _ in range(G)]  # chains of one prompt are adjacent
    chain_visual = rollout.visual_rows(visual, chains)  # each chain: its prompt's images (None for text)
    ids, mask = rollout.left_pad([prompt_rows[b] + prefixes[b] for b in chains], pad, device)  # (N, P + prefix)
    out = rollout.generate(model, ids, mask, max_new_tokens=max(guide_k), temperature=temperature,  # (N, <= max k)
                           top_p=top_p, kv_cache=kv_cache, visual=chain_visual).tolist()
    guides = [until_eos(out[i][:guide_k[b]], eos) for i, b in enumerate(chains)]  # (tokens, finished)

    # 3. postfix: the rest of the budget; a chain finished in the guidance phase keeps nothing of it
    ids, mask = rollout.left_pad([prompt_rows[b] + prefixes[b] + g for b, (g, _) in zip(chains, guides)], pad, device)
    room = [M - len(prefixes[b]) - len(g) for b, (g, _) in zip(chains, guides)]
    out = rollout.generate(model, ids, mask, max_new_tokens=max(1, max(room)), temperature=temperature,
                           top_p=top_p, kv_cache=kv_cache, visual=chain_visual).tolist()  # (N, <= max room)
    posts = [[] if done else until_eos(out[i][:room[i]], eos)[0] for i, (_, done) in enumerate(guides)]

    # the Rollout: prompt (N, P) left padded + completion (N, T) right padded, T <= M
    comps = [prefixes[b] + g + p for b, (g, _), p in zip(chains, guides, posts)]
    width = max(len(c) for c in comps)
    # a chain without EOS used its whole budget (length M = width), so padding only follows an EOS
    assert all(len(c) == width or rollout.ends_at(c, len(c) - 1, eos) for c in comps), \
        "a chain stopped short without EOS"
    completions = torch.tensor([c + [pad] * (width - len(c)) for c in comps], dtype=torch.long, device=device)
    info = [{"prefix_len": len(prefixes[b]), "guide_len": len(g), "postfix_len": len(p),
             "prefix_fallback": picked[b][1], "guidance": tokenizer.decode(g, skip_special_tokens=True)}
            for b, (g, _), p in zip(chains, guides, posts)]
    group = torch.tensor(chains, dtype=torch.long, device=device)
    r = rollout.assemble(tokenizer, prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0),
                         completions, eos, group, info, chain_visual, temperature)

    # narrow the loss to completion columns [start, end) of each chain, as loss_on says
    start = [0 if loss_on == "all" else d["prefix_len"] for d in info]
    end = [d["prefix_len"] + d["guide_len"] + (0 if loss_on == "guidance" else d["postfix_len"]) for d in info]
    col = torch.arange(width, device=device)
    keep = (col >= torch.tensor(start, device=device)[:, None]) & (col < torch.tensor(end, device=device)[:, None])
    r.loss_mask[:, prompt_ids.shape[1]:] *= keep  # (N, T)
    return r


# ----------------------------------------------------------------------------------------------
# Optional reward weighting by the guidance position, the logged figures, and the sampler


def position_weight(prefix_len: int, completion_len: int) -> float:
    """The reward weight of a chain whose guidance starts prefix_len tokens into its completion.

    w = 0.5 + 0.5 * prefix_len / completion_len, in [0.5, 1]: guidance at the very start halves the
    reward, guidance near the end keeps it whole. The later the guidance, the more directly it decides
    the outcome (Guide-GRPO's unused multi_factor_weight decays with the same distance). The weight
    scales negative rewards too. Chains of one prompt share prefix_len, and group normalisation
    cancels any weight that is constant within a group, so with adv_scale "group" only the spread
    of completion_len within a group acts: shorter chains get a larger weight. Edit freely.
    """
    return 0.5 + 0.5 * prefix_len / max(1, completion_len)


def position_weights(info: list[dict]) -> torch.Tensor:
    """position_weight of each chain (N,): its Rollout.reward_weight when guide_position_weight is on."""
    return torch.tensor([position_weight(d["prefix_len"], d["prefix_len"] + d["guide_len"] + d["postfix_len"])
                         for d in info], dtype=torch.float32)


def summary(info: list[dict]) -> dict:
    """Means over the step's chains, for metrics.jsonl."""
    n = max(1, len(info))
    return {"guide/prefix_len": sum(d["prefix_len"] for d in info) / n,
            "guide/guidance_len": sum(d["guide_len"] for d in info) / n,
            "guide/postfix_len": sum(d["postfix_len"] for d in info) / n,
            "guide/prefix_fallback_frac": sum(d["prefix_fallback"] for d in info) / n}


def make_sampler(cfg, *, device: str, train_set: list[dict]):
    """`--sampler guided`: checks the guide_* settings once, then samples each batch in three phases."""
    if not 1 <= cfg.min_guide_tokens <= cfg.max_guide_tokens:
        raise config.UserError(f"guided sampling needs 1 <= min_guide_tokens <= max_guide_tokens, got "
                               f"{cfg.min_guide_tokens} and {cfg.max_guide_tokens}")
    if cfg.max_guide_tokens >= cfg.max_completion_tokens:
        raise config.UserError(f"max_guide_tokens ({cfg.max_guide_tokens}) must be below max_completion_tokens "
                               f"({cfg.max_completion_tokens}): prefix + guidance + postfix share that budget")
    if not 0 <= cfg.guide_min_prefix_tokens <= cfg.guide_max_prefix_tokens:
        raise config.UserError(f"guided sampling needs 0 <= guide_min_prefix_tokens <= guide_max_prefix_tokens, got "
                               f"{cfg.guide_min_prefix_tokens} and {cfg.guide_max_prefix_tokens}")
    if cfg.guide_prefix_retries < 0:
        raise config.UserError(f"guide_prefix_retries must be at least 0, got {cfg.guide_prefix_retries}")

    def sample_guided(model, tokenizer, batch: list[dict], step: int) -> rollout.Rollout:
        r = three_phase(model, tokenizer, rollout.prompts_of(tokenizer, cfg.system_prompt, batch), cfg.num_chains,
                        max_prompt_tokens=cfg.max_prompt_tokens, max_completion_tokens=cfg.max_completion_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, min_prefix_tokens=cfg.guide_min_prefix_tokens,
                        max_prefix_tokens=cfg.guide_max_prefix_tokens, prefix_retries=cfg.guide_prefix_retries,
                        min_guide_tokens=cfg.min_guide_tokens, max_guide_tokens=cfg.max_guide_tokens,
                        loss_on=cfg.guide_loss_on, kv_cache=cfg.kv_cache, images=rollout.images_of(batch))
        r.stats = summary(r.info)  # guide/prefix_len, guidance_len, postfix_len, prefix_fallback_frac
        if cfg.guide_position_weight:
            r.reward_weight = position_weights(r.info)
        return r
    return sample_guided


if __name__ == "__main__":
    import builtin_tasks
    import data

    train, _ = builtin_tasks.arithmetic_task(500, 10, seed=0)
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=corpus)
    torch.manual_seed(0)
    prompts = [llms.chat_prompt(tok, "", ex["question"]) for ex in train[:2]]
    r = three_phase(m, tok, prompts, 3, max_prompt_tokens=128, max_completion_tokens=40,
                    temperature=1.0, top_p=1.0, min_prefix_tokens=8, max_prefix_tokens=24, prefix_retries=2,
                    min_guide_tokens=2, max_guide_tokens=6)
    print("boundary tokens:", sorted(tok.decode([i]) for i in boundary_ids(tok)))
    P = r.input_ids.shape[1] - max(d["prefix_len"] + d["guide_len"] + d["postfix_len"] for d in r.info)
    for i, d in enumerate(r.info):
        comp = r.input_ids[i, P:].tolist()
        a = d["prefix_len"]
        b = a + d["guide_len"]
        c = b + d["postfix_len"]
        print(f"chain {i}: prompt {r.group[i].item()}, prefix fallback {d['prefix_fallback']}, "
              f"truncated {d['truncated']}")
        for name, part in (("prefix", comp[:a]), ("guidance", comp[a:b]), ("postfix", comp[b:c])):
            print(f"  {name:9s}{tok.decode(part)!r}")
        print(f"  trained  {''.join(str(v) for v in r.loss_mask[i, P:].long().tolist())}")
    print(summary(r.info))
