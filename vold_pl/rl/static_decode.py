"""A decode loop without per-token overhead: a static KV cache, a compilable decode step, EOS checked on device.

:class:`StaticDecodeEngine` is :class:`~vold_pl.rl.cached_sampler.CachedSamplingEngine` (same prefill: once per prompt,
images through the vision tower once, cache expanded G times) with a different decode loop:

- **static KV cache**: every layer's keys/values live in ``[N, kv_heads, C, head_dim]`` buffers allocated once
  (``C`` = prompt + ``max_new_tokens``, rounded up to ``cache_bucket`` so that prompts of nearby lengths reuse
  the same buffers and the same compiled step); a decode step writes its token's K/V at slot ``P + t``
  (``index_copy_`` at an index held in a device tensor) and attends over all ``C`` slots under a boolean key
  mask built on device (prompt padding and unwritten slots masked). Every tensor of the step has the same shape
  at every step: the step can be compiled once and replayed.
- **compiled step** (``compile``): the decoder step (:class:`~vold_pl.rl.cached_sampler._LeanDecoder`'s ops: the model's
  own modules, the HF order) through ``torch.compile``; ``reduce-overhead`` (CUDA graphs) only on CUDA, refused
  with a one-line notice elsewhere (``default`` is used instead).
- **no host sync per token**: finished rows keep decoding pad tokens (as ``generate`` does, and as the eager
  engine with ``compact=False``), EOS is tracked in a device tensor, and the host asks "all done?" only every
  ``eos_check_every`` steps. Sampling (suppression, HF warpers, ``torch.multinomial``) runs eagerly outside the
  compiled step, on the same logits and in the same order as the eager engine, so it draws the same random
  numbers.

Equalities (``tests/test_static_decode.py``): greedy completions equal ``model.generate``'s; sampled completions
equal, for the same seed, the eager engine's with ``compact=False`` (the eager engine with compaction samples
fewer rows once some finish and so draws different random numbers; its outputs have the same distribution).
The static step is built only where :class:`_LeanDecoder` is (Qwen2 / Qwen2.5-VL / Qwen3, SDPA, whole weights:
one device, DDP, or an FSDP2 model inside ``rollout: unshard``) and after the lean decoder's self-check; any
other model decodes through the eager engine's loop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch

from vold_pl.checkpointing import allow_in_checkpoints
from vold_pl.rl.cached_sampler import CachedSamplingEngine, _full_attention_only, _LeanDecoder
from vold_pl.rl.rollout_types import SamplingConfig

__all__ = ["DecodeConfig", "StaticDecodeEngine", "make_engine"]

CompileMode = Literal["none", "default", "reduce-overhead"]


@dataclass
class DecodeConfig:
    """Which decode loop rollouts use.

    Args:
        engine: ``eager`` (default): :class:`~vold_pl.rl.cached_sampler.CachedSamplingEngine`, the reference (finished
            rows dropped from the batch, a host sync per token). ``static``: :class:`StaticDecodeEngine` (static
            KV cache, a compilable step, EOS checked on device every ``eos_check_every`` steps).
        compile: ``static`` only: ``none`` (the static step runs eagerly), ``default`` (``torch.compile`` of the
            step; the first rollout of each shape pays the compilation), ``reduce-overhead`` (``torch.compile``
            with CUDA graphs: on CUDA only; elsewhere a one-line notice and ``default``).
        eos_check_every: ``static`` only: the host checks whether every row has emitted EOS every this many
            steps (1 = every step, as the eager engine; larger = fewer syncs, up to this many - 1 wasted steps
            at the end).
        cache_bucket: ``static`` only: the cache length (prompt + ``max_new_tokens``) is rounded up to a multiple
            of this, and the buffers only grow: batches whose prompts differ in length reuse one compiled step
            (each new length recompiles; masked slots cost a little attention).
    """

    engine: Literal["eager", "static"] = "eager"
    compile: CompileMode = "default"
    eos_check_every: int = 8
    cache_bucket: int = 128

    def __post_init__(self):
        from vold_pl.errors import UserError

        if self.engine not in ("eager", "static"):
            raise UserError(f"decode.engine={self.engine!r}: expected 'eager' or 'static'.")
        if self.compile not in ("none", "default", "reduce-overhead"):
            raise UserError(f"decode.compile={self.compile!r}: expected 'none', 'default' or 'reduce-overhead'.")
        if int(self.eos_check_every) < 1 or int(self.cache_bucket) < 1:
            raise UserError(f"decode.eos_check_every={self.eos_check_every} and decode.cache_bucket="
                            f"{self.cache_bucket} must be >= 1.")


allow_in_checkpoints(DecodeConfig)


def make_engine(tokenizer, cfg: DecodeConfig | None = None):
    """The rollout engine ``cfg`` selects (the eager :class:`CachedSamplingEngine` by default)."""
    cfg = cfg or DecodeConfig()
    if cfg.engine == "static":
        return StaticDecodeEngine(tokenizer, compile=cfg.compile, eos_check_every=cfg.eos_check_every,
                                  cache_bucket=cfg.cache_bucket)
    return CachedSamplingEngine(tokenizer)


class _StaticLayer:
    """One layer's K/V in preallocated ``[N, kv_heads, C, head_dim]`` buffers; ``update`` writes the step's
    token at slot ``at`` (a shared ``[1]`` device tensor) and returns the whole buffers (the key mask hides the
    slots not written yet)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor):
        self.k, self.v, self.at = k, v, at

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        self.k.index_copy_(2, self.at, key_states)  # [N, h, 1, d] into slot ``at``
        self.v.index_copy_(2, self.at, value_states)
        return self.k, self.v


class _StaticDecoder:
    """The static buffers of one (model, rows, cache length) and its (optionally compiled) step."""

    def __init__(self, model, prefill_cache, n_rows: int, capacity: int, mode: CompileMode):
        lean = _LeanDecoder.build(model, prefill_cache)  # validates the structure (None: not a lean model)
        if lean is None:
            raise ValueError("not a lean-decodable model")
        first = prefill_cache.layers[0].keys  # [N, h, P, d]
        device, dtype = first.device, first.dtype
        self.at = torch.zeros(1, dtype=torch.long, device=device)  # slot of the token being decoded
        self.slots = torch.arange(capacity, device=device)  # [C]
        self.key_base = torch.zeros((n_rows, capacity), dtype=torch.bool, device=device)  # [N, C] attendable
        self.layers = []
        for layer in prefill_cache.layers:
            h, d = layer.keys.shape[1], layer.keys.shape[-1]
            # Zeros, not empty: masked slots get weight exactly 0, and 0 * NaN from stale memory would be NaN.
            k = torch.zeros((n_rows, h, capacity, d), dtype=dtype, device=device)
            v = torch.zeros((n_rows, h, capacity, layer.values.shape[-1]), dtype=dtype, device=device)
            if mode == "reduce-overhead":  # the CUDA graph replays on these very buffers
                torch._dynamo.mark_static_address(k)
                torch._dynamo.mark_static_address(v)
            self.layers.append(_StaticLayer(k, v, self.at))
        self.lean = _LeanDecoder(_text_model(model), model.get_output_embeddings(), self.layers)
        self.model_ref, self.capacity, self.mode = model, capacity, mode
        self.step = self._step if mode == "none" else torch.compile(self._step, mode=mode, dynamic=False)

    def load(self, prefill_cache, prompt_mask: torch.Tensor) -> None:
        """Copy the prefill's K/V (``[N, h, P, d]`` per layer) into slots ``0..P-1``; keys: the prompt's mask,
        then every generated slot."""
        P = prompt_mask.size(1)
        for mine, layer in zip(self.layers, prefill_cache.layers):
            mine.k[:, :, :P].copy_(layer.keys)
            mine.v[:, :, :P].copy_(layer.values)
        self.key_base.fill_(True)
        self.key_base[:, :P].copy_(prompt_mask.bool())
        self.at.fill_(P - 1)

    def _step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``tok [N]`` at rope position ``pos [N]``, written at slot ``at`` -> next-token logits ``[N, V]``."""
        keys = self.key_base & (self.slots <= self.at)  # [N, C]: the prompt, and the tokens written so far
        return self.lean.step(tok, pos, keys[:, None, None, :])


def _text_model(model):
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", inner)


class StaticDecodeEngine(CachedSamplingEngine):
    """:class:`~vold_pl.rl.cached_sampler.CachedSamplingEngine`'s prefill, then a static-cache decode loop (module doc).

    Args:
        tokenizer: decodes completions and gives pad/EOS ids.
        compile: ``none`` | ``default`` | ``reduce-overhead`` (CUDA only), see :class:`DecodeConfig`.
        eos_check_every: host check of "every row done" every this many steps.
        cache_bucket: the cache length is rounded up to a multiple of this.
    """

    MAX_SHAPES = 3  # static buffer sets kept (e.g. the training and the validation row counts)

    def __init__(self, tokenizer, compile: CompileMode = "default", eos_check_every: int = 8, cache_bucket: int = 128):
        super().__init__(tokenizer, compact=False)
        self.compile_mode = compile
        self.eos_check_every, self.cache_bucket = int(eos_check_every), int(cache_bucket)
        self._probing = False
        self._decoders: dict[tuple, _StaticDecoder] = {}  # static buffers + step per (model, head, rows, mode)
        self.host_syncs = 0  # host reads of the EOS state in the last decode loop (a test counts them)

    def _mode(self, device: torch.device) -> CompileMode:
        if self.compile_mode == "reduce-overhead" and device.type != "cuda":
            if not getattr(self, "_told_mode", False):
                print(f"[vold-pl] decode.compile: reduce-overhead needs CUDA (CUDA graphs); on {device.type} the "
                      "static decode step is compiled with mode 'default'.", file=sys.stderr, flush=True)
                self._told_mode = True
            return "default"
        return self.compile_mode

    def _lean_probe(self, model):
        self._probing = True  # the self-check compares the eager lean loop with generate
        try:
            return super()._lean_probe(model)
        finally:
            self._probing = False

    def _static_decoder(self, model, cache, n_rows: int, capacity: int) -> _StaticDecoder | None:
        """The buffers and compiled step for ``n_rows`` rows and at least ``capacity`` slots. Kept per (model,
        head, rows, mode) for the engine's life (at most :attr:`MAX_SHAPES`), their capacity only growing: a run
        compiles a handful of steps (train and validation row counts, a few growths), never one per batch."""
        p = next(model.parameters())
        mode = self._mode(p.device)
        key = (id(model), id(model.get_output_embeddings()), n_rows, mode, str(p.dtype), p.device.type)
        dec = self._decoders.get(key)
        if dec is not None and dec.capacity >= capacity and dec.model_ref is model:
            return dec
        if dec is not None:
            capacity = max(capacity, dec.capacity)
        self._decoders.pop(key, None)  # free the old buffers before allocating new ones
        while len(self._decoders) >= self.MAX_SHAPES:
            self._decoders.pop(next(iter(self._decoders)))
        try:
            dec = _StaticDecoder(model, cache, n_rows, capacity, mode)
        except (ValueError, AttributeError):
            return None
        self._decoders[key] = dec
        return dec

    def _decode(self, model, cache, cache_key: str, logits: torch.Tensor, mask: torch.Tensor, last_pos: torch.Tensor,
                G: int, sampling: SamplingConfig, device, logprobs: bool):
        """The static loop (same arguments and results as the eager engine's ``_decode``)."""
        N, P = mask.shape
        L = sampling.max_new_tokens
        usable = (not self._probing and self._lean_ok and cache is not None
                  and getattr(model.config, "_attn_implementation", None) == "sdpa" and _full_attention_only(model))
        if usable and last_pos.dim() == 3 and not bool((last_pos[1:] == last_pos[1:2]).all()):
            usable = False  # rope positions that differ across t/h/w at a text token: the lean step's rope is 1-D
        dec = None
        if usable:
            capacity = -(-(P + L) // self.cache_bucket) * self.cache_bucket
            dec = self._static_decoder(model, cache, N, capacity)
        if dec is None:
            return super()._decode(model, cache, cache_key, logits, mask, last_pos, G, sampling, device, logprobs)
        self.last_decode_path = "static"
        dec.load(cache, mask)
        pad = self.tokenizer.pad_token_id
        bdim = last_pos.dim() - 2
        if last_pos.size(bdim) != N:
            last_pos = last_pos.repeat_interleave(G, dim=bdim)
        pos = (last_pos[1] if last_pos.dim() == 3 else last_pos).reshape(N).clone()  # [N] rope position
        out_tok, out_lp, eos, suppress, warpers, inv_t = self._loop_state(N, sampling, device, logprobs)
        alive = torch.ones(N, dtype=torch.bool, device=device)  # rows without EOS yet
        live = torch.zeros((), dtype=torch.long, device=device)  # steps begun with a row still running
        steps, self.host_syncs = 0, 0
        for t in range(L):
            live += alive.any()
            # The eager engine's sampling step (compact=False branch): same logits, same random draws.
            tok, logp_all = self._pick(logits, suppress, warpers, inv_t, sampling, logprobs)  # [N], [N, V]
            tok = torch.where(alive, tok, pad)
            out_tok[:, t] = tok
            if logprobs:
                out_lp[:, t] = torch.where(alive, logp_all.gather(1, tok.unsqueeze(1)).squeeze(1), 0.0)
            alive &= ~torch.isin(tok, eos)
            steps = t + 1
            if t == L - 1:
                break
            if steps % self.eos_check_every == 0:
                self.host_syncs += 1
                if not bool(alive.any()):  # the only host sync: every ``eos_check_every`` steps
                    break
            dec.at.add_(1)
            pos = pos + 1
            logits = dec.step(tok, pos).float()  # [N, V]
        # Steps after the last row's EOS decoded pad only: cut them, so the width is the eager loop's.
        steps = int(live)
        return out_tok[:, :steps], out_lp[:, :steps] if logprobs else None
