"""Rollouts of an FSDP2-sharded policy with its weights gathered once per rollout.

Under FSDP2 every forward all-gathers each layer's weights and frees them after the layer. HF ``generate``
with ``synced_gpus`` therefore gathers the whole model once per decoded token, and every rank keeps stepping
until the slowest rank's longest row is done. :class:`UnshardedRollouts` instead gathers every FSDP unit once
(FSDP2's public ``FSDPModule.unshard``), keeps the full weights through the rollout
(``set_reshard_after_forward(False)``), lets the wrapped engine (the cached sampler by default) decode with
no collective at all, so each rank stops when its own rows are done, and reshards at the end
(``FSDPModule.reshard``). The cost: the full (mixed-precision) weights live on every rank while generating.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from vold_pl.rl.hf_engine import HFGenerateEngine
from vold_pl.sharding import ShardingConfig, fsdp_modules, is_fsdp2

__all__ = ["UnshardedRollouts", "unsharded", "keeps_ranks_in_step", "rollout_engine_for"]


@contextmanager
def unsharded(model: torch.nn.Module, reshard_after_forward: bool = True) -> Iterator[None]:
    """Every FSDP2 unit of ``model`` gathered once, kept gathered inside the block, resharded after it.

    ``reshard_after_forward``: the value the non-root units were sharded with (restored on exit; the root
    keeps FSDP2's own default for it, ``False``). Every rank must enter the block (the gathers are collectives).
    """
    units = fsdp_modules(model)
    root = units[0] if units and units[0] is model else None
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)  # forwards inside the block keep the full weights
    handles = [m.unshard(async_op=True) for m in units]  # the same units in the same order on every rank
    for h in handles:
        if h is not None:
            h.wait()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(False if m is root else reshard_after_forward, recurse=False)


class UnshardedRollouts:
    """A rollout engine for an FSDP2-sharded policy: the wrapped engine's rollout inside :func:`unsharded`.

    Ranks never wait on each other while decoding (no collective once the weights are gathered), so the
    wrapped engine may stop when its own rows are done (``keeps_ranks_in_step``).

    Args:
        engine: the engine that samples (``CachedSamplingEngine`` by default in the trainers).
        reshard_after_forward: the sharding's ``reshard_after_forward``, restored after each rollout.
    """

    keeps_ranks_in_step = True

    def __init__(self, engine, reshard_after_forward: bool = True):
        self.engine, self.reshard_after_forward = engine, reshard_after_forward

    def generate(self, model: torch.nn.Module, batch: dict, num_samples: int, sampling):
        with unsharded(model, self.reshard_after_forward):
            return self.engine.generate(model, batch, num_samples, sampling)

    def __getattr__(self, name: str):  # tokenizer, eos_ids, suppress_ids, last_decode_path ... of the engine
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


def keeps_ranks_in_step(engine) -> bool:
    """Whether a rollout engine is safe on a model sharded across ranks: the engine says so.

    Under FSDP2 every forward is a collective, so every rank must run the same number of forwards per
    rollout: HF ``generate`` does (``synced_gpus``: a finished rank keeps stepping), an engine that never calls
    the model does, and each declares ``keeps_ranks_in_step = True`` (see
    :class:`vold_pl.rl.rollout_types.RolloutEngine`). A decode loop that stops when its own rows are done does
    not, and would leave the other ranks waiting; an engine that declares nothing is taken for one of those.
    """
    return bool(getattr(engine, "keeps_ranks_in_step", False))


def rollout_engine_for(engine, model: torch.nn.Module, tokenizer, world_size: int,
                       sharding: ShardingConfig | None = None):
    """``engine``, or, when ``model`` is sharded across ranks and ``engine`` cannot keep them in step (see
    :func:`keeps_ranks_in_step`): ``engine`` run on weights gathered once per rollout
    (:class:`UnshardedRollouts`, ``sharding.rollout: unshard``, the default) or an
    :class:`~vold_pl.rl.hf_engine.HFGenerateEngine` (``synced``)."""
    if world_size <= 1 or not is_fsdp2(model) or keeps_ranks_in_step(engine):
        return engine
    sharding = sharding or ShardingConfig()
    if sharding.rollout == "unshard":
        return UnshardedRollouts(engine, sharding.reshard_after_forward)
    return HFGenerateEngine(tokenizer)
