"""Memory and time of the log-prob head alone: the transient that `logp_chunk` bounds.

    python tools/bench_head.py --device cpu --dtype bf16 --logp_chunk 64    # Qwen2.5's vocab and width
    python tools/bench_head.py --tiny                                       # the built-in tiny model's

logprobs.head_logps (the output projection and the log-probs, forward and backward, recomputed per
chunk) on micro_batch_size chains x logp_chunk positions of random hidden states, at the vocab and
width of bench.py's workload, with the weight's and hidden states' gradients already allocated as
when gradients accumulate. It prints, and appends to BENCHMARKS.md, the peak memory above all that
(GPU: torch's allocated memory; CPU: the process's resident memory) and the seconds taken.
Flags: any train.py key, plus --tiny and --benchmarks_file.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
import bench
import config
import llms
import logprobs
import measure


def run(cfg, device: str) -> dict:
    tiny = cfg.model_name == llms.TINY
    vocab, width = ((cfg.tiny_vocab_size, cfg.tiny_hidden) if tiny
                    else (bench.QWEN2_5_1_5B["vocab_size"], bench.QWEN2_5_1_5B["hidden_size"]))
    dtype, n, chunk = llms.pick_dtype(cfg.dtype, device), cfg.micro_batch_size, cfg.logp_chunk
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(width, vocab, bias=False, device=device, dtype=dtype)
    hidden = torch.randn(n, chunk + 1, width, device=device, dtype=dtype, requires_grad=True)
    ids = torch.randint(vocab, (n, chunk + 1), device=device)
    head.weight.grad, hidden.grad = torch.zeros_like(head.weight), torch.zeros_like(hidden)
    measure.reset_memory(device)
    base, clock = measure.memory_now(device), measure.Clock(device)
    t0 = clock.now()
    logprobs.head_logps(hidden, head, ids, 1, cfg.temperature, chunk).sum().backward()
    seconds = clock.now() - t0
    peak = measure.memory_mark(device)[0] - base
    return {"vocab": vocab, "hidden": width, "dtype": str(dtype).replace("torch.", ""), "chains": n,
            "positions": chunk, "peak_gb": peak, "bytes_per_logit": peak * 2**30 / (n * chunk * vocab),
            "seconds": seconds}


def report(h: dict, device: str, argv: list[str]) -> str:
    return "\n".join(measure.heading(device, argv, script="tools/bench_head.py") + [
        f"{measure.versions()}. The log-prob head alone (logprobs.head_logps, forward + backward, one chunk): vocab "
        f"{h['vocab']:,}, hidden {h['hidden']}, {h['dtype']}, {h['chains']} chains x {h['positions']} positions "
        f"= {h['chains'] * h['positions'] * h['vocab'] / 1e6:.1f}M logits. Peak memory above the weights and "
        f"gradients: **{h['peak_gb']:.2f} GB** ({h['bytes_per_logit']:.1f} bytes per logit); "
        f"{h['seconds']:.2f} s."]) + "\n"


def main(argv: list[str]) -> dict:
    flags = config.parse_flags(argv)
    tiny = config._convert("tiny", flags.pop("tiny", False), bool)
    path = flags.pop("benchmarks_file", "BENCHMARKS.md")
    cfg = config.Config(**({"model_name": llms.TINY, "device": "cpu"} if tiny else {}))
    config.update(cfg, flags)
    config.validate(cfg)
    device = llms.pick_device(cfg.device)
    row = run(cfg, device)
    measure.publish(report(row, device, argv), path)
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
