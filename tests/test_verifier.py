"""Verifier turns: reply parsing, the rules verifier, the turn loop and its masks, the three backends,
a real `verifier.py serve` subprocess, a faulty server, and training runs with --sampler verifier."""
import functools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from decimal import Decimal
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import equations
import config
import guidance
import llms
import rewards
import rollout
import samplers
import verifier
import verifier_backends as vb
from helpers import FAST, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP = vb.STOP


# ----------------------------------------------------------------------------------------------
# replies, final answers, the rules verifier


@pytest.mark.parametrize("reply, expected", [
    ("Wrong: 3 + 4 = 7.\n[SCORE] hallucination_detect=1", ("Wrong: 3 + 4 = 7.", False, 1)),
    (f"{STOP}\n[SCORE] hallucination_detect=0\n", ("", True, 0)),
    (STOP, ("", True, None)),
    ("Looks fine. [score]  HALLUCINATION_DETECT = 0 ", ("Looks fine.", False, 0)),  # inline, any case
    ("[SCORE] hallucination_detect=1\n[SCORE] hallucination_detect=0", ("", False, 0)),  # the last one counts
    # malformed score lines give no score, and are never shown to the policy
    ("Hint.\n[SCORE] hallucination_detect=2", ("Hint.", False, None)),
    ("Hint.\n[SCORE] hallucination_detect=yes", ("Hint.", False, None)),
    ("[SCORE]\nHint.", ("Hint.", False, None)),
    ("[SCORE] halluc=1 ###STOP###", ("", False, None)),  # a STOP inside a score line is part of that line
    ("[SCORE] hallucination_detect=1\n[SCORE] hallucination_detect=oops", ("", False, 1)),
    ("", ("", False, None)),
])
def test_parse_reply(reply, expected):
    assert verifier.parse_reply(reply) == expected


# What instruct models write (issue: markdown replies became fake corrections and lost their scores)
@pytest.mark.parametrize("reply, expected", [
    ("**[SCORE] hallucination_detect=0**", ("", False, 0)),
    ("`[SCORE] hallucination_detect=1`", ("", False, 1)),
    ("[SCORE]: hallucination_detect = 1", ("", False, 1)),
    ("[SCORE] hallucination_detect=1.", ("", False, 1)),
    ("Score: hallucination_detect=0", ("", False, 0)),
    ("**Score:** hallucination_detect = 1", ("", False, 1)),
    ("- [SCORE] hallucination_detect=0", ("", False, 0)),
    ("hallucination_detect = 1.", ("", False, 1)),
    ("[SCORE]\uff1ahallucination_detect\uff1d1\u3002", ("", False, 1)),  # full-width colon, equals, stop
    (f"**{STOP}**", ("", True, None)),
    (f"`{STOP}`\n**[SCORE] hallucination_detect=0**", ("", True, 0)),
    ("### STOP ###", ("", True, None)),
    ("**Mistake:** 3 + 4 = 7, not 8.\n\n**[SCORE] hallucination_detect=1**",
     ("Mistake: 3 + 4 = 7, not 8.", False, 1)),
    ("- The step multiplies wrongly: 3 * 4 = 12, not 14.\n- [SCORE] hallucination_detect=1",
     ("The step multiplies wrongly: 3 * 4 = 12, not 14.", False, 1)),  # a spaced * stays multiplication
    ("1. Check `12 / 4`: it is 3, not 4.\n2. Score: hallucination_detect=1",
     ("Check 12 / 4: it is 3, not 4.", False, 1)),
    ("**\n[SCORE] hallucination_detect=0\n**", ("", False, 0)),  # markers alone correct nothing
    ("---\n`7`\n...", ("", False, None)),  # no word: no correction
    ("\u6b65\u9aa4\u6709\u8bef\uff1a3 + 4 = 7\u3002\n[SCORE] hallucination_detect=1",
     ("\u6b65\u9aa4\u6709\u8bef\uff1a3 + 4 = 7\u3002", False, 1)),  # Chinese words are words
    ("*Correct so far.* [SCORE] hallucination_detect=0", ("Correct so far.", False, 0)),
    ("The answer is *right*. ###STOP### \n[SCORE] hallucination_detect=0", ("The answer is right.", True, 0)),
    ("Score: high", ("", False, None)),  # a malformed score line is cut, never shown to the policy
    ("The score of 3 + 4 is 7.", ("The score of 3 + 4 is 7.", False, None)),  # prose that mentions a score
])
def test_parse_reply_reads_markdown(reply, expected):
    assert verifier.parse_reply(reply) == expected


def test_a_markdown_score_only_verifier_corrects_nothing(tiny, monkeypatch):
    """A verifier that only ever answers a score line in markdown: no corrections, every score read."""
    model, tok = tiny
    scripted_policy(monkeypatch, tok, ["3 + 4 = 7.\n", "So 7 pens.\n", "#### 7<eos>"])
    r = run(model, tok, Scripted("**[SCORE] hallucination_detect=0**"))
    for d in r.info:
        assert d["verifier_corrections"] == 0 and d["verifier_calls"] == 3
        assert d["verifier_hallucination_score"] == 0.0  # scored, not the neutral 0.5


def test_has_final_answer():
    assert rewards.has_final_answer("3 + 4 = 7.\n#### 7")
    assert rewards.has_final_answer("<answer>\n7\n</answer>") and rewards.has_final_answer("so \\boxed{7}")
    assert rewards.has_final_answer("So the answer is 7.")
    assert not rewards.has_final_answer("3 + 4 = 7.")  # a last number alone is no stated answer
    assert not rewards.has_final_answer("####")
    assert rewards.has_final_answer(" 85\n\n") and rewards.has_final_answer("**1,234**.")  # the answer alone
    assert not rewards.has_final_answer("47 + 38 = 85") and not rewards.has_final_answer("")


@pytest.mark.parametrize("steps, answer, expected", [
    (["3 + 4 = 7.\n"], "7", "[SCORE] hallucination_detect=0"),  # right, unfinished: score only
    (["3 + 4 = 8.\n"], "7", "3 + 4 = 7, not 8.\n[SCORE] hallucination_detect=1"),
    (["5 * 3 = 15, 15 - 4 = 12.\n"], "11", "15 - 4 = 11, not 12.\n[SCORE] hallucination_detect=1"),
    (["12 / 4 = 3 and 2 x 3 = 7"], "7", "2 x 3 = 6, not 7.\n[SCORE] hallucination_detect=1"),
    (["3 + 4 = 7.\n", "#### 7"], "7", f"{STOP}\n[SCORE] hallucination_detect=0"),
    (["3 + 4 = 7.\n#### 7"], "7", f"{STOP}\n[SCORE] hallucination_detect=0"),
    (["3 + 4 = 7.\n", "#### 9"], "7", "Your final answer is wrong.\n[SCORE] hallucination_detect=1"),
    (["Tom has apples.\n"], "7", ""),  # nothing to check: no feedback, no score
    ([" 85\n\n"], "85", f"{STOP}\n[SCORE] hallucination_detect=0"),  # a bare number is the answer
    ([" 73\n\n"], "85", "Your final answer is wrong.\n[SCORE] hallucination_detect=1"),
    ([" 73\n\n", " 85\n\n"], "85", f"{STOP}\n[SCORE] hallucination_detect=0"),  # the second try
    (["1 / 0 = 5"], "7", ""),
])
def test_rules_reply(steps, answer, expected):
    assert vb.rules_reply(answer, steps) == expected
    assert vb.RulesVerifier()([vb.Job("q", answer, steps)]) == [expected]


# What real work looks like (issue: only "a op b = c" pieces were checked, so "2 + 3 + 4 = 9" was flagged
# as "3 + 4 = 7, not 9" and "1,234 + 6 = 1,240" as "234 + 6 = 240, not 1")
@pytest.mark.parametrize("step, wrong", [
    ("2 + 3 + 4 = 9", []),
    ("1,234 + 6 = 1,240", []),
    ("$1,234 + $6 = $1,240", []),
    ("2 + 3 * 4 = 14", []),  # precedence
    ("(2 + 3) * 4 = 20", []),
    ("10 ÷ 4 = 2.5", []),
    ("3 x 4 = 12, 3x4=12, 3 × 4 = 12 and 3 * 4 = 12", []),
    ("<<48/2=24>>", []),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", []),
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.", []),
    ("1/3 = 0.33 and 2/3 = 0.667 and 20 / 3 = 6.67", []),  # rounded to the decimals written
    ("3 + 4 = **7**, so **5 * 3 = 15**", []),  # markdown bold
    ("- 3 + 4 = 7\n* 2 * 3 = 6", []),  # list markers are no signs
    ("1) 3 + 4 = 7 (since 3 + 4 = 7)", []),
    ("3 * 4 = 12 = 12", []),  # a chain: each "=" against the expression on its left
    ("3 * 4 = 12 + 1 = 13", []),  # a running total
    ("3 * 8 = 12 * 2", []),  # an expression on the right
    ("5 - 8 = -3, -3 + 5 = 2, 1/2 + 1/4 = 3/4, 0.1 + 0.2 = 0.3", []),  # exact: no float rounding error
    ("\\( 12 \\times 50 = 600 \\) and $48 \\div 2 = 24$", []),  # LaTeX
    ("2 + 3 + 4 = 10", ["2 + 3 + 4 = 9, not 10"]),
    ("$1,234 + $6 = $1,250", ["$1,234 + $6 = 1240, not $1,250"]),
    ("2 + 3 * 4 = 20", ["2 + 3 * 4 = 14, not 20"]),
    ("(2 + 3) * 4 = 14", ["(2 + 3) * 4 = 20, not 14"]),
    ("10 ÷ 4 = 2.4", ["10 ÷ 4 = 2.5, not 2.4"]),
    ("3 x 4 = 13", ["3 x 4 = 12, not 13"]),
    ("Natalia sold 48/2 = <<48/2=25>>25 clips.", ["48 / 2 = 24, not 25"]),  # the note and its text: once
    ("1/3 = 0.34", ["1 / 3 = 0.333333, not 0.34"]),
    ("3 * 4 = 12 + 1 = 14", ["12 + 1 = 13, not 14"]),
    ("3 * 4 = 12 = 13", ["12 = 12, not 13"]),
    ("**12 - 5 = 8**", ["12 - 5 = 7, not 8"]),
    ("5 - 8 = 3", ["5 - 8 = -3, not 3"]),
])
def test_rules_check_whole_expressions(step, wrong):
    reply = vb.rules_reply("7", [step])
    assert reply == ("; ".join(wrong) + ".\n[SCORE] hallucination_detect=1" if wrong
                     else "[SCORE] hallucination_detect=0")
    assert equations.equation_errors(step) == (wrong, True)


# Nothing here can be read for sure as a true or false equation: none is checked, none flagged
@pytest.mark.parametrize("step", [
    "6 boxes = 12", "Step 1 = 7", "x + 3 = 5", "2 x = 10", "a2 + 1 = 3", "2^3 + 1 = 9", "3 ** 2 = 9",
    "3/4 = 75%", "3 / 4 = 75 percent", "2,5 * 2 = 5", "50% * 4 + 1 = 3", "10:30 + 2 = 12:30", "2(3 + 4) = 14",
    "3/2 = 1 1/2", "1 / 0 = 5", "10 apples - 3 + 4 = 11", "2 hours * 60 = 120 minutes", "3 + 4 = 7km",
])
def test_rules_skip_what_they_cannot_read(step):
    assert vb.rules_reply("7", [step]) == ""
    assert equations.equation_errors(step) == ([], False)


def test_rules_random_chains():
    """True chains of 2-5 numbers (+ - * /, sometimes a parenthesis, as students spell them) are never
    flagged; the same chain with its result off by one always is, with the right value."""
    rng = random.Random(0)
    spellings = {"+": ["+"], "-": ["-", "\u2212"], "*": ["*", "x", "×"], "/": ["/", "÷"]}
    checked = 0
    while checked < 500:
        n = rng.randint(2, 5)
        nums = [rng.choice([rng.randint(1, 12), rng.randint(1, 2500)]) for _ in range(n)]
        ops = [rng.choice("+-*/") for _ in range(n - 1)]
        python, written = [f"Fraction({nums[0]})"], [f"{nums[0]:,}" if rng.random() < 0.5 else str(nums[0])]
        for op, x in zip(ops, nums[1:]):
            python += [op, f"Fraction({x})"]
            written += [rng.choice(spellings[op]), f"${x:,}" if rng.random() < 0.2 else str(x)]
        if n > 2 and rng.random() < 0.3:  # a parenthesis around two numbers and their operator
            i = 2 * rng.randrange(n - 1)
            python[i], python[i + 2] = "(" + python[i], python[i + 2] + ")"
            written[i], written[i + 2] = "(" + written[i], written[i + 2] + ")"
        try:
            value = eval(" ".join(python), {"Fraction": Fraction})  # the test's reference: Python's arithmetic
        except ZeroDivisionError:
            continue
        if all((value * 10 ** d).denominator != 1 for d in range(7)):  # 1/3: no exact decimal to write
            continue
        sep = rng.choice([" ", ""])

        def line(result):  # the result written exactly (at most 6 decimals, 23 digits: Decimal's 28 suffice)
            return f"So {sep.join(written)}{sep}={sep}{Decimal(result.numerator) / result.denominator:f} apples."
        assert vb.rules_reply("7", [line(value)]) == "[SCORE] hallucination_detect=0", line(value)
        wrong = vb.rules_reply("7", [line(value + 1)])
        assert wrong.endswith(".\n[SCORE] hallucination_detect=1") and wrong.count(", not ") == 1, line(value + 1)
        assert f" = {equations._show(value)}, not " in wrong, line(value + 1)
        checked += 1


def test_rules_take_bounded_time_on_adversarial_steps():
    t0 = time.perf_counter()
    for step in ["1 + " * 5000 + "= 3", "(" * 10_000 + "1 = 1", "1,000," * 2000 + " = 1", "<<1" * 4000 + "=",
                 "= 1 " * 5000, "x" * 20_000 + " = 3", "9" * 9000 + " * 9 = 1",
                 " * ".join(["9" * 32] * 30) + " / 7 = 1"]:  # long numbers: no 4,300-digit int conversion error
        vb.rules_reply("7", [step])
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------------------------
# turns: cutting, stopping generate early, inserted messages


def test_cut_turn():
    texts = {0: "<eos>", 1: "a", 2: "b", 3: "c", 4: "d", 5: "\n", 6: "x.", 7: "<answer>", 8: "<", 9: " "}
    eos, ends = {0}, {5, 6}  # 5 a bare newline, 6 a "x." token

    def decode(ids):
        return "".join(texts[i] for i in ids)
    assert verifier.cut_turn([1, 2, 6, 3], 10, eos, ends, decode) == ([1, 2, 6], False)
    assert verifier.cut_turn([5, 9, 5, 1, 5, 2], 10, eos, ends, decode) == ([5, 9, 5, 1, 5], False)  # text first
    assert verifier.cut_turn([1, 0, 6], 10, eos, ends, decode) == ([1, 0], True)
    assert verifier.cut_turn([1, 2, 3, 4], 3, eos, ends, decode) == ([1, 2, 3], False)
    assert verifier.cut_turn([1, 6, 3], 10, eos, set(), decode) == ([1, 6, 3], False)  # step_end "eos"
    assert verifier.cut_turn([7, 5, 9, 7, 5, 1, 5], 10, eos, ends, decode) == ([7, 5, 9, 7, 5, 1, 5], False)  # tags
    assert verifier.cut_turn([8, 1, 5, 2], 10, eos, ends, decode) == ([8, 1, 5], False)  # "<a" is no tag


@pytest.mark.parametrize("text, step", [
    ("Tom has 3 pens.", True), ("<reasoning>", False), (" </reasoning>\n<answer>\n", False), ("<think>\n", False),
    ("\n \t\n", False), ("<answer>7", True), ("3 < 4", True), ("<|im_start|>", True), ("<answer", True),
])
def test_is_step(text, step):
    assert verifier.is_step(text) == step


def stops(criteria, context: list[int], rows: list[list[int]], pad: int) -> list[int]:
    """The number of new tokens after which `criteria` first stops each row, called as generate calls it:
    after every new token, with every row of the batch (rows that are done padded); 0: never."""
    width = max(map(len, rows))
    full = torch.tensor([context + row + [pad] * (width - len(row)) for row in rows])
    first = [0] * len(rows)
    for k in range(1, width + 1):
        for r, stop in enumerate(criteria(full[:, :len(context) + k], None).tolist()):
            first[r] = first[r] or (k if stop else 0)
    return first


def test_a_tag_alone_on_a_line_ends_no_turn(tiny):
    """cut_turn and StepEnd cut real-looking turns at the same token, past lines that hold only tags."""
    model, tok = tiny
    eos, decode = set(model.generation_config.eos_token_id), functools.partial(tok.decode, skip_special_tokens=True)
    ends = guidance.boundary_ids(tok, verifier.STEP_ENDS["newline"])
    cases = [("<reasoning>\nTom has 3 + 4 = 7 apples.\nSo 7.\n", "<reasoning>\nTom has 3 + 4 = 7 apples.\n"),
             ("\n \n</reasoning>\n<answer>\n7\n</answer>", "\n \n</reasoning>\n<answer>\n7\n"),
             ("<think>\n\n3 < 4\nso", "<think>\n\n3 < 4\n"),
             ("Tom has 3.\n<answer>\n", "Tom has 3.\n"),
             ("<answer>\n</answer>\n", "<answer>\n</answer>\n")]  # no step at all: the turn runs to its limit
    rows = [tok(text, add_special_tokens=False)["input_ids"] for text, _ in cases]
    cuts = [verifier.cut_turn(row, len(row), eos, ends, decode)[0] for row in rows]
    assert [tok.decode(cut) for cut in cuts] == [turn for _, turn in cases]
    context = tok("Tom has 3 pens.", add_special_tokens=False)["input_ids"]
    step_end = verifier.StepEnd(ends, decode, len(context), torch.tensor([True] * len(rows)))
    expected = [len(cut) if tok.decode(cut) != text else 0 for cut, (text, _) in zip(cuts, cases)]
    assert stops(step_end, context, rows, tok.pad_token_id) == expected


def test_step_end_stops_generate_where_cut_turn_cuts(tiny):
    """Rows stopped early by StepEnd hold the same turns as the same rows generated in full, then cut."""
    model, tok = tiny
    ends = frozenset(range(3, len(tok), 4))  # a quarter of the vocabulary, so that rows stop at different places
    eos, decode = set(model.generation_config.eos_token_id), functools.partial(tok.decode, skip_special_tokens=True)
    ids, mask = rollout.tokenize_prompts(tok, ["Tom has 3 pens.", "Ann has", "He gives away 2. How many"], 64, "cpu")
    active = torch.tensor([True, True, False])  # the last row runs on, as a final turn after a nudge does
    torch.manual_seed(0)
    stopped = rollout.generate(model, ids, mask, max_new_tokens=20, temperature=1.0, stopping_criteria=[
        verifier.StepEnd(ends, decode, ids.shape[1], active)]).tolist()
    torch.manual_seed(0)  # the same draws: rows differ only where StepEnd ended them
    full = rollout.generate(model, ids, mask, max_new_tokens=20, temperature=1.0).tolist()
    for row_stopped, row_full, on in zip(stopped, full, active.tolist()):
        cut, _ = verifier.cut_turn(row_full, 20, eos, ends if on else frozenset(), decode)
        assert verifier.cut_turn(row_stopped, 20, eos, ends if on else frozenset(), decode)[0] == cut
        if on:  # it stopped there: only padding follows
            assert len(cut) < 20 and set(row_stopped[len(cut):]) <= {tok.pad_token_id}


def test_message_ids_follow_the_chat_template(tiny):
    _, tok = tiny
    text = tok.decode(verifier.message_ids(tok, "Check: 3 + 4 = 7.<|im_end|>"))  # template tokens are dropped
    assert text == "<|im_end|>\n<|im_start|>user\nCheck: 3 + 4 = 7.<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------------
# the turn loop with a scripted policy: STOP with and without a final answer, corrections, limits


class Scripted:
    """A verifier backend with canned replies, one per call of each conversation; records its jobs."""

    def __init__(self, *replies):
        self.replies, self.jobs = replies, []

    def __call__(self, jobs, policy, tokenizer):
        self.jobs.append(jobs)
        return [self.replies[min(len(job.steps), len(self.replies)) - 1] for job in jobs]


def scripted_policy(monkeypatch, tok, turns):
    """rollout.generate writes turns[k] (text; "<eos>" is the EOS token) on its k-th call, in every row."""
    calls = []

    def fake(model, ids, mask, *, max_new_tokens, temperature, top_p=1.0, stopping_criteria=None, **settings):
        calls.append(stopping_criteria)
        row = tok(turns[len(calls) - 1].replace("<eos>", "<|im_end|>"), add_special_tokens=False)["input_ids"]
        return torch.tensor([row[:max_new_tokens]] * ids.shape[0])
    monkeypatch.setattr(rollout, "generate", fake)
    return calls


def run(model, tok, backend, max_turns=4, **kw):
    args = dict(max_prompt_tokens=96, max_completion_tokens=48, temperature=1.0, top_p=1.0, turn_tokens=16,
                max_turns=max_turns, step_end="newline", train_on="all", nudge="Please give the final answer.")
    prompt = llms.chat_prompt(tok, "", "Tom has 3 pens. He gets 4 more. How many pens does Tom have now?")
    return verifier.run_turns(model, tok, [prompt], ["Tom has 3 pens. ..."], ["7"], 2, backend=backend,
                              **{**args, **kw})


def trained_text(tok, r, i, trained=True):
    keep = (r.loss_mask[i] > 0) == trained
    return tok.decode(r.input_ids[i][keep & r.attention_mask[i].bool()])


def test_the_sampler_setting_reaches_every_turn_and_scores_are_counted(tiny, monkeypatch):
    model, tok = tiny
    settings = []

    def fake(model, ids, mask, *, max_new_tokens, temperature, top_p=1.0, stopping_criteria=None, **kw):
        settings.append(kw.get("kv_cache"))
        turn = ["3 + 4 = 7.\n", "#### 7<|im_end|>"][len(settings) - 1]
        return torch.tensor([tok(turn, add_special_tokens=False)["input_ids"][:max_new_tokens]] * ids.shape[0])
    monkeypatch.setattr(rollout, "generate", fake)
    r = run(model, tok, vb.RulesVerifier(), kv_cache="static")
    assert settings == ["static", "static"]  # --kv_cache static: every policy turn samples with it
    assert [d["verifier_scored"] for d in r.info] == [2, 2]  # two [SCORE] lines per conversation
    assert verifier.summary(r.info)["verifier/scored_frac"] == 1.0


def test_stop_with_a_final_answer_ends_the_conversation(tiny, monkeypatch):
    model, tok = tiny
    scripted_policy(monkeypatch, tok, ["3 + 4 = 8.\n", "3 + 4 = 7.\n", "#### 7<eos>"])
    r = run(model, tok, vb.RulesVerifier())
    d = r.info[0]
    assert (d["turns"], d["stopped"], d["nudged"], d["final_answer"], d["truncated"]) == (3, True, False, True, False)
    assert d["verifier_corrections"] == 1 and d["verifier_calls"] == 3 and d["verifier_failed"] == 0
    assert d["verifier_hallucination_score"] == pytest.approx(1 / 3)  # scores 1, 0, 0
    assert r.texts[0] == "3 + 4 = 8.\n3 + 4 = 7.\n#### 7"
    # the correction is a user message, masked out; the policy's three turns (EOS included) are trained
    correction = "3 + 4 = 7, not 8."
    assert d["conversation"].endswith(f"3 + 4 = 8.\n<|im_end|>\n<|im_start|>user\n{correction}<|im_end|>\n"
                                      f"<|im_start|>assistant\n3 + 4 = 7.\n#### 7<|im_end|>")
    assert trained_text(tok, r, 0) == "3 + 4 = 8.\n3 + 4 = 7.\n#### 7<|im_end|>"
    assert trained_text(tok, r, 0, False).endswith(f"<|im_start|>user\n{correction}<|im_end|>\n<|im_start|>assistant\n")
    assert d["completion_len"] == int(r.loss_mask[0].sum())
    assert verifier.summary(r.info)["verifier/stop_rate"] == 1.0


def test_stop_without_a_final_answer_nudges_once(tiny, monkeypatch):
    model, tok = tiny
    calls = scripted_policy(monkeypatch, tok, ["3 + 4 = 7.\n", "The answer:\n#### 7<eos>"])
    backend = Scripted(f"{STOP}\n[SCORE] hallucination_detect=0")
    r = run(model, tok, backend, nudge="Please give the final answer.")
    d = r.info[1]
    assert (d["turns"], d["stopped"], d["nudged"], d["final_answer"], d["verifier_calls"]) == (2, True, True, True, 1)
    assert "<|im_start|>user\nPlease give the final answer.<|im_end|>" in d["conversation"]
    assert trained_text(tok, r, 1) == "3 + 4 = 7.\nThe answer:\n#### 7<|im_end|>"  # the nudge is masked out
    assert calls[0][0].active.tolist() == [True, True] and calls[1][0].active.tolist() == [False, False]
    assert len(backend.jobs) == 1  # the final turn after a nudge is not sent to the verifier


def test_a_tag_only_line_costs_no_verifier_call(tiny, monkeypatch):
    """Issue: "<reasoning>" alone on its line ended the turn, and the verifier judged a tag."""
    model, tok = tiny
    turns = ["<reasoning>\nTom has 3 + 4 = 7 apples.\n", "</reasoning>\n<answer>\n7</answer><eos>"]
    scripted_policy(monkeypatch, tok, turns)
    backend = Scripted("")
    r = run(model, tok, backend, turn_tokens=48, max_completion_tokens=96)
    assert [job.steps for job in backend.jobs[-1]] == [[turns[0], turns[1][:-len("<eos>")]]] * 2
    assert r.info[0]["turns"] == 2 and r.texts[0] == "".join(turns)[:-len("<eos>")]


@pytest.mark.parametrize("train_on", ["all", "last_turn"])
def test_max_turns_and_what_is_trained(tiny, monkeypatch, train_on):
    model, tok = tiny
    scripted_policy(monkeypatch, tok, ["a.\n", "b.\n", "c.\n"])
    r = run(model, tok, Scripted("Try again."), max_turns=3, train_on=train_on)
    d = r.info[0]
    assert (d["turns"], d["stopped"], d["truncated"], d["verifier_corrections"]) == (3, False, True, 2)
    assert d["verifier_hallucination_score"] == 0.5  # no [SCORE] lines at all
    assert trained_text(tok, r, 0) == ("a.\nb.\nc.\n" if train_on == "all" else "c.\n")
    assert r.texts[0] == "a.\nb.\nc.\n"  # the rewards read the whole work either way


def test_failed_calls_and_empty_replies_continue_without_feedback(tiny, monkeypatch):
    model, tok = tiny
    scripted_policy(monkeypatch, tok, ["a.\n", "b.\n", "c.<eos>", "never"])
    r = run(model, tok, Scripted(None, "", None), max_turns=5)
    d = r.info[0]
    # the policy ended with EOS and the (failed) verifier had nothing to add: the conversation is over
    assert (d["turns"], d["verifier_failed"], d["verifier_calls"], d["truncated"]) == (3, 2, 3, False)
    assert d["conversation"] == "a.\nb.\nc.<|im_end|>"  # no inserted messages
    assert verifier.summary(r.info)["verifier/failed_calls"] == 4  # 2 per conversation


def test_token_budget_ends_the_conversation(tiny, monkeypatch):
    model, tok = tiny
    scripted_policy(monkeypatch, tok, ["1 + 1 = 2, 2 + 2 = 4, 4 + 4 = 8, 8 + 8 = 16.\n"] * 4)
    r = run(model, tok, Scripted("More."), max_completion_tokens=30, max_turns=8)
    assert all(d["completion_len"] == 30 and d["truncated"] and d["turns"] == 2 for d in r.info)


# ----------------------------------------------------------------------------------------------
# the turn loop on the real tiny model


def test_turn_loop_masks_on_the_tiny_model(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    backend = Scripted("Fix it.\n[SCORE] hallucination_detect=1", "", "Fix it.")
    prompts = [llms.chat_prompt(tok, "", q) for q in ("Tom has 3 pens. He gets 4 more.", "Ann has 5 cards.")]
    r = verifier.run_turns(model, tok, prompts, ["q1", "q2"], ["7", "5"], 3, backend=backend, max_prompt_tokens=96,
                        max_completion_tokens=40, temperature=1.0, top_p=1.0, turn_tokens=10, max_turns=4,
                        step_end="sentence", train_on="all", nudge="Please give the final answer.")
    assert r.group.tolist() == [0, 0, 0, 1, 1, 1] and r.input_ids.shape == r.loss_mask.shape
    glue = re.compile(r"(<\|im_end\|>)?\n<\|im_start\|>user\nFix it\.<\|im_end\|>\n<\|im_start\|>assistant\n")
    for i, d in enumerate(r.info):
        assert 1 <= d["turns"] <= 4 and d["completion_len"] <= 40 and d["completion_len"] == r.loss_mask[i].sum()
        assert not (r.loss_mask[i].bool() & ~r.attention_mask[i].bool()).any()
        assert tok.decode(r.input_ids[i][r.attention_mask[i].bool()]).startswith(prompts[r.group[i]])
        assert tok.decode(r.input_ids[i][r.attention_mask[i].bool()]).endswith(d["conversation"])
        assert tok.decode(r.input_ids[i][r.loss_mask[i].bool()], skip_special_tokens=True) == r.texts[i]
        untrained = trained_text(tok, r, i, False).split("<|im_start|>assistant\n", 1)[1]  # after the prompt
        assert len(glue.findall(untrained)) == d["verifier_corrections"] and glue.sub("", untrained) == ""
        assert d["verifier_hallucination_score"] == 1.0  # only the first reply scores


def test_hf_backend_with_the_policy_and_a_local_folder(tiny, tiny_dir):
    model, tok = tiny
    jobs = [vb.Job("Tom has 3 pens.", "7", ["3 + 4 = 7.\n"])] * 2
    hf = dict(verifier_backend="hf", verifier_max_tokens=6, verifier_temperature=0.0)
    policy = vb.make(config.Config(**hf, verifier_model="policy"), "cpu")
    replies = policy(jobs, model, tok)
    assert len(replies) == 2 and all(isinstance(x, str) for x in replies) and replies[0] == replies[1]
    folder = vb.make(config.Config(**hf, verifier_model=tiny_dir), "cpu")
    assert folder(jobs, None, None) == replies  # the same weights, loaded from disk
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        vb.make(config.Config(**hf, verifier_model=tiny_dir, verifier_8bit=True), "cpu")


def test_prompt_template_from_text_or_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Check {question} against {answer}; say {stop} when done.")
    assert vb.load_prompt(str(path)) == path.read_text() and vb.load_prompt("") == vb.DEFAULT_PROMPT
    chat = vb.messages(vb.load_prompt(str(path)), vb.Job("Q?", "7", ["a.\n", "b."]))
    assert chat[0]["content"] == f"Check Q? against 7; say {STOP} when done."
    assert chat[1]["content"] == "The student's steps so far:\nStep 1: a.\nStep 2: b.\n\nJudge step 2."
    with pytest.raises(ValueError, match=r"\{question\}, \{answer\} and \{stop\} only"):
        vb.load_prompt("Check {work}")


# ----------------------------------------------------------------------------------------------
# http: a real `verifier.py serve`, a faulty server, an unreachable one


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, tok = tiny
    path = str(tmp_path_factory.mktemp("tiny_model"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def http(base_url, **kw):
    args = dict(model="verifier", api_key_env="VERIFIER_TEST_KEY", timeout_s=20.0, retries=0, concurrency=4,
                template=vb.DEFAULT_PROMPT, max_tokens=6, temperature=0.0, turn_timeout_s=60.0)
    return vb.HTTPVerifier(base_url, **{**args, **kw})


def test_http_backend_against_verifier_serve(tiny, tiny_dir, capsys):
    proc = subprocess.Popen([sys.executable, "verifier.py", "serve", "--model", tiny_dir, "--port", "0",
                             "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/v1 ..."
        base_url = re.search(r"http://127\.0\.0\.1:\d+/v1", line).group(0)
        backend = http(base_url)  # asks for model "verifier": the server lists only its folder's name
        assert f"lists the models ['{tiny_dir}'], not 'verifier'" in capsys.readouterr().err
        jobs = [vb.Job("Tom has 3 pens.", "7", ["3 + 4 = 7.\n"])] * 3
        replies = backend(jobs)
        assert len(replies) == 3 and all(isinstance(x, str) for x in replies)
        model, tok = tiny
        assert replies[0] == vb.hf_chat(model, tok, [vb.messages(vb.DEFAULT_PROMPT, jobs[0])], 6, 0.0)[0]
        r = run(model, tok, backend, max_turns=2)
        assert all(d["verifier_failed"] == 0 and d["verifier_calls"] >= 1 for d in r.info)
        assert verifier.summary(r.info)["verifier/latency_s"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Faulty:
    """A threaded test server: GET /models answers; POST either sleeps past the timeout, hangs (answers
    well only after 2 s), returns 500 (with the Authorization header in its body, as a careless server
    might), or returns junk."""

    def __init__(self, mode):
        self.mode, self.requests = mode, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, status, body):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(200, '{"object": "list", "data": []}')

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests += 1
                if outer.mode == "slow":
                    time.sleep(1.5)
                    self.reply(200, "{}")
                elif outer.mode == "hang":
                    time.sleep(2.0)
                    choice = {"index": 0, "message": {"role": "assistant", "content": "late"}, "finish_reason": "stop"}
                    self.reply(200, json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                                "choices": [choice]}))
                elif outer.mode == "500":
                    self.reply(500, json.dumps({"error": {"message": f"boom {self.headers.get('Authorization')}"}}))
                else:
                    self.reply(200, '{"choices": "nope"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode, tries", [("slow", 2), ("500", 2), ("junk", 1)])
def test_http_faults_are_counted_and_the_rollout_goes_on(tiny, monkeypatch, capsys, mode, tries):
    monkeypatch.setenv("VERIFIER_TEST_KEY", "sk-test-secret")
    server = Faulty(mode)
    try:
        backend = http(server.base_url, timeout_s=0.5, retries=1)
        assert backend([vb.Job("q", "7", ["a"])] * 2) == [None, None]
        assert server.requests == 2 * tries  # the client retried timeouts and 500s, not a junk 200
        model, tok = tiny
        r = run(model, tok, backend, max_turns=2)
        assert all(d["verifier_failed"] == d["verifier_calls"] >= 1 for d in r.info)
        assert verifier.summary(r.info)["verifier/failed_calls"] == sum(d["verifier_calls"] for d in r.info)
    finally:
        server.close()
    err = capsys.readouterr().err
    assert "verifier call failed" in err and "sk-test-secret" not in err


def test_http_turn_deadline(capsys):
    """A server that hangs costs a turn verifier_turn_timeout_s, not (retries + 1) x timeout per round of
    requests: the late replies are None (failed calls), reported once; the pool is not waited for."""
    server = Faulty("hang")
    try:
        cfg = config.Config(verifier_backend="http", verifier_base_url=server.base_url, verifier_timeout_s=10.0,
                            verifier_retries=0, verifier_concurrency=2, verifier_turn_timeout_s=0.3)
        backend = vb.make(cfg, "cpu")
        for _ in range(2):
            t0 = time.perf_counter()
            assert backend([vb.Job("q", "7", ["a"])] * 3) == [None] * 3
            assert time.perf_counter() - t0 < 1.0  # without the deadline: two rounds of 2 s
        assert server.requests <= 4  # the third job of each turn was never sent
    finally:
        server.close()
    err = capsys.readouterr().err
    assert err.count("verifier turn deadline") == 1 and "3 of 3 replies were not in after 0.3 s" in err


def test_unreachable_server_is_an_error_before_training(tmp_path):
    import socket
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(config.UserError, match="unreachable"):
        http(f"http://127.0.0.1:{port}/v1", timeout_s=2.0)
    out = str(tmp_path / "run")
    with pytest.raises(config.UserError, match=f"127.0.0.1:{port}/v1 is unreachable.*verifier.py serve"):
        run_train(FAST + ["--out_dir", out, "--sampler", "verifier", "--verifier_backend", "http",
                           "--verifier_base_url", f"http://127.0.0.1:{port}/v1", "--verifier_timeout_s", "2"])
    assert not os.path.exists(f"{out}/metrics.jsonl")


# ----------------------------------------------------------------------------------------------
# config and training runs


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "verifier", "--verifier_turn_tokens", "0"], "verifier_turn_tokens must be at least 1"),
    (["--sampler", "verifier", "--verifier_step_end", "paragraph"], "verifier_step_end must be one of"),
    (["--sampler", "verifier", "--verifier_retries", "-1"], "verifier_retries"),
    (["--sampler", "verifier", "--verifier_turn_timeout_s", "0"], "verifier_turn_timeout_s"),
    (["--rewards", "correctness=1,verifier_score=0.1"], "use it with --sampler verifier"),
])
def test_verifier_config_errors(argv, message):
    with pytest.raises(ValueError, match=message):  # the config, or the verifier sampler's start-up check
        samplers.make(config.load(argv), device="cpu", train_set=[])


def test_verifier_run_logs_verifier_metrics(tmp_path):
    out = str(tmp_path / "run")
    run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--eval_every", "5", "--save_every", "5",
                       "--eval_n", "2", "--sampler", "verifier", "--verifier_turn_tokens", "8",
                       "--verifier_max_turns", "3", "--verifier_step_end", "sentence",
                       "--verifier_train_on", "last_turn",
                       "--rewards", "correctness=0.8,verifier_score=0.1,integer_answer=0.1"])
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    trains = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in trains] == [1, 2]
    for row in trains:
        assert 1 <= row["verifier/turns"] <= 4 and 0 <= row["verifier/stop_rate"] <= 1
        assert row["verifier/failed_calls"] == 0 and 0 <= row["reward/verifier_score"] <= 1
        for key in ("verifier/final_answer_frac", "verifier/latency_s", "verifier/hallucination_score"):
            assert key in row
    samples = [json.loads(line) for line in open(f"{out}/samples.jsonl")]
    assert all("conversation" in s["info"] and "verifier_replies" in s["info"] for s in samples)


def test_training_goes_on_when_the_verifier_server_fails(tmp_path):
    server = Faulty("500")
    try:
        out = str(tmp_path / "run")
        run_train(FAST + ["--out_dir", out, "--max_steps", "1", "--eval_every", "5", "--save_every", "5",
                           "--eval_n", "2", "--sampler", "verifier", "--verifier_backend", "http",
                           "--verifier_base_url", server.base_url, "--verifier_retries", "0",
                           "--verifier_max_turns", "2", "--verifier_turn_tokens", "8"])
        row = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if '"train"' in line][0]
        assert row["verifier/failed_calls"] == server.requests >= 8  # every call failed, each was counted
    finally:
        server.close()
