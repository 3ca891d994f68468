"""Rollout throughput of vold-pl's engine against plain ``model.generate``, and where an OPD-GRPO step goes.

1. Rollout tokens/s: ``CachedSamplingEngine`` (one prefill per prompt, KV cache expanded G times, finished rows
   dropped from the batch) vs ``HFGenerateEngine`` (``model.generate`` on the G-times repeated batch), same
   model, prompts and ``SamplingConfig``, on the tiny text policy and the tiny Qwen2.5-VL student (image
   prompts), for *equal* completion lengths (EOS suppressed by a -1e4 logit bias: every row runs to
   ``--max-new-tokens``) and *very unequal* ones (an EOS bias giving geometric lengths, most rows short, a few
   long). Runs alternate engine A, engine B, A, B...; medians of ``--reps``; tokens = completion tokens kept.
2. Static decode vs the eager engine (``--parts static``): completion tokens per CPU-second of
   ``StaticDecodeEngine`` (static KV cache, EOS read every ``--eos-check-every`` steps; its step eager and
   ``torch.compile``d) against ``CachedSamplingEngine`` (the eager reference, with and without compaction) in
   the same run: equal lengths (greedy, outputs checked equal to the eager engine's) and unequal ones (sampled,
   outputs checked equal to the eager loop's without compaction for the same seed). The compilation is paid in
   a warm-up (reported apart). Written to ``benchmarks/results/bench_rollout_static.json``.
3. Breakdown of one OPD-GRPO step (VLM student + text teacher, OPD on, a k3 reference): rollout, reward,
   teacher scoring, reference, policy forward, loss, backward, optimizer, rest (logging, inputs), in seconds
   and percent, timed by wrapping the module's pieces (``perf_counter``) over ``--steps`` Lightning steps.

    python benchmarks/bench_rollout.py                     # both parts, tables + benchmarks/results/bench_rollout.json
    python benchmarks/bench_rollout.py --parts rollout --reps 5
    python benchmarks/bench_rollout.py --parts breakdown --profile         # + PyTorch profiler table / trace
    python benchmarks/bench_rollout.py --parts static                       # static/compiled vs eager decode
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import (RESULTS, build_data, build_text_policy, build_vlm, eos_biased, median,
                     quiet, read_rows, table, write_json)

import torch  # noqa: E402


# ------------------------------------------------------------------------------------------------ 1. rollouts

def _models(args):
    """``(name, model, tokenizer, prompt batch)`` of each of ``args.models``: the tiny text policy and VLM."""
    from vold_pl.data.collate import PromptCollator
    from vold_pl.models.factory import ModelSpec, load_model

    data = build_data(args.workdir / "data", n=64, seed=args.seed)
    models = {"text": (build_text_policy(args.workdir / "text_policy", seed=args.seed), data["train_text"]),
              "vlm": (build_vlm(args.workdir / "vlm", seed=args.seed)["student"], data["train"])}
    for name in args.models:
        path, jsonl = models[name]
        model, proc = load_model(ModelSpec(str(path)))
        yield name, model, getattr(proc, "tokenizer", proc), PromptCollator(proc)(read_rows(jsonl, args.prompts))


def rollout_throughput(args) -> dict:
    from vold_pl.rl.cached_sampler import CachedSamplingEngine
    from vold_pl.rl.hf_engine import HFGenerateEngine
    from vold_pl.rl.rollout_types import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    out, rows = {}, []
    for name, model, tok, batch in _models(args):
        engines = {"generate": HFGenerateEngine(tok), "vold-pl": CachedSamplingEngine(tok)}
        for case, bias in (("equal", -1e4), ("unequal", args.eos_bias)):
            eos_biased(model, tok.eos_token_id, bias)
            model.eval()
            for e in engines.values():  # warm-up
                e.generate(model, batch, args.G, SamplingConfig(max_new_tokens=4))
            res = defaultdict(lambda: {"s": [], "tokens": [], "max_len": [], "mean_len": []})
            for r in range(args.reps):
                order = list(engines) if r % 2 == 0 else list(engines)[::-1]
                for ename in order:
                    torch.manual_seed(args.seed + r)
                    t0 = time.perf_counter()
                    ro = engines[ename].generate(model, batch, args.G, sampling)
                    dt = time.perf_counter() - t0
                    lengths = ro.completion_mask.sum(-1).float()
                    res[ename]["s"].append(dt)
                    res[ename]["tokens"].append(int(lengths.sum()))
                    res[ename]["max_len"].append(int(lengths.max()))
                    res[ename]["mean_len"].append(float(lengths.mean()))
            summ = {}
            for ename, v in res.items():
                tps = [t / s for t, s in zip(v["tokens"], v["s"])]
                summ[ename] = {"median_s": median(v["s"]), "median_tokens_per_s": median(tps),
                               "mean_len": median(v["mean_len"]), "max_len": median(v["max_len"]), "raw": dict(v)}
            ratio = summ["vold-pl"]["median_tokens_per_s"] / summ["generate"]["median_tokens_per_s"]
            out[f"{name}/{case}"] = {**summ, "speedup_tokens_per_s": ratio}
            rows.append([name, case, f"{summ['vold-pl']['mean_len']:.0f} / {summ['vold-pl']['max_len']:.0f}",
                         summ["generate"]["median_tokens_per_s"], summ["vold-pl"]["median_tokens_per_s"],
                         f"{ratio:.2f}x"])
            print(f"  rollout {name}/{case}: generate {summ['generate']['median_tokens_per_s']:.0f} tok/s, "
                  f"vold-pl {summ['vold-pl']['median_tokens_per_s']:.0f} tok/s ({ratio:.2f}x)", flush=True)
    print(f"\nRollout throughput, {args.prompts} prompts x G={args.G}, max {args.max_new_tokens} new tokens "
          f"(completion tokens / s, median of {args.reps}, interleaved)\n")
    print(table(["model", "lengths", "mean / max len", "model.generate tok/s", "vold-pl engine tok/s", "speedup"],
                [[r[0], r[1], r[2], r[3], r[4], r[5]] for r in rows]))
    return out


# ------------------------------------------------------------------------------------- static vs eager decode

def static_vs_eager(args) -> dict:
    from vold_pl.rl.cached_sampler import CachedSamplingEngine
    from vold_pl.rl.rollout_types import SamplingConfig
    from vold_pl.rl.static_decode import StaticDecodeEngine

    # equal: greedy, EOS never emitted, every row runs to the cap; outputs equal the eager engine's.
    # unequal: sampled (T = 1) with an EOS bias (geometric lengths); outputs equal, for the same seed, the eager
    # loop's without compaction ("eager/no-compact"), which draws the same random numbers; the eager engine with
    # compaction ("eager", the default) is timed as the reference (same distribution, other draws).
    cases = {"equal": (-1e4, SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=False)),
             "unequal": (args.eos_bias, SamplingConfig(max_new_tokens=args.max_new_tokens))}
    out, rows = {}, []
    for name, model, tok, batch in _models(args):
        engines = {"eager": CachedSamplingEngine(tok), "eager/no-compact": CachedSamplingEngine(tok, compact=False),
                   "static": StaticDecodeEngine(tok, compile="none", eos_check_every=args.eos_check_every),
                   "static+compile": StaticDecodeEngine(tok, compile="default", eos_check_every=args.eos_check_every)}
        warm = {}
        for case, (bias, sampling) in cases.items():
            eos_biased(model, tok.eos_token_id, bias)  # a new head: the static step is rebuilt (and recompiled)
            model.eval()
            equal_to = "eager" if not sampling.do_sample else "eager/no-compact"
            for ename, e in engines.items():  # compilation (and the lean self-check) paid here, timed apart
                t0 = time.perf_counter()
                e.generate(model, batch, args.G, sampling)
                warm[f"{case}/{ename}"] = time.perf_counter() - t0
            res = defaultdict(lambda: {"s": [], "cpu_s": [], "tokens": []})
            for r in range(args.reps):
                order = list(engines) if r % 2 == 0 else list(engines)[::-1]
                outs = {}
                for ename in order:
                    torch.manual_seed(args.seed + r)
                    t0, c0 = time.perf_counter(), time.process_time()
                    outs[ename] = ro = engines[ename].generate(model, batch, args.G, sampling)
                    res[ename]["s"].append(time.perf_counter() - t0)
                    res[ename]["cpu_s"].append(time.process_time() - c0)
                    res[ename]["tokens"].append(int(ro.completion_mask.sum()))
                for ename in ("static", "static+compile"):  # token for token the eager loop's
                    assert engines[ename].last_decode_path == "static", engines[ename].last_decode_path
                    assert torch.equal(outs[ename].completion_ids, outs[equal_to].completion_ids), (name, case, ename)
            # Tokens per CPU-second of this process (the primary figure: it does not count time the shared
            # cores spent on other processes) and per wall-second.
            summ = {e: {"median_s": median(v["s"]), "median_cpu_s": median(v["cpu_s"]),
                        "median_tokens_per_s": median(t / s for t, s in zip(v["tokens"], v["cpu_s"])),
                        "median_tokens_per_wall_s": median(t / s for t, s in zip(v["tokens"], v["s"])),
                        "mean_len": median(t / (args.prompts * args.G) for t in v["tokens"]),
                        "raw_s": v["s"], "raw_cpu_s": v["cpu_s"], "tokens": v["tokens"]} for e, v in res.items()}
            base = summ["eager"]["median_tokens_per_s"]
            ratios = {e: summ[e]["median_tokens_per_s"] / base for e in engines if e != "eager"}
            wall = {e: summ[e]["median_tokens_per_wall_s"] / summ["eager"]["median_tokens_per_wall_s"]
                    for e in engines if e != "eager"}
            out[f"{name}/{case}"] = {**summ, "ratio_vs_eager": ratios, "wall_ratio_vs_eager": wall,
                                     "outputs_equal_to": equal_to}
            rows.append([name, case, f"{summ['eager']['mean_len']:.0f}", base,
                         summ["eager/no-compact"]["median_tokens_per_s"], summ["static"]["median_tokens_per_s"],
                         summ["static+compile"]["median_tokens_per_s"], f"{ratios['static']:.2f}x",
                         f"{ratios['static+compile']:.2f}x"])
            print(f"  decode {name}/{case}: eager {base:.0f} tok/s, static {summ['static']['median_tokens_per_s']:.0f} "
                  f"({ratios['static']:.2f}x), compiled {summ['static+compile']['median_tokens_per_s']:.0f} "
                  f"({ratios['static+compile']:.2f}x); outputs equal to {equal_to}'s", flush=True)
        out[f"{name}/warmup_s"] = warm
    print(f"\nDecode throughput, {args.prompts} prompts x G={args.G}, max {args.max_new_tokens} new tokens "
          f"(completion tokens per CPU-second of the process, median of {args.reps}, interleaved; static outputs "
          f"equal to the eager loop's: greedy for 'equal', same seed without compaction for 'unequal')\n")
    print(table(["model", "lengths", "mean len", "eager tok/s", "eager no-compact tok/s", "static tok/s",
                 "static+compile tok/s", "static / eager", "compiled / eager"], rows))
    return out


# ------------------------------------------------------------------------------------------------ 2. breakdown

PARTS = ["rollout", "reward", "teacher", "reference", "policy_forward", "loss", "backward", "optimizer", "rest"]


class Clock:
    """Accumulates ``perf_counter`` seconds per part for the current step."""

    def __init__(self):
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, part: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.cur[part] += time.perf_counter() - t0
        return timed


def instrument(module, clock: Clock) -> None:
    """Time the pieces of ``OPDGRPOModule.training_step`` by wrapping them on this instance / its module."""
    import vold_pl.modules.opd_grpo as M

    engine = module.rollout_engine

    class TimedEngine:
        def generate(self, *a, **k):
            ro = clock.wrap("rollout", engine.generate)(*a, **k)
            module._last_rollout = ro
            return ro

        def __getattr__(self, n):
            return getattr(engine, n)

    module.rollout_engine = TimedEngine()
    orig_mtl = M.model_token_logprobs

    def mtl(model, *a, **k):  # the policy's own calls are timed by ``_logprobs``; the reference's here
        if model is module._frozen.get("reference"):
            return clock.wrap("reference", orig_mtl)(model, *a, **k)
        return orig_mtl(model, *a, **k)

    M.model_token_logprobs = mtl
    for part, name in (("reward", "compute_rewards"), ("reward", "group_advantages"), ("loss", "opd_grpo_loss")):
        setattr(M, name, clock.wrap(part, getattr(M, name)))
    for part, name in (("teacher", "_teacher_scores"), ("policy_forward", "_logprobs"),
                       ("backward", "manual_backward"), ("optimizer", "_clip_step_and_schedule")):
        setattr(module, name, clock.wrap(part, getattr(module, name)))
    orig_step = module.training_step

    def step(*a, **k):
        clock.cur = defaultdict(float)
        t0 = time.perf_counter()
        try:
            return orig_step(*a, **k)
        finally:
            total = time.perf_counter() - t0
            c = dict(clock.cur)
            c["rest"] = total - sum(c.get(p, 0.0) for p in PARTS if p != "rest")
            c["total"] = total
            clock.steps.append(c)

    module.training_step = step


def step_breakdown(args) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from vold_pl.data.collate import PromptCollator
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.base import OptimConfig
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.cached_sampler import CachedSamplingEngine
    from vold_pl.rl.hf_engine import HFGenerateEngine
    from vold_pl.rl.rollout_types import SamplingConfig

    paths = build_vlm(args.workdir / "vlm", seed=args.seed)
    data = build_data(args.workdir / "data", n=64, seed=args.seed)
    module = OPDGRPOModule(
        ModelSpec(str(paths["student"])), teacher=ModelSpec(str(paths["teacher"])),
        optim=OptimConfig(lr=1e-5, schedule="constant"),
        grpo=GRPOConfig(num_generations=args.G, num_iterations=1, beta_ref=0.04, loss_aggregation="token"),
        opd=OPDConfig(lam=0.5, gate="all", estimator="k1", mode="loss"),
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens), rewards={"accuracy": 1.0, "format": 0.1},
        log_completions_every_n_steps=0, export=False, seed=args.seed,
    )
    module.rollout_engine = (CachedSamplingEngine if args.engine == "cached" else HFGenerateEngine)(module.tokenizer)
    import vold_pl.modules.opd_grpo as M

    saved = {n: getattr(M, n) for n in ("model_token_logprobs", "compute_rewards", "group_advantages")}
    clock = Clock()
    instrument(module, clock)
    n_steps = args.steps + 1
    half = args.prompts // 2
    rows = read_rows(data["train"], half * n_steps) + read_rows(data["train_text"], (args.prompts - half) * n_steps)
    mixed = [r for pair in zip(rows[: half * n_steps], rows[half * n_steps:]) for r in pair]
    loader = DataLoader(mixed, batch_size=args.prompts, shuffle=False, collate_fn=PromptCollator(module.processor))
    profiler = None
    if args.profile:
        from lightning.pytorch.profilers import PyTorchProfiler

        profiler = PyTorchProfiler(dirpath=str(args.workdir / "profile"), filename="bench_rollout_profile",
                                   export_to_chrome=True, row_limit=30, sort_by_key="cpu_time_total")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=n_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, profiler=profiler,
                        default_root_dir=str(args.workdir / "lightning"))
    L.seed_everything(args.seed, verbose=False)
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        for n, f in saved.items():
            setattr(M, n, f)
    if profiler is not None:
        print(f"\n[profile] op table and chrome trace (chrome://tracing, ui.perfetto.dev) in {args.workdir / 'profile'}")
    steps = clock.steps[1:]  # the first step warms up allocators and caches
    med = {p: median(s.get(p, 0.0) for s in steps) for p in PARTS + ["total"]}
    total = sum(med[p] for p in PARTS)
    print(f"\nOne OPD-GRPO step: VLM student + text teacher, OPD on (k1, gate all), k3 reference, "
          f"{args.prompts} prompts x G={args.G}, max {args.max_new_tokens} new tokens, engine={args.engine}; "
          f"median over {len(steps)} steps\n")
    print(table(["part", "seconds", "percent"], [[p, med[p], f"{100 * med[p] / total:.1f}%"] for p in PARTS]
                + [["total (median step)", med["total"], "100%"]]))
    return {"median_s": med, "steps": steps, "engine": args.engine}


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--parts", nargs="+", default=["rollout", "breakdown"], choices=["rollout", "static", "breakdown"])
    p.add_argument("--models", nargs="+", default=["text", "vlm"], choices=["text", "vlm"],
                   help="models for the rollout throughput part")
    p.add_argument("--G", type=int, default=8, help="group size")
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    p.add_argument("--max-new-tokens", type=int, default=128, help="completion length cap")
    p.add_argument("--eos-bias", type=float, default=3.5,
                   help="EOS logit bias of the unequal-length case (3.5: p(EOS) ~ 3%% per token, mean ~ 1/4 of 128)")
    p.add_argument("--eos-check-every", type=int, default=8, help="static decode: host EOS check every k steps")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per engine and case")
    p.add_argument("--steps", type=int, default=4, help="measured OPD-GRPO steps of the breakdown (+1 warm-up)")
    p.add_argument("--engine", choices=["cached", "hf"], default="cached", help="rollout engine of the breakdown")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: the cores this process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="models/data folder (default: a temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for bench_rollout.json")
    p.add_argument("--profile", action="store_true",
                   help="profile the breakdown run with Lightning's PyTorchProfiler: op table (.txt) and chrome "
                        "trace (.json) in <workdir>/profile")
    args = p.parse_args(argv)
    quiet()
    from vold_pl.startup import set_cpu_threads

    threads = set_cpu_threads(args.threads or None)
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vold_bench_rollout_"))
    print(f"threads={threads} workdir={args.workdir}")
    results: dict = {"threads": threads, "args": {k: str(v) for k, v in vars(args).items()}}
    if "rollout" in args.parts:
        results["rollout"] = rollout_throughput(args)
    if "static" in args.parts:
        write_json("bench_rollout_static", {**results, "static": static_vs_eager(args)}, args.out)
    if "breakdown" in args.parts:
        results["breakdown"] = step_breakdown(args)
    if "rollout" in args.parts or "breakdown" in args.parts:
        write_json("bench_rollout", results, args.out)


if __name__ == "__main__":
    main()
