"""gpu_check.py's CPU rehearsal: every item of the GPU suite runs, so the GPU run cannot fail on plumbing."""
import importlib.metadata
import json
import os
import re
import time

import pytest

import gpu_check
import measure
from helpers import ROOT


def test_the_cpu_rehearsal_passes_every_item(tmp_path, monkeypatch):
    out = tmp_path / "out"
    published, publish = [], measure.publish

    def recording_publish(text, path):  # writes only under tmp_path, whatever the path asked for
        published.append(path)
        if os.path.abspath(path).startswith(str(tmp_path)):
            publish(text, path)
    monkeypatch.setattr(measure, "publish", recording_publish)
    results = gpu_check.main(["--tiny", "--out", str(out)])
    failed = [(r["part"], r["name"], r.get("error")) for r in results if not r["ok"]]
    assert failed == []
    names = {(r["part"], r["name"]) for r in results}
    assert {("smoke", v) for v in [*gpu_check.SMOKE, "resume", "fsdp, one rank"]} <= names  # every variant, a
    # resume, and --fsdp over a process group of one rank
    assert {p for p, _ in names} == {"smoke", "memory", "speed", "kahan"}
    smoke = [r for r in results if r["part"] == "smoke" and r["name"] in gpu_check.SMOKE]
    assert all(r["figures"]["grad_norm"] > 0 for r in smoke)  # a train line whose rewards gave a gradient
    speed = next(r for r in results if r["name"] == "ours and TRL, dynamic sampler")["figures"]
    assert any(k.startswith("trl") for k in speed) and any(k.startswith("ours") for k in speed)
    kahan = next(r for r in results if r["part"] == "kahan")["figures"]
    assert abs(kahan["kept_with_kahan"] - 1) <= gpu_check.KAHAN_TOL and kahan["kept_without"] < 0.5
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    text = (out / "gpu_check.md").read_text()
    assert "| smoke | guided | ok |" in text and "Step time ours / TRL" in text  # bench.py's section follows
    # a rehearsal writes under --out only: BENCHMARKS.md holds measured runs (bench.py's own sections go
    # to out/benchmarks.md)
    assert published and all(os.path.dirname(os.path.abspath(p)) == str(out) for p in published), published


def test_a_rehearsal_refuses_to_append_to_benchmarks_md():
    with pytest.raises(SystemExit, match="BENCHMARKS.md holds measured runs only"):
        gpu_check.main(["--tiny", "--benchmarks_file", os.path.join(ROOT, "BENCHMARKS.md")])


def test_a_part_over_its_budget_records_the_item_and_skips_the_rest():
    results = []
    items = [("quick", lambda: {"x": 1}), ("slow", lambda: time.sleep(5)), ("never", lambda: {"y": 2})]
    t0 = time.time()
    gpu_check.run_part(results, "demo", items, 0.5, "cpu")
    assert time.time() - t0 < 4.5  # the slow item sleeps 5 s: it was cut
    assert [(r["name"], r["ok"]) for r in results] == [("quick", True), ("slow", False), ("never", False)]
    assert "budget" in results[1]["error"] and results[2]["error"].startswith("skipped")
    # a failing item is recorded with its error, and the part goes on
    results = []
    gpu_check.run_part(results, "demo", [("bad", lambda: 1 / 0), ("good", lambda: {})], 10, "cpu")
    assert [r["ok"] for r in results] == [False, True] and "ZeroDivisionError" in results[0]["error"]


def test_the_wheel_script_fetches_what_ci_tests():
    # the device's Python lacks these; the script pins each to the version installed here, so that the
    # GPU runs what CI tests (the script itself needs the network: bash gpu_wheels.sh)
    script = open(os.path.join(ROOT, "tools", "gpu_wheels.sh")).read()
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", script))
    for package in ("bitsandbytes", "liger-kernel", "transformers", "trl", "math-verify", "datasets"):
        assert pins.get(package) == importlib.metadata.version(package), package
