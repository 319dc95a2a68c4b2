"""--fsdp: weights, gradients and optimizer state sharded over the torchrun ranks (FSDP2's fully_shard),
where distributed.py copies them whole to every rank.

Each decoder layer (and each vision block) is one FSDP unit, the rest (embeddings, final norm, head)
the root's; with LoRA the root is the base model under the PeftModel. A unit all-gathers its weights
before its forward and frees them after; gradients are reduce-scattered. Three rules keep the update
one process's and the ranks from waiting on each other forever:
- gradients are summed over the ranks (divide factor 1), as the loss's normalisers are summed;
- code that reads weights outside a module's forward (the chunked head of logprobs.token_logps) runs
  inside the root's registered forward method (as_forward), which gathers the root's weights;
- every rank makes the same collective calls in the same order: the same number of loss-pass
  micro-batches (guards.MicroBatches pads with empty ones), and of generate calls (sampling below).
Out of memory inside the loss pass (a forward or backward) leaves the other ranks waiting in that pass's
weight gathers, which the rank that ran out will never join: no retry with smaller micro-batches and no
checkpoint is possible, so that rank ends the run at once (stop_now) and the run keeps its last
checkpoint. Not covered: an error raised inside a per_layer generate call leaves the other ranks waiting
until the process group's timeout (30 minutes). A VL model's vision blocks are sharded but untested.
"""
import os
import sys
import types

import torch
import torch.distributed as dist

import distributed


def root_of(model):
    """The FSDP root of `model` (itself, or the base model under LoRA's PeftModel); None when not sharded."""
    from torch.distributed.fsdp import FSDPModule

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if isinstance(base, FSDPModule) else None


def _units(root) -> list:
    """The root's FSDP units, the root first (FSDP initialises itself from the root)."""
    from torch.distributed.fsdp import FSDPModule

    return [root] + [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]


def shard_model(model, sampling: str = "unshard") -> None:
    """Shard `model` in place (the policy, LoRA or not, or the frozen reference): each decoder layer and
    vision block, then the root. A bf16 or fp16 model keeps fp32 master weights and computes in its own
    dtype (MixedPrecisionPolicy; gradients reduced in fp32). sampling: cfg.fsdp_sampling."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = next(root.parameters()).dtype
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    layers = [layer for name, m in root.named_modules() if isinstance(m, torch.nn.ModuleList)
              and name.split(".")[-1] in ("layers", "blocks") for layer in m]
    for unit in layers + [root]:
        if unit is root:
            root.float()  # what the layers left: embeddings, final norm, head
        else:
            unit.float()  # one unit at a time: the fp32 copy of one layer at most beside the loaded model
        fully_shard(unit, reshard_after_forward=True, mp_policy=policy)
    for unit in _units(root):
        unit.set_gradient_divide_factor(1.0)  # summed over the ranks, like the loss's normalisers,
        unit.set_force_sum_reduction_for_comms(True)  # with a plain SUM (gloo has no pre-multiplied sum)
    root.grpo_forward = types.MethodType(lambda self, fn, *args, **kwargs: fn(*args, **kwargs), root)
    register_fsdp_forward_method(root, "grpo_forward")
    root.grpo_sampling, root.grpo_session = sampling, None
    distributed.mark_sharded()


def shard_policy(policy, cfg) -> None:
    """--fsdp under torchrun: the policy and its frozen reference sharded (shard_model); else nothing."""
    if not (cfg.fsdp and dist.is_initialized()):
        return
    shard_model(policy.model, cfg.fsdp_sampling)
    if policy.ref_model is not None:
        shard_model(policy.ref_model, cfg.fsdp_sampling)


def as_forward(model, fn, *args, **kwargs):
    """fn(*args, **kwargs), inside the root's forward when `model` is sharded: there the root's weights
    (embeddings, head) are whole, so code may read them directly, and their gradients are reduced."""
    root = root_of(model)
    return fn(*args, **kwargs) if root is None else root.grpo_forward(fn, *args, **kwargs)


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole on every rank; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class sampling:
    """`with sampling(model): ...` around a step's sampling (every round) or an evaluation: on a sharded model
    every rank makes the same collective calls whatever its number of generate calls. Not sharded: nothing.

    unshard     every unit all-gathers its weights once on entry and keeps them, so generate runs without any
                collective (synced_gpus off); freed on exit. Memory: the whole model, while sampling.
    per_layer   weights stay sharded and each forward gathers them layer by layer; generate keeps the ranks in
                step within a call (synced_gpus). Each call starts with a vote (before_generate), and on exit a
                rank whose calls are done joins each call another rank still makes with a one-token generate
                of its own, until no rank has calls left."""

    def __init__(self, model):
        self.model, self.root = model, root_of(model)

    def __enter__(self):
        if self.root is None:
            return self
        self.root.grpo_session = self.root.grpo_sampling
        if self.root.grpo_session == "unshard":
            for unit in _units(self.root):
                unit.set_reshard_after_forward(False, recurse=False)
                unit.unshard()
        return self

    def __exit__(self, kind, error, traceback):
        if self.root is None:
            return False
        if self.root.grpo_session == "per_layer" and (kind is None or issubclass(kind, Exception)):
            while distributed.all_sum([0.0])[0] > 0:  # another rank starts a generate call: take part in it
                self.join_generate()
        elif self.root.grpo_session == "unshard":
            for unit in _units(self.root):
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)
        self.root.grpo_session = None
        return False

    def join_generate(self) -> None:
        """A one-token greedy generate whose forwards match, collective for collective, another rank's call."""
        from transformers import GenerationConfig

        was_training = self.root.training
        self.root.eval()
        gen = self.root.generation_config
        one = torch.full((1, 1), gen.pad_token_id, device=next(self.root.parameters()).device)
        try:
            self.root.generate(input_ids=one, attention_mask=torch.ones_like(one), synced_gpus=True,
                               generation_config=GenerationConfig(do_sample=False, max_new_tokens=1, use_cache=True,
                                                                  eos_token_id=gen.eos_token_id,
                                                                  pad_token_id=gen.pad_token_id))
        finally:
            self.root.train(was_training)


def before_generate(model) -> dict:
    """generate's extra arguments for `model`, called by every generate call (rollout.generate): {} when it
    is not sharded; else synced_gpus, after the per_layer vote (sampling). generate on a sharded model outside
    a sampling block would leave the ranks waiting on each other: an error instead."""
    root = root_of(model)
    if root is None:
        return {}
    if root.grpo_session is None:
        raise RuntimeError("generate on a sharded model outside `with fsdp.sampling(model)`: the ranks' "
                           "calls would not match")
    if root.grpo_session == "unshard":
        return {"synced_gpus": False}
    distributed.all_sum([1.0])  # this rank makes a call: the ranks done with theirs join it (sampling.__exit__)
    return {"synced_gpus": True}


def full_state(model, optimizer) -> tuple[dict | None, dict | None]:
    """(the model's state dict, the optimizer's), whole, on rank 0's CPU, from a sharded model: every rank
    takes part in gathering each tensor, rank 0 keeps it. The optimizer's is optimizer.state_dict()'s own
    layout, so a run with any number of ranks, with or without --fsdp, resumes from it (shard_optimizer_state).
    (None, None) when the model is not sharded: rank 0 holds it all already."""
    if root_of(model) is None:
        return None, None
    keep = distributed.is_main()
    weights, seen = {}, {}
    for name, t in model.state_dict().items():  # tied weights (embeddings and head) gathered once
        if id(t) not in seen:
            whole = full(t).detach()  # a collective: every rank calls it
            seen[id(t)] = whole.cpu() if keep else None
        weights[name] = seen[id(t)]
    state = optimizer.state_dict()  # its per-weight dicts are the optimizer's own: new ones here
    state["state"] = {index: dict(per_param) for index, per_param in state["state"].items()}
    for index in sorted(state["state"]):
        per_param = state["state"][index]
        for key in sorted(per_param):
            if torch.is_tensor(per_param[key]):
                whole = full(per_param[key])  # a collective: every rank calls it
                per_param[key] = whole.cpu() if keep else None
    return (weights, state) if keep else (None, None)


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """An optimizer state of full tensors (full_state, or a run without --fsdp), each cut to this rank's
    shard of its weight where the weight is sharded; for optimizer.load_state_dict."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_param in state["state"].items():
        p = params[index]
        if not isinstance(p, DTensor):
            continue
        for key, value in per_param.items():
            if torch.is_tensor(value) and value.shape == p.shape:
                per_param[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                                   src_data_rank=None)  # every rank holds the full tensor
    return state


def stop_now(error: Exception, where: str) -> None:
    """Out of memory `where` on this rank, inside a pass whose weight gathers the other ranks wait in: say
    why and end this process at once, with no collective call (an agreement, a checkpoint's gathering) that
    the others could never match. torchrun then stops the other ranks; the run keeps its last checkpoint,
    which was written whole or not at all."""
    print(f"stopped: out of memory {where} under --fsdp on rank {distributed.rank()} ({str(error).splitlines()[0]}). "
          f"The other ranks wait inside this pass's weight gathers, so the ranks can neither retry with smaller "
          f"micro-batches nor save: the run keeps its last checkpoint. Lower micro_batch_size, "
          f"max_completion_tokens or num_chains, or turn on gradient_checkpointing; then continue with --resume",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
