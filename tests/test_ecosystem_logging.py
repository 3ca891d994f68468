"""Completion samples reach the experiment logger: a table for W&B, text for TensorBoard, nothing for CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vold_pl.callbacks.samples import MAX_CHARS, log_completions

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"step": 3, "id": "a", "answer": "5", "reward": 1.1, "completion": "<think>2+3</think> <answer>5</answer>"},
        {"step": 3, "id": "b", "answer": "7", "reward": 0.0, "completion": "x|y\n" + "z" * (MAX_CHARS + 50)}]


def _tb_texts(log_dir: Path, tag: str = "completions/text_summary") -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    if tag not in acc.Tags().get("tensors", []):
        return []
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


class FakeWandb:
    """Stands in for WandbLogger (no network): records log_table calls."""

    def __init__(self):
        self.tables = []

    def log_table(self, key, columns, data, step=None):
        self.tables.append((key, columns, data, step))


def test_table_for_wandb_text_for_tensorboard_nothing_for_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    wb, tb, csv = FakeWandb(), TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")
    assert log_completions([wb, tb, csv], ROWS, step=3) == ["table", "text"]
    key, columns, data, step = wb.tables[0]
    assert (key, step, columns) == ("completions", 3, ["step", "id", "answer", "reward", "completion"])
    assert data[0] == [3, "a", "5", 1.1, ROWS[0]["completion"]]
    assert data[1][4].endswith(" …") and len(data[1][4]) == MAX_CHARS + 2  # long completions are cut
    tb.experiment.flush()
    [(tb_step, text)] = _tb_texts(Path(tb.log_dir))
    assert tb_step == 3
    assert "&lt;think&gt;2+3&lt;/think&gt; &lt;answer&gt;5&lt;/answer&gt;" in text  # tags shown, not eaten as HTML
    assert "x\\|y<br>zzz" in text and text.count("\n") == 3  # header, rule, two rows: cells stay on one line


def test_opd_grpo_fit_logs_completion_text_to_tensorboard(tiny_models, synth_data, tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDGRPOModule
    from vold_pl.rl.rollout_types import SamplingConfig

    module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), grpo=GRPOConfig(num_generations=2),
                           sampling=SamplingConfig(max_new_tokens=6), export=False, log_completions_every_n_steps=1)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        log_every_n_steps=1)
    trainer.fit(module, datamodule=ReasoningDataModule(train=[DataSource(str(synth_data["train"]))], batch_size=2))
    logger.experiment.flush()
    texts = _tb_texts(Path(logger.log_dir))
    jsonl = [json.loads(line) for line in (Path(logger.log_dir) / "completions.jsonl").read_text().splitlines()]
    assert [s for s, _ in texts] == sorted({r["step"] for r in jsonl}) and len(texts) == 2
    for row in jsonl:  # every JSONL sample is in the TensorBoard table of its step
        step_text = dict(texts)[row["step"]]
        assert f"| {row['step']} | {row['id']} |" in step_text


def test_wandb_example_config_matches_the_logger_signature():
    """The W&B overlay names WandbLogger arguments that exist (parsing it imports wandb; the stacked example
    configs test parses the TensorBoard overlay through the CLI)."""
    import inspect

    from lightning.pytorch.loggers import WandbLogger

    logger = yaml.safe_load((REPO / "configs/examples/logger_wandb.yaml").read_text())["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert set(logger["init_args"]) <= set(inspect.signature(WandbLogger.__init__).parameters)
