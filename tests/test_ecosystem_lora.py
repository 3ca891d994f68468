"""LoRA through peft: adapters train, export merged or as an adapter and reload; the k3 reference is the base
weights with the adapters off (no second model)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from vold_pl.errors import UserError

peft = pytest.importorskip("peft")

from vold_pl.models.factory import ModelSpec  # noqa: E402
from vold_pl.models.lora import LoRAConfig, adapters_off, apply_lora, target_module_names  # noqa: E402


def _trainer(tmp_path: Path, max_steps: int):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(str(tmp_path), name="lora"),
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, log_every_n_steps=1, limit_val_batches=0)


def _dm(path: Path, batch_size: int = 2):
    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource

    return ReasoningDataModule(train=[DataSource(str(path))], batch_size=batch_size)


def _base(tiny_models):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_models["student"]).eval()


IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 250]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def test_targets_skip_the_vision_tower_unless_asked(tiny_models):
    base = _base(tiny_models)
    frozen = target_module_names(base, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert frozen and all(n.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj") for n in frozen)
    assert not any("visual" in n for n in frozen)
    with_vision = target_module_names(base, LoRAConfig(r=4, target_modules=["q_proj", "down_proj"], vision="lora"))
    assert any("visual" in n for n in with_vision) and set(frozen) - {n for n in frozen if "v_proj" in n} <= set(
        with_vision)
    all_linear = target_module_names(base, LoRAConfig(r=4, target_modules=["all-linear"]))
    assert "lm_head" not in all_linear and len(all_linear) > len(frozen)
    with pytest.raises(UserError, match="match no linear layer.*q_proj"):
        apply_lora(base, LoRAConfig(r=4, target_modules=["nope_proj"]))
    model = apply_lora(base, LoRAConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_sft_lora_trains_exports_and_reloads(export, tiny_models, synth_data, tmp_path, one_thread):
    from transformers import AutoModelForImageTextToText

    from vold_pl.modules.base import OptimConfig
    from vold_pl.modules.sft import SFTModule

    spec = ModelSpec(str(tiny_models["student"]), lora=LoRAConfig(r=4, alpha=8, export=export))
    out = tmp_path / "export"
    module = SFTModule(spec, optim=OptimConfig(lr=5e-2, schedule="constant"), export_dir=str(out))
    _trainer(tmp_path, max_steps=3).fit(module, datamodule=_dm(synth_data["train_text"]))

    base = _base(tiny_models)
    base_state = base.state_dict()
    trained = module.model.eval()
    for name, p in trained.get_base_model().state_dict().items():  # only adapters moved
        if "lora_" not in name:
            assert torch.equal(p, base_state[name.replace(".base_layer.", ".")]), name
    want = _logits(trained)
    assert not torch.allclose(want, _logits(base), atol=1e-4), "the adapters did not learn"
    if export == "merged":
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
        assert not any("lora" in k for k in reloaded.state_dict())
    else:
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert not (out / "model.safetensors").exists()
        reloaded = peft.PeftModel.from_pretrained(_base(tiny_models), out).eval()
    torch.testing.assert_close(_logits(reloaded), want, atol=1e-4, rtol=1e-4)
    assert "- **LoRA:**" in (out / "README.md").read_text()


def test_opd_grpo_lora_reference_is_base_weights_without_a_second_model(tiny_models, synth_data, tmp_path,
                                                                       monkeypatch, one_thread):
    import vold_pl.modules.opd_grpo as M
    from vold_pl.modules.base import OptimConfig
    from vold_pl.rl.rollout_types import SamplingConfig

    loads = []
    real_load = M.load_model
    monkeypatch.setattr(M, "load_model", lambda spec, *a, **k: loads.append(spec) or real_load(spec, *a, **k))
    from vold_pl.rewards import plugins as P

    # A reward that differs between samples (completion length, from a plugin file), so GRPO has a gradient.
    monkeypatch.setattr(P, "_loaded", {})
    monkeypatch.setattr(P, "_enabled", set())
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    (tmp_path / "length_reward.py").write_text("def length(completion, record):\n    return float(len(completion))\n")
    reward = f"{tmp_path / 'length_reward.py'}:length"
    P.load_reward_plugins([reward])
    spec = ModelSpec(str(tiny_models["student"]), lora=LoRAConfig(r=4, alpha=16))
    module = M.OPDGRPOModule(spec, optim=OptimConfig(lr=5e-2, schedule="constant"), rewards={reward: 1.0},
                             grpo=M.GRPOConfig(num_generations=4, beta_ref=0.1),
                             sampling=SamplingConfig(max_new_tokens=6), export=False, log_completions_every_n_steps=0)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=_dm(synth_data["train_text"]))

    assert loads == [] and "reference" not in module._frozen, "a second model was loaded for the reference"
    n_params = sum(p.numel() for p in module.parameters())
    assert n_params == sum(p.numel() for p in module.model.parameters())  # nothing besides the policy
    # The reference the k3 KL sees: the policy with its adapters off == the base weights from disk.
    policy = module.model.eval()
    with adapters_off(policy):
        ref = _logits(policy)
    torch.testing.assert_close(ref, _logits(_base(tiny_models)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(policy), ref, atol=1e-4)  # adapters on: the trained policy
    with (Path(trainer.logger.log_dir) / "metrics.csv").open() as fh:
        kl = [float(r["train/kl"]) for r in csv.DictReader(fh) if r.get("train/kl")]
    assert len(kl) == 3 and kl[0] == pytest.approx(0.0, abs=1e-6)  # B = 0 at init: policy == reference
    assert kl[-1] > 1e-6  # after two updates the policy has left the reference
