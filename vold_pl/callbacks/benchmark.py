"""``BenchmarkCallback``: decode benchmark problems, score them with the training reward code, report.

When it runs: under ``trainer.validate`` / ``vold-pl validate`` (at the end of the validation epoch, so its
metrics appear in the validate results), and during fit every ``every_n_steps`` optimizer steps, every
``every_n_epochs`` epochs and once when training ends. Every completion gets two scores: ``strict`` is
:func:`~vold_pl.rewards.extract.extract_answer` then :func:`~vold_pl.rewards.functions.score_answer`, the same code as
the training reward (format tags required); ``official`` is the benchmark's own rule-based extraction and comparison
(:func:`~vold_pl.rewards.official.official_score`), which also reads untagged answers. The prompt is the question as
the benchmark prints it (options listed, :mod:`vold_pl.data.benchmarks`) followed by the training instruction or,
with ``prompt_style: official``, the benchmark's own instruction; its exact text is written to the predictions.

Distributed: each rank decodes its own slice ``records[rank::world]`` with no collective inside the loop (a
rank with fewer batches cannot hang the others), then one torchmetrics sum-reduction of a fixed-shape count
matrix per benchmark (the group keys come from the full record list every rank loads) and one
``all_gather_object`` of the predictions. Rank 0 writes the reports (see :mod:`vold_pl.callbacks.report`).
Under FSDP2 every forward is itself a collective, so there the slices are padded to equal batch counts (the
padding is not scored) and decoding is HF ``generate`` (:class:`~vold_pl.rl.hf_engine.HFGenerateEngine`), which
runs with ``synced_gpus`` there (:func:`vold_pl.sharding.generation_needs_sync` decides, for training rollouts
too); the sharding code must make the root's ``generate`` an FSDP forward method
(``torch.distributed.fsdp.register_fsdp_forward_method``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from vold_pl.callbacks.report import NO_CATEGORY, STATS, summarize, write_reports
from vold_pl.data.benchmarks import ON_BAD_RECORD, PROMPT_STYLES, benchmark_instruction, load_benchmark
from vold_pl.data.collate import PromptCollator
from vold_pl.data.datamodule import check_prompts_render
from vold_pl.data.schema import Record
from vold_pl.errors import UserError
from vold_pl.prompts import DEFAULT_INSTRUCTION, prompt_messages, turn_text
from vold_pl.rewards.extract import extract_answer, is_well_formatted
from vold_pl.rewards.functions import score_answer
from vold_pl.rewards.official import official_score
from vold_pl.rl.hf_engine import HFGenerateEngine
from vold_pl.rl.rollout_types import SamplingConfig
from vold_pl.sharding import generation_needs_sync


@dataclass
class BenchmarkSpec:
    """One benchmark to evaluate.

    Args:
        name: label in logs and reports (``bench/<name>/accuracy``); unique among the benchmarks.
        path: the benchmark's local folder or file, or a hub id read from the local HF cache (see
            docs/benchmarks.md for the layouts); a relative path is resolved once, against the working directory.
        loader: which loader reads it: ``mathvista``, ``mathvision``, ``mmmu_pro_standard``, ``mmmu_pro_vision``,
            ``logicvista`` or ``synthetic``; default ``name``.
        limit: evaluate only the first ``limit`` records (quick checks).
        cache_dir: where embedded images are written once; default ``<path>/images_cache``.
        kwargs: extra loader arguments, e.g. ``{split: test}`` for MathVision.
    """

    name: str
    path: str
    loader: str | None = None
    limit: int | None = None
    cache_dir: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


class _Tally(torchmetrics.Metric):
    """A ``[groups, len(STATS)]`` matrix of sums; ``compute()`` sums it over ranks in one collective."""

    full_state_update = False

    def __init__(self, n_groups: int):
        super().__init__()
        # float64: counts stay exact integers and multilabel fractions lose nothing.
        self.add_state("counts", torch.zeros(n_groups, len(STATS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, counts: torch.Tensor) -> None:
        self.counts += counts.to(self.counts)

    def compute(self) -> torch.Tensor:
        return self.counts


def group_keys(records: list[Record]) -> list[tuple[str, str]]:
    """``("all", "")``, then every category, then every answer type, sorted: the same list on every rank."""
    cats = sorted({r.category or NO_CATEGORY for r in records})
    types = sorted({r.answer_type for r in records})
    return [("all", "")] + [("category", c) for c in cats] + [("answer_type", t) for t in types]


class BenchmarkCallback(L.Callback):
    """Evaluate the policy on benchmarks and write ``benchmark_report.{json,md,png}`` and the predictions.

    Logs ``bench/<name>/accuracy``, ``bench/<name>/format_valid`` and, with ``pass_k > 1``,
    ``bench/<name>/pass@<k>``.

    Args:
        benchmarks: the benchmarks to evaluate.
        every_n_steps: during fit, evaluate after every this many optimizer steps (``null``: never).
        every_n_epochs: during fit, evaluate at the end of every this many training epochs (``null``: never).
        at_fit_end: evaluate once when training ends.
        on_validate: evaluate under ``trainer.validate`` / ``vold-pl validate``.
        max_new_tokens: completion length cap.
        do_sample: sample instead of greedy decoding (needed for ``pass_k > 1``).
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus sampling mass (with ``do_sample``).
        pass_k: samples per problem; reports pass@k (any of k fully correct) next to mean accuracy.
        batch_size: problems per generation batch (per rank).
        instruction: the output-format instruction appended to each problem (as in training).
        prompt_style: ``training`` (the question as the benchmark prints it, then ``instruction``) or ``official``
            (then the benchmark's own answer instruction instead, e.g. MMMU-Pro's "Answer: $LETTER" line; other
            benchmarks, e.g. ``synthetic``, keep ``instruction``).
        on_bad_record: ``skip`` (rows that cannot be used are left out and listed in the report with their id and
            reason) or ``error`` (the first such row stops the run).
        view: ``student`` (images + problem) or ``teacher`` (text view, for a text-only model).
        out_dir: folder of the reports; default the trainer's log directory.
        write_predictions: write ``benchmark_predictions.jsonl`` (every completion, for error analysis).
        engine: generation engine with ``generate(model, batch, num_samples, sampling)``; default the module's
            ``rollout_engine`` or an ``HFGenerateEngine``, and always ``HFGenerateEngine`` on a model sharded with
            FSDP2 (its ``generate`` keeps finished ranks in step). An engine given here is used as it is, sharded
            or not: under FSDP2 it must run the same forwards on every rank. Tests pass a scripted one.
    """

    def __init__(self, benchmarks: list[BenchmarkSpec], every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, at_fit_end: bool = True, on_validate: bool = True,
                 max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 pass_k: int = 1, batch_size: int = 8, instruction: str = DEFAULT_INSTRUCTION,
                 prompt_style: Literal["training", "official"] = "training",
                 on_bad_record: Literal["skip", "error"] = "skip",
                 view: Literal["student", "teacher"] = "student", out_dir: str | None = None,
                 write_predictions: bool = True, engine: Any = None):
        names = [b.name for b in benchmarks]
        if len(set(names)) != len(names):
            raise UserError(f"benchmark names must be unique, got {names}")
        if pass_k < 1 or batch_size < 1 or max_new_tokens < 1:
            raise UserError(f"BenchmarkCallback: pass_k={pass_k}, batch_size={batch_size}, "
                            f"max_new_tokens={max_new_tokens}: each must be >= 1; set the one below 1 to a positive "
                            "value.")
        if prompt_style not in PROMPT_STYLES:
            raise UserError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        if on_bad_record not in ON_BAD_RECORD:
            raise UserError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
        if pass_k > 1 and not do_sample:
            raise UserError(f"pass_k={pass_k} needs do_sample: true (greedy decoding gives identical samples)")
        self.benchmarks, self.every_n_steps, self.every_n_epochs = benchmarks, every_n_steps, every_n_epochs
        self.at_fit_end, self.on_validate, self.pass_k, self.batch_size = at_fit_end, on_validate, pass_k, batch_size
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       do_sample=do_sample)
        self.instruction, self.view, self.out_dir = instruction, view, out_dir
        self.prompt_style, self.on_bad_record = prompt_style, on_bad_record
        self.write_predictions, self.engine = write_predictions, engine
        self._records: dict[str, list[Record]] = {}
        self._datasets: dict[str, Any] = {}
        self._last_step: int | None = None
        self._ckpt_step: int | None = None
        self._validated = False
        self.last_report: dict | None = None

    # -- when to run ------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Under `validate --ckpt_path`, Lightning restores weights but not the loop counters: keep the step.
        self._ckpt_step = checkpoint.get("global_step")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.on_validate and trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._validated = True
            metrics = self.evaluate(trainer, pl_module)
            for k, v in metrics.items():  # identical on every rank already; sync only keeps Lightning quiet
                pl_module.log(k, v, sync_dist=True)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._validated = False
        if (stage == "validate" and self.on_validate) or (stage == "fit" and (
                self.every_n_steps or self.every_n_epochs or self.at_fit_end)):
            for spec in self.benchmarks:  # a chat template that drops the prompts fails now, not after training
                _, dataset = self._load(spec)
                check_prompts_render(pl_module.processor, dataset, self.view, self.instruction_for(spec),
                                     where=f"benchmark {spec.name!r} ({spec.path})",
                                     view_key="trainer.callbacks.init_args.view")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "validate" and self.on_validate and not self._validated:
            rank_zero_warn("BenchmarkCallback did not run: `validate` ran no validation batch. It evaluates at the "
                           "end of the validation epoch, so give the data module a `val` source.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._evaluate_in_fit(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if trainer.global_step != self._last_step:
                self._evaluate_in_fit(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step:
            self._evaluate_in_fit(trainer, pl_module)

    def _evaluate_in_fit(self, trainer, pl_module) -> None:
        # pl_module.log is not allowed in every hook (and is thinned by log_every_n_steps): log directly.
        metrics = self.evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """Evaluate every benchmark; returns the metrics to log. Every rank must call it."""
        out_dir = self.out_dir or trainer.log_dir or "."  # log_dir is a collective: call it on every rank
        fitting = trainer.state.fn == TrainerFn.FITTING
        step = trainer.global_step if fitting or self._ckpt_step is None else self._ckpt_step
        self._last_step = trainer.global_step
        model = pl_module.model
        sharded = generation_needs_sync(model)  # FSDP2 across ranks: every forward is a collective
        engine = self.engine or (None if sharded else getattr(pl_module, "rollout_engine", None))
        engine = engine or HFGenerateEngine(pl_module.tokenizer)
        was_training = model.training
        model.eval()
        summaries, predictions = {}, []
        try:
            with torch.no_grad():
                for b, spec in enumerate(self.benchmarks):
                    summaries[spec.name], preds = self._evaluate_one(b, spec, trainer, pl_module, engine, sharded)
                    predictions += preds
        finally:
            model.train(was_training)
        predictions = _gather_objects(predictions) if self.write_predictions else None
        report = {"model": _model_name(pl_module), "checkpoint": trainer.ckpt_path, "step": step,
                  "epoch": trainer.current_epoch, "stage": trainer.state.fn.value if trainer.state.fn else None,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "decoding": {"max_new_tokens": self.sampling.max_new_tokens, "do_sample": self.sampling.do_sample,
                               "temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                               "pass_k": self.pass_k, "instruction": self.instruction,
                               "prompt_style": self.prompt_style},
                  "benchmarks": summaries}
        if trainer.is_global_zero:
            if predictions is not None:  # the same order whatever the number of ranks
                predictions.sort(key=lambda p: (p.pop("_order"), p["sample"]))
            paths = write_reports(out_dir, report, predictions)
            print(f"[vold-pl] benchmark report: {paths['md']}")
        self.last_report = report
        metrics = {}
        for name, s in summaries.items():
            metrics[f"bench/{name}/accuracy"] = s["accuracy"]
            metrics[f"bench/{name}/official_accuracy"] = s["official_accuracy"]
            metrics[f"bench/{name}/format_valid"] = s["format_valid"]
            if self.pass_k > 1:
                metrics[f"bench/{name}/pass@{self.pass_k}"] = s[f"pass@{self.pass_k}"]
        return metrics

    def _load(self, spec: BenchmarkSpec):
        if spec.name not in self._records:
            from vold_pl.data.sources import to_dataset

            records = load_benchmark(spec.loader or spec.name, spec.path, limit=spec.limit, cache_dir=spec.cache_dir,
                                     on_bad_record=self.on_bad_record, **spec.kwargs)
            if not records:
                raise UserError(f"benchmark {spec.name!r} at {spec.path} has no usable records "
                                f"({len(records.skipped)} skipped; first: {records.skipped[:1]})")
            self._records[spec.name], self._datasets[spec.name] = records, to_dataset(list(records))
        return self._records[spec.name], self._datasets[spec.name]

    def _evaluate_one(self, bench_idx: int, spec: BenchmarkSpec, trainer, pl_module, engine,
                      sharded: bool) -> tuple[dict, list[dict]]:
        records, dataset = self._load(spec)
        rank, world = trainer.global_rank, trainer.world_size
        groups = group_keys(records)
        index = {g: i for i, g in enumerate(groups)}
        mine = list(range(rank, len(records), world))
        n_real, model = len(mine), pl_module.model
        if sharded:
            # Sharded weights: every forward is a collective, so every rank runs the same number of batches
            # (padded with repeats that are not scored); HF generate keeps stepping until all ranks finish.
            mine += [mine[0] if mine else 0] * (math.ceil(len(records) / world) - n_real)
        instruction = self.instruction_for(spec)
        collate = PromptCollator(pl_module.processor, self.view, instruction)
        loader = torch.utils.data.DataLoader(dataset.select(mine), batch_size=self.batch_size, collate_fn=collate)
        counts = torch.zeros(len(groups), len(STATS), dtype=torch.float64)
        preds: list[dict] = []
        k = self.pass_k
        for b, batch in enumerate(_progress(loader, trainer, f"bench {spec.name}")):
            batch = {key: v.to(pl_module.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            rollout = engine.generate(model, batch, k, self.sampling)
            lengths = rollout.completion_mask.sum(-1).tolist()
            for i, meta in enumerate(batch["records"]):
                if b * self.batch_size + i >= n_real:
                    break  # padding
                pos = mine[b * self.batch_size + i]
                rec = records[pos]
                assert rec.id == meta["id"], "loader order must follow the slice"
                row = torch.zeros(len(STATS), dtype=torch.float64)
                prompt = prompt_text(rec.to_json(), instruction, self.view)
                for g in range(k):
                    text = rollout.texts[i * k + g]
                    answer = extract_answer(text)
                    score = float(score_answer(answer, rec))
                    official, official_answer = official_score(text, rec)
                    fmt = is_well_formatted(text)
                    row += torch.tensor([0, 1, score, 0, float(fmt), lengths[i * k + g], official],
                                        dtype=torch.float64)
                    preds.append({"_order": (bench_idx, pos), "benchmark": spec.name, "id": rec.id, "sample": g,
                                  "prompt": prompt, "completion": text, "extracted": answer, "gold": rec.answer,
                                  "choices": rec.choices, "answer_type": rec.answer_type, "category": rec.category,
                                  "score": score, "correct": score >= 1.0, "official_extracted": official_answer,
                                  "official_score": official, "format_valid": fmt})
                row[STATS.index("records")] = 1
                row[STATS.index("solved")] = float(any(p["correct"] for p in preds[-k:]))
                for g in (("all", ""), ("category", rec.category or NO_CATEGORY), ("answer_type", rec.answer_type)):
                    counts[index[g]] += row
        tally = _Tally(len(groups)).to(pl_module.device)
        tally.update(counts)
        total = tally.compute().cpu().tolist()  # the one collective: a sum over ranks
        summary = summarize(groups, total, k)
        summary.update(published=records.published, scored=len(records), skipped=len(records.skipped),
                       skipped_records=records.skipped)
        return summary, preds

    def instruction_for(self, spec: BenchmarkSpec) -> str:
        """The instruction appended to ``spec``'s questions under this callback's ``prompt_style``."""
        return benchmark_instruction(spec.loader or spec.name, self.prompt_style, self.instruction)


def prompt_text(row: dict, instruction: str, view: str = "student") -> str:
    """The text of the chat for ``row`` (what the model reads besides the images), from
    :func:`vold_pl.prompts.student_messages` (or, ``view='teacher'``, :func:`vold_pl.prompts.teacher_prompt`)
    whatever form its content takes (a string or typed parts)."""
    return turn_text(prompt_messages(row, view, instruction))


def _progress(loader, trainer, desc: str):
    """Iterate ``loader`` with a progress bar on rank 0 when the trainer shows bars.

    Under Lightning's ``RichProgressBar`` (the CLI's default when rich is installed) the bar is a task of its
    live display: a second live display would garble the terminal. Otherwise tqdm, like Lightning's own bar.
    """
    bar = trainer.progress_bar_callback
    if not trainer.is_global_zero or bar is None or not getattr(bar, "is_enabled", True):
        yield from loader
        return
    live = getattr(bar, "progress", None)
    if live is not None and live.live.is_started:  # rich's own flag: Lightning stops the display between stages
        task = live.add_task(desc, total=len(loader))
        try:
            for item in loader:
                yield item
                live.update(task, advance=1)
                live.refresh()
        finally:
            live.remove_task(task)
        return
    from tqdm.auto import tqdm

    yield from tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def _gather_objects(objs: list) -> list:
    """Everyone's list, concatenated (one ``all_gather_object``); the list itself when not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return objs
    world = torch.distributed.get_world_size()
    if world == 1:
        return objs
    out: list[list | None] = [None] * world
    torch.distributed.all_gather_object(out, objs)
    return [o for part in out for o in part or []]


def _model_name(pl_module) -> str | None:
    spec = getattr(pl_module, "model_spec", None)
    if spec is not None and getattr(spec, "name_or_path", None):
        return spec.name_or_path
    cfg = getattr(getattr(pl_module, "model", None), "config", None)
    return getattr(cfg, "name_or_path", None) or type(getattr(pl_module, "model", pl_module)).__name__


__all__ = ["BenchmarkCallback", "BenchmarkSpec", "group_keys", "prompt_text"]
