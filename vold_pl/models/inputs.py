"""The batch keys a model's forward takes: the one list that collators, the policy module and the rollout
engines agree on."""

from __future__ import annotations

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
