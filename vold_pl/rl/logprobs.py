"""Memory-lean per-token log-probabilities of given tokens under a causal LM.

GRPO and on-policy distillation (METHODS.md §2-3) only need ``log pi(o_t | o_<t)`` of the *sampled* token,
not the whole ``[N, L, V]`` distribution. With the Qwen2 vocabulary (V = 151,936) the full float32 logits of
a batch of 16 x 4k-token completions would take ~40 GB, so this module projects the final hidden states
through the LM head chunk by chunk, keeps one ``[chunk, V]`` slab alive at a time, and gathers at once (the
"selective log-softmax" idea of TRL, and Liger/torchtune's chunked output projection).

Logits are divided by the sampling temperature before the softmax so that the log-probs are those of the
distribution the rollouts were drawn from (otherwise rho != 1 on-policy and the teacher KL is off-policy).
For the same reason every function takes ``blocked_ids``: the token ids the sampler never emits (the vision
placeholders, :func:`vold_pl.rl.rollout_types.blocked_token_ids`). Their logits are set to ``-inf`` before the
softmax, so the scored distribution is the sampler's, renormalised on the allowed tokens. Top-k / top-p are
*not* applied in scoring (as TRL and verl): their support changes with the weights, so log-probs and KLs of
the truncated distribution are not differentiable in the tokens they drop; use them off (the default) in RL.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vold_pl.models.inputs import IMAGE_INPUT_KEYS, base_model, cache_kwarg, prompt_positions
from vold_pl.rl.prefix_cache import cache_kept_under_checkpointing, completion_cache, prompt_cache
from vold_pl.rl.rollout_types import Rollout, repeat_images

__all__ = [
    "selective_log_softmax",
    "token_logprobs_from_logits",
    "token_logprobs_from_hidden",
    "model_token_logprobs",
    "backbone_and_head",
    "mask_blocked",
    "concat_prompt_completion",
    "shared_prefix_token_logprobs",
    "rollout_token_logprobs",
    "rollout_model_inputs",
    "rollout_hidden",
    "shared_prefix_hidden",
]

LMHead = Union[nn.Module, torch.Tensor]


BlockedIds = Sequence[int] | None


def _blocked_index(blocked_ids: BlockedIds, device: torch.device) -> torch.Tensor | None:
    if blocked_ids is None or len(blocked_ids) == 0:
        return None
    if isinstance(blocked_ids, torch.Tensor):
        return blocked_ids.to(device=device, dtype=torch.long)
    return torch.tensor(list(blocked_ids), dtype=torch.long, device=device)


def mask_blocked(logits: torch.Tensor, blocked_ids: BlockedIds) -> torch.Tensor:
    """``logits [..., V]`` with the ``blocked_ids`` columns set to ``-inf`` (out of place; unchanged if none).

    A softmax of the result is the sampler's distribution renormalised on the tokens it may emit; the
    gradient w.r.t. the blocked columns is exactly 0."""
    idx = _blocked_index(blocked_ids, logits.device)
    return logits if idx is None else logits.index_fill(-1, idx, float("-inf"))


def concat_prompt_completion(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The one place a left-padded prompt and a right-padded completion become one scored sequence.

    ``prompt_ids, prompt_mask [N, P]`` (already one row per completion), ``completion_ids, completion_mask
    [N, L]``; returns ``ids [N, P + L]``, ``attention_mask [N, P + L]`` (the prompt mask's dtype) and, for a
    VLM, ``mm_token_type_ids [N, P + L]`` (generated tokens are text: type 0), else ``None``."""
    ids = torch.cat([prompt_ids, completion_ids], 1)  # [N, P + L]
    attn = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], 1)  # [N, P + L]
    mm = None
    if mm_token_type_ids is not None:
        mm = torch.cat([mm_token_type_ids, torch.zeros_like(completion_ids, dtype=mm_token_type_ids.dtype)], 1)
    return ids, attn, mm


def _logp_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
    blocked_ids: BlockedIds = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # logits [M, V] (any dtype), targets [M] -> logp [M], entropy [M] (empty if not asked).
    raw = logits.float()  # [M, V]; upcast because bf16 log-softmax loses ~2 digits on large vocabularies
    if temperature != 1.0:
        raw = raw / temperature
    x = mask_blocked(raw, blocked_ids)  # [M, V], -inf at the ids the sampler never emits
    lse = torch.logsumexp(x, dim=-1)  # [M]
    # Negative ids (e.g. -100 padding) would break gather; their values are masked later anyway.
    logp = x.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - lse  # [M]
    if not with_entropy:
        return logp, logp.new_empty(0)
    # H = lse - sum_v softmax(x)_v x_v, avoids materialising log_softmax separately. The finite ``raw`` stands
    # in for x: the blocked entries have probability exactly 0, and 0 * -inf would be NaN (in backward too).
    ent = lse - (torch.softmax(x, dim=-1) * raw).sum(-1)  # [M]
    return logp, ent


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024,
    blocked_ids: BlockedIds = None,
) -> torch.Tensor:
    """``log_softmax(logits / T).gather(-1, index)`` without a full float32 ``[..., V]`` copy.

    Works in slabs of ``chunk_size`` positions, each upcast to float32 and reduced with the logsumexp trick
    (``x_i - logsumexp(x)``). Shapes: ``logits [..., V], index [...] -> [...]``.
    """
    lead = index.shape  # [...]
    flat = logits.reshape(-1, logits.shape[-1])  # [M, V]
    idx = index.reshape(-1)  # [M]
    out = [
        _logp_and_entropy(flat[s : s + chunk_size], idx[s : s + chunk_size], temperature, False, blocked_ids)[0]
        for s in range(0, flat.shape[0], chunk_size)
    ]
    return torch.cat(out).reshape(lead) if out else flat.new_zeros(lead, dtype=torch.float32)


def token_logprobs_from_logits(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    blocked_ids: BlockedIds = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Simple path when the logits already exist. ``logits [N, L, V]`` must already be aligned with
    ``target_ids [N, L]`` (``logits[:, t]`` scores ``target_ids[:, t]``). Returns ``logp [N, L]`` float32 (and
    ``entropy [N, L]``)."""
    n, l = target_ids.shape
    logp, ent = _logp_and_entropy(logits.reshape(n * l, -1), target_ids.reshape(-1), temperature, return_entropy,
                                  blocked_ids)
    return (logp.view(n, l), ent.view(n, l)) if return_entropy else logp.view(n, l)


def _as_head_fn(lm_head: LMHead) -> Callable[[torch.Tensor], torch.Tensor]:
    # A module is called (keeps LoRA/quantised heads working); a bare [V, H] weight is a bias-free linear.
    if isinstance(lm_head, nn.Module):
        return lm_head
    if isinstance(lm_head, torch.Tensor) and lm_head.dim() == 2:
        return lambda h: F.linear(h, lm_head)
    raise TypeError(f"lm_head must be an nn.Module or a [V, H] weight tensor, got {type(lm_head)}")


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head: LMHead,
    target_ids: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    return_entropy: bool = False,
    checkpoint_chunks: bool = False,
    blocked_ids: BlockedIds = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs of ``target_ids`` from final hidden states, one ``[chunk_size, V]`` logits slab at a time.

    Args:
        hidden: ``[N, L, H]`` final (post-norm) hidden states, already aligned so ``hidden[:, t]`` predicts
            ``target_ids[:, t]``.
        lm_head: the output projection (``nn.Linear`` or any module) or its ``[V, H]`` weight.
        target_ids: ``[N, L]`` token ids to score.
        chunk_size: number of *positions* (over the flattened ``N * L``) per slab.
        temperature: sampling temperature the logits are divided by.
        return_entropy: also return the entropy of each position's distribution.
        checkpoint_chunks: recompute each slab in backward (``torch.utils.checkpoint``). Without it autograd
            keeps every slab's float32 logits for backward, so only the forward peak is bounded; with it the
            backward peak is one slab too, at the cost of one extra head matmul per slab.
        blocked_ids: token ids the sampler never emits: scored as ``-inf`` logits (see the module docstring).

    Returns: ``logp [N, L]`` float32, differentiable w.r.t. ``hidden`` and the head (and ``entropy [N, L]``).
    """
    n, l, h = hidden.shape
    head = _as_head_fn(lm_head)
    flat_h = hidden.reshape(n * l, h)  # [M, H]
    flat_t = target_ids.reshape(n * l)  # [M]

    def slab(h_c: torch.Tensor, t_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # h_c [c, H], t_c [c] -> ([c], [c])
        return _logp_and_entropy(head(h_c), t_c, temperature, return_entropy, blocked_ids)

    use_ckpt = checkpoint_chunks and torch.is_grad_enabled()
    logps, ents = [], []
    for s in range(0, n * l, chunk_size):
        h_c, t_c = flat_h[s : s + chunk_size], flat_t[s : s + chunk_size]
        lp, en = checkpoint(slab, h_c, t_c, use_reentrant=False) if use_ckpt else slab(h_c, t_c)
        logps.append(lp)
        ents.append(en)
    if not logps:  # L == 0: nothing to score
        empty = hidden.new_zeros((n, l), dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    logp = torch.cat(logps).view(n, l)  # [N, L]
    return (logp, torch.cat(ents).view(n, l)) if return_entropy else logp


def backbone_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """``(backbone, lm_head)`` of a HF causal LM or Qwen2.5-VL: the module whose ``last_hidden_state`` is the final
    (post-norm) hidden state, or ``None`` when the model has no ``.model``, and the output projection."""
    # PEFT wraps the HF model; its LoRA layers live inside the modules, so the unwrapped backbone still uses them.
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head = head if head is not None else getattr(base, "lm_head", None)
    if head is None:
        raise AttributeError(f"{type(base).__name__} has no lm_head / output embeddings")
    # Qwen2/Qwen3ForCausalLM.model -> Qwen2Model; Qwen2_5_VLForConditionalGeneration.model -> Qwen2_5_VLModel
    # (which takes pixel_values / image_grid_thw). Both return last_hidden_state after the final norm.
    return getattr(base, "model", None), head


def model_token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    completion_start: Union[int, torch.Tensor] = 1,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    checkpoint_chunks: bool = False,
    return_entropy: bool = False,
    blocked_ids: BlockedIds = None,
    **model_inputs,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs of the completion tokens of ``input_ids`` under a HF causal LM or Qwen2.5-VL, lean on memory.

    Runs the backbone (``model.model``) for the final hidden states, then applies the LM head only at the
    completion positions, chunked (:func:`token_logprobs_from_hidden`). The causal shift: the hidden state at
    position ``t - 1`` predicts token ``t``.

    Args:
        model: e.g. ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Qwen2_5_VLForConditionalGeneration``
            (optionally PEFT-wrapped). Models without ``.model`` fall back to ``output_hidden_states``.
        input_ids: ``[N, T]`` prompt (left-padded) followed by completion (right-padded).
        attention_mask: ``[N, T]``. Left padding shifts absolute positions by a per-row constant, which RoPE
            attention is invariant to; pass ``position_ids`` in ``model_inputs`` to override.
        completion_start: int ``s >= 1``, the column where completions begin: returns ``[N, T - s]`` for
            tokens ``input_ids[:, s:]``. Or a ``[N, T]`` bool completion mask: ``s`` is its first column with
            any True, and entries outside the mask are set to 0.
        blocked_ids: token ids the sampler never emits, scored as ``-inf`` logits (module docstring).
        model_inputs: forwarded to the backbone (``pixel_values``, ``image_grid_thw``, ``position_ids``...).

    Returns: ``logp [N, T - s]`` float32 aligned with the last ``T - s`` columns of ``input_ids`` (and
    ``entropy [N, T - s]``).
    """
    comp_mask = None
    if isinstance(completion_start, torch.Tensor):
        comp_mask = completion_start.bool()  # [N, T]
        cols = comp_mask.any(0).nonzero()
        start = int(cols[0]) if cols.numel() else input_ids.shape[1]
    else:
        start = int(completion_start)
    if not 1 <= start <= input_ids.shape[1]:
        raise ValueError(f"completion must start at column >= 1 (a token needs a context), got {start}")

    backbone, head = backbone_and_head(model)
    if backbone is not None:
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [N, T, H]
    else:
        # logits_to_keep=1 stops the wrapper from materialising the full [N, T, V] logits we avoid here.
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1, **model_inputs)
        hidden = out.hidden_states[-1]  # [N, T, H]

    result = token_logprobs_from_hidden(
        hidden[:, start - 1 : -1],  # [N, T - s, H]
        head,
        input_ids[:, start:],  # [N, T - s]
        chunk_size=chunk_size,
        temperature=temperature,
        return_entropy=return_entropy,
        checkpoint_chunks=checkpoint_chunks,
        blocked_ids=blocked_ids,
    )
    if comp_mask is None:
        return result
    keep = comp_mask[:, start:]  # [N, T - s]
    zero = torch.zeros((), dtype=torch.float32, device=input_ids.device)
    if return_entropy:
        return torch.where(keep, result[0], zero), torch.where(keep, result[1], zero)
    return torch.where(keep, result, zero)


# ---------------------------------------------------------------------------------------------------------------
# Scoring a rollout (the sampler's output, :class:`~vold_pl.rl.rollout_types.Rollout`), each prompt run once
# per group


def _checkpointing(model: nn.Module) -> bool:
    """Activation checkpointing on (HF then turns ``use_cache`` off in training forwards)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def shared_prefix_hidden(model: torch.nn.Module, backbone: torch.nn.Module, prompt_ids: torch.Tensor,
                         prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                         group_size: int, positions: torch.Tensor, mm: dict[str, Any]) -> torch.Tensor:
    """The final hidden states that predict each completion token, ``[N, L, H]`` (``hidden[:, t]`` scores
    ``completion_ids[:, t]``), with each of the B prompts (and its images) run once and its KV cache expanded G
    times. ``positions``: the prompts' position ids (:func:`~vold_pl.models.inputs.prompt_positions`); ``mm``:
    the prompts' image inputs (empty for a text model). Used by :func:`shared_prefix_token_logprobs` and the
    full-vocabulary KL (:mod:`vold_pl.rl.full_kl`)."""
    G, base = group_size, base_model(model)
    L = completion_ids.size(1)
    grad_ckpt = torch.is_grad_enabled() and base.training and _checkpointing(base)
    cache_key = cache_kwarg(backbone)
    pre = {k: mm[k] for k in IMAGE_INPUT_KEYS if k in mm} if "pixel_values" in mm else {}
    # Recompute-safe caches (vold_pl.rl.prefix_cache): under activation checkpointing too, the prompt (and its
    # images) runs once per group, checkpointed layer by layer like the rest of the forward.
    n_layers = base.config.get_text_config(decoder=True).num_hidden_layers
    with cache_kept_under_checkpointing(base, enabled=grad_ckpt):
        cache = prompt_cache(n_layers)
        out = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                       **pre, **{cache_key: cache})
        h_last = out.last_hidden_state[:, -1]  # [B, H]: left padding puts every prompt's last token last
        del out
        cache = completion_cache(cache, G)  # [B, ...] -> [N, ...], differentiable
        bdim = positions.dim() - 2
        steps = torch.arange(1, L + 1, device=prompt_ids.device)  # [L]
        comp_pos = positions[..., -1:].repeat_interleave(G, dim=bdim) + steps  # [N, L] or [4, N, L]
        attn = torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask.to(prompt_mask.dtype)], 1)  # [N, P+L]
        out = backbone(input_ids=completion_ids, attention_mask=attn, position_ids=comp_pos, use_cache=True,
                       **{cache_key: cache})
    # hidden[t] predicts token t: the prompt's last state for t = 0, the completion's state t - 1 after that.
    hidden = torch.cat([h_last.repeat_interleave(G, 0).unsqueeze(1), out.last_hidden_state[:, :-1]], 1)  # [N, L, H]
    del out, cache
    return hidden


def shared_prefix_token_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_size: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    checkpoint_chunks: bool = False,
    blocked_ids: tuple[int, ...] = (),
    **prompt_model_inputs,
):
    """``log pi(o_t | q, o_<t)`` of G completions per prompt, running each prompt (and its images) ONCE.

    The same numbers as :func:`model_token_logprobs` on the ``[N, P + L]`` concatenation of
    G-times repeated prompts and completions (to float rounding), and differentiable the same way, but the
    prompt's forward (vision encoder included) runs on B rows instead of N = B*G: its KV cache is computed with
    autograd on, expanded G times (``repeat_interleave``, so gradients from the G samples add up in the prompt
    activations), and the completions run on top of it. With prompts longer than completions, as in most RL
    prompts, this removes most of the policy, reference and teacher forward and backward FLOPs.

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts, one row per group.
        completion_ids, completion_mask: ``[N, L]`` right-padded completions, group-contiguous.
        group_size: G.
        blocked_ids: token ids the sampler never emits; scored as ``-inf`` logits
            (:attr:`~vold_pl.rl.rollout_types.Rollout.blocked_ids`).
        prompt_model_inputs: the prompts' extra model inputs, unrepeated (``pixel_values``, ``image_grid_thw``,
            ``mm_token_type_ids``); ignored for a text-only model.

    Returns ``logp [N, L]`` float32 (and ``entropy [N, L]``), unmasked like ``model_token_logprobs`` with an int
    ``completion_start``. Under activation checkpointing the prompt pass is checkpointed too and its cache kept
    (:mod:`vold_pl.rl.prefix_cache`). Falls back to ``model_token_logprobs`` for VLMs without Qwen2-VL-style
    ``get_rope_index``.
    """
    G = group_size
    base = base_model(model)
    vision = getattr(base.config, "vision_config", None) is not None
    B, P = prompt_ids.shape
    N, L = completion_ids.shape
    if N != B * G:
        raise ValueError(f"{N} completion rows for {B} prompts x G={G}")
    mm = {k: v for k, v in prompt_model_inputs.items() if v is not None} if vision else {}
    positions = prompt_positions(base, prompt_ids, prompt_mask, mm, vision)
    backbone, head = backbone_and_head(model)
    if positions is None or backbone is None or L == 0:
        mm_types = mm["mm_token_type_ids"].repeat_interleave(G, 0) if "mm_token_type_ids" in mm else None
        ids, attn, mm_types = concat_prompt_completion(prompt_ids.repeat_interleave(G, 0),
                                                       prompt_mask.repeat_interleave(G, 0), completion_ids,
                                                       completion_mask, mm_types)  # [N, P + L]
        extra = {}
        if vision:
            extra.update(repeat_images(mm, G))
            if mm_types is not None:
                extra["mm_token_type_ids"] = mm_types
        return model_token_logprobs(model, ids, attn, P, temperature=temperature, chunk_size=chunk_size,
                                    return_entropy=return_entropy, checkpoint_chunks=checkpoint_chunks,
                                    blocked_ids=blocked_ids, **extra)
    hidden = shared_prefix_hidden(model, backbone, prompt_ids, prompt_mask, completion_ids, completion_mask, G,
                                  positions, mm)  # [N, L, H]
    return token_logprobs_from_hidden(hidden, head, completion_ids, chunk_size=chunk_size, temperature=temperature,
                                      return_entropy=return_entropy, checkpoint_chunks=checkpoint_chunks,
                                      blocked_ids=blocked_ids)


def rollout_token_logprobs(model: torch.nn.Module, rollout: Rollout, *, temperature: float = 1.0,
                           chunk_size: int = 1024, return_entropy: bool = False, checkpoint_chunks: bool = False):
    """Log-probs ``[N, L]`` of a rollout's completion tokens under ``model`` (the policy or the reference),
    each prompt run once per group (:func:`shared_prefix_token_logprobs`). Rollouts without ``prompts`` take the
    G-times repeated path (:func:`model_token_logprobs`): the same numbers.

    The distribution scored is the sampler's: ``temperature`` (pass the sampling one) and the rollout's
    ``blocked_ids`` removed; top-k / top-p are not applied (see the module docstring)."""
    kw = dict(temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy,
              checkpoint_chunks=checkpoint_chunks, blocked_ids=tuple(rollout.blocked_ids))
    if rollout.prompts is not None:
        pr = dict(rollout.prompts)
        return shared_prefix_token_logprobs(model, pr.pop("input_ids"), pr.pop("attention_mask"),
                                            rollout.completion_ids, rollout.completion_mask, rollout.group_size,
                                            **pr, **kw)
    vision = getattr(base_model(model).config, "vision_config", None) is not None
    ids, attn, extra = rollout_model_inputs(rollout, vision)
    return model_token_logprobs(model, ids, attn, rollout.prompt_ids.size(1), **kw, **extra)


def rollout_hidden(model: torch.nn.Module, rollout: Rollout) -> tuple[torch.Tensor, nn.Module]:
    """The final hidden states that predict a rollout's completion tokens, ``[N, L, H]``, and the model's LM
    head: each prompt run once per group where :func:`shared_prefix_hidden` applies, else the G-times repeated
    forward (the same numbers). For scores that need the whole next-token distribution (the full-vocabulary
    KL, :mod:`vold_pl.rl.full_kl`), projected slab by slab by the caller."""
    base = base_model(model)
    vision = getattr(base.config, "vision_config", None) is not None
    backbone, head = backbone_and_head(model)
    N, L = rollout.completion_ids.shape
    if rollout.prompts is not None and backbone is not None and L > 0:
        pr = dict(rollout.prompts)
        ids, mask = pr.pop("input_ids"), pr.pop("attention_mask")
        mm = {k: v for k, v in pr.items() if v is not None} if vision else {}
        positions = prompt_positions(base, ids, mask, mm, vision)
        if positions is not None:
            return shared_prefix_hidden(model, backbone, ids, mask, rollout.completion_ids, rollout.completion_mask,
                                        rollout.group_size, positions, mm), head
    ids, attn, extra = rollout_model_inputs(rollout, vision)
    start = rollout.prompt_ids.size(1)
    if backbone is not None:
        out = backbone(input_ids=ids, attention_mask=attn, use_cache=False, **extra)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [N, P + L, H]
    else:
        out = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True, logits_to_keep=1,
                    **extra)
        hidden = out.hidden_states[-1]
    return hidden[:, start - 1 : -1], head  # [N, L, H]


def rollout_model_inputs(rollout: Rollout, vision: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The G-times repeated prompts followed by the completions, as the model takes them: ``ids [N, P + L]``,
    ``attention_mask [N, P + L]`` and the extra inputs (the repeated images; none for a text model)."""
    extra = dict(rollout.extra) if vision else {}
    ids, attn, mm = concat_prompt_completion(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                             rollout.completion_mask, extra.get("mm_token_type_ids"))
    if mm is not None:
        extra["mm_token_type_ids"] = mm
    return ids, attn, extra
