"""BenchmarkCallback and its reports, through ``trainer.validate`` with a scripted stub policy.

The stub engine returns fixed completions per record id behind the real engine interface, so every expected
number below is counted by hand from the completion plan. Also run as a script: the 2-process DDP test
launches ``python tests/test_benchmark_callback.py <model> <data> <out>`` and Lightning's ``ddp`` strategy
relaunches it for rank 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vold_pl.callbacks.benchmark import BenchmarkCallback, BenchmarkSpec
from vold_pl.callbacks.report import bar_labels, render_png, write_reports
from vold_pl.data.benchmarks import load_benchmark
from vold_pl.models.factory import ModelSpec, get_tokenizer, load_model
from tests.scripted_engine import ScriptedEngine


class StubPolicy(L.LightningModule):
    """The interface BenchmarkCallback needs: ``.model``, ``.processor``, ``.tokenizer``; one no-op val batch."""

    def __init__(self, model_dir: str):
        super().__init__()
        self.model, self.processor = load_model(ModelSpec(str(model_dir)))
        self.tokenizer = get_tokenizer(self.processor)

    def validation_step(self, batch, batch_idx):
        return None

    def val_dataloader(self):
        return DataLoader([torch.zeros(1)], batch_size=1)


def completion(kind: str, gold: str) -> str:
    """right/boxed are correct; wrong/malformed/empty are not; right/wrong/empty are well formatted."""
    return {
        "right": f"<think> checking </think><answer> {gold} </answer>",
        "boxed": f"So it is \\boxed{{{gold}}}",  # correct answer, bad format
        "wrong": "<think> guessing </think><answer> qqq </answer>",
        "malformed": "<think> I never finish",
        "empty": "<think> hmm </think><answer> </answer>",  # well formatted, empty answer scores 0
    }[kind]


CORRECT = {"right", "boxed"}
WELL_FORMATTED = {"right", "wrong", "empty"}


class ShardedStubPolicy(StubPolicy):
    """FSDP2 through Lightning's ModelParallelStrategy: each decoder layer and the root sharded over the ranks."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if getattr(self, "_sharded", False):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.language_model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        register_fsdp_forward_method(self.model, "generate")  # root weights gathered for the whole generate
        self._sharded = True


def run_validate(model_dir, data_path, out_dir, plan: list[list[str]] | None, n: int | None = None,
                 devices: int = 1, batch_size: int = 3, strategy="auto", module_cls=StubPolicy):
    """``trainer.validate`` of the stub policy on the first synthetic test records.

    ``plan``: the scripted completions of each record (k per record); ``None``: the real engine, greedy, 8 new
    tokens, on ``n`` records.
    """
    n = len(plan) if plan is not None else n
    records = load_benchmark("synthetic", data_path, limit=n)
    module = module_cls(model_dir)
    engine, k = None, 1
    if plan is not None:
        scripted = {r.id: [completion(kind, r.answer) for kind in ks] for r, ks in zip(records, plan)}
        engine, k = ScriptedEngine(module.tokenizer, scripted), len(plan[0])
    cb = BenchmarkCallback([BenchmarkSpec("synthetic", str(data_path), limit=n)], max_new_tokens=128 if plan else 8,
                           do_sample=k > 1, pass_k=k, batch_size=batch_size, out_dir=str(out_dir), engine=engine)
    if devices > 1 and strategy == "auto":
        strategy = "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out_dir), callbacks=[cb])
    results = trainer.validate(module, verbose=False)
    return records, cb, results, module


def read_json(out: Path) -> dict:
    return json.loads((out / "benchmark_report.json").read_text())


# Ten records, one sample each. Hand count: correct = right x4 + boxed x2 = 6; well formatted = right x4 +
# wrong x2 + empty x1 = 7.
PLAN_1 = [["right"], ["wrong"], ["boxed"], ["malformed"], ["empty"], ["right"], ["right"], ["wrong"], ["boxed"],
          ["right"]]


def test_scripted_accuracy_per_group_and_reports(synth_data, tiny_models, tmp_path):
    records, cb, results, _ = run_validate(tiny_models["student"], synth_data["test"], tmp_path, PLAN_1)
    # Logged values pass through Lightning's float32 results; the JSON keeps exact float64 ratios.
    assert results[0]["bench/synthetic/accuracy"] == pytest.approx(0.6)  # 6 / 10
    assert results[0]["bench/synthetic/format_valid"] == pytest.approx(0.7)
    rep = read_json(tmp_path)
    s = rep["benchmarks"]["synthetic"]
    assert (s["n"], s["n_samples"], s["accuracy"], s["format_valid"]) == (10, 10, 0.6, 0.7)
    assert "pass@1" not in s and s["mean_completion_tokens"] > 0

    # Per-category / per-answer-type: an independent count over the plan.
    for field, key in (("category", "per_category"), ("answer_type", "per_answer_type")):
        want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r, (kind,) in zip(records, PLAN_1):
            want[getattr(r, field)][0] += 1
            want[getattr(r, field)][1] += kind in CORRECT
        got = {g: (v["n"], v["accuracy"]) for g, v in s[key].items()}
        assert got == {g: (n, c / n) for g, (n, c) in want.items()}
    assert len(s["per_answer_type"]) > 1  # the 10 records mix answer types, so the split is exercised

    # The four artifacts: JSON (above), Markdown, PNG, predictions.
    md = (tmp_path / "benchmark_report.md").read_text()
    assert "| synthetic | 10 | 10 | 0 | 60.0 | 60.0 |" in md and "per category" in md
    from PIL import Image

    with Image.open(tmp_path / "benchmark_report.png") as im:
        im.verify()
    assert render_png(rep)[1] == bar_labels(rep) == ["0.600", "0.600"]  # the plot prints the JSON's numbers
    preds = [json.loads(x) for x in (tmp_path / "benchmark_predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [r.id for r in records]
    assert [p["correct"] for p in preds] == [k in CORRECT for (k,) in PLAN_1]
    assert [p["format_valid"] for p in preds] == [k in WELL_FORMATTED for (k,) in PLAN_1]
    assert preds[0]["extracted"] == records[0].answer and preds[3]["extracted"] is None
    assert {"prompt", "completion", "gold", "benchmark"} <= preds[0].keys()
    assert rep["history"] == [{"step": 0, "benchmark": "synthetic", "accuracy": 0.6, "n": 10, "official_accuracy": 0.6}]


# Four records, three samples each. Mean accuracy = (1 + 0 + 3 + 1) / 12 = 5/12; pass@3 = 3 of 4 solved.
PLAN_K = [["wrong", "right", "wrong"], ["wrong", "malformed", "empty"], ["right", "right", "boxed"],
          ["empty", "malformed", "boxed"]]


def test_pass_at_k(synth_data, tiny_models, tmp_path):
    _, _, results, _ = run_validate(tiny_models["student"], synth_data["test"], tmp_path, PLAN_K, batch_size=2)
    assert results[0]["bench/synthetic/accuracy"] == pytest.approx(5 / 12)
    assert results[0]["bench/synthetic/pass@3"] == pytest.approx(0.75)
    s = read_json(tmp_path)["benchmarks"]["synthetic"]
    assert (s["n"], s["n_samples"], s["accuracy"], s["pass@3"]) == (4, 12, 5 / 12, 0.75)
    preds = (tmp_path / "benchmark_predictions.jsonl").read_text().splitlines()
    assert [json.loads(p)["sample"] for p in preds[:3]] == [0, 1, 2] and len(preds) == 12


def test_history_appends_and_plots_over_steps(tmp_path):
    def report(step, acc):
        return {"model": "m", "checkpoint": None, "step": step, "stage": "fit", "decoding": {"pass_k": 1},
                "benchmarks": {"a": {"n": 4, "accuracy": acc, "n_samples": 4, "format_valid": 1.0,
                                     "mean_completion_tokens": 3.0, "per_category": {}, "per_answer_type": {}}}}

    write_reports(tmp_path, report(10, 0.25))
    write_reports(tmp_path, report(20, 0.5))
    write_reports(tmp_path, report(20, 0.75))  # same step again: replaces, does not duplicate
    rep = read_json(tmp_path)
    assert [(p["step"], p["accuracy"]) for p in rep["history"]] == [(10, 0.25), (20, 0.75)]
    assert "## accuracy (%) over steps" in (tmp_path / "benchmark_report.md").read_text()
    from PIL import Image

    with Image.open(tmp_path / "benchmark_report.png") as im:
        assert im.size[0] > 1000  # two panels
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_hf_generate_end_to_end(synth_data, tiny_models, tmp_path):
    """The real engine (greedy ``model.generate``) on the tiny student: the path runs, train mode is restored."""
    module = StubPolicy(tiny_models["student"])
    module.model.train()
    cb = BenchmarkCallback([BenchmarkSpec("synthetic", str(synth_data["test"]), limit=3)], max_new_tokens=6,
                           batch_size=2, out_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=True, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[cb])
    out = trainer.validate(module, verbose=False)
    assert 0.0 <= out[0]["bench/synthetic/accuracy"] <= 1.0
    assert module.model.training  # restored after evaluation
    s = read_json(tmp_path)["benchmarks"]["synthetic"]
    assert s["n"] == 3 and 0 < s["mean_completion_tokens"] <= 6


PLAN_DDP = [["right", "wrong"], ["boxed", "boxed"], ["malformed", "empty"], ["wrong", "right"], ["right", "right"]]


def _launch(mode: str, tiny_models, synth_data, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tiny_models["student"]),
                           str(synth_data["test"]), str(out), mode], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _predictions(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "benchmark_predictions.jsonl").read_text().splitlines()]


def test_ddp_two_processes_equals_single(synth_data, tiny_models, tmp_path):
    """2 ranks (gloo, CPU) over 5 records in batches of 2: rank 0 runs 2 batches, rank 1 one. Same report."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_validate(tiny_models["student"], synth_data["test"], single, PLAN_DDP, batch_size=2)
    _launch("ddp", tiny_models, synth_data, ddp)
    a, b = read_json(single), read_json(ddp)
    assert b["benchmarks"] == a["benchmarks"]
    # Hand count: scores 1 + 2 + 0 + 1 + 2 = 6 of 10 samples; 4 of 5 records solved at least once.
    assert a["benchmarks"]["synthetic"]["accuracy"] == 0.6 and a["benchmarks"]["synthetic"]["pass@2"] == 0.8
    assert _predictions(ddp) == _predictions(single)
    assert (ddp / "benchmark_report.md").is_file() and (ddp / "benchmark_report.png").is_file()


def test_fsdp2_uneven_slices_do_not_hang(synth_data, tiny_models, tmp_path):
    """FSDP2 (every forward is a collective) with 3 vs 2 records per rank: real greedy decoding finishes on both
    ranks and gives the single-process completions."""
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run_validate(tiny_models["student"], synth_data["test"], single, None, n=5, batch_size=2)
    _launch("fsdp", tiny_models, synth_data, fsdp)
    assert read_json(fsdp)["benchmarks"] == read_json(single)["benchmarks"]
    assert [p["completion"] for p in _predictions(fsdp)] == [p["completion"] for p in _predictions(single)]


if __name__ == "__main__":  # the multi-process tests' worker; Lightning relaunches this script for rank 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir, data_path, out_dir, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    if mode == "ddp":
        run_validate(model_dir, data_path, out_dir, PLAN_DDP, devices=2, batch_size=2)
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        from vold_pl.sharding import is_fsdp2

        *_, module = run_validate(model_dir, data_path, out_dir, None, n=5, devices=2, batch_size=2,
                                  strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                                  module_cls=ShardedStubPolicy)
        assert is_fsdp2(module.model), "the model should be sharded"
