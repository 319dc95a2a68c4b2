"""Models and tokenizers: a hub name, a local folder, a GGUF file or shipped real model (converted
once to a cached HF folder by gguf_models.py), or the built-in tiny model.

`load` returns a ready (model, tokenizer) pair: dtype chosen for the device, a pad token, left padding
(generation appends on the right), the prompt layout (the chat template, or the plain format for a
model without one), a neutral generation config, gradient checkpointing, and optionally Liger
kernels. `add_lora` then swaps full fine-tuning for LoRA (peft).

The tiny model is a randomly initialised Qwen2 (the same architecture as Qwen2.5) with a byte-level
BPE tokenizer trained in a second on the run's own training text, so nothing is downloaded. Like
Qwen's, the tokenizer splits numbers into single digits.

    python llms.py     # builds the tiny model and prints its size and a tokenized prompt
"""
import contextlib
import json
import os
import re
from dataclasses import dataclass
from unittest import mock

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer,
                          GenerationConfig, PreTrainedTokenizerFast)

import config
import gguf_models
import vision

TINY = "tiny"
TINY_VL = vision.TINY_VL
TINY_CONTEXT = 1024  # positions of the built-in tiny models
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's chat layout, so prompts of the tiny model look like those of the real one; content given as
# parts (a question with images or videos) renders an image and a video as Qwen2-VL's does.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}" + vision.IMAGE_PART + "{% elif part['type'] == 'video' %}"
    + vision.video.VIDEO_PART + "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(corpus: list[str], vocab_size: int, vl: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`: any text encodes (bytes are the fallback), digits stay single;
    vl adds Qwen2-VL's vision tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    special = SPECIAL_TOKENS + (vision.VISION_TOKENS if vl else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def build_tiny_model(vocab_size: int, hidden: int, layers: int, seed: int):
    """A small Qwen2: same blocks as Qwen2.5 (GQA, RoPE, SwiGLU, RMSNorm, tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=TINY_CONTEXT,
                         tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def context_length(model_name: str, trust_remote_code: bool = False,
                   model_cache: str = config.Config.model_cache) -> int | None:
    """The longest sequence the model takes (prompt + completion), from its config alone; None if unknown."""
    if model_name in (TINY, TINY_VL):
        return TINY_CONTEXT
    cfg = _from_pretrained(AutoConfig, gguf_models.resolve(model_name, model_cache),
                           trust_remote_code=trust_remote_code)
    return getattr(cfg.get_text_config(), "max_position_embeddings", None)  # a VL model: its language model's


def chat_messages(tokenizer, system_prompt: str, user: str) -> list[dict]:
    """The messages of one question: the system prompt, if any, then the question. With no system
    prompt, a template that would add its own default one (SmolLM2's, Qwen2.5's) gets an empty system
    message instead: the model sees no system text the run did not ask for. For a VL model, the
    question's <image> and <video> marks become image and video parts (vision.py)."""
    if vision.is_vl(tokenizer) and vision.has_visual(user):
        user = vision.content_parts(user)
    question = [{"role": "user", "content": user}]
    if system_prompt:
        return [{"role": "system", "content": system_prompt}] + question
    bare, empty = question, [{"role": "system", "content": ""}] + question
    return empty if len(render(tokenizer, bare)) > len(render(tokenizer, empty)) else bare  # a default was added


def render(tokenizer, messages: list[dict]) -> str:
    """The chat template applied to `messages`, ending where the assistant starts writing, with the run's
    chat_template_kwargs (prepare puts them on the tokenizer; Qwen3's enable_thinking, say). Every
    prompt of a run is rendered here: sampling, evaluation, the warm start, GHPO's hints, the verifier."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **getattr(tokenizer, "chat_template_kwargs", {}))


def chat_prompt(tokenizer, system_prompt: str, user: str) -> str:
    """The prompt text for one question in the tokenizer's layout (its chat template, or the plain one
    prepare installs), ending where the assistant starts writing."""
    return render(tokenizer, chat_messages(tokenizer, system_prompt, user))


PLAIN_STOP = "\n\n"  # in the plain format an answer ends at a blank line, where the next "Question:" would start


def plain_template(tokenizer, shots: list[tuple[str, str]]) -> str:
    """The plain prompt format as a chat template, for a model without one (a base model): the model's
    own BOS where its tokenizer adds one, the system prompt as text, the solved examples `shots`
    (question, answer), then "Question: ...\nAnswer:". No other family's special tokens appear. Each
    answer ends with a blank line: a base model goes on to write the next "Question:" rather than its
    EOS, so the blank line is a stop token in this format (eos_ids)."""
    def raw(text: str) -> str:  # text used as it is, never read as template syntax
        if "{% endraw %}" in text:
            raise config.UserError(f"a few-shot example holds the text '{{% endraw %}}', which the plain prompt "
                                   f"format cannot quote: drop that example or set few_shot 0")
        return "{% raw %}" + text + "{% endraw %}"
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("1")["input_ids"][:1] == [tokenizer.bos_token_id]
    solved = "".join(f"Question: {q}\nAnswer: {a}{PLAIN_STOP}" for q, a in shots)
    return (raw(tokenizer.bos_token if adds_bos else "")
            + "{% for m in messages if m['role'] == 'system' and m['content'] %}{{ m['content'] }}\n\n{% endfor %}"
            + raw(solved)
            + "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
              "Question: {{ m['content'] }}\nAnswer:{% else %} {{ m['content'] }}" + raw(PLAIN_STOP)
            + "{% endif %}{% endfor %}")


def without_raw_blocks(template: str) -> str:
    """The same template with each {% raw %}text{% endraw %} (plain_template quotes its text so) written
    as a string expression, which renders the same: llama.cpp's Jinja engine has no raw blocks and
    refuses a template that holds one ("Unknown statement: raw"). export.py writes GGUF files with it."""
    return re.sub(r"\{% raw %\}(.*?)\{% endraw %\}", lambda m: "{{ " + json.dumps(m[1]) + " }}", template,
                  flags=re.DOTALL)


def eos_ids(tokenizer, model, plain: bool = False) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, the model's (Qwen2.5 lists two), chat ends;
    in the plain format also the blank line, where the tokenizer has it as one token (stop_sequences
    holds it where it takes two)."""
    ids = {tokenizer.eos_token_id}
    if plain and len(stop := tokenizer(PLAIN_STOP, add_special_tokens=False)["input_ids"]) == 1:
        ids.add(stop[0])
    model_eos = model.generation_config.eos_token_id
    ids.update(model_eos if isinstance(model_eos, list) else [model_eos])
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def stop_sequences(tokenizer, plain: bool) -> list[list[int]]:
    """The plain format's blank line where the tokenizer writes it after an answer as more than one token:
    SmolLM2's BPE has "\n\n" as one token alone but as "\n", "\n" after a digit or a period (what
    the few-shot answers teach). Read from how the template's own text tokenizes; [] for chat."""
    if not plain:
        return []
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    found, tail = set(), ids("Question:")
    for answer in ("0", "0.", "done"):
        head, whole = ids(answer), ids(answer + PLAIN_STOP + "Question:")
        if whole[:len(head)] == head and whole[len(whole) - len(tail):] == tail:
            middle = tuple(whole[len(head):len(whole) - len(tail)])
            if len(middle) > 1:
                found.add(middle)
    return sorted(map(list, found))


def pick_device(device: str) -> str:
    """A device setting, with "auto" resolved to cuda when a GPU is there, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def _from_pretrained(cls, name: str, **kwargs):
    """from_pretrained with an error that says what to do when the name cannot be reached."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # ValueError: a config.json without a model_type transformers knows, ...
        where = "the local folder" if os.path.isdir(name) else "the model hub"
        raise config.UserError(
                f"could not load {name!r} from {where}: {str(e).splitlines()[0][:300]}\n"
                f"A model folder holds config.json (with its model_type, as save_pretrained writes it), the "
                f"weights and the tokenizer files; offline, pass such a folder: --model_name /path/to/model (or "
                f"--model_name tiny for the built-in model).") from None


def load(model_name: str, device: str, *, dtype: str = "auto", gradient_checkpointing: bool = False,
         liger: bool = False, trust_remote_code: bool = False, tiny_corpus: list[str] | None = None,
         tiny_vocab_size: int = 512, tiny_hidden: int = 128, tiny_layers: int = 4, seed: int = 0,
         load_8bit: bool = False, min_pixels: int = 0, max_pixels: int = 0,
         model_cache: str = config.Config.model_cache, prompt_format: str = "auto",
         shots: list[tuple[str, str]] = (), chat_template_kwargs: dict | None = None):
    """(model, tokenizer) on `device`, in train mode, all weights trainable (see add_lora).

    A GGUF file or shipped real model (gguf_models.py) is converted once into model_cache and loaded
    from there. prompt_format and shots (solved examples, plain format only) set the prompt layout
    (prepare), and chat_template_kwargs its switches (render).

    A Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint (read from its config.json, not its name) loads with
    AutoModelForImageTextToText, and its image processor (min_pixels, max_pixels) rides on the
    tokenizer as tokenizer.image_processor (vision.py); `tiny_vl` builds a random tiny Qwen2-VL.

    load_8bit: int8 weights through bitsandbytes (CUDA only), about half the memory of bf16; for
    models that only generate, such as a verifier (verifier.py), never for the trained policy.
    """
    torch_dtype = pick_dtype(dtype, device)
    if model_name in (TINY, TINY_VL):
        if not tiny_corpus:
            raise config.UserError("the tiny model trains its tokenizer on the training text: pass tiny_corpus")
        tokenizer = build_tiny_tokenizer(tiny_corpus, tiny_vocab_size, vl=model_name == TINY_VL)
        model = (vision.build_tiny(tokenizer, tiny_hidden, tiny_layers, seed, min_pixels, max_pixels)
                 if model_name == TINY_VL else build_tiny_model(len(tokenizer), tiny_hidden, tiny_layers, seed))
        model = model.to(torch_dtype)
    else:
        model_name = gguf_models.resolve(model_name, model_cache)
        quantized = {}  # from_pretrained arguments for 8-bit weights
        if load_8bit:
            if not device.startswith("cuda"):
                raise config.UserError(f"8-bit loading of {model_name!r} (bitsandbytes) needs a CUDA GPU; on {device} "
                                       f"load it unquantized (verifier_8bit false)")
            from transformers import BitsAndBytesConfig
            quantized = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}
        tokenizer = _from_pretrained(AutoTokenizer, model_name, trust_remote_code=trust_remote_code)
        model_type = _from_pretrained(AutoConfig, model_name, trust_remote_code=trust_remote_code).model_type
        vl = model_type in vision.VL_TYPES
        if vl:
            tokenizer.image_processor = vision.image_processor(model_name, min_pixels, max_pixels)
            tokenizer.vl_family = model_type  # picks the video rules (video.py)
        model = _from_pretrained(AutoModelForImageTextToText if vl else AutoModelForCausalLM, model_name,
                                 dtype=torch_dtype, trust_remote_code=trust_remote_code, **quantized)
    return prepare(model, tokenizer, device, gradient_checkpointing, liger, prompt_format, shots,
                   chat_template_kwargs)


def from_config(cfg, name: str, device: str, *, shots: list[tuple[str, str]] = (),
                tiny_corpus: list[str] | None = None, gradient_checkpointing: bool | None = None):
    """`load` with the run's settings: the policy (name = model_name, a checkpoint or the warm-started
    base) or its frozen reference. shots: the plain format's solved examples (data.few_shot_examples);
    tiny_corpus: the texts the built-in tiny model's tokenizer trains on (data.tiny_corpus)."""
    return load(name, device, dtype=cfg.dtype, liger=cfg.liger, trust_remote_code=cfg.trust_remote_code,
                gradient_checkpointing=cfg.gradient_checkpointing if gradient_checkpointing is None
                else gradient_checkpointing, tiny_corpus=tiny_corpus, tiny_vocab_size=cfg.tiny_vocab_size,
                tiny_hidden=cfg.tiny_hidden, tiny_layers=cfg.tiny_layers, seed=cfg.seed, min_pixels=cfg.min_pixels,
                max_pixels=cfg.max_pixels, model_cache=cfg.model_cache, prompt_format=cfg.prompt_format, shots=shots,
                chat_template_kwargs=cfg.chat_template_kwargs)


def check_context(cfg) -> None:
    """prompt + completion budgets must fit the model's context (read from its config.json alone)."""
    context = context_length(cfg.model_name, cfg.trust_remote_code, cfg.model_cache)
    if context and cfg.max_prompt_tokens + cfg.max_completion_tokens > context:
        raise config.UserError(f"max_prompt_tokens + max_completion_tokens = {cfg.max_prompt_tokens} + "
                               f"{cfg.max_completion_tokens} exceeds {cfg.model_name}'s context of {context} tokens: "
                               f"lower one of them")


def prepare(model, tokenizer, device: str, gradient_checkpointing: bool = False, liger: bool = False,
            prompt_format: str = "auto", shots: list[tuple[str, str]] = (), chat_template_kwargs: dict | None = None):
    """Set up a built (model, tokenizer) pair as `load` returns it (for a model built in code, not loaded).
    prompt_format "plain" (or "auto" for a tokenizer without a chat template) installs plain_template
    as the chat template, so every prompt of the run (and the checkpoints' tokenizers) use it.
    chat_template_kwargs ride on the tokenizer, for render (a resumed run sets them again from its
    config.json)."""
    tokenizer.chat_template_kwargs = dict(chat_template_kwargs or {})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # prompts end where generation starts
    if prompt_format == "chat" and not tokenizer.chat_template:
        raise config.UserError(f"prompt_format chat: the tokenizer of {model.name_or_path or 'this model'} has no "
                               f"chat template (a base model): use prompt_format plain (optionally few_shot N)")
    plain = plain_template(tokenizer, list(shots))
    # a checkpoint of a plain-format run saved this template: it is still the plain format
    use_plain = prompt_format == "plain" or not tokenizer.chat_template or tokenizer.chat_template == plain
    if shots and not use_plain:
        raise config.UserError(f"few_shot examples are part of the plain prompt format, and the tokenizer of "
                               f"{model.name_or_path or 'this model'} has a chat template: set prompt_format plain, "
                               f"or few_shot 0")
    if use_plain:
        tokenizer.chat_template = plain
    # transformers fills every sampling setting we leave unset from the model's own generation config
    # (Qwen2.5: repetition_penalty 1.05, top_k 20, top_p 0.8). Replace it with a neutral one so that
    # only the settings rollout.py passes apply.
    model.generation_config = GenerationConfig(eos_token_id=eos_ids(tokenizer, model, use_plain),
                                               pad_token_id=tokenizer.pad_token_id,
                                               stop_sequences=stop_sequences(tokenizer, use_plain))
    model.config.use_cache = True
    # generate feeds the output projection a slice of the last positions; with a frozen head (LoRA)
    # torch's matmul then expands the weight once per chain instead of one mm (measured on CPU: 7 GB
    # at the prefill of 16 chains with Qwen2.5's vocab). A contiguous input takes the mm path.
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    if getattr(model, "hf_quantizer", None) is None:  # an 8-bit model is placed by device_map already
        model.to(device)

    if liger and device.startswith("cuda"):
        patch_liger(model)  # Triton kernels need a GPU; the fused loss itself also runs on CPU
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, tokenizer


@dataclass
class Policy:
    """What GRPO trains and scores with: the model (LoRA-wrapped or not), its tokenizer, and the frozen
    reference of the KL term for full fine-tuning (None when beta is 0, and with LoRA, whose reference
    is the same model with its adapter switched off)."""
    model: torch.nn.Module
    tokenizer: object
    ref_model: torch.nn.Module | None = None


def for_training(model, tokenizer, cfg, *, load_reference, adapter_path: str = "") -> Policy:
    """The weights GRPO trains, as cfg says: LoRA adapters (new ones, or those saved at adapter_path),
    the weights train_only names, or all of them; and with beta > 0 and full fine-tuning the reference,
    load_reference() -> a model with the starting weights, frozen here. Every caller that trains sets up
    its policy through this."""
    if vision.is_vl(tokenizer) and not cfg.train_vision:
        print(f"the vision tower is frozen ({vision.freeze_vision(model):,} weights; train_vision to train it)")
    if cfg.lora_r > 0:
        targets = vision.language_model_only(cfg.lora_target_modules) if vision.is_vl(tokenizer) else \
            cfg.lora_target_modules
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, adapter_path=adapter_path)
    if cfg.train_only:  # e.g. the RMSNorm scales alone; a warm start before this trained every weight
        print(f"GRPO trains {train_only(model, cfg.train_only):,} weights: those named {cfg.train_only}")
    ref_model = None
    if cfg.beta > 0 and cfg.lora_r == 0:
        ref_model = load_reference().eval().requires_grad_(False)
    return Policy(model, tokenizer, ref_model)


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str] | str, adapter_path: str = ""):
    """Freeze the model and train LoRA adapters instead: new ones, or those saved at adapter_path."""
    from peft import LoraConfig, PeftModel, get_peft_model

    with lora_without_bitsandbytes(model):
        if adapter_path:
            return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=target_modules, task_type="CAUSAL_LM"))


@contextlib.contextmanager
def lora_without_bitsandbytes(model):
    """peft's LoRA imports bitsandbytes whenever it is installed, to wrap 8-bit layers, and on a CPU with
    AVX512-BF16 that import asks the Hub for a kernel (kernels-community/quantization-bitsandbytes) and
    logs "Failed to load CPU gemm_4bit_forward ... Set trust_remote_code=True": a network call and a
    message that reads as a failure, for layers only a model loaded in 8-bit has (load_8bit, CUDA only).
    For any other model peft is told here that bitsandbytes is absent; a quantized one keeps peft's way."""
    import peft.tuners.lora.model as lora_model

    names = [n for n in ("is_bnb_available", "is_bnb_4bit_available") if hasattr(lora_model, n)]
    with contextlib.ExitStack() as stack:
        if getattr(model, "hf_quantizer", None) is None:
            for name in names:
                stack.enter_context(mock.patch.object(lora_model, name, lambda: False))
        yield


def train_only(model, names: list[str]) -> int:
    """Freeze every parameter whose name contains none of `names`; returns how many weights still train.

    ["norm"] trains the RMSNorm scales alone (LayerNorm tuning): on the tiny demo model the policy
    gradients of two batches of questions agree only along the final norm (FINDINGS.md: the tiny
    demo), so GRPO can take large steps there without the noise of the other weights.
    """
    trained = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(n in name for n in names))
        trained += p.numel() if p.requires_grad else 0
    if not trained:
        some = ", ".join(name for name, _ in list(model.named_parameters())[:6])
        raise config.UserError(f"train_only {names} matches no parameter of the model; names look like: {some}, ...")
    return trained


def patch_liger(model) -> None:
    """Swap in Liger's RMSNorm, RoPE and SwiGLU kernels (Qwen2 and Llama); the loss is fused elsewhere."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

    patchers = {"qwen2": apply_liger_kernel_to_qwen2, "llama": apply_liger_kernel_to_llama}
    kind = model.config.model_type
    if kind not in patchers:
        raise config.UserError(f"--liger patches Qwen2 and Llama models; {kind!r} is neither: drop --liger")
    patchers[kind](rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                   fused_linear_cross_entropy=False, model=model)


def decoder_and_head(model):
    """(the transformer body returning final hidden states, the output projection), LoRA or not.

    Log-probs are computed from hidden states chunk by chunk so that the full (chains x length x
    vocab) logits tensor never exists at once. LoRA layers live inside the body, so they apply.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


if __name__ == "__main__":
    import builtin_tasks
    import data

    train, _ = builtin_tasks.arithmetic_task(2000, 100, seed=0)
    tok_corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    m, tok = load(TINY, "cpu", tiny_corpus=tok_corpus)
    prompt = chat_prompt(tok, "Solve step by step.", train[0]["question"])
    ids = tok(prompt)["input_ids"]
    print(f"tiny model: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters, vocab {len(tok)}")
    print(f"prompt of {len(ids)} tokens:", [tok.decode([i]) for i in ids])
