"""vold-pl's OPD-GRPO (OPD off) against TRL's ``GRPOTrainer`` on the same work, interleaved A B A B.

The same tiny policy folder (same weights and tokenizer), the same prompts in the same order, the same reward
(vold-pl's ``accuracy`` + 0.1 ``format``, wrapped for TRL's ``reward_funcs``), group size G, completion
length, β = 0 (no reference model), one optimizer step per rollout (μ = 1, no gradient accumulation),
temperature 1 / top-p 1 / top-k off, GRPO sequence-mean loss, group-std advantages, clip 0.2, grad clip 1,
constant LR with AdamW. Each trainer runs ``--steps`` optimizer steps per round; the first ``--warmup`` of
each run are dropped; rounds alternate TRL, vold-pl, TRL, vold-pl, ... so machine drift hits both alike.
Step time = ``perf_counter`` between consecutive step ends (a TRL ``TrainerCallback`` / a Lightning callback),
so it includes everything a training loop does per step (data, rollout, reward, forward, backward, optimizer,
logging).

Two cases: a text-only Qwen2 policy (``text``), and the tiny Qwen2.5-VL student on image prompts (``vlm``;
TRL supports Qwen2.5-VL with its processor).

    python benchmarks/bench_vs_trl.py                       # both cases, prints tables, writes results JSON
    python benchmarks/bench_vs_trl.py --cases text --steps 10 --rounds 3
    python benchmarks/bench_vs_trl.py --profile             # + a PyTorch profiler trace of vold-pl steps

Needs ``pip install -e ".[bench]"`` (TRL).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from _common import (RESULTS, build_data, build_text_policy, build_vlm, lightning_step_timer, median, quiet,
                     read_rows, table, trl_step_timer, write_json)


REWARD_WEIGHTS = {"accuracy": 1.0, "format": 0.1}


# ------------------------------------------------------------------------------------------------ shared work

def make_prompts(rows: list[dict], vision: bool) -> list[dict]:
    """The same chat prompt for both trainers: vold-pl's ``student_messages`` (images first, then text; a plain
    string turn for the text policy, as vold-pl renders it for a model without an image processor)."""
    from vold_pl.prompts import student_messages

    out = []
    for r in rows:
        msgs = student_messages(r, with_images=vision)
        rec = {"prompt": msgs, "answer": r["answer"], "answer_type": r["answer_type"],
               "choices": json.dumps(r.get("choices")), "id": r["id"]}
        if vision:
            rec["image"] = r["images"][0]
        out.append(rec)
    return out


def trl_reward(prompts, completions, answer, answer_type, choices, **kwargs) -> list[float]:
    """vold-pl's weighted reward in TRL's ``reward_funcs`` signature."""
    from vold_pl.rewards.functions import compute_rewards

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    recs = [SimpleNamespace(answer=a, answer_type=t, choices=json.loads(ch), id="")
            for a, t, ch in zip(answer, answer_type, choices)]
    return compute_rewards(texts, recs, REWARD_WEIGHTS).total.tolist()


trl_reward.__name__ = "accuracy_format"


class CountingEngine:
    """Wraps a rollout engine to count completion tokens (the work done) per step."""

    def __init__(self, engine):
        self.engine, self.tokens = engine, []

    def generate(self, model, batch, num_samples, sampling):
        ro = self.engine.generate(model, batch, num_samples, sampling)
        self.tokens.append(int(ro.completion_mask.sum()))
        return ro

    def __getattr__(self, name):
        return getattr(self.engine, name)


# ------------------------------------------------------------------------------------------------ the two runs

def run_voldpl(policy: Path, rows: list[dict], args, vision: bool, profile_dir: Path | None = None) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from vold_pl.data.collate import PromptCollator
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.base import OptimConfig
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.cached_sampler import CachedSamplingEngine
    from vold_pl.rl.hf_engine import HFGenerateEngine
    from vold_pl.rl.rollout_types import SamplingConfig

    module = OPDGRPOModule(
        ModelSpec(str(policy)),
        optim=OptimConfig(lr=args.lr, schedule="constant", weight_decay=0.0),
        grpo=GRPOConfig(num_generations=args.G, scale="group", epsilon_low=0.2, epsilon_high=0.2,
                        loss_aggregation="sequence", num_iterations=1, beta_ref=0.0),
        opd=OPDConfig(lam=0.0),
        sampling=SamplingConfig(max_new_tokens=args.max_completion, temperature=1.0, top_p=1.0, top_k=0),
        rewards=REWARD_WEIGHTS, max_grad_norm=1.0, log_completions_every_n_steps=0, export=False, seed=args.seed,
    )
    engine_cls = CachedSamplingEngine if args.engine == "cached" else HFGenerateEngine
    module.rollout_engine = counter = CountingEngine(engine_cls(module.tokenizer))
    loader = DataLoader(rows, batch_size=args.batch, shuffle=False, collate_fn=PromptCollator(module.processor))
    timer = lightning_step_timer()
    profiler = None
    if profile_dir is not None:
        from lightning.pytorch.profilers import PyTorchProfiler

        profiler = PyTorchProfiler(dirpath=str(profile_dir), filename="voldpl_steps", export_to_chrome=True,
                                   row_limit=25, sort_by_key="cpu_time_total")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], profiler=profiler, default_root_dir=str(args.workdir / "lightning"))
    L.seed_everything(args.seed, verbose=False)
    trainer.fit(module, train_dataloaders=loader)
    return {"steps_s": timer.steps, "completion_tokens": counter.tokens}


def run_trl(policy: Path, rows: list[dict], args, vision: bool) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from vold_pl.models.factory import ModelSpec, load_model

    model, processing = load_model(ModelSpec(str(policy)))
    ds = Dataset.from_list(make_prompts(rows, vision))
    cfg = TRLConfig(
        output_dir=str(args.workdir / "trl"), use_cpu=True, use_vllm=False, bf16=False, fp16=False,
        per_device_train_batch_size=args.batch * args.G, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.G, num_iterations=1, max_completion_length=args.max_completion, beta=0.0,
        temperature=1.0, top_p=1.0, top_k=0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=args.warmup + args.steps, shuffle_dataset=False, seed=args.seed, data_seed=args.seed,
        logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0, log_completions=False,
        disable_tqdm=True, remove_unused_columns=False,
    )
    timer = trl_step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=cfg, train_dataset=ds,
                          processing_class=processing, callbacks=[timer])
    tokens = []
    orig = trainer._generate_and_score_completions

    def counted(inputs):
        out = orig(inputs)
        tokens.append(int(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = counted
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # keep stdout to our tables; TRL still logs its metrics
        trainer.remove_callback(cb)
    trainer.train()
    return {"steps_s": timer.steps, "completion_tokens": tokens}


def check_same_prompts(policy: Path, rows: list[dict], vision: bool) -> None:
    """TRL's chat-template tokenisation and vold-pl's collator give the same prompt ids."""
    from vold_pl.data.collate import PromptCollator
    from vold_pl.models.factory import ModelSpec, load_processor

    proc = load_processor(ModelSpec(str(policy)))
    batch = PromptCollator(proc)(rows[:2])
    for i, rec in enumerate(make_prompts(rows[:2], vision)):
        msgs = rec["prompt"]
        if vision:
            msgs = [{"role": "user", "content": [{"type": "image", "image": rec["image"]}, msgs[0]["content"][1]]}]
        ids = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        ids = ids[0] if ids and isinstance(ids[0], list) else ids
        ids = ids.tolist()[0] if hasattr(ids, "tolist") and getattr(ids, "dim", lambda: 1)() == 2 else list(ids)
        ours = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert ids == ours, f"prompt {i}: TRL and vold-pl tokenise differently"


# ------------------------------------------------------------------------------------------------ main

def run_case(case: str, args) -> dict:
    data = build_data(args.workdir / "data", n=max(64, args.batch * (args.warmup + args.steps)), seed=args.seed)
    if case == "text":
        policy = build_text_policy(args.workdir / "text_policy", hidden=args.hidden, layers=args.layers,
                                   seed=args.seed)
        rows = read_rows(data["train_text"], args.batch * (args.warmup + args.steps))
    else:
        policy = build_vlm(args.workdir / "vlm", seed=args.seed)["student"]
        rows = read_rows(data["train"], args.batch * (args.warmup + args.steps))
    vision = case == "vlm"
    check_same_prompts(policy, rows, vision)
    names = ["trl", "vold-pl"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            t0 = time.perf_counter()
            prof = (args.workdir / "profile") if (args.profile and name == "vold-pl" and r == 0) else None
            if name == "trl":
                res = run_trl(policy, rows, args, vision)
            else:
                res = run_voldpl(policy, rows, args, vision, prof)
            res["wall_s"] = time.perf_counter() - t0
            res["measured_s"] = res["steps_s"][args.warmup:]
            res["measured_tokens"] = res["completion_tokens"][args.warmup:]
            runs[name].append(res)
            print(f"  [{case}] round {r + 1}/{args.rounds} {name:22s} median step "
                  f"{median(res['measured_s']):.3f}s over {len(res['measured_s'])} steps, "
                  f"{median(res['measured_tokens']):.0f} completion tokens/step", flush=True)
    summary = {}
    for name, rs in runs.items():
        steps = [s for r in rs for s in r["measured_s"]]
        toks = [t for r in rs for t in r["measured_tokens"]]
        summary[name] = {"median_step_s": median(steps), "steps": len(steps),
                         "median_completion_tokens": median(toks),
                         "tokens_per_s": sum(toks) / max(sum(steps), 1e-9),
                         "per_round_median_s": [median(r["measured_s"]) for r in rs]}
    for name in names[1:]:
        trl = summary["trl"]
        summary[name]["ratio_over_trl"] = summary[name]["median_step_s"] / trl["median_step_s"]
        summary[name]["per_round_ratio_over_trl"] = [
            a / b for a, b in zip(summary[name]["per_round_median_s"], trl["per_round_median_s"])]
        summary[name]["speedup_vs_trl"] = 1 / summary[name]["ratio_over_trl"]
    summary["raw"] = runs
    summary["policy"] = str(policy)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--cases", nargs="+", default=["text", "vlm"], choices=["text", "vlm"], help="which policies")
    p.add_argument("--G", type=int, default=8, help="group size (completions per prompt)")
    p.add_argument("--batch", type=int, default=2, help="prompts per step")
    p.add_argument("--max-completion", type=int, default=64, help="max completion tokens")
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds (TRL, vold-pl) per case")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (constant)")
    p.add_argument("--hidden", type=int, default=128, help="text policy hidden size")
    p.add_argument("--layers", type=int, default=2, help="text policy layers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both trainers (0: the cores this process may use)")
    p.add_argument("--engine", choices=["cached", "hf"], default="cached",
                   help="vold-pl rollout engine: CachedSamplingEngine (default) or HFGenerateEngine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="models/data/scratch folder (default: a temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for bench_vs_trl.json")
    p.add_argument("--profile", action="store_true",
                   help="profile vold-pl's first round with Lightning's PyTorchProfiler (chrome trace + table "
                        "under <workdir>/profile)")
    args = p.parse_args(argv)
    quiet()
    from vold_pl.startup import set_cpu_threads

    threads = set_cpu_threads(args.threads or None)
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vold_bench_trl_"))
    print(f"threads={threads} workdir={args.workdir} G={args.G} batch={args.batch} "
          f"max_completion={args.max_completion} steps={args.steps}+{args.warmup} warm-up, rounds={args.rounds}")
    results = {}
    for case in args.cases:
        try:
            results[case] = run_case(case, args)
        except Exception as e:  # noqa: BLE001 - report a case TRL cannot run instead of losing the others
            import traceback

            traceback.print_exc()
            results[case] = {"error": f"{type(e).__name__}: {e}"}
    rows = []
    for case, s in results.items():
        if "error" in s:
            rows.append([case, "-", "-", "-", "-", "-", s["error"][:60]])
            continue
        for name in [n for n in s if n.startswith("vold-pl")]:
            v = s[name]
            rows.append([case, name, s["trl"]["median_step_s"], v["median_step_s"], v["ratio_over_trl"],
                         f"{v['speedup_vs_trl']:.2f}x",
                         f"{s['trl']['median_completion_tokens']:.0f} / {v['median_completion_tokens']:.0f}"])
    print("\nMedian step time, same work (interleaved runs; ratio < 1: vold-pl faster)\n")
    print(table(["policy", "trainer", "TRL s/step", "vold-pl s/step", "vold-pl / TRL", "speedup",
                 "completion tokens/step TRL / vold-pl"], rows))
    if args.profile:
        print(f"[profile] op table (.txt) and chrome trace (.json) of vold-pl steps in {args.workdir / 'profile'}")
    write_json("bench_vs_trl", {"args": {k: str(v) for k, v in vars(args).items()}, "threads": threads,
                                "results": results}, args.out)


if __name__ == "__main__":
    main()
