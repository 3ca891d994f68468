"""One-GPU smoke run at real shapes: decode tokens/s (eager vs static/compiled), OPD-GRPO step time, peak memory.

    python benchmarks/gpu_smoke.py                        # one CUDA GPU; JSON in benchmarks/results/gpu_smoke.json
    python benchmarks/gpu_smoke.py --scale real           # the real Qwen2.5-VL-3B / Qwen3-8B dimensions, random init
    python benchmarks/gpu_smoke.py --device cpu --tiny --compile none   # CPU smoke of the code path (a test runs it)

Models: the real-architecture rehearsal pair of ``vold_pl.toy.qwen_shapes`` (the real tokenizers, 151936-row
vocabulary, Qwen2.5-VL's windowed vision tower and mrope, Qwen3's q/k norms), built offline with random weights:
``--scale rehearsal`` (default: the scaled-down sizes the tests use, seconds to build) or ``--scale real`` (the
published dimensions: student hidden 2048 x 36 layers, vision 1280 x 32, teacher 4096 x 36; ~3.8 B + 8 B
parameters, fits one 80 GB GPU with a bf16 teacher). Lengths are the real config's (``--max-new-tokens 1024``,
``--prompts 2`` x ``--G 8`` per GPU) unless ``--tiny``.

Measured, on the device given:

1. decode: completion tokens/s of the eager engine (``CachedSamplingEngine``) and of ``StaticDecodeEngine`` (static
   KV cache, ``--compile``: ``reduce-overhead`` = ``torch.compile`` with CUDA graphs by default on CUDA), greedy with
   EOS suppressed (every row decodes ``--max-new-tokens``), outputs checked token for token equal; the compilation
   is paid in a warm-up and reported apart;
2. OPD-GRPO steps (``--steps``, the first one excluded from the median): step time and the process's peak memory
   (``torch.cuda.max_memory_allocated``; on CPU the peak RSS), with ``decode.engine: static``, gradient
   checkpointing and the k1 estimator as in ``configs/real/opd_grpo_qwen2_5_vl_3b.yaml``.

Without CUDA and without ``--device cpu`` it prints one line saying it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, median, quiet, write_json

import torch  # noqa: E402

REAL = dict(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
            vision_hidden_size=1280, vision_depth=32, vision_heads=16, teacher_hidden_size=4096, teacher_layers=36,
            teacher_heads=32, teacher_kv_heads=8)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    m = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def build(out: Path, args) -> dict[str, Path]:
    from vold_pl.data.synthetic import generate_dataset
    from vold_pl.toy.qwen_shapes import RealShapeSizes, save_real_shape_models

    sizes = RealShapeSizes(**REAL) if args.scale == "real" else RealShapeSizes()
    paths = save_real_shape_models(out / "models", sizes, seed=args.seed)
    generate_dataset(out / "data", seed=args.seed, n_train=max(8, args.prompts * (args.steps + 1)), n_val=2, n_test=2)
    return {**paths, "data": out / "data"}


def decode(paths, args) -> dict:
    from vold_pl.data.collate import PromptCollator
    from vold_pl.data.sources import read_records, to_dataset
    from vold_pl.models.factory import ModelSpec, load_model
    from vold_pl.rl.cached_sampler import CachedSamplingEngine
    from vold_pl.rl.rollout_types import SamplingConfig
    from vold_pl.rl.static_decode import StaticDecodeEngine

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model, proc = load_model(ModelSpec(str(paths["student"]), dtype=dtype, attn_implementation="sdpa"))
    model.to(args.device).eval()
    tok = proc.tokenizer
    with torch.no_grad():  # EOS never wins: every row decodes the whole budget (equal, known token counts)
        for e in ([tok.eos_token_id] + list(model.generation_config.eos_token_id or [])):
            model.lm_head.weight[e].zero_()
    recs, _ = read_records(paths["data"] / "train.jsonl")
    ds = to_dataset(recs[: args.prompts])
    batch = PromptCollator(proc)([ds[i] for i in range(len(ds))])
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=False)
    engines = {"eager": CachedSamplingEngine(tok),
               "static": StaticDecodeEngine(tok, compile=args.compile, eos_check_every=args.eos_check_every)}
    res: dict = {"prompt_tokens": int(batch["input_ids"].shape[1]), "rows": args.prompts * args.G,
                 "compile": args.compile, "dtype": dtype}
    outs = {}
    for name, e in engines.items():
        _sync(args.device)
        t0 = time.perf_counter()
        e.generate(model, batch, args.G, sampling)  # warm-up: self-check, compilation, graph capture
        _sync(args.device)
        res[f"{name}_warmup_s"] = time.perf_counter() - t0
    for name, e in engines.items():
        times = []
        for _ in range(args.reps):
            _sync(args.device)
            t0 = time.perf_counter()
            outs[name] = e.generate(model, batch, args.G, sampling)
            _sync(args.device)
            times.append(time.perf_counter() - t0)
        tokens = int(outs[name].completion_mask.sum())
        res[name] = {"median_s": median(times), "tokens": tokens, "tokens_per_s": tokens / median(times),
                     "raw_s": times}
    res["static_decode_path"] = engines["static"].last_decode_path
    res["outputs_equal"] = bool(torch.equal(outs["eager"].completion_ids, outs["static"].completion_ids))
    res["speedup"] = res["static"]["tokens_per_s"] / res["eager"]["tokens_per_s"]
    del model
    return res


def steps(paths, args) -> dict:
    import lightning as L

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.base import OptimConfig
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.rollout_types import SamplingConfig
    from vold_pl.rl.static_decode import DecodeConfig

    cuda = args.device == "cuda"
    module = OPDGRPOModule(
        ModelSpec(str(paths["student"]), dtype="float32", attn_implementation="sdpa", align_tokens_with="teacher"),
        teacher=ModelSpec(str(paths["teacher"]), dtype="bfloat16" if cuda else "float32", attn_implementation="sdpa"),
        optim=OptimConfig(lr=1e-6, schedule="constant"),
        grpo=GRPOConfig(num_generations=args.G, loss_aggregation="token"),
        opd=OPDConfig(lam=1.0, gate="failed", estimator="k1"),
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens), gradient_checkpointing=True,
        export=False, log_completions_every_n_steps=0,
        decode=DecodeConfig(engine="static", compile=args.compile, eos_check_every=args.eos_check_every))
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(args.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(args.device)
            times.append(time.perf_counter() - self.t0)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dm = ReasoningDataModule(train=[DataSource(str(paths["data"] / "train.jsonl"))], batch_size=args.prompts)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps,
                        precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Timer()], default_root_dir=str(args.workdir / "lightning"))
    trainer.fit(module, datamodule=dm)
    measured = times[1:] or times
    return {"step_s": times, "median_step_s": median(measured), "peak_memory_bytes": _peak_bytes(args.device),
            "rollouts_per_step": args.prompts * args.G,
            "device_hours_per_100k_rollouts": median(measured) * 100_000 / (args.prompts * args.G) / 3600}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="short lengths and one prompt x G=2 (a quick code-path smoke)")
    p.add_argument("--scale", choices=["rehearsal", "real"], default="rehearsal",
                   help="model dimensions: the tests' scaled-down rehearsal pair, or the published ones")
    p.add_argument("--compile", choices=["none", "default", "reduce-overhead"], default=None,
                   help="static decode step (default: reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--eos-check-every", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (real config: data.batch_size 2)")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="OPD-GRPO steps (the first is excluded from the median)")
    p.add_argument("--reps", type=int, default=3, help="timed decode repetitions per engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[gpu_smoke] skipped: no CUDA device here (torch.cuda.is_available() is False). Run it on a machine "
              "with one GPU, or `--device cpu --tiny --compile none` for a CPU smoke of the code path.")
        return 0
    if args.tiny:
        args.prompts, args.G, args.max_new_tokens, args.steps, args.reps = 1, 2, 6, 2, 1
    args.compile = args.compile or ("reduce-overhead" if args.device == "cuda" else "default")
    quiet()
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vold_gpu_smoke_"))
    torch.manual_seed(args.seed)
    paths = build(args.workdir, args)
    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "scale": args.scale, "tiny": args.tiny, "args": {k: str(v) for k, v in vars(args).items()},
              "decode": decode(paths, args)}
    d = result["decode"]
    print(f"[gpu_smoke] decode: eager {d['eager']['tokens_per_s']:.0f} tok/s, static ({args.compile}) "
          f"{d['static']['tokens_per_s']:.0f} tok/s ({d['speedup']:.2f}x), outputs equal: {d['outputs_equal']}",
          flush=True)
    result["steps"] = steps(paths, args)
    s = result["steps"]
    print(f"[gpu_smoke] OPD-GRPO step: median {s['median_step_s']:.2f} s, peak memory "
          f"{s['peak_memory_bytes'] / 2**30:.2f} GiB, {s['device_hours_per_100k_rollouts']:.1f} device-hours / 100k "
          f"rollouts at this scale", flush=True)
    name = "gpu_smoke" if args.device == "cuda" and not args.tiny else f"gpu_smoke_{args.device}{'_tiny' * args.tiny}"
    write_json(name, result, args.out)
    return 0 if d["outputs_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
