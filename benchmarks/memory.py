"""Peak memory of one OPD-GRPO step under vold-pl's memory levers.

Levers compared, one fresh process per configuration (peak memory is per process):

- the frozen teacher in fp32, 8-bit (LLM.int8) or 4-bit NF4 (bitsandbytes, ``teacher.quantization``);
- log-probs computed in slabs of ``logprob_chunk_size`` positions ("chunked", 64) or in one slab over all
  ``B*G*L`` positions ("whole": the ``[B*G, L, V]`` logits materialised at once), and chunked with each slab
  recomputed in backward (``checkpoint_chunks``, set by this script on the module's log-prob call);
- micro-batches (``grpo.micro_batch_size``): the step's rows scored and backpropagated a few at a time, with
  the gradients accumulated (``micro-4`` / ``micro-2`` / ``micro-1`` against ``baseline``, the whole batch);
- the student on 1 or 2 FSDP2 ranks (``FSDP2Strategy``, gloo on CPU / NCCL on GPU): per-rank parameter and
  optimizer-state bytes, with AdamW and with the sharded bitsandbytes AdamW8bit.

What is measured: on CPU, the resident set size (RSS, ``/proc/self/status``) right before the training step,
and its peak during the step (``VmHWM``, reset before the step through ``/proc/self/clear_refs``), with glibc
told to mmap every block >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS; on GPU,
``torch.cuda.memory_allocated`` before and ``max_memory_allocated`` during the step. "step +" is the peak minus
the memory before the step: what the step itself needs on top of the loaded models. Parameter and optimizer
bytes are exact tensor accounting (this rank's shards).

The models are random "bench" models built offline (``vold_pl.toy.tiny``): a Qwen2.5-VL student and a
Qwen3 teacher, with the vocabulary padded to ``--vocab`` so that the logits dominate as they do at full size.
The rollout is replaced by fixed-length random completions (``--length`` tokens of the tokenizer's ordinary
ids, no EOS), so every configuration scores exactly the same shapes; ``generate``'s own memory (KV cache) is
not part of these numbers. The second Lightning step of the real ``OPDGRPOModule`` is measured (the first
creates the optimizer states): rewards, teacher scoring, student log-probs with grad, OPD + GRPO loss,
backward, optimizer step.

    python benchmarks/memory.py                        # CPU; table + benchmarks/results/memory.json
    python benchmarks/memory.py --device cuda --dtype bfloat16
    python benchmarks/memory.py --only teacher-4bit,whole
    python benchmarks/memory.py --estimators      # k1 vs full at V = 151936, two lengths, extrapolated to real size

``--estimators``: the step's peak for ``opd.estimator: k1`` and ``full`` (teacher scored per micro-batch, KL in
slabs: ``vold_pl.rl.full_kl``) with the bench models padded to the real vocabulary (151936), measured at two
completion lengths (``--lengths``); the per-position growth of each is fitted from the two and extrapolated to
the real per-GPU shape (``--real-rows`` x ``--real-length``), where the ratio full / k1 is reported beside the
size the whole-batch ``[N, L, V]`` float32 teacher logits alone would take. Written to
``benchmarks/results/memory_estimators.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# name, teacher quantization, logprob chunk (0 = whole), recompute slabs, ranks, optimizer, micro-batch rows
CONFIGS = [
    ("baseline", "none", 64, False, 1, "adamw", 0),
    ("teacher-8bit", "8bit", 64, False, 1, "adamw", 0),
    ("teacher-4bit", "4bit", 64, False, 1, "adamw", 0),
    ("whole", "none", 0, False, 1, "adamw", 0),
    ("chunked+recompute", "none", 64, True, 1, "adamw", 0),
    ("fsdp2-1rank", "none", 64, False, -1, "adamw", 0),
    ("fsdp2-2ranks", "none", 64, False, -2, "adamw", 0),
    ("fsdp2-1rank-adamw8bit", "none", 64, False, -1, "adamw8bit", 0),
    ("fsdp2-2ranks-adamw8bit", "none", 64, False, -2, "adamw8bit", 0),
    # grpo.micro_batch_size: the B*G rows (8 by default) scored and backpropagated 4, 2 or 1 at a time
    ("micro-4", "none", 64, False, 1, "adamw", 4),
    ("micro-2", "none", 64, False, 1, "adamw", 2),
    ("micro-1", "none", 64, False, 1, "adamw", 1),
]
# ranks > 0: plain single process; ranks < 0: FSDP2Strategy with |ranks| processes.
PHASES = ("teacher", "student log-probs", "backward + optimizer")


# ---------------------------------------------------------------------------------------------------- models

def build_models(out: Path, vocab: int, seed: int = 0) -> dict[str, Path]:
    """Bench student (Qwen2.5-VL) and teacher (Qwen3) with a shared tokenizer, vocabulary padded to ``vocab``."""
    from vold_pl.data.synthetic import corpus_texts, generate_dataset
    from vold_pl.toy.tiny import TinySizes, build_tiny_models

    paths = {"student": out / "student", "teacher": out / "teacher", "data": out / "data"}
    if (paths["teacher"] / "config.json").is_file() and (paths["data"] / "train.jsonl").is_file():
        return paths
    sizes = TinySizes(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                      num_kv_heads=2, vision_hidden_size=64, vision_depth=2, vision_heads=4,
                      teacher_hidden_size=512, teacher_layers=8)
    processor, student, tok, teacher = build_tiny_models(corpus_texts(seed=seed, n=500), sizes, seed=seed)
    for m in (student, teacher):
        m.resize_token_embeddings(vocab, mean_resizing=False)
    student.save_pretrained(paths["student"], safe_serialization=True)
    processor.save_pretrained(paths["student"])
    teacher.save_pretrained(paths["teacher"], safe_serialization=True)
    tok.save_pretrained(paths["teacher"])
    generate_dataset(paths["data"], seed=seed, n_train=16, n_val=4, n_test=4)
    return paths


class RandomEngine:
    """Fixed-length random completions (no EOS) over the tokenizer's ordinary ids: the same shapes every run."""

    keeps_ranks_in_step = True  # never calls the model: safe on sharded models

    def __init__(self, tokenizer, length: int, seed: int = 0):
        self.tokenizer, self.length, self.seed = tokenizer, length, seed
        special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(
            ["<think>", "</think>", "<answer>", "</answer>"]))
        self.allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def generate(self, model, batch: dict, num_samples: int, sampling):
        from vold_pl.rl.rollout_types import Rollout, repeat_images

        G = num_samples
        ids = batch["input_ids"].repeat_interleave(G, 0)
        mask = batch["attention_mask"].repeat_interleave(G, 0)
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randint(0, len(self.allowed), (ids.size(0), self.length), generator=g)
        comp = self.allowed[pick].to(ids.device)
        extra = {}
        if "mm_token_type_ids" in batch:
            extra["mm_token_type_ids"] = batch["mm_token_type_ids"].repeat_interleave(G, 0)
        extra.update(repeat_images(batch, G))
        texts = self.tokenizer.batch_decode(comp, skip_special_tokens=True)
        return Rollout(ids, mask, comp, torch.ones_like(comp), texts, G,
                       torch.ones(comp.size(0), dtype=torch.bool, device=ids.device), extra)


# ---------------------------------------------------------------------------------------------------- memory

def _status_kb(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(cfg: dict) -> None:
    """One configuration, one Lightning step; each rank writes ``<out>.rank<r>.json``."""
    import gc
    import logging
    import warnings

    import lightning as L

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource
    from vold_pl.sharding import FSDP2Strategy
    from vold_pl.memory import local_param_bytes, optimizer_state_bytes
    from vold_pl.optimizers import make_adamw8bit
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.base import OptimConfig, build_optimizer
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.rollout_types import SamplingConfig

    torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"] == "cuda"
    models = {k: Path(v) for k, v in cfg["models"].items()}

    import vold_pl.modules.base as base_module

    def build(params, c):  # the sharded AdamW8bit also steps DTensor parameters (plain bnb cannot)
        if c.name == "adamw8bit":
            return make_adamw8bit([p for p in params if p.requires_grad], lr=c.lr, betas=c.betas,
                                  weight_decay=c.weight_decay)
        return build_optimizer(params, c)

    base_module.build_optimizer = build

    chunk = cfg["chunk"] or 1 << 30
    module = OPDGRPOModule(
        ModelSpec(str(models["student"]), dtype=cfg["dtype"]),
        teacher=ModelSpec(str(models["teacher"]), dtype=cfg["dtype"], quantization=cfg["teacher"]),
        optim=OptimConfig(name=cfg["optim"], lr=1e-5, schedule="constant"),
        grpo=GRPOConfig(num_generations=cfg["G"], loss_aggregation="token", micro_batch_size=cfg["micro"]),
        opd=OPDConfig(lam=1.0, gate="all", estimator=cfg.get("estimator", "k1")),
        sampling=SamplingConfig(max_new_tokens=cfg["length"]),
        logprob_chunk_size=chunk, export=False, log_completions_every_n_steps=0)
    module.rollout_engine = RandomEngine(module.tokenizer, cfg["length"])
    from vold_pl.rl.logprobs import rollout_token_logprobs

    def _logprobs(rollout):  # recompute each slab in backward, or keep every slab's logits for backward
        return rollout_token_logprobs(module.model, rollout, temperature=module.sampling.temperature,
                                      chunk_size=module.chunk, return_entropy=True,
                                      checkpoint_chunks=cfg["recompute"])
    module._logprobs = _logprobs

    # Peak memory of each phase of the step, above the memory at the start of the step.
    phases: dict[str, int] = {}
    measuring = {"on": False, "base": 0}

    def _now() -> int:
        return torch.cuda.memory_allocated() if cuda else _status_kb("VmRSS") * 1024

    def _peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024

    def _reset() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()

    def _wrap(name: str, fn):
        def run(*a, **k):
            if not measuring["on"]:
                return fn(*a, **k)
            _reset()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = max(phases.get(name, 0), _peak() - measuring["base"])
                _reset()
        return run

    for name, attr in (("teacher", "_teacher_scores"), ("student log-probs", "_logprobs"),
                       ("student log-probs", "_logprobs_and_full_kl"),  # full: teacher + student + KL per micro-batch
                       ("backward + optimizer", "manual_backward"),
                       ("backward + optimizer", "_clip_step_and_schedule")):
        setattr(module, attr, _wrap(name, getattr(module, attr)))

    class Probe(L.Callback):
        def __init__(self):
            self.r: dict = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx != 1:  # measure the second step: optimizer states and gradients already exist
                return
            gc.collect()
            _malloc_trim()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.r["before"] = torch.cuda.memory_allocated()
            else:
                self.r["rss_reset"] = _reset_peak_rss()
                self.r["before"] = _status_kb("VmRSS") * 1024
            measuring.update(on=True, base=self.r["before"])
            self.r["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx != 1:
                return
            if cuda:
                torch.cuda.synchronize()
            measuring["on"] = False
            self.r["phases"] = dict(phases)
            self.r["peak"] = max([_peak()] + [self.r["before"] + v for v in phases.values()])
            self.r["step_s"] = time.perf_counter() - self.r.pop("t0")
            m = pl_module
            teacher = m._frozen["teacher"]
            self.r.update(
                student_param_bytes=local_param_bytes(m.model),
                optimizer_bytes=optimizer_state_bytes(m.optimizers().optimizer),
                teacher_param_bytes=local_param_bytes(teacher) + sum(
                    b.numel() * b.element_size() for b in teacher.buffers()),
                loss=float(trainer.callback_metrics.get("train/loss", float("nan"))),
                rank=trainer.global_rank, world=trainer.world_size)

    ranks = cfg["ranks"]
    kwargs = dict(accelerator="gpu" if cuda else "cpu", devices=abs(ranks))
    if ranks < 0:
        kwargs["strategy"] = FSDP2Strategy(frozen="replicate")
    data = models["data"]
    dm = ReasoningDataModule(train=[DataSource(str(data / "train.jsonl"))], batch_size=cfg["B"])
    probe = Probe()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[probe], default_root_dir=cfg["out"] + ".root", **kwargs)
    trainer.fit(module, datamodule=dm)
    Path(f"{cfg['out']}.rank{trainer.global_rank}.json").write_text(json.dumps(probe.r))


# ---------------------------------------------------------------------------------------------------- driver

def run_config(name: str, teacher: str, chunk: int, recompute: bool, ranks: int, optim: str, micro: int, args,
               paths: dict[str, Path], tmp: Path, estimator: str = "k1", length: int | None = None) -> list[dict]:
    cfg = dict(name=name, teacher=teacher, chunk=chunk, recompute=recompute, ranks=ranks, optim=optim, micro=micro,
               device=args.device, dtype=args.dtype, G=args.G, B=args.B, length=length or args.length,
               threads=args.threads, models={k: str(v) for k, v in paths.items()}, out=str(tmp / name),
               estimator=estimator)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    # glibc: serve every allocation >= 64 KiB with its own mmap, returned to the OS when freed, so RSS follows
    # the live tensors instead of what the allocator keeps cached from the previous step.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise RuntimeError(f"{name}: timed out after {args.timeout}s\n{out[-3000:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{out[-5000:]}")
    rows = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"{name}.rank*.json"))]
    print(f"  {name}: {time.time() - t0:.0f}s", flush=True)
    return [{**cfg, **r} for r in rows]


def _mb(b: float) -> str:
    return f"{b / 2**20:.1f}"


def table(results: dict[str, list[dict]], device: str) -> str:
    mem = "RSS" if device == "cpu" else "allocated"
    head = ["config", "teacher", "log-probs", "ranks", "optimizer", "student params/rank MB", "optim state/rank MB",
            "teacher MB", f"{mem} before step MB", f"peak {mem} MB", "step + MB", "teacher +", "student fwd +",
            "bwd+optim +", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def rank0(name):
        return results[name][0] if name in results else None

    base = rank0("baseline")
    fs1 = rank0("fsdp2-1rank")
    for name, rows in results.items():
        r = rows[0]
        step = r["peak"] - r["before"]
        if name.startswith("teacher-") and base:
            ratio = (f"teacher {r['teacher_param_bytes'] / base['teacher_param_bytes']:.2f}x, "
                     f"peak {r['peak'] / base['peak']:.2f}x of fp32")
        elif name in ("whole", "chunked+recompute") and base:
            ph, bph = r.get("phases", {}), base.get("phases", {})
            parts = [f"step+ {step / max(1, base['peak'] - base['before']):.2f}x"]
            for k, label in (("teacher", "teacher+"), ("student log-probs", "student fwd+")):
                if ph.get(k) and bph.get(k):
                    parts.append(f"{label} {ph[k] / bph[k]:.2f}x")
            ratio = ", ".join(parts) + " of chunked"
        elif r.get("micro") and base:
            ph, bph = r.get("phases", {}), base.get("phases", {})
            parts = [f"step+ {step / max(1, base['peak'] - base['before']):.2f}x"]
            if ph.get("teacher") and bph.get("teacher"):
                parts.append(f"teacher+ {ph['teacher'] / bph['teacher']:.2f}x")
            ratio = ", ".join(parts) + f" of the whole batch ({r['micro']} rows per micro-batch)"
        elif name == "fsdp2-2ranks" and fs1:
            ratio = (f"params {r['student_param_bytes'] / fs1['student_param_bytes']:.2f}x, "
                     f"optim {r['optimizer_bytes'] / fs1['optimizer_bytes']:.2f}x of 1 rank")
        elif name == "fsdp2-2ranks-adamw8bit" and fs1:
            ratio = f"optim {r['optimizer_bytes'] / fs1['optimizer_bytes']:.2f}x of 1 rank AdamW"
        elif name == "fsdp2-1rank-adamw8bit" and fs1:
            ratio = f"optim {r['optimizer_bytes'] / fs1['optimizer_bytes']:.2f}x of AdamW"
        else:
            ratio = "1.00x" if name in ("baseline", "fsdp2-1rank") else ""
        lp = "whole" if not r["chunk"] else f"chunks of {r['chunk']}" + (" + recompute" if r["recompute"] else "")
        ranks = f"{abs(r['ranks'])} (FSDP2)" if r["ranks"] < 0 else "1"
        peak_ranks = ", ".join(_mb(x["peak"]) for x in rows)
        lines.append("| " + " | ".join([
            name, r["teacher"] if r["teacher"] != "none" else r["dtype"], lp, ranks, r["optim"],
            _mb(r["student_param_bytes"]), _mb(r["optimizer_bytes"]), _mb(r["teacher_param_bytes"]),
            _mb(r["before"]), peak_ranks, _mb(step)] + [_mb(r.get("phases", {}).get(k, 0)) for k in PHASES]
            + [ratio]) + " |")
    return "\n".join(lines)


REAL_VOCAB = 151936  # Qwen2.5-VL-3B / Qwen3-8B embedding rows


def estimator_sweep(args, argv) -> None:
    """k1 vs full at the real vocabulary, two lengths, a linear fit per estimator, extrapolated to real size."""
    import tempfile

    paths = build_models(Path(args.models + f"_v{REAL_VOCAB}"), REAL_VOCAB)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for est in ("k1", "full"):
            for length in args.lengths:
                name = f"{est}-L{length}"
                results[name] = run_config(name, "none", 64, True, 1, "adamw", 0, args, paths, Path(tmp),
                                           estimator=est, length=length)
    rows_per_step = args.B * args.G
    fit, lines = {}, []
    for est in ("k1", "full"):
        (l0, l1) = args.lengths[:2]
        s0 = results[f"{est}-L{l0}"][0]
        s1 = results[f"{est}-L{l1}"][0]
        step0, step1 = s0["peak"] - s0["before"], s1["peak"] - s1["before"]
        per_pos = (step1 - step0) / (rows_per_step * (l1 - l0))  # bytes per completion position
        fixed = step0 - per_pos * rows_per_step * l0
        real = fixed + per_pos * args.real_rows * args.real_length
        fit[est] = {"step_plus_bytes": {l0: step0, l1: step1}, "bytes_per_position": per_pos, "fixed_bytes": fixed,
                    "real_step_plus_bytes": real}
        lines.append(f"| {est} | {_mb(step0)} | {_mb(step1)} | {per_pos / 1024:.1f} | {_mb(real)} |")
    ratio = fit["full"]["real_step_plus_bytes"] / fit["k1"]["real_step_plus_bytes"]
    whole_teacher = args.real_rows * args.real_length * REAL_VOCAB * 4
    l0, l1 = args.lengths[:2]
    tab = "\n".join([f"| estimator | step + MB (L={l0}) | step + MB (L={l1}) | KiB / position | extrapolated step + "
                     f"MB ({args.real_rows} rows x {args.real_length}) |", "|---|---|---|---|---|"] + lines)
    tab += (f"\n\nfull / k1 at {args.real_rows} x {args.real_length} x V={REAL_VOCAB} (bench hidden sizes): "
            f"{ratio:.2f}x; the whole-batch float32 teacher logits alone would be {whole_teacher / 2**30:.1f} GiB.")
    cmd = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print("\n" + cmd.strip() + f"\nB={args.B} G={args.G} V={REAL_VOCAB} device={args.device}\n\n" + tab)
    out = Path(args.out).with_name("memory_estimators.json")
    out.write_text(json.dumps({"command": cmd.strip(), "args": {k: v for k, v in vars(args).items() if k != "worker"},
                               "torch": torch.__version__, "results": results, "fit": fit, "ratio_full_k1": ratio,
                               "whole_batch_teacher_logits_bytes": whole_teacher, "table": tab}, indent=1))
    print(f"\nwrote {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="float32", help="model dtype (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--models", default=str(REPO / "artifacts" / "bench_memory"), help="bench models (built once)")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary the bench models are padded to")
    p.add_argument("--B", type=int, default=2, help="prompts per step (per rank)")
    p.add_argument("--G", type=int, default=4, help="completions per prompt")
    p.add_argument("--length", type=int, default=128, help="completion tokens (fixed)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--out", default=str(RESULTS / "memory.json"))
    p.add_argument("--estimators", action="store_true", help="k1 vs full at V=151936 (module docstring)")
    p.add_argument("--lengths", type=int, nargs=2, default=[32, 96], help="--estimators: the two measured lengths")
    p.add_argument("--real-rows", type=int, default=16, help="--estimators: rows per GPU per step at real size")
    p.add_argument("--real-length", type=int, default=1024, help="--estimators: completion length at real size")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.estimators:
        estimator_sweep(args, argv)
        return

    import tempfile

    paths = build_models(Path(args.models), args.vocab)
    wanted = set(filter(None, args.only.split(",")))
    configs = [c for c in CONFIGS if not wanted or c[0] in wanted]
    if args.device == "cuda":
        n_gpu = torch.cuda.device_count()
        configs = [c for c in configs if abs(c[4]) <= n_gpu]
    print(f"OPD-GRPO step memory: B={args.B} G={args.G} L={args.length} V={args.vocab} device={args.device}",
          flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in configs:
            results[c[0]] = run_config(*c, args, paths, Path(tmp))
    tab = table(results, args.device)
    cmd = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print("\n" + cmd.strip() + "\n\n" + tab)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": cmd.strip(), "args": {k: v for k, v in vars(args).items() if k != "worker"},
                               "torch": torch.__version__, "results": results, "table": tab}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
