"""One home per job: the ``synced_gpus`` decision (``vold_pl.sharding.generation_needs_sync``), CPU thread
set-up where the CLI starts (``vold_pl.startup``), and the processor only for the families it serves."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from vold_pl.errors import UserError

# ------------------------------------------------------------------------------------- synced_gpus decision

SYNC_TIMEOUT_S = 30  # a rank left waiting in a collective fails after this (instead of hanging the suite)


def _two_rank_generate(rank: int, store: str, teacher: str, out: str) -> None:
    """One of 2 gloo ranks: the tiny Qwen3 sharded by vold-pl's FSDP2 code, then HF generate through
    ``HFGenerateEngine`` with a different length cap per rank (rank 0 stops after 1 token, rank 1 runs 6)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vold_pl.sharding import generation_needs_sync, shard_model
    from vold_pl.rl.hf_engine import HFGenerateEngine
    from vold_pl.rl.rollout_types import SamplingConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=SYNC_TIMEOUT_S))
    try:
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(teacher)
        plain = AutoModelForCausalLM.from_pretrained(teacher).eval()
        sharded = AutoModelForCausalLM.from_pretrained(teacher).eval()
        shard_model(sharded, init_device_mesh("cpu", (2,)))
        batch = tok(["one two three four"], return_tensors="pt")
        ro = HFGenerateEngine(tok).generate(sharded, dict(batch), 1,
                                            SamplingConfig(max_new_tokens=1 + 5 * rank, do_sample=False))
        ref = HFGenerateEngine(tok).generate(plain, dict(batch), 1,
                                             SamplingConfig(max_new_tokens=1 + 5 * rank, do_sample=False))
        result = {"sharded": generation_needs_sync(sharded), "plain": generation_needs_sync(plain),
                  "tokens": ro.completion_ids.tolist(), "plain_tokens": ref.completion_ids.tolist()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_generation_needs_sync_only_for_a_sharded_model_on_several_ranks(tiny_models, tmp_path):
    """Sharded with FSDP2 on 2 ranks: synced generate (rank 0's 1-token rollout keeps stepping while rank 1
    decodes 6, the tokens are the unsharded model's); an unsharded model, or no process group: no sync."""
    import torch.multiprocessing as mp
    import transformers  # noqa: F401 - imported once here: the forked ranks inherit it

    from vold_pl.sharding import generation_needs_sync
    from vold_pl.rl import hf_engine  # noqa: F401

    assert not generation_needs_sync(torch.nn.Linear(2, 2))  # no process group in this process
    mp.start_processes(_two_rank_generate, nprocs=2, join=True, start_method="fork",
                       args=(str(tmp_path / "store"), str(tiny_models["teacher"]), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["sharded"], r["plain"]) for r in ranks] == [(True, False), (True, False)]
    assert [r["tokens"] == r["plain_tokens"] for r in ranks] == [True, True]
    assert len(ranks[0]["tokens"][0]) == 1 and len(ranks[1]["tokens"][0]) > 1  # the ranks really stop apart


# ------------------------------------------------------------------------------------------ CPU threads

@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_configure_cpu_threads_order(monkeypatch, restore_threads):
    from vold_pl.startup import available_cores, configure_cpu_threads, set_cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VOLD_NUM_THREADS", "2")
    assert configure_cpu_threads() == 2 == torch.get_num_threads()  # vold-pl's own variable first
    monkeypatch.delenv("VOLD_NUM_THREADS")
    torch.set_num_threads(3)
    assert configure_cpu_threads() == 3  # OMP_NUM_THREADS set: what torch took from it stays
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(available_cores() + 5)
    assert configure_cpu_threads() == available_cores()  # torch's default, capped at this process's cores
    torch.set_num_threads(1)
    assert configure_cpu_threads() == 1  # below the cap: left as it is
    assert set_cpu_threads(1) == 1 and set_cpu_threads() == available_cores()  # benchmarks: an exact count
    monkeypatch.setenv("VOLD_NUM_THREADS", "two")
    with pytest.raises(UserError, match="VOLD_NUM_THREADS='two' must be a whole number"):
        configure_cpu_threads()


def test_cli_sets_threads_at_start(monkeypatch, capsys, restore_threads):
    """``vold-pl`` applies the thread set-up before it parses anything: a bad value stops it at once (exit 2)."""
    from vold_pl.cli import main

    monkeypatch.setenv("VOLD_NUM_THREADS", "0")
    with pytest.raises(SystemExit) as ei:
        main(["fit", "--config", "does-not-matter.yaml"])
    assert ei.value.code == 2 and "VOLD_NUM_THREADS='0'" in capsys.readouterr().err
    monkeypatch.setenv("VOLD_NUM_THREADS", "1")
    torch.set_num_threads(2)
    with pytest.raises(SystemExit):  # the config file is missing: LightningCLI stops, after the set-up ran
        main(["fit", "--config", "does-not-exist.yaml"])
    assert torch.get_num_threads() == 1


# ---------------------------------------------------------------------------------------- VLM families

def test_vlm_of_another_family_is_refused_by_name(tiny_models, tmp_path):
    """Qwen2.5-VL loads with its image-only processor; a LLaVA (another family's config.json) is refused before
    any weights load, naming the path, its model_type and what is supported."""
    from transformers import LlavaConfig

    from vold_pl.models.factory import MODEL_KEY, ModelSpec, load_model, load_processor
    from vold_pl.models.processor import Qwen2_5_VLImageTextProcessor, UnsupportedVisionModelError

    assert type(load_processor(ModelSpec(str(tiny_models["student"])))) is Qwen2_5_VLImageTextProcessor
    LlavaConfig().save_pretrained(tmp_path / "llava")  # config.json only: the check must not need weights
    path = str(tmp_path / "llava")
    for load in (load_processor, load_model):
        with pytest.raises(UnsupportedVisionModelError) as ei:
            load(ModelSpec(path))
        msg = str(ei.value)
        assert isinstance(ei.value, UserError) and msg.startswith(f"{MODEL_KEY}: {path!r}")
        assert "model_type 'llava'" in msg and "Qwen2.5-VL (model_type 'qwen2_5_vl')" in msg
