"""More processes under torchrun: N ranks run the same loop, each on its share of the step's questions.

    torchrun --nproc_per_node 4 train.py --config X              # 4 GPUs of one machine (NCCL), or CPU (gloo)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py --config X

Without torchrun (no RANK in the environment) every function here is the identity of one process and
costs nothing, so `python train.py` is unchanged. Under torchrun:

With --fsdp the weights, gradients and optimizer state are sharded over the ranks instead of copied
(fsdp.py); the update is the same.

- each rank samples and scores its own prompts_per_step / N questions (shard); group advantages stay
  within a rank, since a group never spans two;
- the loss normalisers that span the step (chains, tokens, micro-batches) are sums over the ranks
  (grpo.update), and the gradients are summed over the ranks once per step, after the micro-batches,
  with one all-reduce per weight (all_reduce_grads) rather than DDP's wrapper, which would hide the
  model behind `.module` from generate, LoRA's adapter switch and Liger's head; the price is no overlap
  of that all-reduce with the backward pass. So N ranks take the update one process takes on the same
  rollouts, up to the order of float sums; except with loss_type bnpo, whose normaliser is each
  micro-batch's token count: a rank builds micro-batches of its own chains (sorted by length), so
  which chains share one, and the loss, differ from one process unless sort_micro_batches is false
  and micro_batch_size divides each rank's chains (setup warns; making them equal would mean building
  the micro-batches over all ranks' chains, a collective inside the loss pass, for a loss that
  depends on micro_batch_size in one process too);
- the weights start equal (broadcast_weights from rank 0) and stay equal: every rank takes the same
  optimizer step on the same gradient;
- sampling draws from a stream seeded by (seed, step, rank) at each step (seed_step), so the ranks
  sample differently and a run resumed on the same number of ranks samples as it would have (on
  another number the questions are sharded and the streams seeded otherwise: it goes on correctly,
  with other draws);
- rank 0 alone writes (logs, plots, checkpoints, trackers) and prints; the other ranks keep stderr;
- an error in an `errors_stop_every_rank` block on any rank stops every rank at the block's end, and the message is
  printed once, by the lowest rank that raised it (the others raise OtherRankFailed and exit quietly);
  out of memory in the update (the loss pass, the zero gradients of all_reduce_grads, the optimizer
  step) is agreed on the same way (grpo.update, agree_on_oom), and rank 0 saves the checkpoint of
  the last step its weights hold, whichever rank ran out (checkpoint.Guard).
"""
import datetime
import os
import random
import sys

import torch
import torch.distributed as dist

import config


class OtherRankFailed(RuntimeError):
    """Another rank raised in an `errors_stop_every_rank` block, or ran out of memory in the update: it printed the
    error; this rank stops quietly (after rank 0 saved a checkpoint, if out_of_memory: checkpoint.Guard).
    applied: rank 0 had finished the step's optimizer step when another rank ran out in its own, so its
    weights hold that step (the checkpoint is of that step)."""

    def __init__(self, message: str, out_of_memory: bool = False, applied: bool = False):
        super().__init__(message)
        self.out_of_memory, self.applied = out_of_memory, applied


def launched() -> bool:
    """Started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def setup(cfg, device: str) -> str:
    """Join the other ranks (NCCL on GPUs, gloo on CPU) and return the device this rank uses ("cuda" is
    then its own GPU, LOCAL_RANK). Checks that the step's questions split evenly. One process: nothing."""
    if not launched():
        return device
    check_fsdp(cfg)
    if cfg.prompts_per_step % world():
        raise config.UserError(f"prompts_per_step {cfg.prompts_per_step} does not split over {world()} ranks: "
                               f"set it to a multiple of {world()} (each rank samples prompts_per_step / {world()} "
                               f"questions), or run another number of processes")
    chains = cfg.prompts_per_step // world() * cfg.num_chains  # before dynamic sampling's refills
    if cfg.loss_type == "bnpo" and (cfg.sort_micro_batches or chains % cfg.micro_batch_size) and is_main():
        print(f"warning: loss_type bnpo normalises by each micro-batch's tokens, and each of the {world()} ranks "
              f"builds micro-batches of its own chains, so the loss is not the one of one process; for the same "
              f"micro-batches set sort_micro_batches false and a micro_batch_size that divides the {chains} chains "
              f"of each rank (or use dapo, normalised over the whole step)", file=sys.stderr)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    if not is_main():  # one copy of every line a run prints; errors and tracebacks still reach stderr
        sys.stdout = open(os.devnull, "w")
    return device


def teardown() -> None:
    global _sharded
    _sharded = False
    if dist.is_initialized():  # the barrier first: a rank that tore down its gloo connections while the
        dist.barrier()          # other was still in the last collective aborted at exit, 1 run in 3 (FINDINGS)
        dist.destroy_process_group()


def leave() -> None:
    """End a torchrun rank whose work is done and whose process group is torn down (teardown), without the
    interpreter's own teardown: there, objects that still hold gloo work (an FSDP mesh's groups, tensors
    of collectives) are destroyed while gloo's threads run, and a rank aborted now and then after writing
    everything (`terminate called without an active exception`, FINDINGS). One process: returns."""
    if not launched():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(items: list) -> list:
    """This rank's contiguous share of a list whose length the world size divides."""
    k = len(items) // world()
    return items[rank() * k:(rank() + 1) * k]


def seed_step(seed: int, step: int) -> None:
    """Under torchrun: the step's sampling stream, (seed, step, rank). One process keeps its one stream."""
    if launched():
        s = (seed * 1_000_003 + step) * 1_009 + rank()
        random.seed(s)
        torch.manual_seed(s)


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object); [obj] for one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float]) -> list[float]:
    """The element-wise sum of `values` over the ranks, in float64."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    return all_sum([float(flag)])[0] > 0


def all_reduce_grads(params: list) -> None:
    """Sum every trainable weight's gradient over the ranks. A weight with a gradient on no rank keeps
    None, as in one process, where AdamW then leaves it alone (no momentum, no weight decay); one with a
    gradient on some ranks counts as 0 on the others. The ranks agree on which is which with one small
    all-reduce, and on an out of memory while making those zeros before any gradient is summed."""
    if not dist.is_initialized():
        return
    params = [p for p in params if not is_dtensor(p)]  # --fsdp: reduce-scattered in backward already
    has_grad = all_sum([float(p.grad is not None) for p in params])  # (P,) ranks holding each gradient
    error = None
    try:
        for p, n in zip(params, has_grad):
            if n > 0 and p.grad is None:
                p.grad = torch.zeros_like(p)
    except torch.OutOfMemoryError as e:
        error = e
    agree_on_oom(error, "making zero gradients for the gradient all-reduce")
    for p, n in zip(params, has_grad):
        if n > 0:
            dist.all_reduce(p.grad)


def agree_on_oom(error: Exception | None, where: str, applied: bool = False) -> None:
    """After a part of the update that holds no collective call and may run out of memory on some ranks
    (`error` is this rank's, or None): returns when no rank ran out. Else every rank stops: the lowest
    rank that ran out raises its own error (checkpoint.Guard prints it; rank 0 saves), the others
    OtherRankFailed(out_of_memory=True). applied: this rank finished its optimizer step, so its weights
    hold the step; rank 0's say which checkpoint it saves. One process: raises its own error, if any."""
    notes = gather((error is not None, applied))  # (ran out, applied) of each rank
    ran_out = [oom for oom, _ in notes]
    if not any(ran_out):
        return
    first, rank0_applied = ran_out.index(True), notes[0][1]
    if error is not None and rank() == first:
        error.where, error.applied = where, rank0_applied  # for checkpoint.Guard's message
        raise local(error)
    raise OtherRankFailed(f"rank {first} ran out of memory {where}", out_of_memory=True, applied=rank0_applied)


def broadcast_weights(model) -> None:
    """Every rank takes rank 0's weights and buffers (LoRA's random init, a warm start on a GPU)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, 0)


def local(error: Exception) -> Exception:
    """Mark an error as this rank's alone (one rank's out-of-memory, an errors_stop_every_rank block's report): train.py
    prints it on this rank. Other errors (a config check, which every rank makes alike) print on rank 0."""
    error.rank_local = True
    return error


def reports(error: Exception) -> bool:
    """Whether this rank prints `error` (see local)."""
    return is_main() or getattr(error, "rank_local", False)


class errors_stop_every_rank:
    """`with errors_stop_every_rank(): ...` — a block that holds no collective call. At its end the ranks compare
    notes: if any raised, every rank stops; the lowest rank with each distinct message re-raises its own
    error (printed by train.py), the others raise OtherRankFailed. Without torchrun: a plain block."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not dist.is_initialized():
            return False
        if kind is not None and not issubclass(kind, Exception):  # Ctrl-C, SystemExit: out at once
            return False
        oom = isinstance(error, torch.OutOfMemoryError)
        notes = gather(None if error is None else (f"{kind.__name__}: {error}", oom))
        failed = [(k, note) for k, note in enumerate(notes) if note is not None]  # (rank, (message, oom))
        if not failed:
            return False
        mine = notes[rank()]
        if mine is not None and min(k for k, note in failed if note == mine) == rank():
            local(error)
            return False  # this rank reports its own error
        first, (message, _) = failed[0]
        raise OtherRankFailed(f"rank {first} stopped the run: {message}",
                              out_of_memory=any(oom for _, (_, oom) in failed))


def check_fsdp(cfg) -> None:
    """The levers --fsdp cannot run with, named before any model loads (one process: none, it does not shard)."""
    if not (cfg.fsdp and launched()):
        return
    levers = {"liger": (cfg.liger, "Liger's fused loss reads the head weight outside FSDP's hooks: drop --liger"),
              "optimizer adamw8bit": (cfg.optimizer == "adamw8bit", "bitsandbytes' 8-bit AdamW does not take "
                                      "sharded weights: set optimizer adamw (its state is sharded too)"),
              "kahan_updates": (cfg.kahan_updates, "--fsdp keeps fp32 master weights (bf16 only in compute), so "
                                "there is no rounding to compensate: set kahan_updates false")}
    bad = [f"{name} ({fix})" for name, (on, fix) in levers.items() if on]
    if bad:
        raise config.UserError(f"--fsdp cannot run with: {'; '.join(bad)}")


_sharded = False  # set by fsdp.shard_model: the loss pass's micro-batches then agree in number over the ranks


def is_sharded() -> bool:
    return _sharded


def mark_sharded() -> None:
    global _sharded
    _sharded = True


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
