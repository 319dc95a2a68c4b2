"""--fsdp's cost and saving on the CPU: each rank's peak resident memory and time of one GRPO update, and of
sampling in each fsdp_sampling mode, on a model shaped like Qwen2.5-0.5B with random weights, fp32 full
fine-tuning, AdamW. Run it as one process (what one data-parallel rank holds: the whole model, its
gradients and optimizer state) and under torchrun with --fsdp, on the same chains of every rank:

    OMP_NUM_THREADS=1 python tools/fsdp_bench.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tools/fsdp_bench.py --fsdp

Each rank trains `--chains` teacher-forced chains of random tokens (prompt `--prompt` + `--completion`
tokens), so two ranks together train twice one process's chains. Memory, printed as "held / peak":
the resident memory at the start of each phase, and its peak (VmHWM, reset at the start: tools/measure.py),
after a warm-up step that allocates AdamW's state. Sampling: `--new_tokens` tokens for each of `--chains` chains, forced to full length.
"""
import argparse
import ctypes
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import distributed  # noqa: E402
import fsdp  # noqa: E402
import grpo  # noqa: E402
import llms  # noqa: E402
import optim  # noqa: E402
import rollout  # noqa: E402
from tools.measure import memory_mark, memory_now  # noqa: E402

# Qwen2.5-0.5B's shape (its config.json): 494M parameters, 24 layers, tied embeddings
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1000000.0)


def release() -> None:
    """Give freed memory back to the system, so that the next phase's peak starts from what is held."""
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--chains", type=int, default=4, help="chains per rank")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="measured updates, after one warm-up")
    args = parser.parse_args()
    cfg = config.Config(optimizer="adamw", kahan_updates=False, fsdp=args.fsdp, loss_type="dapo", dtype="fp32",
                        micro_batch_size=args.chains, max_completion_tokens=args.completion, learning_rate=1e-6,
                        gradient_checkpointing=True, prompts_per_step=distributed.world())
    distributed.setup(cfg, "cpu")
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B))  # the same random weights on every rank
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = llms.Policy(model, None)
    fsdp.shard_policy(policy, cfg)
    optimizer, _ = optim.make_optimizer(policy.model, cfg)
    release()

    # this rank's chains: random tokens, the completion trained, 2 groups with rewards 0 and 1
    n, width = args.chains, args.prompt + args.completion
    gen = torch.Generator().manual_seed(1 + distributed.rank())
    ids = torch.randint(1, QWEN25_05B["vocab_size"], (n, width), generator=gen)
    loss_mask = torch.zeros(n, width)
    loss_mask[:, args.prompt:] = 1
    r = rollout.Rollout(ids, torch.ones_like(ids), loss_mask, torch.arange(n) // 2, [""] * n, [{}] * n)
    adv = grpo.group_advantages(torch.arange(n, dtype=torch.float) % 2, r.group, "group")[0]

    rows = {}
    grpo.update(policy.model, None, r, adv, optimizer, cfg)  # warm-up: AdamW's state is allocated here
    release()
    held = memory_now("cpu")
    memory_mark("cpu")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        grpo.update(policy.model, None, r, adv, optimizer, cfg)
    rows["update"] = ((time.perf_counter() - t0) / args.steps, held, memory_mark("cpu")[0])
    modes = ("unshard", "per_layer") if args.fsdp else ("one process",)
    for mode in modes:
        release()
        root = fsdp.root_of(policy.model)
        if root is not None:
            root.grpo_sampling = mode
        held = memory_now("cpu")
        memory_mark("cpu")
        t0 = time.perf_counter()
        with fsdp.sampling(policy.model):
            rollout.generate(policy.model, ids[:, :args.prompt], torch.ones_like(ids[:, :args.prompt]),
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, temperature=1.0)
        rows[f"sampling ({mode})"] = (time.perf_counter() - t0, held, memory_mark("cpu")[0])
    table = distributed.gather(rows)
    if distributed.is_main():
        what = f"{distributed.world()} ranks, --fsdp" if args.fsdp else "one process (one data-parallel rank)"
        print(f"\n{what}: {n} chains x {width} tokens per rank; sampling {n} x {args.new_tokens} new tokens per rank")
        for phase in rows:
            cells = " | ".join(f"{part[phase][1]:.2f} / {part[phase][2]:.2f} GB, {part[phase][0]:.1f} s"
                               for part in table)
            print(f"| {phase} | {cells} |")
    distributed.teardown()


if __name__ == "__main__":
    main()
    distributed.leave()
