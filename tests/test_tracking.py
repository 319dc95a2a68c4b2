"""report_to: TensorBoard and W&B get every figure of metrics.jsonl, and the completions table."""
import builtins
import glob
import os

import pytest

import config
import tracking
from helpers import FAST, read, run_train

SHORT = FAST + ["--max_steps", "2", "--save_every", "2", "--log_samples", "2"]


def test_tensorboard_holds_the_scalars_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "run")
    run_train(SHORT + ["--out_dir", out, "--report_to", "tensorboard"])
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {(key, e.step): e.value for key in events.Tags()["scalars"] for e in events.Scalars(key)}
    expected = {(k, row["step"]): v for row in read(f"{out}/metrics.jsonl") for k, v in tracking.scalars(row).items()}
    assert set(logged) == set(expected) and len(expected) > 30  # train and eval figures, every step
    assert all(logged[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in expected.items())
    assert ("accuracy", 0) in logged and ("reward", 1) in logged and ("loss", 2) in logged
    assert "samples/text_summary" in events.Tags()["tensors"]  # the completions table, each step


def test_wandb_offline_writes_its_run_folder_and_never_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "local-0123456789abcdef0123456789abcdef01234567")
    out = str(tmp_path / "run")
    run_train(SHORT + ["--out_dir", out, "--report_to", "wandb", "--wandb_project", "test"])
    runs = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    run_id = open(os.path.join(out, "wandb_id")).read().strip()
    assert len(runs) == 1 and run_id in runs[0]
    ours = [f"{out}/config.json", f"{out}/metrics.jsonl", f"{out}/samples.jsonl"]
    assert not any("0123456789abcdef" in open(p).read() for p in ours)
    assert "0123456789abcdef" not in capsys.readouterr().out


def test_a_missing_tracker_package_names_its_pip_command(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(config.UserError, match="pip install wandb"):
        tracking.make(config.Config(report_to=["wandb"]), str(tmp_path))
    with pytest.raises(config.UserError, match="report_to takes"):
        tracking.make(config.Config(report_to=["mlflow"]), str(tmp_path))
