"""Exact resume (issue 6): N steps straight == N/2 steps, preempted, + resume for N/2, bit for bit.

Every run is seeded; the first half is stopped by a real signal (SIGUSR1 sent to the process at step N/2, caught by
``PreemptionCallback``, which writes ``last.ckpt`` and stops cleanly); the second half resumes from
``ckpt_path="last"`` in a freshly built module, data module and trainer, after re-seeding (as a new process does).
Compared per step: loss, reward, the batch's record ids, the sampled completions; at the end: every weight.
The straight run crosses an epoch boundary and the stop is mid-epoch, so the loader position, the sampler epoch,
the optimizer (8-bit AdamW for SFT), the LR schedule and every RNG must all come back.

Also: a SIGTERM sent to a running ``vold-pl fit`` subprocess, and a 2-process DDP (gloo) resume.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from vold_pl.callbacks.preemption import PreemptionCallback
from vold_pl.checkpointing import ResumableCheckpoint
from vold_pl.data.schema import Record
from vold_pl.data.datamodule import ReasoningDataModule
from vold_pl.data.sources import DataSource
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.modules.sft import SFTModule
from vold_pl.rewards import functions as reward_fns
from vold_pl.rl.rollout_types import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
HASH_REWARD = "_test_resume_text_hash"
COIN_REWARD = "_test_resume_text_coin"


def _hash_reward(c, r):
    return (zlib.crc32(c.encode()) % 997) / 997


def _coin_reward(c, r):
    """0 or 1 by the text's hash: with G = 2 about half the groups tie, which dynamic sampling drops."""
    return float(zlib.crc32(c.encode()) % 2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module", autouse=True)
def hash_reward():
    """A reward that varies with the text: random tiny-model rollouts get non-zero advantages, weights move."""
    reward_fns.register_reward(HASH_REWARD, overwrite=True)(_hash_reward)
    reward_fns.register_reward(COIN_REWARD, overwrite=True)(_coin_reward)
    yield HASH_REWARD
    reward_fns._REGISTRY.pop(HASH_REWARD, None)
    reward_fns._REGISTRY.pop(COIN_REWARD, None)


def build(kind: str, models: dict, data: dict, optim: str = "adamw", world: int = 1):
    """(module, datamodule, optimizer steps per batch) for a tiny seeded run on mixed image + text sources."""
    student = ModelSpec(str(models["student"]))
    if kind == "sft":
        module = SFTModule(student, optim=OptimConfig(name=optim, lr=1e-2, warmup_steps=1), export=False)
        mu = 1
    else:  # opd_grpo; opd_grpo_dynamic: with dynamic sampling, on a reward whose groups often tie
        mu = 2
        dynamic = kind == "opd_grpo_dynamic"
        module = OPDGRPOModule(
            student, teacher=ModelSpec(str(models["teacher"])), optim=OptimConfig(lr=1e-3, warmup_steps=1),
            grpo=GRPOConfig(num_generations=2, num_iterations=mu, epsilon_high=0.28, loss_aggregation="token",
                            dynamic_sampling=dynamic, max_gen_batches=3),
            opd=OPDConfig(lam=0.5), sampling=SamplingConfig(max_new_tokens=6),
            rewards={"accuracy": 1.0, "format": 0.1, COIN_REWARD if dynamic else HASH_REWARD: 1.0}, export=False,
            log_completions_every_n_steps=0)
    dm = ReasoningDataModule(
        train=[DataSource(str(data["train"]), 0.5), DataSource(str(data["train_text"]), 0.5)],
        val=[DataSource(str(data["val"]), limit=2)], batch_size=2, val_batch_size=2,
        epoch_size=6 * world)  # 3 batches per rank and epoch
    return module, dm, mu


class Recorder(L.Callback):
    """Per batch: global step, loss, reward, record ids and (RL) the sampled completions."""

    def __init__(self):
        self.rows: list[dict] = []
        self._texts: list[str] = []
        self._last_step = -1

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step
        engine = pl_module.rollout_engine
        orig = engine.generate

        def generate(model, batch, n, sampling):
            out = orig(model, batch, n, sampling)
            if model.training or n > 1:
                self._texts.extend(out.texts)
            return out

        engine.generate = generate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # a batch that took no optimizer step (dynamic sampling kept its groups for the next) logged nothing new
        m = trainer.callback_metrics if trainer.global_step != self._last_step else {}
        self._last_step = trainer.global_step
        self.rows.append({"step": trainer.global_step, "loss": float(m["train/loss"]) if "train/loss" in m else None,
                          "reward": float(m["train/reward"]) if "train/reward" in m else None,
                          "ids": [r["id"] for r in batch["records"]], "texts": self._texts})
        self._texts = []


class SignalAt(L.Callback):
    """Sends ``signum`` to this process when the global step reaches ``step`` (from rank ``rank`` only)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1, rank: int = 0):
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


def fit(kind, models, data, root: Path, steps: int, stop_at: int | None = None, ckpt: str | None = None,
        optim: str = "adamw", **trainer_kw):
    L.seed_everything(0)  # what every new process does first (the CLI's seed_everything)
    module, dm, mu = build(kind, models, data, optim, trainer_kw.get("devices", 1))
    rec = Recorder()
    cbs = [rec] + ([SignalAt(stop_at)] if stop_at else [])
    cbs += [PreemptionCallback(), ResumableCheckpoint(every_n_train_steps=1000)]
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=cbs,
                        default_root_dir=str(root), val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=1, **({"gradient_clip_val": 1.0} if kind == "sft" else {}), **trainer_kw)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    return rec.rows, weights, trainer, module


def _records(data: dict, ids: list[str]) -> list[dict]:
    """The data set rows (images decoded) of these record ids, in this order."""
    from vold_pl.data.sources import read_records, to_dataset

    recs = {r.id: r for key in ("train", "train_text") for r in read_records(data[key])[0]}
    ds = to_dataset([recs[i] for i in ids])
    return [ds[i] for i in range(len(ids))]


def _hand_nll(models: dict, state_dict: dict, rows: list[dict]) -> float:
    """Completion-only next-token NLL of ``rows`` (token mean over the batch) under ``state_dict``'s weights."""
    from vold_pl.data.collate import IGNORE_INDEX, SFTCollator
    from vold_pl.models.factory import load_model

    model, processor = load_model(ModelSpec(str(models["student"])))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state_dict.items()})
    batch = SFTCollator(processor)(rows)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in keys if k in batch}, use_cache=False).logits.float()  # [B, T, V]
    nll = [-torch.log_softmax(logits[i, t - 1], -1)[batch["labels"][i, t]].item()
           for i, t in (batch["labels"] != IGNORE_INDEX).nonzero().tolist()]
    return sum(nll) / len(nll)


def _hand_reward(texts: list[str], rows: list[dict], G: int = 2) -> float:
    """Mean of accuracy + 0.1 format + the hash reward over completions, G per record in order."""
    import re

    from vold_pl.rewards.functions import accuracy_reward

    well_formed = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
    total = 0.0
    for k, text in enumerate(texts):
        row = rows[k // G]
        rec = Record(id=row["id"], problem=row["problem"], answer=row["answer"], answer_type=row["answer_type"],
                     choices=row["choices"])
        fmt = float(well_formed.fullmatch(text.strip()) is not None)
        total += accuracy_reward(text, rec) + 0.1 * fmt + _hash_reward(text, rec)
    return total / len(texts)


def assert_same_run(straight, halves, weights_a, weights_b):
    assert [r["step"] for r in straight] == [r["step"] for r in halves], (straight, halves)
    for a, b in zip(straight, halves):
        assert a == b, f"step {a['step']} differs:\n{a}\n{b}"
    diff = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not diff, f"final weights differ in {diff[:5]}"


# SFT stops after batch 3, the last of epoch 0 (the resume must start epoch 1 in full); OPD-GRPO (μ = 2 optimizer
# steps per batch) after batch 2, mid-epoch (the resume must skip exactly the consumed draws).
@pytest.mark.parametrize("kind,optim,stop_batch", [("sft", "adamw8bit", 3), ("opd_grpo", "adamw", 2)])
def test_resume_is_exact(kind, optim, stop_batch, tiny_models, synth_data, tmp_path):
    mu = 2 if kind == "opd_grpo" else 1
    n = 4 * mu  # 4 batches: epochs of 3 batches, so the straight run crosses into epoch 1
    a, wa, _, _ = fit(kind, tiny_models, synth_data, tmp_path / "straight", n, optim=optim)
    b1, _, t1, m1 = fit(kind, tiny_models, synth_data, tmp_path / "halves", n, stop_at=stop_batch * mu, optim=optim)
    assert t1.global_step == stop_batch * mu and m1._preempted, "the signal did not stop the first half"
    assert (tmp_path / "halves" / "checkpoints" / "last.ckpt").is_file()
    saved = torch.load(tmp_path / "halves" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b2, wb, t2, _ = fit(kind, tiny_models, synth_data, tmp_path / "halves", n, ckpt="last", optim=optim)
    assert t2.global_step == n
    assert len(a) == 4 and len(b1) == stop_batch and len(b2) == 4 - stop_batch
    if kind == "opd_grpo":
        assert all(len(r["texts"]) == 4 for r in a), "each batch samples B x G = 4 completions"
        assert len({r["reward"] for r in a}) > 1
    assert_same_run(a, b1 + b2, wa, wb)
    # Against values computed without the trainer (a formula bug would be the same in both runs above):
    if kind == "sft":
        # the first resumed step's loss is the completion NLL of its batch under the checkpoint's weights
        nll = _hand_nll(tiny_models, saved["state_dict"], _records(synth_data, b2[0]["ids"]))
        assert b2[0]["loss"] == pytest.approx(nll, rel=1e-5)
    else:
        # every step's reward is the mean over its B x G completions of accuracy + 0.1 format + the hash reward
        for r in a:
            assert r["reward"] == pytest.approx(_hand_reward(r["texts"], _records(synth_data, r["ids"])), abs=1e-6)
    # the weights did move: the comparison above is not between two untouched models
    init = build(kind, tiny_models, synth_data)[0]
    init.configure_model()
    assert any(not torch.equal(wa[k], v) for k, v in init.model.state_dict().items())


def test_resume_is_exact_with_dynamic_sampling(tiny_models, synth_data, tmp_path):
    """Steps that read one to three data batches: the resumed run reads the batches the straight run read after the
    checkpoint, samples what it sampled and ends on the same weights."""
    n = 3 * 2  # 3 rollout steps of μ = 2 optimizer steps
    a, wa, _, _ = fit("opd_grpo_dynamic", tiny_models, synth_data, tmp_path / "straight", n)
    assert len(a) > 3, "no step read a second batch: the case tests nothing dynamic sampling does"
    b1, _, t1, m1 = fit("opd_grpo_dynamic", tiny_models, synth_data, tmp_path / "halves", n, stop_at=2)
    assert t1.global_step == 2 and m1._preempted
    b2, wb, t2, _ = fit("opd_grpo_dynamic", tiny_models, synth_data, tmp_path / "halves", n, ckpt="last")
    assert t2.global_step == n
    assert_same_run(a, b1 + b2, wa, wb)


# ------------------------------------------------------------------------------------------- SIGTERM, subprocess

def _cli_config(tmp_path: Path, models: dict, data: dict, max_steps: int) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
                    "default_root_dir": str(tmp_path / "run"),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "logs"), "name": "sft",
                                             "flush_logs_every_n_steps": 1}}},
        "model": {"class_path": "vold_pl.modules.sft.SFTModule",
                  "init_args": {"model": {"name_or_path": str(models["student"])}, "optim": {"lr": 1e-3}}},
        "data": {"train": [{"path": str(data["train"])}], "batch_size": 2},
    }
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return cfg


def _train_steps(metrics_csv: Path) -> list[int]:
    import csv

    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]


def test_sigterm_checkpoints_exits_cleanly_and_resumes(tiny_models, synth_data, tmp_path):
    cfg = _cli_config(tmp_path, tiny_models, synth_data, max_steps=10_000)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "fit.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vold_pl.cli", "fit", "--config", str(cfg)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    metrics = tmp_path / "logs" / "sft" / "version_0" / "metrics.csv"
    deadline = time.time() + 180
    while len(_train_steps(metrics)) < 2:
        assert proc.poll() is None, (tmp_path / "fit.log").read_text()[-3000:]
        assert time.time() < deadline, "the fit never got going"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    out = (tmp_path / "fit.log").read_text()
    assert rc == 0, out[-3000:]
    assert "preempted (SIGTERM)" in out and "Traceback" not in out, out[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # the safe loader reads our checkpoints
    k = state["global_step"]
    assert 2 <= k < 10_000 and "vold_pl" in state
    assert not (tmp_path / "logs" / "sft" / "version_0" / "export").exists(), "a preempted run must not export"

    from vold_pl.cli import main

    main(["fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", str(k + 2)])
    resumed = _train_steps(tmp_path / "logs" / "sft" / "version_1" / "metrics.csv")
    assert resumed == [k, k + 1], resumed  # CSV 'step' is the step before the update: k, k+1 -> global k+2
    assert (tmp_path / "logs" / "sft" / "version_1" / "export" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- DDP (gloo), 2 processes

DDP_SCRIPT = r'''
import json, os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import lightning as L, torch
from tests.test_resume import HASH_REWARD, _hash_reward, fit
from vold_pl.rewards.functions import register_reward
register_reward(HASH_REWARD, overwrite=True)(_hash_reward)
torch.set_num_threads(1)

models = {{"student": Path({student!r}), "teacher": Path({teacher!r})}}
data = {{k: Path(v) for k, v in json.loads({data!r}).items()}}
out, kind = Path({out!r}), {kind!r}
rank = int(os.environ["LOCAL_RANK"])
kw = dict(strategy="ddp_find_unused_parameters_true", devices=2, num_nodes=1)
n = 4 if kind == "sft" else 8
a, wa, _, _ = fit(kind, models, data, out / "straight", n, **kw)
b1, _, _, _ = fit(kind, models, data, out / "halves", n, stop_at=n // 2, **kw)
b2, wb, _, _ = fit(kind, models, data, out / "halves", n, ckpt="last", **kw)
(out / f"rank{{rank}}.json").write_text(json.dumps({{"straight": a, "halves": b1 + b2}}))
torch.save({{"straight": wa, "halves": wb}}, out / f"rank{{rank}}.pt")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["opd_grpo"])
def test_ddp_gloo_resume_is_exact(kind, tiny_models, synth_data, tmp_path):
    script = tmp_path / "ddp_resume.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), student=str(tiny_models["student"]),
                                        teacher=str(tiny_models["teacher"]), out=str(tmp_path), kind=kind,
                                        data=json.dumps({k: str(v) for k, v in synth_data.items()})))
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
            "NODE_RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs, logs = [], []
    for rank in range(2):
        logs.append((tmp_path / f"rank{rank}.log").open("w"))
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, env={**base, "LOCAL_RANK": str(rank)}))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = "\n".join((tmp_path / f"rank{r}.log").read_text()[-2500:] for r in range(2))
    assert codes == [0, 0], text
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        w = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert len(res["straight"]) == 4
        assert_same_run(res["straight"], res["halves"], w["straight"], w["halves"])
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert [r["ids"] for r in r0["straight"]] != [r["ids"] for r in r1["straight"]], "ranks must see different data"


# ------------------------------------------------------------------------------------------- file:// paths are local

def test_file_url_checkpoints_are_local_and_atomic(tmp_path, monkeypatch):
    """``file://`` paths (as fsspec and Lightning accept them) take the local, atomic write and the local error
    messages; a remote URL goes to Lightning's fsspec writer."""
    from vold_pl import checkpointing
    from vold_pl.checkpointing import AtomicCheckpointIO

    calls = []
    real = checkpointing.atomic_torch_save
    monkeypatch.setattr(checkpointing, "atomic_torch_save", lambda obj, p: calls.append(str(p)) or real(obj, p))
    io = AtomicCheckpointIO()
    state = {"w": torch.arange(6.0).reshape(2, 3), "global_step": 7}
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint(state, f"file://{target}")
    assert calls == [str(target)], "a file:// checkpoint must be written by the atomic local writer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind
    back = io.load_checkpoint(f"file://{target}")
    assert torch.equal(back["w"], state["w"]) and back["global_step"] == 7

    with pytest.raises(FileNotFoundError, match="Pass an existing file to --ckpt_path"):
        io.load_checkpoint(f"file://{tmp_path / 'missing.ckpt'}")

    io.save_checkpoint(state, "memory://vold-pl-test/last.ckpt")  # remote: fsspec's writer, not ours
    assert calls == [str(target)]
    assert io.load_checkpoint("memory://vold-pl-test/last.ckpt")["global_step"] == 7
