"""Images: vision-language policies (Qwen2-VL, Qwen2.5-VL), rows with images, and a built-in visual task.

Guided-GRPO's multimodal setting. A question may carry images; its text holds one `<image>` placeholder
per image (inserted at the start when the row has none; a count that disagrees with the images is an
error). The pieces, in the order a run meets them:

    data      to_image: a row's image (a path relative to the data file, raw bytes, HF datasets'
              {"bytes", "path"} dict, a PIL image) -> an RGB PIL image; with_placeholders
    prompts   content_parts: "<image>What is ..." -> chat content parts, which the chat template
              renders as <|vision_start|><|image_pad|><|vision_end|>
    encode    once per question: the image processor -> pixel_values (patches, D) and image_grid_thw
              (images, 3); each prompt's one <|image_pad|> per image is expanded to the image's token
              count (what transformers' processor does), so no video processor (and no torchvision) is
              needed; the pair is shared by the question's G chains (Rollout.visual holds references)
    forward   model_inputs: a batch of chains' images through the vision encoder, once per question
              (not per chain), as the features the model takes, and mm_token_type_ids, from which the
              model computes its own 3-D rope positions (the 1-D cumsum of text models is wrong here)
    load      a checkpoint whose config.json says qwen2_vl or qwen2_5_vl loads with
              AutoModelForImageTextToText; its image processor rides on the tokenizer (`image_processor`)
              and is saved beside it in checkpoints; `tiny_vl` is a random tiny Qwen2-VL built here

The built-in visual task, `dataset: digits`, is in builtin_tasks.py.

    python vision.py     # a question's image parts, and what the image processor makes of one image
"""
import base64
import io
import os

import torch
from PIL import Image

import config

PLACEHOLDER = "<image>"
VL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # config.json model_type of the families supported
TINY_VL = "tiny_vl"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PART = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


# ----------------------------------------------------------------------------------------------
# Rows with images


def to_image(value, base_dir: str) -> Image.Image:
    """One image of a row as an RGB PIL image; ValueError("unreadable image: ...") for a value that is
    not a readable image (data.py names the row)."""
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):  # HF datasets' Image column, as parquet stores it
            if value.get("bytes"):
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                raise ValueError("an image dict needs 'bytes' or 'path'")
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            path = value if os.path.isabs(value) else os.path.join(base_dir, value)
            if not os.path.isfile(path):
                raise ValueError(f"no file {path}")
            with Image.open(path) as image:
                return image.convert("RGB")
        raise ValueError(f"a {type(value).__name__} is not an image (a path, bytes, a {{'bytes', 'path'}} dict "
                         f"or a PIL image)")
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable image: {e}") from None


def with_placeholders(question: str, n_images: int) -> str:
    """The question with one <image> per image: inserted at the start when it has none; ValueError when
    its count disagrees with the images."""
    found = question.count(PLACEHOLDER)
    if found == 0:
        return PLACEHOLDER * n_images + question
    if found != n_images:
        raise ValueError(f"the question has {found} {PLACEHOLDER} placeholders for {n_images} images")
    return question


def content_parts(text: str) -> list[dict]:
    """'<image>What is shown?' -> [{"type": "image"}, {"type": "text", "text": "What is shown?"}]."""
    parts = []
    for k, piece in enumerate(text.split(PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def data_url(image: Image.Image) -> str:
    """An image as a base64 PNG data URL, for an OpenAI-style image_url content part."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------------------------------------
# Prompts with images, for a VL model


def is_vl(tokenizer) -> bool:
    """A vision-language policy's tokenizer carries its image processor (load)."""
    return getattr(tokenizer, "image_processor", None) is not None


def encode(tokenizer, prompts: list[str], images: list[list]) -> tuple[list[str], list[tuple]]:
    """(prompts with each image's tokens expanded, visual inputs per prompt: (pixel_values (p, D),
    image_grid_thw (k, 3))). Each prompt's images go through the image processor once."""
    processor = tokenizer.image_processor
    expanded, visual = [], []
    for prompt, imgs in zip(prompts, images, strict=True):
        if prompt.count(IMAGE_PAD) != len(imgs):
            raise ValueError(f"a prompt has {prompt.count(IMAGE_PAD)} image tokens for {len(imgs)} images")
        if not imgs:
            expanded.append(prompt)
            visual.append(no_images())
            continue
        out = processor(images=imgs, return_tensors="pt")
        grid = out["image_grid_thw"]  # (k, 3): t, h, w in patches
        pieces = prompt.split(IMAGE_PAD)
        counts = (grid.prod(-1) // processor.merge_size ** 2).tolist()  # language-model tokens per image
        expanded.append(pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:])))
        visual.append((out["pixel_values"], grid))
    return expanded, visual


def no_images() -> tuple:
    """The visual inputs of a question without images, in a batch where others have some: model_inputs
    skips them (pixel_values (0, 0), image_grid_thw (0, 3))."""
    return torch.zeros(0, 0), torch.zeros(0, 3, dtype=torch.long)


def banned_ids(model) -> list[int] | None:
    """A VL model's vision tokens, which it must never sample: an <|image_pad|> in a completion has no
    image behind it, and the forward pass would refuse the chain. Sampling suppresses them
    (rollout.generate) and log-probs leave them out (logprobs.head_logps), so both use one distribution.
    None for a text model."""
    cfg = model.config
    if getattr(cfg, "image_token_id", None) is None:
        return None
    return [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]


def model_inputs(model, input_ids: torch.Tensor, visual: list[tuple]) -> dict:
    """The keyword arguments that give a VL model its chains' images: one (pixel_values, grid) per row
    of input_ids (n, L), for its forward or generate.

    Each question's images go through the vision encoder once, however many of its chains the rows
    hold: a question's chains share its tensors (Rollout.visual holds references), found here by
    identity, and the encoder's features reach the model as mm_encoder_outputs, which forward and
    generate take in place of pixel_values. With gradients on (train_vision), a question's features
    feed each of its chains, so the encoder's gradient sums over them, as it would with one encoder
    pass per chain. With mm_token_type_ids and image_grid_thw (one row per image, in row order) the
    model computes its 3-D rope positions itself; rows without images get plain 1-D positions."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    kwargs = {"mm_token_type_ids": (input_ids == model.config.image_token_id).long()}
    rows = [(p, g) for p, g in visual if len(g)]
    if not rows:
        return kwargs
    device = input_ids.device
    questions = list({id(p): (p, g) for p, g in rows}.values())  # each question once, in order of first use
    encoded = model.get_image_features(torch.cat([p for p, _ in questions]).to(device),
                                       torch.cat([g for _, g in questions]).to(device), return_dict=True)
    per_image = iter(encoded.pooler_output)  # one (tokens of the image, H) per image, questions in order
    features = {id(p): [next(per_image) for _ in range(len(g))] for p, g in questions}
    kwargs["image_grid_thw"] = torch.cat([g for _, g in rows]).to(device)
    kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
        pooler_output=[f for p, _ in rows for f in features[id(p)]])}
    return kwargs


def check(tokenizer, cfg, examples: list[dict]) -> None:
    """Images need a VL policy; a VL policy works with every sampler, not with Liger (its fused loss
    cannot leave out the vision tokens that sampling forbids: banned_ids)."""
    if any(ex.get("images") for ex in examples) and not is_vl(tokenizer):
        raise config.UserError(f"the data has images, and {cfg.model_name!r} is a text model: train a Qwen2-VL "
                               f"or Qwen2.5-VL checkpoint (or tiny_vl), or use data without the "
                               f"{cfg.image_field!r} column")
    if is_vl(tokenizer) and cfg.liger:
        raise config.UserError("--liger's fused loss takes log-probs over the whole vocabulary, and a VL model "
                               "never samples its vision tokens: drop --liger for a VL model")


# ----------------------------------------------------------------------------------------------
# Models


def image_processor(name: str, min_pixels: int, max_pixels: int):
    """The checkpoint's image processor (AutoImageProcessor: the PIL one without torchvision, the fast
    one with it), its pixel bounds set where the config gives them (0: the checkpoint's own)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(name)
    size = dict(processor.size)
    if min_pixels:
        size["shortest_edge"] = min_pixels
    if max_pixels:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise config.UserError(f"min_pixels {size['shortest_edge']} is above max_pixels {size['longest_edge']}")
    processor.size = size
    return processor


def build_tiny(tokenizer, hidden: int, layers: int, seed: int, min_pixels: int, max_pixels: int):
    """A random Qwen2-VL: a one-block vision tower (14-pixel patches, 2x2 merged into one token) and a
    small Qwen2 language model over `tokenizer`, which holds VISION_TOKENS. Returns the model and sets
    tokenizer.image_processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    heads = max(1, hidden // 32)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, hidden // 64),
                max_position_embeddings=1024, bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                # the 3 rope sections (time, height, width) split head_dim / 2 frequencies
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": rope_sections(hidden // heads)})
    cfg = Qwen2VLConfig(text_config=text, tie_word_embeddings=True,
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    tokenizer.image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels or 28 * 28,
                                                         max_pixels=max_pixels or 28 * 28 * 64)
    return model


def rope_sections(head_dim: int) -> list[int]:
    """Qwen2-VL's split of head_dim / 2 rope frequencies into time, height and width (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def freeze_vision(model) -> int:
    """Freeze the vision tower (its weights keep their values); returns how many weights that froze."""
    tower = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = sum(p.numel() for p in tower.model.visual.parameters())
    tower.model.visual.requires_grad_(False)
    return frozen


def language_model_only(target_modules: list[str]) -> str:
    """LoRA's target modules restricted to the language model (Qwen2.5-VL's vision MLP shares names)."""
    return rf".*language_model.*\.({'|'.join(target_modules)})"


if __name__ == "__main__":
    from transformers import Qwen2VLImageProcessorPil

    question = with_placeholders("What is the sum of the three numbers in the image?", 1)
    print(repr(question), "->", content_parts(question))
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    out = processor(images=[Image.new("RGB", (84, 28))], return_tensors="pt")  # three 28 x 28 cells
    print(f"an 84 x 28 image: pixel_values {tuple(out['pixel_values'].shape)}, image_grid_thw "
          f"{out['image_grid_thw'].tolist()}, {int(out['image_grid_thw'].prod()) // processor.merge_size ** 2} "
          f"image tokens in the prompt")
