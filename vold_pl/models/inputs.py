"""The batch keys a model's forward takes: the one list that collators, the policy module and the rollout
engines agree on."""

from __future__ import annotations

from typing import Any

TEXT_INPUT_KEYS = ("input_ids", "attention_mask")
# A VLM's image inputs (Qwen2.5-VL / Qwen3-VL processors): pixel patches, each image's (t, h, w) grid and the
# per-token modality ids.
IMAGE_INPUT_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
MODEL_INPUT_KEYS = TEXT_INPUT_KEYS + IMAGE_INPUT_KEYS


def select_model_inputs(batch: dict, vision: bool) -> dict[str, Any]:
    """The model inputs present in ``batch``: ids and mask, plus the image tensors when the model is a VLM."""
    keys = MODEL_INPUT_KEYS if vision else TEXT_INPUT_KEYS
    return {k: batch[k] for k in keys if k in batch}
