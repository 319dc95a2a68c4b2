"""Reasoning, judge, length and verifier rewards on hand-written and adversarial completions."""
import time

import pytest

import config
import judge_rewards as J
import rewards as R

S = R.settings(config.Config())  # think_fault_penalty 0.5, think_min_chars 200, ...
GOOD = "<think>\nfirst 48 / 2 = 24, then 48 + 24 = 72\n</think>\n<answer>\n72\n</answer>"


# --- think/answer format ------------------------------------------------------

@pytest.mark.parametrize("text, faults", [
    (GOOD, 0),
    ("  <think>x</think><answer>y</answer>\n", 0),  # whitespace around and between is fine
    ("<think>x</think> so <answer>y</answer>", 1),  # text between the blocks
    ("Sure! <think>x</think><answer>y</answer> bye", 2),  # text before and after
    ("<think>x</think><answer>y</answer><answer>z</answer>", 2),  # <answer> and </answer> repeated
    ("<think>x<answer>y</answer>", 1),  # </think> missing
    ("<answer>y</answer><think>x</think>", 1),  # answer before think
    ("</think>x<think><answer>y</answer>", 1),  # closing before opening: out of order
    ("just an answer: 72", 5),  # every tag missing, and text outside them
    ("", 4),
    ("<think><think>x</think></think><answer>y</answer>", 2),  # nested: both think tags repeated
])
def test_think_format_counts_faults(text, faults):
    assert R.think_format(text, "72", **S) == pytest.approx(-0.5 * faults)
    assert R.think_format(text, "72", think_fault_penalty=2.0) == pytest.approx(-2.0 * faults)


@pytest.mark.parametrize("think, expected", [
    ("", -0.5), ("x" * 50, -0.5 * 0.75), ("x" * 200, 0.0), ("x" * 5000, 0.0), (None, -0.5),
])
def test_short_think_ramps_to_zero(think, expected):
    text = f"<think>{think}</think><answer>1</answer>" if think is not None else "<answer>1</answer>"
    assert R.short_think(text, "1", **S) == pytest.approx(expected)
    assert R.short_think(text, "1", think_min_chars=0, think_short_penalty=1.0) == 0.0  # switched off


@pytest.mark.parametrize("text, answer, expected", [
    (GOOD, "#### 72", 2.0),
    ("<think>x</think><answer> Paris </answer>", "paris", 2.0),  # case-insensitive, stripped
    ("<think>x</think><answer>The capital is Paris.</answer>", "Paris", 1.0),  # contained
    ("<answer>$72</answer>", "72", 1.0),
    ("<answer>172</answer>", "72", -1.0),  # a digit glued on is not the reference
    ("<answer>Parisian</answer>", "Paris", -1.0),
    ("<answer>71</answer>", "72", -1.0),
    ("<answer></answer>", "72", -1.0),  # empty answer
    ("<answer>anything</answer>", "", -1.0),  # an empty reference matches nothing
    ("72", "72", -1.0),  # no tags
    ("<answer>1</answer> then <answer>72</answer>", "72", 2.0),  # the last answer counts
])
def test_think_answer_exact_contains_wrong(text, answer, expected):
    assert R.think_answer(text, answer, **S) == expected


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    ("\n" + GOOD + "\n\n", 1.0),
    ("<think>x</think><answer>72</answer>", 0.0),  # the strict pattern wants the newlines
    ("<think>\nx\n</think>\n\n<answer>\n72\n</answer>", 0.0),
    ("<think>\nx\n</think>\n<answer>\n72\n</answer>\n<answer>\n1\n</answer>", 0.0),
    ("<think>\n<think>\n</think>\n<answer>\n72\n</answer>", 0.0),  # a tag twice
    ("hi\n" + GOOD, 0.0),
])
def test_r1_format_is_strict(text, expected):
    assert R.r1_format(text, "72") == expected


@pytest.mark.parametrize("length, expected", [(0, 0.0), (100, 0.0), (112, 0.0), (120, -0.5), (127, -15 / 16),
                                              (128, -1.0), (500, -1.0)])
def test_overlong_ramps_to_minus_one(length, expected):
    kw = dict(max_completion_tokens=128, overlong_buffer_tokens=16)
    assert R.overlong("x", "1", completion_len=length, **kw) == pytest.approx(expected)


def test_overlong_with_no_buffer_is_a_step():
    assert R.overlong("x", "1", completion_len=127, max_completion_tokens=128, overlong_buffer_tokens=0) == 0.0
    assert R.overlong("x", "1", completion_len=128, max_completion_tokens=128, overlong_buffer_tokens=0) == -1.0


def test_overlong_reads_completion_len_through_score():
    values, _, errors = R.score(["a", "b"], ["1", "1"], [{"completion_len": 10}, {"completion_len": 786}],
                                {"overlong": 1.0}, S)
    assert values[:, 0].tolist() == [0.0, -1.0] and errors == {"overlong": 0}


def test_rewards_get_the_completion_budget_under_its_config_name(monkeypatch):
    """Any reward, not only overlong, reads the budget as max_completion_tokens."""
    monkeypatch.setitem(R.REWARDS, "budget_share",
                        lambda completion, answer, *, completion_len, max_completion_tokens, **info:
                        completion_len / max_completion_tokens)
    settings = R.settings(config.Config(max_completion_tokens=40))
    values, _, errors = R.score(["a"], ["1"], [{"completion_len": 10}], {"budget_share": 1.0}, settings)
    assert values[0, 0].item() == 0.25 and errors == {"budget_share": 0}


def test_verifier_score_reads_info():
    assert R.verifier_score("x", "1", verifier_scored=2, verifier_hallucination_score=1.0) == 0.0  # all mistakes
    assert R.verifier_score("x", "1", verifier_scored=4, verifier_hallucination_score=0.25, completion_len=3) == 0.75
    assert R.verifier_score("x", "1", verifier_scored=1, verifier_hallucination_score=0.0) == 1.0


def test_verifier_score_pays_nothing_for_an_unscored_conversation():
    # verifier.py sets hallucination score 0.5 when it got no [SCORE] line: that must not beat a checked mistake
    assert R.verifier_score("x", "1", verifier_scored=0, verifier_hallucination_score=0.5) == 0.0
    assert R.verifier_score("x", "1", verifier_hallucination_score=0.5) == 0.0  # verifier_scored missing
    assert R.verifier_score("x", "1") == 0.0
    infos = [{"verifier_scored": 0, "verifier_hallucination_score": 0.5},
             {"verifier_scored": 3, "verifier_hallucination_score": 1.0},
             {"verifier_scored": 3, "verifier_hallucination_score": 1 / 3}]
    values, _, errors = R.score(["a", "b", "c"], ["1"] * 3, infos, {"verifier_score": 1.0}, S)
    assert values[:, 0].tolist() == pytest.approx([0.0, 0.0, 2 / 3]) and errors == {"verifier_score": 0}


# --- judges -------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>fine</think><score>3</score>", 3),
    ("<score> 0 </score>", 0),
    ("<score>score: 4/4</score>", 4),  # the first integer counts
    ("<think><score>1</score></think><score>2</score>", 2),  # scores inside think are ignored
    ("<think>unclosed <score>4</score>", None),
    ("reasoning...</think><score>1</score>", 1),  # a template opened the think
    ("<score>5</score>", None), ("<score>-1</score>", None), ("<score>3.5</score>", None),
    ("<score>04</score>", 4), ("<score>" + "9" * 10000 + "</score>", None),
    ("<score>three</score>", None), ("<score>3", None), ("score: 3", None), ("", None),
])
def test_parse_score(text, expected):
    assert J.parse_score(text) == expected


@pytest.mark.parametrize("text, label, expected", [
    ("<score>0</score>", "0", 1.0), ("<score>1</score>", "0", 0.0), ("<score>0</score>", "1", 0.0),
    ("<score>1</score>", "1", 1.0), ("<score>4</score>", "4", 1.0), ("<score>3</score>", "4", 0.75),
    ("<score>0</score>", "4", 0.0), ("<score>4</score>", "2", 0.5), ("<score>1</score>", "3", 0.5),
    # an unparseable verdict earns nothing, on label 0 in particular
    ("no verdict", "0", 0.0), ("<score>zero</score>", "0", 0.0), ("<score>9</score>", "0", 0.0),
    ("no verdict", "3", 0.0),
])
def test_judge_pointwise(text, label, expected):
    assert J.judge_pointwise(text, label) == expected


@pytest.mark.parametrize("text, expected", [
    ("<think>B is vague</think><better>A</better>", "A"),
    ("<better> b </better>", "B"), ("<better>Response A</better>", "A"), ("<better>**B**</better>", "B"),
    ("<better>A or B</better>", None), ("<better>neither</better>", None),
    ("<think>I prefer B</think>\n<better>A</better>", "A"),  # think ignored
    ("Comparing them.\nResponse B is better.", "B"),  # fallback: last lines
    ("B looks right.\nFinal: A\n\n", "A"),  # the last line that names one letter wins
    ("Response A and Response B are both fine.", None),
    ("a long analysis\n" * 5 + "the end", None),  # lowercase "a" is an article, not a verdict
    ("Verdict: B\n" + "more text\n" * 5, None),  # too far from the end
    ("<better>A", "A"),  # an unclosed tag falls back to the last line
    ("", None),
])
def test_parse_preference(text, expected):
    assert J.parse_preference(text) == expected


def test_judge_pairwise_and_bad_labels():
    assert J.judge_pairwise("<better>A</better>", "A") == 1.0
    assert J.judge_pairwise("<better>A</better>", " b ") == 0.0
    assert J.judge_pairwise("nothing", "A") == 0.0
    with pytest.raises(ValueError, match="not A or B"):
        J.judge_pairwise("<better>A</better>", "C")
    with pytest.raises(ValueError, match="not in 0..4"):
        J.judge_pointwise("<score>1</score>", "7")


# --- adversarial model output: every reward returns quickly -------------------

ADVERSARIAL = [
    "", " " * 100_000, "<think>" * 20_000, "</think>" * 20_000, "<think></think>" * 10_000,
    "<think>" * 5_000 + "</think>" * 5_000, "<answer>" * 20_000 + "</answer>",
    "<think>\n" + "\n</think>\n<answer>\n" * 5_000 + "\n</answer>", "<score>" * 20_000,
    "<score>" + "9" * 200_000 + "</score>", "<score>" + "+-" * 50_000 + "</score>",
    "<score>" + "1." * 50_000 + "</score>", "<better>" * 20_000 + "A", "<better>" + "AB" * 50_000 + "</better>",
    "A\n" * 100_000, "a" * 200_000, "7" * 200_000, "<think>" + "x" * 200_000,
    "<answer>" + "72 " * 50_000 + "</answer>", "<answer>" + "7" * 100_000 + "</answer>",
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=lambda t: f"{t[:12]!r}x{len(t)}")
def test_every_reward_is_fast_on_adversarial_input(text):
    labels = {"judge_pointwise": "3", "judge_pairwise": "A"}
    for name, fn in R.REWARDS.items():
        for answer in (labels.get(name, "72"), labels.get(name, "7" * 1000)):
            start = time.perf_counter()
            value = fn(text, answer, **S, completion_len=len(text))
            assert isinstance(value, float)
            assert time.perf_counter() - start < 1.0, name
