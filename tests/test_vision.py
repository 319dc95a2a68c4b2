"""Vision-language policies (vision.py): tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints built from
configs here, saved and reloaded through from_pretrained like real ones; image and video data in its layouts
and its errors (video.py's own: tests/test_video.py)."""
import json
import math

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

import builtin_tasks
import config
import data
import evaluator
import grpo
import llms
import logprobs
import rollout
import samplers
import video
import vision
from helpers import read, run_train

MIN_PIXELS, MAX_PIXELS = 28 * 28, 28 * 28 * 8


def build_checkpoint(family: str, path: str) -> str:
    """A tiny random checkpoint of `family` in `path`: weights, tokenizer, chat template, image processor."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)

    train, _ = builtin_tasks.digits_task(80, 20, seed=0)
    tok = llms.build_tiny_tokenizer([ex["question"] + ex["solution"] for ex in train], 300, vl=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in vision.VISION_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    if family == "qwen2_vl":
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
            text_config=text, tie_word_embeddings=True, **special, vision_config=dict(
                depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2)))
    elif family == "qwen2_5_vl":  # Qwen2.5-VL names the vision width hidden_size, the merger's output out_hidden_size
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, tie_word_embeddings=True, **special, vision_config=dict(
                depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])))
    else:  # Qwen3-VL: 16-pixel patches, learned vision positions, deepstack features from vision layer 0
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config=text | {"head_dim": 16}, tie_word_embeddings=True, **special, vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                deepstack_visual_indexes=[0])))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    qwen3 = dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3) if family == "qwen3_vl" else {}
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **qwen3).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def vl(request, tmp_path_factory):
    """(model, tokenizer) reloaded with llms.load from a saved tiny checkpoint of each family."""
    path = build_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))
    model, tok = llms.load(path, "cpu")
    assert model.config.model_type == request.param
    return model, tok


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """digits_{train,test}.jsonl (PNG paths) and .parquet (PNG bytes), as `python builtin_tasks.py make-demo` writes."""
    out = tmp_path_factory.mktemp("demo")
    builtin_tasks.make_digits_demo(str(out))
    return out


def prompts_and_images(tok, n: int = 2):
    """n questions whose images differ in size (2 and 3 digits: 2 and 3 image tokens)."""
    images = [builtin_tasks.number_image([3, 4]), builtin_tasks.number_image([1, 5, 2])][:n]
    questions = [vision.PLACEHOLDER + "What is the sum of the numbers in the image?"] * n
    return [llms.chat_prompt(tok, "", q) for q in questions], [[im] for im in images]


def test_a_saved_vl_checkpoint_loads_with_its_image_processor(vl):
    model, tok = vl
    assert vision.is_vl(tok) and dict(tok.image_processor.size) == {"shortest_edge": MIN_PIXELS,
                                                                    "longest_edge": MAX_PIXELS}
    prompts, images = prompts_and_images(tok)
    assert prompts[0].count(vision.IMAGE_PART) == 1
    ids, mask, visual = rollout.encode_prompts(tok, prompts, 64, "cpu", images)
    image_tokens = (ids == model.config.image_token_id).sum(1).tolist()
    assert image_tokens == [2, 3]  # one per 28 x 28 cell: the image processor's grid, merged 2 x 2
    assert [tuple(v.image_grid_thw.tolist()[0]) for v in visual] == [(1, 2, 4), (1, 2, 6)]


def test_max_pixels_bounds_the_visual_tokens(tmp_path):
    path = build_checkpoint("qwen2_vl", str(tmp_path / "ckpt"))
    model, tok = llms.load(path, "cpu", max_pixels=28 * 28 * 2)
    prompts, images = prompts_and_images(tok)
    ids, _, _ = rollout.encode_prompts(tok, prompts, 64, "cpu", images)
    assert (ids == model.config.image_token_id).sum(1).tolist() == [2, 2]  # the 3-digit image shrunk
    with pytest.raises(config.UserError, match="min_pixels 3136 is above max_pixels 1568"):
        llms.load(path, "cpu", min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 2)


G = 2  # chains per prompt in sampled_and_trained


def sampled_and_trained(model, tok, ids, mask, visual):
    """Two chains per prompt sampled as rollout.generate samples them: (the rollout, where completions start,
    generate's log-probs of the sampled tokens, the training pass's log-probs of the same tokens)."""
    ids, mask, visual = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), [v for v in visual for _ in range(G)]
    model.eval()
    torch.manual_seed(0)
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6,
                                suppress_tokens=vision.banned_ids(model), pad_token_id=tok.pad_token_id,
                                eos_token_id=model.generation_config.eos_token_id)  # as rollout.generate's
    out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                         generation_config=settings, **vision.model_inputs(model, ids, visual))
    completions = out.sequences[:, ids.shape[1]:]
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)  # (N, T)
    n = len(ids)
    r = rollout.assemble(tok, ids, mask, completions, model.generation_config.eos_token_id, torch.arange(n) // G,
                         [{} for _ in range(n)], visual)
    start = ids.shape[1]
    with torch.no_grad():
        trained = logprobs.token_logps(model, r.input_ids, r.attention_mask, start, 1.0, 4, r.visual_of(range(n)))
    return r, start, sampled, trained


def test_training_log_probs_equal_those_generate_sampled_with(vl):
    """Sampled chains with images, left padded: the loss's forward pass (with the model's own 3-D rope
    positions) gives the log-probs generate sampled the tokens with. Swapping the two questions' images
    changes them: the test sees the images."""
    model, tok = vl
    prompts, images = prompts_and_images(tok)
    ids, mask, visual = rollout.encode_prompts(tok, prompts, 64, "cpu", images)
    r, start, sampled, trained = sampled_and_trained(model, tok, ids, mask, visual)
    keep = r.loss_mask[:, start:].bool()
    assert (trained[keep] - sampled[keep]).abs().max() < 1e-4
    # the same prompts with other images of the same sizes
    other = [[builtin_tasks.number_image([9, 9])], [builtin_tasks.number_image([7, 7, 7])]]
    o_ids, _, o_visual = rollout.encode_prompts(tok, prompts, 64, "cpu", other)
    with torch.no_grad():
        swapped = logprobs.token_logps(model, r.input_ids, r.attention_mask, start, 1.0, 4,
                                     [v for v in o_visual for _ in range(G)])
    assert torch.equal(o_ids, ids)
    assert (swapped[keep] - sampled[keep]).abs().max() > 1e-3
    model.train()


def test_the_loss_takes_no_gradient_from_the_prompt_or_its_image_tokens(vl):
    model, tok = vl
    prompts, images = prompts_and_images(tok)
    r = rollout.teacher_forced(tok, prompts, ["3 + 4 = 7.", "1 + 5 + 2 = 8."], 64, 16, images=images)
    image = r.input_ids == model.config.image_token_id
    assert image.any() and not r.loss_mask[image].any()
    start = logprobs.first_trained_column(r.loss_mask)
    logps = logprobs.token_logps(model, r.input_ids, r.attention_mask, 1, 1.0, 8, r.visual)  # every column
    logps.retain_grad()
    cfg = config.Config(loss_type="grpo")
    loss, _ = grpo.policy_loss(logps, logps.detach(), None, torch.tensor([1.0, -1.0]), r.loss_mask[:, 1:], cfg,
                                 2, int(r.loss_mask.sum()), 1)
    loss.backward()
    assert logps.grad[:, :start - 1].abs().max() == 0 and logps.grad[image[:, 1:]].abs().max() == 0
    assert logps.grad.abs().max() > 0
    model.zero_grad(set_to_none=True)


def trained_logps(model, r) -> list[list[float]]:
    """Each chain's log-probs of its trained tokens, all of r's chains in one forward pass."""
    with torch.no_grad():
        logps = logprobs.token_logps(model, r.input_ids, r.attention_mask, 1, 1.0, 8, r.visual)
    return [row[keep].tolist() for row, keep in zip(logps, r.loss_mask[:, 1:].bool())]


def test_concat_keeps_each_chains_images_when_parts_mix_text_and_images(vl):
    """Dynamic sampling may join a text-only round (visual None) and a round with images: every chain
    keeps its own visual inputs, in either order, and a micro-batch mixing chains with and without
    images gives each chain the log-probs it has alone."""
    model, tok = vl
    prompts, images = prompts_and_images(tok)
    with_images = rollout.teacher_forced(tok, prompts, ["3 + 4 = 7.", "1 + 5 + 2 = 8."], 64, 16, images=images)
    # text questions shorter than the image ones: left padded in the joined rollout
    text = rollout.teacher_forced(tok, [llms.chat_prompt(tok, "", q) for q in ("2 + 2?", "What is 1 + 1?")],
                                  ["4", "1 + 1 = 2."], 64, 16)
    assert text.visual is None
    alone = trained_logps(model, text) + trained_logps(model, with_images)
    for order in ([text, with_images], [with_images, text]):
        joined = rollout.concat([(part, [0, 1]) for part in order], torch.arange(4), tok.pad_token_id)
        text_first = order[0] is text
        assert [len(v.image_grid_thw) for v in joined.visual] == ([0, 0, 1, 1] if text_first else [1, 1, 0, 0])
        want = alone if text_first else alone[2:] + alone[:2]
        for g, w in zip(trained_logps(model, joined), want, strict=True):
            assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4)


def images_seen_by_the_encoder(model) -> list[int]:
    """A list that grows by the number of images of each vision-encoder call of `model`."""
    seen = []
    model.model.visual.register_forward_pre_hook(lambda module, args, kwargs: seen.append(len(kwargs["grid_thw"])),
                                                 with_kwargs=True)
    return seen


def test_the_vision_encoder_sees_each_question_once_per_pass_not_each_chain():
    """One plain GRPO step of 2 questions x 4 chains: the prefill encodes the 2 questions' images, and
    the one loss pass (all 8 chains in one micro-batch) encodes them again, once each: 4 images, not
    the 16 of one encoding per chain."""
    import grpo

    train, _ = builtin_tasks.digits_task(20, 4, seed=0)
    train = [ex | {"question": vision.with_placeholders(ex["question"], 1)} for ex in train]  # as data.load does
    model, tok = llms.load(llms.TINY_VL, "cpu", tiny_corpus=[ex["question"] + ex["solution"] for ex in train],
                           tiny_hidden=32, tiny_layers=1)
    cfg = config.Config(model_name=llms.TINY_VL, system_prompt="", num_chains=4, prompts_per_step=2,
                        micro_batch_size=8, max_prompt_tokens=64, max_completion_tokens=6,
                        rewards={"correctness": 1.0})
    policy = llms.for_training(model, tok, cfg, load_reference=lambda: None)
    seen = images_seen_by_the_encoder(model)
    grpo.step(policy, samplers.make(cfg, device="cpu", train_set=train), train[:2], 1,
              torch.optim.SGD(model.parameters(), lr=0.0), cfg)
    assert seen == [2, 2]


def test_the_vision_gradient_is_that_of_one_encoder_pass_per_chain(vl):
    """train_vision: a question's features, encoded once, feed each of its chains; the vision tower's
    gradient is the one it gets when every chain's images go through the encoder on their own."""
    model, tok = vl
    prompts, images = prompts_and_images(tok)
    r = rollout.teacher_forced(tok, prompts, ["3 + 4 = 7.", "1 + 5 + 2 = 8."], 64, 16, images=images)
    G = 3
    ids, mask = r.input_ids.repeat_interleave(G, 0), r.attention_mask.repeat_interleave(G, 0)
    visual = [v for v in r.visual for _ in range(G)]  # each chain: a reference to its question's tensors
    body, head = llms.decoder_and_head(model)

    def vision_grads(hidden):
        model.zero_grad(set_to_none=True)
        logprobs.head_logps(hidden, head, ids, 1, 1.0, 8, vision.banned_ids(model)).sum().backward()
        return [p.grad.clone() for p in body.visual.parameters()]
    once = vision_grads(logprobs.hidden_states(body, ids, mask, visual))
    per_chain = vision_grads(body(input_ids=ids, attention_mask=mask,
                                  pixel_values=torch.cat([v.pixel_values for v in visual]),
                                  image_grid_thw=torch.cat([v.image_grid_thw for v in visual]),
                                  mm_token_type_ids=(ids == model.config.image_token_id).long()).last_hidden_state)
    model.zero_grad(set_to_none=True)
    assert any(g.abs().max() > 0 for g in once)
    for a, b in zip(once, per_chain, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def vl_run(tmp_path, dataset: str, test_dataset: str, *extra: str) -> list[str]:
    return ["--model_name", "tiny_vl", "--dataset", dataset, "--test_dataset", test_dataset, "--question_field",
            "problem", "--device", "cpu", "--optimizer", "adamw", "--gradient_checkpointing", "false",
            "--tiny_hidden", "32", "--tiny_layers", "1", "--system_prompt", "", "--sft_steps", "2",
            "--prompts_per_step", "2", "--num_chains", "2", "--max_prompt_tokens", "48", "--max_completion_tokens",
            "12", "--eval_every", "2", "--eval_n", "4", "--eval_samples", "1", "--eval_temperature", "0",
            "--rewards", "correctness=1", "--max_steps", "2", "--out_dir", str(tmp_path / "run"), *extra]


# each idea's settings for a short run (an idea not named here runs with its defaults)
IDEA_FLAGS = {"ghpo": ["--ghpo_start_step", "1", "--ghpo_accuracy_reward", "correctness"],
              "verifier": ["--verifier_backend", "rules", "--verifier_turn_tokens", "6", "--verifier_max_turns", "2"],
              "guided": ["--guide_min_prefix_tokens", "2", "--guide_max_prefix_tokens", "6", "--max_guide_tokens", "4"]}


@pytest.mark.parametrize("rollout_name", list(samplers.SAMPLERS))  # a new idea is covered at once
def test_two_steps_of_training_with_images(tmp_path, demo_files, rollout_name):
    layout = ("jsonl", "parquet")[list(samplers.SAMPLERS).index(rollout_name) % 2]  # both layouts, in turn
    run_train(vl_run(tmp_path, str(demo_files / f"digits_train.{layout}"), str(demo_files / f"digits_test.{layout}"),
                     "--sampler", rollout_name, *IDEA_FLAGS.get(rollout_name, [])))
    lines = read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2]
    assert [r["step"] for r in lines if r["split"] == "eval"] == [0, 2]
    if rollout_name == "ghpo":
        assert any(k.startswith("ghpo/") for k in lines[1])


def test_a_vl_run_resumes_from_its_checkpoint_and_evaluates_the_same(tmp_path, demo_files):
    argv = vl_run(tmp_path, str(demo_files / "digits_train.parquet"), str(demo_files / "digits_test.parquet"),
                  "--save_every", "2")
    run_train(argv)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "preprocessor_config.json").exists()
    run_train(["--resume", str(tmp_path / "run"), "--max_steps", "3"])
    lines = read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3]
    # python evaluator.py --model RUN: the same images, prompts and greedy completions as the run's last eval
    results = evaluator.main(["--model", str(tmp_path / "run"), "--out", str(tmp_path / "eval.jsonl")])
    run_records = read(tmp_path / "run" / "eval" / "step_000003.jsonl")
    assert [r["completions"] for r in results["model"]["records"]] == [r["completions"] for r in run_records]


def test_a_hub_style_qwen3_vl_checkpoint_trains_on_videos_and_resumes(tmp_path):
    """--model_name a saved Qwen3-VL folder on the built-in clips task: loaded with from_pretrained,
    trained with LoRA on its language model (the vision tower untouched), with gradient checkpointing,
    checkpointed and resumed."""
    path = build_checkpoint("qwen3_vl", str(tmp_path / "qwen3_vl"))
    argv = vl_run(tmp_path, "clips", "", "--model_name", path, "--sft_steps", "0", "--lora_r", "4", "--lora_alpha", "8",
                  "--gradient_checkpointing", "true", "--digits_count", "2", "--save_every", "2",
                  "--max_prompt_tokens", "128")
    run_train(argv)
    adapter = json.load(open(tmp_path / "run" / "checkpoints" / "step_000002" / "adapter_config.json"))
    assert "language_model" in adapter["target_modules"]
    run_train(["--resume", str(tmp_path / "run"), "--max_steps", "3"])
    lines = read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in lines if r["split"] == "eval"] == [0, 2, 3]


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


@pytest.mark.parametrize("images, error", [
    (["missing.png"], r"line 1 images\[0\]: unreadable image: no file"),
    ([{"bytes": None, "path": None}], r"line 1 images\[0\]: unreadable image: an image dict needs"),
    ([3], r"line 1 images\[0\]: unreadable image: a int is not an image"),
    (["not_png.png"], r"line 1 images\[0\]: unreadable image: cannot identify image file"),
    (["ok.png", "ok.png"], r"line 1: the question has 1 <image> placeholders for 2 images"),
])
def test_a_bad_image_is_an_error_naming_the_row_or_is_skipped_and_counted(tmp_path, images, error, capsys):
    builtin_tasks.number_image([1, 2]).save(tmp_path / "ok.png")
    (tmp_path / "not_png.png").write_bytes(b"this is no image")
    train = write_rows(tmp_path / "train.jsonl", [{"problem": "<image>Sum?", "answer": "3", "images": images},
                                                   {"problem": "Sum?", "answer": "3", "images": ["ok.png"]}])
    cfg = config.Config(dataset=train, test_dataset=train, question_field="problem")
    with pytest.raises(data.BadRow, match=error + ".*--skip_bad_rows"):
        data.load(cfg)
    cfg = config.Config(dataset=train, test_dataset=train, question_field="problem", skip_bad_rows=True)
    examples, _ = data.load(cfg)
    assert len(examples) == 1 and examples[0]["question"] == "<image>Sum?"  # the placeholder inserted
    assert examples[0]["images"][0].size == (56, 28) and "skipped 1 of 2 rows" in capsys.readouterr().out


def test_images_load_from_paths_bytes_dicts_and_pil(tmp_path):
    image = builtin_tasks.number_image([4, 2])
    image.save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    for value in ("a.png", str(tmp_path / "a.png"), png, {"bytes": png, "path": None}, {"bytes": None, "path": "a.png"},
                  image):
        loaded = vision.to_image(value, str(tmp_path))
        assert loaded.mode == "RGB" and list(loaded.getdata()) == list(image.getdata())


def test_images_with_a_text_model_or_liger_are_refused(tmp_path, demo_files):
    argv = vl_run(tmp_path, str(demo_files / "digits_train.jsonl"), str(demo_files / "digits_test.jsonl"))
    with pytest.raises(config.UserError, match="the data has images, and 'tiny' is a text model"):
        run_train(argv + ["--model_name", "tiny"])
    with pytest.raises(config.UserError, match="drop --liger for a VL model"):
        run_train(argv + ["--liger", "--out_dir", str(tmp_path / "liger")])


def test_the_digits_task_needs_the_image():
    train, test = builtin_tasks.digits_task(80, 20, seed=0)
    assert len({ex["question"] for ex in train + test}) == 1  # the text is the same for every problem
    seen = {ex["solution"] for ex in train}
    assert not any(ex["solution"] in seen for ex in test)
    a, b = (int(n) for n in train[0]["solution"].split(" =")[0].split(" + "))
    assert list(train[0]["images"][0].getdata()) == list(builtin_tasks.number_image([a, b]).getdata())
    assert train[0]["answer"] == str(a + b)


def test_the_lora_targets_of_a_vl_model_stay_in_its_language_model():
    import re
    pattern = vision.language_model_only(["q_proj", "gate_proj"])
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.visual.blocks.0.mlp.gate_proj")


def test_a_verifier_gets_the_problem_images(vl):
    """hf: a VL verifier (here the policy itself) reads them through its image processor; http: OpenAI
    image_url parts with a base64 PNG data URL."""
    import base64
    import io

    import verifier_backends
    model, tok = vl
    image = builtin_tasks.number_image([2, 5])
    job = verifier_backends.Job("<image>What is the sum?", "7", ["2 + 5 = 7."], [image])
    hf = verifier_backends.HFVerifier(None, None, verifier_backends.DEFAULT_PROMPT, 6, 0.0)
    replies = hf([job, job._replace(images=[builtin_tasks.number_image([1, 1, 1])])], model, tok)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    chat = verifier_backends.messages("{question}", job, lambda im: {"type": "image_url", "image_url": {
        "url": vision.data_url(im)}})
    part = chat[1]["content"][0]
    png = base64.b64decode(part["image_url"]["url"].removeprefix("data:image/png;base64,"))
    assert list(Image.open(io.BytesIO(png)).convert("RGB").getdata()) == list(image.getdata())
    assert verifier_backends.messages("{question}", job)[1]["content"].startswith("The student's steps")


# ----------------------------------------------------------------------------------------------
# Videos on each family (the preprocessing and the rows themselves: tests/test_video.py)


def clip(digits: list[int], fps: float = 2.0):
    return video.Video([builtin_tasks.number_image([d]) for d in digits], [k / fps for k in range(len(digits))], fps)


def video_prompts(tok):
    """Two questions that differ in length (left padding): a 3-frame clip; an image and a 4-frame clip."""
    questions = ["<video>What is the sum?", "<image>and<video>: what is the sum?"]
    items = [[clip([3, 4, 5])], [builtin_tasks.number_image([1, 2]), clip([6, 7, 8, 9], fps=4.0)]]
    return [llms.chat_prompt(tok, "", q) for q in questions], items


def test_video_chains_log_probs_equal_those_generate_sampled_with(vl):
    """As for images: chains of questions with videos (and an image beside one), left padded, get the
    log-probs generate sampled them with; other clips of the same shape change them."""
    model, tok = vl
    prompts, items = video_prompts(tok)
    ids, mask, visual = rollout.encode_prompts(tok, prompts, 256, "cpu", items)
    assert (mask == 0).any() and [len(v.video_grid_thw) for v in visual] == [1, 1]
    assert ((ids == model.config.video_token_id).sum(1) > 0).all()
    r, start, sampled, trained = sampled_and_trained(model, tok, ids, mask, visual)
    with torch.no_grad():
        other = [[clip([9, 9, 9])], [builtin_tasks.number_image([1, 2]), clip([0, 0, 0, 0], fps=4.0)]]
        _, _, o_visual = rollout.encode_prompts(tok, prompts, 256, "cpu", other)
        swapped = logprobs.token_logps(model, r.input_ids, r.attention_mask, start, 1.0, 4,
                                       [v for v in o_visual for _ in range(G)])
    keep = r.loss_mask[:, start:].bool()
    assert (trained[keep] - sampled[keep]).abs().max() < 1e-4
    assert (swapped[keep] - sampled[keep]).abs().max() > 1e-3
    model.train()


def test_the_vision_encoder_sees_each_questions_images_and_videos_once_per_pass(vl):
    """A plain GRPO step of 2 questions x 3 chains, one with a video, one with an image and a video: the
    prefill and the one loss pass each encode the image once and the two videos once."""
    model, tok = vl
    train = [{"question": q, "answer": "7", "solution": "", **kind} for q, kind in (
        ("<video>Sum?", {"videos": [clip([3, 4])]}),
        ("<image><video>Sum?", {"images": [builtin_tasks.number_image([5])], "videos": [clip([1, 2, 3])]}))]
    cfg = config.Config(model_name="vl", system_prompt="", num_chains=3, prompts_per_step=2, micro_batch_size=6,
                        max_prompt_tokens=256, max_completion_tokens=4, rewards={"correctness": 1.0})
    seen = images_seen_by_the_encoder(model)
    grpo.step(llms.Policy(model, tok), samplers.make(cfg, device="cpu", train_set=train), train, 1,
              torch.optim.SGD(model.parameters(), lr=0.0), cfg)
    model.model.visual._forward_pre_hooks.clear()
    assert seen == [1, 2, 1, 2]  # (image call, video call) per pass: the prefill, the loss


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))  # a new idea is covered at once
def test_one_step_of_every_sampler_with_video_rows(vl, sampler):
    """grpo.step with each sampling idea on questions with videos (the built-in clips task), each family:
    every chain keeps its question's video, and the update's loss and gradient norm are finite."""
    model, tok = vl
    train, _ = builtin_tasks.clips_task(6, 2, seed=0, count=2)
    train = [ex | {"question": vision.with_placeholders(ex["question"], 0, 1)} for ex in train]  # as data.load does
    flags = {"ghpo": dict(ghpo_start_step=1, ghpo_accuracy_reward="correctness"),
             "verifier": dict(verifier_backend="rules", verifier_turn_tokens=3, verifier_max_turns=2),
             "guided": dict(guide_min_prefix_tokens=1, guide_max_prefix_tokens=2, min_guide_tokens=1,
                            max_guide_tokens=2)}.get(sampler, {})
    cfg = config.Config(model_name="vl", system_prompt="", sampler=sampler, num_chains=2, prompts_per_step=2,
                        micro_batch_size=4, max_prompt_tokens=256, max_completion_tokens=4,
                        rewards={"correctness": 1.0}, **flags)
    out = grpo.step(llms.Policy(model, tok), samplers.make(cfg, device="cpu", train_set=train), train[:2], 1,
                    torch.optim.SGD(model.parameters(), lr=0.0), cfg)
    r = out.rollout
    assert len(r) >= 4 and all(len(v.video_grid_thw) == 1 for v in r.visual) and r.loss_mask.sum() > 0
    assert ((r.input_ids == model.config.video_token_id).sum(1) > 0).all()
    assert math.isfinite(out.metrics["loss"]) and math.isfinite(out.metrics["grad_norm"])
    model.zero_grad(set_to_none=True)
