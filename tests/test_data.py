"""Datasets and model loading offline: local GSM8K-layout files, the built-in task, clear errors."""
import json
import random
import re

import pytest

import config
import builtin_tasks
import data
import llms
import rewards
from helpers import FAST, run_train


def load_data(dataset: str, **settings):
    """data.load of a config with these settings."""
    return data.load(config.Config(dataset=dataset, **settings))


def write_gsm8k(path, n):
    rows = [{"question": f"Ann has {i} pens and buys 2 more. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_arithmetic_task_is_deterministic_and_disjoint():
    train, test = builtin_tasks.arithmetic_task(300, 50, seed=3)
    assert (train, test) == builtin_tasks.arithmetic_task(300, 50, seed=3)
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in test}
    for ex in train[:50]:
        steps = ex["solution"].split("\n")
        assert 2 <= len(steps) <= 4 and len(re.findall(r"[.?]", ex["question"])) == len(steps) + 2
        for eq in steps:  # every equation is true, and chains into the next
            lhs, rhs = eq.rstrip(".").split(" = ")
            a, op, b = lhs.split()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(rhs)
        assert rewards.is_correct(data.target_text(ex), ex["answer"])


def test_addition_task_is_every_pair_of_two_digit_numbers_shuffled_and_split():
    train, test = builtin_tasks.addition_task(8000, 100, seed=1)
    assert (train, test) == builtin_tasks.addition_task(8000, 100, seed=1)
    assert builtin_tasks.addition_task(8000, 100, seed=2)[1] != test
    pairs = [tuple(map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", ex["question"]).groups())) for ex in train + test]
    assert len(set(pairs)) == 8100 and all(10 <= a <= 99 and 10 <= b <= 99 for a, b in pairs)
    for ex, (a, b) in zip(train + test, pairs):
        assert ex["answer"] == str(a + b) and data.target_text(ex) == str(a + b)  # few-shot and warm start: bare
        steps = [tuple(map(int, re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", line).groups()))
                 for line in ex["solution"].split("\n")]  # GHPO's hints: tens, units, then the two together
        assert [(x + y == z) for x, y, z in steps] == [True] * 3 and steps[0][0] + steps[1][0] == a
        assert steps[2][:2] == (steps[0][2], steps[1][2]) and steps[2][2] == a + b
    assert len(builtin_tasks.addition_task(50, 10, seed=0, digits=1)[0]) == 50
    with pytest.raises(config.UserError, match="only 100 additions of 1-digit numbers"):
        builtin_tasks.addition_task(100, 10, seed=0, digits=1)
    train, test = load_data("addition", arithmetic_train_size=30, arithmetic_test_size=5, addition_digits=3)
    assert len(train) == 30 and all(int(q) >= 100 for q in re.findall(r"\d+", test[0]["question"]))


def test_slipped_targets_carry_the_slip_to_the_answer():
    train, _ = builtin_tasks.arithmetic_task(100, 5, seed=2)
    rng = random.Random(0)
    for ex in train:
        assert data.target_text(ex, slip_rate=0.0, rng=rng) == data.target_text(ex)
        solution, answer = builtin_tasks.with_slips(ex["solution"], 1.0, rng)  # every step slips
        value = None
        for ours, right in zip(solution.split("\n"), ex["solution"].split("\n")):
            a, op, b, c = re.fullmatch(r"(-?\d+) (.) (\d+) = (-?\d+)\.", ours).groups()
            assert op == right.split()[1] and b == right.split()[2]  # same operation, same operand
            assert value is None or int(a) == value  # each step starts from the slipped result
            true = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert abs(int(c) - true) == 1
            value = int(c)
        assert answer == str(value)
    slips = [builtin_tasks.with_slips(ex["solution"], 0.2, random.Random(i)) != (ex["solution"], ex["answer"])
             for i, ex in enumerate(train)]
    assert 0.2 < sum(slips) / len(slips) < 0.8  # about 1 - 0.8^3 of the 2-4 step targets


@pytest.mark.parametrize("max_value", [12, 20, 99])
def test_arithmetic_max_value_bounds_every_number(max_value):
    train, _ = builtin_tasks.arithmetic_task(200, 10, seed=1, max_value=max_value)
    numbers = [int(n) for ex in train for n in re.findall(r"\d+", ex["solution"])]
    assert max(numbers) <= max_value and min(numbers) >= 1
    if max_value == 99:  # the bound is reached, not just respected
        assert max(numbers) > 50


def test_local_jsonl_and_parquet(tmp_path):
    write_gsm8k(tmp_path / "train.jsonl", 5)
    write_gsm8k(tmp_path / "test.jsonl", 3)
    kw = dict(dataset_config="main", train_split="train", test_split="test", question_field="question",
              answer_field="answer", seed=0, arithmetic_train_size=0, arithmetic_test_size=0,
              arithmetic_min_steps=2, arithmetic_max_steps=4)
    train, test = load_data(str(tmp_path / "train.jsonl"), test_dataset=str(tmp_path / "test.jsonl"), **kw)
    assert len(train) == 5 and len(test) == 3
    assert train[1] == {"question": "Ann has 1 pens and buys 2 more. How many?", "answer": "3", "solution": "1 + 2 = 3"}
    import pandas as pd
    pd.read_json(tmp_path / "train.jsonl", lines=True).to_parquet(tmp_path / "train.parquet")
    assert load_data(str(tmp_path / "train.parquet"), test_dataset=str(tmp_path / "test.jsonl"), **kw)[0] == train
    folder = tmp_path / "gsm8k"  # a folder with train/test files is split by file name
    folder.mkdir()
    write_gsm8k(folder / "train.jsonl", 4)
    write_gsm8k(folder / "test.jsonl", 2)
    assert [len(s) for s in load_data(str(folder), test_dataset="", **kw)] == [4, 2]
    with pytest.raises(ValueError, match="--test_dataset"):
        load_data(str(tmp_path / "train.jsonl"), test_dataset="", **kw)
    with pytest.raises(config.UserError, match="no field 'problem'.*--question_field"):
        load_data(str(tmp_path / "train.jsonl"), test_dataset=str(tmp_path / "test.jsonl"),
                  **{**kw, "question_field": "problem"})
    with pytest.raises(config.UserError, match="nope.jsonl"):
        load_data(str(tmp_path / "nope.jsonl"), test_dataset="", **kw)


def test_unreachable_names_say_how_to_go_offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no slow network retries
    with pytest.raises(config.UserError,
                       match="(?s)could not load 'no-such-org/no-such-model'.*--model_name /path/to/model"):
        llms.load("no-such-org/no-such-model", "cpu")
    with pytest.raises(config.UserError, match="(?s)--dataset path/to/train.jsonl"):
        load_data("no-such-org/no-such-data", dataset_config="main")


def test_a_model_folder_whose_config_names_no_model_is_refused_before_loading(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(config.UserError, match=f"(?s)could not load '{folder}' from the local folder.*model_type"):
        run_train(FAST + ["--model_name", str(folder), "--out_dir", str(tmp_path / "run")])
    with pytest.raises(config.UserError, match=f"could not load '{folder}'"):
        llms.load(str(folder), "cpu")


def test_local_model_folder_round_trip(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = llms.load(str(tmp_path), "cpu")
    assert tok2("Ann has 3 pens.")["input_ids"] == tok("Ann has 3 pens.")["input_ids"]
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
