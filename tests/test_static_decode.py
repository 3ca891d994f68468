"""The static-cache decode engine: greedy completions equal ``model.generate``'s, sampled completions equal the
eager engine's for the same seed (compiled and not), EOS read by the host only every k steps, the CUDA-only
compile mode refused with a notice on CPU, and the config that selects it."""

from __future__ import annotations

import pytest
import torch

from tests.test_rollout import (  # noqa: F401 - module fixtures reused: processor, mixed_batch, text_batch
    GREEDY,
    _assert_same_rollout,
    _first_varied,
    _rows,
    _student,
    _text_llm,
    mixed_batch,
    processor,
    text_batch,
)
from vold_pl.data.collate import PromptCollator
from vold_pl.errors import UserError
from vold_pl.models.factory import ModelSpec, load_model, load_processor
from vold_pl.rl.cached_sampler import CachedSamplingEngine
from vold_pl.rl.hf_engine import HFGenerateEngine
from vold_pl.rl.rollout_types import SamplingConfig
from vold_pl.rl.static_decode import DecodeConfig, StaticDecodeEngine, make_engine

SAMPLED = [SamplingConfig(max_new_tokens=16), SamplingConfig(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20)]


@pytest.fixture(scope="module")
def varied_vlm(tiny_models, processor, mixed_batch):  # noqa: F811
    return _first_varied(lambda seed: _student(tiny_models, processor, seed=seed), processor, mixed_batch, G=2,
                         n_lengths=3)


@pytest.mark.parametrize("every", [1, 3])
def test_greedy_equals_generate_on_vlm_student(processor, mixed_batch, varied_vlm, every):  # noqa: F811
    tok = processor.tokenizer
    ref = HFGenerateEngine(tok).generate(varied_vlm, mixed_batch, 2, GREEDY)
    engine = StaticDecodeEngine(tok, compile="none", eos_check_every=every)
    out = engine.generate(varied_vlm, mixed_batch, 2, GREEDY)
    assert engine.last_decode_path == "static"
    _assert_same_rollout(ref, out)
    lengths = out.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) >= 3 and lengths.min() < GREEDY.max_new_tokens, lengths


@pytest.mark.parametrize("sampling", SAMPLED, ids=["t1", "t0.7_topp0.9_topk20"])
@pytest.mark.parametrize("kind", ["vlm", "llm"])
def test_sampled_equals_eager_engine_for_a_seed(processor, mixed_batch, text_batch, varied_vlm, kind,  # noqa: F811
                                                sampling):
    tok = processor.tokenizer

    def eager(model, batch):
        torch.manual_seed(11)
        return CachedSamplingEngine(tok, compact=False, track_logprobs=True).generate(model, batch, 3, sampling)

    if kind == "vlm":
        model, batch = varied_vlm, mixed_batch
        ref = eager(model, batch)
    else:  # the first EOS bias whose samples end at different steps (the precondition of the check below)
        batch = text_batch
        for bias in (1.0, 2.0, 3.0, 4.0):
            model = _text_llm(processor, bias=bias)
            ref = eager(model, batch)
            if len(set(ref.completion_mask.sum(-1).tolist())) >= 2:
                break
    torch.manual_seed(11)
    engine = StaticDecodeEngine(tok, compile="none", eos_check_every=4)
    engine.track_logprobs = True
    out = engine.generate(model, batch, 3, sampling)
    assert engine.last_decode_path == "static"
    _assert_same_rollout(ref, out)
    assert len(set(out.completion_mask.sum(-1).tolist())) >= 2  # rows ended at different steps
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)


def test_host_reads_eos_every_k_steps(processor, text_batch):  # noqa: F811
    tok = processor.tokenizer
    model = _text_llm(processor, bias=-1e4)  # EOS never sampled: every row runs to max_new_tokens
    sampling = SamplingConfig(max_new_tokens=16, do_sample=False)
    for every, syncs in ((1, 15), (4, 3), (16, 0)):  # checks after steps k, 2k, ... before the last one
        engine = StaticDecodeEngine(tok, compile="none", eos_check_every=every)
        out = engine.generate(model, text_batch, 2, sampling)
        assert out.completion_ids.shape[1] == 16 and bool(out.clipped.all())
        assert engine.host_syncs == syncs, (every, engine.host_syncs)


def test_compiled_step_equals_eager_and_generate(processor, text_batch, capsys):  # noqa: F811
    """``torch.compile`` of the static step (one compilation, then replays): greedy = generate, sampled = the
    eager engine's; ``reduce-overhead`` on CPU is refused with one notice and compiles with ``default``."""
    tok = processor.tokenizer
    model = _text_llm(processor, bias=3.0)
    engine = StaticDecodeEngine(tok, compile="reduce-overhead", eos_check_every=8)
    ref = HFGenerateEngine(tok).generate(model, text_batch, 2, GREEDY)
    _assert_same_rollout(ref, engine.generate(model, text_batch, 2, GREEDY))
    assert engine.last_decode_path == "static"
    err = capsys.readouterr().err
    assert sum("reduce-overhead needs CUDA" in line for line in err.splitlines()) == 1, err
    assert [d.mode for d in engine._decoders.values()] == ["default"]
    sampling = SamplingConfig(max_new_tokens=GREEDY.max_new_tokens)  # same cache length: the same compiled step
    torch.manual_seed(5)
    ref = CachedSamplingEngine(tok, compact=False).generate(model, text_batch, 2, sampling)
    torch.manual_seed(5)
    _assert_same_rollout(ref, engine.generate(model, text_batch, 2, sampling))
    assert "reduce-overhead" not in capsys.readouterr().err  # told once


def test_real_shape_qwen2_5_vl_greedy_equals_generate(real_shape_models, synth_data):
    """The real-architecture rehearsal student (151936-row vocabulary, real tokenizer, mrope, image prompts)."""
    proc = load_processor(ModelSpec(str(real_shape_models["student"])))
    model, _ = load_model(ModelSpec(str(real_shape_models["student"])))
    model.eval()
    batch = PromptCollator(proc)(_rows(synth_data["train"], 2) + _rows(synth_data["train_text"], 1))
    assert "pixel_values" in batch and (batch["attention_mask"] == 0).any()
    sampling = SamplingConfig(max_new_tokens=8, do_sample=False)
    ref = HFGenerateEngine(proc.tokenizer).generate(model, batch, 2, sampling)
    engine = StaticDecodeEngine(proc.tokenizer, compile="none", eos_check_every=4)
    out = engine.generate(model, batch, 2, sampling)
    assert engine.last_decode_path == "static"
    _assert_same_rollout(ref, out)


def test_buffers_reused_grown_and_rebuilt_for_a_new_head(processor, text_batch):  # noqa: F811
    tok = processor.tokenizer
    model = _text_llm(processor, bias=3.0)
    engine = StaticDecodeEngine(tok, compile="none", cache_bucket=8)
    short, long = SamplingConfig(max_new_tokens=4, do_sample=False), SamplingConfig(max_new_tokens=20, do_sample=False)
    engine.generate(model, text_batch, 2, long)
    (first,) = engine._decoders.values()
    engine.generate(model, text_batch, 2, short)  # fits: the same buffers
    assert list(engine._decoders.values()) == [first]
    cap = first.capacity
    engine.generate(model, text_batch, 2, SamplingConfig(max_new_tokens=40, do_sample=False))  # grows
    (grown,) = engine._decoders.values()
    assert grown is not first and grown.capacity > cap
    from tests.test_rollout import _eos_prone

    _eos_prone(model, tok.eos_token_id, 1.0, 2.0, seed=3)  # a new LM head: a step built on the old one is stale
    out = engine.generate(model, text_batch, 2, GREEDY)
    _assert_same_rollout(HFGenerateEngine(tok).generate(model, text_batch, 2, GREEDY), out)
    assert len(engine._decoders) == 2


def test_falls_back_to_eager_loop_when_not_lean(processor, text_batch):  # noqa: F811
    tok = processor.tokenizer
    model = _text_llm(processor, bias=3.0)
    engine = StaticDecodeEngine(tok, compile="none")
    engine.lean_decode = False  # no lean step: nothing to build the static step from
    out = engine.generate(model, text_batch, 2, GREEDY)
    assert engine.last_decode_path == "hf"
    _assert_same_rollout(HFGenerateEngine(tok).generate(model, text_batch, 2, GREEDY), out)


def test_decode_config_selects_the_engine(tiny_models, processor):  # noqa: F811
    tok = processor.tokenizer
    assert type(make_engine(tok)) is CachedSamplingEngine
    e = make_engine(tok, DecodeConfig(engine="static", compile="none", eos_check_every=5, cache_bucket=32))
    assert isinstance(e, StaticDecodeEngine) and (e.compile_mode, e.eos_check_every, e.cache_bucket) == ("none", 5, 32)
    from vold_pl.modules.opd_grpo import OPDConfig, OPDGRPOModule

    module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), opd=OPDConfig(lam=0.0),
                           decode=DecodeConfig(engine="static", compile="none"))
    assert isinstance(module.rollout_engine, StaticDecodeEngine) and module.rollout_engine.compile_mode == "none"
    with pytest.raises(UserError, match="decode.engine"):
        DecodeConfig(engine="vllm")
    with pytest.raises(UserError, match="eos_check_every"):
        DecodeConfig(eos_check_every=0)


def test_lean_and_static_paths_inside_rollout_unshard(tmp_path, processor, text_batch):  # noqa: F811
    """An FSDP2-sharded model (a 1-rank gloo group, in this process): outside ``unsharded`` its parameters are
    DTensor shards and the engines decode through the HF forward; inside it the weights are whole and the lean
    and static paths run, with the unsharded model's greedy completions."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vold_pl.rl.unsharded import unsharded

    tok = processor.tokenizer
    model = _text_llm(processor, bias=3.0)
    ref = HFGenerateEngine(tok).generate(copy.deepcopy(model), text_batch, 2, GREEDY)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        engine = StaticDecodeEngine(tok, compile="none")
        _assert_same_rollout(ref, engine.generate(model, text_batch, 2, GREEDY))
        assert engine.last_decode_path == "hf"  # sharded weights: the HF forward gathers them
        for eng, path in ((engine, "static"), (CachedSamplingEngine(tok), "lean")):
            with unsharded(model):
                out = eng.generate(model, text_batch, 2, GREEDY)
            assert eng.last_decode_path == path
            _assert_same_rollout(ref, out)
    finally:
        dist.destroy_process_group()
