"""Images: vision-language policies (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), rows with images, and a built-in visual task.

Guided-GRPO's multimodal setting. A question may carry images; its text holds one `<image>` placeholder
per image (inserted at the start when the row has none; a count that disagrees with the images is an
error). Videos (video.py) travel the same way: a `<video>` placeholder each, encoded with the images.
The pieces, in the order a run meets them:

    data      to_image: a row's image (a path relative to the data file, raw bytes, HF datasets'
              {"bytes", "path"} dict, a PIL image) -> an RGB PIL image; with_placeholders
    prompts   content_parts: "<image>What is ..." -> chat content parts, which the chat template
              renders as <|vision_start|><|image_pad|><|vision_end|>
    encode    once per question: the image processor -> pixel_values (patches, D) and image_grid_thw
              (images, 3), video.py's torch-only preprocessing -> the same for videos; each prompt's one
              <|image_pad|> per image is expanded to the image's token count, and each video's part to
              its family's tokens (what transformers' processor does), so no transformers video processor
              (and no torchvision) is needed; a question's Visual is shared by its G chains
              (Rollout.visual holds references)
    forward   model_inputs: a batch of chains' images and videos through the vision encoder, once per
              question (not per chain), as the features the model takes (Qwen3-VL's deepstack features
              too), and mm_token_type_ids (text 0, image 1, video 2), from which the model computes its
              own 3-D rope positions (the 1-D cumsum of text models is wrong here)
    load      a checkpoint whose config.json says qwen2_vl, qwen2_5_vl or qwen3_vl loads with
              AutoModelForImageTextToText; its image processor rides on the tokenizer (`image_processor`,
              with `vl_family`, the model_type, which picks the video rules) and is saved beside it in
              checkpoints; `tiny_vl` is a random tiny Qwen2-VL built here

The built-in visual task, `dataset: digits`, is in builtin_tasks.py.

    python vision.py     # a question's image parts, and what the image processor makes of one image
"""
import base64
import io
import os
import re
from typing import NamedTuple

import torch
from PIL import Image

import config
import video

PLACEHOLDER = "<image>"
VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # config.json model_type of the families supported
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


def with_placeholders(question: str, n_images: int, n_videos: int = 0) -> str:
    """The question with one <image> per image and one <video> per video: those of a kind it has none of
    inserted at the start; ValueError when its count of a kind disagrees with the images or videos."""
    for mark, n, kind in ((video.PLACEHOLDER, n_videos, "videos"), (PLACEHOLDER, n_images, "images")):
        found = question.count(mark)
        if found == 0:
            question = mark * n + question
        elif found != n:
            raise ValueError(f"the question has {found} {mark} placeholders for {n} {kind}")
    return question


def content_parts(text: str) -> list[dict]:
    """'<image>What is shown?' -> [{"type": "image"}, {"type": "text", "text": "What is shown?"}]; a
    <video> is {"type": "video"}."""
    parts = []
    for piece in re.split(f"({re.escape(PLACEHOLDER)}|{re.escape(video.PLACEHOLDER)})", text):
        if piece in (PLACEHOLDER, video.PLACEHOLDER):
            parts.append({"type": "image" if piece == PLACEHOLDER else "video"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def has_visual(text: str) -> bool:
    """Whether a question holds an <image> or <video> mark."""
    return PLACEHOLDER in text or video.PLACEHOLDER in text


def images_only(items: list) -> list:
    """A question's images without its videos (what a verifier is shown)."""
    return [x for x in items if not isinstance(x, video.Video)]


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


class Visual(NamedTuple):
    """A question's visual inputs, computed once (encode) and shared by its chains."""
    pixel_values: torch.Tensor         # (p, D) its images' patches
    image_grid_thw: torch.Tensor       # (k, 3) per image: t, h, w in patches
    pixel_values_videos: torch.Tensor  # (q, D) its videos' patches
    video_grid_thw: torch.Tensor       # (v, 3) per video
    second_per_grid_ts: torch.Tensor   # (v,) seconds per temporal patch of each video (Qwen2.5-VL's rope)


def encode(tokenizer, prompts: list[str], items: list[list]) -> tuple[list[str], list[Visual]]:
    """(prompts with each image's and video's tokens expanded, each prompt's Visual). items: each prompt's
    images (PIL) and videos (video.Video), each kind in the order of its parts in the prompt; each goes
    through its preprocessing once."""
    processor = tokenizer.image_processor
    expanded, visual = [], []
    for prompt, these in zip(prompts, items, strict=True):
        images = images_only(these)
        videos = [x for x in these if isinstance(x, video.Video)]
        if prompt.count(IMAGE_PAD) != len(images):
            raise ValueError(f"a prompt has {prompt.count(IMAGE_PAD)} image tokens for {len(images)} images")
        if prompt.count(video.VIDEO_PART) != len(videos):
            raise ValueError(f"a prompt has {prompt.count(video.VIDEO_PART)} video parts for {len(videos)} videos")
        v = no_images()
        if images:
            out = processor(images=images, return_tensors="pt")
            grid = out["image_grid_thw"]  # (k, 3): t, h, w in patches
            pieces = prompt.split(IMAGE_PAD)
            counts = (grid.prod(-1) // processor.merge_size ** 2).tolist()  # language-model tokens per image
            prompt = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:]))
            v = v._replace(pixel_values=out["pixel_values"], image_grid_thw=grid)
        if videos:
            pieces = prompt.split(video.VIDEO_PART)
            settings = dict(patch_size=processor.patch_size, temporal_patch_size=processor.temporal_patch_size,
                            merge_size=processor.merge_size)
            done = [video.patches(tokenizer.vl_family, clip.frames, **settings, mean=list(processor.image_mean),
                                  std=list(processor.image_std), min_pixels=processor.size["shortest_edge"],
                                  max_pixels=processor.size["longest_edge"]) for clip in videos]  # [(patches, grid)]
            tokens = [video.prompt_tokens(tokenizer.vl_family, grid[0], clip.times, merge_size=processor.merge_size,
                                          temporal_patch_size=processor.temporal_patch_size)
                      for (_, grid), clip in zip(done, videos)]
            prompt = pieces[0] + "".join(t + rest for t, rest in zip(tokens, pieces[1:]))
            v = v._replace(pixel_values_videos=torch.cat([p for p, _ in done]),
                           video_grid_thw=torch.cat([g for _, g in done]),
                           second_per_grid_ts=torch.tensor([processor.temporal_patch_size / clip.fps
                                                            for clip in videos]))
        expanded.append(prompt)
        visual.append(v)
    return expanded, visual


def no_images() -> Visual:
    """The visual inputs of a question without images or videos, in a batch where others have some:
    model_inputs skips them (empty tensors)."""
    return Visual(torch.zeros(0, 0), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 0),
                  torch.zeros(0, 3, dtype=torch.long), torch.zeros(0))


def banned_ids(model) -> list[int] | None:
    """A VL model's vision tokens, which it must never sample: an <|image_pad|> in a completion has no
    image behind it, and the forward pass would refuse the chain. Sampling suppresses them
    (rollout.generate) and log-probs leave them out (logprobs.head_logps), so both use one distribution.
    None for a text model."""
    cfg = model.config
    if getattr(cfg, "image_token_id", None) is None:
        return None
    return [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]


def model_inputs(model, input_ids: torch.Tensor, visual: list[Visual]) -> dict:
    """The keyword arguments that give a VL model its chains' images and videos: one Visual per row of
    input_ids (n, L), for its forward or generate.

    Each question's images and videos go through the vision encoder once, however many of its chains
    the rows hold: a question's chains share its Visual (Rollout.visual holds references), found here
    by identity, and the encoder's features reach the model as mm_encoder_outputs, which forward and
    generate take in place of pixel values (Qwen3-VL's carry the deepstack features of the tapped
    vision layers too, which its language model adds to its first layers). With gradients on
    (train_vision), a question's features feed each of its chains, so the encoder's gradient sums over
    them, as it would with one encoder pass per chain. With mm_token_type_ids (text 0, image 1, video 2)
    and the grids (one row per image or video, in row order) the model computes its 3-D rope positions
    itself; rows without either get plain 1-D positions."""
    cfg = model.config
    kinds = (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()  # text 0
    kwargs = {"mm_token_type_ids": kinds}
    device = input_ids.device
    questions = list({id(v): v for v in visual}.values())  # each question once, in order of first use
    outputs = {}
    for kind, pixels, grids, encoder in (("image", "pixel_values", "image_grid_thw", model.get_image_features),
                                         ("video", "pixel_values_videos", "video_grid_thw", model.get_video_features)):
        rows = [v for v in visual if len(getattr(v, grids))]
        if not rows:
            continue
        having = [v for v in questions if len(getattr(v, grids))]
        encoded = encoder(torch.cat([getattr(v, pixels) for v in having]).to(device),
                          torch.cat([getattr(v, grids) for v in having]).to(device), return_dict=True)

        def per_question(features):  # one (tokens, H) per image or video, questions in order -> {question: [...]}
            it = iter(features)
            return {id(v): [next(it) for _ in range(len(getattr(v, grids)))] for v in having}
        pooled = per_question(encoded.pooler_output)
        out = type(encoded)(pooler_output=[f for v in rows for f in pooled[id(v)]])
        if getattr(encoded, "deepstack_features", None) is not None:  # Qwen3-VL: per tapped layer, as pooler_output
            layers = [per_question(layer) for layer in encoded.deepstack_features]
            out.deepstack_features = [[f for v in rows for f in layer[id(v)]] for layer in layers]
        outputs[kind] = out
        kwargs[grids] = torch.cat([getattr(v, grids) for v in rows]).to(device)
        if kind == "video" and cfg.model_type == "qwen2_5_vl":  # its rope spaces a video's frames by their time
            kwargs["second_per_grid_ts"] = torch.cat([v.second_per_grid_ts for v in rows]).to(device)
    if outputs:
        kwargs["mm_encoder_outputs"] = outputs
    return kwargs


def check(tokenizer, cfg, examples: list[dict]) -> None:
    """Images and videos need a VL policy; a VL policy works with every sampler, not with Liger (its
    fused loss cannot leave out the vision tokens that sampling forbids: banned_ids)."""
    for kind, field in (("images", cfg.image_field), ("videos", cfg.video_field)):
        if any(ex.get(kind) for ex in examples) and not is_vl(tokenizer):
            raise config.UserError(f"the data has {kind}, and {cfg.model_name!r} is a text model: train a Qwen2-VL, "
                                   f"Qwen2.5-VL or Qwen3-VL checkpoint (or tiny_vl), or use data without the "
                                   f"{field!r} column")
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
    tokenizer.vl_family = cfg.model_type
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
