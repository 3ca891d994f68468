"""Benchmark reports: pure functions from aggregated counts to files a person (or a script) reads.

Files written into one folder (the run's log directory by default):

- ``benchmark_report.json``: the latest evaluation (per benchmark: accuracy, n, pass@k, per-category and
  per-answer-type accuracy, mean completion length, format-valid fraction; model, checkpoint, step) plus a
  ``history`` of every evaluation so far, read back and appended to on each call;
- ``benchmark_report.md``: the same as tables;
- ``benchmark_report.png``: accuracy per benchmark (numbers printed on the bars) and, once the history spans
  more than one step, accuracy over steps;
- ``benchmark_predictions.jsonl``: one line per sampled completion of the latest evaluation (benchmark, id,
  prompt, completion, extracted answer, gold, score, correct) for error analysis.

Every file is written to a temporary name and renamed, so a crash never leaves a half-written report.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable

from vold_pl.checkpointing import atomic_write_bytes

# Columns of the per-group count matrix the evaluator reduces across ranks (all plain sums, so exact).
STATS = ("records", "samples", "score", "solved", "format_valid", "tokens", "official")
REPORT_JSON, REPORT_MD, REPORT_PNG = "benchmark_report.json", "benchmark_report.md", "benchmark_report.png"
PREDICTIONS_JSONL = "benchmark_predictions.jsonl"
NO_CATEGORY = "(none)"


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def group_stats(row: Iterable[float], pass_k: int) -> dict[str, Any]:
    """``{n, accuracy, official_accuracy[, pass@k]}`` of one count row (see :data:`STATS`); ``accuracy`` is the
    strict (training reward) scoring, ``official_accuracy`` the benchmark's own rules."""
    c = dict(zip(STATS, row))
    out: dict[str, Any] = {"n": int(c["records"]), "accuracy": _ratio(c["score"], c["samples"]),
                           "official_accuracy": _ratio(c.get("official", 0.0), c["samples"])}
    if pass_k > 1:
        out[f"pass@{pass_k}"] = _ratio(c["solved"], c["records"])
    return out


def summarize(groups: list[tuple[str, str]], counts: list[list[float]], pass_k: int = 1) -> dict[str, Any]:
    """One benchmark's summary from its count matrix.

    ``groups[i]`` is ``("all", "")``, ``("category", key)`` or ``("answer_type", key)`` and ``counts[i]`` its
    row of :data:`STATS` sums over every rank. ``accuracy`` is the mean score over all samples (pass@1);
    ``pass@k`` the fraction of records with at least one fully correct sample among ``k``.
    """
    rows = dict(zip(groups, counts))
    total = dict(zip(STATS, rows[("all", "")]))
    out = group_stats(rows[("all", "")], pass_k)
    out.update(
        n_samples=int(total["samples"]),
        format_valid=_ratio(total["format_valid"], total["samples"]),
        mean_completion_tokens=_ratio(total["tokens"], total["samples"]),
        per_category={k: group_stats(r, pass_k) for (kind, k), r in rows.items() if kind == "category"},
        per_answer_type={k: group_stats(r, pass_k) for (kind, k), r in rows.items() if kind == "answer_type"},
    )
    return out


# ------------------------------------------------------------------------------------------------- writing
def read_history(out_dir: str | Path) -> list[dict]:
    """The ``history`` of an earlier ``benchmark_report.json`` in ``out_dir`` ([] if none or unreadable)."""
    path = Path(out_dir) / REPORT_JSON
    try:
        return list(json.loads(path.read_text()).get("history") or [])
    except (OSError, ValueError, AttributeError):
        return []


def history_entries(report: dict) -> list[dict]:
    """One history point per benchmark of ``report``: step, benchmark, accuracy (and pass@k)."""
    out = []
    for name, s in report["benchmarks"].items():
        point = {"step": report.get("step"), "benchmark": name, "accuracy": s["accuracy"], "n": s["n"]}
        if "official_accuracy" in s:
            point["official_accuracy"] = s["official_accuracy"]
        point.update({k: v for k, v in s.items() if k.startswith("pass@")})
        out.append(point)
    return out


def merge_history(old: list[dict], new: list[dict]) -> list[dict]:
    """``old + new``, where a new point replaces an old one of the same (step, benchmark)."""
    keys = {(p.get("step"), p.get("benchmark")) for p in new}
    return [p for p in old if (p.get("step"), p.get("benchmark")) not in keys] + new


def write_reports(out_dir: str | Path, report: dict, predictions: list[dict] | None = None) -> dict[str, Path]:
    """Write the JSON, Markdown and PNG reports (and the predictions JSONL when given); returns their paths.

    ``report``: ``{model, checkpoint, step, stage, decoding, benchmarks: {name: summarize(...)}}``; the
    history of an earlier report in ``out_dir`` is carried over and extended.
    """
    out = Path(out_dir)
    report = dict(report, history=merge_history(read_history(out), history_entries(report)))
    paths = {"json": out / REPORT_JSON, "md": out / REPORT_MD, "png": out / REPORT_PNG}
    atomic_write_bytes(paths["json"], (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    atomic_write_bytes(paths["md"], render_markdown(report).encode())
    png, _ = render_png(report)
    atomic_write_bytes(paths["png"], png)
    if predictions is not None:
        paths["predictions"] = out / PREDICTIONS_JSONL
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        atomic_write_bytes(paths["predictions"], lines.encode())
    return paths


# ----------------------------------------------------------------------------------------------- rendering
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _passk_key(report: dict) -> str | None:
    k = (report.get("decoding") or {}).get("pass_k", 1)
    return f"pass@{k}" if k and k > 1 else None


def render_markdown(report: dict) -> str:
    """Tables of the report (percentages with one decimal) for a person to read."""
    pk = _passk_key(report)
    dec = report.get("decoding") or {}
    lines = [
        "# Benchmark report", "",
        f"- model: `{report.get('model')}`", f"- checkpoint: `{report.get('checkpoint')}`",
        f"- step: {report.get('step')} ({report.get('stage')})",
        "- decoding: " + ", ".join(f"{k}={v}" for k, v in dec.items()), "",
        "Strict: the training reward (answer tags required). Official: the benchmark's own rule-based scorer "
        "(docs/benchmarks.md).", "",
        "| benchmark | published | scored | skipped | strict (%) | official (%) |" + (f" {pk} (%) |" if pk else "")
        + " format valid (%) | mean tokens |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if pk else "") + "---:|---:|",
    ]
    for name, s in report["benchmarks"].items():
        lines.append(f"| {name} | {s.get('published', s['n'])} | {s.get('scored', s['n'])} | {s.get('skipped', 0)} | "
                     f"{_pct(s['accuracy'])} | {_pct(s.get('official_accuracy', 0.0))} |"
                     + (f" {_pct(s[pk])} |" if pk else "")
                     + f" {_pct(s['format_valid'])} | {s['mean_completion_tokens']:.1f} |")
    for name, s in report["benchmarks"].items():
        for title, key in (("category", "per_category"), ("answer type", "per_answer_type")):
            if not s.get(key):
                continue
            lines += ["", f"## {name}: per {title}", "",
                      f"| {title} | n | strict (%) | official (%) |" + (f" {pk} (%) |" if pk else ""),
                      "|---|---:|---:|---:|" + ("---:|" if pk else "")]
            for k, g in s[key].items():
                lines.append(f"| {k} | {g['n']} | {_pct(g['accuracy'])} | {_pct(g.get('official_accuracy', 0.0))} |"
                             + (f" {_pct(g[pk])} |" if pk else ""))
        if s.get("skipped_records"):
            lines += ["", f"## {name}: skipped rows ({len(s['skipped_records'])})", ""]
            lines += [f"- `{r['id']}`: {r['reason']}" for r in s["skipped_records"][:50]]
            if len(s["skipped_records"]) > 50:
                lines.append(f"- ... {len(s['skipped_records']) - 50} more in benchmark_report.json")
    steps = sorted({p.get("step") for p in report.get("history", []) if p.get("step") is not None})
    if len(steps) > 1:
        names = list(dict.fromkeys(p["benchmark"] for p in report["history"]))
        acc = {(p.get("step"), p["benchmark"]): p["accuracy"] for p in report["history"]}
        lines += ["", "## accuracy (%) over steps", "", "| step | " + " | ".join(names) + " |",
                  "|---:|" + "---:|" * len(names)]
        for st in steps:
            cells = [_pct(acc[(st, n)]) if (st, n) in acc else "" for n in names]
            lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_labels(report: dict) -> list[str]:
    """The numbers printed on the accuracy bars, in drawing order (strict accuracy, official accuracy when the
    report has it, then pass@k, per benchmark)."""
    keys = _bar_keys(report)
    return [f"{report['benchmarks'][n][k]:.3f}" for k in keys for n in report["benchmarks"]]


def _bar_keys(report: dict) -> list[str]:
    pk = _passk_key(report)
    official = all("official_accuracy" in s for s in report["benchmarks"].values())
    return ["accuracy"] + (["official_accuracy"] if official else []) + ([pk] if pk else [])


def render_png(report: dict) -> tuple[bytes, list[str]]:
    """PNG bytes of the plot and the bar labels drawn on it (they equal :func:`bar_labels`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; keeps an interactive backend if one is already active
    import matplotlib.pyplot as plt

    names = list(report["benchmarks"])
    history = report.get("history") or []
    steps = sorted({p.get("step") for p in history if p.get("step") is not None})
    panels = 2 if len(steps) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 + 1.2 * len(names) + 5 * (panels - 1), 4.2), squeeze=False)
    ax = axes[0][0]
    keys = _bar_keys(report)
    width = 0.8 / len(keys)
    drawn: list[str] = []
    for j, key in enumerate(keys):
        vals = [report["benchmarks"][n][key] for n in names]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, vals, width=width, label={"accuracy": "strict"}.get(key, key.replace("_accuracy", "")))
        for b, v in zip(bars, vals):
            text = f"{v:.3f}"
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, text, ha="center", va="bottom", fontsize=9)
            drawn.append(text)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={report['benchmarks'][n]['n']})" for n in names])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"step {report.get('step')}: {str(report.get('model'))[-60:]}", fontsize=10)
    if len(keys) > 1:
        ax.legend(loc="upper right", fontsize=8)
    if panels == 2:
        ax2 = axes[0][1]
        for n in dict.fromkeys(p["benchmark"] for p in history):
            pts = sorted((p["step"], p["accuracy"]) for p in history
                         if p["benchmark"] == n and p.get("step") is not None)
            ax2.plot([s for s, _ in pts], [a for _, a in pts], marker="o", label=n)
        ax2.set_xlabel("step")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1.05)
        ax2.set_title("accuracy over steps", fontsize=10)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue(), drawn
