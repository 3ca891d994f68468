"""The benchmarks as published: every layout loads, prompts list every option, the shipped config runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest

from tests.benchmark_fixtures import make_all, make_logicvista, make_mathvision, make_mathvista, make_mmmu_pro
from vold_pl.callbacks.benchmark import BenchmarkCallback, BenchmarkSpec
from vold_pl.data.benchmarks import load_benchmark
from vold_pl.data.schema import RecordError
from vold_pl.errors import UserError
from tests.scripted_engine import ScriptedEngine

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "configs" / "openvlthinker" / "qwen2_5_vl_3b" / "bench.yaml"


@pytest.mark.parametrize("layout", ["parquet", "github"])
def test_mathvision_layouts_and_image_only_items(tmp_path, layout):
    want = make_mathvision(tmp_path, layout)
    recs = load_benchmark("mathvision", tmp_path)
    assert (recs.published, len(recs), [s["id"] for s in recs.skipped]) == (want["published"], want["scored"], ["1004"])
    by = {r.id: r for r in recs}
    assert by["1002"].problem == ("The question is shown in the image.\nOptions:\n(A) 2\n(B) 4\n(C) 6\n(D) 8\n(E) 10")
    assert by["1003"].answer_type == "math" and by["1003"].problem == "The question is shown in the image."
    for r in recs:
        assert Path(r.images[0]).is_absolute() and Path(r.images[0]).is_file()
    with pytest.raises(RecordError, match="id='1004'.*empty answer"):
        load_benchmark("mathvision", tmp_path, on_bad_record="error")


def test_relative_paths_resolve_once_against_the_working_directory(tmp_path, monkeypatch):
    make_all(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name, path in (("mathvista", "data/benchmarks/MathVista"), ("mathvision", "data/benchmarks/MATH-V"),
                       ("mmmu_pro_standard", "data/benchmarks/MMMU_Pro"), ("logicvista", "data/benchmarks/LogicVista")):
        recs = load_benchmark(name, path)
        assert recs and not [s for s in recs.skipped if "image" in s["reason"]], recs.skipped
        for r in recs:
            for p in r.images:
                assert Path(p).is_absolute() and Path(p).is_file() and str(tmp_path.resolve()) in p
                assert p.count("data/benchmarks") == 1  # never resolved a second time


def test_unrecognised_layout_is_one_line_listing_the_recognised(tmp_path):
    (tmp_path / "x.txt").write_text("nothing")
    with pytest.raises(UserError) as e:
        load_benchmark("mathvision", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "HF parquet" in msg and "data/test.jsonl" in msg and "MathLLMs/MathVision" in msg


def test_hub_id_read_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A dataset saved into a temporary HF cache (where `datasets` keeps a downloaded hub dataset:
    ``<cache>/<owner>___<snake_name>/<config>/<version>/<hash>``) is read by its hub id with the network off."""
    import datasets

    make_mathvista(tmp_path / "src")
    cache = tmp_path / "hf_cache"
    datasets.load_dataset("parquet", data_files={"testmini": str(tmp_path / "src" / "data" / "*.parquet")},
                          cache_dir=str(cache))
    (built,) = [p for p in (cache / "parquet").glob("*/*/*") if p.is_dir()]
    dest = cache / "AI4Math___math_vista" / "default" / "0.0.0" / built.name
    shutil.copytree(built, dest)
    for f in dest.glob("parquet-*"):
        f.rename(dest / f.name.replace("parquet-", "math_vista-"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.chdir(tmp_path)  # no folder named like the hub id here
    recs = load_benchmark("mathvista", "AI4Math/MathVista", cache_dir=tmp_path / "imgs")
    assert [r.id for r in recs] == ["1", "2", "3", "4"] and recs.published == 5
    assert all(Path(r.images[0]).is_file() and str(tmp_path / "imgs") in r.images[0] for r in recs)
    assert recs[0].problem.endswith("(A) 30\n(B) 45\n(C) 60\n(D) 90")
    with pytest.raises(UserError, match="'AI4Math/NoSuchSet'.*cannot be loaded"):
        load_benchmark("mathvista", "AI4Math/NoSuchSet")


class RecordingEngine(ScriptedEngine):
    """A scripted policy that also decodes every prompt the callback builds."""

    prompts: dict[str, str]

    def generate(self, model, batch, num_samples, sampling):
        self.prompts = getattr(self, "prompts", {})
        for r, ids, mask in zip(batch["records"], batch["input_ids"], batch["attention_mask"]):
            self.prompts[r["id"]] = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=False)
        return super().generate(model, batch, num_samples, sampling)


def _specs(base: Path) -> list[BenchmarkSpec]:
    b = base / "data" / "benchmarks"
    return [BenchmarkSpec("mathvista", str(b / "MathVista")), BenchmarkSpec("mathvision", str(b / "MATH-V")),
            BenchmarkSpec("mmmu_pro_standard", str(b / "MMMU_Pro")),
            BenchmarkSpec("mmmu_pro_vision", str(b / "MMMU_Pro")),
            BenchmarkSpec("logicvista", str(b / "LogicVista"))]


@pytest.mark.parametrize("style", ["training", "official"])
def test_callback_prompts_list_every_option_and_report_counts(tmp_path, tiny_models, style):
    from tests.test_benchmark_callback import StubPolicy

    want = make_all(tmp_path)
    specs = _specs(tmp_path)
    module = StubPolicy(tiny_models["student"])
    records = {s.name: load_benchmark(s.name, s.path) for s in specs}
    # every item answered untagged with its gold letter/value: strict 0 (no tags), official 1
    plan = {r.id: [f"The answer is {r.answer}."] for rs in records.values() for r in rs}
    engine = RecordingEngine(module.tokenizer, plan)
    cb = BenchmarkCallback(specs, max_new_tokens=64, batch_size=2, out_dir=str(tmp_path / "out"), engine=engine,
                           prompt_style=style)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[cb]).validate(module, verbose=False)
    n_choice = 0
    for rs in records.values():
        for r in rs:
            prompt = engine.prompts[r.id]
            if r.answer_type == "choice" and r.source != "mmmu_pro_vision" and r.choices != list("ABCD"):
                n_choice += 1
                for i, c in enumerate(r.choices):  # every option, with its letter, in order
                    assert re.search(rf"\(?{chr(65 + i)}[.)] {re.escape(c)}", prompt) or r.source == "logicvista", \
                        (r.id, c, prompt.replace("<|image_pad|>", "")[-400:])
                    assert c in prompt
            if style == "training":
                assert "<answer>" in prompt
    assert n_choice >= 5
    if style == "official":
        assert "Answer: $LETTER" in engine.prompts["validation_Accounting_1"]
    rep = json.loads((tmp_path / "out" / "benchmark_report.json").read_text())
    for key, name in (("mathvista", "mathvista"), ("mathvision", "mathvision"), ("mmmu_pro", "mmmu_pro_standard"),
                      ("logicvista", "logicvista")):
        s = rep["benchmarks"][name]
        assert (s["published"], s["scored"], s["skipped"]) == (want[key]["published"], want[key]["scored"],
                                                               want[key]["published"] - want[key]["scored"])
        assert s["accuracy"] == 0.0 and s["official_accuracy"] == 1.0, (name, s)
        assert all("official_accuracy" in g for g in s["per_category"].values())
    preds = [json.loads(x) for x in (tmp_path / "out" / "benchmark_predictions.jsonl").read_text().splitlines()]
    by_id = {p["id"]: p for p in preds}
    assert by_id["validation_Accounting_1"]["prompt"].startswith("Compare image 1 and image 2")
    assert "J. $10" in by_id["validation_Accounting_1"]["prompt"]
    md = (tmp_path / "out" / "benchmark_report.md").read_text()
    assert "| mathvista | 5 | 4 | 1 | 0.0 | 100.0 |" in md and "skipped rows" in md


def test_shipped_bench_config_validates_on_all_four_benchmarks(tmp_path, tiny_models, synth_data, monkeypatch):
    """`vold-pl validate` with configs/openvlthinker/qwen2_5_vl_3b/bench.yaml as shipped (relative paths), the
    model overridden to the tiny one, on fixtures of the four benchmarks at the config's paths."""
    from vold_pl.cli import main

    make_all(tmp_path)
    (tmp_path / "data" / "openvlthinker").mkdir(parents=True)
    shutil.copy(synth_data["val"], tmp_path / "data" / "openvlthinker" / "val.jsonl")
    for p in Path(synth_data["val"]).parent.iterdir():  # the val file's images, at its relative paths
        if p.is_dir():
            shutil.copytree(p, tmp_path / "data" / "openvlthinker" / p.name, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    main(["validate", "--config", str(SHIPPED), "--model.init_args.model.name_or_path", str(tiny_models["student"]),
          "--model.init_args.model.dtype", "float32", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
          "--trainer.callbacks.init_args.max_new_tokens", "4", "--trainer.enable_progress_bar", "false"])
    out = tmp_path / "runs" / "openvlthinker_qwen2_5_vl_3b" / "bench"
    rep = json.loads((out / "benchmark_report.json").read_text())
    assert set(rep["benchmarks"]) == {"mathvista", "mathvision", "mmmu_pro_standard", "mmmu_pro_vision", "logicvista"}
    for name, s in rep["benchmarks"].items():
        assert s["scored"] >= 1 and s["published"] == s["scored"] + s["skipped"], (name, s)
        assert 0.0 <= s["official_accuracy"] <= 1.0


def test_logicvista_empty_row_is_skipped_not_fatal(tmp_path):
    make_logicvista(tmp_path)
    recs = load_benchmark("logicvista", tmp_path)
    assert (recs.published, len(recs), recs.skipped[0]["id"]) == (3, 2, "v1_3")
    assert "question" in recs.skipped[0]["reason"]


def test_mmmu_pro_multi_image_and_vision(tmp_path):
    make_mmmu_pro(tmp_path)
    std = {r.id: r for r in load_benchmark("mmmu_pro_standard", tmp_path)}
    assert len(std["validation_Accounting_1"].images) == 2 and len(std["validation_Art_2"].images) == 1
    (v,) = load_benchmark("mmmu_pro_vision", tmp_path)
    assert v.choices == list("ABCDEFGHIJ") and "$1" not in v.problem


def test_callback_on_bad_record_error_keeps_the_strict_behaviour(tmp_path, tiny_models):
    from tests.test_benchmark_callback import StubPolicy

    make_logicvista(tmp_path / "lv")
    module = StubPolicy(tiny_models["student"])
    cb = BenchmarkCallback([BenchmarkSpec("logicvista", str(tmp_path / "lv"))], out_dir=str(tmp_path / "out"),
                           on_bad_record="error", engine=ScriptedEngine(module.tokenizer, {}))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    with pytest.raises(RecordError, match="id='v1_3'.*field 'question'"):
        trainer.validate(module, verbose=False)
    with pytest.raises(ValueError, match="on_bad_record"):
        BenchmarkCallback([], on_bad_record="ignore")
    with pytest.raises(ValueError, match="prompt_style"):
        BenchmarkCallback([], prompt_style="fancy")
