import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from plot import moving_average, plot, read_metrics  # noqa: E402

NAMES = ["reward.png", "accuracy.png", "health.png"]


def write_run(path, n_steps=30, evals=True, garbage=False):
    path.mkdir()
    lines = []
    for s in range(n_steps):
        r = s / n_steps
        lines.append({"step": s, "split": "train", "reward": r, "reward/correctness": r,
                      "reward/format": 1.0, "reward_std": 0.3, "zero_adv_frac": 0.25,
                      "completion_len": 30 + s, "loss": 0.01, "grad_norm": 0.5, "lr": 1e-5,
                      "kl": 0.0, "clip_frac": 0.0, "step_time_s": 1.2})
        if evals and s % 10 == 0:
            lines.append({"step": s, "split": "eval", "accuracy": r, "n": 200, "pass@4": min(1, 2 * r)})
    text = "".join(json.dumps(x) + "\n" for x in lines)
    if garbage:
        text += '{"step": 30, "split": "tra'  # crash mid-write
    (path / "metrics.jsonl").write_text(text)
    return str(path)


def assert_pngs(paths, out_dir):
    assert sorted(os.path.basename(p) for p in paths) == sorted(NAMES)
    for name in NAMES:
        data = (out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG")
        assert len(data) > 5000
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp")]


def test_moving_average():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([3, 1, 2], 10) == [3, 2, 2]
    assert moving_average([], 5) == []


def test_read_metrics_skips_garbage(tmp_path):
    run = write_run(tmp_path / "a", garbage=True)
    rows = read_metrics(run)
    assert len(rows) == 33 and all(isinstance(r, dict) for r in rows)
    assert read_metrics(str(tmp_path / "missing")) == []


def test_plot_two_runs(tmp_path):
    a = write_run(tmp_path / "a", garbage=True)
    b = write_run(tmp_path / "b", n_steps=20)
    out = tmp_path / "out"
    assert_pngs(plot([a, b], str(out), window=5), out)
    assert_pngs(plot([a, b], str(out), window=5), out)  # repeated calls overwrite in place


@pytest.mark.parametrize("kind", ["no_eval", "empty"])
def test_plot_without_data_still_writes(tmp_path, kind):
    run = tmp_path / "r"
    if kind == "no_eval":
        write_run(run, evals=False)
    else:
        run.mkdir()  # training has not logged anything yet
    assert_pngs(plot([str(run)], str(run)), run)


def test_cli(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b")
    out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, "plot.py", a, b, "--out", str(out), "--window", "3"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert_pngs(res.stdout.split(), out)
