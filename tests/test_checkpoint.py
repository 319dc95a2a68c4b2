"""Checkpoints restore where they are loaded: this rank's device, this machine's GPUs, the newest
checkpoint that can be read."""
import os

import pytest
import torch

import checkpoint
import config
import llms
import optim


def saved_run(tmp_path, tiny, steps=(2, 4)):
    """A run folder with a checkpoint of the tiny model at each of `steps`, as train.py leaves it."""
    model, tokenizer = tiny
    out = tmp_path / "run"
    cfg = config.Config(model_name=llms.TINY, optimizer="adamw", out_dir=str(out), keep_last=5)
    checkpoint.Run(cfg)  # writes config.json
    optimizer, scheduler = optim.make_optimizer(model, cfg)
    for step in steps:
        checkpoint.save(str(out), step, model, tokenizer, optimizer, scheduler, keep_last=5)
    return out, cfg


def test_optimizer_state_saved_on_a_gpu_loads_onto_the_weights_device(tmp_path, tiny, monkeypatch):
    """Under torchrun rank 0's state.pt holds cuda:0 tensors; each rank must load them onto its own GPU
    (bitsandbytes moves only its own keys, so a Kahan residual left on cuda:0 breaks the first step).
    On the CPU: the map_location torch.load gets sends a GPU-saved tensor to the weights' device (here
    the meta device, standing in for cuda:1), and leaves CPU-saved tensors (the RNG states) where they are."""
    out, _ = saved_run(tmp_path, tiny, steps=(2,))
    seen = {}
    original = torch.load

    def recording_load(*args, **kwargs):
        seen["map_location"] = kwargs.get("map_location")
        return original(*args, **kwargs)
    monkeypatch.setattr(torch, "load", recording_load)
    weight = torch.nn.Parameter(torch.empty(3, device="meta"))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    monkeypatch.setattr(optimizer, "load_state_dict", lambda state: None)  # the tiny model's state does not fit
    checkpoint.load_state(str(out / "checkpoints" / "step_000002"), optimizer, scheduler)
    place = seen["map_location"]
    assert callable(place)
    storage = torch.UntypedStorage(4)
    assert place(storage, "cuda:0").device.type == "meta"
    assert place(storage, "cpu") is storage


class FakeCuda:
    """torch.cuda on a machine with `visible` GPUs, current device `current`: per-device RNG states."""

    def __init__(self, visible, current=0):
        self.visible, self.current, self.states = visible, current, {}

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([self.current]))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: [torch.tensor([i]) for i in range(self.visible)])

        def set_state(state, device="cuda"):
            index = self.current if device == "cuda" else int(device)
            if index >= self.visible:  # what torch raises for a GPU that is not there
                raise IndexError(f"no GPU {index}: {self.visible} visible")
            self.states[index] = int(state[0])
        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: [set_state(s, str(i)) for i, s in enumerate(states)])


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_on_one(monkeypatch):
    FakeCuda(visible=4, current=0).install(monkeypatch)
    state = checkpoint.rng_state()  # saved with 4 GPUs visible
    one = FakeCuda(visible=1)
    one.install(monkeypatch)
    checkpoint.set_rng_state(state)
    assert one.states == {0: 0}  # the saving device's stream, on this machine's one GPU
    # a checkpoint written before the current device's state alone was saved: one state per GPU
    old = {**state, "cuda": [torch.tensor([i]) for i in range(4)]}
    old.pop("cuda_device")
    one.states.clear()
    checkpoint.set_rng_state(old)
    assert one.states == {0: 0}


def test_resume_goes_on_from_the_newest_readable_checkpoint(tmp_path, tiny, capsys):
    out, _ = saved_run(tmp_path, tiny)
    newest = out / "checkpoints" / "step_000004"
    weights = newest / "model.safetensors"
    with open(weights, "r+b") as f:  # cut short, as a copy killed halfway leaves it
        f.truncate(os.path.getsize(weights) // 2)
    listing = sorted(os.listdir(out / "checkpoints"))
    run = checkpoint.Run(config.load(["--resume", str(out)]))
    assert run.ckpt == str(out / "checkpoints" / "step_000002") and run.model_path == run.ckpt
    said = capsys.readouterr().out
    assert "step_000004 cannot be read (model.safetensors:" in said and "step_000002" in said
    assert sorted(os.listdir(out / "checkpoints")) == listing  # nothing deleted
    with open(out / "checkpoints" / "step_000002" / "state.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(config.UserError, match="no checkpoint there can be read.*step_000004.*step_000002.*state.pt"):
        checkpoint.Run(config.load(["--resume", str(out)]))
    assert sorted(os.listdir(out / "checkpoints")) == listing
