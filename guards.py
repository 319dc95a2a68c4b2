"""What keeps grpo.update robust and one process's update under torchrun, kept out of the algorithm box.

    MicroBatches            the rollout's chains in micro-batches, each cropped after its last trained
                            column (and sorted by that width); halves on out of memory
    retry_smaller_on_oom    run a pass over the micro-batches; when any rank runs out of memory, every
                            rank retries it with micro-batches of half the size, down to one chain
                            (under --fsdp the run stops at once: fsdp.stop_now)
    optimizer_step          the step's gradient summed over the ranks, clipped, and applied, unless the
                            loss or gradient is not finite (then skipped); out of memory here stops every
                            rank together, with a checkpoint (checkpoint.Guard)

Without torchrun every collective call here is the identity (distributed.py), so one process reads as
one process.
"""
import math

import torch
from tqdm import tqdm

import distributed
import fsdp
import logprobs


class MicroBatches:
    """The chains of a rollout in micro-batches of `size`: iterating gives (rows (n,), end), the
    micro-batch's chains and its width, cropped after the last trained column of its chains (by
    causality the columns after it cannot change the loss: the padding after chains that ended early and
    the untrained tail of a guided chain cost nothing). sort: chains sorted by that width, longest first,
    so that chains of similar length share a micro-batch and the first one is the largest (if it fits in
    memory, all do). `total` is the count of micro-batches over all ranks (bnpo's normaliser); halve()
    keeps it up to date."""

    def __init__(self, loss_mask: torch.Tensor, start: int, size: int, sort: bool):
        self.size = min(size, len(loss_mask))
        self.ends = logprobs.last_trained_column(loss_mask).clamp(min=start) + 1  # (N,) each chain ends before it
        self.order = (torch.argsort(self.ends, descending=True, stable=True) if sort
                      else torch.arange(len(loss_mask), device=loss_mask.device))
        self.start = start
        self.total, self.passes = len(self), self.agreed_passes()

    def __iter__(self):
        batches = [(rows, int(self.ends[rows].max())) for rows in self.order.split(self.size)]
        # --fsdp: each pass gathers the weights with the other ranks, so a rank with fewer micro-batches
        # runs empty ones (no chain, a loss of exactly 0) until it has run as many as the rank with the most
        return iter(batches + [(self.order[:0], self.start + 1)] * (self.passes - len(batches)))

    def agreed_passes(self) -> int:
        """The micro-batches every rank iterates: its own, or under --fsdp the most any rank has."""
        return max(distributed.gather(len(self))) if distributed.is_sharded() else len(self)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.size)

    def halve(self) -> None:
        self.size = max(1, self.size // 2)
        self.total = distributed.all_sum([len(self)])[0]
        self.passes = self.agreed_passes()


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def retry_smaller_on_oom(fn, batches: MicroBatches, optimizer):
    """fn(), a pass over `batches` that holds no collective call; when it runs out of memory on any rank,
    every rank drops the pass's gradients and retries it with micro-batches of half the size, down to one
    chain. (Under --fsdp the pass gathers weights with the other ranks: out of memory ends the run at once,
    fsdp.stop_now.) Only then does the error stop the run: the rank that ran out raises it, the others
    distributed.OtherRankFailed (rank 0 then saves a checkpoint: checkpoint.Guard). No optimizer step has
    been taken when a pass is retried."""
    while True:
        try:
            out, error = fn(), None
        except torch.OutOfMemoryError as e:
            if distributed.is_sharded():  # the other ranks are inside this pass's weight gathers
                fsdp.stop_now(e, "in the loss pass")
            out, error = None, e
        notes = distributed.gather((error is not None, batches.size))  # every rank retries, or stops, together
        if not any(oom for oom, _ in notes):
            return out
        optimizer.zero_grad(set_to_none=True)
        free_memory()
        if any(oom and k == 1 for oom, k in notes):  # a rank out of memory with one chain a micro-batch
            first = next(rank for rank, (oom, k) in enumerate(notes) if oom and k == 1)
            if error is not None and distributed.rank() == first:
                raise error
            raise distributed.OtherRankFailed(f"rank {first} ran out of memory in the loss pass", out_of_memory=True)
        batches.halve()
        tqdm.write(f"out of memory in the loss pass: retrying with micro_batch_size {batches.size}")


def optimizer_step(model, optimizer, sums: dict, max_grad_norm: float) -> dict:
    """One optimizer step on the gradient the loss pass left, and the step's figures: `sums` (loss, kl,
    clip: this rank's sums) summed over the ranks, grad_norm (before clipping) and skipped. The gradients
    are summed over the ranks first (distributed.all_reduce_grads); an update whose loss or gradient is not
    finite is skipped, since a NaN or inf would poison the weights and the optimizer's moments
    (checkpoint.Guard stops the run after max_bad_steps in a row). The optimizer's first step allocates
    its state: out of memory there is agreed on like the loss pass's (distributed.agree_on_oom)."""
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.all_reduce_grads(params)
    step = dict(zip(sums, distributed.all_sum(list(sums.values()))))
    error, stepped = None, False
    try:
        step["grad_norm"] = fsdp.full(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)).item()
        step["skipped"] = not (math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]))
        if not step["skipped"]:
            optimizer.step()
            stepped = True
    except torch.OutOfMemoryError as e:
        error = e
    optimizer.zero_grad(set_to_none=True)
    distributed.agree_on_oom(error, "in the optimizer step", applied=stepped)
    return step
