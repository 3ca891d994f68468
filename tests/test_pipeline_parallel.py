"""Stages that run side by side: each gets its own log and a share of the cores; one that fails stops the recipe
with the last lines of its own log, after the others have finished."""

from __future__ import annotations

import pytest

from vold_pl.pipeline import run_parallel


def test_side_by_side_logs_and_failure(tmp_path):
    ok, bad = tmp_path / "ok.log", tmp_path / "bad.log"
    seconds = run_parallel([(["--help"], ok), (["--help"], tmp_path / "ok2.log")])
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert "fit" in ok.read_text() and "validate" in ok.read_text()  # each command's own output, in its own log
    with pytest.raises(SystemExit) as e:
        run_parallel([(["--help"], ok), (["fit", "--config", str(tmp_path / "missing.yaml")], bad)])
    msg = str(e.value)
    assert "stage failed" in msg and str(bad) in msg and "missing.yaml" in msg
    assert "fit" in ok.read_text()  # the other command ran to its end


def test_the_thread_plan_follows_the_cores_asked_for(tmp_path, monkeypatch):
    """``cores`` fixes each command's threads as on a machine with that many cores: ``cores // width`` for commands
    side by side, all of them for a lone one; without it a lone command keeps the CLI's own choice."""
    import sys

    from vold_pl import pipeline
    from vold_pl.startup import THREADS_ENV

    monkeypatch.delenv(THREADS_ENV, raising=False)
    show = f"import os; print('threads', os.environ.get('{THREADS_ENV}'), os.environ.get('OMP_NUM_THREADS'))"
    monkeypatch.setattr(pipeline, "_cli_command", lambda args: [sys.executable, "-c", show])

    def threads(jobs: int, cores: int | None) -> list[str]:
        logs = [tmp_path / f"{jobs}_{cores}_{i}.log" for i in range(jobs)]
        run_parallel([([], log) for log in logs], cores=cores)
        return [log.read_text().split("threads ", 1)[1].strip() for log in logs]

    assert threads(2, 4) == ["2 2", "2 2"]
    assert threads(3, 2) == ["1 1"] * 3  # two at a time, one thread each
    assert threads(2, 3) == ["1 1", "1 1"]
    assert threads(1, 3) == ["3 3"]
    assert threads(1, None)[0].split()[0] == "None"  # the CLI decides
