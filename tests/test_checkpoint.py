"""Checkpoints restore where they are loaded: this rank's device, this machine's GPUs, the newest
checkpoint that can be read."""
import torch

import checkpoint


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
