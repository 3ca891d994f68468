"""Export folders carry a model card; PushToHub uploads them (against a stand-in for huggingface_hub.HfApi)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vold_pl.errors import UserError
from vold_pl.export import PushToHub, card_facts, render_model_card


class FakeHfApi:
    """Records calls and copies the uploaded folder to a local 'hub' folder; never touches the network."""

    hub: Path
    calls: list = []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))

    def upload_folder(self, repo_id, folder_path, repo_type=None, revision=None, commit_message=None):
        FakeHfApi.calls.append(("upload_folder", repo_id, revision, commit_message))
        shutil.copytree(folder_path, FakeHfApi.hub / repo_id, dirs_exist_ok=True)
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


def test_sft_fit_export_has_card_with_benchmarks_and_is_pushed(tiny_models, synth_data, tmp_path, monkeypatch,
                                                               one_thread):
    import huggingface_hub
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from transformers import AutoModelForImageTextToText

    from vold_pl.callbacks.benchmark import BenchmarkCallback, BenchmarkSpec
    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.sft import SFTModule

    FakeHfApi.hub, FakeHfApi.calls = tmp_path / "hub", []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    export = tmp_path / "export"
    module = SFTModule(ModelSpec(str(tiny_models["student"])), export_dir=str(export))
    bench = BenchmarkCallback([BenchmarkSpec("synthetic", str(synth_data["test"]), limit=2)], max_new_tokens=4,
                              batch_size=2, on_validate=False)
    push = PushToHub("me/tiny-vold", private=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[bench, push], limit_val_batches=0)
    dm = ReasoningDataModule(train=[DataSource(str(synth_data["train_text"]), 1.0)], batch_size=2)
    trainer.fit(module, datamodule=dm)

    card = (export / "README.md").read_text()
    assert f"- **Base model:** `{tiny_models['student']}`" in card
    assert "base_model:" not in card  # a local folder is not a Hub id: no Hub metadata pointing nowhere
    assert "`SFTModule`" in card and "- **Optimizer steps:** 2" in card
    assert f"| `{synth_data['train_text']}` | 1 |" in card
    acc = bench.last_report["benchmarks"]["synthetic"]["accuracy"]
    assert f"| synthetic | 2 | {100 * acc:.1f}% |" in card
    assert "pipeline_tag: image-text-to-text" in card
    # Pushed: the repo is created private, and the whole folder (card included) is uploaded.
    assert FakeHfApi.calls[0] == ("create_repo", "me/tiny-vold", True, True, "model")
    assert FakeHfApi.calls[1][:2] == ("upload_folder", "me/tiny-vold")
    pushed = FakeHfApi.hub / "me/tiny-vold"
    assert (pushed / "README.md").read_text() == card and (pushed / "model.safetensors").is_file()
    assert push.pushed == "https://hub.invalid/me/tiny-vold/commit/1"
    assert AutoModelForImageTextToText.from_pretrained(pushed).config.vision_config is not None


def test_card_metadata_names_a_hub_base_model():
    facts = {"base_model": "Qwen/Qwen2.5-VL-3B-Instruct", "base_revision": "abc123", "recipe": "OPDGRPOModule",
             "hyperparameters": {"opd": {"lam": 1.0}, "rewards": {"accuracy": 1.0}}, "data": [],
             "benchmarks": {}, "global_step": None, "lora": None, "versions": {"torch": "2"}, "created": "now"}
    card = render_model_card(facts, is_vision=True)
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model: Qwen/Qwen2.5-VL-3B-Instruct" in card and "revision `abc123`" in card
    assert "lam: 1.0" in card and "No benchmark ran" in card and "on-policy distillation" in card


def test_push_is_refused_offline_and_for_bad_repo_ids(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="repo_id must be a Hub repository id"):
        PushToHub("not a repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set.*huggingface-cli upload me/x"):
        PushToHub("me/x").push(tmp_path)


def test_card_facts_without_a_trainer():
    class M:
        hparams = {"optim": {"lr": 0.1}}
        model_spec = type("S", (), {"name_or_path": "org/base", "revision": None})()

    facts = card_facts(M())
    assert facts["base_model"] == "org/base" and facts["data"] == [] and facts["benchmarks"] == {}
    assert json.loads(json.dumps(facts))["hyperparameters"] == {"optim": {"lr": 0.1}}
