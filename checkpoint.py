"""A run's folder: start or resume it, its append-only logs, checkpoints a crash cannot break, and
the guards of the loop (Ctrl-C, out of memory, non-finite steps, a full disk).

    run = Run(cfg)                          # a fresh run, or --resume: config.json, latest checkpoint, logs
    ... load the model from run.model_path (and LoRA from run.adapter_path) ...
    first_step = run.restore(optimizer, scheduler)
    with Guard(run, policy, optimizer, scheduler, cfg) as guard:
        for step in ...:
            ... update ...; guard.applied(step, skipped)
            ... log, evaluate ...; if guard.end_of_step(step): break

A checkpoint is a folder `out_dir/checkpoints/step_000050/` with the model (`save_pretrained`: full
weights or the LoRA adapter), the tokenizer, and `state.pt` (optimizer, scheduler, RNG states, step).
It is written under a `.tmp` name and renamed when complete; `checkpoints/latest` names the newest
complete one and is itself replaced atomically. So a kill at any moment leaves the previous
checkpoint intact and never a partial one under a final name.
"""
import json
import os
import random
import resource
import shutil
import signal
import threading
import zipfile

import numpy as np
import torch
from tqdm import tqdm

import config
import distributed
import fsdp
import tracking
import vision


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """The random streams a resumed run continues. CUDA: the current device's generator alone (one
    process uses one GPU; under torchrun seed_step reseeds every step), so that a checkpoint restores
    on a machine with fewer visible GPUs."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda_device": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if not torch.cuda.is_available():
        return
    if state.get("cuda_device") is not None:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif state.get("cuda"):  # an older checkpoint: one state per GPU visible when it was saved
        saved = state["cuda"]
        torch.cuda.set_rng_state(saved[min(torch.cuda.current_device(), len(saved) - 1)])


def save_model(path: str, model, tokenizer, state: dict | None = None, what: str = "model",
               intact: str = "What was saved before", weights: dict | None = None) -> None:
    """Model, tokenizer (and `state` as state.pt) written under `path.tmp`, then renamed: `path` is
    complete or absent. A failed write (typically a full disk) leaves what was there untouched.
    weights: the model's state dict gathered whole (--fsdp: fsdp.full_state), None = its own."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    try:
        # save_pretrained empties the state dict it is given: a shallow copy
        model.save_pretrained(tmp, **({} if weights is None else {"state_dict": dict(weights)}))
        tokenizer.save_pretrained(tmp)
        if vision.is_vl(tokenizer):  # a VL model's image processor, which llms.load reads back
            tokenizer.image_processor.save_pretrained(tmp)
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"could not write {what} {path}: {e.strerror or e}. {intact} is intact. "
                               f"Free disk space, then continue with --resume") from e
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a rename is atomic


def save(out_dir: str, step: int, model, tokenizer, optimizer, scheduler, keep_last: int,
         whole: tuple[dict | None, dict | None] = (None, None)) -> str:
    """whole: (weights, optimizer state) gathered from a sharded model (fsdp.full_state), else (None, None)."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    for d in os.listdir(root) if os.path.isdir(root) else []:  # partial folders left by crashes
        if d.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    weights, optimizer_state = whole
    state = {"step": step, "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
             "scheduler": scheduler.state_dict(), "rng": rng_state()}
    save_model(final, model, tokenizer, state, what="checkpoint",
               intact=f"The previous checkpoint ({latest(out_dir) or 'none yet'})", weights=weights)
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


def unreadable(path: str) -> str | None:
    """Why checkpoint `path` cannot be loaded (a weights file or state.pt cut short, say by a kill
    mid-copy or a full disk outside our atomic writes), or None. Reads headers only, not the weights."""
    from safetensors import safe_open

    weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not weights:
        return "no .safetensors weights in it"
    for name in weights:
        try:
            with safe_open(os.path.join(path, name), "pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError, not an OSError
            return f"{name}: {str(e).splitlines()[0][:200]}"
    try:
        zipfile.ZipFile(os.path.join(path, "state.pt")).close()  # torch.save writes a zip archive
    except (OSError, zipfile.BadZipFile) as e:
        return f"state.pt: {e}"
    return None


def newest_readable(out_dir: str) -> str | None:
    """The checkpoint a resume starts from: `latest`, or, when it cannot be read, the newest complete one
    that can (each one passed over is named). None when there is no complete checkpoint; a UserError
    when there are some but none can be read. Nothing is deleted."""
    root = os.path.join(out_dir, "checkpoints")
    folders = sorted((d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")),
                     reverse=True) if os.path.isdir(root) else []
    pointed = latest(out_dir)
    candidates = ([pointed] if pointed else []) + [os.path.join(root, d) for d in folders
                                                   if os.path.join(root, d) != pointed
                                                   and os.path.exists(os.path.join(root, d, "state.pt"))]
    broken = []
    for path in candidates:
        why = unreadable(path)
        if why is None:
            if broken:
                print(f"--resume: {'; '.join(broken)}. Going on from the newest readable checkpoint, {path} "
                      f"(nothing deleted)")
            return path
        broken.append(f"{path} cannot be read ({why})")
    if broken:
        raise config.UserError(f"--resume {out_dir}: no checkpoint there can be read: {'; '.join(broken)}. "
                               f"Copy the run folder again from where it is intact, or start a new run with "
                               f"another --out_dir (nothing was deleted)")
    return None


def is_adapter(path: str) -> bool:
    return os.path.exists(os.path.join(path, "adapter_config.json"))


def load_state(path: str, optimizer, scheduler) -> dict:
    """Restore optimizer and scheduler; returns the state (step, rng) for the caller to apply last.
    Tensors saved on a GPU load onto the device of the optimizer's weights (this rank's GPU under
    torchrun): saved by rank 0, they would otherwise all land on cuda:0, and bitsandbytes moves only
    its own state keys to the weight's device (a Kahan residual would stay behind)."""
    device = next((p.device for group in optimizer.param_groups for p in group["params"]), torch.device("cpu"))

    def onto_this_device(storage, location: str):  # what was on a GPU comes here; CPU tensors (RNG states) stay
        if location.startswith("cuda"):
            return torch.serialization.default_restore_location(storage, str(device))
        return storage
    state = torch.load(os.path.join(path, "state.pt"), map_location=onto_this_device, weights_only=False)
    # whole tensors, whatever number of ranks saved them; --fsdp: cut to this rank's shards
    optimizer.load_state_dict(fsdp.shard_optimizer_state(optimizer, state["optimizer"]))
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


# ----------------------------------------------------------------------------------------------
# The run: start or resume, and its logs


class RunStopped(RuntimeError):
    """The run cannot go on (repeated non-finite steps, out of memory, full disk); the message says why
    and what to change. What the run wrote so far, its last checkpoint included, is intact."""


def append_jsonl(path: str, row: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # a full disk: say so; a half-written line is dropped on resume
        raise RunStopped(f"could not append to {path}: {e.strerror or e}. Free disk space, then continue with "
                         f"--resume {os.path.dirname(path)} (steps after the last checkpoint are redone)") from e


class Run:
    """cfg.out_dir as a fresh run (refused if it holds one already) or, with cfg.resume, as the run
    to continue: its newest readable checkpoint (newest_readable), the model to load and the logs
    trimmed to match.
    Writes config.json before any model is loaded, so --resume works from then on. Under torchrun every
    rank reads the same folder and rank 0 alone writes to it (`writes`)."""

    LOGS = ("metrics.jsonl", "samples.jsonl")

    def __init__(self, cfg):
        if cfg.resume:
            cfg.out_dir = cfg.resume
        self.cfg, self.dir, self.writes = cfg, cfg.out_dir, distributed.is_main()
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        if not cfg.resume and os.path.exists(self.metrics_path):  # never mix two runs or overwrite one
            raise config.UserError(f"{self.dir} already holds a run: continue it with --resume {self.dir}, "
                                   f"or start a new one with another --out_dir (or delete the folder)")
        if self.writes:
            os.makedirs(self.dir, exist_ok=True)
        self.ckpt = newest_readable(self.dir) if cfg.resume else None
        if cfg.resume and self.ckpt is None:  # stopped before its first checkpoint: nothing to keep, start over
            print(f"--resume {cfg.resume}: no complete checkpoint yet, so the run starts over in the same folder")
            self.trim_logs(-1)
        self.fresh, self.first_step = self.ckpt is None, 1
        self.base_dir = os.path.join(self.dir, "base_model")  # the model after its warm start, if any
        # what GRPO started from: the saved base of a resumed run, else model_name
        self.base = self.base_dir if self.ckpt is not None and os.path.isdir(self.base_dir) else cfg.model_name
        lora = self.ckpt is not None and is_adapter(self.ckpt)
        if self.ckpt is not None and lora != (cfg.lora_r > 0):
            raise config.UserError(f"{self.ckpt} holds {'a LoRA adapter' if lora else 'full weights'}, but lora_r is "
                                   f"{cfg.lora_r}: resume with the run's own lora_r (drop --lora_r from the command)")
        self.model_path = self.ckpt if self.ckpt and not lora else self.base  # full weights to load
        self.adapter_path = self.ckpt if lora else ""  # a LoRA adapter to load on top
        if self.writes:
            config.save(cfg, os.path.join(self.dir, "config.json"))
        self.trackers = tracking.make(cfg, self.dir) if self.writes else []  # report_to: TensorBoard, W&B

    def save_base(self, model, tokenizer) -> None:
        """Keep the starting weights (after a warm start): resume, LoRA and the reference load them.
        Under torchrun rank 0's (broadcast to all ranks later), and the other ranks wait until it is written."""
        if self.writes:
            save_model(self.base_dir, model, tokenizer, what="the warm-started model")
        distributed.barrier()
        self.base = self.base_dir

    def restore(self, optimizer, scheduler) -> int:
        """The first step to run: 1, or after the checkpoint's step with its optimizer, scheduler, RNG."""
        if self.ckpt is not None:
            state = load_state(self.ckpt, optimizer, scheduler)
            self.trim_logs(state["step"])
            set_rng_state(state["rng"])  # last, so that loading consumed no randomness
            print(f"resumed from {self.ckpt} at step {state['step']}")
            self.first_step = state["step"] + 1
        return self.first_step

    def trim_logs(self, step: int) -> None:
        if not self.writes:
            return
        for name in self.LOGS:
            truncate_log(os.path.join(self.dir, name), step)

    def log(self, row: dict) -> None:
        if not self.writes:
            return
        append_jsonl(self.metrics_path, row)
        for tracker in self.trackers:
            tracker.log(row)

    def log_samples(self, step: int, out, n: int) -> None:
        """The first n chains of a step (grpo.Step) with their rewards and advantage, to samples.jsonl
        (under torchrun: rank 0's first n)."""
        if not self.writes:
            return
        r = out.rollout
        rows = [{"step": step, "question": out.batch[r.group[i]]["question"], "answer": out.answers[i],
                 "completion": r.texts[i], "rewards": dict(zip(out.names, out.rewards[i].tolist())),
                 "advantage": out.advantages[i].item(), "info": r.info[i]} for i in range(min(n, len(r)))]
        for row in rows:
            append_jsonl(os.path.join(self.dir, "samples.jsonl"), row)
        for tracker in self.trackers:
            tracker.samples(step, rows)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def log_eval(self, step: int, metrics: dict, records: list[dict]) -> None:
        if not self.writes:
            return
        self.log({"step": step, "split": "eval", **metrics})
        os.makedirs(os.path.join(self.dir, "eval"), exist_ok=True)
        with open(os.path.join(self.dir, "eval", f"step_{step:06d}.jsonl"), "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)


# ----------------------------------------------------------------------------------------------
# The guards of the loop


def peak_mem_gb() -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StopOnCtrlC:
    """From creation to restore(), the first Ctrl-C only asks the loop to stop after the current step
    (which then saves a checkpoint); a second one interrupts at once, the previous checkpoint intact."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)")

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Guard:
    """Around the loop: checkpoints every save_every steps and at the end; stops with a checkpoint on
    Ctrl-C, after max_bad_steps non-finite updates in a row, and on out-of-memory (the update and
    sampling have already retried in smaller pieces), each with what to change in the message."""

    def __init__(self, run: Run, policy, optimizer, scheduler, cfg):
        self.run, self.policy, self.optimizer, self.scheduler, self.cfg = run, policy, optimizer, scheduler, cfg
        self.last_done = run.first_step - 1  # the last step whose update is applied: what a checkpoint holds
        self.bad_steps = 0  # updates skipped in a row for a non-finite loss or gradient
        self.ctrl_c = None

    def __enter__(self):
        self.ctrl_c = StopOnCtrlC()
        return self

    def save(self, step: int) -> None:
        # --fsdp: every rank takes part in gathering the shards; rank 0 alone writes
        whole = fsdp.full_state(self.policy.model, self.optimizer)
        if not self.run.writes:  # the ranks hold the same weights and optimizer state: rank 0 saves them
            return
        save(self.run.dir, step, self.policy.model, self.policy.tokenizer, self.optimizer, self.scheduler,
             self.cfg.keep_last, whole)

    def applied(self, step: int, skipped: bool) -> None:
        """Step `step`'s update is done (or skipped): from now on a checkpoint holds it."""
        self.last_done = step
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        if skipped:
            tqdm.write(f"step {step}: loss or gradient not finite, update skipped ({self.bad_steps} in a row)")

    def end_of_step(self, step: int) -> bool:
        """Checkpoint when due; True when the loop must stop (Ctrl-C)."""
        cfg = self.cfg
        self.ctrl_c.requested = distributed.any_rank(self.ctrl_c.requested)  # every rank stops at the same step
        stop = self.ctrl_c.requested or self.bad_steps >= cfg.max_bad_steps
        if step % cfg.save_every == 0 or step == cfg.max_steps or stop:
            self.save(step)
        if self.bad_steps >= cfg.max_bad_steps:  # the weights saved are those of the last good step
            raise RunStopped(
                f"{self.bad_steps} steps in a row (to step {step}) had a non-finite loss or gradient, so their "
                f"updates were skipped; checkpoint of step {step} saved with the last good weights. "
                f"Look at reward/* and grad_norm in {self.run.metrics_path}; lower learning_rate "
                f"({cfg.learning_rate}) or max_grad_norm, or use dtype fp32 instead of bf16; "
                f"then continue with --resume {self.run.dir} (or raise max_bad_steps)")
        return self.ctrl_c.requested

    @property
    def interrupted(self) -> bool:
        return self.ctrl_c.requested

    def __exit__(self, kind, error, traceback):
        self.ctrl_c.restore()
        if kind is None and self.ctrl_c.requested:
            print(f"stopped by Ctrl-C after step {self.last_done}: continue with --resume {self.run.dir}")
        other_rank = kind is not None and issubclass(kind, distributed.OtherRankFailed) and error.out_of_memory
        if not (other_rank or (kind is not None and issubclass(kind, torch.OutOfMemoryError))):
            return False
        failed = self.last_done + 1
        if getattr(error, "applied", False):  # torchrun: rank 0 finished this step's optimizer step before
            self.scheduler.step()             # another rank ran out in its own: its weights hold the step
            self.last_done = failed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.save(self.last_done)  # rank 0 saves, whichever rank ran out
        if other_rank:  # the rank that ran out reports it
            return False
        cfg = self.cfg
        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
        peak = f"peak {peak_mem_gb():.1f} GB of {total:.1f} GB"
        saved = f"Checkpoint of step {self.last_done} saved" + (
            " (its train line was not logged)" if self.last_done == failed else "")
        if getattr(error, "where", ""):  # the optimizer step or the gradient all-reduce (distributed.agree_on_oom)
            message = (f"out of memory at step {failed} {error.where} ({peak}). {saved}. The optimizer keeps "
                       f"state for every trained weight: use " + ("" if cfg.optimizer == "adamw8bit" else
                       f"optimizer adamw8bit ({cfg.optimizer} now), ") + "lora_r > 0, or train_only to train "
                       "fewer weights")
        else:
            message = (f"out of memory at step {failed}, even in micro-batches of 1 chain ({peak}). {saved}. Lower "
                       f"max_completion_tokens ({cfg.max_completion_tokens}), num_chains ({cfg.num_chains}), "
                       f"prompts_per_step ({cfg.prompts_per_step}) or logp_chunk ({cfg.logp_chunk}); or turn on "
                       f"gradient_checkpointing, liger, optimizer adamw8bit, lora_r > 0")
        raise distributed.local(RunStopped(f"{message}. Then continue with --resume {self.run.dir}")) from None
