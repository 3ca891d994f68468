"""Rollout throughput of a policy on 2 ranks: FSDP2 with the weights gathered once per rollout, vs DDP, vs
FSDP2 with HF ``generate(synced_gpus=True)`` (the path used before), in one run.

Three ways to generate on 2 ranks, each rank sampling its own prompts (G completions each):

- ``fsdp2-unshard``: the policy sharded with FSDP2 (``vold_pl.sharding.shard_model``), every unit gathered
  once per rollout and the cached sampler decoding on the full weights
  (:class:`vold_pl.rl.unsharded.UnshardedRollouts`, the trainer's default on FSDP2);
- ``ddp``: a full replica per rank and the cached sampler (what DDP training does);
- ``fsdp2-synced``: the sharded policy and HF ``generate`` with ``synced_gpus`` (one all-gather per layer per
  decoded token, every rank stepping until the longest row of any rank is done).

Completions have unequal lengths (a bias on the EOS logit makes them end after ~1/p(EOS) tokens), as in RL.
Throughput = completion tokens of both ranks / the slowest rank's rollout time (the step waits for it), the
median of ``--reps`` interleaved repetitions. CPU + gloo here; on GPUs pass ``--backend nccl``.

    python benchmarks/bench_fsdp_rollout.py            # table + benchmarks/results/bench_fsdp_rollout.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks._common then sets the offline environment, before transformers loads
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    build_data,
    build_text_policy,
    environment,
    eos_biased,
    median,
    quiet,
    read_rows,
    table,
    write_json,
)

MODES = ("fsdp2-unshard", "ddp", "fsdp2-synced")


def _rank(rank: int, args, paths: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vold_pl.data.collate import PromptCollator
    from vold_pl.sharding import shard_model
    from vold_pl.models.factory import ModelSpec, load_model
    from vold_pl.rl.cached_sampler import CachedSamplingEngine
    from vold_pl.rl.hf_engine import HFGenerateEngine
    from vold_pl.rl.rollout_types import SamplingConfig
    from vold_pl.rl.unsharded import UnshardedRollouts

    quiet()
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group(args.backend, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu" if args.backend == "gloo" else "cuda", (2,))
    rows = read_rows(Path(paths["data"]), 2 * args.prompts)[rank * args.prompts : (rank + 1) * args.prompts]
    models, engines = {}, {}
    for mode in MODES:
        model, proc = load_model(ModelSpec(paths["policy"]))
        tok = getattr(proc, "tokenizer", proc)
        eos_biased(model, tok.eos_token_id, args.eos_bias).eval()
        if mode.startswith("fsdp2"):
            shard_model(model, mesh)
        models[mode] = model
        engines[mode] = {"fsdp2-unshard": UnshardedRollouts(CachedSamplingEngine(tok)),
                         "ddp": CachedSamplingEngine(tok), "fsdp2-synced": HFGenerateEngine(tok)}[mode]
    batch = PromptCollator(proc)(rows)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    for mode in MODES:  # warm-up
        engines[mode].generate(models[mode], batch, args.G, SamplingConfig(max_new_tokens=4))
    res = {m: {"s": [], "tokens": []} for m in MODES}
    for r in range(args.reps):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            torch.manual_seed(args.seed + 1000 * r + rank)  # each rank its own samples
            dist.barrier()
            t0 = time.perf_counter()
            ro = engines[mode].generate(models[mode], batch, args.G, sampling)
            dt = torch.tensor([time.perf_counter() - t0])
            n = torch.tensor([float(ro.completion_mask.sum())])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
            dist.all_reduce(n)
            res[mode]["s"].append(float(dt))
            res[mode]["tokens"].append(float(n))
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--G", type=int, default=4, help="completions per prompt")
    p.add_argument("--prompts", type=int, default=2, help="prompts per rank")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eos-bias", type=float, default=3.0, help="EOS logit bias: unequal lengths")
    p.add_argument("--hidden", type=int, default=256, help="policy hidden size")
    p.add_argument("--layers", type=int, default=4, help="policy layers")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--backend", default="gloo")
    p.add_argument("--port", type=int, default=29611)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        paths = {"policy": str(build_text_policy(work / f"policy_{args.hidden}x{args.layers}", hidden=args.hidden,
                                                 layers=args.layers, seed=args.seed)),
                 "data": str(build_data(work / "data", n=16, seed=args.seed)["train_text"])}
        out = str(Path(tmp) / "res.json")
        mp.spawn(_rank, args=(args, paths, out), nprocs=2, join=True)
        res = json.loads(Path(out).read_text())
    summary = {}
    for mode, v in res.items():
        tps = [t / s for t, s in zip(v["tokens"], v["s"])]
        summary[mode] = {"median_tokens_per_s": median(tps), "median_s": median(v["s"]),
                         "median_tokens": median(v["tokens"]), "raw": v}
    base = summary["fsdp2-unshard"]["median_tokens_per_s"]
    ratios = {f"fsdp2-unshard / {m}": base / summary[m]["median_tokens_per_s"] for m in ("ddp", "fsdp2-synced")}
    print(f"\n2 ranks ({args.backend}), {args.prompts} prompts x G={args.G} per rank, max {args.max_new_tokens} new "
          f"tokens, Qwen2 policy hidden {args.hidden} x {args.layers} layers (completion tokens of both ranks / "
          f"slowest rank's time, median of {args.reps})\n")
    print(table(["mode", "tokens", "s", "tokens/s", "fsdp2-unshard is"],
                [[m, f"{summary[m]['median_tokens']:.0f}", f"{summary[m]['median_s']:.2f}",
                  f"{summary[m]['median_tokens_per_s']:.0f}",
                  "1.00x" if m == "fsdp2-unshard" else f"{ratios[f'fsdp2-unshard / {m}']:.2f}x"] for m in MODES]))
    cmd = "python benchmarks/bench_fsdp_rollout.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_json("bench_fsdp_rollout", {"command": cmd.strip(), "environment": environment(),
                                             "args": {k: str(v) for k, v in vars(args).items()},
                                             "results": summary, "ratios": ratios}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
