import threading
import time

import pytest
import torch

import rewards as R
from answers import extract_answer, is_correct, parse_number, reference_answer

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
GOOD = "<reasoning>\n48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>\n"


# --- extraction ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<answer>72</answer>", "72"),
    ("<answer>1</answer> then <answer>\n2\n</answer>", "2"),  # last tag wins
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{3} no, \\boxed{4}", "4"),
    ("\\boxed{x #### 4", "4"),  # an unclosed box is no answer: fall through to the next rule
    ("work\n#### $5.00\nmore", "$5.00"),
    ("The answer is 18 dollars.", "18 dollars"),
    ("the answer is: 3.5. Done.", "3.5"),
    ("so she has 3 + 4 = 7 apples", "7"),
    ("she owes -12 dollars", "-12"),
    ("10-3", "3"),  # a minus glued to a number is subtraction, not a sign
    ("no numbers here", None),
    ("<answer>  </answer>", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_priority():
    assert extract_answer("\\boxed{1} #### 2 <answer>3</answer>") == "3"
    assert extract_answer("#### 2 and \\boxed{1}") == "1"
    assert extract_answer("The answer is 5\n#### 6") == "6"


def test_reference_answer():
    assert reference_answer(GSM8K_ANSWER) == "72"
    assert reference_answer("  1234 ") == "1234"


@pytest.mark.parametrize("text, expected", [
    ("$1,234.50", 1234.5), ("-7", -7.0), ("+7", 7.0), ("72 dollars", 72.0), ("5 apples", 5.0),
    ("18%", 18.0), ("3.50", 3.5), (".5", 0.5), ("3/4", 0.75), ("7.", 7.0), ("\\$5", 5.0),
    ("abc", None), ("", None), ("3 + 4", None), ("1,23", None), ("1/0", None), ("x = 5", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# --- the checker --------------------------------------------------------------

@pytest.mark.parametrize("completion, answer", [
    ("<answer>72</answer>", GSM8K_ANSWER),
    ("\\boxed{1,234}", "1234"),
    ("#### $5.00", "5"),
    ("The answer is 18 dollars.", "#### 18"),
    ("so she has 3 + 4 = 7 apples", "7"),
    ("<answer>-3</answer>", "#### -3"),
    ("<answer>3.50</answer>", "3.5"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),  # not a plain number: math-verify decides
    ("<answer>x = 5</answer>", "5"),  # math-verify accepts an assignment to the right value
    ("<answer>1</answer> <answer>72</answer>", GSM8K_ANSWER),
])
def test_is_correct_true(completion, answer):
    assert is_correct(completion, answer)


@pytest.mark.parametrize("completion, answer", [
    ("<answer>71</answer>", GSM8K_ANSWER),
    ("<answer>72</answer> <answer>1</answer>", GSM8K_ANSWER),
    ("<answer>3</answer>", "#### -3"),
    ("<answer>3.51</answer>", "3.5"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("I do not know", "7"),
    ("<answer>seventy-two</answer>", "72"),
    ("", "72"),
])
def test_is_correct_false(completion, answer):
    assert not is_correct(completion, answer)


@pytest.mark.parametrize("pred, ref, correct", [
    # decimals compare exactly, however large: no relative tolerance
    ("2880000.5", "2880000", False), ("2,880,000.5", "2,880,000", False), ("1000000.000001", "1000000", False),
    ("12345678901234567890", "12345678901234567891", False),  # one float apart: floats would call them equal
    ("$1,234.50", "1234.5", True), ("72.0", "72", True), ("7.", "7", True), ("-0.0", "0", True), ("18%", "18", True),
    # a fraction equals a decimal or fraction of the same value
    ("3/4", "0.75", True), ("0.75", "3/4", True), ("2/6", "1/3", True), (".5", "1/2", True), ("2/3", "0.6", False),
    # a fraction that can be written out in full must be: no rounding accepted
    ("0.8", "3/4", False), ("1", "3/4", False), ("0.13", "1/8", False), ("0.12", "1/8", False),
    # a fraction whose decimals never end: the decimal is that fraction rounded to the decimals written
    ("0.33", "1/3", True), ("0.3333", "1/3", True), ("1/3", "0.333", True), ("0.3", "1/3", True),
    ("0.34", "1/3", False), ("0.3330", "1/3", False), ("0", "1/3", False), ("0.67", "2/3", True),
    ("0.66", "2/3", False), ("0." + "3" * 100, "1/3", True), ("0." + "3" * 101, "1/3", False),  # 100 decimals at most
    ("-0.33", "-1/3", True), ("0.33", "-1/3", False), ("$3.33", "10/3", True), ("3.34", "10/3", False),
])
def test_is_correct_compares_numbers_exactly(pred, ref, correct):
    assert is_correct(f"<answer>{pred}</answer>", f"#### {ref}") is correct


def test_is_correct_off_main_thread():
    # math-verify's signal-based timeout raises outside the main thread unless it is disabled
    results = []
    worker = threading.Thread(target=lambda: results.append(is_correct("\\boxed{\\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join()
    assert results == [True]


def test_is_correct_survives_huge_power():
    # sympy would try to evaluate this forever; the main-thread timeout gives up after ~1 s
    start = time.perf_counter()
    assert not is_correct("\\boxed{9^{9^{9^{9}}}}", "5")
    assert time.perf_counter() - start < 3.0


# --- reward functions ---------------------------------------------------------

def test_correctness():
    assert R.correctness(GOOD, GSM8K_ANSWER) == 1.0
    assert R.correctness(GOOD.replace("72", "70"), GSM8K_ANSWER, extra="ignored") == 0.0


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    (GOOD.rstrip() + "  \n\n", 1.0),
    ("<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>", 1.0),
    ("<reasoning>a</reasoning>\n<answer>\n72\n</answer>", 0.0),  # missing newlines
    ("hi " + GOOD, 0.0),
    (GOOD + "more text", 0.0),
    ("<reasoning>\nx\n</reasoning>\n\n<answer>\n72\n</answer>", 0.0),
])
def test_strict_format(text, expected):
    assert R.strict_format(text, "72") == expected


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    ("Sure. <reasoning>a\nb</reasoning>  \n <answer>72</answer> bye", 1.0),
    ("<reasoning>a</reasoning> x </reasoning> <answer>7</answer>", 1.0),  # a later close tag works
    ("<reasoning>a</reasoning> text <answer>72</answer>", 0.0),
    ("<answer>72</answer><reasoning>a</reasoning>", 0.0),
    ("<reasoning>a</reasoning><answer>72", 0.0),
    ("72", 0.0),
])
def test_soft_format(text, expected):
    assert R.soft_format(text, "72") == expected


@pytest.mark.parametrize("text, expected", [
    ("<answer>72</answer>", 1.0), ("<answer>-1,234</answer>", 1.0), ("\\boxed{+5}", 1.0),
    ("<answer>72.5</answer>", 0.0), ("<answer>72 apples</answer>", 0.0),
    ("\\boxed{\\frac{1}{2}}", 0.0), ("nothing", 0.0),
])
def test_integer_answer(text, expected):
    assert R.integer_answer(text, "72") == expected


# what SmolLM2-135M-Instruct wrote to "What is 86 + 87?" (and its kin) before and during training
@pytest.mark.parametrize("text, expected", [
    ("173", 1.0), (" 173\n", 1.0), ("173.", 1.0), ("**173**", 1.0), ("`173`", 1.0), ("$173$", 1.0),
    ("**173.**", 1.0), ("1,234", 1.0), ("-3", 1.0), ("2.5", 1.0),
    ("86 + 87 = 173", 0.0), ("The answer is 173.", 0.0), ("173 apples", 0.0), ("To add 86 and 87, we", 0.0),
    ("1 7 3", 0.0), ("173\n\n174", 0.0), ("**", 0.0), ("$$", 0.0), ("", 0.0), ("- 173", 0.0),
])
def test_bare_number(text, expected):
    assert R.bare_number(text, "999") == expected  # the layout alone: a wrong sum is still a bare number


# --- batch scoring ------------------------------------------------------------

def test_score_shape_order_and_total():
    texts = [GOOD, "<answer>70</answer>", "nothing"]
    weights = {"soft_format": 0.5, "correctness": 2.0}
    values, names, _ = R.score(texts, [GSM8K_ANSWER] * 3, [{}] * 3, weights)
    assert names == ["soft_format", "correctness"]
    assert values.dtype == torch.float32 and values.shape == (3, 2)
    assert values.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert R.total(values, names, weights).tolist() == [2.5, 0.0, 0.0]


def test_score_empty_batch():
    values, names, _ = R.score([], [], [], {"correctness": 1.0})
    assert values.shape == (0, 1) and names == ["correctness"]


def call(name, text, answer="5"):
    """Any registered reward the way rewards.score calls it: default settings and a rollout's info."""
    import config
    answer = {"judge_pointwise": "3", "judge_pairwise": "A"}.get(name, answer)
    return R.REWARDS[name](text, answer, **R.settings(config.Config()), completion_len=5,
                           anything=1)


def test_registry_signature():
    for name in R.REWARDS:
        assert isinstance(call(name, "<answer>1</answer>", "1"), float)
    for name in ("correctness", "strict_format", "soft_format", "integer_answer"):
        assert R.REWARDS[name]("<answer>1</answer>", "1", anything=1) in (0.0, 1.0)


def test_check_names():
    R.check_names({"correctness": 1.0, "soft_format": 0.1})
    with pytest.raises(ValueError) as err:
        R.check_names({"correctnes": 1.0})
    assert "correctnes" in str(err.value) and "'correctness'" in str(err.value)
    with pytest.raises(ValueError):
        R.score(["x"], ["1"], [{}], {"nope": 1.0})


# --- adversarial model output -------------------------------------------------

ADVERSARIAL = [
    "<answer>" * 10000,
    "1," * 25000,
    "\\boxed{" * 5000,
    "\\boxed{" + "(" * 50000 + "}",
    "<reasoning>" * 5000,
    "<reasoning>\n" + "\n</reasoning>\n<answer>\n" * 2500,
    "<reasoning>" + "</reasoning> <answer>" * 2500,
    "the answer is " * 4000,
    "####" * 12500,
    "<answer>" + " " * 50000 + "1",
    "-" * 50000,
    "0." + "3" * 50000,  # rounded against a reference 1/3 below
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=lambda t: repr(t[:16]))
def test_adversarial_inputs_are_fast(text):
    for fn in [extract_answer, lambda t: is_correct(t, "5"), lambda t: is_correct(t, "1/3"), *[
            lambda t, name=name: call(name, t) for name in R.REWARDS]]:
        start = time.perf_counter()
        fn(text)
        assert time.perf_counter() - start < 1.0


def test_a_reward_that_raises_scores_zero_and_is_counted(monkeypatch, capsys):
    def broken(completion, answer, **info):
        if "boom" in completion:
            raise RuntimeError("bad input")
        return 1.0
    monkeypatch.setitem(R.REWARDS, "broken", broken)
    monkeypatch.setattr(R, "_REPORTED", set())
    texts = ["boom", "fine", "boom again"]
    values, names, errors = R.score(texts, ["1"] * 3, [{}] * 3, {"broken": 1.0, "correctness": 1.0})
    assert values[:, 0].tolist() == [0.0, 1.0, 0.0] and errors == {"broken": 2, "correctness": 0}
    assert capsys.readouterr().err.count("reward 'broken' raised RuntimeError: bad input") == 1  # once
