"""Guided sampling: Guide-GRPO's three phases, and GHPO's hints for groups where every chain fails.

Both build an ordinary Rollout, so the loss never learns about them. GHPO (`ghpo`, second half of this
file) is described above its code; three-phase sampling (`three_phase`) here.

Three-phase guided sampling (Guide-GRPO): a shared prefix, a few guidance tokens, a free postfix.

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
- Budgets never mix prompt and completion lengths, and evaluation stays plain (train.py).

    python guidance.py     # the three phases, then GHPO's hint stages, on the untrained tiny model
"""
import functools
import math

import torch

import llms
import rewards
import rollout

BOUNDARY_CHARS = ("\n", ".", ",", "!", "?")
LOSS_ON = ("guidance", "guidance+postfix", "all")


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


def until_eos(ids: list[int], eos_ids) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS, whether there was one)."""
    for j, t in enumerate(ids):
        if t in eos_ids:
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


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths as left-padded (ids (n, L), mask (n, L)) for generate."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def three_phase(model, tokenizer, prompts: list[str], num_chains: int, max_prompt_tokens: int,
                max_completion_tokens: int, temperature: float, top_p: float, min_prefix_tokens: int,
                max_prefix_tokens: int, prefix_retries: int, min_guide_tokens: int, max_guide_tokens: int,
                loss_on: str = "guidance") -> rollout.Rollout:
    """B prompts x G chains sampled in three phases (module docstring); one generate call per phase."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if not 1 <= min_guide_tokens <= max_guide_tokens < max_completion_tokens:
        raise ValueError("need 1 <= min_guide_tokens <= max_guide_tokens < max_completion_tokens")
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    pad, boundaries = tokenizer.pad_token_id, boundary_ids(tokenizer)
    B, G, M, C = len(prompts), num_chains, max_completion_tokens, 1 + prefix_retries
    prompt_ids, prompt_mask = rollout.tokenize_prompts(tokenizer, prompts, max_prompt_tokens, device)  # (B, P)
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
    ids, mask = left_pad([row for row in prompt_rows for _ in range(C)], pad, device)
    out = rollout.generate(model, ids, mask, max(1, max(budgets)), temperature, top_p).tolist()
    picked = [pick_prefix(out[b * C:(b + 1) * C], budgets[b * C:(b + 1) * C], boundaries, eos) for b in range(B)]
    prefixes = [p for p, _ in picked]

    # 2. guidance: chain i of N = B * G continues prompt + prefix of prompt chains[i] for k tokens
    chains = [b for b in range(B) for _ in range(G)]  # chains of one prompt are adjacent
    ids, mask = left_pad([prompt_rows[b] + prefixes[b] for b in chains], pad, device)  # (N, P + prefix)
    out = rollout.generate(model, ids, mask, max(guide_k), temperature, top_p).tolist()  # (N, <= max k)
    guides = [until_eos(out[i][:guide_k[b]], eos) for i, b in enumerate(chains)]  # (tokens, finished)

    # 3. postfix: the rest of the budget; a chain finished in the guidance phase keeps nothing of it
    ids, mask = left_pad([prompt_rows[b] + prefixes[b] + g for b, (g, _) in zip(chains, guides)], pad, device)
    room = [M - len(prefixes[b]) - len(g) for b, (g, _) in zip(chains, guides)]
    out = rollout.generate(model, ids, mask, max(1, max(room)), temperature, top_p).tolist()  # (N, <= max room)
    posts = [[] if done else until_eos(out[i][:room[i]], eos)[0] for i, (_, done) in enumerate(guides)]

    # the Rollout: prompt (N, P) left padded + completion (N, T) right padded, T <= M
    comps = [prefixes[b] + g + p for b, (g, _), p in zip(chains, guides, posts)]
    width = max(len(c) for c in comps)
    # a chain without EOS used its whole budget (length M = width), so padding only follows an EOS
    assert all(len(c) == width or c[-1] in eos for c in comps), "a chain stopped short without EOS"
    completions = torch.tensor([c + [pad] * (width - len(c)) for c in comps], dtype=torch.long, device=device)
    info = [{"prefix_len": len(prefixes[b]), "guide_len": len(g), "postfix_len": len(p),
             "prefix_fallback": picked[b][1], "guidance": tokenizer.decode(g, skip_special_tokens=True)}
            for b, (g, _), p in zip(chains, guides, posts)]
    group = torch.tensor(chains, dtype=torch.long, device=device)
    r = rollout.assemble(tokenizer, prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0),
                         completions, eos, group, info)

    # narrow the loss to completion columns [start, end) of each chain, as loss_on says
    start = [0 if loss_on == "all" else d["prefix_len"] for d in info]
    end = [d["prefix_len"] + d["guide_len"] + (0 if loss_on == "guidance" else d["postfix_len"]) for d in info]
    col = torch.arange(width, device=device)
    keep = (col >= torch.tensor(start, device=device)[:, None]) & (col < torch.tensor(end, device=device)[:, None])
    r.loss_mask[:, prompt_ids.shape[1]:] *= keep  # (N, T)
    return r


# ----------------------------------------------------------------------------------------------
# Optional reward weighting by the guidance position, and the logged figures


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


def weight_rewards(total: torch.Tensor, info: list[dict]) -> torch.Tensor:
    """Total rewards (N,) times position_weight of each chain (N,)."""
    w = [position_weight(d["prefix_len"], d["prefix_len"] + d["guide_len"] + d["postfix_len"]) for d in info]
    return total * torch.tensor(w, dtype=total.dtype, device=total.device)


def summary(info: list[dict]) -> dict:
    """Means over the step's chains, for metrics.jsonl."""
    n = max(1, len(info))
    return {"guide/prefix_len": sum(d["prefix_len"] for d in info) / n,
            "guide/guidance_len": sum(d["guide_len"] for d in info) / n,
            "guide/postfix_len": sum(d["postfix_len"] for d in info) / n,
            "guide/prefix_fallback_frac": sum(d["prefix_fallback"] for d in info) / n}


# ----------------------------------------------------------------------------------------------
# GHPO (arXiv 2507.10628): groups where every chain fails are regenerated with part of the reference
# solution as a hint in the prompt, with more of it at each stage, until some chain succeeds.
#
# Stage 0 is plain sampling of all B groups. A group is all wrong when the accuracy reward of each of
# its G chains is <= 0 and its reference answer is checkable (rewards.checkable); it is then eligible.
# Stage k (ratio r_k of hint_ratios) regenerates all G chains of every eligible group that stage k-1
# left all wrong, in one batched generate call, from the question + HINT_INSTRUCTION + make_hint(r_k)
# (hint_in "user", as in GHPO), or from the plain prompt whose response starts with the hint
# (hint_in "assistant": the tiny demo's model, warm-started on question -> solution only, rescued 46%
# of all-wrong groups with 75% of the steps given there, 3% with them in the question, and 22% by
# sampling the unhinted prompt again; 37 groups of 16 chains each).
# A group is rescued at the first stage where some chain scores > 0: those hinted chains replace its
# unhinted ones in the batch and it leaves the schedule. A group never rescued keeps its ORIGINAL
# unhinted chains: their prompt is the one the model is evaluated on, other rewards (format) still
# teach there, and so hint_ratio > 0 in a chain's info means exactly "rescued by a hint". The hint
# is prompt tokens either way, so it is never trained on (loss_mask 0), whatever the stage.

HINT_INSTRUCTION = "\n\nHere is the beginning of a solution. Build on it and finish solving the problem:\n"
HINT_UNITS = ("steps", "chars")
HINT_IN = ("user", "assistant")


def make_hint(solution: str, ratio: float, unit: str) -> str:
    """The first `ratio` of a solution, counted in steps (its non-empty lines, one per step in GSM8K and
    the built-in task, each kept with its newline) or in characters; rounded up so a small ratio still
    gives something, but never the whole solution (it ends with the answer). "" when there is no part
    to give: no solution, or a single step."""
    if unit not in HINT_UNITS:
        raise ValueError(f"hint unit must be one of {HINT_UNITS}, got {unit!r}")
    parts = [line + "\n" for line in solution.split("\n") if line.strip()] if unit == "steps" else list(solution)
    k = min(len(parts) - 1, math.ceil(ratio * len(parts) - 1e-9))  # 1e-9: 0.1 * 30 is 3.0000000000000004
    return "".join(parts[:max(0, k)])


def needs_hint(accuracy: torch.Tensor, answer: str) -> bool:
    """All wrong: every chain's accuracy reward (G,) is <= 0, and the reference answer parses."""
    return bool((accuracy <= 0).all()) and rewards.checkable(answer)


def check_solutions(examples: list[dict], source: str) -> None:
    """GHPO cuts its hints from reference solutions: a dataset without any is an error, named."""
    if not any(ex.get("solution") for ex in examples):
        raise ValueError(f"--rollout ghpo needs reference solutions, and dataset {source!r} has none: its "
                         f"answers hold no solution steps before '#### <answer>' (GSM8K layout). Use a "
                         f"dataset with worked solutions, or --rollout plain.")


def ghpo(model, tokenizer, examples: list[dict], system_prompt: str, num_chains: int, max_prompt_tokens: int,
         max_completion_tokens: int, temperature: float, top_p: float, weights: dict[str, float],
         reward_settings: dict | None, accuracy_reward: str, hint_ratios: list[float], hint_unit: str,
         hint_in: str = "user", sampler: str = "dynamic") -> rollout.Rollout:
    """B examples {"question", "answer", "solution"} x G chains, all-wrong groups hinted (section above).

    Chains are scored here as train.py scores them, rewards.score with `weights` and `reward_settings`
    (the chain's info, hint_ratio included, reaches every reward); `accuracy_reward` names the one that
    decides all wrong, and the final chains are scored again by train.py (cheap next to sampling). `hint_in`
    places the hint: "user" appends HINT_INSTRUCTION + hint to the question (GHPO); "assistant" starts
    the response with it, to be continued (texts, and so rewards, hold only what was sampled). With no
    hint_ratios (before ghpo_start_step) this is exactly rollout.sample. Each chain's info gets:
    hint_ratio (0 if unhinted) and hint (its text), hint_stages (hinted regenerations its group went
    through), accuracy (its accuracy reward), accuracy_unhinted and zero_adv_unhinted (the unhinted
    chain in its place, and whether that group's total rewards were all equal: what plain GRPO had).
    """
    if hint_in not in HINT_IN:
        raise ValueError(f"hint_in must be one of {HINT_IN}, got {hint_in!r}")
    if accuracy_reward not in weights:
        raise ValueError(f"accuracy reward {accuracy_reward!r} is not among the rewards {list(weights)}")
    B, G = len(examples), num_chains

    def sample_and_score(groups: list[int], hints: list[str], ratio: float):
        """G chains for each of `groups` in one generate call: (Rollout, total (n,), accuracy (n,))."""
        if hint_in == "user":
            blocks = [HINT_INSTRUCTION + h if h else "" for h in hints]
            prompts = [llms.chat_prompt(tokenizer, system_prompt, examples[b]["question"] + block)
                       for b, block in zip(groups, blocks)]
        else:
            blocks = hints
            prompts = [llms.chat_prompt(tokenizer, system_prompt, examples[b]["question"]) + h
                       for b, h in zip(groups, hints)]
        # the prompt may grow by its hint, so that a long hint never pushes the question out
        room = max(len(tokenizer(block, add_special_tokens=False)["input_ids"]) for block in blocks)
        r = rollout.sample(model, tokenizer, prompts, G, max_prompt_tokens + room, max_completion_tokens,
                           temperature, top_p, sampler=sampler)
        for i, d in enumerate(r.info):
            d["hint_ratio"], d["hint"] = ratio, hints[i // G]
        answers = [examples[b]["answer"] for b in groups for _ in range(G)]
        per_fn, names, _ = rewards.score(r.texts, answers, r.info, weights, reward_settings)
        return r, rewards.total(per_fn, names, weights), per_fn[:, names.index(accuracy_reward)]

    plain, total0, acc0 = sample_and_score(list(range(B)), [""] * B, 0.0)
    source = [(plain, list(range(b * G, (b + 1) * G))) for b in range(B)]  # group b -> (Rollout, its rows)
    accuracy = acc0.view(B, G).clone()  # (B, G), of the chains the batch keeps
    stages = [0] * B
    todo = [b for b in range(B) if needs_hint(accuracy[b], examples[b]["answer"])]
    for ratio in hint_ratios:
        hints = {b: make_hint(examples[b].get("solution", ""), ratio, hint_unit) for b in todo}
        todo = [b for b in todo if hints[b]]  # no part of a solution to give: never hinted
        if not todo:
            break
        hinted, _, acc = sample_and_score(todo, [hints[b] for b in todo], ratio)
        acc = acc.view(len(todo), G)
        for j, b in enumerate(todo):
            stages[b] += 1
            if (acc[j] > 0).any():  # rescued: the hinted chains replace the unhinted ones
                source[b], accuracy[b] = (hinted, list(range(j * G, (j + 1) * G))), acc[j]
        todo = [b for j, b in enumerate(todo) if not (acc[j] > 0).any()]

    r = rollout.concat(source, plain.group, tokenizer.pad_token_id)
    std0 = total0.view(B, G).std(1, unbiased=False)  # (B,), as losses.group_advantages computes it
    for i, d in enumerate(r.info):
        d.update(hint_stages=stages[i // G], accuracy=accuracy.view(-1)[i].item(),
                 accuracy_unhinted=acc0[i].item(), zero_adv_unhinted=bool(std0[i // G] < 1e-6))
    return r


def ghpo_summary(info: list[dict], hint_ratios: list[float]) -> dict:
    """Shares and means over the step's chains (groups have G chains each, so chain shares are group
    shares), for metrics.jsonl; zero_adv_frac in the same row is the share with GHPO."""
    n = max(1, len(info))

    def mean(key):
        return sum(d[key] for d in info) / n
    row = {f"ghpo/hinted@{r:g}": sum(d["hint_stages"] > k for d in info) / n for k, r in enumerate(hint_ratios)}
    return {**row, "ghpo/rescued_frac": sum(d["hint_ratio"] > 0 for d in info) / n,
            "ghpo/hint_ratio": mean("hint_ratio"), "ghpo/accuracy_before": mean("accuracy_unhinted"),
            "ghpo/accuracy_after": mean("accuracy"), "ghpo/zero_adv_frac_unhinted": mean("zero_adv_unhinted")}


if __name__ == "__main__":
    import data

    train, _ = data.arithmetic_task(500, 10, seed=0)
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=corpus)
    torch.manual_seed(0)
    prompts = [llms.chat_prompt(tok, "", ex["question"]) for ex in train[:2]]
    r = three_phase(m, tok, prompts, num_chains=3, max_prompt_tokens=128, max_completion_tokens=40,
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

    # GHPO: the untrained model fails every question, so each group goes through every hint stage
    r = ghpo(m, tok, train[:2], "", num_chains=3, max_prompt_tokens=128, max_completion_tokens=24,
             temperature=1.0, top_p=1.0, weights={"correctness": 1.0}, reward_settings=None,
             accuracy_reward="correctness",
             hint_ratios=[0.25, 0.5, 0.75], hint_unit="steps")
    for ratio in (0.25, 0.5, 0.75):
        print(f"hint at {ratio}: {make_hint(train[0]['solution'], ratio, 'steps')!r}")
    print(ghpo_summary(r.info, [0.25, 0.5, 0.75]))
