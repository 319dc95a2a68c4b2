"""
Rewards for GRPO: plain functions, chosen by name in the config and mixed with weights.

Every reward has the signature fn(completion, answer, **info) -> float, where `answer` is the
dataset's reference string and `info` carries per-chain extras (unused here, but accepted so that
future rewards can need them without changing any caller). `score` runs the named rewards over a
batch and returns the raw (N, K) values; `total` applies the weights. `is_correct` is THE answer
checker: the correctness reward and evaluation both call it, so train and eval can never disagree.

Model output is untrusted: every regex here is linear-time (no nested or overlapping quantifiers
that could backtrack catastrophically), and nothing from a completion is ever eval'd.
"""
import difflib
import re
import sys
import threading

import torch
from math_verify import parse, verify

# -----------------------------------------------------------------------------
# answer extraction and checking

# a number with optional thousands commas and decimals; the sign only counts when it is not glued
# to a preceding word or digit, so "10-3" yields 10 and 3, not 10 and -3.
# "(?:,\d{3})*" is unambiguous (every repetition must start with a comma), so it cannot backtrack.
_LAST_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")
_NUMBER_START_RE = re.compile(r"([+-]?)\s*(\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:\s*/\s*(\d+))?")
_ANSWER_IS_RE = re.compile(r"the answer is:?([^\n]*)", re.IGNORECASE)
# lazy scans here run once: soft_format anchors the match at the first <reasoning> and ends the
# search at the last </answer>, so a failed attempt never restarts from another position.
_SOFT_RE = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_INTEGER_RE = re.compile(r"[+-]?\d+(?:,\d{3})*")
_MV_MAX_CHARS = 200  # math-verify's parser is superlinear: "(" * 300 already takes ~1 s


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, matching braces by hand since regexes cannot nest."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    start += len("\\boxed{")
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None  # unbalanced: the model never closed it, so it gave no boxed answer


def extract_answer(text: str) -> str | None:
    """The final answer a completion gives: last <answer> tag, last \\boxed{}, text after the last
    ####, text after the last "the answer is", last number; None if there is none."""
    close = text.rfind("</answer>")
    open_ = text.rfind("<answer>", 0, close) if close >= 0 else -1
    if open_ >= 0:
        found = text[open_ + len("<answer>"):close]
    elif (boxed := _last_boxed(text)) is not None:
        found = boxed
    elif "####" in text:
        found = text.rsplit("####", 1)[1].strip().split("\n")[0]
    elif said := _ANSWER_IS_RE.findall(text):
        found = said[-1].split(". ")[0].strip().rstrip(".")  # stop at the end of the sentence
    elif numbers := _LAST_NUMBER_RE.findall(text):
        found = numbers[-1]
    else:
        return None
    return found.strip() or None  # an empty answer is no answer


def reference_answer(answer: str) -> str:
    """The final value of a reference: text after the last #### (GSM8K style), else the whole string."""
    return answer.rsplit("####", 1)[-1].strip()


def parse_number(text: str) -> float | None:
    """A plain number such as "$1,234.50", "-7", "72 dollars", "18%", ".5", "3/4"; None otherwise."""
    s = text.replace("\\$", "").replace("$", "").strip()
    m = _NUMBER_START_RE.match(s)
    if m is None:
        return None
    rest = s[m.end():].strip()
    # trailing words/units are fine; more digits or an operator mean an expression, not a number
    if any(c.isdigit() for c in rest) or rest[:1] in ("+", "-", "*", "/", "^", "="):
        return None
    sign, number, denominator = m.groups()
    value = float(number.replace(",", ""))
    if denominator is not None:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    return -value if sign == "-" else value


def _mv_timeout() -> int | None:
    """math-verify's timeouts use signal.alarm, which raises outside the main thread: keep them in
    the main thread (sympy can hang on e.g. 9^{9^{9^9}}) and switch them off (None) elsewhere."""
    return 1 if threading.current_thread() is threading.main_thread() else None


def _math_verify(ref: str, pred: str) -> bool:
    """Symbolic check with math-verify, for answers that are not plain numbers (\\frac, \\sqrt, ...)."""
    if len(pred) > _MV_MAX_CHARS or len(ref) > _MV_MAX_CHARS:
        return False
    secs = _mv_timeout()
    try:
        # math-verify looks for latex math: "$...$" makes a bare answer such as "\frac{1}{2}" parse
        gold = parse(f"${ref.strip('$')}$", parsing_timeout=secs)
        target = parse(f"${pred.strip('$')}$", parsing_timeout=secs)
        return bool(verify(gold, target, timeout_seconds=secs))
    except Exception:  # any failure inside sympy/latex parsing means we could not confirm a match
        return False


def is_correct(completion: str, answer: str) -> bool:
    """THE answer checker, shared by the correctness reward and evaluation."""
    pred = extract_answer(completion)
    if pred is None:
        return False
    ref = reference_answer(answer)
    p, r = parse_number(pred), parse_number(ref)
    if p is not None and r is not None:
        return abs(p - r) <= 1e-6 * max(1.0, abs(r))
    return _math_verify(ref, pred)


def checkable(answer: str) -> bool:
    """Whether the reference parses: a plain number, or math that math-verify extracts an expression from
    ("\\frac{1}{2}", "x^2+1"; not "", "???"). GHPO never hints a group whose reference fails this."""
    ref = reference_answer(answer)
    if parse_number(ref) is not None:
        return True
    if not ref or len(ref) > _MV_MAX_CHARS:
        return False
    try:  # parse gives [expression, text] when it found math, [text] alone when it did not
        return len(parse(f"${ref.strip('$')}$", parsing_timeout=_mv_timeout())) > 1
    except Exception:
        return False

# -----------------------------------------------------------------------------
# reward functions (each returns 0 or 1; weights are applied by `total`)

def correctness(completion: str, answer: str, **info) -> float:
    """1.0 if is_correct(completion, answer) else 0.0."""
    return float(is_correct(completion, answer))


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
    """1.0 if extract_answer(completion) is a plain integer ("-12", "1,234"), else 0.0."""
    pred = extract_answer(completion)
    return float(pred is not None and _INTEGER_RE.fullmatch(pred) is not None)


REWARDS = {
    "correctness": correctness,
    "strict_format": strict_format,
    "soft_format": soft_format,
    "integer_answer": integer_answer,
}

# -----------------------------------------------------------------------------
# batch scoring


def check_names(weights: dict[str, float]) -> None:
    """Fail fast, at config time, on a misspelled reward name rather than mid-training."""
    for name in weights:
        if name not in REWARDS:
            close = difflib.get_close_matches(name, REWARDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown reward {name!r}.{hint} Valid names: {', '.join(REWARDS)}")


_REPORTED: set[str] = set()  # rewards whose first error was already printed


def score(texts: list[str], answers: list[str], infos: list[dict],
          weights: dict[str, float]) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """Raw value of each named reward for each chain: float32 (N, K), the K names in order, and how
    many calls of each reward raised. Kept unweighted so each reward can be logged separately; `total`
    mixes them. A reward that raises scores 0 for that chain, and the run goes on: the first error of
    each reward is printed once with its name, and every error is counted."""
    check_names(weights)
    names = list(weights)
    errors = dict.fromkeys(names, 0)
    rows = []
    for text, answer, info in zip(texts, answers, infos, strict=True):
        row = []
        for name in names:
            try:
                row.append(float(REWARDS[name](text, answer, **info)))
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
        print(f"{text!r}\n  extracted={extract_answer(text)!r} "
              + " ".join(f"{n}={v:g}" for n, v in zip(names, row)) + f" total={t:g}")
