"""Judge and R1 tasks: data in the OpenJudge layout, malformed rows, prompt templates, the task metrics,
and a short end-to-end run of each new recipe on the tiny model."""
import json

import pytest

import config
import builtin_tasks
import data
import evaluator
from helpers import run_train


def load_data(dataset: str, **settings):
    """data.load of a config with these settings."""
    return data.load(config.Config(dataset=dataset, **settings))

KW = dict(dataset_config="", train_split="train", test_split="test", question_field="question",
          answer_field="answer", seed=0, arithmetic_train_size=0, arithmetic_test_size=0,
          arithmetic_min_steps=2, arithmetic_max_steps=4)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def answer(content, label):
    return {"answer": {"role": "assistant", "content": content, "label": label}}


def pointwise(query, *graded):
    return {"input": [{"role": "user", "content": query}],
            "output": [answer(text, {"helpfulness": h}) for text, h in graded]}


def pairwise(query, a, b, better):
    return {"input": [{"role": "user", "content": query}],
            "output": [answer(a, {"preference": better}), answer(b, {"preference": better})]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    builtin_tasks.make_demo(str(out), n_train=40, n_test=8)
    return out


# --- loading ------------------------------------------------------------------

def test_pointwise_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [pointwise("What is 2+2?", ("4", 4), ("5", 0)), pointwise("Hi", ("Hello!", "3"))]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows[:1] + [pointwise("Hi", ("Hello!", 3.0))]), tmp_path / "p.parquet")
    for test in (path, str(tmp_path / "p.parquet")):
        train, held = load_data(path, test_dataset=test, task="judge_pointwise", **KW)
        assert [ex["answer"] for ex in train] == ["4", "0", "3"] and held == train  # one example per response
    q = train[0]["question"]
    assert "# Principles" in q and "What is 2+2?" in q and "\n4\n" in q and "<score>" in q  # our template
    assert train[1]["target"] == "<think>\n</think>\n<score>0</score>"  # what the warm start imitates


def test_pairwise_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [pairwise("Capital of France?", "Paris", "Lyon", "A"), pairwise("2+2?", "5", "4", "b")]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    train, test = load_data(str(tmp_path / "p.parquet"), test_dataset=path, task="judge_pairwise", **KW)
    assert [ex["answer"] for ex in train] == ["A", "B"] and test == train
    q = train[0]["question"]
    assert q.index("# Response A\nParis") < q.index("# Response B\nLyon") and "<better>" in q


def test_multi_turn_input_and_braces_in_values(tmp_path):
    row = {"input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say {response}"}],
           "output": [answer("ok {query}", {"helpfulness": 2})]}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    (ex,), _ = load_data(path, test_dataset=path, task="judge_pointwise", **KW)
    assert "system: Be brief.\n\nuser: Say {response}" in ex["question"]  # filled once, never re-filled
    assert "ok {query}" in ex["question"]


@pytest.mark.parametrize("row, message", [
    ({"input": [{"role": "user", "content": "q"}]}, r"line 2: missing field 'output'"),
    (pointwise("q", ("r", 4)) | {"input": []}, "line 2: field 'input' must be a non-empty list"),
    ({"input": [{"role": "user"}], "output": [answer("r", {"helpfulness": 1})]}, r"input\[0\]: missing field 'content'"),
    ({"input": [{"role": "user", "content": "q"}], "output": [{"answer": {"content": "r"}}]},
     r"missing field 'output\[0\].answer.label'"),
    (pointwise("q", ("r", 7)), r"output\[0\].answer.label.helpfulness is 7, not an integer in 0..4"),
    (pointwise("q", ("r", 2.5)), "not an integer in 0..4"),
    (pointwise("q", ("r", "high")), "not an integer in 0..4"),
    ({"input": [{"role": "user", "content": "q"}], "output": []}, "holds no response"),
    ('{"input": [', "line 2: not valid JSON"),
])
def test_malformed_pointwise_rows_are_named(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [pointwise("fine", ("ok", 4)), row])
    with pytest.raises(data.BadRow, match=message) as err:
        load_data(path, test_dataset=path, task="judge_pointwise", **KW)
    assert "bad.jsonl" in str(err.value) and "--skip_bad_rows" in str(err.value)


@pytest.mark.parametrize("row, message", [
    (pairwise("q", "a", "b", "C"), "must be 'A' or 'B'"),
    ({**pairwise("q", "a", "b", "A"), "output": [answer("a", {"preference": "A"}), answer("b", {"preference": "B"})]},
     "the same on both responses"),
    ({**pairwise("q", "a", "b", "A"), "output": [answer("a", {"preference": "A"})]}, "exactly 2 responses"),
    ({**pairwise("q", "a", "b", "A"), "output": [answer("a", {"preference": "A"}), {"answer": {"role": "assistant"}}]},
     r"missing field 'output\[1\].answer.content'"),
])
def test_malformed_pairwise_rows_are_named(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(data.BadRow, match=f"bad.jsonl line 1: .*{message}"):
        load_data(path, test_dataset=path, task="judge_pairwise", **KW)


def test_skip_bad_rows_skips_and_counts(tmp_path, capsys):
    rows = [pointwise("a", ("r", 4)), pointwise("b", ("r", 9)), "not json", pointwise("c", ("r", 1))]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    train, _ = load_data(path, test_dataset=path, task="judge_pointwise", skip_bad_rows=True, **KW)
    assert [ex["answer"] for ex in train] == ["4", "1"]
    assert "skipped 2 of 4 rows" in capsys.readouterr().out
    empty = write_jsonl(tmp_path / "all_bad.jsonl", [pointwise("b", ("r", 9))])
    with pytest.raises(ValueError, match="none of its 1 rows is usable"):
        load_data(empty, test_dataset=empty, task="judge_pointwise", skip_bad_rows=True, **KW)


def test_a_missing_column_is_a_config_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(config.UserError, match="OpenJudge layout"):
        load_data(path, test_dataset=path, task="judge_pairwise", skip_bad_rows=True, **KW)


# --- problem/answer data and R1 prompts ---------------------------------------

def test_problem_answer_columns_with_the_r1_template(tmp_path, demo):
    kw = {**KW, "question_field": "problem"}
    train, test = load_data(str(demo / "problems_train.jsonl"), test_dataset=str(demo / "problems_test.jsonl"),
                            prompt_template="configs/prompts/r1.txt", **kw)
    assert len(train) == 40 and len(test) == 8
    assert "<think>" in train[0]["question"] and train[0]["question"].endswith("now?")
    assert train[0]["answer"].isdigit() and train[0]["solution"] == ""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": None}])
    with pytest.raises(data.BadRow, match="bad.jsonl line 2: missing field 'answer'"):
        load_data(bad, test_dataset=bad, **kw)
    assert len(load_data(bad, test_dataset=bad, skip_bad_rows=True, **kw)[0]) == 1
    train, _ = load_data("arithmetic", test_dataset="", **{**KW, "arithmetic_train_size": 5, "arithmetic_test_size": 2},
                         prompt_template="configs/prompts/r1.txt")
    assert train[0]["question"].startswith("Solve the problem below.")


def test_templates_need_their_placeholders(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("Judge {query} please")
    with pytest.raises(ValueError, match=r"lacks \{response\}"):
        data.load_template(str(bad), "judge_pointwise")
    with pytest.raises(config.UserError, match="nope.txt"):
        data.load_template(str(tmp_path / "nope.txt"), "math")
    assert data.load_template("", "math") == "{question}"
    assert "{response_b}" in data.load_template("", "judge_pairwise")  # configs/prompts/judge_pairwise.txt
    with pytest.raises(ValueError, match="make-demo"):
        load_data("arithmetic", test_dataset="", task="judge_pointwise", **KW)


# --- the task's own metric ----------------------------------------------------

def test_pointwise_metrics():
    records = [{"answer": "4", "correct": [True, False], "predicted": [4, 3]},
               {"answer": "0", "correct": [False, False], "predicted": [None, 2]}]
    m = evaluator.task_metrics("judge_pointwise", records, samples=2)
    assert m["accuracy"] == 0.25 and m["pass@2"] == 0.5 and m["n"] == 2
    assert m["within1"] == 0.5 and m["mae"] == (0 + 1 + 4 + 2) / 4 and m["parsed"] == 0.75


def test_pairwise_metrics_and_grading():
    assert evaluator.grade("judge_pairwise", "<think>x</think><better>B</better>", "B") == (True, "B")
    assert evaluator.grade("judge_pointwise", "<score>3</score>", "2") == (False, 3)
    assert evaluator.grade("math", "<answer>72</answer>", "72") == (True, None)
    records = [{"answer": "A", "correct": [True], "predicted": ["A"]},
               {"answer": "B", "correct": [False], "predicted": [None]},
               {"answer": "B", "correct": [False], "predicted": ["A"]}]
    m = evaluator.task_metrics("judge_pairwise", records, samples=1)
    assert m == {"accuracy": pytest.approx(1 / 3), "n": 3, "parsed": pytest.approx(2 / 3)}
    assert evaluator.task_metrics("math", [{"answer": "1", "correct": [True]}], 1) == {"accuracy": 1.0, "n": 1}


# --- each recipe trains end to end on the tiny model --------------------------

TINY = ["--model_name", "tiny", "--device", "cpu", "--optimizer", "adamw", "--gradient_checkpointing", "false",
        "--tiny_hidden", "32", "--tiny_layers", "2", "--prompts_per_step", "2", "--num_chains", "2",
        "--micro_batch_size", "4", "--max_prompt_tokens", "96", "--max_completion_tokens", "12",
        "--max_steps", "2", "--eval_every", "2", "--eval_n", "2", "--save_every", "2", "--learning_rate", "1e-4"]


@pytest.mark.parametrize("recipe, files, extra, eval_keys", [
    ("judge_pointwise", "judge_pointwise", ["--sft_steps", "2", "--sft_batch_size", "4", "--max_prompt_tokens", "768"],
     ["within1", "mae", "parsed"]),
    ("judge_pairwise", "judge_pairwise", ["--max_prompt_tokens", "768"], ["parsed"]),
    ("r1_gsm8k", "problems", ["--question_field", "problem", "--overlong_buffer_tokens", "4",
                              "--rewards", "think_format=0.5,short_think=0.5,think_answer=1,overlong=1,r1_format=0.5"],
     []),
])
def test_each_recipe_runs_two_steps_on_the_tiny_model(tmp_path, demo, recipe, files, extra, eval_keys):
    out = tmp_path / recipe
    run_train(["--config", f"configs/{recipe}.yaml", *TINY, "--dataset", str(demo / f"{files}_train.jsonl"),
                "--test_dataset", str(demo / f"{files}_test.jsonl"), "--out_dir", str(out), *extra])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in trains] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    names = json.loads((out / "config.json").read_text())["rewards"]
    assert all(f"reward/{name}" in trains[0] and not trains[0].get(f"reward_errors/{name}") for name in names)
    assert all(key in evals[0] for key in ["accuracy", "n", *eval_keys])
    if recipe == "r1_gsm8k":  # 12-token completions of an untrained model: truncated, so overlong is -1
        assert trains[0]["reward/overlong"] < 0


def test_a_judge_prompt_that_would_lose_its_instructions_is_refused(tmp_path, demo):
    # a judge prompt is cut from its start, where the instructions are: it must fit, or the run stops
    argv = ["--config", "configs/judge_pointwise.yaml", *TINY, "--dataset", str(demo / "judge_pointwise_train.jsonl"),
            "--test_dataset", str(demo / "judge_pointwise_test.jsonl"), "--out_dir", str(tmp_path / "j")]
    with pytest.raises(ValueError, match="raise --max_prompt_tokens to"):
        run_train(argv)  # TINY's max_prompt_tokens 96
