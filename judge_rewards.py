"""Rewards for generative judges (OpenJudge's GRPO recipes): pointwise scores and pairwise preferences.

The judge writes its reasoning in <think>...</think>, then its verdict:
    pointwise   <score>N</score>      N in 0..4, the helpfulness of one response
    pairwise    <better>A</better>    which of two responses is better, A or B
`parse_score` and `parse_preference` read a verdict; evaluation (evaluator.py) uses the same parsers,
so the judge accuracy it reports is the reward's own notion of right. Rewards are selected by name in
rewards.REWARDS.

Model output is untrusted: only str.find and regexes of one bounded token are used here, so every
call is linear in the completion's length, and no huge digit string is ever converted to int.

    python judge_rewards.py     # scores a few hand-written verdicts
"""
import re

SCORES = range(0, 5)  # the pointwise scale
_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")
_LETTER_RE = re.compile(r"(?<![A-Za-z])[ABab](?![A-Za-z])")  # A or B standing alone, as in "Response B"
_FALLBACK_LINES = 3  # without a <better> tag, the verdict is looked for in the last lines


def strip_think(text: str) -> str:
    """text without its <think>...</think> spans; an unclosed <think> runs to the end, and a stray
    </think> (a chat template that opened the think for the model) drops everything before it."""
    kept, pos = [], 0
    while (start := text.find("<think>", pos)) >= 0:
        kept.append(text[pos:start])
        stop = text.find("</think>", start + len("<think>"))
        if stop < 0:
            pos = len(text)
            break
        pos = stop + len("</think>")
    kept.append(text[pos:])
    rest = "".join(kept)
    cut = rest.rfind("</think>")
    return rest[cut + len("</think>"):] if cut >= 0 else rest


def _tag(text: str, name: str) -> str | None:
    """Content of the first <name>...</name>, or None."""
    start = text.find(f"<{name}>")
    if start < 0:
        return None
    start += len(name) + 2
    stop = text.find(f"</{name}>", start)
    return text[start:stop] if stop >= 0 else None


def parse_score(completion: str) -> int | None:
    """The first number inside the first <score> tag after the think spans are removed, if it is an
    integer in 0..4; None otherwise ("3.5", "7", "-1", no tag, an unclosed tag)."""
    content = _tag(strip_think(completion), "score")
    m = _NUMBER_RE.search(content) if content is not None else None
    if m is None or "." in m.group() or len(m.group().lstrip("+-").lstrip("0")) > 1:
        return None  # a decimal, or more than one significant digit: never in 0..4
    value = int(m.group())
    return value if value in SCORES else None


def _letter(text: str, lowercase: bool) -> str | None:
    """"A" or "B" if exactly one of them stands alone in text (lowercase too where asked), else None."""
    found = {c.upper() for c in _LETTER_RE.findall(text) if lowercase or c.isupper()}
    return found.pop() if len(found) == 1 else None


def parse_preference(completion: str) -> str | None:
    """"A" or "B", else None. After the think spans are removed: the content of the first
    <better>...</better>, read leniently ("A", " b ", "Response A", "**B**"); without a closed tag,
    the last lines, from the end, the first that names exactly one of the capital letters A and B
    ("Response B is better."). A verdict naming both or neither is None."""
    text = strip_think(completion)
    content = _tag(text, "better")
    if content is not None:
        return _letter(content, lowercase=True)
    lines = [line for line in text[-4096:].splitlines() if line.strip()]  # a verdict is near the end
    for line in reversed(lines[-_FALLBACK_LINES:]):
        if (letter := _letter(line, lowercase=False)) is not None:
            return letter
    return None


def judge_pointwise(completion: str, answer: str, **info) -> float:
    """With p = parse_score(completion) and the label y = int(answer) in 0..4:
    y in {0, 1}: 1.0 if p == y else 0.0;  y in 2..4: 1 - |p - y| / 4;  p unparseable: 0.0.
    Our choice on unparseable verdicts: 0 for every label, the worst any verdict can score, so that
    a broken format never earns reward (the reference recipe read a failed parse as the score 0,
    which paid full reward on label-0 items)."""
    label = int(answer)
    if label not in SCORES:
        raise ValueError(f"pointwise label {answer!r} is not in 0..4")
    pred = parse_score(completion)
    if pred is None:
        return 0.0
    if label <= 1:
        return float(pred == label)
    return 1 - abs(pred - label) / 4


def judge_pairwise(completion: str, answer: str, **info) -> float:
    """1.0 if parse_preference(completion) equals the label ("A" or "B"), else 0.0 (unparseable too)."""
    label = answer.strip().upper()
    if label not in ("A", "B"):
        raise ValueError(f"pairwise label {answer!r} is not A or B")
    return float(parse_preference(completion) == label)


if __name__ == "__main__":
    for text, label in [("<think>clear and correct</think><score>4</score>", "4"),
                        ("<think>mostly right</think><score>3</score>", "4"),
                        ("<think>no</think><score>maybe 0</score>", "0"),
                        ("I cannot decide.", "0")]:
        print(f"{text!r} label {label}: score {parse_score(text)}, reward {judge_pointwise(text, label):g}")
    for text, label in [("<think>A misses the unit</think><better>B</better>", "B"),
                        ("<think>...</think>\nResponse A is better.", "A"),
                        ("<better>A or B</better>", "A")]:
        print(f"{text!r} label {label}: preference {parse_preference(text)}, reward {judge_pairwise(text, label):g}")
