"""What a model's forward takes: the batch keys (the one list that collators, the policy module and the rollout
engines agree on), left padding, the prompt position ids and the name of the KV-cache argument, shared by the
sampler (:mod:`vold_pl.rl.cached_sampler`) and the scorer (:mod:`vold_pl.rl.logprobs`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

TEXT_INPUT_KEYS = ("input_ids", "attention_mask")
# A VLM's image inputs (Qwen2.5-VL / Qwen3-VL processors): pixel patches, each image's (t, h, w) grid and the
# per-token modality ids.
IMAGE_INPUT_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
MODEL_INPUT_KEYS = TEXT_INPUT_KEYS + IMAGE_INPUT_KEYS


def select_model_inputs(batch: dict, vision: bool) -> dict[str, Any]:
    """The model inputs present in ``batch``: ids and mask, plus the image tensors when the model is a VLM."""
    keys = MODEL_INPUT_KEYS if vision else TEXT_INPUT_KEYS
    return {k: batch[k] for k in keys if k in batch}


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a ``[B, T]`` tensor and its attention mask (generation appends on the right)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a PEFT wrapper (``model`` itself without one): its config, ``generate`` and cache."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _rope_owner(model: torch.nn.Module):
    """The submodule with Qwen2-VL-style ``get_rope_index`` (multimodal rope), or ``None``."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and hasattr(m, "get_rope_index"):
            return m
    return None


def text_positions(mask: torch.Tensor) -> torch.Tensor:
    """HF's positions for a left-padded batch: ``cumsum(mask) - 1``, 0 on padding. ``[B, P] -> [B, P]``."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def prompt_positions(model, ids, mask, batch, vision: bool) -> torch.Tensor | None:
    """Prompt position ids as ``generate`` builds them: ``[B, P]`` (text LLM) or ``[4, B, P]`` (Qwen2.5-VL:
    text positions, then the temporal/height/width rope positions). ``None``: a VLM without Qwen2-VL-style rope."""
    text = text_positions(mask)  # [B, P]
    if not vision:
        return text
    owner = _rope_owner(model)
    if owner is None:
        return None
    if "image_grid_thw" in batch:
        mm = batch["mm_token_type_ids"].to(ids.device)
        vis, _ = owner.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=batch["image_grid_thw"],
                                      attention_mask=mask)  # [3, B, P]
    else:
        vis = text.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text.unsqueeze(0), vis.to(text.dtype)], 0)  # [4, B, P]


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name of the forward's KV-cache argument: transformers 5.x renamed ``past_key_values`` to ``cache``
    (the old name is deprecated until 5.40)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
