"""A KV cache for scoring G completions on one shared prompt, safe under activation checkpointing.

Scoring a rollout runs each prompt (and its images) once, then the G completions on top of its KV cache
(:func:`vold_pl.rl.logprobs.shared_prefix_token_logprobs`). Under activation checkpointing HF drops the cache in
training forwards, because a checkpointed layer runs its forward twice (forward, then the recompute in backward)
and a cache that *appends* would be appended to twice. The cache here never accumulates across calls:

- the prompt pass writes each layer's K/V (``update`` returns its inputs and records them; the recompute records
  equal tensors again and returns the same values);
- the completion pass reads the prompt's K/V, expanded G times, and ``update`` returns ``cat(prompt, new)``
  without changing what it concatenates to (the recompute gets the same tensors again).

Every layer's ``update`` is therefore a pure function of its inputs, which is what transformers asks of a cache it
keeps under checkpointing (``GradientCheckpointingLayer._can_checkpoint_with_cache``, set for the duration of the
call by :func:`cache_kept_under_checkpointing`). The prompt pass is checkpointed like any other forward (layer by
layer), and its K/V tensors, produced inside the checkpointed layers, carry the completions' gradient back into
them (non-reentrant checkpointing; vold-pl enables no other kind).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["prompt_cache", "completion_cache", "cache_kept_under_checkpointing"]


def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class SharedPrefixLayer(DynamicLayer):
        """``keys``/``values``: what the layer holds before the pass (the prompt's K/V, or nothing); ``update``
        returns them followed by the new states and changes nothing, so a recompute sees the same cache."""

        def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
            super().__init__()
            self.base_keys, self.base_values = keys, values
            self.written: tuple[torch.Tensor, torch.Tensor] | None = None  # the last pass's full K/V
            if keys is not None:
                self.device, self.is_initialized = keys.device, True
                self.keys, self.values = keys, values

        def update(self, key_states, value_states, *args, **kwargs):
            if self.base_keys is None:  # the prompt pass: its own K/V
                keys, values = key_states, value_states
            else:
                keys = torch.cat([self.base_keys, key_states], dim=-2)
                values = torch.cat([self.base_values, value_states], dim=-2)
            self.written = (keys, values)
            return keys, values

    return SharedPrefixLayer


_LAYER = None


def _new_layer(keys=None, values=None):
    global _LAYER
    if _LAYER is None:
        _LAYER = _layer_class()
    return _LAYER(keys, values)


def _cache(layers):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    cache.layers = layers
    cache.layer_class_to_replicate = None
    return cache


def prompt_cache(num_layers: int):
    """An empty cache for the prompt pass (``num_layers`` decoder layers)."""
    return _cache([_new_layer() for _ in range(num_layers)])


def completion_cache(prompt: object, group_size: int):
    """The cache the completion pass reads: every layer's prompt K/V ``[B, h, P, d]`` from ``prompt`` (a
    :func:`prompt_cache` after the prompt pass) expanded to ``[B*G, h, P, d]`` (``repeat_interleave``, so the
    gradients of the G completions add up in the prompt's K/V)."""
    layers = []
    for layer in prompt.layers:
        if layer.written is None:
            raise RuntimeError("the prompt pass wrote no K/V into this layer: a model whose decoder skips the cache")
        k, v = layer.written
        layers.append(_new_layer(k.repeat_interleave(group_size, 0), v.repeat_interleave(group_size, 0)))
    return _cache(layers)


@contextmanager
def cache_kept_under_checkpointing(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block, checkpointed decoder layers of ``model`` keep the cache they are given (transformers
    drops it otherwise). Only for the recompute-safe caches of this module."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] if enabled else []
    # The instance attribute shadows the class's ``False``; removed again on exit.
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache
