"""What several test files share: the fast tiny recipe, reading logs, and running train.py.

train.py is a script that nothing imports; tests run it as `python train.py` would, in this process
(runpy), so monkeypatched modules (rewards.REWARDS, rollout.generate, ...) reach the run.
"""
import json
import os
import runpy
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "train.py")
FAST = ["--config", "configs/tiny.yaml", "--tiny_hidden", "32", "--tiny_layers", "2", "--sft_steps", "3",
        "--prompts_per_step", "2", "--num_chains", "4", "--micro_batch_size", "4", "--max_completion_tokens",
        "24", "--eval_n", "6", "--eval_samples", "2", "--eval_every", "2",
        "--arithmetic_train_size", "200", "--arithmetic_test_size", "20"]


def run_train(argv: list[str]) -> None:
    """train.py's main(argv): its errors reach the caller as they are (checkpoint.RunStopped, ...)."""
    runpy.run_path(TRAIN_PY, run_name="train")["main"](argv)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """A command from the repo root, one thread per process, with a timeout: a hang fails the test."""
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_process_and_two_ranks(script: str, out) -> None:
    """tests/<script> run as one process, then as two torchrun ranks, each writing its outputs to `out`."""
    for argv in ([sys.executable, f"tests/{script}", str(out)], TORCHRUN + [f"tests/{script}", str(out)]):
        done = run(argv)
        assert done.returncode == 0, done.stderr[-3000:]


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
