"""Progress with rate and ETA: the shared tqdm helper, benchmark row reading, trace writing, the rounds driver."""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vold_pl.progress import format_eta, progress

REPO = Path(__file__).resolve().parents[1]


def test_bar_shows_count_and_rate_on_rank_zero_only(monkeypatch):
    out = io.StringIO()
    assert list(progress(range(5), total=5, desc="work", unit="item", file=out)) == list(range(5))
    text = out.getvalue()
    assert "work" in text and "5/5" in text and ("item/s" in text or "s/item" in text)
    monkeypatch.setenv("RANK", "1")
    quiet = io.StringIO()
    assert list(progress(range(3), total=3, file=quiet)) == [0, 1, 2] and quiet.getvalue() == ""


def test_format_eta():
    assert format_eta(10, 40, 5.0, "prompts") == "2.00 prompts/s, ETA 0m15s"
    assert format_eta(1, 7201, 1.0) == "1.00 it/s, ETA 2h00m"
    assert format_eta(0, 10, 3.0) == "rate unknown"


def test_benchmark_rows_show_progress(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vold_pl.data.benchmarks import _parquet_rows

    f = tmp_path / "part.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), f)
    assert [row["a"] for _, _, row in _parquet_rows([f], ("a",), None)] == [1, 2, 3]
    assert "3/3" in capsys.readouterr().err
    assert len(list(_parquet_rows([f], ("a",), 2))) == 2
    assert "2/2" in capsys.readouterr().err


def test_trace_writer_lines_carry_rate_and_eta(tmp_path, capsys):
    from vold_pl.callbacks.trace_writer import TraceWriter

    tw = TraceWriter(str(tmp_path / "t.jsonl"))
    tw._t0 = time.perf_counter() - 2.0  # two seconds in
    trainer = SimpleNamespace(predict_dataloaders=[SimpleNamespace(dataset=list(range(10)))], world_size=1,
                              global_rank=0)
    tw._progress(trainer, 5)
    line = capsys.readouterr().out
    assert "[vold-pl] traces: 5/10 prompts" in line and "prompts/s, ETA 0m0" in line


def test_rounds_driver_bar_counts_stages(tmp_path, monkeypatch, capsys):
    import vold_pl.rounds as R

    monkeypatch.chdir(REPO)
    ran = []

    def fake_run(args, log, in_process=False):  # each stage "runs" by writing its done marker
        r, stage = ran_next.pop(0)
        ran.append((r, stage))
        m = R.marker(cfg, r, stage)
        m.parent.mkdir(parents=True, exist_ok=True)
        m.write_text("{}")

    init = tmp_path / "init.jsonl"
    init.write_text("")
    cfg = R.RoundsConfig(out_dir=str(tmp_path / "out"), rounds=1, initial_sft_data=str(init))
    ran_next = [(0, s) for s in ("sft", "bench_sft", "grpo", "bench_grpo")]
    monkeypatch.setattr(R, "run", fake_run)
    monkeypatch.setattr(R, "finish_stage", lambda *a: None)
    R.run_rounds(cfg)
    assert len(ran) == 4
    err = capsys.readouterr().err
    assert "rounds" in err and "4/4" in err and "stage" in err
