"""The layout: no import circles, train.py is a leaf, a new sampling idea is one dict entry, and every
config field has its help text."""
import ast
import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import rollout
import samplers
from helpers import FAST, ROOT, read, run_train


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports, anywhere in its file (functions and __main__ included)}, for
    the top level and the instruments in tools/."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py"))
    names = {os.path.basename(p)[:-3] for p in paths}
    graph = {}
    for path in paths:
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and node.module in names:
                found.add(node.module)
        graph[os.path.basename(path)[:-3]] = found
    return graph


def test_no_import_circles_and_nothing_imports_train():
    graph = project_imports()
    assert len(graph) > 10 and graph["train"] >= {"grpo", "samplers", "checkpoint"}  # the graph was read
    assert [m for m, deps in graph.items() if "train" in deps] == []
    state = {}  # depth-first search: a grey module reached again closes a circle

    def visit(m, path):
        state[m] = "grey"
        for d in sorted(graph[m]):
            assert state.get(d) != "grey", f"import circle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = "black"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    tools = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))}
    assert {"bench", "gpu_check", "grad_agreement"} <= tools and not tools & {"train", "grpo"}
    assert [m for m, deps in graph.items() if m not in tools and deps & tools] == []  # the instruments stay aside
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):  # test files do not import each other
        for node in ast.walk(ast.parse(open(path).read())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [m for m in modules if m.startswith("test_")], path


def make_toy_sampler(cfg, *, device, train_set):
    """A new idea, as a researcher adds one: every chain is the same greedy completion, trained whole."""
    def sample_toy(model, tokenizer, batch, step):
        prompts = rollout.prompts_of(tokenizer, cfg.system_prompt, batch)
        r = rollout.sample(model, tokenizer, prompts, cfg.num_chains, max_prompt_tokens=cfg.max_prompt_tokens,
                           max_new_tokens=cfg.max_completion_tokens, temperature=1.0)
        r.stats = {"toy/calls": 1.0, "toy/step": float(step)}
        r.reward_weight = torch.full((len(r),), 0.5)  # halves every reward
        return r
    return sample_toy


def test_a_sampler_added_through_the_dict_alone_trains(tmp_path, monkeypatch):
    monkeypatch.setitem(samplers.SAMPLERS, "toy", make_toy_sampler)
    out = str(tmp_path / "toy")
    run_train(FAST + ["--out_dir", out, "--max_steps", "1", "--eval_every", "5", "--save_every", "5",
                      "--sampler", "toy", "--rewards", "integer_answer=1"])
    row = [r for r in read(f"{out}/metrics.jsonl") if r["split"] == "train"][0]
    assert row["toy/calls"] == 1.0 and row["toy/step"] == 1.0  # its figures reach the train line
    assert row["reward"] == 0.5 * row["reward/integer_answer"]  # and its weight the total reward
    assert row["skipped"] == 0 and row["grad_norm"] >= 0
    assert json.load(open(f"{out}/config.json"))["sampler"] == "toy"


def test_an_unknown_rollout_names_the_close_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown sampler 'guidde'. Did you mean 'guided'"):
        run_train(FAST + ["--out_dir", str(tmp_path / "run"), "--sampler", "guidde"])


def test_config_help_prints_every_field_with_its_help():
    out = subprocess.run([sys.executable, "config.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    texts = config.help_texts()
    for f in dataclasses.fields(config.Config):
        assert f"--{f.name} (" in out and len(texts.get(f.name, "")) > 8, f.name
    assert "--loss_type (grpo|bnpo|dr_grpo|dapo|gspo|cispo|reinforce, default 'grpo')" in out
    assert texts["sort_micro_batches"].endswith("differs from one process: distributed.py)")  # continued lines


@pytest.mark.parametrize("variant", ["tiny_guided", "tiny_guided_postfix", "tiny_verifier", "tiny_verifier_matched",
                                     "tiny_dapo"])
def test_the_tiny_variants_keep_the_demo_warm_start_and_schedule(variant):
    """A variant of configs/tiny.yaml changes the idea it is about and nothing else of the demo, so that with
    the same seed its warm start, step 0 and schedule are the demo's and compare.py compares the idea alone."""
    import yaml

    def recipe(name):
        with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as f:
            return yaml.safe_load(f)
    demo, other = recipe("tiny"), recipe(variant)
    shared = [k for k in demo if k.startswith(("sft_", "eval_", "tiny_", "arithmetic_")) or k in (
        "model_name", "dataset", "system_prompt", "prompts_per_step", "num_chains", "max_prompt_tokens",
        "max_completion_tokens", "train_only", "learning_rate", "warmup_steps", "max_steps", "seed")]
    assert len(shared) > 15
    assert {k: other.get(k) for k in shared} == {k: demo[k] for k in shared}


@pytest.mark.parametrize("variant", ["smollm2_ghpo", "smollm2_verifier", "smollm2_guided"])
def test_the_smollm2_variants_change_only_their_idea(variant):
    """A variant of configs/smollm2_cpu.yaml sets every key of the recipe as the recipe does (out_dir aside)
    and adds only its sampling idea's keys, so compare.py's curves differ by the idea alone."""
    import yaml

    def recipe(name):
        with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as f:
            return yaml.safe_load(f)
    base, other = recipe("smollm2_cpu"), recipe(variant)
    shared = [k for k in base if k != "out_dir" and not (variant == "smollm2_verifier" and k == "max_completion_tokens")]
    assert len(shared) > 20
    assert {k: other.get(k) for k in shared} == {k: base[k] for k in shared}
    if variant == "smollm2_verifier":  # the budget counts the policy's tokens over both tries
        assert other["max_completion_tokens"] == other["verifier_max_turns"] * base["max_completion_tokens"]
    idea = {"smollm2_ghpo": ("sampler", "ghpo_"), "smollm2_verifier": ("sampler", "verifier_"),
            "smollm2_guided": ("sampler", "guide_", "min_guide", "max_guide")}[variant]
    assert all(k.startswith(idea) for k in other if k not in base), sorted(set(other) - set(base))
    assert other["sampler"] == variant.split("_")[1] and other["out_dir"] != base["out_dir"]


@pytest.mark.parametrize("base, variants", [("tiny", ["tiny_guided", "tiny_guided_postfix", "tiny_verifier",
                                                      "tiny_verifier_matched", "tiny_dapo"]),
                                            ("tiny_hard", ["tiny_ghpo"])])
def test_compared_tiny_recipes_share_one_warm_start_per_seed(base, variants):
    """compare.py's sft_cache trains a seed's warm start once for the recipes compared with each other."""
    import sft

    def key(name, seed):
        return sft.cache_key(config.load(["--config", os.path.join(ROOT, "configs", f"{name}.yaml"),
                                          "--seed", str(seed)]))
    for seed in (0, 1):
        assert {key(v, seed) for v in variants} == {key(base, seed)}
    assert key(base, 0) != key(base, 1)
