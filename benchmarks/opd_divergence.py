"""Where a student's rollouts first diverge from its OPD teacher, and whether that token is the student's error.

The student samples G rollouts per problem as the RL stage does (``OPDGRPOModule.build_experience``: the same
sampler, rewards and teacher scores), and each token's sampling-time k1 (``log π_θ − log π_T``) is taken. A rollout's
first divergence t* is its first token with k1 above ``--nats`` (:func:`vold_pl.rl.losses.opd_horizon`, the tokens
``opd.horizon: first_divergence`` distils). For each failed rollout with one, the teacher continues greedily under
its own view of the problem:

- **before**: from the student's prefix ``o_<t*`` (the tokens it agreed with);
- **after**: from ``o_<=t*`` (the student's token at t* kept);

and each continuation is scored with the accuracy reward. Before near 1 and after well below it: the token at t* is
where the student went wrong, and the teacher's own choice there (``teacher_top``) is the correction OPD distils.
Before well below 1: the student's prefix had already gone wrong where the teacher did not notice it.

With ``--student-continues`` the student, too, continues greedily from its own prefix, with its image:

- **corrected**: the teacher's token at t* in place of its own (what a student that had learnt that correction,
  and nothing else, would go on from);
- **kept**: its own token at t* (the same greedy decoding, without the correction).

Corrected well above kept: one token's correction turns failed rollouts into right ones. Corrected near kept: the
student goes wrong again after it, and the first divergence's correction alone does not make the answer.

    python benchmarks/opd_divergence.py --student runs/quickstart/seed0/cold_start/export \\
        --teacher vold_pl/toy/pretrained/teacher --data artifacts/data/val.jsonl \\
        --out benchmarks/results/opd_divergence/cold_start.json

Writes ``--out`` (the arguments and ``summary``), with ``--rows`` one row per rollout, and prints the summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as ``python benchmarks/x.py`` from a checkout
    sys.path.insert(0, str(REPO))

from vold_pl.compare import bootstrap_mean_ci  # noqa: E402
from vold_pl.rl.losses import opd_horizon  # noqa: E402


def first_divergence(k1: torch.Tensor, mask: torch.Tensor, nats: float) -> list[int | None]:
    """Per row, the first completion token whose k1 is above ``nats`` (``None``: none is): the token that
    ``opd.horizon: at_divergence`` distils, and the last that ``first_divergence`` does. ``[N, L], [N, L] -> N``."""
    at = opd_horizon(k1, mask, "at_divergence", nats)  # [N, L], one 1 at most per row
    return [int(row.argmax()) if bool(row.any()) else None for row in at]


def build_module(student: str, teacher: str, group_size: int, temperature: float, max_new_tokens: int):
    """The RL stage's module with the teacher scoring each sampled token (k1); no optimizer step is taken."""
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.rollout_types import SamplingConfig

    module = OPDGRPOModule(ModelSpec(student), teacher=ModelSpec(teacher),
                           grpo=GRPOConfig(num_generations=group_size, beta_ref=0.0),
                           opd=OPDConfig(lam=1.0, gate="failed", estimator="k1", mode="loss"),
                           sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
                           export=False, log_completions_every_n_steps=0)
    module.configure_model()
    module.model.eval()
    return module


@torch.no_grad()
def teacher_continues(teacher, tokenizer, prompt_ids: torch.Tensor, completion_ids: torch.Tensor, cut: int,
                      max_new_tokens: int) -> tuple[str, int]:
    """The teacher's greedy continuation from its prompt ``[S]`` and the student's first ``cut`` completion tokens
    ``[L]``: the completion text (the student's prefix, then the teacher's tokens), and the id of the teacher's top
    token at ``cut``."""
    ids = torch.cat([prompt_ids, completion_ids[:cut]]).unsqueeze(0)  # [1, S + cut]
    out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)  # [1, S + cut + new]
    text = tokenizer.decode(torch.cat([completion_ids[:cut], out[0, ids.size(1):]]), skip_special_tokens=True)
    return text, int(out[0, ids.size(1)])


@torch.no_grad()
def student_continues(module, prompt: dict, completion_ids: torch.Tensor, max_new_tokens: int
                      ) -> tuple[str, torch.Tensor]:
    """The student's greedy continuation, under its own view (``prompt``: a one-row :class:`PromptCollator` batch,
    its image included), of the completion tokens ``[c]`` it is given; the sampler's blocked ids are never emitted.
    Returns the completion text (the given tokens, then the student's) and the student's new tokens ``[new]``."""
    from vold_pl.rl.rollout_types import blocked_token_ids

    tok = module.tokenizer
    ids = torch.cat([prompt["input_ids"][0], completion_ids]).unsqueeze(0)  # [1, P + c]
    extra = {k: v for k, v in prompt.items() if k in ("pixel_values", "image_grid_thw")}
    if "mm_token_type_ids" in prompt:  # the given completion tokens are text
        extra["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"][0], torch.zeros_like(completion_ids)])[None]
    out = module.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tok.pad_token_id,
                                bad_words_ids=[[b] for b in blocked_token_ids(tok)], **extra)  # [1, P + c + new]
    new = out[0, ids.size(1):]  # [new]
    return tok.decode(torch.cat([completion_ids, new]), skip_special_tokens=True), new


def diagnose(module, records: list, nats: float, batch_size: int = 8, max_new_tokens: int = 160,
             progress=print, student: bool = False) -> list[dict]:
    """One row per rollout: ``id``, ``success`` (accuracy reward), ``length``, ``completion``, ``t_star`` (None:
    no divergence) and its ``k1``; failed rollouts with a divergence add ``prefix`` (the student's text before
    t*), ``student_token``, ``teacher_top``, ``before``/``after`` (the teacher's continuations) and
    ``before_ok``/``after_ok``; with ``student`` also ``corrected``/``kept`` (the student's continuations, module
    docstring) and ``corrected_ok``/``kept_ok``."""
    from vold_pl.data.collate import PromptCollator
    from vold_pl.data.sources import to_dataset
    from vold_pl.rewards.functions import get_reward
    from vold_pl.rl.logprobs import rollout_token_logprobs
    from vold_pl.rl.teacher import build_teacher_inputs

    accuracy, G = get_reward("accuracy"), module.grpo.num_generations
    teacher, tok = module.teacher, module.teacher_tokenizer
    ds, collate, rows = to_dataset(records), PromptCollator(module.processor), []
    for start in range(0, len(records), batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(records)))])
        with torch.no_grad():
            step = module.build_experience(batch)
            ro, exp = step.rollout, step.experience
            logp = rollout_token_logprobs(module.model, ro, temperature=module.sampling.temperature)  # [N, L]
        k1 = torch.where(exp.mask.bool(), logp - exp.teacher_logp, 0.0)  # [N, L]
        t_stars = first_divergence(k1, exp.mask, nats)
        tin = build_teacher_inputs(tok, batch["records"], ro.completion_ids, ro.completion_mask, G)
        S = tin.completion_start
        for i, t_star in enumerate(t_stars):
            rec = batch["records"][i // G]
            length = int(exp.mask[i].sum())
            row = {"id": rec["id"], "success": float(exp.success[i]), "length": length, "completion": ro.texts[i],
                   "t_star": t_star, "k1": None if t_star is None else float(k1[i, t_star])}
            if row["success"] == 0 and t_star is not None:
                prompt = tin.input_ids[i, :S][tin.attention_mask[i, :S].bool()]  # [S'] the teacher's prompt, unpadded
                comp = ro.completion_ids[i, :length]  # [length]
                before, top = teacher_continues(teacher, tok, prompt, comp, t_star, max_new_tokens)
                after, _ = teacher_continues(teacher, tok, prompt, comp, t_star + 1, max_new_tokens)
                row.update(prefix=tok.decode(comp[:t_star]), student_token=tok.decode(comp[t_star: t_star + 1]),
                           teacher_top=tok.decode([top]), before=before, after=after,
                           before_ok=accuracy(before, SimpleNamespace(**rec)),
                           after_ok=accuracy(after, SimpleNamespace(**rec)))
                if student:
                    one = collate([ds[start + i // G]])  # the student's own prompt and image, unpadded
                    fixed = torch.cat([comp[:t_star], comp.new_tensor([top])])  # [t* + 1]
                    row["corrected"], _ = student_continues(module, one, fixed, max_new_tokens)
                    row["kept"], _ = student_continues(module, one, comp[: t_star + 1], max_new_tokens)
                    row["corrected_ok"] = accuracy(row["corrected"], SimpleNamespace(**rec))
                    row["kept_ok"] = accuracy(row["kept"], SimpleNamespace(**rec))
            rows.append(row)
        progress(f"[opd_divergence] {min(start + batch_size, len(records))}/{len(records)} problems")
    return rows


def student_summary(cont: list[dict], share, ci) -> dict:
    """The student's continuations (``--student-continues``) of the failed rollouts ``cont``: right with the
    teacher's token at t* and with its own, over all of them and over those whose t* is decisive."""
    decisive = [r for r in cont if r["before_ok"] == 1 and r["after_ok"] == 0]
    return {"student_corrected": share(fixed := [r["corrected_ok"] for r in cont]), "student_corrected_ci": ci(fixed),
            "student_kept": share(kept := [r["kept_ok"] for r in cont]), "student_kept_ci": ci(kept),
            "student_corrected_decisive": share([r["corrected_ok"] for r in decisive]),
            "student_kept_decisive": share([r["kept_ok"] for r in decisive])}


def summarize(rows: list[dict]) -> dict:
    """Shares over the rollouts (bootstrap 95% intervals over rollouts for the teacher's continuations)."""
    failed = [r for r in rows if r["success"] == 0]
    won = [r for r in rows if r["success"] == 1]
    cont = [r for r in failed if "before_ok" in r]

    def share(xs):
        return round(float(np.mean(xs)), 4) if xs else None

    def ci(xs):
        return [round(x, 4) for x in bootstrap_mean_ci(np.asarray(xs, dtype=float))] if xs else None

    pairs = collections.Counter((r["student_token"].strip(), r["teacher_top"].strip()) for r in cont)
    return {
        "rollouts": len(rows), "success": share([r["success"] for r in rows]), "failed": len(failed),
        "failed_with_divergence": share([r["t_star"] is not None for r in failed]),
        "succeeded_with_divergence": share([r["t_star"] is not None for r in won]),
        "teacher_before": share(before := [r["before_ok"] for r in cont]), "teacher_before_ci": ci(before),
        "teacher_after": share(after := [r["after_ok"] for r in cont]), "teacher_after_ci": ci(after),
        "teacher_top_is_student_token": sum(r["teacher_top"] == r["student_token"] for r in cont),
        # the t* that decide the teacher's answer (right before it, wrong with the student's token kept)
        "decisive": share([r["before_ok"] == 1 and r["after_ok"] == 0 for r in cont]),
        **(student_summary(cont, share, ci) if cont and "corrected_ok" in cont[0] else {}),
        "relative_position": share([r["t_star"] / r["length"] for r in cont]),
        # in the completion's first sentence (the toy's facts statement, "I see red squares 1, ..."), or after it
        "in_first_sentence": share(["." not in r["prefix"] for r in cont]),
        "token_pairs": [[s, t, n] for (s, t), n in pairs.most_common(10)],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="the student's export (a VLM folder)")
    p.add_argument("--teacher", required=True, help="the OPD teacher's export (a text LLM folder)")
    p.add_argument("--data", required=True, help="a JSONL of problems with text views (e.g. artifacts/data/val.jsonl)")
    p.add_argument("--limit", type=int, default=200, help="the first N problems (0: all)")
    p.add_argument("--group-size", type=int, default=4, help="rollouts per problem (G)")
    p.add_argument("--temperature", type=float, default=0.7, help="the sampler's temperature (the RL stage's)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the student's generation budget")
    p.add_argument("--nats", type=float, default=2.0,
                   help="k1 above which a token is a divergence (opd.divergence_nats)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    p.add_argument("--out", required=True, help="JSON written with the arguments and the summary")
    p.add_argument("--rows", default=None, help="JSONL written with one row per rollout (texts included)")
    p.add_argument("--student-continues", action="store_true",
                   help="the student, too, continues each failed rollout greedily: with the teacher's token at t* "
                        "(corrected) and with its own (kept)")
    args = p.parse_args(argv)

    from lightning.pytorch import seed_everything

    from vold_pl.data.sources import read_records

    seed_everything(args.seed, verbose=False)
    records, _ = read_records(args.data)
    records = records[: args.limit] if args.limit else records
    module = build_module(args.student, args.teacher, args.group_size, args.temperature, args.max_new_tokens)
    rows = diagnose(module, records, args.nats, student=args.student_continues)
    summary = summarize(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1) + "\n")
    if args.rows:
        Path(args.rows).parent.mkdir(parents=True, exist_ok=True)
        Path(args.rows).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for key, value in summary.items():
        print(f"{key}: {json.dumps(value, ensure_ascii=False)}")


if __name__ == "__main__":
    main()
