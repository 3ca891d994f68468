"""The full-vocabulary OPD KL (``opd.estimator: full``) in bounded memory.

``sum_v pi_theta(v) (log pi_theta(v) - log pi_T(v))`` at every completion position needs both models' whole
next-token distributions. Kept as ``[N, L, V]`` float32 logits for the whole step, the teacher's alone is
``16 x 1024 x 151936 x 4`` bytes ~ 10 GB at real size, plus the student's. Here, per micro-batch:

- the teacher runs inside the micro-batch loop (no grad), each of its prompts once per group (shared prefix,
  :func:`~vold_pl.rl.logprobs.shared_prefix_hidden`), and only its final hidden states ``[n, l, H_T]`` are kept;
- the student's final hidden states ``[n, l, H]`` come from the same forward that gives its token log-probs;
- the KL is computed slab by slab: ``chunk`` positions at a time, both heads applied to the slab, the student's
  slab recomputed in backward (``torch.utils.checkpoint``), so at most one ``[chunk, V]`` slab of each model's
  logits (and the few float32 temporaries of :func:`~vold_pl.rl.losses.full_reverse_kl`) is alive.

The values are those of :func:`~vold_pl.rl.losses.full_reverse_kl` on the whole logits (same ops per slab,
``top_k`` included); ``tests/test_full_kl.py`` checks the KL, the loss and the gradient against that path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from vold_pl.rl.logprobs import _as_head_fn, mask_blocked, rollout_hidden, shared_prefix_hidden
from vold_pl.rl.losses import full_reverse_kl
from vold_pl.rl.rollout_types import Rollout

__all__ = ["sliced_full_kl", "teacher_hidden", "teacher_token_logprobs_shared", "PolicyScores",
           "policy_scores_and_full_kl"]


def sliced_full_kl(student_hidden: torch.Tensor, student_head, teacher_hidden: torch.Tensor, teacher_head,
                   temperature: float = 1.0, blocked_ids: tuple[int, ...] = (), top_k: int | None = None,
                   chunk_size: int = 1024, mask: torch.Tensor | None = None,
                   kl_fn: Callable[..., torch.Tensor] = full_reverse_kl) -> torch.Tensor:
    """Per-position KL ``[n, l]`` (``kl_fn``: :func:`~vold_pl.rl.losses.full_reverse_kl`, or
    :func:`~vold_pl.rl.losses.full_forward_kl`) from the two models' final hidden states ``[n, l, H]`` /
    ``[n, l, H_T]`` (aligned: position t predicts completion token t), one ``[chunk_size, V]`` slab of logits at
    a time.
    Differentiable w.r.t. the student (hidden states and head); the teacher is a constant.

    ``mask [n, l]``: the completion tokens. Outside it the teacher's logits are replaced by the student's own
    (a KL of exactly 0 in value and gradient), so a teacher scoring padding with ``-inf``/NaN never puts
    ``0 * NaN`` into the gradient (as :func:`vold_pl.rl.objective.opd_grpo_loss` does for the whole logits)."""
    n, l, _ = student_hidden.shape
    if teacher_hidden.shape[:2] != (n, l):
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} cover different positions")
    s_head, t_head = _as_head_fn(student_head), _as_head_fn(teacher_head)
    flat_s = student_hidden.reshape(n * l, -1)  # [M, H]
    flat_t = teacher_hidden.detach().reshape(n * l, -1)  # [M, H_T]

    flat_pad = (~mask.bool()).reshape(n * l) if mask is not None else None  # [M]

    def slab(h_s: torch.Tensor, h_t: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        # [c, H], [c, H_T], [c] -> [c]: the sampler's distribution (temperature, blocked ids) for both models
        s_logits = mask_blocked(s_head(h_s).float() / temperature, blocked_ids)  # [c, V]
        with torch.no_grad():
            t_logits = mask_blocked(t_head(h_t).float() / temperature, blocked_ids)  # [c, V]
            if pad is not None:
                t_logits = torch.where(pad.unsqueeze(-1), s_logits.detach(), t_logits)  # [c, V]
        return kl_fn(s_logits, t_logits, top_k=top_k)

    use_ckpt = torch.is_grad_enabled() and student_hidden.requires_grad
    parts = []
    for i in range(0, n * l, chunk_size):
        args = (flat_s[i : i + chunk_size], flat_t[i : i + chunk_size],
                flat_pad[i : i + chunk_size] if flat_pad is not None else None)
        parts.append(checkpoint(slab, *args, use_reentrant=False) if use_ckpt else slab(*args))
    if not parts:
        return student_hidden.new_zeros((n, l), dtype=torch.float32)
    return torch.cat(parts).view(n, l)  # [n, l]


@torch.no_grad()
def teacher_hidden(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_start: int, group_size: int) -> tuple[torch.Tensor, torch.nn.Module]:
    """The teacher's final hidden states predicting each completion token, ``[n, l, H_T]``, and its LM head.

    ``input_ids / attention_mask [n, S + l]``: the teacher prompt (left-padded, ``S`` columns) then the student's
    completion, ``n`` rows group-contiguous. With ``group_size`` G > 1 (whole groups) each teacher prompt runs
    once per group (rows ``0, G, 2G, ...`` carry it)."""
    from vold_pl.models.inputs import text_positions
    from vold_pl.rl.logprobs import backbone_and_head

    S = completion_start
    backbone, head = backbone_and_head(teacher)
    G = group_size if input_ids.size(0) % group_size == 0 else 1
    p_ids, p_mask = input_ids[::G, :S], attention_mask[::G, :S]  # [n/G, S]
    c_ids, c_mask = input_ids[:, S:], attention_mask[:, S:]  # [n, l]
    if backbone is None or c_ids.size(1) == 0:
        out = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True,
                      logits_to_keep=1)
        return out.hidden_states[-1][:, S - 1 : -1], head
    return shared_prefix_hidden(teacher, backbone, p_ids, p_mask, c_ids, c_mask, G, text_positions(p_mask), {}), head


@torch.no_grad()
def teacher_token_logprobs_shared(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                  completion_start: int, group_size: int, temperature: float = 1.0,
                                  chunk_size: int = 1024, blocked_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """``log pi_T(o_t | q_T, o_<t)`` ``[n, l]`` for the k1 estimator, each teacher prompt run once per group
    (:func:`teacher_hidden`); the numbers of :func:`~vold_pl.rl.teacher.teacher_token_logprobs` on the G-times
    repeated prompts."""
    from vold_pl.rl.logprobs import token_logprobs_from_hidden

    hidden, head = teacher_hidden(teacher, input_ids, attention_mask, completion_start, group_size)  # [n, l, H_T]
    return token_logprobs_from_hidden(hidden, head, input_ids[:, completion_start:], chunk_size=chunk_size,
                                      temperature=temperature, blocked_ids=blocked_ids)


class PolicyScores(NamedTuple):
    """What :func:`policy_scores_and_full_kl` gives for a micro-batch, each ``[n, l]``."""

    logp: torch.Tensor  # log π_θ of the sampled tokens (differentiable)
    entropy: torch.Tensor  # the policy's entropy per position
    kl: torch.Tensor  # the full-vocabulary KL per position (differentiable)
    teacher_logp: torch.Tensor | None  # log π_T of the sampled tokens (no gradient); None unless asked for


def policy_scores_and_full_kl(model: torch.nn.Module, rollout: Rollout, t_hidden: torch.Tensor, t_head,
                              temperature: float, chunk_size: int, top_k: int | None = None,
                              teacher_tokens: bool = False,
                              kl_fn: Callable[..., torch.Tensor] = full_reverse_kl) -> PolicyScores:
    """One policy forward for both the token scores and the full KL of a (micro-batch) rollout: ``logp``,
    ``entropy`` (slabs recomputed in backward, as the trainer's scoring) and ``kl`` (``kl_fn``: the
    full-vocabulary reverse KL, or the forward one).

    ``teacher_tokens``: also the teacher's log-probs of the sampled tokens (``teacher_logp``), from the same
    hidden states: an ``opd.horizon`` other than ``all`` finds a rollout's first divergence by their k1. Without
    it they are not computed (a head pass over every slab that ``horizon: all`` does not need)."""
    from vold_pl.rl.logprobs import token_logprobs_from_hidden

    hidden, head = rollout_hidden(model, rollout)  # [n, l, H]
    blocked = tuple(rollout.blocked_ids)
    logp, ent = token_logprobs_from_hidden(hidden, head, rollout.completion_ids, chunk_size=chunk_size,
                                           temperature=temperature, return_entropy=True, checkpoint_chunks=True,
                                           blocked_ids=blocked)
    t_hidden = t_hidden[:, : hidden.size(1)]  # [n, l, H_T]
    kl = sliced_full_kl(hidden, head, t_hidden, t_head, temperature, blocked, top_k, chunk_size,
                        mask=rollout.completion_mask, kl_fn=kl_fn)
    if not teacher_tokens:
        return PolicyScores(logp, ent, kl, None)
    with torch.no_grad():
        t_logp = token_logprobs_from_hidden(t_hidden, t_head, rollout.completion_ids, chunk_size=chunk_size,
                                            temperature=temperature, blocked_ids=blocked)  # [n, l]
    return PolicyScores(logp, ent, kl, t_logp)
