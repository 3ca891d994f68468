"""``benchmarks/gpu_smoke.py``: without CUDA it skips with one line and exit status 0; ``--device cpu --tiny``
runs its whole code path (real-architecture rehearsal models, eager vs static decode with equal outputs, a few
OPD-GRPO steps) and writes the JSON it would write on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_smoke.py"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run, not skip")
def test_skips_without_cuda(tmp_path):
    r = _run("--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("[gpu_smoke] skipped: no CUDA device") and not list(tmp_path.iterdir())


def test_cpu_tiny_smoke_writes_the_json(tmp_path):
    r = _run("--device", "cpu", "--tiny", "--compile", "none", "--out", str(tmp_path), "--workdir",
             str(tmp_path / "work"))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    out = json.loads((tmp_path / "gpu_smoke_cpu_tiny.json").read_text())
    d, s = out["decode"], out["steps"]
    assert d["outputs_equal"] is True and d["static_decode_path"] == "static"
    assert d["eager"]["tokens"] == d["static"]["tokens"] == 2 * 6  # 1 prompt x G=2, 6 tokens each (no EOS)
    assert d["eager"]["tokens_per_s"] > 0 and d["static"]["tokens_per_s"] > 0
    assert len(s["step_s"]) == 2 and s["median_step_s"] > 0 and s["peak_memory_bytes"] > 0
