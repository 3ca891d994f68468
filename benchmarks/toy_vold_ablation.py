"""VOLD's ablation at toy scale, on the quickstart's own stages: does OPD help, and only after a cold start?

Arms, every one scored greedy on the quickstart's held-out test problems (``test.jsonl``):
  (a) cold start                      the quickstart's ``cold_start`` stage
  (b) cold start + GRPO (λ = 0)       its ``grpo_only`` stage
  (c) cold start + GRPO + OPD (VOLD)  its ``vold`` stage
  (d) GRPO + OPD, no cold start       one more RL run with (c)'s settings from the perceiving student
Each seed is one run of :func:`vold_pl.quickstart.run_seed` (its traces and cold start are that seed's own; with
``--pretrain`` its teacher and perception stage too, otherwise every seed starts from the shipped pretrained models)
plus arm d; stages already on disk are reused, so the quickstart's runs count as seeds here.
The hard split is the test problems of difficulty 3 with a numeric answer (no options to guess from: the sparsest
reward), scored from the same predictions.

Paired differences: all arms of a seed are scored on the same problems, so a difference is taken problem by
problem and seed by seed. The first interval is a percentile bootstrap over problems (each drawn problem keeps its
rows of every seed), which covers test-set noise; the second is the t interval of the per-seed mean differences,
which covers training noise. Learning curves (reward, reverse KL to the teacher, ``frac_reward_zero_std``) come
from each RL run's logs. Writes ``<out>/toy_vold_ablation.json`` and, with ``--plot``, a figure.

    python benchmarks/toy_vold_ablation.py --seeds 0 1 2 3 4 --pretrain --plot docs/toy_vold_ablation.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vold_pl.compare import read_run, t_interval  # noqa: E402
from vold_pl.quickstart import BENCH, StageRunner, benchmark_jobs, pretrained_digest, rl_job, run_seed  # noqa: E402

ARMS = {"a": ("cold_start", "(a) cold start"), "b": ("grpo_only", "(b) cold start + GRPO"),
        "c": ("vold", "(c) cold start + GRPO + OPD (VOLD)"), "d": ("no_cold_start", "(d) GRPO + OPD, no cold start")}
PAIRS = [("b", "a"), ("c", "a"), ("c", "b"), ("d", "a")]
CURVES = [("train/reward", "training reward (accuracy + 0.1·format)"),
          ("train/opd/reverse_kl", "reverse KL to the teacher"),
          ("train/frac_reward_zero_std", "frac_reward_zero_std")]
COLORS = {"b": "#4a90d9", "c": "#d94a4a", "d": "#e0a030"}


def run_arm_d(art: Path, runs: Path, seed: int, summary: dict, cores: int | None = None) -> None:
    """GRPO + OPD with the VOLD stage's config, started from the perceiving student instead of the cold start, with
    the teacher the seed's VOLD stage had (``summary``: :func:`run_seed`'s), then its benchmark. Both are stages of
    the seed (:class:`StageRunner`): the seed's arguments, and reuse only for the same command and config."""
    data = art / "data"
    models = summary["pretrained"]
    stages = StageRunner(runs, seed, cores=cores)
    job = rl_job(runs, data, "no_cold_start", "opd_grpo.yaml", Path(models["perception"]), Path(models["teacher"]))
    stages("d GRPO + OPD, no cold start", [job])
    stages("d benchmark", benchmark_jobs(runs, "no_cold_start", job[2].parent, "bench.yaml", data / "test.jsonl",
                                         data))


def correctness(runs: Path, stage: str) -> dict[str, float]:
    """Problem id -> greedy score (1 or 0) of one stage's benchmark on the test problems."""
    return {rid: item["strict"] for rid, item in read_run(runs / "bench" / stage)[BENCH].items()}


def paired(x: np.ndarray, y: np.ndarray, n_boot: int = 5000, seed: int = 0) -> dict:
    """``x``, ``y``: [seeds, problems] scores. Mean difference, bootstrap-over-problems and t-over-seeds 95% CIs."""
    d = x - y  # [S, n]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))  # [n_boot, n]
    boot = d[:, idx].mean(axis=(0, 2))  # [n_boot]: each drawn problem keeps its rows of every seed
    per_seed = d.mean(axis=1)  # [S]
    out = {"delta": float(d.mean()), "bootstrap95": [float(v) for v in np.percentile(boot, [2.5, 97.5])],
           "per_seed": [float(v) for v in per_seed], "rows_differ": float((d != 0).mean())}
    if len(per_seed) > 1:
        out["t95_over_seeds"] = list(t_interval(per_seed))
    return out


def newest_log(run_dir: Path, holding: str | None = None) -> Path | None:
    """A run's newest ``lightning_logs/version_N`` folder (by N; one that holds the file ``holding`` if given), or
    ``None``: a rerun of an arm logs to the next version, and its newest log is the one that made its export."""
    versions = [v for v in (run_dir / "lightning_logs").glob("version_*")
                if v.name[8:].isdigit() and (holding is None or (v / holding).is_file())]
    return max(versions, key=lambda v: int(v.name[8:]), default=None)


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The CURVES metrics of an RL run, by optimizer step, from its newest TensorBoard or CSV log."""
    v = newest_log(run_dir)
    if v is None:
        return {}
    if (v / "metrics.csv").exists():
        import csv

        curves: dict[str, list] = {k: [] for k, _ in CURVES}
        with (v / "metrics.csv").open() as fh:
            for row in csv.DictReader(fh):
                for k in curves:
                    if row.get(k) not in (None, ""):
                        curves[k].append((int(row["step"]), float(row[k])))
        return {k: c for k, c in curves.items() if c}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(v))
    ea.Reload()
    tags = set(ea.Tags().get("scalars", []))
    return {k: [(e.step, e.value) for e in ea.Scalars(k)] for k, _ in CURVES if k in tags}


def rl_settings(run_dir: Path) -> dict:
    """The RL settings an arm's run used (steps, sampling temperature, λ), from the config its newest log saved:
    an arm rerun under other settings shows it in the results."""
    import yaml

    v = newest_log(run_dir, holding="config.yaml")
    if v is None:
        return {}
    cfg = yaml.safe_load((v / "config.yaml").read_text())
    init = cfg["model"]["init_args"]
    return {"max_steps": cfg["trainer"]["max_steps"], "temperature": init["sampling"]["temperature"],
            "lam": init["opd"]["lam"]}


def gather(art: Path, runs_root: Path, seeds: list[int]) -> dict:
    """Scores, paired differences and mean learning curves. An arm missing on some seeds (arm d is one more run
    per seed) is compared over the seeds where it exists; ``arm_seeds`` says which."""
    test = [json.loads(line) for line in (art / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
    splits = {"all": [str(r["id"]) for r in test],
              "hard": [str(r["id"]) for r in test if r.get("difficulty") == 3 and r["answer_type"] == "math"]}
    scored = lambda s, stage: (runs_root / f"seed{s}" / "bench" / stage / "benchmark_report.json").exists()  # noqa: E731
    arm_seeds = {arm: [s for s in seeds if scored(s, stage)] for arm, (stage, _) in ARMS.items()}
    missing = [f"{arm} (seeds {sorted(set(seeds) - set(arm_seeds[arm]))})" for arm in "abc"
               if arm_seeds[arm] != seeds]
    if missing:
        raise SystemExit(f"no benchmark of arm {', '.join(missing)} under {runs_root}: run the quickstart for those "
                         "seeds (python -m vold_pl.quickstart --seeds ...) or drop them from --seeds.")
    scores = {arm: {s: correctness(runs_root / f"seed{s}", stage) for s in arm_seeds[arm]}
              for arm, (stage, _) in ARMS.items()}
    result = {"seeds": seeds, "arm_seeds": arm_seeds, "arms": {k: label for k, (_, label) in ARMS.items()},
              "splits": {}, "curves": {}}

    def mat(arm: str, ids: list[str], over: list[int]) -> np.ndarray:  # [S, n]
        return np.array([[scores[arm][s][i] for i in ids] for s in over])

    for split, ids in splits.items():
        accs = {arm: [float(v) for v in mat(arm, ids, arm_seeds[arm]).mean(axis=1)] for arm in ARMS if arm_seeds[arm]}
        paired_seeds = {(x, y): [s for s in arm_seeds[x] if s in arm_seeds[y]] for x, y in PAIRS}
        result["splits"][split] = {
            "n": len(ids),
            "accuracy": {arm: {"per_seed": a, "mean": statistics.mean(a),
                               "sd": statistics.stdev(a) if len(a) > 1 else 0.0} for arm, a in accs.items()},
            "paired": {f"{x}-{y}": {**paired(mat(x, ids, over), mat(y, ids, over)), "seeds": over}
                       for (x, y), over in paired_seeds.items() if over}}
    result["rl_settings"] = {arm: {str(s): rl_settings(runs_root / f"seed{s}" / ARMS[arm][0]) for s in arm_seeds[arm]}
                             for arm in ("b", "c", "d")}
    for arm in ("b", "c", "d"):
        per_seed = [read_curves(runs_root / f"seed{s}" / ARMS[arm][0]) for s in arm_seeds[arm]]
        result["curves"][arm] = {k: _mean_curve([c.get(k, []) for c in per_seed]) for k, _ in CURVES}
    # Every row of the quickstart's table per seed, the machines the seeds ran on and the shipped models they started
    # from: the reference a later quickstart compares its own table with (quickstart.reference_spread).
    summaries = [json.loads((runs_root / f"seed{s}" / "summary.json").read_text()) for s in seeds]
    result["quickstart_rows"] = {row: [sm["rows"][row]["accuracy"] for sm in summaries] for row in summaries[0]["rows"]}
    result["machines"] = {str(s): sm.get("machine") for s, sm in zip(seeds, summaries)}
    shipped = all(sm.get("pretrained", {}).get("shipped") for sm in summaries)
    result["pretrained_manifest"] = pretrained_digest() if shipped else None
    return result


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean over seeds at every step that all seeds logged."""
    steps = set.intersection(*(set(s for s, _ in c) for c in curves)) if curves and all(curves) else set()
    return [(s, float(np.mean([dict(c)[s] for c in curves]))) for s in sorted(steps)]


def _ci(p: dict, key: str) -> str:
    return f"[{100 * p[key][0]:+.1f}, {100 * p[key][1]:+.1f}]" if key in p else ""


def _seeds_note(res: dict, arm_or_pair_seeds: list[int]) -> str:
    return "" if arm_or_pair_seeds == res["seeds"] else f" (seeds {', '.join(map(str, arm_or_pair_seeds))})"


def print_markdown(res: dict) -> None:
    seeds = res["seeds"]
    for arm, by_seed in res.get("rl_settings", {}).items():
        if not by_seed:  # an arm not run (arm d from the shipped models)
            continue
        kinds = sorted({json.dumps(v, sort_keys=True) for v in by_seed.values()})
        print(f"RL settings of arm {arm}: " + "; ".join(
            f"{k} (seeds {', '.join(s for s, v in by_seed.items() if json.dumps(v, sort_keys=True) == k)})"
            for k in kinds))
    for split, r in res["splits"].items():
        print(f"\n{split} test problems (n = {r['n']}), greedy accuracy over seeds {seeds}\n")
        print("| arm | mean ± sd | per seed |\n|---|---|---|")
        for arm, a in r["accuracy"].items():
            print(f"| {res['arms'][arm]}{_seeds_note(res, res['arm_seeds'][arm])} | {100 * a['mean']:.1f}% ± "
                  f"{100 * a['sd']:.1f} | {', '.join(f'{100 * v:.1f}' for v in a['per_seed'])} |")
        print("\n| difference | Δ (points) | bootstrap 95% | t over seeds 95% | per seed | rows that differ |\n"
              "|---|---|---|---|---|---|")
        for pair, p in r["paired"].items():
            print(f"| {pair.replace('-', ' − ')}{_seeds_note(res, p['seeds'])} | {100 * p['delta']:+.1f} | "
                  f"{_ci(p, 'bootstrap95')} | {_ci(p, 't95_over_seeds')} | "
                  f"{', '.join(f'{100 * v:+.1f}' for v in p['per_seed'])} | {100 * p['rows_differ']:.1f}% |")
    print("\nlearning curves, mean over seeds of the first and the last tenth of the logged steps\n")
    for key, label in CURVES:
        cells = []
        for arm, curves in res["curves"].items():
            c = [v for _, v in curves.get(key, [])]
            k = max(len(c) // 10, 5)
            cells.append(f"{arm}: {np.mean(c[:k]):.3f} → {np.mean(c[-k:]):.3f}" if c else f"{arm}: -")
        print(f"- {label}: " + "; ".join(cells))


def _smooth(values: list[float], window: int = 20) -> np.ndarray:
    """Trailing mean over ``window`` steps (fewer at the start): one step's 8 problems are a noisy reading."""
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    n = np.arange(1, len(values) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def _label(res: dict, arm: str) -> str:
    """The arm's name, with its steps and temperature when they are not those of arm c (VOLD) on every seed, and
    its seeds when it was not run on all of them."""
    settings = res.get("rl_settings", {})

    def kinds(a: str) -> set[str]:
        return {f"{v['max_steps']} steps, T = {v['temperature']}" for v in settings.get(a, {}).values() if v}
    own = kinds(arm)
    label = ARMS[arm][1] if not own or own == kinds("c") else f"{ARMS[arm][1]} [{'; '.join(sorted(own))}]"
    return label + _seeds_note(res, res["arm_seeds"][arm])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for k, split in enumerate(("all", "hard")):
        acc = res["splits"][split]["accuracy"]
        for j, arm in enumerate(ARMS):
            if arm not in acc:
                continue
            vals = [100 * v for v in acc[arm]["per_seed"]]
            axes[0].scatter([j + 0.15 * (k - 0.5)] * len(vals), vals, s=14, color="k" if k == 0 else "#888",
                            label=f"{split} (per seed)" if j == 0 else None)
            axes[0].errorbar(j + 0.15 * (k - 0.5), np.mean(vals), yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0,
                             fmt="_", color="k" if k == 0 else "#888", capsize=6, markersize=18)
    axes[0].set_xticks(range(len(ARMS)), [a for a in ARMS])
    axes[0].set_ylabel("greedy test accuracy (%)")
    axes[0].set_title("arms (a-d), all and hard split")
    axes[0].legend(fontsize=8)
    for ax, (key, label) in zip(axes[1:], CURVES):
        for arm, curves in res["curves"].items():
            pts = curves.get(key, [])
            if pts:
                ax.plot([s for s, _ in pts], _smooth([v for _, v in pts]), color=COLORS[arm], label=_label(res, arm))
        ax.set_title(f"{label} (mean of the last 20 steps)", fontsize=10)
        ax.set_xlabel("RL step")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"toy VOLD ablation, seeds {res['seeds']} (curves: mean over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts", help="tiny models and synthetic data (make artifacts)")
    p.add_argument("--runs", default="runs/quickstart", help="the quickstart's runs folder (one seed<N> per seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="benchmarks/results", help="where toy_vold_ablation.json goes")
    p.add_argument("--plot", default=None, help="write the figure here (e.g. docs/toy_vold_ablation.png)")
    p.add_argument("--no-run", action="store_true", help="only gather what is on disk")
    p.add_argument("--pretrain", action="store_true",
                   help="each seed trains its own teacher and perceiving student (quickstart --pretrain)")
    p.add_argument("--cores", type=int, default=None, help="the thread plan of a machine with this many cores "
                   "(python -m vold_pl.quickstart --cores); default: the cores this process may use")
    a = p.parse_args(argv)
    art, runs = Path(a.artifacts), Path(a.runs)
    if not a.no_run:
        for seed in a.seeds:
            summary = run_seed(art, runs / f"seed{seed}", seed, pretrain=a.pretrain, cores=a.cores)
            run_arm_d(art, runs / f"seed{seed}", seed, summary, a.cores)
    res = gather(art, runs, a.seeds)
    out = Path(a.out) / "toy_vold_ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print_markdown(res)
    if a.plot:
        plot(res, Path(a.plot))
    print(f"\nwrote {out}" + (f" and {a.plot}" if a.plot else ""))


if __name__ == "__main__":
    main()
