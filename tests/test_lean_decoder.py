"""The lean decoder's self-check: the fast decode path is used only for an architecture on which it agrees with
HF ``generate``; a model whose decoder step differs from what the lean path re-implements falls back to the HF
forward with a one-line notice, and its rollouts still equal ``generate``'s."""

from __future__ import annotations

import pytest
import torch

from vold_pl.models.factory import ModelSpec, load_model, load_processor
from vold_pl.rl import cached_sampler as R
from vold_pl.rl.cached_sampler import CachedSamplingEngine
from vold_pl.rl.hf_engine import HFGenerateEngine
from vold_pl.rl.rollout_types import SamplingConfig

GREEDY = SamplingConfig(max_new_tokens=6, do_sample=False)


@pytest.fixture(autouse=True)
def fresh_verdicts():
    """Each test meets its architectures unchecked; the verdicts of altered models do not outlive it."""
    saved = dict(R._LEAN_VERDICTS)
    R._LEAN_VERDICTS.clear()
    yield
    R._LEAN_VERDICTS.clear()
    R._LEAN_VERDICTS.update(saved)


def _verdict(model):
    return R._LEAN_VERDICTS.get(R._lean_key(model, _text_model(model)))


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_processor(ModelSpec(str(tiny_models["student"]))).tokenizer


def _batch(tokenizer, vision: bool) -> dict:
    """Two left-padded text prompts."""
    rows = [tokenizer("What is two plus three?", add_special_tokens=False)["input_ids"],
            tokenizer("Name a colour.", add_special_tokens=False)["input_ids"]]
    P = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask}
    if vision:
        batch["mm_token_type_ids"] = torch.zeros_like(ids)
    return batch


def _text_model(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


def _patch_layer_forward(model) -> None:
    """Layer 0's forward adds a constant to its output: the HF forward sees it, the lean step (which calls the
    layer's submodules, not its forward) does not."""
    layer = _text_model(model).layers[0]
    orig = layer.forward

    def forward(*args, **kwargs):
        out = orig(*args, **kwargs)
        return (out[0] + 0.5,) + tuple(out[1:]) if isinstance(out, tuple) else out + 0.5

    layer.forward = forward


def _change_rope(model) -> None:
    """The rotary embedding is evaluated 3 positions further on: a rope the lean step does not compute."""
    rot = _text_model(model).rotary_emb
    orig = rot.forward
    rot.forward = lambda x, position_ids, *a, **k: orig(x, position_ids + 3, *a, **k)


@pytest.mark.parametrize("which", ["student", "teacher"])  # tiny Qwen2.5-VL, tiny Qwen3
def test_self_check_passes_and_lean_path_is_used(tiny_models, tokenizer, which):
    model, _ = load_model(ModelSpec(str(tiny_models[which])))
    assert type(_text_model(model)).__name__ in R.LEAN_ARCHITECTURES
    engine = CachedSamplingEngine(tokenizer)
    assert engine._lean_probe(model) is None  # the probe itself: same greedy tokens, same log-probs
    batch = _batch(tokenizer, which == "student")
    out = engine.generate(model, batch, 2, GREEDY)
    assert engine.last_decode_path == "lean" and _verdict(model) is True
    ref = HFGenerateEngine(tokenizer).generate(model, batch, 2, GREEDY)
    assert torch.equal(out.completion_ids, ref.completion_ids)


@pytest.mark.parametrize("which, alter", [("student", _patch_layer_forward), ("teacher", _change_rope)],
                         ids=["qwen2_5_vl-patched_forward", "qwen3-changed_rope"])
def test_altered_model_falls_back_to_hf_forward(tiny_models, tokenizer, which, alter, capsys):
    model, _ = load_model(ModelSpec(str(tiny_models[which])))
    alter(model)
    batch = _batch(tokenizer, which == "student")
    engine = CachedSamplingEngine(tokenizer)
    problem = engine._lean_probe(model)
    assert problem is not None and ("log-probs differ" in problem or "greedy tokens" in problem), problem
    assert _verdict(model) is None  # the probe alone records no verdict; the first rollout does
    out = engine.generate(model, batch, 2, GREEDY)
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "lean decoder off" in line]
    assert len(notices) == 1 and "HF forward" in notices[0], err
    assert engine.last_decode_path == "hf" and _verdict(model) is False
    ref = HFGenerateEngine(tokenizer).generate(model, batch, 2, GREEDY)  # the altered model's own generate
    assert torch.equal(out.completion_ids, ref.completion_ids)
    engine.generate(model, batch, 2, GREEDY)  # checked once per architecture: no second notice
    assert "lean decoder off" not in capsys.readouterr().err


def test_lean_decode_off_skips_the_check(tiny_models, tokenizer):
    model, _ = load_model(ModelSpec(str(tiny_models["teacher"])))
    engine = CachedSamplingEngine(tokenizer, lean_decode=False)
    engine.generate(model, _batch(tokenizer, False), 1, GREEDY)
    assert engine.last_decode_path == "hf" and _verdict(model) is None
