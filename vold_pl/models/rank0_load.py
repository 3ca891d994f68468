"""Loading a model to shard it across ranks with the full weights in host memory on rank 0 only.

``from_pretrained`` on every rank puts the whole model in host RAM once per rank (8 x 15 GB for an fp32 3B student
on an 8-GPU node) before FSDP2 keeps a shard of it. :func:`load_sharded_from_rank0` instead:

1. rank 0 loads the checkpoint (``from_pretrained``: the full weights, once per job);
2. every other rank builds the same architecture on the ``meta`` device (no storage at all);
3. every rank applies the sharding (``shard``, e.g. FSDP2's ``fully_shard``) and the non-zero ranks allocate their
   shards only (``to_empty``);
4. rank 0's state dict is broadcast one tensor at a time, each rank copying its own chunk into its shard (one
   full tensor in flight), and the buffers, which are not in the state dict when non-persistent (rotary
   frequencies), are broadcast from rank 0.

Host memory per node: one full model (rank 0) plus each rank's shard, instead of one full model per rank
(``tests/test_rank0_load.py`` measures peak RSS on 2 gloo ranks against the model's bytes).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["load_sharded_from_rank0", "meta_model"]


def meta_model(spec):
    """The architecture of ``spec`` with every parameter and buffer on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from vold_pl.models.factory import _DTYPES, is_vision_model

    config = AutoConfig.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code,
                                        revision=spec.revision)
    auto = (AutoModelForImageTextToText if is_vision_model(spec.name_or_path, spec.trust_remote_code, spec.revision)
            else AutoModelForCausalLM)
    with torch.device("meta"):
        return auto.from_config(config, dtype=_DTYPES[spec.dtype], attn_implementation=spec.attn_implementation,
                                trust_remote_code=spec.trust_remote_code)


def load_sharded_from_rank0(spec, shard: Callable[[torch.nn.Module], object],
                            device: torch.device | str = "cpu") -> torch.nn.Module:
    """``spec``'s model, sharded by ``shard(model)`` (in place) on every rank, its weights read from disk on rank 0
    only and sent to the other ranks' shards. Every rank of the default process group must call it.

    Args:
        spec: the :class:`~vold_pl.models.factory.ModelSpec` (no quantization: quantized models are placed whole
            by bitsandbytes and never sharded).
        shard: applies the sharding in place (e.g. ``lambda m: shard_model(m, mesh)``); it must shard identically on
            every rank.
        device: where the shards live (``cpu`` for gloo, the rank's GPU for NCCL).
    """
    from vold_pl.models.factory import load_model

    if spec.quantization not in (None, "none"):
        raise ValueError(f"load_sharded_from_rank0: quantization {spec.quantization!r} models are not sharded")
    rank = dist.get_rank()
    if rank == 0:
        model, _ = load_model(spec, with_processor=False)
        full = {k: v for k, v in model.state_dict().items()}  # the reference tensors sent to every shard
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # rank 0's values, before any resharding
    else:
        model, full, buffers = meta_model(spec), {}, None
    shard(model)
    if rank != 0:
        model.to_empty(device=device)  # this rank's shards, uninitialised until the broadcast below
    elif torch.device(device).type != "cpu":
        model.to(device)
    # Rank 0's full tensors go out one at a time; each rank keeps its shard of each (one full tensor in flight,
    # never the whole model). ``state_dict`` holds the parameters' DTensors (their local shards alias the model).
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, local in model.state_dict().items():
        shape = local.shape  # the global shape for a DTensor
        t = full.pop(name).to(device) if rank == 0 else torch.empty(shape, dtype=local.dtype, device=device)
        dist.broadcast(t, src=0)
        with torch.no_grad():
            if isinstance(local, DTensor):  # this rank's chunk, split locally (every rank has ``t`` now)
                local.to_local().copy_(distribute_tensor(t, local.device_mesh, local.placements,
                                                         src_data_rank=None).to_local())
            else:
                local.copy_(t)
        del t
    del full
    for name, buf in model.named_buffers():  # non-persistent buffers are not in the state dict
        if rank == 0:
            buf.copy_(buffers[name].to(buf.device))
        dist.broadcast(buf, src=0)
    return model
