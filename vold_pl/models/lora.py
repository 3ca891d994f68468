"""LoRA adapters on the trained model through ``peft`` (``pip install vold-pl[lora]``).

Set ``model.lora.r > 0`` on the trained model's :class:`~vold_pl.models.factory.ModelSpec`::

    model:
      name_or_path: Qwen/Qwen2.5-VL-3B-Instruct
      lora: {r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj], vision: frozen, export: merged}

Only the adapters train (the optimizer sees only them). With LoRA, OPD-GRPO's k3 reference (``grpo.beta_ref > 0``
and no explicit ``reference``) is the policy itself with its adapters switched off: the base weights, with no
second copy of the model in memory. At the end of fit the export is either ``merged`` (ΔW = B·A·alpha/r added
to each adapted weight: a plain transformers folder, like a full fine-tune) or ``adapter`` (``adapter_config.json``
+ ``adapter_model.safetensors`` next to the processor; ``from_pretrained`` of the folder loads the base model
named in ``adapter_config.json`` and attaches the adapter).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from vold_pl.errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Submodule names of vision towers (Qwen2/2.5-VL ``visual``, LLaVA-style ``vision_tower``, SigLIP ``vision_model``).
VISION_TOWERS = ("visual", "vision_tower", "vision_model")
ADAPTER = "default"


@dataclass
class LoRAConfig:
    """LoRA on the trained model (ignored for frozen teachers and references).

    Args:
        r: adapter rank; 0 turns LoRA off (every weight trains).
        alpha: scaling numerator; the update is ``B·A·alpha/r``.
        dropout: dropout on the adapters' input (0 keeps rollouts and scoring deterministic).
        target_modules: names of the linear layers to adapt (the last part of the module name, e.g. ``q_proj``),
            or ``[all-linear]`` for every linear layer except the output head.
        vision: ``frozen`` (the vision tower keeps its weights: no adapters there) or ``lora`` (adapters in the
            vision tower too, on the same target names plus its ``qkv``/``proj`` attention layers).
        export: ``merged`` (adapters folded into the weights: a plain model folder) or ``adapter`` (the adapter
            alone, loading on top of the base model).
    """

    r: int = 0
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    vision: Literal["frozen", "lora"] = "frozen"
    export: Literal["merged", "adapter"] = "merged"


def lora_enabled(cfg: LoRAConfig | None) -> bool:
    return cfg is not None and cfg.r > 0


def is_lora_model(model) -> bool:
    """A ``peft`` model carrying LoRA adapters."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _in_vision_tower(name: str) -> bool:
    return any(part in VISION_TOWERS for part in name.split("."))


def target_module_names(model: torch.nn.Module, cfg: LoRAConfig) -> list[str]:
    """Full names of the linear layers to adapt: matching ``target_modules``, never the output head, and only
    outside the vision tower unless ``vision: lora``. Explicit names, so what is adapted is what is listed."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = set(cfg.target_modules)
    all_linear = "all-linear" in wanted
    vision_extra = {"qkv", "proj"} if cfg.vision == "lora" else set()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        leaf = name.rsplit(".", 1)[-1]
        in_vision = _in_vision_tower(name)
        if in_vision and cfg.vision != "lora":
            continue
        if all_linear or leaf in wanted or (in_vision and leaf in vision_extra):
            names.append(name)
    return names


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig | None) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft``); only the adapters keep ``requires_grad``. No-op when off."""
    if not lora_enabled(cfg):
        return model
    if cfg.vision not in ("frozen", "lora") or cfg.export not in ("merged", "adapter"):
        raise UserError(f"model.lora: vision must be frozen or lora and export merged or adapter; got "
                        f"vision={cfg.vision!r}, export={cfg.export!r}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("model.lora.r > 0 needs the peft package: pip install 'vold-pl[lora]' (or set model.lora.r: 0)."
                        ) from None
    names = target_module_names(model, cfg)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"model.lora.target_modules {cfg.target_modules} match no linear layer of "
                        f"{type(model).__name__}. Its linear layer names: {', '.join(linear)}.")
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=names)
    return get_peft_model(model, peft_cfg)


@contextlib.contextmanager
def adapters_off(model):
    """Within the block a LoRA model computes with its base weights (the k3 reference); no-op for other models."""
    if is_lora_model(model):
        with model.disable_adapter():
            yield
    else:
        yield


_LORA_KEY = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\.")


def merged_state_dict(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (W + ΔW), keyed like the plain transformers model.

    ``state`` is the LoRA model's full state dict (``base_model.model.<name>.base_layer.weight``,
    ``…lora_A.default.weight``, …); the model itself is not changed (no in-place merge/unmerge round trip).
    """
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and ADAPTER in getattr(
                module, "lora_A", {}):
            with torch.no_grad():
                deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(ADAPTER)
    prefix = "base_model.model."
    out = {}
    for key, value in state.items():
        if _LORA_KEY.search(key):
            continue
        if key in deltas:
            value = (value.float() + deltas[key].to(value.device).float()).to(value.dtype)
        key = key[len(prefix):] if key.startswith(prefix) else key
        out[key.replace(".base_layer.", ".")] = value
    return out


def save_lora_export(model, state: dict[str, torch.Tensor], out_path, mode: str) -> None:
    """Write the export of a LoRA model: merged weights as a plain model, or the adapter alone."""
    if mode == "adapter":
        model.save_pretrained(out_path, state_dict=state, safe_serialization=True)
    else:
        model.get_base_model().save_pretrained(out_path, state_dict=merged_state_dict(model, state),
                                               safe_serialization=True)
