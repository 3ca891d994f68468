"""Distributed training: FSDP2 sharding of HF models, image-free batches under sharding, full weights for export.

vold-pl shards with FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
:class:`~lightning.pytorch.strategies.ModelParallelStrategy`, or its subclass :class:`FSDP2Strategy` that adds
the sharding options below and sizes the data-parallel mesh to the whole world by default.

What happens in ``configure_model`` (see :func:`prepare_model`):

- the student is sharded per decoder layer and per vision block (the classes in the model's
  ``_no_split_modules``), then at the root (embeddings, final norm, LM head, patch embedding, merger);
  mixed precision is bf16 compute with fp32 gradient reduction on GPU, fp32 on CPU; activation checkpointing
  is optional;
- ``generate`` is registered as an FSDP forward method, so rollouts all-gather the root like a forward
  does; on more than one rank HF ``generate`` then runs with ``synced_gpus`` (:func:`generation_needs_sync`:
  a rank whose completions all ended keeps stepping until every rank is done, or the others would wait
  forever);
- a hook on the backbone (``model.model``) makes the backbone callable on its own, as the chunked log-prob
  code does (``backbone(...)`` then the LM head slab by slab): it gathers the root unit first;
- on a vision model, the same hook runs the vision tower on a 1-token dummy image when a forward has no
  pixels, and adds ``0 * dummy.sum()`` to the output (see :class:`BackboneHooks`).

Frozen models (teacher, reference) are sharded the same way or replicated: ``frozen: auto`` replicates
those below ``replicate_frozen_below_mb``; a bitsandbytes-quantized model is always replicated (its packed
4/8-bit weights are not shardable DTensors).

Lightning's ``FSDPStrategy`` (FSDP1) is refused with a message naming ``ModelParallelStrategy``: see
:func:`check_strategy` for why.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout as _DEFAULT_PG_TIMEOUT
from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy
from torch import nn

from vold_pl.errors import UserError
from vold_pl.models.inputs import base_model

__all__ = [
    "ShardingConfig", "FSDP2Strategy", "check_strategy", "prepare_model", "prepare_frozen", "shard_model",
    "shard_blocks", "mixed_precision_policy", "BackboneHooks", "install_backbone_hooks", "fsdp_modules",
    "generation_needs_sync", "is_fsdp2", "is_fsdp2_params", "is_quantized", "full_state_dict",
]


# ----------------------------------------------------------------------------------------------- configuration

@dataclass
class ShardingConfig:
    """How :func:`prepare_model` shards (read from :class:`FSDP2Strategy`; defaults under a plain
    ModelParallelStrategy).

    Args:
        mixed_precision: ``auto`` (bf16 compute, fp32 gradient reduce on GPU; fp32 on CPU), ``bf16`` or ``fp32``.
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3); ``false`` keeps
            them until backward (ZeRO-2-like: faster, more memory).
        activation_checkpointing: recompute layer activations in backward; ``null`` follows the module's
            ``gradient_checkpointing``.
        frozen: teacher / reference: ``shard`` like the student, ``replicate`` (a full copy per rank) or
            ``auto`` (replicate below ``replicate_frozen_below_mb``). Quantized models are always replicated.
        replicate_frozen_below_mb: the ``auto`` threshold, in MB of parameters.
        dummy_visual: run the vision tower on a dummy image when a rank's forward has no pixels (see
            :class:`BackboneHooks`); only installed when there is more than one rank.
        rollout: how a sharded policy generates on more than one rank. ``unshard`` (default): gather its
            weights once per rollout and sample with the trainer's engine, no collective while decoding
            (:class:`vold_pl.rl.unsharded.UnshardedRollouts`; the full weights live on every rank while
            generating). ``synced``: HF ``generate`` with ``synced_gpus``, gathering layer by layer at every
            decoded token (least memory, much slower).
    """

    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    reshard_after_forward: bool = True
    activation_checkpointing: bool | None = None
    frozen: Literal["auto", "shard", "replicate"] = "auto"
    replicate_frozen_below_mb: float = 1024.0
    dummy_visual: bool = True
    rollout: Literal["unshard", "synced"] = "unshard"


class FSDP2Strategy(_ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` set up for FSDP2 data parallelism, with vold-pl's sharding options.

    Differences from the parent: ``data_parallel_size: auto`` is the whole world (nodes x devices) and
    ``tensor_parallel_size`` defaults to 1, so ``fully_shard`` spans every rank; the options of
    :class:`ShardingConfig` are accepted here (``trainer.strategy.init_args`` in a config).

    Args:
        data_parallel_size: ranks that shard the model (``auto``: every rank).
        tensor_parallel_size: must stay 1; vold-pl does not apply tensor parallelism.
        save_distributed_checkpoint: each rank writes its own shard (a folder of files) instead of rank 0
            assembling full weights.
        process_group_backend: ``nccl`` on GPU, ``gloo`` on CPU by default.
        timeout: collective timeout; a rank stuck longer than this fails instead of hanging forever.
        mixed_precision: see :class:`ShardingConfig`.
        reshard_after_forward: see :class:`ShardingConfig`.
        activation_checkpointing: see :class:`ShardingConfig`.
        frozen: see :class:`ShardingConfig`.
        replicate_frozen_below_mb: see :class:`ShardingConfig`.
        dummy_visual: see :class:`ShardingConfig`.
        rollout: see :class:`ShardingConfig`.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = _DEFAULT_PG_TIMEOUT,
        mixed_precision: Literal["auto", "bf16", "fp32"] = "auto",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool | None = None,
        frozen: Literal["auto", "shard", "replicate"] = "auto",
        replicate_frozen_below_mb: float = 1024.0,
        dummy_visual: bool = True,
        rollout: Literal["unshard", "synced"] = "unshard",
    ) -> None:
        if tensor_parallel_size != 1:
            raise UserError("FSDP2Strategy shards over data parallelism only: tensor_parallel_size must be 1.")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.sharding = ShardingConfig(mixed_precision, reshard_after_forward, activation_checkpointing, frozen,
                                       replicate_frozen_below_mb, dummy_visual, rollout)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def sharding_config(trainer) -> ShardingConfig:
    return getattr(getattr(trainer, "strategy", None), "sharding", None) or ShardingConfig()


FSDP1_MESSAGE = (
    "vold-pl does not run under Lightning's FSDPStrategy (FSDP1). Use "
    "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2; set data_parallel_size to the number of ranks and "
    "tensor_parallel_size: 1) or vold_pl.sharding.FSDP2Strategy, which does that for you. Why: rollouts call "
    "model.generate every step, which under FSDP1 needs summon_full_params - the whole model gathered on every rank "
    "for the whole rollout, which undoes the sharding - while FSDP2 gathers layer by layer inside generate. "
    "See docs/distributed.md."
)


def check_strategy(strategy) -> None:
    """Refuse FSDP1 (Lightning's ``FSDPStrategy``) with a message naming ``ModelParallelStrategy``.

    Decision: FSDP1 is not supported. OPD-GRPO generates in every training step; FSDP1 can only do that inside
    ``FullyShardedDataParallel.summon_full_params``, which materialises every parameter on every rank for the
    whole rollout (a 3B student plus its KV cache on each GPU) and is incompatible with its
    ``use_orig_params=False`` flat parameters under the HF ``generate`` loop. FSDP2 gathers one layer at a
    time inside ``generate`` (``register_fsdp_forward_method``), composes with quantized frozen models and
    Lightning's distributed checkpoints, and is what PyTorch develops; one tested path beats two.
    """
    if strategy is None:
        return
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover
        return
    if isinstance(strategy, FSDPStrategy):
        raise UserError(FSDP1_MESSAGE)


# ---------------------------------------------------------------------------------------------------- sharding

def mixed_precision_policy(kind: str = "auto", device: torch.device | str | None = None):
    """``MixedPrecisionPolicy``: bf16 params with fp32 reduce on GPU (``auto``), fp32 everywhere on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if kind == "auto":
        kind = "bf16" if dev.type == "cuda" else "fp32"
    if kind == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if kind == "fp32":
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    raise UserError(f"mixed_precision must be auto, bf16 or fp32; got {kind!r}")


def _block_class_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_model` shards one by one: every decoder layer and vision block."""
    names = _block_class_names(model)
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every layer / block (HF's when the model has it)."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    blocks = set(map(id, shard_blocks(model)))
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in blocks)


def shard_model(model: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True,
                activation_checkpointing: bool = False) -> nn.Module:
    """Apply FSDP2 in place: ``fully_shard`` each decoder layer and vision block, then the root.

    The root unit holds what is left (embeddings, final norm, LM head, the vision patch embedding and
    merger), so tied input/output embeddings stay in one unit. ``generate`` is registered as an FSDP forward
    method (:func:`generation_needs_sync` then says it must run with ``synced_gpus``), and
    :func:`install_backbone_hooks` makes ``model.model`` callable on its own.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        enable_activation_checkpointing(model)
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in shard_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    install_backbone_hooks(model, fsdp_root=model, dummy_visual=False)
    return model


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of ``model`` (modules ``fully_shard`` turned into ``FSDPModule``), root first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def generation_needs_sync(model: nn.Module) -> bool:
    """Whether ``model.generate`` must run with ``synced_gpus=True``: ``model`` is sharded by FSDP2
    (``fully_shard``, see :func:`shard_model`) and the default process group has more than one rank.

    Every forward of a sharded model all-gathers weights (a collective), so a rank whose rows all ended must keep
    stepping until every rank is done, or the others would wait forever. The one place that decides it: HF
    generation in vold-pl (:class:`~vold_pl.rl.hf_engine.HFGenerateEngine`, which the trainers and the benchmark
    callback use on sharded models) passes its answer explicitly, so transformers' own guess is never relied on.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size() > 1 and bool(fsdp_modules(model))


# ------------------------------------------------------------------------------------------- backbone hooks

def _backbone(model: nn.Module) -> nn.Module | None:
    return getattr(base_model(model), "model", None)


class BackboneHooks:
    """Forward hooks on ``model.model`` (the backbone the chunked log-prob code calls directly).

    1. FSDP2 root: when the backbone runs outside the root's own forward (``model_token_logprobs`` calls
       ``model.model(...)`` and then the LM head slab by slab), the root unit (embeddings, LM head, ...) is
       gathered first, and the root is lazily initialised as root. In training its gradients are
       reduce-scattered and it is resharded by FSDP's end-of-backward callback; a frozen model (no backward)
       keeps its root gathered, one all-gather for the whole run.
    2. Dummy visual forward: on a vision model, a forward without pixels (a text-only batch) at the first
       step (no KV cache yet) runs the vision tower on one dummy image (``spatial_merge_size``² zero patches,
       one merged token), and adds ``0 * features.sum()`` to the backbone's last hidden state. Every rank
       then runs the vision blocks at the same point of every forward (their all-gathers line up) and every
       vision parameter gets a (zero) gradient (their reduce-scatters line up; under DDP, no unused
       parameters). The output values are unchanged. Decoding steps of ``generate`` (KV cache filled) run no
       vision on any rank, so they line up too.
    """

    def __init__(self, model: nn.Module, backbone: nn.Module, fsdp_root: nn.Module | None, dummy_visual: bool):
        self.model, self.backbone, self.fsdp_root = model, backbone, fsdp_root
        self.dummy_visual = dummy_visual and getattr(backbone, "visual", None) is not None
        self.dummy_calls = 0
        self._pending: torch.Tensor | None = None  # the dummy's features, between pre- and post-hook
        self.handles = [backbone.register_forward_pre_hook(self.pre, with_kwargs=True),
                        backbone.register_forward_hook(self.post, with_kwargs=True)]

    # -- hooks ------------------------------------------------------------------------------------------
    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.fsdp_root is not None:
            self._ensure_root_gathered()
        self._pending = None
        if self.dummy_visual and self._needs_dummy(args, kwargs):
            self._pending = self._visual_dummy(kwargs, args)
        return None

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._pending is None:
            return None
        zero, self._pending = self._pending * 0.0, None
        if isinstance(output, tuple):
            return (output[0] + zero.to(output[0].dtype),) + tuple(output[1:])
        output.last_hidden_state = output.last_hidden_state + zero.to(output.last_hidden_state.dtype)
        return output

    # -- helpers ----------------------------------------------------------------------------------------
    def _ensure_root_gathered(self) -> None:
        root = self.fsdp_root
        state = root._get_fsdp_state()
        state._lazy_init()  # the real root claims root-ness before any layer runs on its own
        if getattr(state._state_ctx, "iter_forward_root", None) is None:  # outside the root's forward / generate
            root.unshard()  # a no-op when already gathered

    @staticmethod
    def _needs_dummy(args: tuple, kwargs: dict) -> bool:
        if len(args) > 6:  # positional pixel_values (Qwen2/2.5-VL forward order); callers pass kwargs
            return False
        if any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
            return False
        if kwargs.get("mm_encoder_outputs"):
            return False
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return False  # a decoding step of generate: no rank runs vision here
        return True

    def _visual_dummy(self, kwargs: dict, args: tuple) -> torch.Tensor:
        visual = self.backbone.visual
        cfg = visual.config
        m = int(getattr(cfg, "spatial_merge_size", 2))
        in_dim = int(cfg.in_channels * getattr(cfg, "temporal_patch_size", 1) * cfg.patch_size ** 2)
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds", args[0] if args else None)
        device = ref.device if isinstance(ref, torch.Tensor) else next(self.model.buffers(), torch.empty(0)).device
        dtype = getattr(visual, "dtype", torch.float32)
        pixels = torch.zeros(m * m, in_dim, dtype=dtype, device=device)
        thw = torch.tensor([[1, m, m]], device=device)
        out = visual(pixels, grid_thw=thw)
        feats = getattr(out, "pooler_output", None)
        if feats is None:
            feats = out[0] if isinstance(out, (tuple, list)) else out
        self.dummy_calls += 1
        return feats.float().sum()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def rank_local_forwards(model: nn.Module):
    """Forwards that only this rank runs (a local self-check such as the lean decoder's probe): no dummy visual
    forward inside, since that exists only to keep every rank's forwards in step. Safe only where those forwards
    run no collective, i.e. not under FSDP2 (whose models are never probed)."""
    hooks: BackboneHooks | None = getattr(model, "_vold_backbone_hooks", None)
    if hooks is None or not hooks.dummy_visual:
        yield
        return
    hooks.dummy_visual = False
    try:
        yield
    finally:
        hooks.dummy_visual = True


def install_backbone_hooks(model: nn.Module, fsdp_root: nn.Module | None = None,
                           dummy_visual: bool = True) -> BackboneHooks | None:
    """Install (or update) :class:`BackboneHooks` on ``model.model``; returns ``None`` without a backbone."""
    backbone = _backbone(model)
    if backbone is None:
        return None
    hooks: BackboneHooks | None = getattr(model, "_vold_backbone_hooks", None)
    if hooks is not None:
        hooks.fsdp_root = fsdp_root or hooks.fsdp_root
        hooks.dummy_visual = hooks.dummy_visual or (dummy_visual and getattr(backbone, "visual", None) is not None)
        return hooks
    hooks = BackboneHooks(model, backbone, fsdp_root, dummy_visual)
    object.__setattr__(model, "_vold_backbone_hooks", hooks)  # not a submodule / not in the state dict
    return hooks


# -------------------------------------------------------------------------------------- from configure_model

def fsdp_mesh(trainer):
    """The data-parallel mesh of a ModelParallelStrategy, else ``None`` (single process, DDP)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, ModelParallelStrategy):
        return None
    mesh = strategy.device_mesh
    if "data_parallel" not in (mesh.mesh_dim_names or ()):
        return mesh
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in mesh.mesh_dim_names else 1
    if tp != 1:
        raise UserError(
            f"vold-pl shards with FSDP2 over data parallelism only, but the ModelParallelStrategy mesh has "
            f"tensor_parallel_size={tp} (its default 'auto' is the number of devices). Set "
            f"data_parallel_size={trainer.world_size} and tensor_parallel_size=1, or use "
            f"vold_pl.sharding.FSDP2Strategy.")
    return mesh["data_parallel"]


def prepare_model(model: nn.Module, trainer, activation_checkpointing: bool = False) -> nn.Module:
    """Make the trainable model ready for the trainer's strategy (call from ``configure_model``).

    ModelParallelStrategy: FSDP2 sharding (:func:`shard_model`) plus the backbone hooks. Any multi-rank
    strategy (DDP too): the dummy visual forward for image-free batches. Single process: nothing.
    """
    if trainer is None:
        if activation_checkpointing:
            enable_activation_checkpointing(model)
        return model
    check_strategy(trainer.strategy)
    cfg = sharding_config(trainer)
    ac = cfg.activation_checkpointing if cfg.activation_checkpointing is not None else activation_checkpointing
    mesh = fsdp_mesh(trainer)
    if mesh is not None:
        shard_model(model, mesh, mixed_precision_policy(cfg.mixed_precision, mesh.device_type),
                    reshard_after_forward=cfg.reshard_after_forward, activation_checkpointing=ac)
    elif ac:
        enable_activation_checkpointing(model)
    if trainer.world_size > 1 and cfg.dummy_visual:
        install_backbone_hooks(model, fsdp_root=model if mesh is not None else None, dummy_visual=True)
    return model



def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization_method", None) is not None or bool(getattr(model, "is_quantized", False))


def shards_frozen(model: nn.Module, trainer) -> bool:
    """Whether :func:`prepare_frozen` shards ``model`` (else it replicates it); ``model`` may be on the meta device."""
    if trainer is None or fsdp_mesh(trainer) is None or is_quantized(model):
        return False
    cfg = sharding_config(trainer)
    mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return cfg.frozen == "shard" or (cfg.frozen == "auto" and mb >= cfg.replicate_frozen_below_mb)


def prepare_frozen(model: nn.Module, trainer, device: torch.device) -> nn.Module:
    """Shard a frozen model like the student, or replicate it on ``device`` (see :class:`ShardingConfig`)."""
    if trainer is None:
        return model if is_quantized(model) else model.to(device)
    cfg = sharding_config(trainer)
    mesh = fsdp_mesh(trainer)
    if shards_frozen(model, trainer):
        shard_model(model, mesh, mixed_precision_policy(cfg.mixed_precision, mesh.device_type),
                    reshard_after_forward=True)
        install_backbone_hooks(model, fsdp_root=model, dummy_visual=cfg.dummy_visual and trainer.world_size > 1)
        return model
    if not is_quantized(model):
        model = model.to(device)
    return model



def is_fsdp2(model: torch.nn.Module) -> bool:
    return is_fsdp2_params(model.parameters())



def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU; every rank must call it when the model is sharded."""
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def is_fsdp2_params(params) -> bool:
    """Whether any of ``params`` is an FSDP2 shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)
