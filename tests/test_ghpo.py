"""GHPO: all-wrong detection, hints, the stage schedule, masks and replacement, config, and a GHPO run."""
import json

import pytest
import torch

import config
import ghpo
import llms
import logprobs
import rewards
import rollout
import samplers
from helpers import FAST, run_train

G = 3

# ----------------------------------------------------------------------------------------------
# detection and hints


@pytest.mark.parametrize("accuracy, answer, hinted", [
    ([0.0, 0.0, 0.0], "72", True),                 # all wrong
    ([0.0, -1.0, 0.0], "72", True),                # a negative accuracy reward is wrong too
    ([0.0, 1.0, 0.0], "72", False),                # mixed: the group already teaches
    ([1.0, 1.0, 1.0], "72", False),
    ([0.0, 0.0, 0.0], "Sold 48 + 24 = 72 #### 72", True),
    ([0.0, 0.0, 0.0], "\\frac{1}{2}", True),       # math-verify parses it
    ([0.0, 0.0, 0.0], "", False),                  # unparseable references are never hinted
    ([0.0, 0.0, 0.0], "#### ", False),
    ([0.0, 0.0, 0.0], "???", False),
])
def test_needs_hint(accuracy, answer, hinted):
    assert ghpo.needs_hint(torch.tensor(accuracy), answer) is hinted


FOUR = "a = 1.\nb = 2.\nc = 3.\nd = 4."  # 4 steps, 27 characters


@pytest.mark.parametrize("solution, ratio, unit, hint", [
    (FOUR, 0.25, "steps", "a = 1.\n"),                  # each step keeps its newline
    (FOUR, 0.5, "steps", "a = 1.\nb = 2.\n"),
    (FOUR, 0.75, "steps", "a = 1.\nb = 2.\nc = 3.\n"),
    (FOUR, 0.99, "steps", "a = 1.\nb = 2.\nc = 3.\n"),  # never the whole solution
    ("a = 1.\n\nb = 2.\n", 0.25, "steps", "a = 1.\n"),  # blank lines are no steps
    ("a = 1.\nb = 2.", 0.75, "steps", "a = 1.\n"),
    ("a = 1.", 0.75, "steps", ""),                      # one step: nothing to give
    ("", 0.5, "steps", ""),
    (FOUR, 0.25, "chars", "a = 1.\n"),                  # ceil(6.75) = 7 characters
    (FOUR, 0.5, "chars", "a = 1.\nb = 2.\n"),           # ceil(13.5) = 14
    (FOUR, 0.6, "chars", "a = 1.\nb = 2.\nc ="),        # ceil(16.2) = 17: a hint may end mid-step
    ("abcd", 0.5, "chars", "ab"),
    ("ab", 0.9, "chars", "a"),
    ("", 0.5, "chars", ""),
])
def test_make_hint(solution, ratio, unit, hint):
    assert ghpo.make_hint(solution, ratio, unit) == hint


def test_make_hint_unknown_unit():
    with pytest.raises(ValueError, match="hint unit"):
        ghpo.make_hint(FOUR, 0.5, "tokens")


def test_hints_of_the_builtin_task_and_gsm8k(task):
    ex = next(e for e in task[0] if e["solution"].count("\n") == 3)  # a 4-step problem
    steps = [line + "\n" for line in ex["solution"].split("\n")]
    assert [ghpo.make_hint(ex["solution"], r, "steps") for r in (0.25, 0.5, 0.75)] == [
        steps[0], "".join(steps[:2]), "".join(steps[:3])]
    import data
    solution, _ = data.split_gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                                          "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72")
    assert ghpo.make_hint(solution, 0.5, "steps") == "Natalia sold 48/2 = 24 clips in May.\n"  # no calculator note


NOTES = "48/2=<<48/2=24>>24\n48+24=<<48+24=72>>72\nSo 72."  # cleaned: "48/2=24\n48+24=72\nSo 72.", 23 characters


@pytest.mark.parametrize("ratio, unit, hint", [
    (0.25, "steps", "48/2=24\n"),
    (0.5, "steps", "48/2=24\n48+24=72\n"),
    (0.25, "chars", "48/2=2"),                # ceil(5.75) = 6 characters of the cleaned solution
    (0.5, "chars", "48/2=24\n48+2"),          # ceil(11.5) = 12, not 12 characters of the raw one
    (0.9, "chars", "48/2=24\n48+24=72\nSo 7"),  # ceil(20.7) = 21
])
def test_make_hint_drops_calculator_notes(ratio, unit, hint):
    assert ghpo.make_hint(NOTES, ratio, unit) == hint
    assert ghpo.drop_calculator_notes("48/2=<<48/2=24>>24 and <<a>>") == "48/2=24 and "


# ----------------------------------------------------------------------------------------------
# the schedule, replacement and masks, with a reward that reads the chain's hint ratio


@pytest.fixture
def examples(task):
    """Three built-in problems with 4-step solutions and distinct answers."""
    picked, answers = [], set()
    for ex in task[0]:
        if ex["solution"].count("\n") == 3 and ex["answer"] not in answers:
            picked.append(ex)
            answers.add(ex["answer"])
    return picked[:3]


def use_reward(monkeypatch, rule):
    """Register a reward named "fake": rule(answer, hint_ratio) -> float, hint_ratio from the chain's info."""
    monkeypatch.setitem(rewards.REWARDS, "fake",
                        lambda completion, answer, hint_ratio=0.0, **info: float(rule(answer, hint_ratio)))


def record(monkeypatch):
    """Every rollout.sample call's prompts and Rollout, in order."""
    calls, real = [], rollout.sample

    def recording(model, tokenizer, prompts, *args, **kw):
        r = real(model, tokenizer, prompts, *args, **kw)
        calls.append((prompts, r))
        return r
    monkeypatch.setattr(rollout, "sample", recording)
    return calls


def run_ghpo(tiny, examples, ratios=(0.25, 0.5, 0.75), unit="steps", hint_in="user"):
    model, tok = tiny
    torch.manual_seed(0)
    return ghpo.ghpo(model, tok, examples, G, system_prompt="", max_prompt_tokens=96, max_completion_tokens=16,
                     temperature=1.0, top_p=1.0, weights={"fake": 1.0}, reward_settings=None, accuracy_reward="fake",
                     hint_ratios=list(ratios), hint_unit=unit, hint_in=hint_in)


def test_schedule_stops_at_the_first_stage_that_helps(tiny, examples, monkeypatch):
    ok, rescued_at_half, never = (ex["answer"] for ex in examples)
    use_reward(monkeypatch, lambda answer, ratio: answer == ok or (answer == rescued_at_half and ratio >= 0.5))
    calls = record(monkeypatch)
    r = run_ghpo(tiny, examples)
    # stage 0: all three; 0.25: both all-wrong groups; 0.5: both, one rescued; 0.75: only the other one
    assert [len(prompts) for prompts, _ in calls] == [3, 2, 2, 1]
    assert [len(c) for _, c in calls] == [3 * G, 2 * G, 2 * G, G]  # one batched generate call per stage
    hints = [ghpo.make_hint(examples[1]["solution"], q, "steps") for q in (0.25, 0.5)]
    assert hints[0] in calls[1][0][0] and hints[1] in calls[2][0][0] and ghpo.HINT_INSTRUCTION in calls[1][0][0]
    assert ghpo.HINT_INSTRUCTION not in calls[0][0][0]
    assert r.group.tolist() == [0] * G + [1] * G + [2] * G
    by_group = [r.info[b * G] for b in range(3)]
    assert [d["hint_ratio"] for d in by_group] == [0.0, 0.5, 0.0]
    assert [d["hint_stages"] for d in by_group] == [0, 2, 3]
    assert by_group[1]["hint"] == hints[1] and by_group[2]["hint"] == ""
    assert [d["accuracy"] for d in r.info] == [1.0] * G + [1.0] * G + [0.0] * G
    assert [d["accuracy_unhinted"] for d in r.info] == [1.0] * G + [0.0] * 2 * G
    summary = ghpo.ghpo_summary(r.info, [0.25, 0.5, 0.75])
    assert summary == pytest.approx({
        "ghpo/hinted@0.25": 2 / 3, "ghpo/hinted@0.5": 2 / 3, "ghpo/hinted@0.75": 1 / 3, "ghpo/rescued_frac": 1 / 3,
        "ghpo/hint_ratio": 0.5 / 3, "ghpo/accuracy_before": 1 / 3, "ghpo/accuracy_after": 2 / 3,
        "ghpo/zero_adv_frac_unhinted": 1.0})


def test_stages_that_would_repeat_a_hint_merge(tiny, examples, monkeypatch):
    # make_hint rounds up: at 0.25, 0.5, 0.75 two steps give 1, 1, 1 of them, three 1, 2, 2, four 1, 2, 3
    two = {**examples[0], "solution": "a = 1.\nb = 2."}
    three = {**examples[1], "solution": "a = 1.\nb = 2.\nc = 3."}
    four = examples[2]
    monkeypatch.setitem(rewards.REWARDS, "fake", lambda completion, answer, hint="", **info: float(
        answer == three["answer"] and hint.count("\n") == 2))  # three is rescued by its first two steps
    calls = record(monkeypatch)
    r = run_ghpo(tiny, [two, three, four])
    # 0.25: all three groups; 0.5: three and four (two's hint would be the same); 0.75: four only
    assert [len(prompts) for prompts, _ in calls] == [3, 3, 2, 1]
    assert [len(c) for _, c in calls] == [3 * G, 3 * G, 2 * G, G]  # still one batched generate call per stage
    for b, ex in enumerate((two, three, four)):  # no group is ever sampled twice from the same prompt
        prompts = [p for ps, _ in calls for p in ps if ex["question"] in p]
        assert len(prompts) == len(set(prompts)) == 1 + r.info[b * G]["hint_stages"]
    by_group = [r.info[b * G] for b in range(3)]
    assert [d["hinted_at"] for d in by_group] == [[0.25], [0.25, 0.5], [0.25, 0.5, 0.75]]
    assert [d["hint_stages"] for d in by_group] == [1, 2, 3]
    assert [d["hint_ratio"] for d in by_group] == [0.0, 0.5, 0.0]  # 0.5, the smallest ratio giving three's hint
    assert by_group[1]["hint"] == "a = 1.\nb = 2.\n"
    summary = ghpo.ghpo_summary(r.info, [0.25, 0.5, 0.75])  # shares of groups regenerated at each stage
    assert [summary[f"ghpo/hinted@{q}"] for q in (0.25, 0.5, 0.75)] == pytest.approx([1, 2 / 3, 1 / 3])


def test_a_merged_stage_is_skipped_not_the_end(tiny, examples, monkeypatch):
    # 5 steps at 0.1, 0.2, 0.5: 1, 1, 3 steps; the group skips 0.2 and is regenerated again at 0.5
    five = {**examples[0], "solution": "a = 1.\nb = 2.\nc = 3.\nd = 4.\ne = 5."}
    use_reward(monkeypatch, lambda answer, ratio: 0.0)
    calls = record(monkeypatch)
    r = run_ghpo(tiny, [five], ratios=(0.1, 0.2, 0.5))
    assert [len(prompts) for prompts, _ in calls] == [1, 1, 1]
    assert r.info[0]["hinted_at"] == [0.1, 0.5] and r.info[0]["hint_stages"] == 2
    summary = ghpo.ghpo_summary(r.info, [0.1, 0.2, 0.5])
    assert [summary[f"ghpo/hinted@{q}"] for q in (0.1, 0.2, 0.5)] == [1.0, 0.0, 1.0]


def rows_of(r, i):
    """Chain i's real tokens and its trained tokens: padding, wherever it sits, dropped."""
    return r.input_ids[i][r.attention_mask[i].bool()].tolist(), r.input_ids[i][r.loss_mask[i].bool()].tolist()


def test_rescued_groups_take_hinted_chains_and_others_keep_their_own(tiny, examples, monkeypatch):
    ok, rescued_at_half, never = (ex["answer"] for ex in examples)
    use_reward(monkeypatch, lambda answer, ratio: answer == ok or (answer == rescued_at_half and ratio >= 0.5))
    calls = record(monkeypatch)
    r = run_ghpo(tiny, examples)
    plain, half = calls[0][1], calls[2][1]
    assert calls[2][1].input_ids.shape[1] > plain.input_ids.shape[1]  # hinted prompts are longer
    for b, source, first in ((0, plain, 0), (1, half, 0), (2, plain, 2 * G)):  # never rescued: its originals
        for j in range(G):
            assert rows_of(r, b * G + j) == rows_of(source, first + j)
            assert r.texts[b * G + j] == source.texts[first + j]


@pytest.mark.parametrize("hint_in", config.options("ghpo_hint_in"))
def test_hint_tokens_are_prompt_and_never_trained(tiny, examples, monkeypatch, hint_in):
    model, tok = tiny
    ok, rescued_at_half, never = (ex["answer"] for ex in examples)
    use_reward(monkeypatch, lambda answer, ratio: answer == ok or (answer == rescued_at_half and ratio >= 0.5))
    calls = record(monkeypatch)
    r = run_ghpo(tiny, examples, unit="chars", hint_in=hint_in)
    hint = ghpo.make_hint(examples[1]["solution"], 0.5, "chars")
    for i in range(G, 2 * G):  # the rescued group
        real = r.attention_mask[i].bool()
        prompt_ids = r.input_ids[i][real & ~r.loss_mask[i].bool()].tolist()
        prompt = tok.decode(prompt_ids)
        if hint_in == "user":  # after the question, inside the user turn
            assert prompt.index(examples[1]["question"] + ghpo.HINT_INSTRUCTION + hint) < prompt.index("assistant")
        else:  # the response starts with it
            assert prompt.endswith("assistant\n" + hint) and ghpo.HINT_INSTRUCTION not in prompt
        assert tok.decode(rows_of(r, i)[1], skip_special_tokens=True) == r.texts[i]
        assert r.loss_mask[i].sum() == r.info[i]["completion_len"]
        first = int(r.loss_mask[i].nonzero()[0])  # every trained token follows the whole prompt
        assert r.loss_mask[i, :first].sum() == 0 and r.attention_mask[i, first - len(prompt_ids):first].all()
    # joined rows of different widths score exactly as in their own rollouts: padding changes nothing
    def chain_logps(x):
        start = logprobs.first_trained_column(x.loss_mask)
        with torch.no_grad():
            lp = logprobs.token_logps(model, x.input_ids, x.attention_mask, start, 1.0, chunk=64)
        return (lp * x.loss_mask[:, start:]).sum(1)
    joined, plain, half = chain_logps(r), chain_logps(calls[0][1]), chain_logps(calls[2][1])
    torch.testing.assert_close(joined, torch.cat([plain[:G], half[:G], plain[2 * G:]]), rtol=1e-4, atol=1e-4)


def test_no_hinting_is_exactly_plain_sampling(tiny, examples, monkeypatch):
    model, tok = tiny
    prompts = [llms.chat_prompt(tok, "", ex["question"]) for ex in examples]
    torch.manual_seed(0)
    plain = rollout.sample(model, tok, prompts, G, max_prompt_tokens=96, max_new_tokens=16, temperature=1.0)
    for ratios, rule in (([], lambda a, q: 0.0), ([0.25, 0.5], lambda a, q: 1.0)):  # off; nothing all wrong
        use_reward(monkeypatch, rule)
        calls = record(monkeypatch)
        r = run_ghpo(tiny, examples, ratios=ratios)
        assert len(calls) == 1
        for name in ("input_ids", "attention_mask", "loss_mask", "group"):
            assert torch.equal(getattr(r, name), getattr(plain, name)), name
        assert r.texts == plain.texts and all(d["hint_ratio"] == 0 and d["hint_stages"] == 0 for d in r.info)
        monkeypatch.undo()


def test_groups_without_a_solution_or_answer_are_never_hinted(tiny, examples, monkeypatch):
    use_reward(monkeypatch, lambda answer, ratio: 0.0)
    calls = record(monkeypatch)
    no_solution = {**examples[0], "solution": ""}
    one_step = {**examples[1], "solution": "2 + 3 = 5."}
    no_answer = {**examples[2], "answer": "?"}
    r = run_ghpo(tiny, [no_solution, one_step, no_answer, examples[1]])
    assert [len(prompts) for prompts, _ in calls] == [4, 1, 1, 1]  # only the last group, at each stage
    assert [r.info[b * G]["hint_stages"] for b in range(4)] == [0, 0, 0, 3]


# ----------------------------------------------------------------------------------------------
# config, data and a GHPO training run


def test_dataset_without_solutions_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs reference solutions"):
        ghpo.check_solutions([{"question": "1 + 1?", "answer": "2", "solution": ""}], "mine.jsonl")
    path = tmp_path / "bare.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    with pytest.raises(ValueError, match="needs reference solutions.*bare.jsonl"):
        run_train(FAST + ["--out_dir", str(tmp_path / "run"), "--dataset", str(path), "--test_dataset", str(path),
                           "--sampler", "ghpo", "--sft_slip_rate", "0"])


@pytest.mark.parametrize("argv, message", [
    (["--ghpo_accuracy_reward", "soft_format"], "must be one of the rewards"),
    (["--ghpo_hint_ratios", "0.5,0.25"], "increase strictly"),
    (["--ghpo_hint_ratios", "0,0.5"], "increase strictly"),
    (["--ghpo_hint_ratios", "0.5,1"], "increase strictly"),
    (["--ghpo_hint_ratios", "half"], "must be numbers"),
    (["--ghpo_hint_unit", "tokens"], "ghpo_hint_unit must be one of"),
    (["--ghpo_hint_in", "system"], "ghpo_hint_in must be one of"),
])
def test_ghpo_config_errors(argv, message):
    with pytest.raises(ValueError, match=message):  # the config, or the GHPO sampler's start-up check
        cfg = config.load(["--sampler", "ghpo", "--rewards", "correctness=1"] + argv)
        samplers.make(cfg, device="cpu", train_set=[{"question": "1 + 1?", "answer": "2", "solution": "1 + 1 = 2."}])


def test_ghpo_config_reads_ratios_as_numbers():
    cfg = config.load(["--sampler", "ghpo", "--ghpo_hint_ratios", "0.3,0.6"])
    assert cfg.ghpo_hint_ratios == [0.3, 0.6]


def test_ghpo_run_logs_hint_metrics(tmp_path):
    out = str(tmp_path / "ghpo")
    run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--save_every", "5", "--eval_every", "5",
                       "--sampler", "ghpo", "--ghpo_hint_unit", "chars", "--ghpo_start_step", "2",
                       "--ghpo_hint_in", "assistant"])
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    first, second = [row for row in rows if row["split"] == "train"]
    keys = ["ghpo/hinted@0.25", "ghpo/hinted@0.5", "ghpo/hinted@0.75"]
    assert all(first[k] == 0 for k in keys) and first["ghpo/hint_ratio"] == 0  # plain before ghpo_start_step
    assert second["ghpo/hinted@0.25"] > 0  # the untrained model fails every question
    assert second["ghpo/hinted@0.25"] >= second["ghpo/hinted@0.5"] >= second["ghpo/hinted@0.75"]
    for row in (first, second):
        assert 0 <= row["ghpo/accuracy_before"] <= 1 and 0 <= row["ghpo/zero_adv_frac_unhinted"] <= 1
        assert row["ghpo/accuracy_after"] >= row["ghpo/accuracy_before"]
    samples = [json.loads(line) for line in open(f"{out}/samples.jsonl")]
    assert all("hint_ratio" in s["info"] and "hint_stages" in s["info"] for s in samples)
