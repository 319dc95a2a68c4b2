"""Checkpoints that a crash cannot break, and resuming from them.

A checkpoint is a folder `out_dir/checkpoints/step_000050/` with the model (`save_pretrained`: full
weights or the LoRA adapter), the tokenizer, and `state.pt` (optimizer, scheduler, RNG states, step).
It is written under a `.tmp` name and renamed when complete; `checkpoints/latest` names the newest
complete one and is itself replaced atomically. So a kill at any moment leaves the previous
checkpoint intact and never a partial one under a final name.
"""
import json
import os
import random
import shutil

import numpy as np
import torch


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(path: str, model, tokenizer, state: dict | None = None, what: str = "model",
               intact: str = "What was saved before") -> None:
    """Model, tokenizer (and `state` as state.pt) written under `path.tmp`, then renamed: `path` is
    complete or absent. A failed write (typically a full disk) leaves what was there untouched."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"could not write {what} {path}: {e.strerror or e}. {intact} is intact. "
                               f"Free disk space, then continue with --resume") from e
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a rename is atomic


def save(out_dir: str, step: int, model, tokenizer, optimizer, scheduler, keep_last: int) -> str:
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    for d in os.listdir(root) if os.path.isdir(root) else []:  # partial folders left by crashes
        if d.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state()}
    save_model(final, model, tokenizer, state, what="checkpoint",
               intact=f"The previous checkpoint ({latest(out_dir) or 'none yet'})")
    write_atomic(os.path.join(root, "latest"), os.path.basename(final))
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for old in complete[:-max(1, keep_last)]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest(out_dir: str) -> str | None:
    pointer = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(out_dir, "checkpoints", f.read().strip())
    return path if os.path.exists(os.path.join(path, "state.pt")) else None


def is_adapter(path: str) -> bool:
    return os.path.exists(os.path.join(path, "adapter_config.json"))


def load_state(path: str, optimizer, scheduler) -> dict:
    """Restore optimizer and scheduler; returns the state (step, rng) for the caller to apply last."""
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def truncate_log(path: str, step: int) -> None:
    """Drop lines logged after `step` (they will be redone) and any half-written line."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    write_atomic(path, "".join(kept))
