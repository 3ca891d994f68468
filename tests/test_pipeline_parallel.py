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
