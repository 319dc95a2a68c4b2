"""The optimizer and its learning-rate schedule, and weight updates that bf16 does not round away.

    make_optimizer   AdamW (torch's, or bitsandbytes' 8-bit), compensated bf16 updates, the schedule
                     (linear warmup, then constant, cosine or warmup-stable-decay), stepped once per
                     GRPO step
    attach           Kahan-compensated summation around any optimizer (kahan_updates), below

Compensated updates: bf16 keeps 8 bits of mantissa, so a weight of 0.02 moves only in steps of about 1.2e-4. An AdamW
update at lr 5e-6 is about 5e-6 per step: added to a bf16 weight it rounds back to the same weight,
and training silently does nothing. fp32 master weights fix this for 4 extra bytes per parameter;
this does it for 2: each bf16 weight w gets a bf16 residual r, and w + r is the weight the optimizer
meant (the rounding error of every step is carried into the next instead of being dropped).

It wraps any optimizer whose update does not depend on the weight's value (AdamW, 8-bit AdamW) by
two step hooks and no copy of the model:
  before the step  each bf16 parameter's storage is swapped for its residual r, and weight decay is
                   set aside, so the optimizer adds its update u to the small number r: r + u is
                   exact to 8 bits of u itself, not of the weight;
  after the step   w_new = bf16(w (1 - lr wd) + (r + u)) and r_new = (that sum) - w_new, in fp32
                   CHUNK elements at a time (the fp32 temporaries of Qwen2.5-1.5B's 233M-element
                   embedding would take about 2.8 GB at the step's memory peak; a chunk's take 0.25 GB),
                   written back into w's and r's own storage (addresses stay put, so compiled or
                   CUDA-graphed sampling keeps seeing the live weights).
The residual lives in optimizer.state[p]["residual"], so checkpoints save and restore it. fp32
parameters (the tiny CPU model, LoRA adapters) are left alone: they need no compensation.

    python optim.py     # 50 AdamW steps at lr 5e-6 on bf16 weights: share of the update kept, with and without
"""
import math

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK = 2**24  # elements per fp32 pass in the after-step hook: 64 MB per fp32 temporary


def attach(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer` apply compensated updates to its bf16/fp16 parameters; returns it."""
    weights = {}  # param -> its weight storage while the optimizer works on the residual
    fresh = {}  # param -> a zero residual made at its first step, kept in the state after that step

    def before(opt, args, kwargs):
        for group in opt.param_groups:
            group["kahan_weight_decay"], group["weight_decay"] = group["weight_decay"], 0.0
            for p in group["params"]:
                if p.grad is None or p.dtype not in LOW_PRECISION:
                    continue
                if "residual" not in opt.state[p]:  # not put in the state yet: an empty state means
                    fresh[p] = torch.zeros_like(p)  # "first step" to the optimizer, which then fills it
                weights[p] = p.data
                p.data = opt.state[p].get("residual", fresh.get(p))

    def after(opt, args, kwargs):
        for group in opt.param_groups:
            decay = 1.0 - group["lr"] * group["kahan_weight_decay"]
            group["weight_decay"] = group.pop("kahan_weight_decay")
            for p in group["params"]:
                if p not in weights:
                    continue
                residual, weight = p.data, weights.pop(p)  # residual now holds r + u
                for w, r in zip(weight.view(-1).split(CHUNK), residual.view(-1).split(CHUNK)):
                    # the decay of r itself (under one ulp times lr * wd) is dropped
                    exact = w.float() * decay + r.float()
                    w.copy_(exact)  # rounds to the nearest bf16
                    r.copy_(exact - w.float())
                p.data = weight
                if p in fresh:
                    opt.state[p]["residual"] = fresh.pop(p)

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def make_optimizer(model, cfg):
    """(optimizer, scheduler) over the trainable weights; the scheduler steps once per GRPO step."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params, **kwargs)
    if cfg.kahan_updates:  # bf16 weights: carry each update's rounding error instead of dropping it
        attach(optimizer)

    def factor(step):  # step counts GRPO steps from 0; linear warmup, then constant, cosine to 0 or wsd's tail
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "wsd":  # the last lr_decay_steps steps: 1, ..., 1/lr_decay_steps
            return max(0.0, min(1.0, (cfg.max_steps - step) / cfg.lr_decay_steps))
        return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


if __name__ == "__main__":
    torch.manual_seed(0)
    w0 = (torch.randn(4096) * 0.02).bfloat16()
    grads = [torch.randn(4096) * 1e-3 + 1e-3 for _ in range(50)]
    final = {}
    for name, dtype, compensated in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                     ("bf16 + kahan", torch.bfloat16, True)):
        p = torch.nn.Parameter(w0.to(dtype).clone())
        opt = torch.optim.AdamW([p], lr=5e-6, weight_decay=0.0)
        if compensated:
            attach(opt)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        final[name] = p.detach().float() - w0.float()
    for name, delta in final.items():
        kept = (delta @ final["fp32"] / (final["fp32"] @ final["fp32"])).item()
        print(f"{name:>13}: {kept:6.1%} of the fp32 update reached the weights")
