"""GHPO (arXiv 2507.10628): groups where every chain fails are regenerated with part of the reference
solution as a hint in the prompt, with more of it at each stage, until some chain succeeds.

Stage 0 is plain sampling of all B groups. A group is all wrong when the accuracy reward of each of
its G chains is <= 0 and its reference answer is checkable (answers.checkable); it is then eligible.
Stage k (ratio r_k of hint_ratios) regenerates all G chains of every eligible group that the earlier
stages left all wrong and whose hint make_hint(r_k) is new to it, in one batched generate call, from
the question + HINT_INSTRUCTION + hint (hint_in "user", as in GHPO), or from the plain prompt whose
response starts with the hint (hint_in "assistant": suits a model warm-started on question -> solution
only, as the tiny demo's; FINDINGS.md has the rescue rates of both placements).
New means different from the hint the group last got ("" at stage 0, so no part to give is no
stage). make_hint rounds up, so nearby ratios can cut the same part (a 2-step solution gives its first
step at 0.25, 0.5 and 0.75; a 3-step one its first two at 0.5 and 0.75): such stages merge into the
first one, so a group never resamples an identical prompt, and its hint_ratio is the ratio it was
given, the smallest that gives its hint.
Hints drop GSM8K's calculator notes ("48/2=<<48/2=24>>24" gives "48/2=24"): they are markup for the
dataset's checker, not part of a worked solution the model reads or writes.
A group is rescued at the first stage where some chain scores > 0: those hinted chains replace its
unhinted ones in the batch and it leaves the schedule. A group never rescued keeps its ORIGINAL
unhinted chains: their prompt is the one the model is evaluated on, other rewards (format) still
teach there, and so hint_ratio > 0 in a chain's info means exactly "rescued by a hint". The hint
is prompt tokens either way, so it is never trained on (loss_mask 0), whatever the stage.

    python ghpo.py     # GHPO's hint stages on the untrained tiny model
"""
import math
import re

import torch

import answers
import config
import llms
import rewards
import rollout

HINT_INSTRUCTION = "\n\nHere is the beginning of a solution. Build on it and finish solving the problem:\n"


# a GSM8K calculator note, "<<48/2=24>>": no nested or overlapping quantifiers, so linear-time
_CALCULATOR_NOTE_RE = re.compile(r"<<[^<>]*>>")


def drop_calculator_notes(solution: str) -> str:
    """GSM8K's solutions carry calculator notes for its checker: "48/2=<<48/2=24>>24" -> "48/2=24"."""
    return _CALCULATOR_NOTE_RE.sub("", solution)


def make_hint(solution: str, ratio: float, unit: str) -> str:
    """The first `ratio` of a solution without its calculator notes, counted in steps (its non-empty
    lines, one per step in GSM8K and the built-in task, each kept with its newline) or in characters of
    the cleaned solution; rounded up so a small ratio still gives something, but never the whole solution
    (it ends with the answer). "" when there is no part to give: no solution, or a single step."""
    if unit not in ("steps", "chars"):
        raise config.UserError(f"hint unit must be steps or chars, got {unit!r}")
    solution = drop_calculator_notes(solution)
    parts = [line + "\n" for line in solution.split("\n") if line.strip()] if unit == "steps" else list(solution)
    k = min(len(parts) - 1, math.ceil(ratio * len(parts) - 1e-9))  # 1e-9: 0.1 * 30 is 3.0000000000000004
    return "".join(parts[:max(0, k)])


def needs_hint(accuracy: torch.Tensor, answer: str) -> bool:
    """All wrong: every chain's accuracy reward (G,) is <= 0, and the reference answer parses."""
    return bool((accuracy <= 0).all()) and answers.checkable(answer)


def check_solutions(examples: list[dict], source: str) -> None:
    """GHPO cuts its hints from reference solutions: a dataset without any is an error, named."""
    if not any(ex.get("solution") for ex in examples):
        raise config.UserError(f"--sampler ghpo needs reference solutions, and dataset {source!r} has none: its "
                               f"answers hold no solution steps before '#### <answer>' (GSM8K layout). Use a "
                               f"dataset with worked solutions, or --sampler plain.")


def ghpo(model, tokenizer, examples: list[dict], num_chains: int, *, system_prompt: str, max_prompt_tokens: int,
         max_completion_tokens: int, temperature: float, top_p: float, weights: dict[str, float],
         reward_settings: dict | None, accuracy_reward: str, hint_ratios: list[float], hint_unit: str,
         hint_in: str = "user", kv_cache: str = "dynamic") -> rollout.Rollout:
    """B examples {"question", "answer", "solution"} x G chains, all-wrong groups hinted (section above).

    Chains are scored here as grpo.step scores them, rewards.score with `weights` and `reward_settings`
    (the chain's info, hint_ratio included, reaches every reward); `accuracy_reward` names the one that
    decides all wrong, and the final chains are scored again by grpo.step (cheap next to sampling). `hint_in`
    places the hint: "user" appends HINT_INSTRUCTION + hint to the question (GHPO); "assistant" starts
    the response with it, to be continued (texts, and so rewards, hold only what was sampled). With no
    hint_ratios (before ghpo_start_step) this is exactly rollout.sample. Each chain's info gets:
    hint_ratio (0 if unhinted) and hint (its text), hinted_at (the ratios of the stages its group was
    regenerated at, merged stages left out) and hint_stages (how many: hinted generate calls), accuracy
    (its accuracy reward), accuracy_unhinted and zero_adv_unhinted (the unhinted chain in its place, and
    whether that group's total rewards were all equal: what plain GRPO had).
    """
    if hint_in not in ("user", "assistant"):
        raise config.UserError(f"hint_in must be user or assistant, got {hint_in!r}")
    if accuracy_reward not in weights:
        raise config.UserError(f"accuracy reward {accuracy_reward!r} is not among the rewards {list(weights)}")
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
        r = rollout.sample(model, tokenizer, prompts, G, max_prompt_tokens=max_prompt_tokens + room,
                           max_new_tokens=max_completion_tokens, temperature=temperature, top_p=top_p,
                           kv_cache=kv_cache, images=rollout.images_of([examples[b] for b in groups]))
        for i, d in enumerate(r.info):
            d["hint_ratio"], d["hint"] = ratio, hints[i // G]
        answers = [examples[b]["answer"] for b in groups for _ in range(G)]
        per_fn, names, _ = rewards.score(r.texts, answers, r.info, weights, reward_settings)
        return r, rewards.total(per_fn, names, weights), per_fn[:, names.index(accuracy_reward)]

    plain, total0, acc0 = sample_and_score(list(range(B)), [""] * B, 0.0)
    source = [(plain, list(range(b * G, (b + 1) * G))) for b in range(B)]  # group b -> (Rollout, its rows)
    accuracy = acc0.view(B, G).clone()  # (B, G), of the chains the batch keeps
    hinted_at = [[] for _ in range(B)]  # group b -> the ratios of the stages it was regenerated at
    last = [""] * B  # group b -> the hint it last got ("" at stage 0)
    todo = [b for b in range(B) if needs_hint(accuracy[b], examples[b]["answer"])]
    for ratio in hint_ratios:
        if not todo:
            break
        hints = {b: make_hint(examples[b].get("solution", ""), ratio, hint_unit) for b in todo}
        # the hint it last got (rounded up to the same part, or "" with no part to give) would resample an
        # identical prompt: such a group skips this stage and waits, all wrong, for a longer hint
        new = [b for b in todo if hints[b] != last[b]]
        if not new:
            continue
        hinted, _, acc = sample_and_score(new, [hints[b] for b in new], ratio)
        acc = acc.view(len(new), G)
        rescued = set()
        for j, b in enumerate(new):
            last[b] = hints[b]
            hinted_at[b].append(ratio)
            if (acc[j] > 0).any():  # rescued: the hinted chains replace the unhinted ones
                source[b], accuracy[b] = (hinted, list(range(j * G, (j + 1) * G))), acc[j]
                rescued.add(b)
        todo = [b for b in todo if b not in rescued]

    r = rollout.concat(source, plain.group, tokenizer.pad_token_id)
    std0 = total0.view(B, G).std(1, unbiased=False)  # (B,), as grpo.group_advantages computes it
    for i, d in enumerate(r.info):
        b = i // G
        d.update(hint_stages=len(hinted_at[b]), hinted_at=list(hinted_at[b]), accuracy=accuracy.view(-1)[i].item(),
                 accuracy_unhinted=acc0[i].item(), zero_adv_unhinted=bool(std0[b] < 1e-6))
    return r


def ghpo_summary(info: list[dict], hint_ratios: list[float]) -> dict:
    """Shares and means over the step's chains (groups have G chains each, so chain shares are group
    shares), for metrics.jsonl; zero_adv_frac in the same row is the share with GHPO. hinted@r is the
    share regenerated at stage r: a group still all wrong whose hint at r is the one it already had
    merged that stage into an earlier one and is not counted there, so the shares count generate calls."""
    n = max(1, len(info))

    def mean(key):
        return sum(d[key] for d in info) / n
    row = {f"ghpo/hinted@{r:g}": sum(r in d["hinted_at"] for d in info) / n for r in hint_ratios}
    return {**row, "ghpo/rescued_frac": sum(d["hint_ratio"] > 0 for d in info) / n,
            "ghpo/hint_ratio": mean("hint_ratio"), "ghpo/accuracy_before": mean("accuracy_unhinted"),
            "ghpo/accuracy_after": mean("accuracy"), "ghpo/zero_adv_frac_unhinted": mean("zero_adv_unhinted")}


def make_sampler(cfg, *, device: str, train_set: list[dict]):
    """`--sampler ghpo`: checks the ghpo_* settings and that the train set has solutions to cut hints
    from (at start-up, not at the first hint), then samples each batch with hints where all fail."""
    if cfg.ghpo_accuracy_reward not in cfg.rewards:
        raise config.UserError(f"ghpo_accuracy_reward {cfg.ghpo_accuracy_reward!r} must be one of the rewards "
                               f"{list(cfg.rewards)}: add it to --rewards (weight 0 scores it without adding it in)")
    ratios = cfg.ghpo_hint_ratios
    if not ratios or sorted(set(ratios)) != ratios or not 0 < ratios[0] <= ratios[-1] < 1:
        raise config.UserError(f"ghpo_hint_ratios must increase strictly within (0, 1), e.g. 0.25,0.5,0.75; "
                               f"got {ratios}")
    check_solutions(train_set, cfg.dataset)
    settings = rewards.settings(cfg)

    def sample_ghpo(model, tokenizer, batch: list[dict], step: int) -> rollout.Rollout:
        r = ghpo(model, tokenizer, batch, cfg.num_chains, system_prompt=cfg.system_prompt,
                 max_prompt_tokens=cfg.max_prompt_tokens, max_completion_tokens=cfg.max_completion_tokens,
                 temperature=cfg.temperature, top_p=cfg.top_p, weights=cfg.rewards, reward_settings=settings,
                 accuracy_reward=cfg.ghpo_accuracy_reward,
                 hint_ratios=cfg.ghpo_hint_ratios if step >= cfg.ghpo_start_step else [],
                 hint_unit=cfg.ghpo_hint_unit, hint_in=cfg.ghpo_hint_in, kv_cache=cfg.kv_cache)
        r.stats = ghpo_summary(r.info, cfg.ghpo_hint_ratios)  # ghpo/hinted@r, accuracy before and after, ...
        return r
    return sample_ghpo


if __name__ == "__main__":
    import builtin_tasks
    import data

    train, _ = builtin_tasks.arithmetic_task(500, 10, seed=0)
    m, tok = llms.load(llms.TINY, "cpu", tiny_corpus=[ex["question"] + "\n" + data.target_text(ex) for ex in train])
    torch.manual_seed(0)
    # the untrained model fails every question, so each group goes through every stage that gives it a new hint
    r = ghpo(m, tok, train[:2], 3, system_prompt="", max_prompt_tokens=128, max_completion_tokens=24,
             temperature=1.0, top_p=1.0, weights={"correctness": 1.0}, reward_settings=None,
             accuracy_reward="correctness", hint_ratios=[0.25, 0.5, 0.75], hint_unit="steps")
    for ratio in (0.25, 0.5, 0.75):
        print(f"hint at {ratio}: {make_hint(train[0]['solution'], ratio, 'steps')!r}")
    print(ghpo_summary(r.info, [0.25, 0.5, 0.75]))
