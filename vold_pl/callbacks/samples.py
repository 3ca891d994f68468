"""A sample of completions in the experiment logger, next to the run's ``completions.jsonl``.

Each logger gets the richest form it supports: a table where the logger has ``log_table`` (Lightning's
``WandbLogger``: a ``wandb.Table`` per logging step), Markdown text where its experiment has ``add_text``
(``TensorBoardLogger``: the TEXT tab), nothing otherwise (CSV: the JSONL file is the record).
"""

from __future__ import annotations

import html
from typing import Any, Iterable, Sequence

COLUMNS = ("step", "id", "answer", "reward", "completion")
MAX_CHARS = 2000  # a completion longer than this is cut in the logger (the JSONL keeps it whole)


def _cell(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_CHARS:
        return value[:MAX_CHARS] + " …"
    return value


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """Rows as a Markdown table; cell text escaped so tags (``<think>``), pipes and newlines show as written."""
    def esc(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return html.escape(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(_cell(r.get(c, ""))) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def log_completions(loggers: Iterable[Any], rows: Sequence[dict], step: int, key: str = "completions",
                    columns: Sequence[str] = COLUMNS) -> list[str]:
    """Send ``rows`` (dicts with ``columns``) to every logger that can show them; returns how each was logged.

    Call on rank 0 only. A logger failure is not allowed to stop training: it is reported and skipped.
    """
    done = []
    if not rows:
        return done
    for lg in loggers:
        try:
            if callable(getattr(lg, "log_table", None)):
                lg.log_table(key=key, columns=list(columns), data=[[_cell(r.get(c)) for c in columns] for r in rows],
                             step=step)
                done.append("table")
                continue
            experiment = getattr(lg, "experiment", None)
            if callable(getattr(experiment, "add_text", None)):
                experiment.add_text(key, markdown_table(rows, columns), global_step=step)
                done.append("text")
        except Exception as e:  # noqa: BLE001 - a logging backend's hiccup must not kill a run
            print(f"[vold-pl] could not log completions to {type(lg).__name__}: {type(e).__name__}: {e}")
    return done
