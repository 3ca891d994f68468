"""Several runs' benchmark reports side by side: the paper-style table of benchmarks x models.

    vold-pl-compare base=runs/base/bench grpo=runs/grpo/bench vold=runs/vold/bench --out runs/compare
    (or: python -m vold_pl.compare ...)

Each run is ``[label=]<folder>``: a folder holding the ``benchmark_report.json`` and ``benchmark_predictions.jsonl``
that :class:`~vold_pl.callbacks.benchmark.BenchmarkCallback` writes. For every benchmark (and every category of it)
the table shows each model's ``strict`` and ``official`` accuracy (percent, over that model's items) and, for every
model after the first (the baseline), the difference to the baseline with a paired bootstrap 95% interval computed
on the items both runs scored (resampling items with a seeded generator, so the same inputs give the same table).
Writes ``compare.md``, ``compare.json`` and ``compare.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from vold_pl.callbacks.report import PREDICTIONS_JSONL, REPORT_JSON
from vold_pl.checkpointing import atomic_write_bytes
from vold_pl.errors import UserError, UserFileNotFoundError

SCORINGS = ("strict", "official")
ALL = "(all)"


def read_run(folder: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{benchmark: {item id: {"category", "strict", "official"}}}`` of one run; scores are the mean over the
    item's samples (pass@1)."""
    folder = Path(folder)
    preds = folder / PREDICTIONS_JSONL
    if not (folder / REPORT_JSON).is_file() or not preds.is_file():
        raise UserFileNotFoundError(f"{folder}: expected {REPORT_JSON} and {PREDICTIONS_JSONL} there (written by the "
                                    "benchmark callback with write_predictions: true).")
    acc: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for n, line in enumerate(preds.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
            bench, rid = p["benchmark"], str(p["id"])
            strict, official = float(p["score"]), float(p.get("official_score", 0.0))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{preds}:{n}: not a benchmark prediction ({type(e).__name__}: {e}).") from None
        item = acc[bench].setdefault(rid, {"category": p.get("category") or "(none)", "strict": [], "official": []})
        item["strict"].append(strict)
        item["official"].append(official)
    return {b: {i: {"category": v["category"], "strict": float(np.mean(v["strict"])),
                    "official": float(np.mean(v["official"]))} for i, v in items.items()} for b, items in acc.items()}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of ``mean(b - a)`` over items resampled with replacement (``a``, ``b``: [n])."""
    d = b - a  # [n]
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))  # [n_boot, n]
    means = d[idx].mean(axis=1)  # [n_boot]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_mean_ci(scores: np.ndarray, n_boot: int = 5000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``mean(scores)`` over items resampled with replacement (``scores``: [n])."""
    return paired_bootstrap(np.zeros_like(scores, dtype=float), np.asarray(scores, dtype=float), n_boot,
                            np.random.default_rng(seed))


# Student's t quantile 0.975 for 1..10 degrees of freedom; above 10, t975 expands about the normal quantile.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
_Z975 = 1.959964


def t975(df: int) -> float:
    """Student's t 0.975 quantile (two-sided 95%) with ``df`` >= 1 degrees of freedom: a table up to 10, the
    Cornish-Fisher expansion about the normal quantile above (within 0.001 of the exact value there)."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom (2 values), got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """95% t interval of the mean of ``values`` ([n], n >= 2): mean ± t(0.975, n − 1) · sd / √n."""
    v = np.asarray(values, dtype=float)  # [n]
    half = t975(len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def prediction_interval(values: np.ndarray) -> tuple[float, float]:
    """95% prediction interval for one more draw of what gave ``values`` ([n], n >= 2; normal draws):
    mean ± t(0.975, n − 1) · sd · √(1 + 1/n). Unlike the lowest-highest of n draws, which holds a new one with
    probability (n − 1)/(n + 1) only (6/8 for 7 seeds), it holds a new draw 95% of the time."""
    v = np.asarray(values, dtype=float)  # [n]
    if np.ptp(v) == 0:  # draws that all agree predict that value (their float mean and sd need not be exact)
        return float(v[0]), float(v[0])
    half = t975(len(v) - 1) * v.std(ddof=1) * np.sqrt(1 + 1 / len(v))
    return float(v.mean() - half), float(v.mean() + half)


def compare(runs: dict[str, dict], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The comparison of ``runs`` (label -> :func:`read_run`), the first being the baseline."""
    labels = list(runs)
    rng = np.random.default_rng(seed)
    benches = list(dict.fromkeys(b for r in runs.values() for b in r))
    rows = []
    for bench in benches:
        cats = sorted({it["category"] for r in runs.values() for it in r.get(bench, {}).values()})
        for cat in [ALL] + (cats if len(cats) > 1 else []):
            def items(label, bench=bench, cat=cat):
                got = runs[label].get(bench, {})
                return {i: v for i, v in got.items() if cat == ALL or v["category"] == cat}

            row: dict[str, Any] = {"benchmark": bench, "category": cat, "models": {}, "diffs": {}}
            for label in labels:
                its = items(label)
                row["models"][label] = {"n": len(its), **{s: (float(np.mean([v[s] for v in its.values()]))
                                                              if its else None) for s in SCORINGS}}
            base = items(labels[0])
            for label in labels[1:]:
                other = items(label)
                shared = sorted(set(base) & set(other))
                diff: dict[str, Any] = {"n_shared": len(shared)}
                for s in SCORINGS:
                    if not shared:
                        diff[s] = None
                        continue
                    a = np.array([base[i][s] for i in shared])
                    b = np.array([other[i][s] for i in shared])
                    lo, hi = paired_bootstrap(a, b, n_boot, rng)
                    diff[s] = {"diff": float((b - a).mean()), "ci95": [lo, hi]}
                row["diffs"][label] = diff
            rows.append(row)
    return {"models": labels, "baseline": labels[0], "n_boot": n_boot, "seed": seed, "rows": rows}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(cmp: dict) -> str:
    """One table: a row per benchmark (and category), per model ``strict / official`` accuracy, then each model's
    difference to the baseline with its paired bootstrap 95% interval (percentage points, shared items)."""
    labels, base = cmp["models"], cmp["baseline"]
    head = ["benchmark", "category"] + [f"{m} strict / official (%)" for m in labels]
    head += [f"{m} - {base} strict (pp) [95% CI]" for m in labels[1:]]
    head += [f"{m} - {base} official (pp) [95% CI]" for m in labels[1:]]
    lines = ["# Benchmarks side by side", "",
             f"Accuracy in percent (strict: training reward, tags required; official: each benchmark's own rules). "
             f"Differences to `{base}` on the items both runs scored, paired bootstrap ({cmp['n_boot']} resamples, "
             f"seed {cmp['seed']}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in cmp["rows"]:
        cells = [row["benchmark"], row["category"]]
        cells += [f"{_pct(row['models'][m]['strict'])} / {_pct(row['models'][m]['official'])} "
                  f"(n={row['models'][m]['n']})" for m in labels]
        for s in ("strict", "official"):
            for m in labels[1:]:
                d = row["diffs"][m].get(s)
                cells.append("-" if d is None else f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, "
                             f"{100 * d['ci95'][1]:+.1f}] (n={row['diffs'][m]['n_shared']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_png(cmp: dict) -> bytes:
    """Grouped bars: per benchmark (all items), each model's strict and official accuracy."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in cmp["rows"] if r["category"] == ALL]
    labels = cmp["models"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows) * 2, 4.2), squeeze=False)
    width = 0.8 / len(labels)
    for ax, s in zip(axes[0], SCORINGS):
        for j, m in enumerate(labels):
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(rows))]
            vals = [r["models"][m][s] or 0.0 for r in rows]
            bars = ax.bar(xs, vals, width=width, label=m)
            for bar, v in zip(bars, vals):
                ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{100 * v:.1f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(rows)), [r["benchmark"] for r in rows], fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{s} accuracy", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_comparison(cmp: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    paths = {"md": out / "compare.md", "json": out / "compare.json", "png": out / "compare.png"}
    atomic_write_bytes(paths["json"], (json.dumps(cmp, indent=2) + "\n").encode())
    atomic_write_bytes(paths["md"], render_markdown(cmp).encode())
    atomic_write_bytes(paths["png"], render_png(cmp))
    return paths


def _parse_runs(specs: list[str]) -> dict[str, str]:
    runs: dict[str, str] = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        label, folder = (label, folder) if sep else (Path(spec).name or spec, spec)
        if label in runs:
            raise UserError(f"run label {label!r} given twice; name runs as label=folder")
        runs[label] = folder
    if len(runs) < 2:
        raise UserError("give at least two runs to compare (the first is the baseline)")
    return runs


def main(argv: list[str] | None = None) -> None:
    """``vold-pl-compare [label=]folder ... --out DIR [--bootstrap N] [--seed S]``."""
    ap = argparse.ArgumentParser(prog="vold-pl-compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="[label=]folder with benchmark_report.json + predictions; first = baseline")
    ap.add_argument("--out", required=True, help="folder for compare.md, compare.json and compare.png")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap generator (default 0)")
    a = ap.parse_args(argv)
    try:
        if a.bootstrap < 1:
            raise UserError(f"--bootstrap must be >= 1, got {a.bootstrap}")
        runs = {label: read_run(folder) for label, folder in _parse_runs(a.runs).items()}
        paths = write_comparison(compare(runs, a.bootstrap, a.seed), a.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"[vold-pl] comparison: {paths['md']}")


if __name__ == "__main__":
    main()
