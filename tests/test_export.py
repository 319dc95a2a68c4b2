"""export.py: GGUF files read back by transformers and run by llama.cpp (the xllamacpp wheel), merged
HF folders, and clear errors. Tiny random Qwen2 and Qwen3 are built here; the two real models come
from conftest's session cache."""
import json
import os
import runpy
import sys

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import config
import evaluator
import export
import gguf_models
import llms
from helpers import ROOT

MIXED = "What is 47 + 38?\n\nAnswer: 85.  It's 3.5% (x)-y <|im_end|>"


def qwen_split_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen2's own split regex (as Qwen2.5 and Qwen3 ship), trained on `corpus`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(export.QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=llms.SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=llms.CHAT_TEMPLATE)


def peaked(model):
    """Larger random weights: next-token choices far from ties, so greedy text is the same in llama.cpp."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, task):
    """Folders of a tiny Qwen2 (the project's tokenizer, tied head, q/k/v biases, vocabulary rows padded
    to a multiple of 64 as Qwen's are) and a tiny Qwen3 (Qwen's split, its own head, q/k norms)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    corpus = [ex["question"] + " " + ex["answer"] for ex in task[0]] + [MIXED]
    out = {}
    for kind, tok in (("qwen2", llms.build_tiny_tokenizer(corpus, 300)), ("qwen3", qwen_split_tokenizer(corpus))):
        rows = -(-len(tok) // 64) * 64 + 64
        shape = dict(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
        model = (Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True)) if kind == "qwen2" else
                 Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=128, tie_word_embeddings=False)))  # every Qwen3's
        # head size, not hidden / heads: transformers' GGUF reader assumes it for qwen3 (llama.cpp reads key_length)
        folder = str(tmp_path_factory.mktemp(kind))
        peaked(model).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[kind] = folder
    return out


def same_logits(a, b, ids: list[int]) -> float:
    with torch.no_grad():
        x = torch.tensor([ids])
        return (a(x).logits - b(x).logits).abs().max().item()


def llama_cpp(path: str):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = path
    params.n_ctx, params.n_parallel, params.warmup, params.verbosity, params.use_jinja = 512, 1, False, -1, True
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
    return xllamacpp.Server(params)


def greedy(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_a_tiny_qwen_reads_back_and_runs_in_llama_cpp(tiny_models, tmp_path, kind):
    """F32 read back by transformers: the same logits and token ids (the filler rows past the tokenizer's
    last token included); llama.cpp tokenizes the prompt to the same length and continues it greedily
    with the same text."""
    folder = tiny_models[kind]
    path = export.export(folder, str(tmp_path / "m.gguf"), "f32")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    back, back_tok = gguf_models.read(path)
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    assert back_tok(MIXED, add_special_tokens=False)["input_ids"] == ids and tokenizer.eos_token_id in ids
    assert same_logits(model, back, ids) < 1e-5
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"  # transformers loads both with Qwen's split
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size > len(tokenizer)
    assert ("output.weight" in [t.name for t in reader.tensors]) == (kind == "qwen3")
    prompt = "What is 47 + 38?"
    reply = llama_cpp(path).handle_completions({"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert reply["usage"]["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply["choices"][0]["text"] == greedy(model, tokenizer, prompt, 8)


def test_an_exported_file_converts_back_as_model_name_parsing_it_once(tiny_models, tmp_path, monkeypatch):
    """--model_name FILE.gguf on a file export wrote: the cached HF folder holds the same weights and
    tokenizer, and the gguf package parses the file once (transformers would build three readers) and
    builds its tensor-name table once."""
    folder = tiny_models["qwen2"]
    path = export.export(folder, str(tmp_path / "m.gguf"), "f32")
    parses = []

    class Counting(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    name_map, tables = gguf.get_tensor_name_map, []
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda *args: tables.append(args) or name_map(*args))
    converted = gguf_models.resolve(path, str(tmp_path / "cache"))
    assert len(parses) == 1 and gguf.GGUFReader is Counting  # one parse, and the class is put back
    assert len(tables) == 1  # one tensor-name table (transformers asks for one per module)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    back, back_tok = AutoModelForCausalLM.from_pretrained(converted), AutoTokenizer.from_pretrained(converted)
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    assert back_tok(MIXED, add_special_tokens=False)["input_ids"] == ids
    assert same_logits(model, back, ids) < 1e-5


def test_each_split_of_the_table_is_recognised(task):
    """The tokenizer as built in memory (digits, then GPT-2's split: llama.cpp's smollm) and Qwen's split;
    transformers 5 reloads a saved qwen2-type tokenizer with Qwen's split whatever tokenizer.json says."""
    corpus = [ex["question"] for ex in task[0]]
    assert export.pre_tokenizer(llms.build_tiny_tokenizer(corpus, 300)) == "smollm"
    assert export.pre_tokenizer(qwen_split_tokenizer(corpus)) == "qwen2"


def test_a_lora_checkpoint_exports_merged(tiny_models, tmp_path):
    """A run's LoRA checkpoint (adapter + its run's saved base) becomes one HF folder whose logits are the
    adapter's on its base, and a GGUF file with the same weights."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    run = tmp_path / "run"
    base.save_pretrained(run / "base_model")
    tokenizer.save_pretrained(run / "base_model")
    with llms.lora_without_bitsandbytes(base):
        lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # peft starts B at zero: make the adapter change something
    step = run / "checkpoints" / "step_000002"
    lora.save_pretrained(step)
    tokenizer.save_pretrained(step)
    torch.save({}, step / "state.pt")  # what makes a checkpoint complete (checkpoint.latest)
    (run / "checkpoints" / "latest").write_text("step_000002")
    config.save(config.Config(model_name="tiny", lora_r=4), str(run / "config.json"))
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    export.main([str(run), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not os.path.exists(tmp_path / "merged" / "adapter_config.json")
    assert same_logits(lora.eval(), merged, ids) < 1e-3  # merging rounds: logits here are in the tens
    assert same_logits(AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]), merged, ids) > 0.1
    back, _ = gguf_models.read(export.export(str(step), str(tmp_path / "m.gguf"), "f32"))
    assert same_logits(merged, back, ids) < 1e-5


def test_quantized_types_keep_the_model_close(tiny_models, tmp_path):
    """f16, bf16, q8_0, q5_0 and q4_0 read back near the f32 weights, in that order of error; vectors stay
    f32, and a matrix whose rows do not split into 32-wide blocks falls back to f16."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"])
    ids = AutoTokenizer.from_pretrained(tiny_models["qwen3"])(MIXED, add_special_tokens=False)["input_ids"]
    errors = {}
    for kind in ("f16", "bf16", "q8_0", "q5_0", "q4_0"):
        path = export.export(tiny_models["qwen3"], str(tmp_path / f"{kind}.gguf"), kind)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == export.TYPES[kind]
        if kind not in ("f16", "bf16"):
            errors[kind] = same_logits(model, gguf_models.read(path)[0], ids)
    assert errors["q8_0"] < errors["q5_0"] < errors["q4_0"]
    assert export.encode(torch.ones(4, 48).numpy(), "q8_0")[1] == gguf.GGMLQuantizationType.F16


def test_the_shipped_models_export_as_llama_cpp_expects(smol_dir, gemma_dir, tmp_path):
    """Against the GGUF file each shipped model came from (the record gguf_models keeps, where the
    tokenizer is copied from): every hyperparameter key is written with its value, and every tensor
    stored there as F32 or Q8_0 (Gemma's norms, stored plus one) or Q4_1 (SmolLM2's queries and keys,
    in llama.cpp's rotary order) is what export.tensors gives."""
    for folder in (smol_dir, gemma_dir):
        model, tokenizer, _ = export.load(folder)
        source = export.source_gguf(model, None, "")
        assert source == json.load(open(os.path.join(folder, "config.json")))["gguf_source"]["file"]
        writer = gguf.GGUFWriter(str(tmp_path / "unused.gguf"), export.ARCHES[model.config.model_type])
        export.write_hparams(writer, writer.arch, model.config)
        ours = {k: v.value for k, v in writer.kv_data[0].items()}
        theirs = gguf.GGUFReader(source)
        arch_keys = [k for k in theirs.fields if k.startswith(writer.arch + ".")]
        assert arch_keys and all(ours[k] == pytest.approx(theirs.fields[k].contents()) for k in arch_keys)
        stored = {t.name: t for t in theirs.tensors if t.tensor_type.name in ("F32", "Q8_0", "Q4_1")}
        checked = 0
        for name, w in export.tensors(model, writer.arch):
            if name in stored and ("norm" in name or ".attn_q." in name or ".attn_k." in name):
                t = stored[name]
                want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
                assert abs(want - w).max() <= 1e-6 * max(1.0, abs(want).max()), name
                checked += 1
        assert checked >= 2 * model.config.num_hidden_layers


def test_smollm2_in_llama_cpp_continues_as_transformers_and_prompts_with_the_runs_layout(smol_dir, tmp_path):
    """A plain-format run's SmolLM2 (the checkpoint's template: the plain layout with its solved example) at
    F16 and Q8_0: transformers reads the file back with the same token ids and near logits; llama.cpp's
    greedy continuation equals transformers' on the same file, and its chat endpoint prompts with the
    file's template, to the token."""
    model, tokenizer, _ = export.load(smol_dir)
    tokenizer.chat_template = llms.plain_template(tokenizer, [("What is 2 + 3?", "5")])
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    messages = llms.chat_messages(tokenizer, "Reply with just the number.", "What is 47 + 38?")
    rendered = llms.render(tokenizer, messages)
    assert rendered.endswith("Question: What is 47 + 38?\nAnswer:")
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    for kind, close in (("f16", 0.1), ("q8_0", 2.0)):
        path = export.export(str(folder), str(tmp_path / f"smol_{kind}.gguf"), kind)
        back, back_tok = gguf_models.read(path)
        assert back_tok(MIXED, add_special_tokens=False)["input_ids"] == ids
        assert same_logits(model, back, ids) < close, kind
        assert llms.render(back_tok, messages) == rendered and "{% raw %}" not in back_tok.chat_template
        server = llama_cpp(path)
        prompt = "The capital of France is"
        reply = server.handle_completions({"prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert reply["choices"][0]["text"] == greedy(back, back_tok, prompt, 12), kind
        reply = server.handle_chat_completions({"messages": messages, "max_tokens": 6, "temperature": 0,
                                                "stop": [llms.PLAIN_STOP]})
        assert reply["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert reply["choices"][0]["message"]["content"].strip().isdigit(), kind
        del server, back


def test_evaluator_scores_a_gguf_file_beside_its_checkpoint(tiny_models, tmp_path):
    """evaluator.py --gguf: the file in llama.cpp on the same questions as the model in transformers, the
    two paired; an F32 file of the same weights answers alike (greedy)."""
    path = export.export(tiny_models["qwen2"], str(tmp_path / "m.gguf"), "f32")
    out = str(tmp_path / "eval.jsonl")
    results = evaluator.main(["--model", tiny_models["qwen2"], "--gguf", path, "--dataset", "arithmetic",
                              "--system_prompt", "", "--eval_n", "6", "--max_completion_tokens", "6",
                              "--prompt_format", "chat", "--out", out])
    ours, theirs = results["model"]["records"], results["gguf"]["records"]
    assert [r["question"] for r in ours] == [r["question"] for r in theirs]
    assert results["gguf"]["metrics"]["prompt_mismatch"] == 0.0
    assert sum(a["completions"] == b["completions"] for a, b in zip(ours, theirs)) >= 5
    assert results["paired_gguf"]["n"] == 6


def test_bad_input_gets_a_clear_error_and_leaves_no_file(tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "empty"): "holds no checkpoint", str(tmp_path / "nowhere"): "no such folder"}
    for path, words in cases.items():
        with pytest.raises(config.UserError, match=words):
            export.export(path, str(tmp_path / "x.gguf"))
    with pytest.raises(config.UserError, match="cannot write"):
        export.export(tiny_models["qwen2"], str(tmp_path / "no" / "dir" / "x.gguf"))
    with pytest.raises(config.UserError, match="choose one of"):
        export.export(tiny_models["qwen2"], str(tmp_path / "x.gguf"), "q4_k")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(config.UserError, match="gpt2 model; export.py writes llama, qwen2, qwen3, gemma3_text"):
        export.export(str(gpt2), str(tmp_path / "x.gguf"))
    run = tmp_path / "run"  # a LoRA run whose base model is gone
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "adapter_config.json").write_text("{}")
    config.save(config.Config(model_name=str(tmp_path / "gone"), lora_r=4), str(run / "config.json"))
    with pytest.raises(config.UserError, match="base model .* is not here"):
        export.export(str(run / "checkpoints" / "step_000001"), str(tmp_path / "x.gguf"))
    bad = export.tensors  # a failure halfway through the tensors leaves no partial file
    with pytest.MonkeyPatch.context() as m:
        m.setattr(export, "tensors", lambda model, arch: [*list(bad(model, arch))[:3], ("odd", None)])
        with pytest.raises(Exception):
            export.export(tiny_models["qwen2"], str(tmp_path / "x.gguf"))
    assert sorted(os.listdir(tmp_path)) == ["empty", "gpt2", "run"]
    with pytest.MonkeyPatch.context() as m, pytest.raises(SystemExit) as stop:  # as `python export.py` runs
        m.setattr(sys, "argv", ["export.py", str(tmp_path / "empty"), "--out", "x.gguf"])
        runpy.run_path(os.path.join(ROOT, "export.py"), run_name="__main__")
    assert str(stop.value.code).startswith("error:") and "holds no checkpoint" in str(stop.value.code)
