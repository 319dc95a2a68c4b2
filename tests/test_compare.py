"""compare.py: recipes over seeds, read from finished runs or run; means, intervals, paired differences."""
import json
import math
import os
import subprocess

import pytest
import safetensors.torch

import compare
import config
from helpers import FAST, read, run_train

SHORT = FAST[2:] + ["--max_steps", "2", "--save_every", "2"]  # FAST without its --config


def test_finished_runs_are_read_and_summarised(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    for recipe in ("tiny", "tiny_dapo"):
        for seed in (0, 1):
            run_train(["--config", f"configs/{recipe}.yaml", *SHORT, "--seed", str(seed),
                       "--out_dir", str(out / recipe / f"seed{seed}")])
    run_train(["--resume", str(out / "tiny" / "seed1")])  # its config.json now names where it went on from
    assert json.loads((out / "tiny" / "seed1" / "config.json").read_text())["resume"] == str(out / "tiny" / "seed1")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a finished run was run again"))
    with pytest.raises(config.UserError, match=r"seed0 was trained with other settings.*max_steps: 2 there, 80 now"):
        compare.main(["configs/tiny.yaml", "--seeds", "0", "--out", str(out)])  # not the flags it was run with
    results = compare.main(["configs/tiny.yaml", "configs/tiny_dapo.yaml", "--seeds", "0,1", "--out", str(out), *SHORT])
    for name in ("tiny", "tiny_dapo"):
        for seed in (0, 1):
            evals = [r for r in read(out / name / f"seed{seed}" / "metrics.jsonl") if r["split"] == "eval"]
            fig = results[name][seed]
            assert (fig["start"], fig["end"]) == (evals[0]["accuracy"], evals[-1]["accuracy"])
            assert fig["gain"] == pytest.approx(evals[-1]["accuracy"] - evals[0]["accuracy"])
    text = (out / "compare.md").read_text()
    ends = [results["tiny_dapo"][s]["end"] - results["tiny"][s]["end"] for s in (0, 1)]
    mean, half = compare.mean_interval(ends)
    assert "| tiny_dapo | 0,1 |" in text and compare.pct(mean, half) in text  # the paired difference
    assert half == pytest.approx(12.706 * abs(ends[0] - ends[1]) / math.sqrt(2) / math.sqrt(2))
    assert os.path.getsize(out / "compare.png") > 1000


def test_missing_runs_are_run_on_one_warm_start_and_bad_requests_are_named(tmp_path):
    out = tmp_path / "cmp"
    results = compare.main(["configs/tiny.yaml", "configs/tiny_dapo.yaml", "--seeds", "3", "--out", str(out), *SHORT])
    assert compare.finished(str(out / "tiny" / "seed3")) and list(results["tiny"]) == [3]
    assert len(os.listdir(out / "sft_cache")) == 1  # tiny trained it, tiny_dapo loaded it
    assert results["tiny_dapo"][3]["start"] == results["tiny"][3]["start"]
    bases = [safetensors.torch.load_file(out / name / "seed3" / "base_model" / "model.safetensors")
             for name in ("tiny", "tiny_dapo")]
    assert all(bases[0][k].equal(bases[1][k]) for k in bases[0])
    with pytest.raises(config.UserError, match="baseline"):
        compare.main(["configs/tiny.yaml", "--baseline", "nope", "--out", str(out)])
    with pytest.raises(config.UserError, match="--seeds instead"):
        compare.main(["configs/tiny.yaml", "--seed", "1", "--out", str(out)])
