"""grad_agreement.py: the cosine it reports, and a run on a warm-started tiny model."""
import torch

import grad_agreement
from helpers import FAST, run_train


def test_agreement_is_the_mean_pairwise_cosine():
    g = torch.tensor([1.0, 2.0, 0.0])
    grads = [{"w": g, "b": torch.tensor([1.0, 0.0])}, {"w": 2 * g, "b": torch.tensor([0.0, 1.0])},
             {"w": -g, "b": torch.tensor([1.0, 1.0])}]
    result = grad_agreement.agreement(grads)
    assert abs(result["w"] - (1 - 1 - 1) / 3) < 1e-6  # pairs: same direction, opposite, opposite
    assert abs(result["b"] - (0 + 2 * 0.5 ** 0.5) / 3) < 1e-6


def test_runs_on_a_tiny_model(tmp_path):
    out = str(tmp_path / "run")
    run_train(FAST + ["--out_dir", out, "--max_steps", "1"])
    result = grad_agreement.main(["--model", f"{out}/base_model", "--batches", "3", *FAST,
                                  "--rewards", "integer_answer=1"])  # varies between the untrained chains
    assert "model.norm.weight" in result and "all weights" in result
    assert all(-1 <= c <= 1 for c in result.values())
