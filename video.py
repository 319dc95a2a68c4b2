"""Videos: rows with videos for the VL policies (vision.py), read and preprocessed with torch alone.

A question may carry videos beside its images: its text holds one `<video>` placeholder per video
(inserted at the start when the row has none; a count that disagrees with the videos is an error).
The pieces, in the order a run meets them:

    data      read: a row's video, a list of frames (each as vision.to_image reads an image) at the row's
              or the dataset's fps, or a video file decoded with PyAV -> Video (RGB frames and each
              frame's time in the clip); a longer clip keeps max_frames frames, picked evenly
    prompts   vision.content_parts: "<video>What ..." -> a video part, which the chat template renders
              as <|vision_start|><|video_pad|><|vision_end|>
    encode    frames -> pixel_values_videos (patches, D) and video_grid_thw (1, 3): resized to a multiple
              of the patch grid within the pixel bounds, rescaled, normalised and cut into patches of
              two frames, as transformers' Qwen2-VL and Qwen3-VL video processors do (which need
              torchvision; tests/test_video.py compares with numbers taken from them); and the prompt's
              tokens for the video, which differ by family (prompt_tokens)

    python video.py     # a 5-frame clip through the Qwen2-VL and the Qwen3-VL preprocessing
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PLACEHOLDER = "<video>"
VIDEO_PART = "<|vision_start|><|video_pad|><|vision_end|>"  # how a chat template renders a video part
VIDEO_PAD = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
QWEN3_RULE = ("qwen3_vl",)  # families whose pixel budget covers the whole clip and whose prompt carries timestamps


@dataclass
class Video:
    frames: list[Image.Image]  # RGB, one size, in time order
    times: list[float]         # each frame's time in the clip, in seconds (Qwen3-VL's prompt shows them)
    fps: float                 # frames kept per second of clip, as transformers counts it: clip fps x kept / all
    #                            (Qwen2.5-VL's rope spaces the temporal patches by it)


# ----------------------------------------------------------------------------------------------
# Rows with videos


def read(value, base_dir: str, *, fps: float, max_frames: int, to_image) -> Video:
    """One video of a row: a list of frames (anything to_image reads: paths relative to the data file,
    bytes, {"bytes", "path"} dicts, PIL images) shown at `fps`, or a video file's path (its own frame
    rate). ValueError with the cause for a video that cannot be used (data.py names the row)."""
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        if not os.path.isfile(path):
            raise ValueError(f"no video file {path}")
        frames, fps = decode(path)
    elif isinstance(value, (list, tuple)):
        frames = []
        for k, frame in enumerate(value):
            try:
                frames.append(to_image(frame, base_dir))
            except ValueError as e:
                raise ValueError(f"frame {k}: {e}") from None
    else:
        raise ValueError(f"a {type(value).__name__} is not a video (a list of frames or a video file's path)")
    if len(frames) < 2:
        raise ValueError(f"a video needs at least 2 frames, this one has {len(frames)}")
    if len({f.size for f in frames}) > 1:
        raise ValueError(f"the frames of a video must have one size, these have {sorted({f.size for f in frames})}")
    if not fps > 0:
        raise ValueError(f"a video's fps must be above 0, got {fps}")
    keep = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int).tolist()
    return Video([frames[i] for i in keep], [i / fps for i in keep], fps * len(keep) / len(frames))


def decode(path: str) -> tuple[list[Image.Image], float]:
    """A video file's frames (RGB) and frame rate, through PyAV."""
    try:
        import av
    except ImportError:
        raise ValueError(f"the video file {path} needs PyAV to decode it: pip install av (or give the video as a "
                         f"list of frame images)") from None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate
    except (av.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot decode the video file {path}: {e}") from None
    if not rate:
        raise ValueError(f"the video file {path} does not say its frame rate")
    return frames, float(rate)


# ----------------------------------------------------------------------------------------------
# Preprocessing: frames -> patches, with torch alone


def frame_size(family: str, frames: int, height: int, width: int, *, factor: int, min_pixels: int,
               max_pixels: int) -> tuple[int, int]:
    """(height, width) the frames are resized to: multiples of factor (patch x merge), the aspect ratio
    kept, within the pixel bounds per frame. Qwen3-VL bounds the clip's pixels (frames x height x width,
    frames rounded to pairs) and first scales up a frame smaller than factor; Qwen2-VL and Qwen2.5-VL
    bound each frame."""
    if family in QWEN3_RULE:
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        frames_rounded, budget_frames = round(frames / 2) * 2, frames
        min_pixels, max_pixels = min_pixels * frames, max_pixels * frames
    else:
        frames_rounded = budget_frames = 1
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a frame's aspect ratio must be below 200, got {width} x {height}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if frames_rounded * h * w > max_pixels:
        beta = math.sqrt(budget_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif frames_rounded * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (budget_frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patches(family: str, frames: list[Image.Image], *, patch_size: int, temporal_patch_size: int, merge_size: int,
            mean: list[float], std: list[float], min_pixels: int, max_pixels: int, rescale: float = 1 / 255
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values_videos (t*h*w, 3*temporal_patch_size*patch_size**2), video_grid_thw (1, 3)) of one
    video, with min_pixels and max_pixels per frame."""
    video = torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in frames]))  # (T, H, W, 3) uint8
    video = video.permute(0, 3, 1, 2)  # (T, 3, H, W)
    height, width = frame_size(family, len(frames), *video.shape[-2:], factor=patch_size * merge_size,
                               min_pixels=min_pixels, max_pixels=max_pixels)
    if (height, width) != tuple(video.shape[-2:]):  # torchvision's CPU path for uint8 bicubic: antialiased, in uint8
        video = F.interpolate(video.contiguous(), size=[height, width], mode="bicubic", align_corners=False,
                              antialias=True)
    # rescale and normalise in one step, (x - mean / rescale) / (std / rescale), as transformers fuses them
    mean = (torch.tensor(mean) * (1.0 / rescale)).view(-1, 1, 1)
    std = (torch.tensor(std) * (1.0 / rescale)).view(-1, 1, 1)
    video = (video.to(torch.float32) - mean) / std
    if pad := -len(video) % temporal_patch_size:  # the last frame repeated up to whole temporal patches
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    t, h, w = len(video) // temporal_patch_size, height // patch_size, width // patch_size
    m = merge_size
    # (t, tp, C, h/m, m, p, w/m, m, p) -> rows in merge-window order: (t, h/m, w/m, m, m), each row (C, tp, p, p)
    grid = video.reshape(t, temporal_patch_size, 3, h // m, m, patch_size, w // m, m, patch_size)
    grid = grid.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return grid.reshape(t * h * w, 3 * temporal_patch_size * patch_size ** 2), torch.tensor([[t, h, w]])


def prompt_tokens(family: str, grid: torch.Tensor, times: list[float], *, merge_size: int,
                  temporal_patch_size: int) -> str:
    """What replaces a video's <|vision_start|><|video_pad|><|vision_end|> in a prompt: Qwen2-VL and
    Qwen2.5-VL one <|video_pad|> per merged patch between the two marks; Qwen3-VL one block per temporal
    patch (a pair of frames), each led by its time, the mean of its frames' times: "<0.5 seconds>"."""
    t, h, w = grid.tolist()
    per_frame = h * w // merge_size ** 2
    if family not in QWEN3_RULE:
        return VISION_START + VIDEO_PAD * (t * per_frame) + VISION_END
    times = list(times) + [times[-1]] * (-len(times) % temporal_patch_size)  # padded as the frames are
    tp = temporal_patch_size
    stamps = [sum(times[i:i + tp]) / tp for i in range(0, len(times), tp)]
    return "".join(f"<{s:.1f} seconds>" + VISION_START + VIDEO_PAD * per_frame + VISION_END for s in stamps)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    clip = Video([Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)) for _ in range(5)],
                 [k / 2 for k in range(5)], 2.0)
    for family, patch, mean in (("qwen2_vl", 14, [0.48, 0.46, 0.41]), ("qwen3_vl", 16, [0.5] * 3)):
        pixels, grid = patches(family, clip.frames, patch_size=patch, temporal_patch_size=2, merge_size=2, mean=mean,
                               std=[0.27] * 3, min_pixels=(2 * patch) ** 2, max_pixels=(2 * patch) ** 2 * 4)
        print(f"{family}: pixel_values_videos {tuple(pixels.shape)}, video_grid_thw {grid.tolist()}, prompt "
              f"{prompt_tokens(family, grid[0], clip.times, merge_size=2, temporal_patch_size=2)!r}")
