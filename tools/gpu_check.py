"""The GPU check: one prepared command that answers every GPU question of the project in one short run.

    python tools/gpu_check.py --out $OUT            # one H100 / H200: about 8 minutes, from a bare machine
    python tools/gpu_check.py --tiny --out /tmp/c   # the CPU rehearsal, small models, in seconds (its test)

On the lent GPU machine (Python 3.12, torch 2.11, transformers 5.17; no bitsandbytes, liger-kernel, trl
or math-verify), first here `bash tools/gpu_wheels.sh` (the wheels it lacks, into the ignored .whl/), then
the device tool's run with carry [".whl"] and this command line:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 tools/gpu_check.py --out $OUT

Four parts, each under its own time budget (--budget_<part> seconds; a part over its budget records
the item it was in and skips the rest of that part, and the next part starts). Every item passes or
records its error; the suite goes on either way.
  smoke   2 GRPO steps of train.py's main, bf16, on a model of the exact Qwen2.5-1.5B architecture with
          random weights (saved once as a local folder, loaded with from_pretrained), for each variant in
          SMOKE: plain with the dynamic and the static sampler, Liger, LoRA r=16 with beta 0.04 (the
          reference is the adapter switched off), full fine-tuning with beta 0.04 (a reference copy),
          guided, GHPO, verifier turns with the hf backend on the policy, DAPO with dynamic sampling; and
          plain resumed for a third step from its checkpoint (optimizer state back onto the GPU); and plain
          with --fsdp, sharded over a process group of this one GPU (fsdp_item).
  memory  bench.py's reference workload (1 prompt x 16 chains x 786 tokens, 8-bit AdamW, gradient
          checkpointing) under a 24 GB cap, full fine-tuning and LoRA r=16: peak allocated and reserved
          memory by phase.
  speed   bench.py's pairing in this process: our step against TRL's GRPOTrainer on that workload, and
          ours with --kv_cache static; decode ms per token and its share of the bandwidth limit.
  kahan   bf16 weights after 3 steps of 8-bit AdamW at lr 5e-6 (bitsandbytes' CUDA kernel): with
          kahan_updates the change (weight + residual) matches the fp32-weight run's within KAHAN_TOL of
          its size; without it, the bf16 weights keep almost none of it.

It writes out/gpu_check.json (every item: ok, seconds, figures or error) and out/gpu_check.md (the
summary table, then bench.py's sections), and on the GPU appends the latter to --benchmarks_file
(BENCHMARKS.md; on the device machine only $OUT comes back: append out/gpu_check.md here). The
rehearsal appends nowhere unless given another --benchmarks_file: BENCHMARKS.md holds measured runs only.
"""
import argparse
import contextlib
import datetime
import json
import os
import re
import runpy
import shutil
import signal
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
import bench
import config
import llms
import measure
import optim
import rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
BUDGETS = {"smoke": 200, "memory": 70, "speed": 180, "kahan": 30}  # seconds per part on the GPU: 8 minutes
TINY_BUDGETS = {"smoke": 300, "memory": 120, "speed": 200, "kahan": 60}  # the CPU rehearsal (a slow CI machine)
# the rehearsal's model: the Qwen2.5-1.5B architecture and word tokenizer at a toy size (its 151,936
# words would make each CPU decode step take 0.15 s), the special tokens at the vocabulary's end as there
TINY_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, bos_token_id=2045, eos_token_id=2047)
TINY_SPECIAL = {"<|endoftext|>": 2045, "<|im_start|>": 2046, "<|im_end|>": 2047}
SMOKE = {  # variant -> train.py flags on top of smoke_flags
    "plain": [],
    "static sampler": ["--kv_cache", "static"],
    "liger": ["--liger"],
    "lora r16 + beta": ["--lora_r", "16", "--beta", "0.04"],
    "full + beta": ["--beta", "0.04"],
    "guided": ["--sampler", "guided", "--guide_max_prefix_tokens", "16", "--max_guide_tokens", "4"],
    "ghpo": ["--sampler", "ghpo"],
    "verifier hf": ["--sampler", "verifier", "--verifier_backend", "hf", "--verifier_model", "policy",
                    "--verifier_turn_tokens", "16", "--verifier_max_turns", "2", "--verifier_max_tokens", "16"],
    "dapo + dynamic sampling": ["--loss_type", "dapo", "--dynamic_sampling", "--max_sampling_rounds", "2"],
}
KAHAN_TOL = 0.05  # the share of the intended weight change that reaches the bf16 weights: 1 +- this
TRAIN_FIGURES = ("reward", "loss", "grad_norm", "step_time_s", "peak_mem_gb")


class OverBudget(BaseException):  # a BaseException: no `except Exception` in the code under test stops it
    pass


@contextlib.contextmanager
def budget(seconds: float):
    """Raise OverBudget in the main thread once `seconds` have passed (SIGALRM)."""
    def expire(signum, frame):
        raise OverBudget
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1e-3, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free(device: str) -> None:
    measure.reset_memory(device)  # compiled graphs, CUDA graph pools and cached blocks of the last item


def record(results: list, part: str, name: str, fn, device: str) -> None:
    """Run one item; append {part, name, ok, seconds, figures | error}. OverBudget is recorded, then raised."""
    t0 = time.time()
    row = {"part": part, "name": name}
    print(f"--- {part}: {name}", flush=True)
    try:
        row.update(ok=True, figures=fn())
    except OverBudget:
        row.update(ok=False, error=f"over the {part} part's budget")
        raise
    except (Exception, SystemExit) as e:  # the suite goes on: the error is the finding
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000],
                   traceback="".join(traceback.format_exception(e))[-4000:])
        print(row["traceback"], file=sys.stderr)
    finally:
        row["seconds"] = round(time.time() - t0, 1)
        results.append(row)
        free(device)


def run_part(results: list, part: str, items: list, seconds: float, device: str) -> None:
    """items: (name, fn) pairs, run in order until the part's budget is spent."""
    done = 0
    free(device)  # outside the budget: its first call imports torch._dynamo, which an alarm must not cut
    try:
        with budget(seconds):
            for name, fn in items:
                record(results, part, name, fn, device)
                done += 1
    except OverBudget:
        done += 1  # the item that ran over is recorded
    for name, _ in items[done:]:
        results.append({"part": part, "name": name, "ok": False, "seconds": 0.0,
                        "error": f"skipped: the {part} part's budget of {seconds:g} s was spent"})


# ----------------------------------------------------------------------------------------------
# 1. smoke: train.py's main, as a user runs it, on a local folder holding the Qwen2.5-1.5B architecture


def save_policy(folder: str, device: str, tiny: bool) -> str:
    """A random-weight model of the Qwen2.5-1.5B architecture (TINY_DIMS for the rehearsal) with
    bench.py's word tokenizer, saved as a from_pretrained folder: what `--model_name PATH` loads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dims = {**bench.QWEN2_5_1_5B, **(TINY_DIMS if tiny else {})}
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**dims), dtype=llms.pick_dtype("auto", device))
    model.save_pretrained(folder)
    tokenizer = bench.word_tokenizer(dims["vocab_size"], TINY_SPECIAL if tiny else bench.QWEN_SPECIAL)
    tokenizer.save_pretrained(folder)
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"


def even_words(completion: str, answer: str, **info) -> float:
    """The share of the random model's words w<i> with an even i: it varies between chains whatever
    their lengths, so the smoke runs' advantages (and gradients) are not zero."""
    words = re.findall(r"w(\d+)", completion)
    return sum(int(w) % 2 == 0 for w in words) / max(1, len(words))


def smoke_flags(model_dir: str, device: str, out_dir: str) -> list[str]:
    """Two short steps of the built-in task, scored by even_words (and correctness, which GHPO reads)."""
    return ["--model_name", model_dir, "--device", "cuda" if device.startswith("cuda") else "cpu",
            "--dataset", "arithmetic", "--arithmetic_train_size", "64", "--arithmetic_test_size", "8",
            "--system_prompt", "Solve step by step.", "--rewards", "correctness=1,smoke_even_words=1",
            "--prompts_per_step", "2", "--num_chains", "4", "--micro_batch_size", "4", "--max_prompt_tokens", "96",
            "--max_completion_tokens", "48", "--max_steps", "2", "--save_every", "2", "--eval_every", "2",
            "--eval_n", "4", "--optimizer", "adamw8bit", "--out_dir", out_dir]


def smoke_item(flags: list[str], out_dir: str, resume: bool = False):
    """train.py's two steps; with resume, then a third step resumed from the checkpoint of step 2 (8-bit
    AdamW's state and Kahan residuals load back onto the GPU: checkpoint.load_state)."""
    def run() -> dict:
        try:
            main = runpy.run_path(os.path.join(ROOT, "train.py"), run_name="train")["main"]
            main(flags)
            if resume:
                main(["--resume", out_dir, "--max_steps", "3"])
            with open(os.path.join(out_dir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            last = [r for r in rows if r["split"] == "train"][-1]
            return {k: round(last[k], 4) for k in TRAIN_FIGURES if k in last}
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)  # a full checkpoint of 1.5B weights is 3 GB
    return run


def fsdp_item(flags: list[str], out_dir: str, device: str):
    """train.py's two steps with --fsdp on this one GPU: a process group of one rank is made here (NCCL on a
    GPU, gloo in the rehearsal), so the policy is sharded (over one rank) as under torchrun: bf16 compute
    over fp32 master shards, the log-prob pass inside the root's forward, both sampling modes' plumbing."""
    def run() -> dict:
        import socket

        import torch.distributed as dist
        with socket.socket() as s:  # a free port for the one-rank rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                world_size=1, rank=0)
        try:
            return smoke_item(flags + ["--fsdp", "true", "--optimizer", "adamw", "--kahan_updates", "false"],
                              out_dir)()
        finally:
            if dist.is_initialized():  # train.py's teardown closes it when the run ends normally
                dist.destroy_process_group()
    return run


# ----------------------------------------------------------------------------------------------
# 2. memory and 3. speed: bench.py in this process


def bench_item(argv: list[str]):
    def run() -> dict:
        rows = bench.main(argv)
        keep = ("peak_alloc_gb", "peak_reserved_gb", "step_s", "sample_s", "decode_ms", "decode_bw_frac")
        return {row["system"]: {**{k: round(row[k], 4) for k in keep},
                                "peak_by_phase": {k: round(v, 3) for k, v in row["peak_by_phase"].items()}}
                for row in rows}
    return run


def bench_argv(tiny: bool, benchmarks_file: str, *extra: str) -> list[str]:
    small = ["--tiny", "--num_chains", "4", "--micro_batch_size", "4", "--max_completion_tokens", "24",
             "--prompt_tokens", "16"] if tiny else ["--cap_gb", "24"]
    return [*small, "--benchmarks_file", benchmarks_file, *extra]


# ----------------------------------------------------------------------------------------------
# 4. kahan: bf16 updates at lr 5e-6 on bitsandbytes' kernel


def kahan_item(device: str):
    def weights_after(dtype, kahan_updates: bool, w0, grads):
        """The weight after the steps as the optimizer means it: bf16 weight + its Kahan residual."""
        model = torch.nn.Linear(w0.numel(), 1, bias=False, device=device)  # >= 4096: 8-bit optimizer state
        model.weight.data = w0.to(device, dtype).reshape(1, -1).clone()
        cfg = config.Config(optimizer="adamw8bit", kahan_updates=kahan_updates, learning_rate=5e-6, warmup_steps=0)
        optimizer, _ = optim.make_optimizer(model, cfg)
        for g in grads:
            model.weight.grad = g.to(device, dtype).reshape(1, -1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        residual = optimizer.state[model.weight].get("residual", torch.zeros_like(model.weight))
        return (model.weight.detach().float() + residual.float()).flatten().cpu()

    def run() -> dict:
        torch.manual_seed(0)
        w0 = (torch.randn(65536) * 0.02).bfloat16().float()  # a typical init: one bf16 ulp is about 1e-4
        grads = [(torch.randn(65536) * 1e-3 + 1e-3).bfloat16().float() for _ in range(3)]
        intended = weights_after(torch.float32, False, w0, grads) - w0  # 3 x 5e-6: well under one ulp

        def kept(kahan_updates):  # the share of the intended change that the bf16 run holds
            return ((weights_after(torch.bfloat16, kahan_updates, w0, grads) - w0) @ intended
                    / (intended @ intended)).item()
        figures = {"kept_with_kahan": round(kept(True), 4), "kept_without": round(kept(False), 4),
                   "tolerance": KAHAN_TOL}
        if abs(figures["kept_with_kahan"] - 1) > KAHAN_TOL or figures["kept_without"] > 1 - KAHAN_TOL:
            raise AssertionError(f"bf16 updates on {device}: {figures}")
        return figures
    return run


# ----------------------------------------------------------------------------------------------
# The report


def summary(results: list, device: str, argv: list[str], wall: float) -> str:
    lines = measure.heading(device, argv, script="tools/gpu_check.py") + [
        f"{measure.versions()}. {sum(r['ok'] for r in results)} of {len(results)} items passed in {wall:.0f} s.", "",
        "| part | item | result | s | figures |", "|---|---|---|---|---|"]
    for r in results:
        result = "ok" if r["ok"] else "**failed**: " + r["error"].replace("|", "/").replace("\n", " ")[:300]
        figures = json.dumps(r.get("figures", ""))[:400].replace("|", "/")
        lines.append(f"| {r['part']} | {r['name']} | {result} | {r['seconds']:.1f} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU rehearsal: small models, seconds")
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu_check"), help="results folder")
    parser.add_argument("--benchmarks_file", default=None,
                        help="the summary is appended here (GPU default BENCHMARKS.md; --tiny: nowhere)")
    parser.add_argument("--parts", default="smoke,memory,speed,kahan")
    for part, seconds in BUDGETS.items():
        parser.add_argument(f"--budget_{part}", type=float, default=None, help=f"seconds (GPU: {seconds})")
    args = parser.parse_args(argv)
    if args.benchmarks_file is None:
        args.benchmarks_file = "" if args.tiny else "BENCHMARKS.md"
    if args.tiny and os.path.abspath(args.benchmarks_file) == os.path.join(ROOT, "BENCHMARKS.md"):
        raise SystemExit("the --tiny rehearsal measures nothing worth keeping: BENCHMARKS.md holds measured runs "
                         "only; drop --benchmarks_file (its summary is in --out) or name another file")
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run the CPU rehearsal with --tiny")
    rewards.REWARDS["smoke_even_words"] = even_words  # the smoke runs' varying reward
    sections = os.path.join(args.out, "benchmarks.md")  # bench.py's own sections
    open(sections, "w").close()
    budgets = {p: getattr(args, f"budget_{p}") or (TINY_BUDGETS if args.tiny else BUDGETS)[p] for p in BUDGETS}
    results, work = [], tempfile.mkdtemp(prefix="gpu_check_")
    try:
        parts = args.parts.split(",")
        if "smoke" in parts:
            model_dir = os.path.join(work, "policy")
            items = [("save the random-weight policy", lambda: {"model": save_policy(model_dir, device, args.tiny)})]
            for name, extra in SMOKE.items():
                run_dir = os.path.join(work, "run")
                items.append((name, smoke_item(smoke_flags(model_dir, device, run_dir) + extra, run_dir)))
            items.append(("resume", smoke_item(smoke_flags(model_dir, device, run_dir), run_dir, resume=True)))
            items.append(("fsdp, one rank", fsdp_item(smoke_flags(model_dir, device, run_dir), run_dir, device)))
            run_part(results, "smoke", items, budgets["smoke"], device)
        if "memory" in parts:
            run_part(results, "memory", [
                ("full fine-tuning", bench_item(bench_argv(args.tiny, sections, "--systems", "ours", "--steps", "1",
                                                           "--warmup", "0"))),
                ("LoRA r16", bench_item(bench_argv(args.tiny, sections, "--systems", "ours", "--steps", "1",
                                                   "--warmup", "0", "--lora_r", "16")))], budgets["memory"], device)
        if "speed" in parts:
            run_part(results, "speed", [
                ("ours and TRL, dynamic sampler", bench_item(bench_argv(args.tiny, sections, "--steps", "1"))),
                ("ours, static sampler", bench_item(bench_argv(args.tiny, sections, "--steps", "1", "--systems",
                                                               "ours", "--kv_cache", "static")))],
                budgets["speed"], device)
        if "kahan" in parts:
            run_part(results, "kahan", [("bf16 AdamW8bit at lr 5e-6", kahan_item(device))], budgets["kahan"], device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        text = summary(results, device, argv, time.time() - t0)
        with open(sections) as f:
            text += f.read()
        with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(), "device": measure.device_name(device),
                       "argv": argv, "budgets": budgets, "results": results}, f, indent=1)
        if args.benchmarks_file:
            measure.publish(text, args.benchmarks_file)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
