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


# ---- t quantiles and intervals over seeds ----

def _t_cdf(x: float, df: int) -> float:
    """Student's t CDF at ``x`` by integrating its density (Simpson's rule on [0, x], symmetric about 0)."""
    from math import gamma, pi, sqrt

    c = gamma((df + 1) / 2) / (sqrt(df * pi) * gamma(df / 2))
    ts = np.linspace(0.0, x, 20001)
    f = c * (1 + ts**2 / df) ** (-(df + 1) / 2)
    h = ts[1] - ts[0]
    return 0.5 + float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


@pytest.mark.parametrize("df", [1, 2, 6, 10, 11, 15, 30, 100])
def test_t975_is_the_97_5_percent_quantile_of_student_t(df):
    from vold_pl.compare import t975

    assert _t_cdf(t975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_the_intervals_over_seeds_are_the_t_interval_and_the_prediction_interval():
    from vold_pl.compare import prediction_interval, t_interval

    v = np.array([0.39, 0.41, 0.372, 0.41, 0.388, 0.42, 0.40])  # [7]
    m, sd = v.mean(), v.std(ddof=1)
    assert t_interval(v) == pytest.approx((m - 2.447 * sd / 7**0.5, m + 2.447 * sd / 7**0.5))
    assert prediction_interval(v) == pytest.approx((m - 2.447 * sd * (8 / 7) ** 0.5, m + 2.447 * sd * (8 / 7) ** 0.5))
    assert prediction_interval(np.full(7, 0.9875)) == (0.9875, 0.9875)  # 7 × 0.9875 sum to a mean 1 ulp off
    with pytest.raises(ValueError, match="degree of freedom"):
        t_interval(np.array([0.4]))
