"""Checks the arithmetic written out in a step of work: the rules verifier's eyes (verifier_backends.py).

A step is cut into runs of numbers, operators (+ - * / x × ÷), parentheses and "=": a word, a newline
or other punctuation ends a run, so "6 boxes = 12" holds no equation. Each "=" of a run checks the
expression on its left (everything since the run's start or the previous "=") against what follows it
(up to the next "=" or the run's end): "3 * 4 = 12 + 1 = 13" checks 3 * 4 = 12 and 12 + 1 = 13, a
running total. Values are exact fractions with the usual precedence (never Python's eval). A number
written with d decimals is right when it is the true value rounded to d decimals ("1/3 = 0.33",
"10 / 3 = 3"; a truncated "2/3 = 0.66" is wrong). Whatever the checker cannot read for sure is not
checked: it must never flag a true equation ("2,5 * 2 = 5", "50% * 4 = 2", "2^3 + 1 = 9" and
"3 / 4 = 75%" are all skipped).

    python equations.py "Tom has 2 + 3 * 4 = 20 apples."   # what is wrong, and whether anything was checked
"""
import re
import sys
from fractions import Fraction
from typing import NamedTuple

_MAX_CHARS = 10_000  # of the latest step: the check is linear, this only bounds one reply's work
_MAX_TOKENS = 64     # of one side of an "=": a longer run is no equation a student writes
_MAX_NUMBER = 32     # characters of a number: a longer one is no number (and values stay small)
# markdown and LaTeX that models wrap arithmetic in: bold and code spans go, LaTeX operators become ours
_MARKUP = {"**": "", "__": "", "`": "", "\\times": "×", "\\cdot": "×", "\\div": "÷", "\\$": "$",
           "\\(": " ", "\\)": " ", "\\[": " ", "\\]": " "}
_MARKUP_RE = re.compile("|".join(map(re.escape, _MARKUP)))
_BULLET_RE = re.compile(r"^[ \t]*[-*+][ \t]+", re.MULTILINE)  # "- 3 + 4 = 7": a list marker, no minus
_NOTE_RE = re.compile(r"<<([^<>=\n]{1,200})=([^<>=\n]{1,50})>>")  # GSM8K's calculator notes <<48/2=24>>
# one pass, one token per match, no nested quantifiers: a number ($ and 1,234 groups allowed), an
# operator (an "x" only outside words), a parenthesis, "=" (also "=="), spaces, or any other character
_TOKEN_RE = re.compile(r"(?P<num>\$?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?)"
                       r"|(?P<op>[-+*/×÷\u2212]|(?<![^\W\d_])x(?![^\W\d_]))|(?P<paren>[()])|(?P<eq>=+)"
                       r"|(?P<space>[^\S\n]+)|(?P<other>.)", re.DOTALL)
_OPS = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}  # as written: ours
_OPERATORS = ("+", "-", "*", "/")
# what may touch an equation's ends: anything else (a letter, %, ^, \, "10:30", "2,5") binds to its number
_SAFE_BEFORE, _SAFE_AFTER = set("([{:;\"'“‘<>#=)"), set(")]}.,;:!?\"'”’<>$")
_PERCENT_RE = re.compile(r"[ \t]*(?:[%\u2030]|per ?cent\b)", re.IGNORECASE)  # "3 / 4 = 75 %"


class _Tok(NamedTuple):
    kind: str                 # "num", "+", "-", "*", "/", "(", ")", "=", or "break" (a word, a newline, ...)
    text: str                 # as written
    start: int                # where in the (cleaned) step
    end: int
    value: Fraction | None = None


class _NotExpression(Exception):
    """Tokens that are no whole expression, or divide by zero: that equation is not checked."""


def _tokens(text: str) -> list[_Tok]:
    toks = []
    for m in _TOKEN_RE.finditer(text):
        kind, s = m.lastgroup, m.group()
        if kind == "num" and len(s) <= _MAX_NUMBER:
            toks.append(_Tok("num", s, m.start(), m.end(), Fraction(s.lstrip("$").replace(",", ""))))
        elif kind != "space":
            kind = _OPS[s] if kind == "op" else s if kind == "paren" else "=" if kind == "eq" else "break"
            toks.append(_Tok(kind, s, m.start(), m.end()))
    return toks


def _value(toks: list[_Tok]) -> Fraction:
    """The exact value of a whole expression: + - below * /, unary minus, parentheses (recursive descent,
    one pass; the depth is at most _MAX_TOKENS). Raises _NotExpression."""
    pos = 0

    def peek() -> str | None:
        return toks[pos].kind if pos < len(toks) else None

    def factor() -> Fraction:
        nonlocal pos
        kind = peek()
        pos += 1
        if kind == "num":
            return toks[pos - 1].value
        if kind == "-":
            return -factor()
        if kind == "(":
            inner = expression()
            if peek() != ")":
                raise _NotExpression
            pos += 1
            return inner
        raise _NotExpression

    def term() -> Fraction:
        nonlocal pos
        v = factor()
        while (op := peek()) in ("*", "/"):
            pos += 1
            w = factor()
            if op == "/" and w == 0:
                raise _NotExpression
            v = v * w if op == "*" else v / w
        return v

    def expression() -> Fraction:
        nonlocal pos
        v = term()
        while (op := peek()) in ("+", "-"):
            pos += 1
            v = v + term() if op == "+" else v - term()
        return v

    v = expression()
    if pos != len(toks):
        raise _NotExpression
    return v


def _binary(toks: list[_Tok]) -> bool:
    """Whether the tokens hold an operator between two operands (not just a sign)."""
    return any(t.kind in _OPERATORS and j > 0 and toks[j - 1].kind in ("num", ")") for j, t in enumerate(toks))


def _written(toks: list[_Tok]) -> str:
    """The tokens as the student wrote them, spaced: "(2 + 3) x 4", "-3"."""
    out = ""
    for j, t in enumerate(toks):
        hug = j == 0 or toks[j - 1].kind == "(" or t.kind == ")" or (
            toks[j - 1].kind == "-" and (j == 1 or toks[j - 2].kind not in ("num", ")")))  # after a sign
        out += t.text if hug else " " + t.text
    return out


def _show(x: Fraction) -> str:
    """Rounded to 6 decimals, in integers only (no float overflow): 1240, 2.5, 0.333333, -3."""
    n = round(x * 10 ** 6)
    whole, part = divmod(abs(n), 10 ** 6)
    return "-" * (n < 0) + f"{whole}.{part:06d}".rstrip("0").rstrip(".")


def _decimals(tok: _Tok) -> int:
    return len(tok.text.partition(".")[2])


def _close(value: Fraction, claim: Fraction, decimals: int | None) -> bool:
    """Right when equal, or (decimals given) when claim is value rounded to that many decimals."""
    if decimals is None:
        return value == claim
    return abs(value - claim) * 2 * 10 ** decimals <= 1


def _left_side(seg: list[_Tok], text: str, opens_run: bool) -> list[_Tok] | None:
    """What an "=" checks on its left: seg (the tokens since the run's start or the previous "=") after its
    last unmatched parenthesis ("(3 + 4 = 7)", "1) 3 + 4 = 7"); None when that cannot be read for sure."""
    stack, cut = [], 0
    for j, t in enumerate(seg):
        if t.kind == "(":
            stack.append(j)
        elif t.kind == ")" and stack:
            stack.pop()
        elif t.kind == ")":
            cut = j + 1
    seg = seg[stack[-1] + 1 if stack else cut:]
    if not seg or len(seg) > _MAX_TOKENS or (opens_run and not _binary(seg)):
        return None  # an "=" with a bare number first on its left ("Step 1 = 7") is a label, not arithmetic
    if seg[0].start > 0 and not text[seg[0].start - 1].isspace():
        before = text[seg[0].start - 1]
        between_digits = before in ".,:" and seg[0].start > 1 and text[seg[0].start - 2].isdigit()
        if before not in _SAFE_BEFORE or between_digits:  # "a2 + 1", "2^3 + 1", "10:30 + 2", "2,5 * 2"
            return None
    if seg[0].kind == "-" and (len(seg) < 2 or seg[0].end != seg[1].start):  # a sign touches its number
        return None
    return seg


def _right_side(seg: list[_Tok], text: str, ends_run: bool) -> list[_Tok] | None:
    """What an "=" claims: seg (up to the next "=" or the run's end) before its first unmatched parenthesis;
    None when that cannot be read for sure ("= 75%", "= 12:30", "= 3x")."""
    stack, cut = [], len(seg)
    for j, t in enumerate(seg):
        if t.kind == "(":
            stack.append(j)
        elif t.kind == ")" and stack:
            stack.pop()
        elif t.kind == ")":
            cut = j
            break
    if stack and cut == len(seg):
        cut = stack[0]
    whole, seg = cut == len(seg), seg[:cut]
    if not seg or len(seg) > _MAX_TOKENS:
        return None
    if ends_run and whole:  # what follows the run must not bind to its last number
        end = seg[-1].end
        if _PERCENT_RE.match(text, end):
            return None
        if end < len(text) and not text[end].isspace():
            before_digit = text[end] in ".,:" and end + 1 < len(text) and text[end + 1].isdigit()
            if text[end] not in _SAFE_AFTER or before_digit:
                return None
    return seg


def _check(left: list[_Tok], right: list[_Tok]) -> tuple[bool, str]:
    """(checked, the message if wrong): left's value against right, as a number (with rounding), as an
    expression, or as a running total whose first number is left's value ("3 * 4 = 12 + 1")."""
    try:
        value, claim = _value(left), _value(right)
    except _NotExpression:
        return False, ""
    sign = right[0].kind == "-" and len(right) == 2
    if [t.kind for t in right[sign:]] == ["num"]:
        right_ok = _close(value, claim, _decimals(right[-1]))
    else:
        right_ok = _close(value, claim, None)
        if right[0].kind == "num" and len(right) > 1 and right[1].kind in _OPERATORS:
            right_ok = right_ok or _close(value, right[0].value, _decimals(right[0]))
    return True, "" if right_ok else f"{_written(left)} = {_show(value)}, not {_written(right)}"


def equation_errors(step: str) -> tuple[list[str], bool]:
    """(one "<expr> = <value>, not <claimed>" per wrong equation of the step, whether it had any equation
    that could be checked). GSM8K's calculator notes <<48/2=24>> are checked as equations of their own;
    the text around them is read without them ("48/2 = <<48/2=24>>24" also checks 48/2 = 24)."""
    text = _BULLET_RE.sub("", _MARKUP_RE.sub(lambda m: _MARKUP[m.group()], step[:_MAX_CHARS]))
    notes = [f"{a}={b}" for a, b in _NOTE_RE.findall(text)]
    text = "\n".join([_NOTE_RE.sub("", text)] + notes)
    toks = _tokens(text) + [_Tok("break", "", len(text), len(text))]
    wrong, checked, run = [], False, []
    for tok in toks:
        if tok.kind != "break":
            run.append(tok)
            continue
        segs = [[]]  # the run cut at its "=" signs
        for t in run:
            if t.kind == "=":
                segs.append([])
            else:
                segs[-1].append(t)
        for i in range(1, len(segs)):
            left = _left_side(segs[i - 1], text, opens_run=i == 1)
            right = _right_side(segs[i], text, ends_run=i == len(segs) - 1)
            if left is not None and right is not None:
                ok, message = _check(left, right)
                checked = checked or ok
                if message and message not in wrong:  # a note and its text make the same error once
                    wrong.append(message)
        run = []
    return wrong, checked


if __name__ == "__main__":
    print(equation_errors(" ".join(sys.argv[1:]) or "2 + 3 * 4 = 20, and 48/2 = <<48/2=24>>24"))
