"""Speed and memory of one GRPO workload: our loop and TRL's GRPOTrainer, side by side in one process.

    python tools/bench.py                          # GPU: Qwen2.5-1.5B architecture, 1 prompt x 16 chains x 786 tokens
    python tools/bench.py --cap_gb 24              # the same, limited to 24 GB of a larger card
    python tools/bench.py --cap_gb 24 --lora_r 16  # LoRA; any train.py key applies (--beta, --sampler ...)
    python tools/bench.py --tiny                   # CPU: the built-in tiny model, same workload shape
    python tools/bench.py --ragged                 # chains of unequal length, as real ones are
    python tools/bench.py --sampler guided --systems ours   # any sampling idea (samplers.py); TRL samples plainly
    python tools/bench.py --model_name gemma-3-270m --device cpu   # a real model (a folder, a GGUF file)

The workload: a model of the exact Qwen2.5-1.5B architecture (vocab 151,936, tied embeddings) with
random weights, built from its config on the device (nothing is downloaded), bf16 on GPU (or the real
model --model_name names, with its own tokenizer; the prompt is random ordinary tokens); one
prompt of about 150 tokens x 16 chains (--prompts_per_step B: B distinct prompts, a group of chains
each), every chain forced to the full 786 new tokens (EOS is forbidden until then), a reward that
varies between chains (distinct words), and `warmup` steps before `steps` measured ones. --ragged
then cuts each chain (EOS, padding after) to a length spread evenly over 1/G .. 1 of the maximum,
shuffled, the same in both systems: sampling costs the same, the loss passes see chains of unequal
length. Both systems start from the same weights with matched settings (bench_trl.py maps ours onto
TRL's); TRL samples with its own default (HF generate, dynamic cache), ours with `--kv_cache` (dynamic
or static).

Each system gets one row, printed and appended to BENCHMARKS.md (date, device, versions, command):
peak memory over its run (GPU: torch's allocated / reserved; CPU: the process's peak resident
memory since the system started), and under the table the peak of each phase; seconds per step
split into sampling / log-prob forward passes / backward and the rest (loss, rewards, clipping) /
optimizer step; sampled tokens per second of step; and decode time per token (sampling time / new
tokens, prefill included) as a fraction of the physical limit: the weights' bytes (read once per
decode step) over the memory bandwidth, measured here with a large device-to-device copy.

bench_head.py measures one piece alone: the log-prob head's memory for one chunk of logits.

Bench-only flags: --tiny, --cap_gb (GB, 0 = no cap), --steps, --warmup, --prompt_tokens, --ragged,
--systems (ours,trl), --benchmarks_file. Our timings come from light wrappers around
logprobs.token_logps / logprobs.liger_loss and the optimizer's step hooks: each step is grpo.step, as in train.py.
"""
import contextlib
import copy
import importlib.metadata
import os
import re
import sys
import tempfile

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
import bench_trl
import builtin_tasks
import config
import data
import grpo
import llms
import logprobs
import measure
import optim
import rewards
import samplers

BENCH_FLAGS = {"tiny": False, "cap_gb": 0.0, "steps": 3, "warmup": 1, "prompt_tokens": 150, "ragged": False,
               "systems": "ours,trl", "benchmarks_file": "BENCHMARKS.md"}
# Qwen/Qwen2.5-1.5B-Instruct's config.json, so that no download is needed
QWEN2_5_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu",
                    bos_token_id=151643, eos_token_id=151645)
QWEN_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


# ----------------------------------------------------------------------------------------------
# The workload: model, tokenizer, prompt, reward


def word_tokenizer(vocab_size: int, special: dict):
    """A tokenizer of `vocab_size` words "w0", "w1", ... with Qwen's special ids: any id decodes, and a
    prompt of n random words is exactly n tokens. The random-weight model needs no real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {i: s for s, i in special.items()}
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words decode with spaces between them
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=llms.CHAT_TEMPLATE)


RAW_PROMPT = "{{ messages[-1]['content'] }}"  # the chat template of the workload: its prompt as it is


def build(cfg, device: str, gradient_checkpointing: bool, lengths: list[int] | None = None):
    """A fresh (model, tokenizer), the same weights on every call (seeded). Every chain is forced to its
    full length, then cut to `lengths` (cut_chains) when any is shorter than the maximum; the chat
    template is the prompt itself, so both systems see the same prompt tokens."""
    model, tok = build_model(cfg, device, gradient_checkpointing)
    tok.chat_template = RAW_PROMPT
    force_length(model, cfg.max_completion_tokens)
    if lengths and min(lengths) < cfg.max_completion_tokens:
        cut_chains(model, lengths, cfg.max_completion_tokens, tok.eos_token_id, tok.pad_token_id)
    return model, tok


def build_model(cfg, device: str, gradient_checkpointing: bool):
    if cfg.model_name == llms.TINY:
        train_set, _ = builtin_tasks.arithmetic_task(500, 10, seed=cfg.seed)
        corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train_set]
        return llms.load(llms.TINY, device, dtype=cfg.dtype, gradient_checkpointing=gradient_checkpointing,
                         liger=cfg.liger, tiny_corpus=corpus, tiny_vocab_size=cfg.tiny_vocab_size,
                         tiny_hidden=cfg.tiny_hidden, tiny_layers=cfg.tiny_layers, seed=cfg.seed)
    if cfg.model_name != config.Config.model_name:  # a real model (a folder, a GGUF file, a shipped name)
        return llms.load(cfg.model_name, device, dtype=cfg.dtype, gradient_checkpointing=gradient_checkpointing,
                         liger=cfg.liger, trust_remote_code=cfg.trust_remote_code, model_cache=cfg.model_cache)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    with torch.device(device):  # built in place: no fp32 copy on the host
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**QWEN2_5_1_5B), dtype=llms.pick_dtype(cfg.dtype, device))
    return llms.prepare(model, word_tokenizer(QWEN2_5_1_5B["vocab_size"], QWEN_SPECIAL), device,
                        gradient_checkpointing, cfg.liger)


def make_prompt(tokenizer, num_tokens: int, seed: int) -> str:
    """Text of random ordinary tokens, num_tokens long (or about, for BPE) once tokenized again."""
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    pick = torch.randint(len(ordinary), (num_tokens,), generator=torch.Generator().manual_seed(seed))
    text = tokenizer.decode(ordinary[pick].tolist())  # a BPE tokenizer may merge across the joins:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:num_tokens])  # cut again


def chain_lengths(num_chains: int, max_tokens: int, ragged: bool, seed: int) -> list[int]:
    """New tokens of each chain: all max_tokens, or (ragged) spread evenly over max/G .. max, shuffled."""
    if not ragged:
        return [max_tokens] * num_chains
    order = torch.randperm(num_chains, generator=torch.Generator().manual_seed(seed)).tolist()
    return [max(1, round(max_tokens * (i + 1) / num_chains)) for i in order]


def force_length(model, new_tokens: int) -> None:
    """Wrap model.generate so that no row may end (EOS) before new_tokens: sampling costs the same in
    both systems whatever the random weights write (TRL also gets min_new_tokens from bench_trl)."""
    generate = model.generate

    def forced(*args, generation_config=None, **kwargs):
        if generation_config is not None:
            generation_config = copy.copy(generation_config)
            generation_config.min_new_tokens = new_tokens
        return generate(*args, generation_config=generation_config, **kwargs)
    model.generate = forced


def cut_chains(model, lengths: list[int], new_tokens: int, eos_id: int, pad_id: int) -> None:
    """Wrap model.generate so that row i of its (full-length) output ends with EOS after
    lengths[i % len(lengths)] new tokens, padding after: both systems call it, and read the EOS."""
    generate = model.generate

    def cut(*args, **kwargs):
        out = generate(*args, **kwargs)
        seqs = out.sequences if hasattr(out, "sequences") else out  # (N, P + new_tokens)
        ends = torch.tensor([lengths[i % len(lengths)] for i in range(len(seqs))], device=seqs.device)[:, None]
        cols = torch.arange(new_tokens, device=seqs.device)
        new = seqs[:, -new_tokens:]
        seqs[:, -new_tokens:] = torch.where(cols < ends - 1, new, torch.where(cols == ends - 1, eos_id, pad_id))
        return out
    model.generate = cut


def reward(text: str) -> float:
    """Distinct words w<i> / 100: varies between chains, so advantages (and gradients) are not zero.
    Read without spaces: a checkpoint folder of the word tokenizer reloads as Qwen2's tokenizer, whose
    byte-level decoder joins the words ("w5w6w7"). A real model's text: its distinct words."""
    return len(set(re.findall(r"w\d+", text) or text.split())) / 100


def distinct_words(completion: str, answer: str, **info) -> float:
    """`reward` as a reward function (rewards.REWARDS): ours scores the workload through grpo.step."""
    return reward(completion)


# ----------------------------------------------------------------------------------------------
# Measurement


def summarise(system: str, steps: list[dict], tokens: int, new_tokens: int, bytes_per_step: int, bw: float,
              clock: measure.Clock) -> dict:
    """One row: the mean time of the measured steps; peak memory over all steps, warm-up included."""
    mean = {k: sum(s.get(k, 0.0) for s in steps) / len(steps) for k in ("step", "sample", "logp", "optim")}
    decode = mean["sample"] / new_tokens
    clock.mark()
    alloc, reserved = (max(p[i] for p in clock.peaks.values()) for i in (0, 1))
    return {"system": system, "peak_alloc_gb": alloc, "peak_reserved_gb": reserved,
            "peak_by_phase": {k: p[0] for k, p in clock.peaks.items()}, "step_s": mean["step"],
            "sample_s": mean["sample"], "logp_s": mean["logp"],
            "backward_s": mean["step"] - mean["sample"] - mean["logp"] - mean["optim"],
            "optim_s": mean["optim"], "tokens_per_s": tokens / mean["step"], "decode_ms": 1000 * decode,
            "decode_bw_frac": bytes_per_step / bw / decode}


# ----------------------------------------------------------------------------------------------
# The two systems


@contextlib.contextmanager
def swapped(module, name: str, fn):
    """module.name = fn for the duration, restored afterwards."""
    original = getattr(module, name)
    setattr(module, name, fn)
    try:
        yield
    finally:
        setattr(module, name, original)


def run_ours(cfg, device: str, prompts: list[str], warmup: int, steps: int, bw: float, lengths: list[int]) -> dict:
    """Our steps as train.py takes them: llms.for_training, samplers.make (--sampler), grpo.step."""
    model, tok = build(cfg, device, cfg.gradient_checkpointing, lengths)
    policy = llms.for_training(model, tok, cfg, load_reference=lambda: build(cfg, device, False)[0])
    optimizer, scheduler = optim.make_optimizer(policy.model, cfg)
    clock = measure.Clock(device)
    optimizer.register_step_pre_hook(lambda *_: clock.start("optim"))
    optimizer.register_step_post_hook(lambda *_: clock.stop("optim"))
    sample = clock.wrap("sample", samplers.make(cfg, device=device, train_set=[]))
    batch = [{"question": prompt, "answer": "", "solution": ""} for prompt in prompts]
    measured = []
    with swapped(logprobs, "token_logps", clock.wrap("logp", logprobs.token_logps)), \
            swapped(logprobs, "liger_loss", clock.wrap("logp", logprobs.liger_loss)):
        for step in range(1, warmup + steps + 1):
            t0 = clock.now()
            out = grpo.step(policy, sample, batch, step, optimizer, cfg)
            scheduler.step()
            times = {"step": clock.now() - t0, **clock.take()}
            if step > warmup:
                measured.append(times)
    tokens = int(out.rollout.loss_mask.sum())
    row = summarise(f"ours ({cfg.kv_cache})", measured, tokens, cfg.max_completion_tokens,
                    measure.weight_bytes(policy.model), bw, clock)
    del model, policy, optimizer, out
    return row


def run_trl(cfg, device: str, prompts: list[str], warmup: int, steps: int, bw: float, lengths: list[int],
            workdir: str) -> dict:
    """TRL's GRPOTrainer on the same model, prompt, reward and settings (bench_trl.py)."""
    model, tok = build(cfg, device, False, lengths)  # gradient checkpointing: TRL switches it on itself
    clock = measure.Clock(device)
    measured, trained = bench_trl.run(cfg, device, model, tok, prompts, reward, warmup, steps, clock, lengths,
                                      workdir)
    row = summarise(f"trl {importlib.metadata.version('trl')}", measured, sum(lengths), cfg.max_completion_tokens,
                    measure.weight_bytes(trained), bw, clock)
    del model, trained
    return row


# ----------------------------------------------------------------------------------------------
# Report


COLUMNS = [("system", "system", "{}"), ("peak_alloc_gb", "peak GB alloc", "{:.2f}"),
           ("peak_reserved_gb", "peak GB reserved", "{:.2f}"), ("step_s", "step s", "{:.2f}"),
           ("sample_s", "sample s", "{:.2f}"), ("logp_s", "log-prob s", "{:.2f}"),
           ("backward_s", "backward+rest s", "{:.2f}"), ("optim_s", "optim s", "{:.3f}"),
           ("tokens_per_s", "tokens/s", "{:.0f}"), ("decode_ms", "decode ms/token", "{:.2f}"),
           ("decode_bw_frac", "% of bandwidth limit", "{:.1%}")]


PHASES = {"sample": "sampling", "logp": "log-prob forward", "rest": "backward and the rest", "optim": "optimizer step"}


def report(rows: list[dict], cfg, bench: dict, device: str, bw: float, num_params: int, argv: list[str]) -> str:
    cap = f", capped at {bench['cap_gb']:g} GB" if bench["cap_gb"] else ""
    model = {llms.TINY: "tiny", config.Config.model_name: "Qwen2.5-1.5B architecture, random weights"}.get(
        cfg.model_name, cfg.model_name)
    memory = ("GPU memory (torch's allocator)" if device.startswith("cuda")
              else "the process's peak resident memory during each system's run (CPU)")
    ragged = (f" (--ragged: then cut to {min(bench['lengths'])}..{max(bench['lengths'])}, "
              f"{sum(bench['lengths'])} in all)" if bench["ragged"] else "")
    lines = measure.heading(device, argv, cap) + [
        f"{measure.versions()}. Model: {model}, {num_params / 1e6:.1f}M parameters, "
        f"{str(llms.pick_dtype(cfg.dtype, device)).replace('torch.', '')}. Workload: "
        f"{cfg.prompts_per_step} prompt(s) ({bench['prompt_tokens']} tokens each) x {cfg.num_chains} chains x "
        f"{cfg.max_completion_tokens} new tokens"
        f"{ragged}, "
        f"micro-batch {cfg.micro_batch_size}, {'LoRA r=%d' % cfg.lora_r if cfg.lora_r else 'full fine-tuning'}, "
        f"beta {cfg.beta:g}, {cfg.optimizer}, gradient checkpointing {cfg.gradient_checkpointing}, "
        f"kahan_updates {cfg.kahan_updates}, sort_micro_batches {cfg.sort_micro_batches}; "
        f"{bench['warmup']} warm-up + {bench['steps']} measured steps. "
        f"Memory bandwidth (copy): {bw / 1e9:.1f} GB/s. Peak memory: {memory}.", "",
        "| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |" for row in rows]
    lines += [""] + [f"Peak GB by phase, {row['system']}: " + ", ".join(
        f"{label} {row['peak_by_phase'][k]:.2f}" for k, label in PHASES.items() if k in row["peak_by_phase"])
        for row in rows]
    ours = [r for r in rows if r["system"].startswith("ours")]
    trl = [r for r in rows if r["system"].startswith("trl")]
    if ours and trl:
        lines += ["", f"Step time ours / TRL: {ours[0]['step_s'] / trl[0]['step_s']:.2f}; "
                      f"peak memory ours / TRL: {ours[0]['peak_reserved_gb'] / trl[0]['peak_reserved_gb']:.2f}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> list[dict]:
    hf_logging.disable_progress_bar()
    flags = config.parse_flags(argv)
    bench = {k: config._convert(k, flags.pop(k, v), type(v)) for k, v in BENCH_FLAGS.items()}
    systems = bench["systems"].split(",")
    if not systems or any(s not in ("ours", "trl") for s in systems):
        raise ValueError(f"unknown system in --systems {bench['systems']!r}: it takes ours, trl or both (ours,trl)")
    cfg = config.Config(prompts_per_step=1, rewards={"bench_distinct_words": 1.0})
    if bench["tiny"]:
        cfg.model_name, cfg.device = llms.TINY, "cpu"
    config.update(cfg, flags)
    config.validate(cfg)
    rewards.REWARDS["bench_distinct_words"] = distinct_words  # the workload's reward, for our side
    device = llms.pick_device(cfg.device)
    if "trl" in systems and cfg.sampler != "plain":
        raise ValueError(f"TRL samples plain chains only: --sampler {cfg.sampler} needs --systems ours")
    if "trl" in systems and cfg.loss_type not in bench_trl.TRL_LOSS:
        raise ValueError(f"TRL has no {cfg.loss_type!r} loss: pick another --loss_type or --systems ours")
    chains = cfg.prompts_per_step * cfg.num_chains
    if "trl" in systems and chains % min(cfg.micro_batch_size, chains):
        raise ValueError(f"TRL needs prompts_per_step x num_chains ({chains}) divisible by micro_batch_size "
                         f"({cfg.micro_batch_size})")
    if bench["cap_gb"] and device.startswith("cuda"):  # before any allocation: the allocator enforces it
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, bench["cap_gb"] * 2**30 / total))
    bw = measure.bandwidth(device)
    model, tok = build(cfg, device, gradient_checkpointing=False)
    prompts = [make_prompt(tok, bench["prompt_tokens"], cfg.seed + i) for i in range(cfg.prompts_per_step)]
    num_params = model.num_parameters()
    bench["prompt_tokens"] = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    del model
    bench["lengths"] = lengths = chain_lengths(chains, cfg.max_completion_tokens, bench["ragged"], cfg.seed)
    rows = []
    for system in systems:
        measure.reset_memory(device)
        torch.manual_seed(cfg.seed)
        if system == "ours":
            rows.append(run_ours(cfg, device, prompts, bench["warmup"], bench["steps"], bw, lengths))
        else:
            with tempfile.TemporaryDirectory() as workdir:
                rows.append(run_trl(cfg, device, prompts, bench["warmup"], bench["steps"], bw, lengths, workdir))
    measure.publish(report(rows, cfg, bench, device, bw, num_params, argv), bench["benchmarks_file"])
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
