"""Rollout engines: exactness of the fast cached sampling loop against ``model.generate``, its sampled-token
log-probs against a teacher-forced forward, and the helpers (``repeat_images``, ``completion_mask_from_ids``).

Tiny random models rarely emit EOS, so the fixtures make EOS likely (a bias on its logit, a random direction
for its output row): completions then end at different steps, which exercises the compaction of finished
rows. Everything runs offline on the session fixtures of ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import read_records, to_dataset
from vold_pl.models.factory import ModelSpec, load_model, load_processor
from vold_pl.rl.logprobs import model_token_logprobs, rollout_token_logprobs
from vold_pl.rl.cached_sampler import CachedSamplingEngine, default_engine
from vold_pl.rl.hf_engine import HFGenerateEngine
from vold_pl.rl.rollout_types import Rollout, SamplingConfig, completion_mask_from_ids, repeat_images
from tests.scripted_engine import ScriptedEngine

GREEDY = SamplingConfig(max_new_tokens=20, do_sample=False)


# ---------------------------------------------------------------------------------------------------- fixtures

def _eos_prone(model: torch.nn.Module, eos_id: int, bias: float, row_scale: float, seed: int = 0) -> torch.nn.Module:
    """Give the LM head a bias that favours EOS and a random EOS row, so completions end at varied steps."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
        norm = old.weight.norm(dim=1).mean()
        head.weight[eos_id] = row_scale * norm * torch.randn(old.in_features, generator=g) / old.in_features ** 0.5
    model.lm_head = head
    return model.eval()


def _rows(path: Path, n: int) -> list[dict]:
    recs, _ = read_records(path)
    ds = to_dataset(recs[:n])
    return [ds[i] for i in range(n)]


@pytest.fixture(scope="module")
def processor(tiny_models):
    return load_processor(ModelSpec(str(tiny_models["student"])))


@pytest.fixture(scope="module")
def mixed_batch(synth_data, processor):
    """Image and text-only prompts interleaved: prompts of different lengths, left-padded."""
    img, txt = _rows(synth_data["train"], 3), _rows(synth_data["train_text"], 2)
    batch = PromptCollator(processor)([img[0], txt[0], img[1], txt[1], img[2]])
    assert (batch["attention_mask"] == 0).any() and "pixel_values" in batch
    return batch


@pytest.fixture(scope="module")
def text_batch(synth_data, processor):
    return PromptCollator(processor)(_rows(synth_data["train_text"], 4))


def _student(tiny_models, processor, bias=0.0, row_scale=2.0, seed=0):
    model, _ = load_model(ModelSpec(str(tiny_models["student"])))
    return _eos_prone(model, processor.tokenizer.eos_token_id, bias, row_scale, seed)


def _text_llm(processor, bias=0.0, row_scale=2.0, seed=0):
    """A tiny Qwen2 text LLM on the student's vocabulary, built from a config (no hub)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = processor.tokenizer
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.generation_config.bos_token_id = None
    return _eos_prone(model, tok.eos_token_id, bias, row_scale, seed)


@pytest.fixture(scope="module")
def varied_llm(processor, text_batch) -> torch.nn.Module:
    return _first_varied(lambda seed: _text_llm(processor, seed=seed), processor, text_batch, G=3, n_lengths=2)


def _first_varied(build, processor, batch, G: int, n_lengths: int) -> torch.nn.Module:
    """``build(seed)`` for the first seed whose greedy completions of ``batch`` (G per prompt) end at
    ``n_lengths`` or more different steps, some before the limit: the precondition of the compaction checks.
    Which random EOS row gives that depends on the tokenizer the fixtures train, so a few seeds are tried
    (checked with ``model.generate``)."""
    for seed in range(8):
        model = build(seed)
        lengths = HFGenerateEngine(processor.tokenizer).generate(model, batch, G, GREEDY).completion_mask.sum(-1)
        if len(set(lengths.tolist())) >= n_lengths and int(lengths.min()) < GREEDY.max_new_tokens:
            return model
    raise AssertionError(f"no seed gives greedy completions of {n_lengths} or more lengths")


def _teacher_forced(model, ro: Rollout, temperature: float, vision: bool) -> torch.Tensor:
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attn = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
    extra = dict(ro.extra) if vision else {}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(ro.completion_ids)], 1)
    with torch.no_grad():
        return model_token_logprobs(model, ids, attn, ro.prompt_ids.size(1), temperature=temperature,
                                    blocked_ids=ro.blocked_ids, **extra)


def _assert_same_rollout(a: Rollout, b: Rollout) -> None:
    assert a.completion_ids.shape == b.completion_ids.shape
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.clipped, b.clipped)
    assert a.texts == b.texts
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert a.extra.keys() == b.extra.keys()
    assert all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)


# ------------------------------------------------------------------------------ greedy: token for token = generate

ENGINES = {
    "default": {},
    "no_compaction": dict(compact=False),
    "repeated_prefill": dict(share_prefill=False),
    "hf_forward_decode": dict(lean_decode=False),
}


def _path(opts: dict) -> str:
    return "hf" if opts.get("lean_decode") is False else "lean"


@pytest.mark.parametrize("opts", list(ENGINES.values()), ids=list(ENGINES))
def test_greedy_equals_generate_on_vlm_student(tiny_models, processor, mixed_batch, opts):
    model = _first_varied(lambda seed: _student(tiny_models, processor, seed=seed), processor, mixed_batch, G=2,
                          n_lengths=3)
    tok = processor.tokenizer
    ref = HFGenerateEngine(tok).generate(model, mixed_batch, 2, GREEDY)
    engine = CachedSamplingEngine(tok, **opts)
    out = engine.generate(model, mixed_batch, 2, GREEDY)
    _assert_same_rollout(ref, out)
    assert engine.last_decode_path == _path(opts)
    lengths = out.completion_mask.sum(-1)
    # The fixture really exercises early stops at different steps (compaction) and a clipped row.
    assert len(set(lengths.tolist())) >= 3 and lengths.min() < GREEDY.max_new_tokens, lengths
    assert model.training is False


@pytest.mark.parametrize("opts", list(ENGINES.values()), ids=list(ENGINES))
def test_greedy_equals_generate_on_text_llm(processor, text_batch, varied_llm, opts):
    model = varied_llm
    tok = processor.tokenizer
    ref = HFGenerateEngine(tok).generate(model, text_batch, 3, GREEDY)
    engine = CachedSamplingEngine(tok, **opts)
    out = engine.generate(model, text_batch, 3, GREEDY)
    _assert_same_rollout(ref, out)
    assert engine.last_decode_path == _path(opts)
    assert out.extra == {}  # a text LLM takes ids only
    lengths = out.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) >= 2 and lengths.min() < GREEDY.max_new_tokens, lengths


def test_greedy_equals_generate_on_qwen3(tiny_models, processor, text_batch):
    """The tiny Qwen3 teacher (q/k norms) through the lean decoder, unpadded and left-padded prompts."""
    model, _ = load_model(ModelSpec(str(tiny_models["teacher"])))
    model = _eos_prone(model, processor.tokenizer.eos_token_id, 0.0, 2.0)
    tok = processor.tokenizer
    keep = text_batch["attention_mask"][0].bool()  # the first prompt alone, no padding: the mask-free path
    one = {"input_ids": text_batch["input_ids"][:1, keep], "attention_mask": text_batch["attention_mask"][:1, keep],
           "mm_token_type_ids": text_batch["mm_token_type_ids"][:1, keep], "records": text_batch["records"][:1]}
    assert one["attention_mask"].all() and not text_batch["attention_mask"].all()
    for batch in (text_batch, one):
        ref = HFGenerateEngine(tok).generate(model, batch, 2, GREEDY)
        engine = CachedSamplingEngine(tok)
        out = engine.generate(model, batch, 2, GREEDY)
        _assert_same_rollout(ref, out)
        assert engine.last_decode_path == "lean"


def test_train_mode_is_restored(processor, text_batch):
    model = _text_llm(processor).train()
    CachedSamplingEngine(processor.tokenizer).generate(model, text_batch, 2, GREEDY)
    assert model.training


# ------------------------------------------------------------------------------------- sampling: HF's warpers

SAMPLINGS = {
    "t1": SamplingConfig(max_new_tokens=16),
    "t0.7_topp0.9_topk20": SamplingConfig(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20),
    "topk5": SamplingConfig(max_new_tokens=16, top_k=5),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_sampling_matches_generate_under_a_seed(processor, text_batch, name):
    """Without compaction and with the repeated prefill the loop draws exactly what ``generate`` draws."""
    sampling = SAMPLINGS[name]
    model = _text_llm(processor, bias=3.0)
    tok = processor.tokenizer
    torch.manual_seed(123)
    ref = HFGenerateEngine(tok).generate(model, text_batch, 3, sampling)
    torch.manual_seed(123)
    out = CachedSamplingEngine(tok, compact=False, share_prefill=False).generate(model, text_batch, 3, sampling)
    _assert_same_rollout(ref, out)


@pytest.mark.parametrize("name", list(SAMPLINGS))
@pytest.mark.parametrize("kind", ["vlm", "llm"])
def test_sampled_logprobs_equal_teacher_forced(tiny_models, processor, mixed_batch, text_batch, kind, name):
    sampling = SAMPLINGS[name]
    tok = processor.tokenizer
    if kind == "vlm":
        model, batch = _student(tiny_models, processor, bias=3.0), mixed_batch
    else:
        model, batch = _text_llm(processor, bias=3.0), text_batch
    torch.manual_seed(7)
    ro = CachedSamplingEngine(tok, track_logprobs=True).generate(model, batch, 4, sampling)
    assert ro.logprobs is not None and ro.logprobs.shape == ro.completion_ids.shape
    ref = _teacher_forced(model, ro, sampling.temperature, kind == "vlm")
    m = ro.completion_mask.bool()
    torch.testing.assert_close(ro.logprobs[m], ref[m], atol=1e-4, rtol=0)
    assert (ro.logprobs[~m] == 0).all()
    lengths = ro.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) >= 2, lengths  # some rows stopped early: compaction ran
    # Vision placeholders are never sampled; top-k keeps only the k most likely tokens.
    engine = CachedSamplingEngine(tok)
    assert not torch.isin(ro.completion_ids[m], torch.tensor(engine.suppress_ids)).any()


def test_top_k_and_suppression_respected(processor, text_batch):
    """Every sampled token is among the top-k of the unsuppressed distribution and never a placeholder."""
    model = _text_llm(processor, bias=3.0)
    tok = processor.tokenizer
    engine = CachedSamplingEngine(tok, track_logprobs=True)
    # Make a placeholder the most likely token everywhere: suppression must still never emit it.
    placeholder = engine.suppress_ids[0]
    with torch.no_grad():
        model.lm_head.bias[placeholder] = 50.0
    sampling = SamplingConfig(max_new_tokens=12, top_k=3)
    torch.manual_seed(0)
    ro = engine.generate(model, text_batch, 4, sampling)
    m = ro.completion_mask.bool()
    assert not torch.isin(ro.completion_ids[m], torch.tensor(engine.suppress_ids)).any()
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attn = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, ro.prompt_ids.size(1) - 1 : -1]
    logits[..., engine.suppress_ids] = float("-inf")
    top = logits.topk(3, -1).indices  # [N, L, 3]
    assert (top == ro.completion_ids.unsqueeze(-1)).any(-1)[m].all()
    # The log-probs are of the distribution sampled from, before top-k: the placeholders (which hold almost
    # all the unsuppressed mass here) removed and the rest renormalised; the rollout names those ids, and the
    # loss's scorer reads them from it.
    assert ro.blocked_ids == tuple(sorted(engine.suppress_ids)) and len(ro.blocked_ids) == 4
    by_hand = torch.log_softmax(logits.float(), -1).gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ro.logprobs[m], by_hand[m], atol=1e-4, rtol=0)
    with torch.no_grad():
        scored, ent = rollout_token_logprobs(model, ro, return_entropy=True)
    torch.testing.assert_close(scored[m], by_hand[m], atol=1e-4, rtol=0)
    p = torch.softmax(logits.float(), -1)
    ent_by_hand = -(p * torch.log_softmax(logits.float(), -1).nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(ent[m], ent_by_hand[m], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- the work the engine skips

def test_vision_encoder_runs_once_per_prompt(tiny_models, processor, mixed_batch):
    model = _student(tiny_models, processor)
    seen: list[int] = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        G = 4
        CachedSamplingEngine(processor.tokenizer).generate(model, mixed_batch, G, GREEDY)
        cached, seen[:] = list(seen), []
        HFGenerateEngine(processor.tokenizer).generate(model, mixed_batch, G, GREEDY)
        plain = list(seen)
    finally:
        hook.remove()
    n_patches = mixed_batch["pixel_values"].shape[0]
    assert cached == [n_patches]  # one encoder call on each image once
    assert plain == [G * n_patches]  # generate encodes every image once per sample


def test_finished_rows_leave_the_decode_batch(processor, text_batch, varied_llm):
    model = varied_llm
    sizes: list[int] = []
    # Every forward (the prefill, and each decode step on either decode path) embeds its input ids once.
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        G = 3
        ro = CachedSamplingEngine(processor.tokenizer).generate(model, text_batch, G, GREEDY)
    finally:
        hook.remove()
    B, N = text_batch["input_ids"].shape[0], text_batch["input_ids"].shape[0] * G
    assert sizes[0] == B  # the prefill runs on the B prompts, not the N rows
    lengths = ro.completion_mask.sum(-1)
    # Decode step t (1-based) runs exactly the rows still unfinished after t tokens.
    expected = [int((lengths > t).sum()) for t in range(1, ro.completion_ids.size(1))]
    assert sizes[1:] == expected and expected[0] <= N and expected[-1] < N


# --------------------------------------------------------------------- scoring with each prompt run once per group

def _scores_and_grads(model, fn, mask):
    model.zero_grad()
    logp, ent = fn()
    m = mask.float()
    ((logp * m).sum() + 0.1 * (ent * m).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp * m, ent * m, grads


@pytest.mark.parametrize("kind", ["vlm", "llm"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt_fallback"])
def test_shared_prefix_scores_and_gradients_equal_full_forward(tiny_models, processor, mixed_batch, text_batch,
                                                               kind, checkpointing):
    """Each prompt once + the KV cache expanded G times = the G-times repeated forward, values and gradients."""
    tok = processor.tokenizer
    if kind == "vlm":
        model, batch = _student(tiny_models, processor, bias=3.0), mixed_batch
    else:
        model, batch = _text_llm(processor, bias=3.0), text_batch
    torch.manual_seed(3)
    ro = CachedSamplingEngine(tok).generate(model, batch, 3, SamplingConfig(max_new_tokens=12, temperature=0.8))
    assert len(set(ro.completion_mask.sum(-1).tolist())) >= 2  # right padding inside the completions
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def full():
        ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
        attn = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
        extra = dict(ro.extra)
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(ro.completion_ids)], 1)
        return model_token_logprobs(model, ids, attn, ro.prompt_ids.size(1), temperature=0.8, return_entropy=True,
                                    blocked_ids=ro.blocked_ids, **extra)

    ref = _scores_and_grads(model, full, ro.completion_mask)
    out = _scores_and_grads(model, lambda: rollout_token_logprobs(model, ro, temperature=0.8, return_entropy=True),
                            ro.completion_mask)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=0)
    assert out[2].keys() == ref[2].keys() and len(ref[2]) > 0
    for name in ref[2]:
        torch.testing.assert_close(out[2][name], ref[2][name], atol=1e-5, rtol=1e-4, msg=name)
    # Rollouts without the unrepeated prompts (e.g. from another engine) score the same through the full path.
    ro.prompts = None
    with torch.no_grad():
        again = rollout_token_logprobs(model, ro, temperature=0.8)
    torch.testing.assert_close(again * ro.completion_mask, ref[0], atol=1e-5, rtol=0)


def test_shared_prefix_runs_each_prompt_once(tiny_models, processor, mixed_batch):
    model = _student(tiny_models, processor)
    ro = CachedSamplingEngine(processor.tokenizer).generate(model, mixed_batch, 4, GREEDY)
    rows: list[int] = []
    seen: list[int] = []
    h1 = model.model.language_model.register_forward_hook(
        lambda m, args, kw, out: rows.append(kw["inputs_embeds"].shape[:2]), with_kwargs=True)
    h2 = model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            rollout_token_logprobs(model, ro)
    finally:
        h1.remove()
        h2.remove()
    B, P = mixed_batch["input_ids"].shape
    assert rows == [torch.Size([B, P]), torch.Size([4 * B, ro.completion_ids.size(1)])]
    assert seen == [mixed_batch["pixel_values"].shape[0]]  # each image encoded once


# ------------------------------------------------------------------------------------------- engine plumbing

def test_default_engine_and_fallbacks(processor, text_batch):
    tok = processor.tokenizer
    assert isinstance(default_engine(tok), CachedSamplingEngine)
    scripted = ScriptedEngine(tok, {r["id"]: ["<answer> 1 </answer>"] for r in text_batch["records"]})
    ro = scripted.generate(None, text_batch, 2, GREEDY)
    assert ro.num_rows == 8 and ro.logprobs is None and torch.equal(ro.prompts["input_ids"], text_batch["input_ids"])
    empty = CachedSamplingEngine(tok, track_logprobs=True).generate(_text_llm(processor), text_batch, 2,
                                                                    SamplingConfig(max_new_tokens=0, do_sample=False))
    assert empty.completion_ids.shape == (8, 1) and empty.logprobs.shape == (8, 1)
    untracked = CachedSamplingEngine(tok).generate(_text_llm(processor), text_batch, 2, GREEDY)  # the default
    assert untracked.logprobs is None and untracked.completion_mask.sum() > 0


# ---------------------------------------------------------------------------------------------------- helpers

def test_repeat_images_keeps_rows_aligned():
    # Row 0: one 4x4-patch image (4 placeholders); row 1: text only; row 2: a 4x8 image (8) and a 2x2 one (1).
    thw = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 2, 2]])
    patches = thw.prod(-1).tolist()  # [16, 32, 4]
    pix = torch.cat([torch.full((p, 3), float(i)) for i, p in enumerate(patches)])  # image i's rows hold i
    mm = torch.zeros(3, 12, dtype=torch.long)
    mm[0, 2:6] = 1
    mm[2, 1:9] = 1
    mm[2, 10] = 1
    out = repeat_images({"pixel_values": pix, "image_grid_thw": thw, "mm_token_type_ids": mm}, 2)
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 8], [1, 2, 2], [1, 4, 8], [1, 2, 2]]
    owners = [0] * 16 + [0] * 16 + [1] * 32 + [2] * 4 + [1] * 32 + [2] * 4
    assert out["pixel_values"][:, 0].tolist() == owners
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(-1).sum())
    assert repeat_images({"input_ids": torch.zeros(2, 3)}, 4) == {}
    once = repeat_images({"pixel_values": pix, "image_grid_thw": thw, "mm_token_type_ids": mm}, 1)
    assert torch.equal(once["pixel_values"], pix) and torch.equal(once["image_grid_thw"], thw)


def test_completion_mask_from_ids():
    eos, pad = 2, 0
    ids = torch.tensor([
        [5, 6, eos, pad, pad],  # EOS in the middle: masked through it
        [eos, pad, pad, pad, pad],  # EOS first
        [5, 6, 7, 8, 4],  # never ends: clipped
        [5, 9, 6, 7, 9],  # a second EOS id
        [5, eos, 6, eos, 7],  # only the first EOS counts
    ])
    mask, clipped = completion_mask_from_ids(ids, [eos, 9])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert clipped.tolist() == [False, False, True, False, False]
    mask1, clipped1 = completion_mask_from_ids(ids, [eos])
    assert mask1[2].tolist() == [1] * 5 and mask1[3].tolist() == [1] * 5 and clipped1.tolist()[2:4] == [True, True]
    assert mask.dtype == torch.long and clipped.dtype == torch.bool
