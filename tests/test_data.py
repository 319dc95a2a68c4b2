"""Datasets and model loading offline: local GSM8K-layout files, the built-in task, clear errors."""
import json
import random
import re

import pytest

import config
import answers
import builtin_tasks
import data
import evaluator
import llms
import rewards
import rollout
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
        assert answers.is_correct(data.target_text(ex), ex["answer"])


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


def write_questions(path, pairs):
    """Additions in GSM8K's published form: the final answer alone ("#### 125"), no worked solution."""
    path.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}) + "\n"
                            for a, b in pairs))


def smollm2_recipe(path, *extra):
    """configs/smollm2_cpu.yaml (plain format, one example, eval_format bare_number) on a question file."""
    return config.load(["--config", "configs/smollm2_cpu.yaml", "--dataset", str(path), "--test_dataset", str(path),
                        *extra])


def test_the_recipes_example_from_a_question_file_shows_a_bare_number(tmp_path, capsys):
    write_questions(tmp_path / "q.jsonl", [(65, 60)])
    cfg = smollm2_recipe(tmp_path / "q.jsonl")
    train, test = data.load(cfg)
    shots = data.few_shot_examples(train, cfg.few_shot, cfg.seed, eval_format=cfg.eval_format,
                                   settings=rewards.settings(cfg))
    assert shots == [("What is 65 + 60?", "125")]
    # the prompt a model without a chat template (a base model) gets in the plain format: no "####" to copy
    _, tok = llms.load(llms.TINY, "cpu", tiny_corpus=data.tiny_corpus(train, cfg.system_prompt), tiny_hidden=32,
                       tiny_layers=2, prompt_format="plain", shots=shots)
    prompt = rollout.prompts_of(tok, cfg.system_prompt, test)[0]
    assert "Question: What is 65 + 60?\nAnswer: 125\n\n" in prompt and "####" not in prompt
    assert "warning" not in capsys.readouterr().err
    # without eval_format, or with a worked solution or a target, the example is target_text as before
    assert data.few_shot_examples(train, 1, 0) == [("What is 65 + 60?", "#### 125")]
    solved = [{"question": "What is 65 + 60?", "answer": "125", "solution": "60 + 65 = 125"}]
    assert data.few_shot_examples(solved, 1, 0)[0][1] == "60 + 65 = 125\n#### 125"
    builtin, _ = data.load(config.load(["--config", "configs/smollm2_cpu.yaml"]))
    assert data.few_shot_examples(builtin, 1, 0, eval_format="bare_number") == data.few_shot_examples(builtin, 1, 0)


def test_evaluator_gives_a_base_model_the_recipes_example_without_hashes(tmp_path, capsys):
    write_questions(tmp_path / "q.jsonl", [(65, 60), (12, 30)])
    cfg = smollm2_recipe(tmp_path / "q.jsonl", "--model_name", "tiny", "--tiny_hidden", "32", "--tiny_layers", "2")
    train, _ = data.load(cfg)
    _, tok = evaluator.load_for_eval("tiny", cfg, "cpu", train)
    example = re.search(r"Question: What is \d+ \+ \d+\?\nAnswer: (.*?)\n\n", tok.chat_template).group(1)
    assert re.fullmatch(r"\d+", example) and "####" not in tok.chat_template
    assert "warning" not in capsys.readouterr().err


def test_an_example_off_the_asked_layout_is_a_startup_warning_naming_it(tmp_path, capsys, monkeypatch):
    write_gsm8k(tmp_path / "gsm8k.jsonl", 5)  # worked solutions, shown as they are
    write_questions(tmp_path / "q.jsonl", [(65, 60)])
    for path, eval_format in ((tmp_path / "gsm8k.jsonl", "bare_number"), (tmp_path / "q.jsonl", "strict_format")):
        train, _ = data.load(smollm2_recipe(path))  # strict_format: no reasoning to lay out in its tags
        data.few_shot_examples(train, 1, 0, eval_format=eval_format, settings=rewards.settings(config.Config()))
        err = capsys.readouterr().err
        assert f"warning: 1 of 1 few-shot examples score 0 on eval_format {eval_format!r}" in err
        assert "the first reads 'Question: " in err and "####" in err and "few_shot 0" in err and "eval_format" in err

    class Started(Exception):
        pass

    def stop(*args, **kwargs):
        raise Started
    monkeypatch.setattr(llms, "from_config", stop)  # train.py builds its examples before it loads the model
    with pytest.raises(Started):
        run_train(FAST + ["--dataset", str(tmp_path / "gsm8k.jsonl"), "--test_dataset", str(tmp_path / "gsm8k.jsonl"),
                          "--prompt_format", "plain", "--few_shot", "1", "--eval_format", "bare_number",
                          "--sft_slip_rate", "0", "--out_dir", str(tmp_path / "run")])
    assert "few-shot examples score 0 on eval_format 'bare_number'" in capsys.readouterr().err


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
