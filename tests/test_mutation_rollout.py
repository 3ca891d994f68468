"""Pieces of the rollout engines that the sampling tests reach rarely: the growing KV cache's growth, crop and
batch repeat against the concatenation it replaces, ``rollout_rows``' shared-prompt slices, the scripted
engine's image inputs, EOS lists, and the lean decoder's self-check bookkeeping. Expected values are built
by hand (concatenations, repeated rows)."""

from __future__ import annotations

import pytest
import torch

from vold_pl.models.factory import ModelSpec, load_model, load_processor
from vold_pl.rl import cached_sampler as R
from vold_pl.rl import rollout_types
from vold_pl.rl.cached_sampler import CachedSamplingEngine
from vold_pl.rl.hf_engine import HFGenerateEngine
from vold_pl.rl.rollout_types import Rollout, SamplingConfig
from tests.scripted_engine import ScriptedEngine


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_processor(ModelSpec(str(tiny_models["student"]))).tokenizer


@pytest.fixture
def fresh_verdicts():
    saved = dict(R._LEAN_VERDICTS)
    R._LEAN_VERDICTS.clear()
    yield R._LEAN_VERDICTS
    R._LEAN_VERDICTS.clear()
    R._LEAN_VERDICTS.update(saved)


def _kv(b: int, t: int, start: float) -> torch.Tensor:
    """[b, 1 head, t tokens, 2]: distinct values per row and token."""
    return torch.arange(b * t * 2, dtype=torch.float32).view(b, 1, t, 2) + start


def test_growing_cache_layer_equals_the_concatenation():
    """Capacity 3, writes of 2, 2 and 1 tokens (the second grows the buffers), then crop 2 tokens, write again,
    and repeat each row twice: keys / values are always the writes concatenated along the tokens."""
    # The class itself, built afresh (``_GrowingLayer`` caches it once per process).
    layer = R._make_growing_layer_class()(3)
    assert type(layer).__name__ == type(R._GrowingLayer(3)).__name__ == "GrowingLayer"
    assert layer.get_seq_length() == 0
    writes = [(_kv(2, 2, 0.0), _kv(2, 2, 100.0)), (_kv(2, 2, 10.0), _kv(2, 2, 110.0)),
              (_kv(2, 1, 20.0), _kv(2, 1, 120.0))]
    ks, vs = [], []
    for k, v in writes:
        ks.append(k)
        vs.append(v)
        got_k, got_v = layer.update(k, v)
        torch.testing.assert_close(got_k, torch.cat(ks, 2), rtol=0, atol=0)
        torch.testing.assert_close(got_v, torch.cat(vs, 2), rtol=0, atol=0)
    assert layer.get_seq_length() == 5
    layer.crop(-2)  # drop the last two tokens
    assert layer.get_seq_length() == 3
    torch.testing.assert_close(layer.keys, torch.cat(ks, 2)[:, :, :3], rtol=0, atol=0)
    k, v = _kv(2, 1, 30.0), _kv(2, 1, 130.0)
    got_k, got_v = layer.update(k, v)  # written where the crop left off
    want_k, want_v = torch.cat([torch.cat(ks, 2)[:, :, :3], k], 2), torch.cat([torch.cat(vs, 2)[:, :, :3], v], 2)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
    layer.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
    torch.testing.assert_close(layer.keys, torch.stack([want_k[0], want_k[0], want_k[1], want_k[1]]), rtol=0, atol=0)
    torch.testing.assert_close(layer.values, torch.stack([want_v[0], want_v[0], want_v[1], want_v[1]]),
                               rtol=0, atol=0)


def test_rollout_rows_score_whole_groups_on_their_shared_prompts():
    """G = 2: rows 2:4 are the second group (one prompt, group size 2); rows 1:3 straddle two groups (each row
    with its own prompt, group size 1)."""
    p = torch.tensor([[5, 6], [7, 8]])
    ro = Rollout(prompt_ids=p.repeat_interleave(2, 0), prompt_mask=torch.ones(4, 2, dtype=torch.long),
                 completion_ids=torch.arange(12).view(4, 3), completion_mask=torch.ones(4, 3, dtype=torch.long),
                 texts=["a", "b", "c", "d"], group_size=2, clipped=torch.zeros(4, dtype=torch.bool),
                 prompts={"input_ids": p, "attention_mask": torch.ones(2, 2, dtype=torch.long)})
    whole = rollout_types.rollout_rows(ro, 2, 4)
    assert whole.group_size == 2 and whole.prompts["input_ids"].tolist() == [[7, 8]]
    assert whole.texts == ["c", "d"]
    straddle = rollout_types.rollout_rows(ro, 1, 3)
    assert straddle.group_size == 1 and straddle.prompts["input_ids"].tolist() == [[5, 6], [7, 8]]


def test_scripted_engine_repeats_the_image_token_types(tokenizer):
    """The scripted rollout carries the prompts' mm_token_type_ids, each row repeated G = 2 times, like the
    sampling engines (image prompts stay scorable)."""
    mm = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]])
    batch = {"records": [{"id": "a"}, {"id": "b"}], "input_ids": torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]),
             "attention_mask": torch.ones(2, 4, dtype=torch.long), "mm_token_type_ids": mm}
    engine = ScriptedEngine(tokenizer, {"a": ["one"], "b": ["two", "three"]})
    out = engine.generate(None, batch, 2, SamplingConfig(max_new_tokens=8))
    assert out.extra["mm_token_type_ids"].tolist() == [mm[0].tolist(), mm[0].tolist(), mm[1].tolist(),
                                                       mm[1].tolist()]
    assert out.texts == ["one", "one", "two", "three"]


class _TwoEos:
    """A tokenizer whose ``eos_token_id`` lists several end tokens (as generation configs do)."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = [tok.eos_token_id, tok.pad_token_id]

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_hf_engine_takes_a_list_of_eos_ids(tokenizer):
    engine = HFGenerateEngine(_TwoEos(tokenizer))
    assert engine.eos_ids == [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert HFGenerateEngine(tokenizer).eos_ids == [tokenizer.eos_token_id]


def test_failed_self_check_notice_cuts_the_error_to_200_characters(tiny_models, tokenizer, fresh_verdicts,
                                                                    monkeypatch, capsys):
    model, _ = load_model(ModelSpec(str(tiny_models["teacher"])))
    engine = CachedSamplingEngine(tokenizer)

    def boom(m):
        raise RuntimeError("x" * 300)

    monkeypatch.setattr(engine, "_lean_probe", boom)
    assert engine._lean_verified(model) is False
    err = capsys.readouterr().err
    assert "(RuntimeError: " + "x" * 200 + ")" in err and "x" * 201 not in err


def test_probe_leaves_a_recorded_verdict_as_it_was(tiny_models, tokenizer, fresh_verdicts):
    """The self-check probe decodes through the lean path (a temporary True verdict) and then restores what
    was recorded for the architecture."""
    model, _ = load_model(ModelSpec(str(tiny_models["teacher"])))
    key = R._lean_key(model, model.model)
    fresh_verdicts[key] = False
    assert CachedSamplingEngine(tokenizer)._lean_probe(model) is None  # the tiny Qwen3 passes its check
    assert fresh_verdicts[key] is False
