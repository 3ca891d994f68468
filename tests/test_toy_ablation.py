"""The toy ablation's paired statistics (benchmarks/toy_vold_ablation.py) against formulas written out here."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("toy_vold_ablation")


def test_paired_difference_intervals(ablation):
    rng = np.random.default_rng(3)
    x = (rng.random((3, 200)) < 0.6).astype(float)  # [seeds, problems] scores of arm x
    y = (rng.random((3, 200)) < 0.5).astype(float)
    out = ablation.paired(x, y, n_boot=2000, seed=1)
    per_seed = [float(np.mean(x[s]) - np.mean(y[s])) for s in range(3)]
    assert out["per_seed"] == pytest.approx(per_seed)
    assert out["delta"] == pytest.approx(statistics.mean(per_seed))
    assert out["rows_differ"] == pytest.approx(float(np.mean(x != y)))
    # t interval over 3 seeds: mean ± t(0.975, df=2) · sd / sqrt(3), t = 4.303
    half = 4.303 * statistics.stdev(per_seed) / math.sqrt(3)
    assert out["t95_over_seeds"] == pytest.approx([statistics.mean(per_seed) - half, statistics.mean(per_seed) + half])
    # Bootstrap over problems: near the normal interval of the mean of per-problem differences (pooled over seeds,
    # a problem keeps its 3 rows), and centred on the difference.
    by_problem = (x - y).mean(axis=0)  # [problems]
    se = by_problem.std(ddof=1) / math.sqrt(by_problem.size)
    lo, hi = out["bootstrap95"]
    assert lo < out["delta"] < hi
    assert lo == pytest.approx(out["delta"] - 1.96 * se, abs=0.25 * se + 0.005)
    assert hi == pytest.approx(out["delta"] + 1.96 * se, abs=0.25 * se + 0.005)


def test_identical_arms_differ_by_nothing(ablation):
    x = (np.random.default_rng(0).random((2, 50)) < 0.5).astype(float)
    out = ablation.paired(x, x.copy(), n_boot=500)
    assert out["delta"] == 0 and out["bootstrap95"] == [0, 0] and out["t95_over_seeds"] == [0, 0]
    assert out["rows_differ"] == 0


def test_an_arm_reads_its_newest_log(ablation, tmp_path):
    """Curves and settings come from the run's newest ``version_N`` by N (version_10 after version_9), and the
    settings from the newest one that saved a config: a rerun logs to the next version."""
    logs = tmp_path / "lightning_logs"
    for n, steps in ((2, 300), (9, 450), (10, 600)):
        v = logs / f"version_{n}"
        v.mkdir(parents=True)
        (v / "metrics.csv").write_text(f"step,train/reward\n{steps - 1},0.{n}\n")
        (v / "config.yaml").write_text(
            f"trainer: {{max_steps: {steps}}}\nmodel: {{init_args: {{sampling: {{temperature: 0.7}}, opd: {{lam: 0.1}}}}}}\n")
    (logs / "version_11").mkdir()  # a run that stopped before it saved anything
    assert ablation.newest_log(tmp_path).name == "version_11"
    assert ablation.newest_log(tmp_path, holding="config.yaml").name == "version_10"
    assert ablation.rl_settings(tmp_path) == {"max_steps": 600, "temperature": 0.7, "lam": 0.1}
    assert ablation.newest_log(tmp_path / "elsewhere") is None and ablation.rl_settings(tmp_path / "elsewhere") == {}
