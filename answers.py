"""The answer checker: the final answer a completion gives, and whether it equals the reference.

`is_correct(completion, answer)` is THE check: the correctness reward (rewards.py), evaluation
(evaluator.py), the warm start's data checks and the verifier all call it, so train and eval never
disagree. extract_answer finds the final answer (the last <answer> tag, \\boxed{}, ####, "the answer is",
else the last number); numbers compare exactly (thousands commas, decimals, fractions, values rounded
to the reference's places), anything else through math-verify with a time limit.

Model output is untrusted: every regex here is linear-time (no nested or overlapping quantifiers that
could backtrack catastrophically), and nothing from a completion is ever eval'd.
"""
import re
import threading
from decimal import Decimal
from fractions import Fraction


# a number with optional thousands commas and decimals; the sign only counts when it is not glued
# to a preceding word or digit, so "10-3" yields 10 and 3, not 10 and -3.
# "(?:,\d{3})*" is unambiguous (every repetition must start with a comma), so it cannot backtrack.
_LAST_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")
_NUMBER_START_RE = re.compile(r"([+-]?)\s*(\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:\s*/\s*(\d+))?")
_ANSWER_IS_RE = re.compile(r"the answer is:?([^\n]*)", re.IGNORECASE)
# lazy scans here run once: soft_format anchors the match at the first <reasoning> and ends the
# search at the last </answer>, so a failed attempt never restarts from another position.
_MV_MAX_CHARS = 200  # math-verify's parser is superlinear: "(" * 300 already takes ~1 s
_MAX_ROUNDED_PLACES = 100  # no answer rounds to more decimals; beyond, only exact values, linear-time


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


def _number_parts(text: str) -> tuple[str, str, str | None] | None:
    """(sign, digits, denominator or None) of a plain number as parse_number reads it; None otherwise."""
    s = text.replace("\\$", "").replace("$", "").strip()
    m = _NUMBER_START_RE.match(s)
    if m is None:
        return None
    rest = s[m.end():].strip()
    # trailing words/units are fine; more digits or an operator mean an expression, not a number
    if any(c.isdigit() for c in rest) or rest[:1] in ("+", "-", "*", "/", "^", "="):
        return None
    return m.groups()


def parse_number(text: str) -> float | None:
    """A plain number such as "$1,234.50", "-7", "72 dollars", "18%", ".5", "3/4"; None otherwise."""
    parts = _number_parts(text)
    if parts is None:
        return None
    sign, number, denominator = parts
    value = float(number.replace(",", ""))
    if denominator is not None:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    return -value if sign == "-" else value


def _exact_number(text: str) -> Decimal | Fraction | None:
    """A plain number's exact value: a Decimal as written for a decimal ("$1,234.50" -> Decimal("1234.50"),
    which keeps its 2 decimals), a Fraction for "a/b"; None where parse_number gives None."""
    parts = _number_parts(text)
    if parts is None:
        return None
    sign, number, denominator = parts
    # built from the string, so exact at any length (Decimal arithmetic would round to 28 digits)
    value = Decimal(("-" if sign == "-" else "") + number.replace(",", ""))
    if denominator is None:
        return value
    d = int(denominator)
    return Fraction(value) / d if d != 0 else None


def _terminates(fraction: Fraction) -> bool:
    """Whether a fraction can be written out in full as a decimal: its denominator is 2^i 5^j."""
    d = fraction.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _same_number(pred: Decimal | Fraction, ref: Decimal | Fraction) -> bool:
    """is_correct's rule for two plain numbers (in its docstring)."""
    if pred == ref:  # exact for Decimal and Fraction alike, in any mix
        return True
    if isinstance(pred, Decimal) == isinstance(ref, Decimal):  # two decimals, or two fractions: exact only
        return False
    decimal, fraction = (pred, ref) if isinstance(pred, Decimal) else (ref, pred)
    places = -decimal.as_tuple().exponent  # decimals written: "0.3330" has 4, "72" and "7." none
    if not 1 <= places <= _MAX_ROUNDED_PLACES or _terminates(fraction):
        return False
    # non-terminating, so never halfway between two n-decimal values: the rounding direction cannot matter
    return Fraction(decimal) == round(fraction, places)


def _mv_timeout() -> int | None:
    """math-verify's timeouts use signal.alarm, which raises outside the main thread: keep them in
    the main thread (sympy can hang on e.g. 9^{9^{9^9}}) and switch them off (None) elsewhere."""
    return 1 if threading.current_thread() is threading.main_thread() else None


def _math_verify(ref: str, pred: str) -> bool:
    """Symbolic check with math-verify, for answers that are not plain numbers (\\frac, \\sqrt, ...)."""
    if len(pred) > _MV_MAX_CHARS or len(ref) > _MV_MAX_CHARS:
        return False
    from math_verify import parse, verify  # imported here: half a second (sympy), needed only past plain numbers
    secs = _mv_timeout()
    try:
        # math-verify looks for latex math: "$...$" makes a bare answer such as "\frac{1}{2}" parse
        gold = parse(f"${ref.strip('$')}$", parsing_timeout=secs)
        target = parse(f"${pred.strip('$')}$", parsing_timeout=secs)
        return bool(verify(gold, target, timeout_seconds=secs))
    except Exception:  # any failure inside sympy/latex parsing means we could not confirm a match
        return False


def is_correct(completion: str, answer: str) -> bool:
    """THE answer checker, shared by the correctness reward and evaluation.

    When the extracted answer and the reference are both plain numbers (parse_number: "$1,234.50",
    "18%", "72 dollars", "3/4"), they compare by exact value, never by float tolerance:
    - two decimals must be equal exactly: "1,234.50" = "1234.5", "72.0" = "72", "2880000.5" != "2880000";
    - a fraction a/b equals a decimal or a fraction of the same exact value: "3/4" = "0.75", "2/6" = "1/3";
    - the one tolerance is for a fraction whose decimal expansion never ends (1/3, 2/7): a decimal with
      n decimals (1 to 100) matches it when it is the fraction rounded to n decimals ("1/3" = "0.33",
      "1/3" = "0.3333", "1/3" != "0.34", "2/3" = "0.67", "1/3" != "0"). A fraction that can be written
      out in full must be ("3/4" != "0.8").
    Anything else (\\frac, \\sqrt, expressions, words) goes to math-verify."""
    pred = extract_answer(completion)
    if pred is None:
        return False
    ref = reference_answer(answer)
    p, r = _exact_number(pred), _exact_number(ref)
    if p is not None and r is not None:
        return _same_number(p, r)
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
        from math_verify import parse
        return len(parse(f"${ref.strip('$')}$", parsing_timeout=_mv_timeout())) > 1
    except Exception:
        return False
