"""Which weights get a policy gradient that carries over from one batch of questions to the next?

For a model, this draws several independent GRPO batches (fresh questions each), computes the policy
gradient of each with the run's own sampling, rewards and loss, and prints, per parameter group, the
mean cosine between the gradients of two different batches. Near 0: that group's gradient is noise
specific to the batch's questions, and large steps on it only hurt. Clearly positive: the direction
holds across questions, so it is worth training (see train_only in config.py).

    python grad_agreement.py --model out/tiny/base_model --config configs/tiny.yaml
Any other train.py setting can follow (--prompts_per_step, --num_chains, --rewards ...).
"""
import argparse
import collections
import itertools
import random

import torch

import config
import llms
import losses
import rewards
import rollout
import train


def batch_gradient(model, tokenizer, batch: list[dict], cfg) -> dict[str, torch.Tensor]:
    """{parameter name: flat gradient} of the policy loss on one freshly sampled batch."""
    prompts = [llms.chat_prompt(tokenizer, cfg.system_prompt, ex["question"]) for ex in batch]
    r = rollout.sample(model, tokenizer, prompts, cfg.num_chains, cfg.max_prompt_tokens,
                       cfg.max_completion_tokens, cfg.temperature, cfg.top_p)
    answers = [batch[g]["answer"] for g in r.group.tolist()]
    per_fn, names, _ = rewards.score(r.texts, answers, r.info, cfg.rewards, train.reward_settings(cfg))
    advantages, _ = losses.group_advantages(rewards.total(per_fn, names, cfg.rewards), r.group, cfg.adv_scale)
    start = losses.first_trained_column(r.loss_mask)
    mask = r.loss_mask[:, start:]
    logps = losses.token_logps(model, r.input_ids, r.attention_mask, start, cfg.temperature, cfg.logp_chunk)
    loss, _ = losses.policy_loss(logps, logps.detach(), None, advantages, mask, cfg, len(r), mask.sum(), 1)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.flatten().clone() for n, p in model.named_parameters() if p.grad is not None}


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
    torch.manual_seed(cfg.seed)
    train_set, _ = train.load_data(cfg)
    device = train.pick_device(cfg)
    model, tokenizer = llms.load(args.model, device, cfg.dtype, cfg.gradient_checkpointing,
                                 trust_remote_code=cfg.trust_remote_code)
    rng = random.Random(cfg.seed)
    grads = [batch_gradient(model, tokenizer, rng.sample(train_set, cfg.prompts_per_step), cfg)
             for _ in range(args.batches)]
    result = agreement(grads)
    result["all weights"] = agreement([{"all weights": torch.cat(list(g.values()))} for g in grads])["all weights"]
    sizes = {n: p.numel() for n, p in model.named_parameters()} | {"all weights": model.num_parameters()}
    print(f"{'parameter':<50} {'weights':>8}  cosine between batches")
    for name in sizes:  # in the model's order
        if name in result:
            print(f"{name:<50} {sizes[name]:>8}  {result[name]:+.3f}")
    return result


if __name__ == "__main__":
    main()
