"""Runs that survive: kill -9 then --resume, non-finite steps, out of memory, a full disk, Ctrl-C.

Every fault runs the tiny model end to end. A resumed run must log exactly what an uninterrupted
run logs (same steps, same figures), and no checkpoint is ever left half-written.
"""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import checkpoint
import grpo
import logprobs
import optim
import rollout
from helpers import FAST, read, run_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = FAST + ["--max_steps", "4", "--save_every", "2", "--eval_every", "2"]
COMPARED = ("reward", "loss", "grad_norm", "completion_len", "kl", "accuracy", "pass@2")

# Runs train.py in a child process that SIGKILLs itself on the nth call of module.function.
KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, os.path.join({repo!r}, "tests"))
    import torch
    torch.set_num_threads(2)
    from helpers import run_train
    module, name = sys.argv[1].split(":")
    module, nth, calls = importlib.import_module(module), int(sys.argv[2]), [0]
    original = getattr(module, name)
    def killer(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(module, name, killer)
    run_train(sys.argv[3:])
""")


def same_logs(a_dir, b_dir):
    a, b = read(f"{a_dir}/metrics.jsonl"), read(f"{b_dir}/metrics.jsonl")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]  # none lost or doubled
    for ra, rb in zip(a, b):
        for key in COMPARED:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert len(read(f"{a_dir}/samples.jsonl")) == len(read(f"{b_dir}/samples.jsonl"))


def no_partial_checkpoints(out):
    root = f"{out}/checkpoints"
    assert not [d for d in os.listdir(root) if d.endswith(".tmp")]
    assert len([d for d in os.listdir(root) if d.startswith("step_")]) <= 2  # keep_last


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    run_train(RUN + ["--out_dir", out])
    return out


@pytest.mark.parametrize("where, nth", [
    ("rollout:generate", 4),        # the eval of step 2, before the first checkpoint: the run starts over
    ("rollout:generate", 5),        # sampling of step 3
    ("torch.autograd:backward", 5),  # the backward pass of step 3 (2 micro-batches per step)
    ("torch:save", 2),              # mid-checkpoint of step 4: its model is written, its state.pt not
], ids=["before-first-checkpoint", "sampling", "backward", "mid-checkpoint"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, straight, where, nth):
    out = str(tmp_path / "run")
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=REPO))
    child = subprocess.run([sys.executable, str(script), where, str(nth), *RUN, "--out_dir", out],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    run_train(["--resume", out])
    same_logs(straight, out)
    no_partial_checkpoints(out)
    assert checkpoint.latest(out).endswith("step_000004")


def test_ctrl_c_saves_a_checkpoint_and_resume_goes_on(tmp_path, straight, monkeypatch):
    out = str(tmp_path / "run")
    handler_before = signal.getsignal(signal.SIGINT)
    original, calls = grpo.group_advantages, [0]

    def interrupted(*args, **kwargs):  # Ctrl-C in the middle of step 3 (called once per step)
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(grpo, "group_advantages", interrupted)
    run_train(RUN + ["--out_dir", out])  # returns cleanly after finishing step 3
    assert checkpoint.latest(out).endswith("step_000003")
    assert max(r["step"] for r in read(f"{out}/metrics.jsonl")) == 3
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is given back
    monkeypatch.setattr(grpo, "group_advantages", original)
    run_train(["--resume", out])
    same_logs(straight, out)


def nan_loss_at(monkeypatch, bad_steps, micro_batches_per_step=2):
    """policy_loss returns NaN during the given steps (counted by its calls)."""
    original, calls = grpo.policy_loss, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss, stats = original(*args, **kwargs)
        step = (calls[0] - 1) // micro_batches_per_step + 1
        return (loss * float("nan"), stats) if step in bad_steps else (loss, stats)
    monkeypatch.setattr(grpo, "policy_loss", poisoned)


def test_a_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    nan_loss_at(monkeypatch, {2})
    run_train(FAST + ["--out_dir", out, "--max_steps", "3", "--save_every", "1", "--keep_last", "3",
                       "--eval_every", "10"])
    rows = {r["step"]: r for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"}
    assert [rows[s]["skipped"] for s in (1, 2, 3)] == [0, 1, 0]
    w1, w2 = _weights(f"{out}/checkpoints/step_000001"), _weights(f"{out}/checkpoints/step_000002")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped update changed nothing


def _weights(path):
    from safetensors.torch import load_file
    return load_file(f"{path}/model.safetensors")


def test_max_bad_steps_in_a_row_stop_with_a_checkpoint_of_the_last_good_weights(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    nan_loss_at(monkeypatch, {2, 3, 4})
    with pytest.raises(checkpoint.RunStopped, match="2 steps in a row .* step 3 .*last good weights"):
        run_train(FAST + ["--out_dir", out, "--max_steps", "6", "--save_every", "1", "--keep_last", "5",
                           "--eval_every", "10", "--max_bad_steps", "2"])
    assert checkpoint.latest(out).endswith("step_000003")
    w1, w3 = _weights(f"{out}/checkpoints/step_000001"), _weights(f"{out}/checkpoints/step_000003")
    assert all(torch.equal(w1[k], w3[k]) for k in w1)


def test_out_of_memory_in_the_loss_retries_with_smaller_micro_batches(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    original, failed = logprobs.token_logps, []

    def tight(model, input_ids, *args, **kwargs):  # 4 chains do not fit, once (not the warm start's 32)
        if input_ids.shape[0] == 4 and not failed:
            failed.append(input_ids.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(model, input_ids, *args, **kwargs)
    monkeypatch.setattr(logprobs, "token_logps", tight)
    run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--eval_every", "10", "--save_every", "10"])
    rows = [r for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"]
    assert failed == [4] and [r["micro_batch_size"] for r in rows] == [2, 4]  # halved for that step only
    assert all(r["skipped"] == 0 for r in rows)


def test_out_of_memory_at_one_chain_stops_with_a_checkpoint_and_the_settings_to_lower(tmp_path, monkeypatch):
    out = str(tmp_path / "run")

    original = logprobs.token_logps

    def never_fits(model, input_ids, *args, **kwargs):  # no GRPO micro-batch fits (the warm start's batch of 32 does)
        if input_ids.shape[0] <= 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(model, input_ids, *args, **kwargs)
    monkeypatch.setattr(logprobs, "token_logps", never_fits)
    with pytest.raises(checkpoint.RunStopped, match="out of memory at step 1.*max_completion_tokens.*--resume"):
        run_train(FAST + ["--out_dir", out, "--max_steps", "2", "--eval_every", "10"])
    assert checkpoint.latest(out).endswith("step_000000")  # the warm-started weights, resumable
    assert [r["step"] for r in read(f"{out}/metrics.jsonl")] == [0]


def test_out_of_memory_in_the_optimizer_step_stops_with_a_checkpoint_and_the_settings_to_lower(tmp_path,
                                                                                                monkeypatch):
    out = str(tmp_path / "run")
    make_optimizer = optim.make_optimizer

    def tight_optimizer(model, cfg):  # GRPO's optimizer (not the warm start's) runs out in its second step
        optimizer, scheduler = make_optimizer(model, cfg)
        step, calls = optimizer.step, []

        def tight_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return step(*args, **kwargs)
        optimizer.step = tight_step
        return optimizer, scheduler
    monkeypatch.setattr(optim, "make_optimizer", tight_optimizer)
    with pytest.raises(checkpoint.RunStopped, match="out of memory at step 2 in the optimizer step.*Checkpoint of "
                                                    "step 1 saved.*lora_r > 0.*--resume"):
        run_train(FAST + ["--out_dir", out, "--max_steps", "3", "--eval_every", "10"])
    assert checkpoint.latest(out).endswith("step_000001")


def test_out_of_memory_while_sampling_samples_in_halves(tiny, monkeypatch):
    model, tok = tiny
    prompts = [f"question {i}" for i in range(4)]
    ids, mask = rollout.tokenize_prompts(tok, prompts, 32, "cpu")
    whole = rollout.generate(model, ids, mask, max_new_tokens=8, temperature=0.0)
    original, sizes = model.generate, []

    def small_only(*args, **kwargs):
        sizes.append(len(kwargs["input_ids"]))
        if sizes[-1] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)
    monkeypatch.setattr(model, "generate", small_only)
    split = rollout.generate(model, ids, mask, max_new_tokens=8, temperature=0.0)
    assert sizes == [4, 2, 1, 1, 2, 1, 1]  # halves, recursively, down to single rows
    assert torch.equal(whole[:, :split.shape[1]], split[:, :whole.shape[1]])  # greedy: the same tokens
    assert model.training


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    original, calls = torch.save, [0]

    def disk_full_second_time(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full_second_time)
    with pytest.raises(OSError, match="could not write checkpoint .*step_000002.*step_000001.*intact"):
        run_train(FAST + ["--out_dir", out, "--max_steps", "3", "--save_every", "1", "--eval_every", "10"])
    assert checkpoint.latest(out).endswith("step_000001")
    assert sorted(os.listdir(f"{out}/checkpoints")) == ["latest", "step_000001"]  # no partial folder
    monkeypatch.setattr(torch, "save", original)
    run_train(["--resume", out])  # the run goes on once there is space
    assert checkpoint.latest(out).endswith("step_000003")


def test_a_full_disk_while_logging_is_a_clear_error():
    with pytest.raises(checkpoint.RunStopped, match="could not append to /dev/full.*--resume"):
        checkpoint.append_jsonl("/dev/full", {"step": 1})


def test_ctrl_c_handler_is_not_installed_off_the_main_thread():
    import threading
    seen = []
    t = threading.Thread(target=lambda: seen.append(checkpoint.StopOnCtrlC().previous))
    t.start()
    t.join()
    assert seen == [None]


def test_prompt_plus_completion_longer_than_the_context_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="exceeds tiny's context of 1024 tokens"):
        run_train(FAST + ["--out_dir", str(tmp_path / "run"), "--max_completion_tokens", "1000"])


def test_resuming_full_weights_as_lora_is_refused(tmp_path, straight):
    config_before = open(f"{straight}/config.json").read()
    with pytest.raises(ValueError, match="holds full weights, but lora_r is 4"):
        run_train(["--resume", straight, "--lora_r", "4", "--train_only", ""])
    assert open(f"{straight}/config.json").read() == config_before  # a refused resume writes nothing
