"""Qwen3 text policies: a tiny random Qwen3 saved with a chat template that has Qwen3's thinking switch,
and chat_template_kwargs reaching every place the template renders (llms.render)."""
import pytest
import torch

import builtin_tasks
import config
import data
import llms
import rollout
import verifier

# Qwen3's switch as its template writes it: with enable_thinking false the assistant turn opens with an
# empty think block, so the model answers at once
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
NO_THINKING = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    train, _ = builtin_tasks.arithmetic_task(100, 10, seed=0)
    tok = llms.build_tiny_tokenizer([ex["question"] + "\n" + data.target_text(ex) for ex in train], 300)
    tok.chat_template = QWEN3_TEMPLATE
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    path = str(tmp_path_factory.mktemp("qwen3"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_enable_thinking_false_reaches_every_prompt_the_template_renders(qwen3_path):
    """--chat_template_kwargs enable_thinking=false: sampling, evaluation, the warm start and GHPO's hints
    (llms.chat_prompt), and the verifier's turns (verifier.message_ids), all get the no-thinking prompt."""
    cfg = config.load(["--model_name", qwen3_path, "--chat_template_kwargs", "enable_thinking=false",
                       "--system_prompt", ""])
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
    model, tok = llms.from_config(cfg, qwen3_path, "cpu", gradient_checkpointing=False)
    assert model.config.model_type == "qwen3"
    batch = [{"question": "What is 2 + 3?"}]
    assert rollout.prompts_of(tok, "", batch)[0].endswith(NO_THINKING)
    assert tok.decode(verifier.message_ids(tok, "Step 1 is right.")).endswith(NO_THINKING)
    # the tiny Qwen3 samples from that prompt
    r = rollout.sample(model, tok, rollout.prompts_of(tok, "", batch), 2, max_prompt_tokens=64, max_new_tokens=4,
                       temperature=1.0)
    assert r.input_ids.shape[0] == 2 and tok.decode(r.input_ids[0]).count("</think>") == 1

    # without the key the template's default (thinking) prompt: no empty think block
    _, plain_tok = llms.from_config(config.Config(model_name=qwen3_path), qwen3_path, "cpu",
                                    gradient_checkpointing=False)
    prompt = rollout.prompts_of(plain_tok, "", batch)[0]
    assert prompt.endswith("<|im_start|>assistant\n") and "<think>" not in prompt


def test_chat_template_kwargs_read_as_yaml_values_or_say_what_they_want():
    assert config.load(["--chat_template_kwargs", "{enable_thinking: true, depth: 2}"]).chat_template_kwargs == {
        "enable_thinking": True, "depth": 2}
    with pytest.raises(config.UserError, match="wants name=value pairs, e.g. --chat_template_kwargs enable_thinking"):
        config.load(["--chat_template_kwargs", "thinking"])
