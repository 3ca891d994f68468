"""The training bar of a step-bounded run states its step budget, not Lightning's "Epoch 0/-2"."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from vold_pl.callbacks.step_progress import StepProgressBar

pytest.importorskip("rich")


def _descriptions(bar, max_steps: int, max_epochs: int | None = None) -> list[str]:
    trainer = L.Trainer(max_steps=max_steps, max_epochs=max_epochs, callbacks=[bar], logger=False,
                        enable_checkpointing=False, limit_val_batches=0, accelerator="cpu", enable_model_summary=False)
    trainer.fit(BoringModel())
    return [t.description for t in bar.progress.tasks]


def test_the_bar_names_the_step_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert any("Epoch 0/-2" in d for d in _descriptions(RichProgressBar(leave=True), 3))  # what it replaces
    descriptions = _descriptions(StepProgressBar(leave=True), 3)
    assert any(d.strip() == "Epoch 0 · 3 steps" for d in descriptions), descriptions
    assert not any("/-2" in d for d in descriptions)


def test_log_files_get_plain_step_lines(tmp_path, monkeypatch, capsys):
    """Outside a terminal the bar prints ``[vold-pl] step N/M`` lines, which a recipe reads back as progress."""
    from vold_pl.pipeline import last_progress

    monkeypatch.chdir(tmp_path)
    _descriptions(StepProgressBar(leave=True, log_interval_s=0.0), 4)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[vold-pl] step ")]
    assert [ln.split(",")[0] for ln in lines] == [f"[vold-pl] step {k}/4" for k in (1, 2, 3, 4)]
    log = tmp_path / "stage.log"
    log.write_text("Loading weights: 25/25\n" + "\n".join(lines) + "\n")
    assert last_progress(log) == "4/4" and last_progress(tmp_path / "missing.log") == "running"
