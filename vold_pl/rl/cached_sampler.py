"""The cached sampler: G completions per prompt from a lean batched sampling loop over the HF model.

:class:`CachedSamplingEngine` (the trainers' engine, :func:`default_engine`) prefills each prompt ONCE (for
Qwen2.5-VL: the vision encoder runs once per image, not once per sample) and expands the KV cache G times; rows
that emitted EOS are dropped from the batch and the cache, so finished sequences stop costing compute. Greedy
output equals ``model.generate`` token for token; sampling uses HF's own temperature / top-k / top-p warpers.

In this module with it, the two pieces only it uses: the KV cache layer that appends into preallocated buffers
(:func:`_growing_cache`), and the lean decode step (:class:`_LeanDecoder`) for the architectures in
:data:`LEAN_ARCHITECTURES`, used only after a self-check against ``model.generate`` on the model at hand; anything
else decodes through the HF forward.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from vold_pl.models.inputs import IMAGE_INPUT_KEYS, base_model, cache_kwarg, prompt_positions
from vold_pl.rl.hf_engine import HFGenerateEngine
from vold_pl.rl.rollout_types import (
    Rollout,
    RolloutEngine,
    SamplingConfig,
    completion_mask_from_ids,
    prompt_inputs,
    repeat_images,
)
from vold_pl.sharding import is_fsdp2, rank_local_forwards


def _full_attention_only(model: torch.nn.Module) -> bool:
    """True when every decoder layer is plain full attention (no sliding window, chunking or KV sharing)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    except Exception:  # noqa: BLE001 - an unknown config layout: let the model build its own cache
        return False
    return bool(types) and all(t == "full_attention" for t in types)


def _growing_cache(model: torch.nn.Module, capacity: int):
    """A ``DynamicCache`` whose layers append into preallocated ``capacity``-token buffers (no ``torch.cat`` of
    the whole cache per decoded token), or ``None`` (the model then makes a plain ``DynamicCache``)."""
    if not _full_attention_only(model):
        return None
    from transformers.cache_utils import DynamicCache

    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = DynamicCache()
    cache.layers = [_GrowingLayer(capacity) for _ in range(n_layers)]
    cache.layer_class_to_replicate = None
    return cache


def _make_growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` over ``[batch, heads, capacity, dim]`` buffers: ``update`` writes the new tokens in
        place and returns views of the filled part. Same values as ``DynamicLayer``, O(new tokens) per step
        instead of O(cache) for the concatenation."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0
            self._k = self._v = None

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device, self.is_initialized, self.length = key_states.device, True, 0

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = self.length + key_states.shape[-2]
            if self._k is None or new > self._k.shape[-2]:  # first write, or beyond the reserved capacity
                cap = max(new, self.capacity)
                b, h, _, d = key_states.shape
                k = key_states.new_empty((b, h, cap, d))
                v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
                if self._k is not None:
                    k[:, :, : self.length] = self._k[:, :, : self.length]
                    v[:, :, : self.length] = self._v[:, :, : self.length]
                self._k, self._v = k, v
            self._k[:, :, self.length : new] = key_states
            self._v[:, :, self.length : new] = value_states
            self.length = new
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def reset(self) -> None:
            self.length = 0
            if self._k is not None:
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0 and self.is_initialized:
                self.length = max(0, self.length + tokens_to_remove)
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.length:
                self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
                self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.length:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

    return GrowingLayer


def _GrowingLayer(capacity: int):  # noqa: N802 - a lazily built class (transformers is imported on first use)
    global _GROWING_LAYER
    if _GROWING_LAYER is None:
        _GROWING_LAYER = _make_growing_layer_class()
    return _GROWING_LAYER(capacity)


_GROWING_LAYER = None


class _LeanDecoder:
    """One-token decode steps of a Qwen2-family decoder (Qwen2, Qwen2.5-VL's text model, Qwen3) without the
    HF forward's per-call machinery (kwargs plumbing, mask construction, output records, cache objects).

    It calls the model's own submodules (embedding, RMSNorms, projections, MLP, LM head; LoRA-wrapped ones
    included) in the order and with the ops of the HF code, so the numbers are the HF forward's: the greedy
    tests compare it token for token with ``model.generate``. Built only when the structure is recognised
    (``build`` returns ``None`` otherwise and the engine calls the HF forward).
    """

    def __init__(self, text_model, lm_head, layers_cache):
        self.embed, self.norm, self.head = text_model.embed_tokens, text_model.norm, lm_head
        rot = text_model.rotary_emb
        self.inv_freq, self.rope_scale = rot.inv_freq, rot.attention_scaling
        self.layers = list(text_model.layers)
        self.cache_layers = layers_cache

    @staticmethod
    def build(model, cache) -> _LeanDecoder | None:
        try:
            inner = getattr(model, "model", None)
            text = getattr(inner, "language_model", inner)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            cfg = text.config
            rot = text.rotary_emb
            ok = (
                head is not None and cache is not None
                and all(type(layer).__name__ == "GrowingLayer" for layer in cache.layers)
                and getattr(cfg, "_attn_implementation", None) == "sdpa"
                and getattr(rot, "rope_type", None) == "default"
                and not getattr(rot, "_dynamic_update", False)
                and type(text).__name__ in _LEAN_TEXT_MODELS
                and len(cache.layers) == len(text.layers)
                and not _is_sharded(model)
            )
            if ok:
                for layer in text.layers:
                    a = layer.self_attn
                    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups", "scaling"):
                        getattr(a, name)
                    layer.mlp, layer.input_layernorm, layer.post_attention_layernorm  # noqa: B018
            return _LeanDecoder(text, head, cache.layers) if ok else None
        except AttributeError:
            return None

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def step(self, tok: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``tok [n]``, ``pos [n]`` rope position of each row, ``key_mask [n, 1, 1, K]`` bool or ``None``
        (no padding) -> next-token logits ``[n, V]`` float32. Appends this token's K/V to the cache."""
        F = torch.nn.functional
        n = tok.shape[0]
        h = self.embed(tok.unsqueeze(1))  # [n, 1, H]
        freqs = pos.view(n, 1, 1).float() * self.inv_freq.to(device=h.device, dtype=torch.float)  # [n, 1, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(h.dtype).unsqueeze(1)  # [n, 1, 1, d]
        sin = (emb.sin() * self.rope_scale).to(h.dtype).unsqueeze(1)
        rot = self._rotate_half
        for layer, kv in zip(self.layers, self.cache_layers):
            a = layer.self_attn
            hd = a.head_dim
            residual = h
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(n, 1, -1, hd)
            k = a.k_proj(x).view(n, 1, -1, hd)
            if getattr(a, "q_norm", None) is not None:  # Qwen3
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = a.v_proj(x).view(n, 1, -1, hd).transpose(1, 2)
            q = (q * cos) + (rot(q) * sin)
            k = (k * cos) + (rot(k) * sin)
            keys, values = kv.update(k, v)
            groups = a.num_key_value_groups
            if groups > 1 and key_mask is None and hd <= 256:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=None, dropout_p=0.0, scale=a.scaling,
                                                   is_causal=False, enable_gqa=True)
            else:
                qq = q.reshape(n, q.shape[1] // groups, groups, hd) if groups > 1 else q
                o = F.scaled_dot_product_attention(qq, keys, values, attn_mask=key_mask, dropout_p=0.0,
                                                   scale=a.scaling, is_causal=False)
            o = o.reshape(n, -1, 1, hd).transpose(1, 2).contiguous()
            o = a.o_proj(o.reshape(n, 1, -1).contiguous())
            h = residual + o
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h)
        return self.head(h[:, -1:, :])[:, -1].float()  # [n, V]


# The decoder classes whose step _LeanDecoder re-implements (Qwen2, Qwen2.5-VL's text model, Qwen3; their
# HF code as of the transformers releases in LEAN_TESTED_TRANSFORMERS). A model of these classes still decodes
# through the lean path only after CachedSamplingEngine's self-check agrees with ``model.generate`` on it.
LEAN_ARCHITECTURES = ("Qwen2Model", "Qwen2_5_VLTextModel", "Qwen3Model")
_LEAN_TEXT_MODELS = set(LEAN_ARCHITECTURES)
LEAN_TESTED_TRANSFORMERS = ("5.24.0",)
# Self-check verdicts per architecture (model class, decoder class, attention kernel, dtype, device): the check
# runs once per architecture and process, whichever engine and model object meet it first.
_LEAN_VERDICTS: dict[tuple, bool] = {}


def _lean_key(model: torch.nn.Module, text: torch.nn.Module) -> tuple:
    p = next(model.parameters())
    return (type(model).__name__, type(text).__name__, getattr(text.config, "_attn_implementation", None),
            str(p.dtype), p.device.type)


def _is_sharded(model: torch.nn.Module) -> bool:
    """Parameters that are FSDP2 shards (DTensors) right now: FSDP2's hooks gather them on the wrapped modules'
    ``forward``, which the lean decoder's direct submodule calls would bypass. Inside ``rollout: unshard``
    (:func:`vold_pl.rl.unsharded.unsharded`) the modules hold the gathered, whole weights: not sharded."""
    return is_fsdp2(model)


class CachedSamplingEngine(HFGenerateEngine):
    """Rollouts with a lean batched sampling loop over the HF model and a ``DynamicCache``.

    What it does that ``model.generate`` on the G-times repeated batch does not:

    - **one prefill per prompt**: the B prompts (and, for Qwen2.5-VL, their images through the vision encoder)
      are run once, then the KV cache and the last logits are expanded G times (``repeat_interleave``);
    - **finished rows stop costing compute**: once a row emits EOS it is dropped from the decode batch and from
      the cache (``batch_select_indices``), so a group with one long completion decodes one row, not G;
    - **no per-step generate machinery**: explicit ``position_ids`` (the multimodal rope positions of
      Qwen2.5-VL from ``get_rope_index`` for the prompt, ``last + 1`` while decoding; the same numbers
      ``generate`` computes), ``logits_to_keep=1``;
    - **cheap decode steps**: the KV cache appends into preallocated buffers (no concatenation of the whole
      cache per token), the attention mask is built once, and for Qwen2 / Qwen2.5-VL / Qwen3 each step runs
      through :class:`_LeanDecoder` (the model's own modules, the HF ops, none of the per-call wrappers).

    Sampling is HF's: suppression of the vision placeholders, then ``TemperatureLogitsWarper``,
    ``TopKLogitsWarper``, ``TopPLogitsWarper``, softmax and ``torch.multinomial``; greedy is ``argmax``, and its
    completions equal :class:`HFGenerateEngine`'s token for token (``tests/test_rollout.py``). A VLM without
    ``get_rope_index`` falls back to ``model.generate``.

    Args:
        tokenizer: decodes completions and gives pad/EOS ids.
        compact: drop finished rows from the decode batch (off: they keep decoding pad tokens, as ``generate``).
        share_prefill: prefill once per prompt and expand the cache (off: prefill the repeated batch).
        lean_decode: decode steps of the architectures in :data:`LEAN_ARCHITECTURES` (Qwen2 / Qwen2.5-VL /
            Qwen3) through :class:`_LeanDecoder` (the model's own modules, without the HF forward's per-call
            machinery). The first rollout of each architecture runs a self-check first: a short greedy probe (two
            prompts, one left-padded) decoded through the lean path and with ``model.generate`` must give the
            same tokens with log-probs within ``LEAN_CHECK_TOLERANCE``; a model that fails (a patched forward, a
            changed rope, another transformers release's decoder step) decodes through the HF forward, with a
            one-line notice. Off, or for other architectures: the HF forward. Tested with transformers
            :data:`LEAN_TESTED_TRANSFORMERS`.
        track_logprobs: fill :attr:`Rollout.logprobs` (one full-vocabulary log-softmax per decode step). Off by
            default: the trainers score rollouts with :mod:`vold_pl.rl.logprobs` and never read it; the
            lean decoder's self-check turns it on for its probe.
    """

    # Probe length of the lean decoder's self-check, and its log-prob tolerance per model dtype (the lean step
    # runs the HF ops in the HF order: fp32 agrees to rounding, half precision to a few bf16 ulps).
    LEAN_PROBE_TOKENS = 6
    LEAN_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
    LEAN_CHECK_TOLERANCE_HALF = 5e-2

    # It stops when ITS rows are done: under FSDP2 across ranks the trainer wraps it in UnshardedRollouts or swaps
    # in HFGenerateEngine (:func:`vold_pl.rl.unsharded.rollout_engine_for`).
    keeps_ranks_in_step = False

    def __init__(self, tokenizer, compact: bool = True, share_prefill: bool = True, lean_decode: bool = True,
                 track_logprobs: bool = False):
        super().__init__(tokenizer)
        self.compact, self.share_prefill, self.lean_decode = compact, share_prefill, lean_decode
        self.track_logprobs = track_logprobs
        self.last_decode_path: str | None = None  # "lean" or "hf": which forward the last decode loop used
        self._lean_ok = False  # this rollout may decode through the lean path (self-check passed)

    def _warpers(self, sampling: SamplingConfig) -> list:
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if not sampling.do_sample:
            return []
        warpers: list = []
        # The same conditions and order as GenerationMixin._get_logits_processor.
        if sampling.temperature is not None and sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
        if sampling.top_p is not None and sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
        return warpers

    def generate(self, model: torch.nn.Module, batch: dict, num_samples: int, sampling: SamplingConfig) -> Rollout:
        return self._sample(model, batch, num_samples, sampling, self.track_logprobs)

    @torch.no_grad()
    def _sample(self, model: torch.nn.Module, batch: dict, num_samples: int, sampling: SamplingConfig,
                logprobs: bool) -> Rollout:
        G = num_samples
        base = base_model(model)
        vision = getattr(base.config, "vision_config", None) is not None
        p_ids, p_mask = batch["input_ids"], batch["attention_mask"]  # [B, P]
        positions = prompt_positions(base, p_ids, p_mask, batch, vision)
        if positions is None:
            return super().generate(model, batch, num_samples, sampling)
        lean_ok = self.lean_decode and self._lean_verified(base)
        self._lean_ok = lean_ok
        device = p_ids.device
        ids, mask = p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0)  # [N, P]
        extra: dict[str, Any] = {}
        if vision:
            extra["mm_token_type_ids"] = batch["mm_token_type_ids"].repeat_interleave(G, 0)
            extra.update(repeat_images(batch, G))

        # -- prefill: once per prompt, or on the repeated batch ------------------------------------------
        pre: dict[str, Any] = {}
        if self.share_prefill:
            pre_ids, pre_mask, pre_pos = p_ids, p_mask, positions
            if vision and "pixel_values" in batch:
                pre.update({k: batch[k] for k in IMAGE_INPUT_KEYS if k in batch})
        else:
            pre_ids, pre_mask = ids, mask
            pre_pos = positions.repeat_interleave(G, dim=positions.dim() - 2)
            if vision and "pixel_values" in extra:
                pre.update(extra)
        cache_key = cache_kwarg(base)
        cache = _growing_cache(base, p_ids.size(1) + sampling.max_new_tokens)
        if cache is not None:
            pre[cache_key] = cache
        was_training = base.training
        base.eval()
        try:
            out = base(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos, use_cache=True,
                       logits_to_keep=1, **pre)
            cache = out[cache_key] if cache_key in out else out.past_key_values
            logits = out.logits[:, -1].float()  # [B or N, V]
            del out
            if self.share_prefill and G > 1:
                cache.batch_repeat_interleave(G)
                logits = logits.repeat_interleave(G, 0)
            comp, logps = self._decode(base, cache, cache_key, logits, mask, positions[..., -1:], G, sampling, device,
                                       logprobs)
        finally:
            base.train(was_training)

        if comp.size(1) == 0:
            comp = torch.full((ids.size(0), 1), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
            logps = torch.zeros(comp.shape, dtype=torch.float32, device=device) if logprobs else None
        cmask, clipped = completion_mask_from_ids(comp, self.eos_ids)
        comp = comp.masked_fill(cmask == 0, self.tokenizer.pad_token_id)
        logps = logps.masked_fill(cmask == 0, 0.0) if logps is not None else None
        texts = self.tokenizer.batch_decode(comp, skip_special_tokens=True)
        return Rollout(ids, mask, comp, cmask, texts, G, clipped, extra, logprobs=logps,
                       prompts=prompt_inputs(base, batch), blocked_ids=tuple(self.suppress_ids))

    def _lean_verified(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` may decode through :class:`_LeanDecoder`: an architecture it claims, and the
        self-check (:meth:`_lean_probe`, once per architecture) agrees with HF ``generate``."""
        inner = getattr(model, "model", None)
        text = getattr(inner, "language_model", inner)
        if type(text).__name__ not in _LEAN_TEXT_MODELS or _is_sharded(model):
            return False  # not claimed: the lean path is never built for it
        key = _lean_key(model, text)
        verdict = _LEAN_VERDICTS.get(key)
        if verdict is None:
            try:
                problem = self._lean_probe(model)
            except Exception as e:  # noqa: BLE001 - any failure of the lean path means: use the HF forward
                problem = f"{type(e).__name__}: {str(e)[:200]}"
            verdict = problem is None
            _LEAN_VERDICTS[key] = verdict
            if not verdict:
                print(f"[vold-pl] lean decoder off for {type(model).__name__}: its self-check against HF generate "
                      f"failed ({problem}); decoding through the HF forward (same results, slower).",
                      file=sys.stderr, flush=True)
        return verdict

    def _lean_probe(self, model: torch.nn.Module) -> str | None:
        """Greedy-decode a short probe through the lean path and with ``model.generate``: ``None`` when the
        tokens are the same and their log-probs agree within the dtype's tolerance, else what differs."""
        tok = self.tokenizer
        ids = tok("Count with me: one, two, three, four, five,", add_special_tokens=False)["input_ids"][:8]
        ids = (ids * 4)[: max(4, len(ids))]
        pad, P = tok.pad_token_id, len(ids)
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids, [pad, pad] + ids[2:]], device=device)  # [2, P]: the second left-padded
        mask = torch.tensor([[1] * P, [0, 0] + [1] * (P - 2)], device=device)  # [2, P]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if getattr(model.config, "vision_config", None) is not None:
            batch["mm_token_type_ids"] = torch.zeros_like(input_ids)  # text tokens only
        greedy = SamplingConfig(max_new_tokens=self.LEAN_PROBE_TOKENS, do_sample=False)
        inner = getattr(model, "model", None)
        key = _lean_key(model, getattr(inner, "language_model", inner))
        before = _LEAN_VERDICTS.get(key)
        _LEAN_VERDICTS[key] = True  # the probe itself decodes through the lean path
        try:
            with rank_local_forwards(model):  # this rank's own check: no dummy vision forward for other ranks
                mine = self._sample(model, batch, 1, greedy, logprobs=True)
        finally:
            if before is None:
                _LEAN_VERDICTS.pop(key, None)
            else:
                _LEAN_VERDICTS[key] = before
        if self.last_decode_path != "lean":
            return None  # the lean path was not built for this model: nothing of it to check
        was_training = model.training
        model.eval()
        try:
            with rank_local_forwards(model):
                ref = model.generate(**batch, max_new_tokens=greedy.max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=pad, eos_token_id=self.eos_ids,
                                     suppress_tokens=self.suppress_ids or None, output_logits=True,
                                     return_dict_in_generate=True, synced_gpus=False)  # this rank's own probe
        finally:
            model.train(was_training)
        ref_tok = ref.sequences[:, P:]  # [2, L']
        ref_mask, _ = completion_mask_from_ids(ref_tok, self.eos_ids)
        ref_tok = ref_tok.masked_fill(ref_mask == 0, pad)
        if ref_tok.shape != mine.completion_ids.shape or not torch.equal(ref_tok, mine.completion_ids):
            return f"greedy tokens {mine.completion_ids.tolist()} != generate's {ref_tok.tolist()}"
        logits = torch.stack(ref.logits, 1).float()  # [2, L', V] raw scores of each step
        if self.suppress_ids:
            logits[..., self.suppress_ids] = float("-inf")
        ref_lp = torch.log_softmax(logits, -1).gather(-1, ref_tok.unsqueeze(-1)).squeeze(-1)  # [2, L']
        diff = float((mine.logprobs - ref_lp).abs()[ref_mask.bool()].max())
        dtype = next(model.parameters()).dtype
        tol = self.LEAN_CHECK_TOLERANCE.get(dtype, self.LEAN_CHECK_TOLERANCE_HALF)
        if not diff <= tol:
            return f"token log-probs differ by {diff:.3g} (tolerance {tol:g} for {dtype})"
        return None

    def _loop_state(self, N: int, sampling: SamplingConfig, device, logprobs: bool):
        """What a decode loop of ``N`` rows starts from: ``out_tok [N, L]`` (pad), ``out_lp [N, L]`` (zeros, or
        ``None``), the EOS ids, the blocked ids (or ``None``), HF's warpers and ``1 / temperature``."""
        L = sampling.max_new_tokens
        out_tok = torch.full((N, L), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        out_lp = torch.zeros((N, L), dtype=torch.float32, device=device) if logprobs else None
        eos = torch.tensor(self.eos_ids, device=device)
        suppress = torch.tensor(self.suppress_ids, dtype=torch.long, device=device) if self.suppress_ids else None
        inv_t = 1.0 / sampling.temperature if sampling.do_sample and sampling.temperature else 1.0
        return out_tok, out_lp, eos, suppress, self._warpers(sampling), inv_t

    @staticmethod
    def _pick(logits: torch.Tensor, suppress: torch.Tensor | None, warpers: list, inv_t: float,
              sampling: SamplingConfig, logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One position: ``logits [n, V]`` -> the next tokens ``[n]`` and, with ``logprobs``, ``log pi [n, V]``.

        HF's processing of the scores with the blocked ids removed; ``log pi`` is the distribution the loss scores
        (the same suppressed scores, temperature-scaled, before top-k/top-p)."""
        scores = logits if suppress is None else logits.index_fill(1, suppress, float("-inf"))
        logp_all = torch.log_softmax(scores * inv_t if inv_t != 1.0 else scores, -1) if logprobs else None
        if sampling.do_sample:
            for w in warpers:
                scores = w(None, scores)
            return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1), logp_all  # [n]
        return scores.argmax(-1), logp_all  # [n]

    def _decode(self, model, cache, cache_key: str, logits: torch.Tensor, mask: torch.Tensor, last_pos: torch.Tensor,
                G: int, sampling: SamplingConfig, device, logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decode loop. ``logits [N, V]`` of the next token, ``mask [N, P]``, ``last_pos [B|N, 1]`` or
        ``[4, B|N, 1]``. Returns ``tokens [N, T]`` (pad after EOS) and, with ``logprobs``, their log-probs
        ``[N, T]`` (else ``None``).

        One model call per generated position over the rows still running; everything per row is tensor ops."""
        N, P = mask.shape
        L = sampling.max_new_tokens
        pad = self.tokenizer.pad_token_id
        bdim = last_pos.dim() - 2  # batch dim of the position ids
        if last_pos.size(bdim) != N:  # positions of the shared prefill: one row per prompt
            last_pos = last_pos.repeat_interleave(G, dim=bdim)
        out_tok, out_lp, eos, suppress, warpers, inv_t = self._loop_state(N, sampling, device, logprobs)
        # The attention mask over prompt + generated tokens, preallocated. With SDPA and full attention it goes
        # in as the 4-D boolean key mask the model would build from the 2-D one (``None`` without padding,
        # as ``create_causal_mask`` returns then), skipping the per-step mask construction.
        keys = torch.ones((N, P + L), dtype=torch.bool, device=device)
        keys[:, :P] = mask.bool()
        prebuilt = (getattr(model.config, "_attn_implementation", None) == "sdpa" and _full_attention_only(model))
        padded = not bool(keys[:, :P].all())
        lean = _LeanDecoder.build(model, cache) if self._lean_ok and prebuilt else None
        if lean is not None and last_pos.dim() == 3 and not bool((last_pos[1:] == last_pos[1:2]).all()):
            lean = None  # rope positions that differ across the t/h/w axes at a text token: not expected
        self.last_decode_path = "lean" if lean is not None else "hf"
        rows = torch.arange(N, device=device)  # compaction: original row of each active row
        alive = torch.ones(N, dtype=torch.bool, device=device)  # no compaction: rows without EOS yet
        steps = 0
        for t in range(L):
            tok, logp_all = self._pick(logits, suppress, warpers, inv_t, sampling, logprobs)  # [n], [n, V]
            lp = logp_all.gather(1, tok.unsqueeze(1)).squeeze(1) if logprobs else None  # [n]
            done = torch.isin(tok, eos)  # [n]
            steps = t + 1
            if self.compact:
                out_tok[rows, t] = tok
                if logprobs:
                    out_lp[rows, t] = lp
            else:  # finished rows keep decoding, on pad tokens, as generate does
                tok = torch.where(alive, tok, pad)
                out_tok[:, t] = tok
                if logprobs:
                    out_lp[:, t] = torch.where(alive, lp, 0.0)
                alive &= ~done
            if t == L - 1:
                break
            if self.compact:
                n_done = int(done.sum())  # the one host sync per step (generate has one too)
                if n_done == tok.numel():
                    break
                if n_done:  # drop finished rows from the batch and the KV cache
                    idx = (~done).nonzero().squeeze(1)
                    cache.batch_select_indices(idx)
                    rows, tok, keys = rows[idx], tok[idx], keys[idx]
                    last_pos = last_pos.index_select(bdim, idx)
            elif not bool(alive.any()):
                break
            width = P + t + 1  # cached tokens + this one
            last_pos = last_pos + 1
            if lean is not None:
                rope = last_pos[1] if last_pos.dim() == 3 else last_pos  # [n, 1]: t = h = w for text tokens
                logits = lean.step(tok, rope.view(-1), keys[:, None, None, :width] if padded else None)
                continue
            if prebuilt:
                attn = {"full_attention": keys[:, None, None, :width]} if padded else None
            else:
                attn = keys[:, :width].long()
            out = model(input_ids=tok.unsqueeze(1), attention_mask=attn, position_ids=last_pos, use_cache=True,
                        logits_to_keep=1, **{cache_key: cache})
            logits = out.logits[:, -1].float()  # [n, V]
            del out
        return out_tok[:, :steps], out_lp[:, :steps] if logprobs else None


def default_engine(tokenizer) -> RolloutEngine:
    """The rollout engine trainers use unless told otherwise: :class:`CachedSamplingEngine`."""
    return CachedSamplingEngine(tokenizer)

