"""Optimizers that need more than ``torch.optim``: bitsandbytes' 8-bit AdamW on FSDP2-sharded parameters."""

from __future__ import annotations

import torch

__all__ = ["make_adamw8bit"]


def _adamw8bit_base():
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit


def make_adamw8bit(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, **kwargs):
    """bitsandbytes ``AdamW8bit`` that also steps FSDP2 (DTensor) parameters; see :class:`ShardedAdamW8bit`."""
    return _sharded_adamw8bit_class()(params, lr=lr, betas=betas, weight_decay=weight_decay, **kwargs)


_SHARDED_ADAMW8BIT = None


def _sharded_adamw8bit_class():
    global _SHARDED_ADAMW8BIT
    if _SHARDED_ADAMW8BIT is not None:
        return _SHARDED_ADAMW8BIT
    base = _adamw8bit_base()

    class ShardedAdamW8bit(base):
        """bitsandbytes ``AdamW8bit`` on each rank's local shard when parameters are FSDP2 DTensors.

        bitsandbytes' fused update is a custom op that DTensor cannot dispatch ("mixed torch.Tensor and
        DTensor"). Adam is element-wise and the 8-bit block quantization of its moments is per block of the
        tensor it is given, so each rank updates its own shard (``p.to_local()``, ``p.grad.to_local()``) with
        8-bit states of the shard's size: optimizer memory is sharded like the parameters. Plain tensors
        (single process, DDP) take bitsandbytes' path unchanged.

        Checkpoints: the moments are plain per-rank tensors, which a distributed checkpoint would take for
        replicated values and save once; so ``state_dict()`` refuses on more than one rank instead of writing
        a checkpoint that resumes wrong (use ``optim.name: adamw`` or ``enable_checkpointing: false``).
        """

        def _local_view(self, p):
            local = p.to_local().detach()  # aliases the shard's storage: updates land in the parameter
            if p.grad is not None:
                local.grad = p.grad.to_local()
            return local

        def init_state(self, group, p, gindex, pindex):
            if not _is_dtensor(p):
                return super().init_state(group, p, gindex, pindex)
            local = self._local_view(p)
            super().init_state(group, local, gindex, pindex)
            self.state[p] = self.state.pop(local)
            self.state[p]["_vold_local_shard"] = True

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            if not _is_dtensor(p):
                return super().update_step(group, p, gindex, pindex)
            local = self._local_view(p)
            self.state[local] = self.state[p]
            try:
                super().update_step(group, local, gindex, pindex)
            finally:
                del self.state[local]
            if local.data_ptr() != p.to_local().data_ptr():  # contiguous() copied: write the result back
                p.to_local().copy_(local)

        def state_dict(self):
            sharded = any(isinstance(st, dict) and st.get("_vold_local_shard") for st in self.state.values())
            if sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                raise RuntimeError(
                    "AdamW8bit on FSDP2-sharded parameters keeps per-rank 8-bit moments that a distributed "
                    "checkpoint cannot tell apart, so vold-pl does not save them (a resume would be wrong). Use "
                    "optim.name: adamw with checkpointing, or trainer.enable_checkpointing: false.")
            return super().state_dict()

    _SHARDED_ADAMW8BIT = ShardedAdamW8bit
    return ShardedAdamW8bit


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
