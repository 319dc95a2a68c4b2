"""--fsdp on 2 CPU ranks (gloo): the update of one process for every loss type, LoRA, beta > 0; ranks that
never wait on each other forever, whatever their number of generate calls or micro-batches; checkpoints
that another number of ranks resumes; the levers it cannot run with refused before any model loads.
Every launch has a timeout (helpers.run), so a hang fails a test instead of the suite."""
import os
import sys

import pytest
import torch

import checkpoint
import config
import distributed
import evaluator
import samplers
from helpers import FAST, ROOT, TORCHRUN, one_process_and_two_ranks, read, run

sys.path.insert(0, os.path.join(ROOT, "tests"))
import fsdp_worker  # noqa: E402

FSDP = ["--fsdp", "true", "--optimizer", "adamw", "--kahan_updates", "false"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """fsdp_worker.py's outputs as one process (nothing sharded) and as two ranks with --fsdp."""
    out = tmp_path_factory.mktemp("fsdp")
    one_process_and_two_ranks("fsdp_worker.py", out)
    return out


def load(worker, name: str, world: int):
    return torch.load(worker / f"{name}_world{world}.pt", weights_only=False)


def assert_same_weights(one: dict, two: dict, atol: float = 2e-6) -> None:
    assert one.keys() == two.keys()
    for name, w in one.items():
        assert torch.allclose(w, two[name], rtol=0, atol=atol), (name, (w - two[name]).abs().max())


@pytest.mark.parametrize("case", [c for c in fsdp_worker.CASES if c != "grpo_bf16"])
def test_sharded_ranks_take_the_update_of_one_process(worker, case):
    """Sharded weights, gradients reduce-scattered and summed, the head read inside the root's forward:
    the weights after the update and its figures are one process's. dapo_uneven: rank 0 trains 6 chains
    and rank 1 two (3 micro-batches against 1): rank 1 runs empty ones, and the update is still exact."""
    one, two = load(worker, case, 1), load(worker, case, 2)
    assert_same_weights(one["weights"], two["weights"])
    for key in ("loss", "grad_norm", "kl", "clip_frac"):
        assert two["figures"][key] == pytest.approx(one["figures"][key], rel=1e-5, abs=1e-7), key
    assert one["figures"]["grad_norm"] > 1e-3
    if case == "dapo_uneven":
        assert_same_weights(load(worker, "dapo", 1)["weights"], two["weights"])


def test_bf16_mixed_precision_keeps_fp32_master_weights(worker):
    """bf16 compute over fp32 shards: the update is the fp32 one up to bf16's rounding of the forward
    (Adam's first step, lr * g / |g|, turns a rounding difference on a near-zero gradient into up to 2 lr)."""
    fp32, bf16 = load(worker, "grpo", 1)["weights"], load(worker, "grpo_bf16", 2)["weights"]
    off = torch.cat([(w - bf16[name]).abs().flatten() for name, w in fp32.items()])
    assert off.max() <= 2 * fsdp_worker.LR and (off > 1e-3).float().mean() < 0.01
    assert off.max() > 1e-5  # computed in bf16, not in fp32
    assert all(w.dtype == torch.float32 for w in bf16.values())


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_the_reverse(worker):
    """A checkpoint holds whole tensors: the one-process run's resumes sharded on 2 ranks, the sharded
    run's on one process (here), and both continue as the run that never stopped (its second update)."""
    uninterrupted = load(worker, "continued", 1)
    assert_same_weights(uninterrupted, load(worker, "continued", 2))
    assert_same_weights(uninterrupted, load(worker, "resumed", 2))  # 1 -> 2 ranks
    path = str(worker / "ckpt_world2" / "checkpoints" / "step_000001")
    assert checkpoint.unreadable(path) is None and checkpoint.latest(str(worker / "ckpt_world2")) == path
    train, _ = fsdp_worker.builtin_tasks.arithmetic_task(64, 4, seed=0)
    _, tokenizer = fsdp_worker.tiny(train)
    r, totals = fsdp_worker.chains(tokenizer, train)
    cfg = config.Config(**fsdp_worker.BASE, loss_type="dapo", weight_decay=0.1)
    adv = fsdp_worker.grpo.group_advantages(totals, r.group, cfg.adv_scale)[0]
    assert_same_weights(uninterrupted, fsdp_worker.resume(path, cfg, tokenizer, r, adv))  # 2 ranks -> 1


@pytest.mark.parametrize("mode", ["unshard", "per_layer"])
def test_every_sampler_keeps_sharded_ranks_in_step(worker, mode):
    """Each sampler (plain, guided, GHPO, the rules verifier), plain with LoRA, and dynamic sampling where
    rank 1 samples 3 rounds and rank 0 one, runs to the end in both sampling modes (a hang would time the
    worker out), and per-layer gathering samples the tokens of the unsharded model."""
    results = load(worker, "sampling", 2)
    for name in [*samplers.SAMPLERS, "dynamic", "plain_lora"]:
        got = results[f"{mode}/{name}"]
        assert got["figures"]["grad_norm"] > 0 and got["texts"] == results[f"unshard/{name}"]["texts"], name
    assert results[f"{mode}/dynamic"]["calls"] == [1, 3]
    assert results[f"{mode}/dynamic"]["figures"]["sampling_rounds"] == 2.0  # the mean over the ranks


@pytest.mark.parametrize("mode", ["unshard", "per_layer"])
def test_a_sharded_greedy_evaluation_is_the_one_of_one_process(worker, mode):
    """5 questions in batches of 2: rank 0 makes two generate calls, rank 1 one."""
    one, two = load(worker, "sampling", 1)[f"{mode}/eval"], load(worker, "sampling", 2)[f"{mode}/eval"]
    assert one == two and one[0]["n"] == 5


def test_levers_fsdp_cannot_run_with_are_named_before_any_model_loads(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *args, **kwargs: None)
    with pytest.raises(config.UserError, match=r"--fsdp cannot run with: liger .*; optimizer adamw8bit .*set "
                                               r"optimizer adamw.*; kahan_updates .*set kahan_updates false"):
        distributed.setup(config.Config(fsdp=True, liger=True, prompts_per_step=4), "cpu")
    with pytest.raises(config.UserError, match="prompts_per_step 3 does not split over 2 ranks"):
        distributed.setup(config.Config(fsdp=True, optimizer="adamw", kahan_updates=False, prompts_per_step=3), "cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: --fsdp shards nothing, so nothing is refused
    distributed.setup(config.Config(fsdp=True, liger=True), "cpu")


def test_a_sharded_run_killed_mid_step_resumes_as_if_never_stopped(tmp_path):
    """train.py --fsdp under torchrun: rank 1 is killed (SIGKILL) as it starts sampling step 4, after step
    3's lines were logged; --resume goes back to step 2's checkpoint and redoes step 3 with the figures the
    killed run logged for it; the checkpoint is an HF folder that evaluator.py --model scores as the run's
    last eval. (Resuming on another number of ranks: test_a_checkpoint_of_two_ranks_resumes_on_one_and_the_reverse.)"""
    out = str(tmp_path / "killed")
    args = [*FAST, *FSDP, "--sft_steps", "20", "--save_every", "2", "--eval_every", "3", "--max_steps", "4",
            "--rewards", "correctness=1,overlong=1", "--out_dir", out]  # overlong: rewards that differ in a group
    done = run(TORCHRUN + ["tests/dist_train.py", "killed_at_step_4", *args])
    assert done.returncode != 0 and "Signal 9 (SIGKILL)" in done.stderr, done.stderr[-3000:]
    assert checkpoint.latest(out).endswith("step_000002")
    logged = read(f"{out}/metrics.jsonl")
    assert any(row.get("grad_norm", 0) > 0 for row in logged)  # the checkpoint's weights moved
    before = [row for row in logged if row["step"] == 3]  # step 3's train and eval lines, from those weights
    assert [row["split"] for row in before] == ["train", "eval"]
    done = run(TORCHRUN + ["train.py", "--resume", out])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read(f"{out}/metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows if r["split"] == "train"] == [(s, "train") for s in (1, 2, 3, 4)]
    for old, new in zip(before, [row for row in rows if row["step"] == 3]):
        for key in ("reward", "loss", "grad_norm", "accuracy"):
            assert new.get(key) == pytest.approx(old.get(key), rel=1e-4, abs=1e-6), (old["split"], key)
    results = evaluator.main(["--model", out, "--out", str(tmp_path / "eval.jsonl")])
    last = [row for row in rows if row["split"] == "eval"][-1]
    assert last["step"] == 4 and results["model"]["metrics"] == {k: last[k] for k in results["model"]["metrics"]}


def test_out_of_memory_in_a_sharded_loss_pass_ends_the_run_at_once_keeping_its_checkpoint(tmp_path):
    """Rank 1 runs out of memory in step 2's loss pass, where rank 0 waits in the pass's weight gathers:
    the run ends in seconds (not at the process group's 30-minute timeout), says why once, and keeps
    step 1's checkpoint whole."""
    out = str(tmp_path / "pass")
    done = run(TORCHRUN + ["tests/dist_train.py", "oom_at_step_2", *FAST, *FSDP, "--max_steps", "3", "--eval_every",
                           "3", "--save_every", "1", "--out_dir", out], timeout=150)
    assert done.returncode != 0
    message = "stopped: out of memory in the loss pass under --fsdp on rank 1"
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    path = checkpoint.latest(out)
    assert path.endswith("step_000001") and checkpoint.unreadable(path) is None
    assert [r["step"] for r in read(os.path.join(out, "metrics.jsonl")) if r["split"] == "train"] == [1]


def test_out_of_memory_on_one_sharded_rank_stops_both_with_a_checkpoint(tmp_path):
    """Rank 1 runs out of memory while sampling step 2: both ranks stop, the message is printed once, and
    the checkpoint of step 1, whose gathering needs both ranks' shards, is saved whole."""
    out = str(tmp_path / "sampling")
    done = run(TORCHRUN + ["tests/dist_train.py", "sampler_oom", *FAST, *FSDP, "--max_steps", "3", "--eval_every", "3",
                           "--out_dir", out])
    assert done.returncode != 0
    assert done.stderr.count("stopped: out of memory at step 2") == 1, done.stderr[-3000:]
    path = checkpoint.latest(out)
    assert path.endswith("step_000001") and checkpoint.unreadable(path) is None
