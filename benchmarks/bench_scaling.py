"""How an OPD-GRPO step (OPD off, the tiny text policy) scales with group size G and completion length.

For every G in ``--groups`` and completion length in ``--lengths`` it trains ``--warmup + --steps`` steps with
vold-pl (the same module and settings as ``bench_vs_trl.py``), and prints the median step time, the completion
tokens per step, the time per 1k completion tokens, and a least-squares line ``step_s = a + b * tokens`` over
all cells with its R² (near 1: the step grows linearly in tokens). Cells run in grid order; ``--rounds`` > 1
repeats the whole grid so machine drift spreads over all cells.

    python benchmarks/bench_scaling.py                              # G x L grid, table + results JSON
    python benchmarks/bench_scaling.py --groups 4 8 --lengths 32 64 --steps 2
    python benchmarks/bench_scaling.py --profile                    # PyTorch profiler trace of the first cell
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import RESULTS, build_data, build_text_policy, median, quiet, read_rows, table, write_json

import torch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16], help="group sizes G")
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128], help="max completion lengths")
    p.add_argument("--batch", type=int, default=2, help="prompts per step")
    p.add_argument("--steps", type=int, default=3, help="measured steps per cell")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped per cell")
    p.add_argument("--rounds", type=int, default=1, help="passes over the grid (medians pool the rounds)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--engine", choices=["cached", "hf"], default="cached", help="vold-pl rollout engine")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: the cores this process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="models/data folder (default: a temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for bench_scaling.json")
    p.add_argument("--profile", action="store_true",
                   help="PyTorch profiler (Lightning PyTorchProfiler) on the first cell; table + chrome trace in "
                        "<workdir>/profile")
    args = p.parse_args(argv)
    quiet()
    from bench_vs_trl import run_voldpl

    from vold_pl.startup import set_cpu_threads

    threads = set_cpu_threads(args.threads or None)
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vold_bench_scaling_"))
    policy = build_text_policy(args.workdir / "text_policy", seed=args.seed)
    data = build_data(args.workdir / "data", n=64, seed=args.seed)
    rows = read_rows(data["train_text"], args.batch * (args.warmup + args.steps))
    prompt_tokens = None
    cells: dict[tuple[int, int], dict] = {}
    first = True
    for r in range(args.rounds):
        for G in args.groups:
            for L in args.lengths:
                a = argparse.Namespace(**{**vars(args), "G": G, "max_completion": L})
                prof = (args.workdir / "profile") if (args.profile and first) else None
                res = run_voldpl(policy, rows, a, False, prof)
                first = False
                c = cells.setdefault((G, L), {"s": [], "tokens": []})
                c["s"] += res["steps_s"][args.warmup:]
                c["tokens"] += res["completion_tokens"][args.warmup:]
                print(f"  round {r + 1} G={G:2d} L={L:3d}: {median(c['s']):.3f} s/step, "
                      f"{median(c['tokens']):.0f} completion tokens/step", flush=True)
    if prompt_tokens is None:
        from vold_pl.data.collate import PromptCollator
        from vold_pl.models.factory import ModelSpec, load_processor

        b = PromptCollator(load_processor(ModelSpec(str(policy))))(rows[: args.batch])
        prompt_tokens = int(b["attention_mask"].sum())
    xs, ys, out_rows, out = [], [], [], {}
    for (G, L), c in cells.items():
        s, t = median(c["s"]), median(c["tokens"])
        xs.append(t)
        ys.append(s)
        out[f"G{G}_L{L}"] = {"G": G, "max_len": L, "median_step_s": s, "median_completion_tokens": t, "raw": c}
        out_rows.append([G, L, G * L * args.batch, t, s, 1000 * s / max(t, 1)])
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    A = torch.stack([torch.ones_like(x), x], 1)
    coef = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
    pred = A @ coef
    r2 = float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp(min=1e-12))
    print(f"\nOPD-GRPO step time vs group size and completion length: text policy, {args.batch} prompts "
          f"({prompt_tokens} prompt tokens) per step, median of {args.steps * args.rounds} steps per cell\n")
    print(table(["G", "max len", "max tokens", "completion tokens/step", "s/step", "s per 1k tokens"], out_rows))
    print(f"\nleast squares: step_s = {coef[0]:.3f} + {1000 * coef[1]:.3f} ms x completion_tokens   (R^2 = {r2:.3f})")
    if args.profile:
        print(f"[profile] op table (.txt) and chrome trace (.json) of vold-pl steps in {args.workdir / 'profile'}")
    write_json("bench_scaling",
               {"threads": threads, "args": {k: str(v) for k, v in vars(args).items()}, "cells": out,
                "fit": {"intercept_s": float(coef[0]), "s_per_token": float(coef[1]), "r2": r2},
                "prompt_tokens_per_step": prompt_tokens}, args.out)


if __name__ == "__main__":
    main()
