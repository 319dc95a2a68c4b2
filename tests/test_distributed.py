"""torchrun on the CPU (gloo, 2 processes): the same update as one process, figures over all ranks, a
run that writes once and resumes on 2 ranks or 1, and errors that stop both ranks, printed once."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import FAST, ROOT, read

sys.path.insert(0, os.path.join(ROOT, "tests"))
import dist_worker  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SHORT = FAST + ["--prompts_per_step", "2", "--eval_every", "3"]


def run(argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """dist_worker.py's outputs as one process and as two ranks."""
    out = tmp_path_factory.mktemp("dist")
    for argv in ([sys.executable, "tests/dist_worker.py", str(out)], TORCHRUN + ["tests/dist_worker.py", str(out)]):
        done = run(argv)
        assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("case", list(dist_worker.CASES))
def test_two_ranks_take_the_update_of_one_process(worker, case):
    """Each rank trains on half of the groups; the weights after the update, and its loss and gradient
    norm (which Adam's first step would hide a wrong normaliser from), are those of one process."""
    one, two = (torch.load(worker / f"{case}_world{n}.pt", weights_only=False) for n in (1, 2))
    assert one["weights"].keys() == two["weights"].keys()
    for name, w in one["weights"].items():
        assert torch.allclose(w, two["weights"][name], rtol=0, atol=2e-5), name
    for key in ("loss", "grad_norm", "kl", "clip_frac"):
        assert two["figures"][key] == pytest.approx(one["figures"][key], rel=1e-5, abs=1e-7), key
    assert one["figures"]["grad_norm"] > 1e-3


def test_the_train_line_is_over_every_rank(worker):
    """Rank 0's chains score 0 and 1 (every group informative), rank 1's all 1 (no group informative):
    the logged figures are over both ranks' chains, not rank 0's."""
    one, two = (torch.load(worker / f"figures_world{n}.pt", weights_only=False) for n in (1, 2))
    assert (one["reward"], one["zero_adv_frac"], one["idea/rank"]) == (0.5, 0.0, 0.0)
    assert (two["reward"], two["zero_adv_frac"], two["idea/rank"]) == (0.75, 0.5, 0.5)
    assert two["reward_std"] == pytest.approx(torch.tensor([0.0, 1, 0, 1, 1, 1, 1, 1]).std().item())


def test_a_torchrun_run_writes_once_and_resumes_on_two_ranks_and_on_one(tmp_path):
    out = str(tmp_path / "run")
    done = run(TORCHRUN + ["train.py", *SHORT, "--max_steps", "3", "--save_every", "3", "--out_dir", out])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: ") == 1  # rank 0 alone prints
    lines = read(f"{out}/metrics.jsonl")
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in lines if r["split"] == "eval"] == [0, 3]
    assert sorted(os.listdir(f"{out}/checkpoints")) == ["latest", "step_000003"]
    assert len(read(f"{out}/samples.jsonl")) == 3 * 4  # log_samples chains per step, once
    done = run(TORCHRUN + ["train.py", "--resume", out, "--max_steps", "4"])
    assert done.returncode == 0, done.stderr[-3000:]
    done = run([sys.executable, "train.py", "--resume", out, "--max_steps", "5"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4, 5]


def test_errors_stop_both_ranks_and_are_printed_once(tmp_path):
    done = run(TORCHRUN + ["train.py", *FAST, "--prompts_per_step", "3", "--out_dir", str(tmp_path / "a")])
    assert done.returncode != 0 and done.stderr.count("error: prompts_per_step 3 does not split over 2 ranks") == 1
    done = run(TORCHRUN + ["tests/dist_train.py", "sampler_fails", *SHORT, "--max_steps", "4",
                           "--out_dir", str(tmp_path / "b")])
    assert done.returncode != 0
    assert done.stderr.count("error: the verifier server stopped answering (rank 1's test fault)") == 1
    assert f'File "{ROOT}' not in done.stderr  # no traceback from our code (torchrun prints its own summary)
    assert [r["step"] for r in read(tmp_path / "b" / "metrics.jsonl") if r["split"] == "train"] == [1]


def test_a_reward_raising_on_one_rank_is_counted_over_both(tmp_path):
    """A reward that raises scores 0 and the run goes on (rewards.score), on any rank: rank 1's errors
    are in the train line rank 0 writes."""
    done = run(TORCHRUN + ["tests/dist_train.py", "flaky_reward", *SHORT, "--max_steps", "1",
                           "--rewards", "correctness=1,flaky=1", "--out_dir", str(tmp_path / "c")])
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(r for r in read(tmp_path / "c" / "metrics.jsonl") if r["split"] == "train")
    assert line["reward_errors/flaky"] == 4 and line["reward/flaky"] == 0.5  # rank 1's 4 chains of 8
