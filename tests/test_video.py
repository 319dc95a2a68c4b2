"""Videos (video.py): the torch-only preprocessing against numbers taken from transformers' own video
processors (tests/fixtures/video_reference.json, made by make_video_reference.py: CI has no torchvision),
video rows in jsonl and parquet, video files through PyAV, and bad video input. The models' side of video
(log-probs, the encoder once per question, every sampler) is in tests/test_vision.py."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import builtin_tasks
import config
import data
import video
import vision

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "video_reference.json")


def reference_cases():
    with open(FIXTURE) as f:
        return json.load(f)["cases"]


@pytest.mark.parametrize("case", reference_cases(), ids=lambda c: f"{c['family']}-{len(c['frames'])}x"
                                                                f"{len(c['frames'][0])}x{len(c['frames'][0][0])}")
def test_the_torch_only_preprocessing_equals_transformers_video_processors(case):
    """The same patches (to float rounding), grid, prompt tokens (Qwen3-VL's timestamps) and
    second_per_grid_ts (Qwen2.5-VL) as transformers' processors made of the same frames."""
    frames = [Image.fromarray(np.array(f, dtype=np.uint8)) for f in case["frames"]]
    family, fps = case["family"], case["fps"]
    pixels, grid = video.patches(family, frames, patch_size=case["patch_size"], temporal_patch_size=2, merge_size=2,
                                 mean=case["mean"], std=case["std"], min_pixels=case["min_pixels"],
                                 max_pixels=case["max_pixels"])
    assert grid.tolist() == case["video_grid_thw"]
    want = torch.tensor(case["pixel_values_videos"])
    assert pixels.shape == want.shape and (pixels.double() - want).abs().max() < 1e-5
    clip = video.read(frames, "", fps=fps, max_frames=len(frames), to_image=vision.to_image)
    tokens = video.prompt_tokens(family, grid[0], clip.times, merge_size=2, temporal_patch_size=2)
    assert tokens + "sum?" == case["prompt"]
    if "second_per_grid_ts" in case:  # Qwen2.5-VL: temporal_patch_size / the clip's rate
        assert [2 / clip.fps] == pytest.approx(case["second_per_grid_ts"])


def test_max_frames_keeps_frames_evenly_with_their_times():
    frames = [builtin_tasks.number_image([k % 10]) for k in range(10)]
    clip = video.read(frames, "", fps=5.0, max_frames=4, to_image=vision.to_image)
    assert clip.times == [0.0, 0.6, 1.2, 1.8]  # frames 0, 3, 6, 9 of a 5 fps clip
    assert [list(f.getdata()) for f in clip.frames] == [list(frames[k].getdata()) for k in (0, 3, 6, 9)]
    assert clip.fps == pytest.approx(2.0)  # 4 of 10 frames at 5 fps, as transformers counts a sampled clip
    with pytest.raises(config.UserError, match="max_frames must be at least 2"):
        config.load(["--max_frames", "1"])
    with pytest.raises(config.UserError, match="fps must be above 0"):
        config.load(["--fps", "0"])


def test_placeholders_for_images_and_videos():
    assert vision.with_placeholders("Sum?", 1, 2) == "<image><video><video>Sum?"
    assert vision.with_placeholders("<video>Sum of <image>?", 1, 1) == "<video>Sum of <image>?"
    assert vision.content_parts("<video>Sum of <image>?") == [
        {"type": "video"}, {"type": "text", "text": "Sum of "}, {"type": "image"}, {"type": "text", "text": "?"}]


def write_clip(folder, digits, name) -> list[str]:
    """PNG frames of one clip in folder/name/, their paths relative to folder."""
    os.makedirs(folder / name, exist_ok=True)
    paths = []
    for k, d in enumerate(digits):
        builtin_tasks.number_image([d]).save(folder / name / f"{k}.png")
        paths.append(f"{name}/{k}.png")
    return paths


def test_video_rows_load_from_jsonl_and_parquet(tmp_path):
    """Frames as paths relative to the data file (jsonl) or HF datasets image dicts (parquet); the row's
    fps beats the dataset's; the <video> mark is inserted where the question has none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = write_clip(tmp_path, [3, 4, 5], "a")
    rows = [{"problem": "Sum?", "answer": "12", "videos": [paths], "fps": 4},
            {"problem": "What is <video> about?", "answer": "7", "videos": [paths[:2]]}]
    jsonl = tmp_path / "clips.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = [(tmp_path / p).read_bytes() for p in paths]
    parquet = tmp_path / "clips.parquet"
    pq.write_table(pa.table({"problem": ["Sum?"], "answer": ["12"],
                             "videos": [[[{"bytes": b, "path": None} for b in png]]]}), parquet)
    examples, _ = data.load(config.Config(dataset=str(jsonl), test_dataset=str(jsonl), question_field="problem",
                                          fps=2.0))
    assert [ex["question"] for ex in examples] == ["<video>Sum?", "What is <video> about?"]
    assert examples[0]["videos"][0].times == [0.0, 0.25, 0.5] and examples[1]["videos"][0].times == [0.0, 0.5]
    from_parquet, _ = data.load(config.Config(dataset=str(parquet), test_dataset=str(parquet),
                                              question_field="problem"))
    for a, b in zip(from_parquet[0]["videos"][0].frames, examples[0]["videos"][0].frames, strict=True):
        assert list(a.getdata()) == list(b.getdata())


def test_a_video_file_decodes_through_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as out:  # 6 frames of 32 x 32 at 3 fps
        stream = out.add_stream("mpeg4", rate=3)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(6):
            frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), (40 * k, 0, 0)))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    clip = video.read("clip.mp4", str(tmp_path), fps=99.0, max_frames=3, to_image=vision.to_image)
    assert clip.times == pytest.approx([0.0, 2 / 3, 5 / 3]) and clip.frames[0].size == (32, 32)  # the file's 3 fps
    assert clip.frames[2].getpixel((16, 16))[0] > clip.frames[0].getpixel((16, 16))[0] + 100  # frames in order


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


@pytest.mark.parametrize("videos, error", [
    ([["a/0.png", 3]], r"line 1 videos\[0\]: frame 1: unreadable image: a int is not an image"),
    ([["a/0.png", "a/missing.png"]], r"line 1 videos\[0\]: frame 1: unreadable image: no file"),
    (["clip.mp4"], r"line 1 videos\[0\]: the video file .*clip.mp4 needs PyAV to decode it: pip install av"),
    ([["a/0.png", "a/1.png"], ["a/0.png", "a/1.png"]], r"line 1: the question has 1 <video> placeholders for 2 videos"),
    ([["a/0.png"]], r"line 1 videos\[0\]: a video needs at least 2 frames"),
])
def test_a_bad_video_is_an_error_naming_the_row_or_is_skipped_and_counted(tmp_path, videos, error, capsys,
                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as where PyAV is not installed: `import av` fails
    write_clip(tmp_path, [1, 2], "a")
    (tmp_path / "clip.mp4").write_bytes(b"a video file")
    train = write_rows(tmp_path / "train.jsonl", [{"problem": "<video>Sum?", "answer": "3", "videos": videos},
                                                   {"problem": "Sum?", "answer": "3",
                                                    "videos": [["a/0.png", "a/1.png"]]}])
    cfg = config.Config(dataset=train, test_dataset=train, question_field="problem")
    with pytest.raises(data.BadRow, match=error + ".*--skip_bad_rows"):
        data.load(cfg)
    examples, _ = data.load(config.Config(dataset=train, test_dataset=train, question_field="problem",
                                          skip_bad_rows=True))
    assert len(examples) == 1 and examples[0]["question"] == "<video>Sum?"
    assert "skipped 1 of 2 rows" in capsys.readouterr().out


def test_video_marks_without_videos_and_videos_for_a_text_model_are_refused(tmp_path, tiny):
    train = write_rows(tmp_path / "train.jsonl", [{"problem": "<video>Sum?", "answer": "3"}])
    with pytest.raises(data.BadRow, match=r"line 1: the question has 1 <video> placeholders for 0 videos"):
        data.load(config.Config(dataset=train, test_dataset=train, question_field="problem"))
    _, tok = tiny
    examples, _ = builtin_tasks.clips_task(4, 2, seed=0)
    with pytest.raises(config.UserError, match="the data has videos, and 'tiny' is a text model"):
        vision.check(tok, config.Config(model_name="tiny"), examples)
