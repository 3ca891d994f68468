"""Loading a model for FSDP2 with its full weights in host memory on rank 0 only (``vold_pl.models.rank0_load``):
on 2 gloo ranks (CPU), each rank's shards equal the ``from_pretrained`` model's, and the peak RSS a rank adds while
loading is ~1x the model's bytes on rank 0 and ~1/2x on rank 1, against ~1x on every rank when each loads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, re, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    def rss(field):
        return int(re.search(rf"^{field}:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024

    rank, mode, folder, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from vold_pl.models.factory import ModelSpec, load_model
    from vold_pl.models.rank0_load import load_sharded_from_rank0

    mesh = init_device_mesh("cpu", (2,))

    def shard(model):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    spec = ModelSpec(folder)
    from vold_pl.models.rank0_load import meta_model
    meta_model(spec)  # import the modeling code (~100 MB of RSS) before measuring, in both modes
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here
    before = rss("VmRSS")
    if mode == "rank0":
        model = load_sharded_from_rank0(spec, shard)
    else:  # every rank reads the whole checkpoint, then shards it
        model, _ = load_model(spec, with_processor=False)
        shard(model)
    peak = rss("VmHWM") - before
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # after the measurement
    bufs = {n: b for n, b in model.named_buffers()}
    if rank == 0:
        ref, _ = load_model(spec, with_processor=False)
        same = all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
        same = same and all(torch.equal(bufs[n], b) for n, b in ref.named_buffers())
    else:
        same = None
    Path(out).write_text(json.dumps({"rank": rank, "peak_added": peak, "same": same}))
    dist.barrier()
    dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> tuple[Path, int]:
    """A Qwen2 of 24 layers and a small vocabulary (~150 MB fp32): no single tensor is a large share of it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("deep_qwen2")
    cfg = Qwen2Config(vocab_size=1024, hidden_size=384, intermediate_size=1024, num_hidden_layers=24,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    from vold_pl.toy.tiny import train_tokenizer

    train_tokenizer(["a b c d e f g"] * 20, vocab_size=300).save_pretrained(folder)
    return folder, sum(p.numel() * p.element_size() for p in model.parameters())


def _run(mode: str, folder: Path, tmp: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    script = tmp / "worker.py"
    script.write_text(WORKER)
    store = tmp / f"store_{mode}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), mode, str(folder), str(store),
                               str(tmp / f"{mode}{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return [json.loads((tmp / f"{mode}{r}.json").read_text()) for r in range(2)]


def test_rank0_load_bounds_host_memory(deep_model, tmp_path):
    folder, nbytes = deep_model
    rank0 = _run("rank0", folder, tmp_path)
    every = _run("every", folder, tmp_path)
    assert rank0[0]["same"] is True and every[0]["same"] is True  # the shards hold the checkpoint's values
    r = {m: [x["peak_added"] / nbytes for x in rows] for m, rows in (("rank0", rank0), ("every", every))}
    print(f"peak RSS added while loading, in model bytes ({nbytes / 2**20:.0f} MB): rank-0 load {r['rank0']}, "
          f"every rank loads {r['every']}")
    assert all(x >= 0.9 for x in r["every"]), r  # each rank holds the whole model at some point
    assert r["rank0"][1] <= 0.75, r  # rank 1: its half, one tensor in flight at a time
    assert r["rank0"][0] <= 1.75, r  # rank 0: the checkpoint and its own half
    assert sum(r["rank0"]) <= sum(r["every"]) - 0.5, r
