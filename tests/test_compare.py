"""``vold-pl-compare``: two runs' real benchmark reports -> the side-by-side table with paired bootstrap intervals."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest

from tests.benchmark_fixtures import make_all
from vold_pl.callbacks.benchmark import BenchmarkCallback, BenchmarkSpec
from vold_pl.compare import main
from vold_pl.data.benchmarks import load_benchmark
from tests.scripted_engine import ScriptedEngine


def _run(tmp_path, module, specs, answer, out, limit=None):
    plan = {}
    for s in specs:
        for i, r in enumerate(load_benchmark(s.name, s.path)):
            plan[r.id] = [answer(i, r)]
    specs = [BenchmarkSpec(s.name, s.path, limit=limit) for s in specs]
    cb = BenchmarkCallback(specs, max_new_tokens=64, batch_size=4, out_dir=str(out),
                           engine=ScriptedEngine(module.tokenizer, plan))
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[cb]).validate(module, verbose=False)


def test_side_by_side_table_from_two_reports(tmp_path, tiny_models):
    from tests.test_benchmark_callback import StubPolicy

    make_all(tmp_path)
    b = tmp_path / "data" / "benchmarks"
    specs = [BenchmarkSpec("mathvista", str(b / "MathVista")), BenchmarkSpec("mmmu_pro_standard", str(b / "MMMU_Pro")),
             BenchmarkSpec("logicvista", str(b / "LogicVista"))]
    module = StubPolicy(tiny_models["student"])
    # base: untagged, right on even items only; tuned: tagged and always right, but only the first 3 items of each
    _run(tmp_path, module, specs, lambda i, r: f"The answer is {r.answer if i % 2 == 0 else 'Z'}.", tmp_path / "base")
    _run(tmp_path, module, specs, lambda i, r: f"<think> ok </think><answer> {r.answer} </answer>",
         tmp_path / "tuned", limit=3)
    out = tmp_path / "cmp"
    main([f"base={tmp_path / 'base'}", f"tuned={tmp_path / 'tuned'}", "--out", str(out), "--seed", "3"])
    cmp = json.loads((out / "compare.json").read_text())
    row = next(r for r in cmp["rows"] if r["benchmark"] == "mathvista" and r["category"] == "(all)")
    # independent count from the plans: base official right on items 0, 2 of 4 (strict never: no tags)
    assert row["models"]["base"] == {"n": 4, "strict": 0.0, "official": 0.5}
    assert row["models"]["tuned"] == {"n": 3, "strict": 1.0, "official": 1.0}
    d = row["diffs"]["tuned"]
    assert d["n_shared"] == 3  # only the items both runs scored
    assert d["official"]["diff"] == pytest.approx(1 - 2 / 3) and d["strict"]["diff"] == 1.0
    lo, hi = d["official"]["ci95"]
    assert 0.0 <= lo <= d["official"]["diff"] <= hi <= 1.0 and lo < hi
    assert d["strict"]["ci95"] == [1.0, 1.0]  # every shared item improves by exactly 1
    assert any(r["category"] != "(all)" for r in cmp["rows"])  # per-category rows (MathVista has two tasks)
    md = (out / "compare.md").read_text()
    assert "| mathvista | (all) | 0.0 / 50.0 (n=4) | 100.0 / 100.0 (n=3) |" in md
    from PIL import Image

    with Image.open(out / "compare.png") as im:
        im.verify()
    # seeded: the same inputs give the same table; another seed moves only the intervals
    main([f"base={tmp_path / 'base'}", f"tuned={tmp_path / 'tuned'}", "--out", str(tmp_path / "again"), "--seed", "3"])
    assert (tmp_path / "again" / "compare.json").read_text() == (out / "compare.json").read_text()


def test_paired_bootstrap_interval_matches_an_independent_resampling():
    from vold_pl.compare import paired_bootstrap

    a = np.array([0, 1, 0, 1, 1, 0, 0, 1.0])
    b = np.array([1, 1, 0, 1, 1, 1, 0, 0.0])
    lo, hi = paired_bootstrap(a, b, 4000, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    draws = [float(np.mean([b[j] - a[j] for j in rng.integers(0, 8, size=8)])) for _ in range(4000)]
    assert (lo, hi) == pytest.approx((np.quantile(draws, 0.025), np.quantile(draws, 0.975)))


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"a={tmp_path}", f"b={tmp_path}", "--out", str(tmp_path / "o")])
    assert "benchmark_report.json" in capsys.readouterr().err
