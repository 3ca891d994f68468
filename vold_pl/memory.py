"""Memory accounting: bytes of parameters and optimizer state this rank holds (its shards under FSDP2)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["local_param_bytes", "optimizer_state_bytes"]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP2)."""
    return sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors this rank holds (Adam moments, 8-bit states and their scales)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                loc = _local(v)
                total += loc.numel() * loc.element_size()
    return total
