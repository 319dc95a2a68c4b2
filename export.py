"""Take a trained model out: a GGUF file that llama.cpp runs (and the tools built on it: llama-server,
Ollama, LM Studio), or a merged Hugging Face folder.

    python export.py out/smollm2_cpu --out smollm2.gguf --type q8_0           # the run's last checkpoint
    python export.py out/smollm2_cpu --out smollm2.gguf --type q8_0 --check   # + its accuracy in llama.cpp
    python export.py out/lora_run/checkpoints/step_000050 --out merged/      # LoRA merged: an HF folder

The source is a run folder (its latest checkpoint), a checkpoint, or an HF model folder. A LoRA
adapter is merged into its base (the run's saved base model, else its model_name); full weights are
copied clean (weights, config, tokenizer; no optimizer state). `--out` ending in .gguf writes one GGUF
file, anything else a folder. Either is written under a temporary name and renamed when complete.

GGUF: the `gguf` package writes the file; no llama.cpp build is needed. Architectures: ARCHES.
--type f32 | f16 | bf16 | q8_0 | q5_0 | q4_0 (TYPES): matrices take the type, norms and biases stay
f32 (llama.cpp computes them in f32), and a matrix whose rows do not split into the type's blocks
falls back to f16 (the count is printed). The tokenizer comes from the GGUF file the model was first
converted from (gguf_models records it in config.json as `gguf_source`) where there is one, else from
tokenizer.json (byte-level BPE; the pre-tokenizer's llama.cpp name from PRE_TOKENIZERS). The file
carries the run's chat template: for a run in the plain prompt format, the plain layout with its
few-shot examples, so a runtime applying the file's template prompts the model as training did. Such
a model ends its answer with a blank line: give the runtime the stop string "\\n\\n".

--check evaluates the written file in llama.cpp (the xllamacpp wheel) on the run's held-out questions
with the run's protocol, beside the checkpoint in transformers, and prints the paired difference
(evaluator.py --gguf, which this calls), with one record per question in FILE.eval.jsonl. Every other
--key is a config key for that evaluation (--eval_n 0 for the whole test split).
"""
import json
import os
import shutil
import sys

import numpy as np
import torch

import checkpoint
import config
import evaluator
import gguf_models
import llms

# HF model_type -> GGUF architecture (general.architecture) that llama.cpp runs
ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_0": "Q5_0", "q4_0": "Q4_0"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q5_0": "MOSTLY_Q5_0", "q4_0": "MOSTLY_Q4_0"}
# a decoder layer's tensors: HF name after "model.layers.{i}." -> GGUF name after "blk.{i}."
LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",  # qwen3, gemma3
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
# Gemma 3 norms both sides of attention and of the MLP
GEMMA3_LAYER_TENSORS = {**LAYER_TENSORS, "post_attention_layernorm": "post_attention_norm",
                        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# how tokenizer.json splits text before BPE -> the name llama.cpp knows that split by (tokenizer.ggml.pre)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "digits, then GPT-2's split": "smollm",  # SmolLM2, the built-in tiny model
    QWEN2_SPLIT: "qwen2",  # Qwen2, Qwen2.5, Qwen3
    QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|"): "llama-bpe",  # Llama 3
}


# ----------------------------------------------------------------------------------------------
# the source: a run, a checkpoint or a model folder -> one model in fp32 with its tokenizer


def run_folder(path: str) -> str | None:
    """The run a path belongs to: itself, or the run above a checkpoint (run/checkpoints/step_N)."""
    for folder in (path, os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        if evaluator.is_run(folder):
            return folder
    return None


def load(path: str, cache: str = config.Config.model_cache):
    """(model in fp32 with any LoRA adapter merged, tokenizer, model_name of the run or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise config.UserError(f"{path}: no such folder (give a run folder, a checkpoint or a model folder)")
    run = run_folder(path)
    model_name = config.load(["--config", os.path.join(run, "config.json")]).model_name if run else None
    weights, adapter = evaluator.resolve(path)
    if not adapter and not os.path.isfile(os.path.join(weights, "config.json")):
        raise config.UserError(f"{path} holds no checkpoint (no config.json): give a run folder, one of its "
                               f"checkpoints/step_N folders, or a model folder")
    if adapter and not weights:  # no saved base in the run: the adapter's base is the run's model_name
        weights = gguf_models.resolve(model_name, cache) if model_name else ""
        if not weights or not os.path.isfile(os.path.join(weights, "config.json")):
            raise config.UserError(f"{adapter} is a LoRA adapter whose base model ({model_name or 'unknown'}) is not "
                                   f"here: put the base model folder at {os.path.join(run or path, 'base_model')}")
    model_type = AutoConfig.from_pretrained(weights).model_type
    if model_type not in ARCHES:
        raise config.UserError(f"{weights} is a {model_type} model; export.py writes {', '.join(ARCHES)} "
                               f"(the GGUF architectures {', '.join(sorted(set(ARCHES.values())))})")
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(adapter or weights)  # a checkpoint's: the run's prompt layout
    if adapter:
        from peft import PeftModel

        with llms.lora_without_bitsandbytes(model):
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval(), tokenizer, model_name


def write_folder(model, tokenizer, out: str) -> None:
    """A plain HF folder (safetensors, config, tokenizer), renamed into place when complete."""
    if os.path.exists(out):
        raise config.UserError(f"{out} already exists: pick another --out or delete it")
    try:
        checkpoint.save_model(out, model, tokenizer, what="the merged model", intact="Nothing")
    except OSError as e:
        raise config.UserError(f"could not write {out}: {e.__cause__ or e}") from None


# ----------------------------------------------------------------------------------------------
# GGUF


def gguf_name(name: str, arch: str) -> str:
    """The GGUF name of an HF tensor name (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight)."""
    stem, kind = name.rsplit(".", 1)
    if stem in TOP_TENSORS:
        return f"{TOP_TENSORS[stem]}.{kind}"
    parts = stem.split(".", 3)  # model, layers, i, the rest
    table = GEMMA3_LAYER_TENSORS if arch == "gemma3" else LAYER_TENSORS
    if parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[3] in table:
        return f"blk.{parts[2]}.{table[parts[3]]}.{kind}"
    raise config.UserError(f"the model has a tensor {name} that export.py has no GGUF name for ({arch}): "
                           f"add it to LAYER_TENSORS or TOP_TENSORS in export.py")


def rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Llama's query/key rows from HF's order (each head's first half of dimensions, then its second) to
    llama.cpp's (the two halves interleaved pairwise)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(model, arch: str):
    """(GGUF name, fp32 numpy array) of every weight the file needs, in llama.cpp's layout."""
    cfg = model.config
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the tied head is the embedding: llama.cpp uses token_embd when output is absent
        out, w = gguf_name(name, arch), w.float().numpy()
        if arch == "llama" and ".attn_q." in out:
            w = rotary_rows(w, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in out:
            w = rotary_rows(w, cfg.num_key_value_heads)
        if arch == "gemma3" and "norm" in out:
            w = w + 1.0  # Gemma scales by (1 + weight); llama.cpp multiplies by the stored weight
        yield out, w


def rope_theta(cfg, layer_type: str = "full_attention") -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    params = params.get(layer_type, params)  # Gemma 3: one set per attention kind
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def write_hparams(w, arch: str, cfg) -> None:
    """The architecture's hyperparameters under llama.cpp's keys."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope_theta(cfg))
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads or arch in ("qwen3", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    scaling = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if scaling != "default":
        raise config.UserError(f"the model uses rope scaling '{scaling}', which export.py does not write yet")


def source_gguf(model, model_name: str | None, cache: str) -> str | None:
    """The GGUF file the model was first converted from (its tokenizer is copied from there), or None."""
    record = getattr(model.config, "gguf_source", None)
    if record:
        path = record["file"]
        if os.path.isfile(path) and gguf_models.file_hash(path) == record["sha256"]:
            return path
    if model_name:  # a run from before the record: its model_name names the file
        path = gguf_models.source_file(model_name, cache)
        if path and os.path.isfile(path):
            return path
    if record:
        raise config.UserError(f"the model came from {record['file']} (sha256 {record['sha256']}...), which is "
                               f"not there any more; its tokenizer is copied from that file: put it back")
    return None


def copy_tokenizer(w, path: str) -> None:
    """Every tokenizer.* entry of the source GGUF file but its chat template (the run's is written)."""
    import gguf

    for key, field in gguf.GGUFReader(path).fields.items():
        if not key.startswith("tokenizer.") or key == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), kind)


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (PRE_TOKENIZERS)."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex"):
        key = "digits, then GPT-2's split"
    elif kinds == ["Split", "ByteLevel"]:
        key = steps[0].get("pattern", {}).get("Regex", "")
    else:
        key = str(kinds)
    if key not in PRE_TOKENIZERS:
        raise config.UserError(f"the tokenizer splits text as {key[:200]}, which export.py has no llama.cpp name "
                               f"for: add it to PRE_TOKENIZERS in export.py with the name llama.cpp uses")
    return PRE_TOKENIZERS[key]


def write_tokenizer(w, tokenizer, n_vocab: int, folder: str) -> None:
    """A byte-level BPE tokenizer from tokenizer.json (saved in `folder`): the tokens by id, padded with
    unused fillers up to the model's rows (Qwen pads its vocabulary), merges and special ids."""
    import gguf

    if json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE":
        raise config.UserError("export.py writes tokenizers from tokenizer.json for byte-level BPE only (Llama 3, "
                               "SmolLM2, Qwen); a SentencePiece model (Gemma) must come from its GGUF file")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.chat_template = None  # the run's, written by write_gguf
    special.add_to_gguf(w, quiet=True)


def encode(w: np.ndarray, kind: str):
    """(data, GGML type) of one tensor in the asked type: vectors stay f32, and a matrix whose rows do
    not split into the type's blocks falls back to f16."""
    import gguf

    qtype = gguf.GGMLQuantizationType[TYPES[kind]]
    if w.ndim == 1 or kind == "f32":
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16), qtype
    return gguf.quants.quantize(w, qtype), qtype


def write_gguf(model, tokenizer, out: str, kind: str, source: str | None) -> dict:
    """The GGUF file at `out` (see the module docstring); returns {GGML type name: tensors}."""
    import gguf

    arch = ARCHES[model.config.model_type]
    tmp = f"{out}.{os.getpid()}.tmp"
    counts: dict[str, int] = {}
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(os.path.splitext(os.path.basename(out))[0])
        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[kind]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, arch, model.config)
        if source:
            copy_tokenizer(w, source)
        else:
            folder = f"{tmp}.tokenizer"
            tokenizer.save_pretrained(folder)
            try:
                write_tokenizer(w, tokenizer, model.get_input_embeddings().weight.shape[0], folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        if tokenizer.chat_template:
            w.add_chat_template(llms.without_raw_blocks(tokenizer.chat_template))
        for name, data in tensors(model, arch):
            data, qtype = encode(data, kind)
            w.add_tensor(name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # a failed export leaves no partial file
    return counts


def export(path: str, out: str, kind: str = "f16", cache: str = config.Config.model_cache) -> str:
    """Writes `out` (a .gguf file or an HF folder) from the run, checkpoint or model folder at `path`."""
    if kind not in TYPES:
        raise config.UserError(f"--type {kind}: choose one of {', '.join(TYPES)}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise config.UserError(f"--out {out}: cannot write in {parent} (no such folder, or not writable)")
    model, tokenizer, model_name = load(path, cache)
    if not out.endswith(".gguf"):
        write_folder(model, tokenizer, out)
        print(f"wrote {out} (an HF folder: AutoModelForCausalLM.from_pretrained({out!r}))")
        return out
    counts = write_gguf(model, tokenizer, out, kind, source_gguf(model, model_name, cache))
    size = os.path.getsize(out) / 2**20
    print(f"wrote {out}: {size:.1f} MiB, tensors " + ", ".join(f"{n} {t}" for t, n in counts.items()))
    return out


def main(argv: list[str]) -> None:
    path, argv = (argv[0], argv[1:]) if argv and not argv[0].startswith("--") else ("", argv)
    flags = config.parse_flags(argv)
    out, kind, check = flags.pop("out", ""), flags.pop("type", "f16"), flags.pop("check", None)
    if not path or not out:
        raise config.UserError("usage: python export.py RUN_OR_CHECKPOINT --out model.gguf [--type f16] [--check], "
                               "or --out DIR/ for a merged HF folder")
    export(path, out, kind, flags.get("model_cache", config.Config.model_cache))
    if check is not None and str(check).lower() not in ("false", "0"):
        if not out.endswith(".gguf"):
            raise config.UserError("--check evaluates a GGUF file in llama.cpp: give --out FILE.gguf")
        evaluator.main(["--model", path, "--gguf", out, "--out", os.path.splitext(out)[0] + ".eval.jsonl"]
                       + [item for key, value in flags.items() for item in (f"--{key}", str(value))])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except config.UserError as e:
        sys.exit(f"error: {e}")
