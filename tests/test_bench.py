"""bench.py --tiny runs both systems end to end and appends a well-formed section to BENCHMARKS.md;
bench_head.py measures the log-prob head alone."""
import re

import pytest
import torch

import bench
import bench_trl
import measure
import bench_head
from helpers import FAST, read, run_train

SMALL = ["--tiny", "--tiny_hidden", "32", "--tiny_layers", "2", "--num_chains", "4", "--micro_batch_size", "2",
         "--max_completion_tokens", "8", "--prompt_tokens", "16", "--steps", "1", "--warmup", "1"]


def test_tiny_bench_writes_a_row_per_system(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n")
    rows = bench.main(SMALL + ["--benchmarks_file", str(path)])
    assert [r["system"] for r in rows] == ["ours (dynamic)", "trl " + bench.importlib.metadata.version("trl")]
    for r in rows:
        assert r["step_s"] > 0 and r["sample_s"] > 0 and r["logp_s"] > 0 and r["optim_s"] > 0, r
        assert r["step_s"] >= r["sample_s"] + r["logp_s"] + r["optim_s"]  # the phases lie inside the step
        assert r["tokens_per_s"] == pytest.approx(4 * 8 / r["step_s"])  # every chain ran to full length
        assert 0 < r["decode_bw_frac"] and r["peak_alloc_gb"] > 0
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")  # appended, never overwritten
    assert re.search(r"### \d{4}-\d\d-\d\d \d\d:\d\d · CPU", text)
    assert "`python tools/bench.py --tiny" in text and "trl " in text and "transformers " in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and all(line.count("|") == len(bench.COLUMNS) + 1 for line in table)
    assert re.search(r"Step time ours / TRL: \d+\.\d\d", text)


def test_a_recipe_trained_by_trl_starts_from_our_policy_and_is_evaluated_our_way(tmp_path):
    argv = FAST + ["--max_steps", "2", "--eval_every", "2", "--temperature", "0.7", "--eval_n", "4"]
    run_train(argv + ["--out_dir", str(tmp_path / "ours")])
    bench_trl.train_recipe(argv + ["--out_dir", str(tmp_path / "trl")])
    ours, trl = (read(tmp_path / name / "metrics.jsonl") for name in ("ours", "trl"))
    assert trl[0] == ours[0] and trl[0]["step"] == 0  # the same warm start, the same held-out figures
    assert [r["step"] for r in trl if r["split"] == "train"] == [1, 2]
    assert all(r["step_time_s"] > 0 and 0 <= r["reward"] <= 1 for r in trl if r["split"] == "train")
    assert [r["step"] for r in trl if r["split"] == "eval"] == [0, 2]


def test_unknown_system_and_key_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown system"):
        bench.main(SMALL + ["--systems", "vllm", "--benchmarks_file", str(tmp_path / "b.md")])
    with pytest.raises(ValueError, match="unknown config key"):
        bench.main(SMALL + ["--num_chain", "4"])


def test_ragged_chains_reach_both_systems(tmp_path):
    lengths = bench.chain_lengths(4, 8, True, seed=0)
    assert sorted(lengths) == [2, 4, 6, 8] and lengths != sorted(lengths)  # spread evenly, shuffled
    assert bench.chain_lengths(4, 8, False, seed=0) == [8] * 4
    rows = bench.main(SMALL + ["--ragged", "true", "--benchmarks_file", str(tmp_path / "b.md")])
    for r in rows:  # ours counts the trained tokens of its rollout; TRL's own log is checked in run_trl
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(20), r["system"]
    assert "(--ragged: then cut to 2..8, 20 in all)" in (tmp_path / "b.md").read_text()


def test_several_prompts_each_get_their_group_in_both_systems(tmp_path):
    rows = bench.main(SMALL + ["--prompts_per_step", "2", "--benchmarks_file", str(tmp_path / "b.md")])
    for r in rows:  # 2 prompts x 4 chains x 8 tokens: ours counts its rollout's trained tokens
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(2 * 4 * 8), r["system"]
    assert "Workload: 2 prompt(s) (16 tokens each) x 4 chains" in (tmp_path / "b.md").read_text()
    tok = bench.word_tokenizer(1000, bench.QWEN_SPECIAL)
    assert bench.make_prompt(tok, 16, 0) != bench.make_prompt(tok, 16, 1)  # distinct prompts, distinct groups


def test_bench_head_measures_one_chunk_of_the_log_prob_head(tmp_path):
    path = tmp_path / "b.md"
    row = bench_head.main(["--tiny", "--micro_batch_size", "4", "--logp_chunk", "32", "--benchmarks_file", str(path)])
    assert (row["vocab"], row["hidden"], row["chains"], row["positions"]) == (512, 128, 4, 32)
    assert row["seconds"] > 0 and row["peak_gb"] >= 0  # CPU: resident memory, whose growth is often 0 here
    text = path.read_text()
    assert "`python tools/bench_head.py --tiny" in text and "4 chains x 32 positions = 0.1M logits" in text


def test_peak_memory_is_split_by_phase_and_counts_from_each_systems_start():
    clock = measure.Clock("cpu")
    clock.start("sample")
    held = torch.ones(2**26)  # 256 MB, resident while sampling
    held += 1
    clock.stop("sample")
    del held
    clock.start("optim")
    clock.stop("optim")
    clock.mark()
    assert set(clock.peaks) == {"sample", "optim", "rest"}
    assert clock.peaks["sample"][0] > clock.peaks["optim"][0] + 0.2  # the 256 MB shows in its phase only
    again = measure.Clock("cpu")  # a new system's clock starts from what is resident now
    again.mark()
    assert again.peaks["rest"][0] < clock.peaks["sample"][0] - 0.2


def test_any_sampling_idea_reaches_our_side_and_trl_refuses_it(tmp_path):
    path = str(tmp_path / "b.md")
    rows = bench.main(SMALL + ["--sampler", "guided", "--systems", "ours", "--guide_min_prefix_tokens", "2",
                               "--guide_max_prefix_tokens", "4", "--min_guide_tokens", "2", "--max_guide_tokens", "3",
                               "--benchmarks_file", path])
    assert [r["system"] for r in rows] == ["ours (dynamic)"] and rows[0]["sample_s"] > 0
    with pytest.raises(ValueError, match="TRL samples plain chains only"):
        bench.main(SMALL + ["--sampler", "guided", "--benchmarks_file", path])
