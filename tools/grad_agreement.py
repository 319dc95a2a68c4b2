"""Which weights get a policy gradient that carries over from one batch of questions to the next?

For a model, this draws several independent GRPO batches (fresh questions each), computes the policy
gradient of each with the run's own step (grpo.step: its sampling idea, rewards and loss), and
prints, per parameter group, the mean cosine between the gradients of two different batches. Near 0:
that group's gradient is noise specific to the batch's questions, and large steps on it only hurt.
Clearly positive: the direction holds across questions, so it is worth training (train_only in
config.py; it is ignored here, since choosing it is what this measures).

    python tools/grad_agreement.py --model out/tiny/base_model --config configs/tiny.yaml
Any other train.py setting can follow (--prompts_per_step, --num_chains, --rewards, --sampler ...).
"""
import argparse
import collections
import itertools
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
import config
import data
import grpo
import llms
import samplers


class GradientTap:
    """Stands in for the optimizer in grpo.step: keeps the step's gradient instead of applying it.
    That gradient is after clipping, which scales every weight's gradient alike: cosines are unchanged."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.flatten().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none: bool = True):
        self.model.zero_grad(set_to_none=set_to_none)


def batch_gradient(policy, sample, batch: list[dict], cfg) -> dict[str, torch.Tensor]:
    """{parameter name: flat gradient} of the policy loss on one freshly sampled batch."""
    tap = GradientTap(policy.model)
    out = grpo.step(policy, sample, batch, 1, tap, cfg)
    if tap.grads is None:
        raise RuntimeError(f"the batch's loss or gradient was not finite (loss {out.metrics['loss']}): "
                           f"try another --seed or a smaller model")
    return tap.grads


def agreement(grads: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean cosine, over all pairs of batches, between their gradients of each parameter."""
    out = collections.defaultdict(list)
    for a, b in itertools.combinations(grads, 2):
        for name in a.keys() & b.keys():
            if a[name].norm() > 0 and b[name].norm() > 0:
                out[name].append(torch.nn.functional.cosine_similarity(a[name], b[name], dim=0).item())
    return {name: sum(c) / len(c) for name, c in out.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model folder, e.g. a run's base_model")
    parser.add_argument("--batches", type=int, default=5, help="independent batches (pairs compared: n(n-1)/2)")
    args, rest = parser.parse_known_args(argv)
    cfg = config.load(rest + ["--model_name", args.model])
    cfg.train_only = []  # every weight: which ones to train is the question
    torch.manual_seed(cfg.seed)
    train_set, _ = data.load(cfg)
    device = llms.pick_device(cfg.device)
    sample = samplers.make(cfg, device=device, train_set=train_set)
    shots = data.run_shots(cfg, train_set)
    corpus = data.tiny_corpus(train_set, cfg.system_prompt)
    model, tokenizer = llms.from_config(cfg, args.model, device, shots=shots, tiny_corpus=corpus)
    policy = llms.for_training(model, tokenizer, cfg, load_reference=lambda: (
        llms.from_config(cfg, args.model, device, shots=shots, tiny_corpus=corpus, gradient_checkpointing=False)[0]))
    rng = random.Random(cfg.seed)
    grads = [batch_gradient(policy, sample, rng.sample(train_set, cfg.prompts_per_step), cfg)
             for _ in range(args.batches)]
    result = agreement(grads)
    result["all weights"] = agreement([{"all weights": torch.cat(list(g.values()))} for g in grads])["all weights"]
    sizes = {n: p.numel() for n, p in policy.model.named_parameters()} | {"all weights": model.num_parameters()}
    print(f"{'parameter':<50} {'weights':>8}  cosine between batches")
    for name in sizes:  # in the model's order
        if name in result:
            print(f"{name:<50} {sizes[name]:>8}  {result[name]:+.3f}")
    return result


if __name__ == "__main__":
    main()
