"""Sharded, resumable generation and evaluation on 2 gloo ranks (CPU), against the same run on 1 rank.

Policy: a :class:`~tests.scripted_engine.ScriptedEngine` answering each record id from a fixed plan (the plans of
``test_traces``), deterministic like greedy decoding, so the 1-rank and the 2-rank data sets must be equal record
for record. The script counts the prompts each rank hands to the engine.

Runs: 1 rank in this process (predict, then validate with ``BenchmarkCallback``); 2 ranks that stand still after
their first predict batch (after ``TraceWriter`` wrote its first shard) and are SIGKILLed as a process group; the
same 2-rank command again, which must resume: sample only the prompts no shard holds, then merge.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_traces import PLANS, completions
from vold_pl.data.schema import read_jsonl

REPO = Path(__file__).resolve().parents[1]
N_PREDICT, N_VAL, BATCH = 7, 5, 2  # 7 prompts over 2 ranks: 4 + 3, the short rank's share padded with a repeat
RUN_TIMEOUT_S = 240

SCRIPT = textwrap.dedent('''
    """predict (TraceWriter) then validate (BenchmarkCallback) on 1 or 2 CPU ranks with a scripted policy."""
    import json, sys, time
    from datetime import timedelta
    from pathlib import Path

    import lightning as L
    import torch

    from vold_pl.callbacks.benchmark import BenchmarkCallback, BenchmarkSpec
    from vold_pl.callbacks.trace_writer import TraceWriter
    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.sft import SFTModule
    from tests.scripted_engine import ScriptedEngine


    class Scripted(L.Callback):
        """Answers from the plan and records the ids of the prompts this rank samples."""

        def __init__(self, plan, bench, out):
            self.plan, self.bench, self.out, self.sampled = plan, bench, out, []

        def _engine(self, pl_module):
            engine = ScriptedEngine(pl_module.tokenizer, self.plan)
            generate = engine.generate

            def counting(model, batch, k, sampling):
                self.sampled += [r["id"] for r in batch["records"]]
                return generate(model, batch, k, sampling)

            engine.generate = counting
            return engine

        def on_predict_start(self, trainer, pl_module):
            pl_module.rollout_engine = self._engine(pl_module)

        def on_predict_end(self, trainer, pl_module):
            self._dump(trainer, "sampled")

        def on_validation_start(self, trainer, pl_module):
            self.sampled, self.val_ids = [], []
            self.bench.engine = self._engine(pl_module)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.val_ids += [r["id"] for r in batch["records"]]

        def on_validation_end(self, trainer, pl_module):
            self._dump(trainer, "bench_sampled")
            (self.out / f"val_ids-{trainer.world_size}-{trainer.global_rank}.json").write_text(json.dumps(self.val_ids))

        def _dump(self, trainer, what):
            (self.out / f"{what}-{trainer.world_size}-{trainer.global_rank}.json").write_text(json.dumps(self.sampled))


    class StallAfter(L.Callback):
        """Stands still after ``n`` predict batches (TraceWriter has handled them), for the test to kill the run."""

        def __init__(self, n, out):
            self.n, self.out = n, out

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx + 1 == self.n:
                (self.out / f"stalled-{trainer.global_rank}").write_text("")
                time.sleep(600)


    def main(model, data, val, out, devices, stall, n_predict, n_val, batch):
        torch.set_num_threads(1)
        out = Path(out)
        plan = json.loads((out / "plan.json").read_text())
        bench = BenchmarkCallback([BenchmarkSpec("synthetic", val, limit=n_val)], max_new_tokens=64,
                                  batch_size=batch, out_dir=str(out / f"bench-{devices}"))
        writer = TraceWriter(str(out / f"traces-{devices}.jsonl"), num_samples=4, max_new_tokens=256, temperature=0.0,
                             keep="all", shard_every=batch)
        callbacks = [writer, Scripted(plan, bench, out), bench] + ([StallAfter(stall, out)] if stall else [])
        strategy = "auto"
        if devices > 1:
            from lightning.pytorch.strategies import DDPStrategy

            strategy = DDPStrategy(timeout=timedelta(seconds=120))
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False, callbacks=callbacks, default_root_dir=str(out))
        module = SFTModule(ModelSpec(model), export=False)
        dm = ReasoningDataModule(predict=[DataSource(data, limit=n_predict)], val=[DataSource(val, limit=n_val)],
                                 val_batch_size=batch)
        trainer.predict(module, datamodule=dm, return_predictions=False)
        trainer.validate(module, datamodule=dm)


    if __name__ == "__main__":
        a = sys.argv[1:]
        main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]), int(a[8]))
''')


def _launch(script: Path, args: list[str], log: Path) -> list[subprocess.Popen]:
    """Both ranks at once, as ``torchrun`` starts them (Lightning sees ``LOCAL_RANK`` and creates no process):
    each imports torch and Lightning in parallel with the other, not after it. Each in its own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    procs = []
    for r in (0, 1):
        with open(f"{log}.{r}", "w") as fh:
            procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=str(script.parent),
                                          env={**env, "LOCAL_RANK": str(r), "RANK": str(r)}, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait(procs: list[subprocess.Popen], until, log: Path) -> None:
    """Wait for ``until()`` (or, with ``until=None``, for both ranks to exit); fail on a timeout or a failed rank."""
    deadline = time.time() + RUN_TIMEOUT_S
    while True:
        failed = [p.returncode for p in procs if p.poll() not in (None, 0)]
        if not failed and (until() if until else all(p.poll() == 0 for p in procs)):
            return
        if failed or time.time() > deadline or (until and all(p.poll() is not None for p in procs)):
            _kill(procs)
            logs = "\n".join(Path(f"{log}.{r}").read_text()[-3000:] for r in (0, 1))
            pytest.fail(f"the 2-rank run failed or hung ({failed or 'timeout'}):\n{logs}")
        time.sleep(0.3)


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_shard_resume_and_match_one_rank(tmp_path, tiny_models, synth_data):
    out = tmp_path / "out"
    out.mkdir()
    predict_recs = read_jsonl(synth_data["train"])[0][:N_PREDICT]
    val_recs = read_jsonl(synth_data["val"])[0][:N_VAL]
    plan = {r.id: completions(r, PLANS[i % 4]) for recs in (predict_recs, val_recs) for i, r in enumerate(recs)}
    (out / "plan.json").write_text(json.dumps(plan))
    script = tmp_path / "sharded_generation.py"
    script.write_text(SCRIPT)

    def args(devices: int, stall: int) -> list[str]:
        return [str(tiny_models["student"]), str(synth_data["train"]), str(synth_data["val"]), str(out),
                str(devices), str(stall), str(N_PREDICT), str(N_VAL), str(BATCH)]

    # -- 1 rank, in this process: the reference.
    runpy.run_path(str(script), run_name="sharded_generation")["main"](*args(1, 0)[:4], 1, 0, N_PREDICT, N_VAL, BATCH)
    ids = [r.id for r in predict_recs]
    assert json.loads((out / "sampled-1-0.json").read_text()) == ids

    # -- 2 ranks, killed (SIGKILL, both ranks) once each has handled its first batch.
    procs = _launch(script, args(2, 1), tmp_path / "killed.log")
    _wait(procs, lambda: all((out / f"stalled-{r}").exists() for r in (0, 1)), tmp_path / "killed.log")
    _kill(procs)
    shards = out / "traces-2.shards"
    # Each rank wrote one shard of its first 2 prompts: rank r took rows r, r + 2, ... (an even split).
    written = {f.name: [e["id"] for e in _lines(f)] for f in sorted(shards.glob("r*.jsonl"))}
    assert written == {"r00000-000000.jsonl": [ids[0], ids[2]], "r00001-000000.jsonl": [ids[1], ids[3]]}
    assert not (out / "traces-2.jsonl").exists()  # no final data set from a killed run

    # -- the same command again: resumes.
    procs = _launch(script, args(2, 0), tmp_path / "resumed.log")
    _wait(procs, None, tmp_path / "resumed.log")

    # Only the 3 prompts without a shard were sampled: rows 4, 6 on rank 0; row 5 on rank 1, once more as the
    # repeat that evens out its share (which is not written twice).
    sampled = [json.loads((out / f"sampled-2-{r}.json").read_text()) for r in (0, 1)]
    assert sampled == [[ids[4], ids[6]], [ids[5], ids[5]]]
    summary = json.loads((out / "traces-2.summary.json").read_text())
    assert (summary["resumed_prompts"], summary["sampled_prompts"], summary["total"]) == (4, 3, N_PREDICT)
    assert not shards.exists()  # merged, then removed

    # Every id exactly once, and the same records (and counts) as on 1 rank.
    ref, got = _lines(out / "traces-1.jsonl"), _lines(out / "traces-2.jsonl")
    assert got == ref
    assert len({r["id"] for r in got}) == len(got)
    # keep: all -> one record per correct sample with a trace; by hand from PLANS (rows 0..6, plan i % 4):
    # [long, short, reflect] = 3, [] = 0, [long, reflect, verbose] = 3, [onlyreflect -> empty, long, long] = 2.
    assert len(got) == 3 + 0 + 3 + 2 + 3 + 0 + 3
    base = lambda i: i if i in ids else i.rpartition("-")[0]  # noqa: E731 - extra traces of a prompt: <id>-1, <id>-2
    assert {base(r["id"]) for r in got} == {ids[i] for i in (0, 2, 3, 4, 6)}
    ref_summary = json.loads((out / "traces-1.summary.json").read_text())
    assert summary["counts"] == ref_summary["counts"] and summary["kept"] == ref_summary["kept"] == 5

    # Validation: each rank ran its own share of the 5 rows (3 each, rank 1 repeating one), together all of them.
    val_ids = [r.id for r in val_recs]
    shares = [json.loads((out / f"val_ids-2-{r}.json").read_text()) for r in (0, 1)]
    assert shares == [val_ids[0::2], val_ids[1::2] + val_ids[1:2]]
    # BenchmarkCallback decoded each problem once over both ranks and scored it once: the same predictions and
    # accuracy as 1 rank. Sample 0 of the plans: wrong, wrong, long, onlyreflect, wrong -> 2 / 5 correct.
    decoded = [json.loads((out / f"bench_sampled-2-{r}.json").read_text()) for r in (0, 1)]
    assert sorted(decoded[0] + decoded[1]) == sorted(val_ids)
    preds = {n: _lines(out / f"bench-{n}" / "benchmark_predictions.jsonl") for n in (1, 2)}
    assert [p["id"] for p in preds[2]] == val_ids and preds[2] == preds[1]
    reports = {n: json.loads((out / f"bench-{n}" / "benchmark_report.json").read_text()) for n in (1, 2)}
    for n in (1, 2):
        s = reports[n]["benchmarks"]["synthetic"]
        assert s["n"] == N_VAL and s["accuracy"] == pytest.approx(2 / N_VAL), s


def test_rerun_samples_only_prompts_without_a_shard(tmp_path, tiny_models, synth_data, monkeypatch):
    """1 rank, in this process, through ``vold-pl predict``: a rerun of a finished set (shards kept) samples
    nothing and writes the same file (Lightning skips an empty predict loop, so the merge happens at setup); a
    resume with other sampling settings is refused, naming the setting. (A partial resume: the 2-rank test.)"""
    from types import SimpleNamespace

    from tests.test_traces import run_predict
    from vold_pl.callbacks.trace_writer import TraceWriter
    from vold_pl.errors import UserError
    from tests.scripted_engine import ScriptedEngine

    sampled: list[str] = []
    generate = ScriptedEngine.generate

    def counting(self, model, batch, k, sampling):
        sampled.extend(r["id"] for r in batch["records"])
        return generate(self, model, batch, k, sampling)

    monkeypatch.setattr(ScriptedEngine, "generate", counting)
    out = tmp_path / "traces.jsonl"
    writer = {"out_path": str(out), "num_samples": 4, "max_new_tokens": 256, "temperature": 0.0, "keep": "all",
              "shard_every": 3, "keep_shards": True}
    records, first = run_predict(tmp_path, tiny_models["student"], synth_data["train"], 5, "student", writer)
    ids = [r.id for r in records]
    assert sampled == ids and (first["resumed_prompts"], first["sampled_prompts"]) == (0, 5)
    shards = sorted(out.with_suffix(".shards").glob("r*.jsonl"))  # val_batch_size 3: a shard after each batch
    assert [[e["id"] for e in _lines(f)] for f in shards] == [ids[:3], ids[3:]]
    text = out.read_text()

    sampled.clear()
    out.unlink()
    _, again = run_predict(tmp_path, tiny_models["student"], synth_data["train"], 5, "student", writer)
    assert sampled == [] and out.read_text() == text
    assert (again["resumed_prompts"], again["sampled_prompts"]) == (5, 0) and again["counts"] == first["counts"]

    other = TraceWriter(str(out), num_samples=2, max_new_tokens=256, temperature=0.0, keep="all")
    trainer = SimpleNamespace(datamodule=SimpleNamespace(view="student"))
    module = SimpleNamespace(model_spec=SimpleNamespace(name_or_path=str(tiny_models["student"])))
    with pytest.raises(UserError, match=r"meta.json: field 'num_samples': .* used 4, this run 2"):
        other._read_shards(other._fingerprint(trainer, module))
