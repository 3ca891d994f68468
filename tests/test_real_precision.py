"""bf16 that learns: at an RL learning rate (1e-6), the real configs' precision (bf16 compute over fp32 weights)
moves the weights as an fp32 run does, and pure bf16 (``bf16-true`` with bf16 weights, the old real configs)
does not, which the setup guard warns about. Figures: docs/precision.md."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from vold_pl.data.datamodule import ReasoningDataModule
from vold_pl.data.sources import DataSource
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig, bf16_lost_update_fraction, bf16_update_warning
from vold_pl.modules.sft import SFTModule

REPO = Path(__file__).resolve().parent.parent
LR, STEPS = 1e-6, 3
GROUPS = ("vision", "embed", "attention", "mlp", "norm", "lm_head")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def group_of(name: str) -> str:
    if "visual" in name:
        return "vision"
    if "embed_tokens" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norm"
    return "attention" if "self_attn" in name else "mlp"


class Snapshot(L.Callback):
    """fp32 copies of the trainable weights when training starts (after the precision plugin's cast) and ends."""

    def on_train_start(self, trainer, module):
        self.start = {n: p.detach().float().clone() for n, p in module.model.named_parameters()}

    def on_train_end(self, trainer, module):
        self.end = {n: p.detach().float().clone() for n, p in module.model.named_parameters()}
        self.dtypes = {p.dtype for p in module.model.parameters()}


def moved(tiny_models, synth_data, tmp_path, precision: str, dtype: str):
    """Norm of (weights after STEPS AdamW steps at lr 1e-6 − weights before), per parameter group."""
    L.seed_everything(0)
    module = SFTModule(ModelSpec(str(tiny_models["student"]), dtype=dtype), OptimConfig(lr=LR, schedule="constant"),
                       export=False, seed=0)
    dm = ReasoningDataModule(train=[DataSource(str(synth_data["train"]))], batch_size=4, seed=0)
    snap = Snapshot()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", precision=precision, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=tmp_path / precision, callbacks=[snap])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == STEPS
    sq = dict.fromkeys(GROUPS, 0.0)
    for n, w0 in snap.start.items():
        sq[group_of(n)] += float(((snap.end[n] - w0) ** 2).sum())
    guard = [str(w.message) for w in caught if "round away" in str(w.message)]
    return {g: v ** 0.5 for g, v in sq.items()}, snap.dtypes, guard


def test_bf16_mixed_moves_weights_like_fp32_and_bf16_true_does_not(tiny_models, synth_data, tmp_path):
    fp32, dt32, guard32 = moved(tiny_models, synth_data, tmp_path, "32-true", "float32")
    mixed, dtmix, guardmix = moved(tiny_models, synth_data, tmp_path, "bf16-mixed", "float32")
    pure, dtpure, guardpure = moved(tiny_models, synth_data, tmp_path, "bf16-true", "bfloat16")
    assert dt32 == dtmix == {torch.float32} and dtpure == {torch.bfloat16}
    print("\nper-group ||Δw|| after", STEPS, "steps at lr", LR)
    for g in GROUPS:
        print(f"{g:10s} fp32 {fp32[g]:.3e}  bf16-mixed {mixed[g]:.3e} ({mixed[g] / fp32[g]:.2f}x)  "
              f"bf16-true {pure[g]:.3e} ({pure[g] / fp32[g]:.2f}x)")
    for g in GROUPS:
        assert fp32[g] > 0, g  # every group trains in fp32
        assert 0.5 <= mixed[g] / fp32[g] <= 1.5, (g, mixed[g], fp32[g])
    # The old real configs fail the same bound: most bf16 updates round away.
    failing = [g for g in GROUPS if not 0.5 <= pure[g] / fp32[g] <= 1.5]
    assert {"attention", "mlp", "norm", "lm_head"} <= set(failing), failing
    # The setup guard fires for pure bf16 only.
    assert guardpure and not guardmix and not guard32
    assert "bf16-mixed" in guardpure[0] and "docs/precision.md" in guardpure[0]


def test_guard_threshold_matches_bf16_resolution():
    # |w| = 0.02: floor(log2) = -6, half ulp = 2^-14 ≈ 6.1e-5; an lr of 1e-4 moves it, 1e-5 does not.
    w = torch.nn.Parameter(torch.full((64, 64), 0.02, dtype=torch.bfloat16))
    assert bf16_lost_update_fraction([w], 1e-5)[0] == 1.0 and bf16_lost_update_fraction([w], 1e-4)[0] == 0.0
    one = torch.tensor(0.02, dtype=torch.bfloat16)
    assert one + 5e-5 == one and one + 7e-5 != one  # the same threshold, by bf16 arithmetic itself
    assert bf16_update_warning([w], OptimConfig(lr=1e-6)) is not None
    assert bf16_update_warning([torch.nn.Parameter(w.float())], OptimConfig(lr=1e-6)) is None  # fp32 weights
    frozen = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
    assert bf16_update_warning([frozen], OptimConfig(lr=1e-6)) is None  # frozen weights do not count


def test_real_configs_keep_fp32_master_weights():
    """Every real config trains fp32 weights with bf16 compute; frozen teachers may stay bf16."""
    files = sorted((REPO / "configs" / "real").glob("*.yaml")) + sorted(
        (REPO / "configs" / "openvlthinker" / "qwen2_5_vl_3b").glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        if "trainer" not in cfg or not (cfg.get("data") or {}).get("train"):
            continue  # the rounds driver's config, and inference-only stages (benchmarks, sampling): bf16 is fine
        assert cfg["trainer"]["precision"] == "bf16-mixed", f
        assert cfg["model"]["init_args"]["model"]["dtype"] == "float32", f
