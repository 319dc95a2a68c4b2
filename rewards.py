"""
Rewards for GRPO: plain functions, chosen by name in the config and mixed with weights.

Every reward has the signature fn(completion, answer, **info) -> float, where `answer` is the
dataset's reference string and `info` carries per-chain facts from the rollout ("completion_len",
"verifier_hallucination_score", "verifier_scored", ...) plus the reward settings from the config
(think_fault_penalty, overlong_buffer_tokens, ...: see `settings`), among them the completion budget
under its plain name, max_completion_tokens. A reward names what it reads as
keyword arguments and ignores the rest. `score` runs the named rewards over a batch and returns the
raw (N, K) values; `total` applies the weights. answers.is_correct is THE answer checker: the
correctness reward and evaluation both call it, so train and eval can never disagree.

The judge rewards live in judge_rewards.py; REWARDS below is the one place where names are chosen.

Model output is untrusted: every regex here and in answers.py is linear-time (no nested or overlapping
quantifiers that could backtrack catastrophically), and nothing from a completion is ever eval'd.
"""
import difflib
import re
import sys

import torch

import answers
import config
import judge_rewards


# -----------------------------------------------------------------------------
# GSM8K-style rewards (each returns 0 or 1; weights are applied by `total`)

_SOFT_RE = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_INTEGER_RE = re.compile(r"[+-]?\d+(?:,\d{3})*")


def correctness(completion: str, answer: str, **info) -> float:
    """1.0 if answers.is_correct(completion, answer) else 0.0."""
    return float(answers.is_correct(completion, answer))


def strict_format(completion: str, answer: str, **info) -> float:
    """1.0 if completion == "<reasoning>\\n{r}\\n</reasoning>\\n<answer>\\n{a}\\n</answer>" plus
    optional trailing whitespace, else 0.0."""
    body = completion.rstrip()
    head, middle, tail = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>"
    # plain string search rather than a regex with two lazy groups, which is quadratic on bad input
    ok = (body.startswith(head) and body.endswith(tail)
          and body.find(middle, len(head), len(body) - len(tail)) >= 0)
    return float(ok)


def soft_format(completion: str, answer: str, **info) -> float:
    """1.0 if completion contains <reasoning>...</reasoning>, whitespace, <answer>...</answer>, else 0.0."""
    start, stop = completion.find("<reasoning>"), completion.rfind("</answer>")
    if start < 0 or stop < 0:
        return 0.0
    return float(_SOFT_RE.match(completion, start, stop + len("</answer>")) is not None)


def integer_answer(completion: str, answer: str, **info) -> float:
    """1.0 if answers.extract_answer(completion) is a plain integer ("-12", "1,234"), else 0.0."""
    pred = answers.extract_answer(completion)
    return float(pred is not None and _INTEGER_RE.fullmatch(pred) is not None)


_BARE_NUMBER_RE = re.compile(r"[+-]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_WRAPPERS = ("**", "__", "`", "$")  # markdown bold, code span, TeX math: still nothing but the number


def _unwrapped(completion: str) -> str:
    """The completion without surrounding space, one final period and one pair of _WRAPPERS."""
    text = completion.strip().removesuffix(".").strip()
    for mark in _WRAPPERS:
        if len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
            text = text[len(mark):-len(mark)].strip()
    return text.removesuffix(".")


def bare_number(completion: str, answer: str, **info) -> float:
    """1.0 if the completion is one number and nothing else ("85", "85.", "**85**", "`85`", "$85$",
    "1,234"), else 0.0 ("47 + 38 = 85", "The answer is 85.", "85 apples"): the layout of "Reply with
    just the number." Right or wrong does not matter here; correctness scores that."""
    return float(_BARE_NUMBER_RE.fullmatch(_unwrapped(completion)) is not None)


def has_final_answer(text: str) -> bool:
    """The work states its answer explicitly (####, <answer>, \\boxed, "the answer is"), or is one number and
    nothing else (bare_number: what "Reply with just the number." asks for); a last number after other
    work, which extract_answer falls back to, does not count (verifier turns ask for one)."""
    marked = any(m in text for m in ("####", "</answer>", "\\boxed{")) or "the answer is" in text.lower()
    return (marked and answers.extract_answer(text) is not None) or bare_number(text, "") == 1.0


# -----------------------------------------------------------------------------
# think/answer reasoning rewards (R1 style): <think>...</think><answer>...</answer>
# Plain string search throughout: each call scans the completion a bounded number of times.

THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _between(text: str, open_tag: str, close_tag: str) -> str | None:
    """Text between the first open_tag and the first close_tag after it; None if either is missing."""
    start = text.find(open_tag)
    stop = text.find(close_tag, start + len(open_tag)) if start >= 0 else -1
    return text[start + len(open_tag):stop] if stop >= 0 else None


def think_format(completion: str, answer: str, *, think_fault_penalty: float, **info) -> float:
    """-think_fault_penalty x faults; 0 for exactly <think>...</think><answer>...</answer> with only
    whitespace around and between the blocks. Faults, one each: a tag missing or repeated (per tag),
    tags out of order (e.g. answer before think), text before the first tag, text between </think>
    and <answer>, text after the last tag. A completion with no tag at all has 4 + 1 faults."""
    firsts = [completion.find(t) for t in THINK_TAGS]
    faults = sum(completion.count(t) != 1 for t in THINK_TAGS)
    present = [p for p in firsts if p >= 0]
    if not present:
        return -think_fault_penalty * (faults + bool(completion.strip()))
    in_order = present == sorted(present)
    last_end = max(completion.rfind(t) + len(t) for t in THINK_TAGS if completion.rfind(t) >= 0)
    faults += (not in_order) + bool(completion[:min(present)].strip()) + bool(completion[last_end:].strip())
    answer_start = firsts[2]
    think_end = completion.rfind("</think>", 0, answer_start) if answer_start >= 0 else -1
    if in_order and think_end >= 0:  # a repeated </think> is already a fault of its own
        faults += bool(completion[think_end + len("</think>"):answer_start].strip())
    return -think_fault_penalty * faults


def short_think(completion: str, answer: str, *, think_min_chars: int, think_short_penalty: float,
                **info) -> float:
    """-think_short_penalty x max(0, 1 - n / think_min_chars), n = characters inside the first
    <think>...</think> (stripped; 0 without one): 0 from think_min_chars on, the full penalty when empty."""
    think = _between(completion, "<think>", "</think>")
    n = len(think.strip()) if think is not None else 0
    return -think_short_penalty * max(0.0, 1 - n / think_min_chars) if think_min_chars > 0 else 0.0


def _contains_word(text: str, word: str) -> bool:
    """word occurs in text with no letter or digit glued to either side ("72" is in "72 apples", not in "172")."""
    i = text.find(word)
    while i >= 0:
        j = i + len(word)
        if (i == 0 or not text[i - 1].isalnum()) and (j == len(text) or not text[j].isalnum()):
            return True
        i = text.find(word, i + 1)
    return False


def think_answer(completion: str, answer: str, *, answer_exact_reward: float, answer_contains_reward: float,
                 answer_wrong_reward: float, **info) -> float:
    """On the last <answer>...</answer> a versus the reference g (after ####), both stripped and
    case-folded: answer_exact_reward if a == g; answer_contains_reward if g occurs in a as a whole
    word; answer_wrong_reward otherwise, with no answer tags, or when a or g is empty."""
    close = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, close) if close >= 0 else -1
    if start < 0:
        return answer_wrong_reward
    pred = completion[start + len("<answer>"):close].strip().casefold()
    gold = answers.reference_answer(answer).strip().casefold()
    if not pred or not gold:
        return answer_wrong_reward
    if pred == gold:
        return answer_exact_reward
    return answer_contains_reward if _contains_word(pred, gold) else answer_wrong_reward


def r1_format(completion: str, answer: str, **info) -> float:
    """1.0 if completion == "<think>\n{t}\n</think>\n<answer>\n{a}\n</answer>" (surrounding
    whitespace allowed) with each of the four tags exactly once, else 0.0. Pair it with correctness."""
    body = completion.strip()
    head, middle, tail = "<think>\n", "\n</think>\n<answer>\n", "\n</answer>"
    ok = (body.startswith(head) and body.endswith(tail)
          and body.find(middle, len(head), len(body) - len(tail)) >= 0
          and all(body.count(t) == 1 for t in THINK_TAGS))
    return float(ok)


# -----------------------------------------------------------------------------
# rewards read from the rollout's per-chain info

def overlong(completion: str, answer: str, *, completion_len: int, max_completion_tokens: int,
             overlong_buffer_tokens: int, **info) -> float:
    """DAPO's soft overlong penalty on the completion's token count L (info["completion_len"], set by
    rollout.assemble), with M = max_completion_tokens (the completion budget), b = overlong_buffer_tokens:
    -1 if L >= M (the budget ran out); else 0 if L <= M - b; else (M - b - L) / b, a linear ramp."""
    if completion_len >= max_completion_tokens:
        return -1.0
    if completion_len <= max_completion_tokens - overlong_buffer_tokens:
        return 0.0
    return (max_completion_tokens - overlong_buffer_tokens - completion_len) / overlong_buffer_tokens


def verifier_score(completion: str, answer: str, *, verifier_scored: int = 0,
                   verifier_hallucination_score: float = 1.0, **info) -> float:
    """1 - info["verifier_hallucination_score"], the mean of the conversation's [SCORE]
    hallucination_detect values (1 = the verifier found a mistake in that step, verifier.py): the share
    of scored steps without one, higher is better. 0 when info["verifier_scored"], the number of [SCORE]
    lines the conversation got, is 0 or missing (failed calls, steps with nothing checkable): a neutral
    0.5 there would pay more for writing nothing the verifier can check than for a checked mistake."""
    if not verifier_scored:
        return 0.0
    return 1.0 - float(verifier_hallucination_score)


REWARDS = {
    "correctness": correctness,
    "strict_format": strict_format,
    "soft_format": soft_format,
    "integer_answer": integer_answer,
    "bare_number": bare_number,
    "think_format": think_format,
    "short_think": short_think,
    "think_answer": think_answer,
    "r1_format": r1_format,
    "overlong": overlong,
    "verifier_score": verifier_score,
    "judge_pointwise": judge_rewards.judge_pointwise,
    "judge_pairwise": judge_rewards.judge_pairwise,
}

# -----------------------------------------------------------------------------
# batch scoring


def settings(cfg) -> dict:
    """The config values reward functions take as keyword arguments (next to each chain's info), under
    the config's names: a reward of the completion's length reads the budget as max_completion_tokens."""
    return {"think_fault_penalty": cfg.think_fault_penalty, "think_min_chars": cfg.think_min_chars,
            "think_short_penalty": cfg.think_short_penalty, "answer_exact_reward": cfg.answer_exact_reward,
            "answer_contains_reward": cfg.answer_contains_reward, "answer_wrong_reward": cfg.answer_wrong_reward,
            "max_completion_tokens": cfg.max_completion_tokens, "overlong_buffer_tokens": cfg.overlong_buffer_tokens}


def check_names(weights: dict[str, float]) -> None:
    """Fail fast, at config time, on a misspelled reward name rather than mid-training."""
    for name in weights:
        if name not in REWARDS:
            close = difflib.get_close_matches(name, REWARDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise config.UserError(f"unknown reward {name!r}.{hint} Valid names: {', '.join(REWARDS)}")


_REPORTED: set[str] = set()  # rewards whose first error was already printed


def score(texts: list[str], answers: list[str], infos: list[dict], weights: dict[str, float],
          settings: dict | None = None) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """Raw value of each named reward for each chain: float32 (N, K), the K names in order, and how
    many calls of each reward raised. Each reward gets a chain's info and the shared `settings` as
    keyword arguments. Kept unweighted so each reward can be logged separately; `total` mixes them.
    A reward that raises scores 0 for that chain, and the run goes on: the first error of each reward
    is printed once with its name, and every error is counted."""
    settings = settings or {}
    check_names(weights)
    names = list(weights)
    errors = dict.fromkeys(names, 0)
    rows = []
    for text, answer, info in zip(texts, answers, infos, strict=True):
        row = []
        for name in names:
            try:
                row.append(float(REWARDS[name](text, answer, **settings, **info)))
            except Exception as e:  # a user's reward must never end a run
                errors[name] += 1
                if name not in _REPORTED:
                    _REPORTED.add(name)
                    print(f"reward {name!r} raised {type(e).__name__}: {e}; that chain scores 0 "
                          f"(counted in metrics as reward_errors/{name}, reported once)", file=sys.stderr)
                row.append(0.0)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32).reshape(len(texts), len(names)), names, errors


def total(rewards: torch.Tensor, names: list[str], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum per chain: (N,) = sum_k weights[names[k]] * rewards[:, k]."""
    return rewards @ torch.tensor([weights[name] for name in names], dtype=rewards.dtype)


if __name__ == "__main__":
    answer = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72"
    completions = [
        "<reasoning>\n48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>\n",
        "<reasoning>48 + 24</reasoning> <answer>$72.00</answer>",
        "She sold 48 + 24 clips, so the answer is \\boxed{72}.",
        "The answer is 70 clips.",
        "I am not sure.",
    ]
    weights = {"correctness": 2.0, "strict_format": 0.5, "soft_format": 0.5, "integer_answer": 0.5}
    values, names, _ = score(completions, [answer] * len(completions), [{}] * len(completions), weights)
    for text, row, t in zip(completions, values.tolist(), total(values, names, weights).tolist()):
        print(f"{text!r}\n  extracted={answers.extract_answer(text)!r} "
              + " ".join(f"{n}={v:g}" for n, v in zip(names, row)) + f" total={t:g}")
