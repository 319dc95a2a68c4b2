"""python evaluator.py --model PATH: a saved model under the run's own eval protocol gives the run's figures."""
import json

import pytest

import config
import evaluator
from helpers import FAST, read, run_train


def last_eval(out):
    return [r for r in read(f"{out}/metrics.jsonl") if r["split"] == "eval"][-1]


@pytest.mark.parametrize("extra", [[], ["--lora_r", "4", "--train_only", ""]], ids=["full", "lora"])
def test_a_saved_run_evaluates_to_its_own_last_eval(tmp_path, extra):
    out = str(tmp_path / "run")
    run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--save_every", "2", "--sft_steps", "20", *extra])
    records = str(tmp_path / "eval.jsonl")
    results = evaluator.main(["--model", out, "--out", records])  # the run's config, its latest checkpoint
    expected = last_eval(out)
    assert results["model"]["metrics"] == {k: expected[k] for k in results["model"]["metrics"]}
    assert len(read(records)) == expected["n"]


def test_eval_format_gives_the_share_of_answers_in_the_recipes_layout(tmp_path):
    out = str(tmp_path / "run")
    run_train(FAST + ["--out_dir", out, "--max_steps", "1", "--eval_format", "bare_number", "--eval_every", "1"])
    ev = last_eval(out)
    records = read(f"{out}/eval/step_{ev['step']:06d}.jsonl")
    flags = [f for rec in records for f in rec["in_format"]]
    assert flags == [evaluator.rewards.bare_number(t, "") == 1.0 for rec in records for t in rec["completions"]]
    assert ev["format"] == pytest.approx(sum(flags) / len(flags))
    records = [{"correct": [True, False], "in_format": [True, True]},
               {"correct": [False, False], "in_format": [False, True]}]
    assert evaluator.task_metrics("math", records, 2)["format"] == 0.75
    assert "format" not in evaluator.task_metrics("math", [{"correct": [True]}], 1)
    with pytest.raises(config.UserError, match="unknown reward 'bare_numbr'.*'bare_number'"):
        run_train(FAST + ["--out_dir", str(tmp_path / "bad"), "--eval_format", "bare_numbr"])


def test_compare_gives_the_paired_difference_on_the_same_questions(tmp_path):
    out = str(tmp_path / "run")
    run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--save_every", "2", "--sft_steps", "20"])
    records = str(tmp_path / "eval.jsonl")
    results = evaluator.main(["--model", out, "--compare", f"{out}/base_model", "--out", records])
    a, b = results["model"], results["compare"]
    assert [r["question"] for r in a["records"]] == [r["question"] for r in b["records"]]
    paired = results["paired"]
    assert paired["difference"] == pytest.approx(a["metrics"]["accuracy"] - b["metrics"]["accuracy"])
    assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1] and paired["n"] == a["metrics"]["n"]
    assert b["metrics"]["accuracy"] == [r for r in read(f"{out}/metrics.jsonl") if r["split"] == "eval"][0]["accuracy"]
    assert {json.loads(line)["model"] for line in open(records)} == {out, f"{out}/base_model"}
    with pytest.raises(config.UserError, match="--model PATH"):
        evaluator.main([])
