"""torchrun on the CPU (gloo, 2 processes): the same update as one process, figures over all ranks, a
run that writes once and resumes on 2 ranks or 1, and errors that stop both ranks, printed once."""
import os
import sys

import pytest
import torch

import checkpoint
import samplers
from helpers import FAST, ROOT, TORCHRUN, one_process_and_two_ranks, read, run

sys.path.insert(0, os.path.join(ROOT, "tests"))
import dist_worker  # noqa: E402

SHORT = FAST + ["--prompts_per_step", "2", "--eval_every", "3"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """dist_worker.py's outputs as one process and as two ranks."""
    out = tmp_path_factory.mktemp("dist")
    one_process_and_two_ranks("dist_worker.py", out)
    return out


@pytest.mark.parametrize("case", list(dist_worker.CASES))
def test_two_ranks_take_the_update_of_one_process(worker, case):
    """Each rank trains on half of the groups; the weights after the update, and its loss and gradient
    norm (which Adam's first step would hide a wrong normaliser from), are those of one process."""
    one, two = (torch.load(worker / f"{case}_world{n}.pt", weights_only=False) for n in (1, 2))
    assert one["weights"].keys() == two["weights"].keys()
    bf16 = dist_worker.CASES[case].get("dtype") == "bf16"
    for name, w in one["weights"].items():
        if bf16:  # bf16 gradients sum in another order; Adam's first step, lr * g / |g|, turns a rounding
            # difference on a near-zero gradient into up to 2 lr: allowed on a few weights, never more
            off = (w - two["weights"][name]).abs()
            assert off.max() <= 2 * dist_worker.LR and (off > 1e-4).float().mean() < 0.02, name
        else:
            assert torch.allclose(w, two["weights"][name], rtol=0, atol=2e-5), name
    for key in ("loss", "grad_norm", "kl", "clip_frac"):
        assert two["figures"][key] == pytest.approx(one["figures"][key], rel=1e-2 if bf16 else 1e-5, abs=1e-7), key
    assert one["figures"]["grad_norm"] > 1e-3
    if case == dist_worker.UNUSED_WEIGHT:  # without a gradient, AdamW leaves it: no weight decay
        assert torch.equal(two["weights"]["unused"], torch.ones(4))


def test_the_train_line_is_over_every_rank(worker):
    """Rank 0's chains score 0 and 1 (every group informative), rank 1's all 1 (no group informative):
    the logged figures are over both ranks' chains, not rank 0's."""
    one, two = (torch.load(worker / f"figures_world{n}.pt", weights_only=False) for n in (1, 2))
    assert (one["reward"], one["zero_adv_frac"], one["idea/rank"]) == (0.5, 0.0, 0.0)
    assert (two["reward"], two["zero_adv_frac"], two["idea/rank"]) == (0.75, 0.5, 0.5)
    assert two["reward_std"] == pytest.approx(torch.tensor([0.0, 1, 0, 1, 1, 1, 1, 1]).std().item())


@pytest.mark.parametrize("idea", list(samplers.SAMPLERS))  # a new idea is covered at once
def test_every_sampling_idea_keeps_the_ranks_in_step(worker, idea):
    """Each rank samples its questions with its own sampler (every idea of samplers.SAMPLERS: plain,
    guided, GHPO, the rules verifier); the update keeps every rank's weights equal, and the idea's own
    figures reach the train line."""
    two = torch.load(worker / "ideas_world2.pt", weights_only=False)[idea]
    assert two["in_sync"] and two["figures"]["grad_norm"] > 0
    assert two["stats_keys"] <= two["figures"].keys()
    if idea != "plain":  # the shipped ideas other than plain sampling log figures of their own
        assert two["stats_keys"]


def test_a_greedy_evaluation_over_two_ranks_is_the_one_of_one_process(worker):
    one, two = (torch.load(worker / f"ideas_world{n}.pt", weights_only=False)["eval"] for n in (1, 2))
    assert one == two and one[0]["n"] == 7
    assert len({rec["completions"][0] for rec in one[1]}) == 7  # a different completion for each question


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


def test_out_of_memory_on_one_rank_retries_or_stops_on_both(tmp_path):
    """Rank 1 alone runs out of memory in the loss pass: both ranks retry with half the micro-batch (no
    hang in the gradient all-reduce); when even one chain does not fit, both stop, the message is printed
    once and rank 0 saves the last finished step's checkpoint, as one process would."""
    done = run(TORCHRUN + ["tests/dist_train.py", "oom_once", *SHORT, "--max_steps", "2",
                           "--out_dir", str(tmp_path / "once")])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read(tmp_path / "once" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["micro_batch_size"] for r in rows] == [2, 4]
    out = tmp_path / "always"
    done = run(TORCHRUN + ["tests/dist_train.py", "oom_always", *SHORT, "--max_steps", "2", "--out_dir", str(out)])
    assert done.returncode != 0
    assert done.stderr.count("stopped: out of memory at step 1") == 1, done.stderr[-3000:]
    assert checkpoint.latest(str(out)).endswith("step_000000")
    out = tmp_path / "sampling"  # while sampling: the same stop, and step 1's checkpoint
    done = run(TORCHRUN + ["tests/dist_train.py", "sampler_oom", *SHORT, "--max_steps", "3", "--out_dir", str(out)])
    assert done.returncode != 0
    assert done.stderr.count("stopped: out of memory at step 2") == 1, done.stderr[-3000:]
    assert checkpoint.latest(str(out)).endswith("step_000001")


def test_out_of_memory_in_one_ranks_optimizer_step_stops_both_with_rank_0s_checkpoint(tmp_path):
    """Rank 1 runs out of memory in its optimizer step of step 2, after rank 0 took its own: both stop
    (rank 0 is not left waiting in the next collective), the message is printed once, and rank 0 saves
    the checkpoint of what its weights hold, step 2, from which the run resumes."""
    out = tmp_path / "optimizer"
    done = run(TORCHRUN + ["tests/dist_train.py", "optimizer_oom", *SHORT, "--max_steps", "3", "--out_dir", str(out)])
    assert done.returncode != 0
    assert done.stderr.count("stopped: out of memory at step 2 in the optimizer step") == 1, done.stderr[-3000:]
    assert "Checkpoint of step 2 saved (its train line was not logged)" in done.stderr
    assert checkpoint.latest(str(out)).endswith("step_000002")
    done = run([sys.executable, "train.py", "--resume", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read(out / "metrics.jsonl") if r["split"] == "train"] == [1, 3]


def test_bnpo_under_torchrun_warns_that_its_loss_differs_from_one_process(monkeypatch, capsys):
    """bnpo's normaliser is per micro-batch and a rank's micro-batches hold its own chains: the user is
    told, with the settings under which the two agree (the exact cases above use them)."""
    import config
    import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *args, **kwargs: None)
    distributed.setup(config.Config(loss_type="bnpo", prompts_per_step=4, num_chains=4, micro_batch_size=4), "cpu")
    assert "loss_type bnpo normalises by each micro-batch's tokens" in capsys.readouterr().err
    distributed.setup(config.Config(loss_type="bnpo", prompts_per_step=4, num_chains=4, micro_batch_size=4,
                                    sort_micro_batches=False), "cpu")  # the same micro-batches: no warning
    distributed.setup(config.Config(loss_type="grpo", prompts_per_step=4, num_chains=4, micro_batch_size=4), "cpu")
    assert capsys.readouterr().err == ""
