"""``ReasoningDataModule``: several reasoning sources mixed by weight, collated for SFT or for rollouts."""

from __future__ import annotations

import bisect
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader

from vold_pl.data.collate import SKIPPED_KEY, BadRow, PromptCollator, SFTCollator, max_token_chars
from vold_pl.data.samplers import EvenShardSampler, uses_distributed_sampler
from vold_pl.data.sampling import MixedSampler, ResumableDataLoader
from vold_pl.data.schema import RecordError, image_problem
from vold_pl.data.sources import DataSource, load_source
from vold_pl.errors import UserError
from vold_pl.prompts import DEFAULT_INSTRUCTION, check_rendered_prompt, render_prompt, target_text, teacher_text

__all__ = ["CheckedConcatDataset", "MixedSampler", "ReasoningDataModule", "ResumableDataLoader",
           "check_prompts_render", "prompt_lengths"]
# Traces sampled (seeded) to compare their lengths with max_length / max_new_tokens at setup.
LENGTH_SAMPLE = 256
# Rows searched at setup for one prompt of each form (text-only, with images) to render with the chat template.
RENDER_PROBE_ROWS = 1000


class CheckedConcatDataset(ConcatDataset):
    """The sources of a split, concatenated; a row that fails to load when drawn (an image that no longer decodes,
    a file removed since setup) is named by file, line and field instead of crashing the batch.

    ``on_bad_record='error'`` raises :class:`~vold_pl.data.schema.RecordError`; ``'skip'`` yields a
    :class:`~vold_pl.data.collate.BadRow` carrying the message and the next readable row of the same source
    (the collator drops the row or puts the substitute in its place; the data module counts and lists it).
    """

    def __init__(self, datasets, on_bad_record: str = "error"):
        super().__init__(datasets)
        self.on_bad_record = on_bad_record
        self._bad: dict[int, str] = {}  # global index -> message, per process (workers keep their own)

    def __getitem__(self, idx: int):
        if idx < 0:
            idx += len(self)
        if idx in self._bad:
            return self._bad_row(idx)
        try:
            return super().__getitem__(idx)
        except Exception as e:  # noqa: BLE001 - PIL and datasets raise many kinds for a damaged file
            self._bad[idx] = self._describe(idx, e)
            return self._bad_row(idx)

    def _locate(self, idx: int) -> tuple[int, int]:
        part = bisect.bisect_right(self.cumulative_sizes, idx)
        return part, idx - (self.cumulative_sizes[part - 1] if part else 0)

    def _describe(self, idx: int, e: Exception) -> str:
        part, local = self._locate(idx)
        row = self.datasets[part].select_columns(["id", "origin", "image_paths"])[local]
        paths = row.get("image_paths") or []
        why = next((p for p in (image_problem(path) for path in paths) if p), None)
        problem = (f"field 'images': {why}" if why else
                   f"the row cannot be loaded ({type(e).__name__}: {str(e)[:200]})")
        return (f"{row.get('origin') or 'record'} (id={row.get('id')!r}): {problem}, found when the batch was "
                "drawn. Replace or remove the file, or set data.on_bad_record: skip to skip the record.")

    def _bad_row(self, idx: int):
        if self.on_bad_record == "error":
            raise RecordError(self._bad[idx])
        part, local = self._locate(idx)
        start = self.cumulative_sizes[part - 1] if part else 0
        n = len(self.datasets[part])
        for step in range(1, n):  # the next readable row of the same source
            j = start + (local + step) % n
            if j in self._bad:
                continue
            try:
                sub = super().__getitem__(j)
            except Exception as e:  # noqa: BLE001
                self._bad[j] = self._describe(j, e)
                continue
            return BadRow(self._bad[idx], sub)
        raise RecordError(f"{self._bad[idx]} No other record of this source can be loaded either.")


@runtime_checkable
class DataConsumer(Protocol):
    """What :class:`ReasoningDataModule` reads from the LightningModule it feeds (vold-pl's ``PolicyModule``s
    provide it; with another module, set ``data.processor`` and ``data.collate``).

    Attributes:
        processor: the processor (or tokenizer) the module's model reads; prompts are encoded with it.
        collate_mode: ``sft`` (prompt + target, with labels) or ``prompt`` (prompts only, for RL and sampling),
            used when ``data.collate: auto``.
        completion_budget: the cap on sampled completion tokens in training, which the training traces are
            checked against (``None``: the module trains on given targets).
        teacher_tokenizer: the teacher's tokenizer (OPD), whose chat template must render the teacher view;
            ``None`` without a teacher.
    """

    processor: Any
    collate_mode: str
    teacher_tokenizer: Any

    @property
    def completion_budget(self) -> int | None: ...


class ReasoningDataModule(L.LightningDataModule):
    """Mixed text-only and image-text reasoning data for SFT, RL rollouts and evaluation.

    Args:
        train: training sources, mixed by their ``weight``.
        val: validation sources (concatenated, in order).
        test: test sources; defaults to ``val``.
        predict: sources for ``vold-pl predict`` (trace writing); defaults to ``train``.
        batch_size: rows per batch (per device). For RL this is the number of prompts; each gets G samples.
        epoch_size: rows per training epoch; default the sum of the training sources' sizes (under a curriculum
            stage, of the records the stage selects: one pass over them).
        collate: ``sft`` (prompt + target, masked labels), ``prompt`` (prompt only, for generation) or
            ``auto`` (ask the LightningModule's ``collate_mode``).
        view: ``student`` (images + problem) or ``teacher`` (the text view only, for a text-only model).
        processor: model folder or hub id whose processor/tokenizer collates; default the LightningModule's.
        instruction: appended to every prompt; says how to format the answer.
        max_length: token limit of a row. A prompt (images included) above it is a bad record, found at setup
            (an SFT prompt must also leave room for its target); SFT rows whose target does not fit lose the end
            of their target (counted per batch).
        on_bad_record: ``error`` stops at the first malformed record naming file, line and field;
            ``skip`` skips it, counts it and lists it in ``<log_dir>/skipped_records.txt``. Records that fail only
            when drawn (an image damaged after setup, or pixels not decoded at setup under ``image_check:
            header``) are skipped there too: in training the next readable record of the source takes the
            place (batches keep their size), in evaluation the row is left out.
        image_check: how images are checked at setup: ``decode`` (every pixel decoded: damaged files are found
            before training) or ``header`` (size and chunks only; faster for large image sets, pixel errors are
            met when the batch is drawn).
        num_workers: DataLoader worker processes.
        seed: seed of the mixing order (the order is a pure function of seed and epoch).
    """

    def __init__(
        self,
        train: list[DataSource] | None = None,
        val: list[DataSource] | None = None,
        test: list[DataSource] | None = None,
        predict: list[DataSource] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        epoch_size: int | None = None,
        collate: Literal["auto", "sft", "prompt"] = "auto",
        view: Literal["student", "teacher"] = "student",
        processor: str | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        max_length: int = 1024,
        on_bad_record: Literal["error", "skip"] = "error",
        image_check: Literal["decode", "header"] = "decode",
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.train_sources, self.val_sources = train or [], val or []
        self.test_sources, self.predict_sources = test or self.val_sources, predict or self.train_sources
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.epoch_size, self.collate, self.view = epoch_size, collate, view
        self.processor_name, self.instruction, self.max_length = processor, instruction, max_length
        self.on_bad_record, self.num_workers, self.seed = on_bad_record, num_workers, seed
        self.image_check = image_check
        self.datasets: dict[str, CheckedConcatDataset] = {}
        self.skipped: list[str] = []
        self._sampler: MixedSampler | None = None
        self._train_loader: ResumableDataLoader | None = None
        # Curriculum (``vold_pl.callbacks.curriculum``): the stage index and its record filter (``name``,
        # ``answer_types``, ``difficulties``). Saved with every checkpoint and restored before the train loader is
        # iterated; the loader reads the filter whenever an epoch's iterator is created, see ``set_curriculum_stage``.
        self.curriculum_stage: int | None = None
        self.curriculum_state: dict = {}
        self._pools_cache: dict[str, list[list[int]]] = {}
        self._rendering_checked: set[tuple] = set()  # (source, processor, view) whose prompts rendered correctly

    # -- setup -------------------------------------------------------------------------------------------
    def _processor(self):
        if self.processor_name is not None:
            from vold_pl.models.factory import ModelSpec, load_processor

            return load_processor(ModelSpec(self.processor_name))
        module = self._consumer()
        if module is None or module.processor is None:
            raise UserError("ReasoningDataModule needs a processor: set data.processor to a model folder or use it "
                             "with a vold-pl LightningModule that has one.")
        return module.processor

    def _trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def _consumer(self) -> DataConsumer | None:
        """The LightningModule this data module feeds, when it keeps the :class:`DataConsumer` contract."""
        module = self.trainer.lightning_module if self._trainer_attached() else None
        return module if isinstance(module, DataConsumer) else None

    def _load(self, sources: list[DataSource], split: str) -> CheckedConcatDataset:
        processor = self._processor_or_none()
        mode = "prompt" if split == "predict" else self._mode()
        parts = []
        for src in sources:
            ds, skipped = load_source(src, self.on_bad_record, check_images=self.image_check)
            self.skipped += skipped
            if processor is not None:
                self._check_rendering(ds, src, processor)
                ds = self._check_prompt_lengths(ds, src, processor, mode)
                if split == "train":
                    self._check_trace_lengths(ds, src, processor, mode)
            parts.append(ds)
        return CheckedConcatDataset(parts, self.on_bad_record)

    def _check_rendering(self, ds, src: DataSource, processor) -> None:
        """Render prompts of ``src`` with the model's own chat template, in the data module's view, and with the
        teacher's (OPD: the LightningModule's ``teacher_tokenizer``) in the teacher view; a template that drops or
        garbles them is a :class:`UserError` before any step (:func:`check_prompts_render`). Once per source."""
        module = self._consumer()
        renderers = [(processor, self.view)]
        teacher_tok = module.teacher_tokenizer if module is not None else None
        if teacher_tok is not None:
            renderers.append((teacher_tok, "teacher"))
        for proc, view in renderers:
            key = (src.path, id(proc), view)
            if key not in self._rendering_checked:
                check_prompts_render(proc, ds, view, self.instruction, where=f"data source {src.path}")
                self._rendering_checked.add(key)

    def _processor_or_none(self):
        try:
            return self._processor()
        except ValueError:
            return None  # no processor yet (no trainer, no data.processor): lengths are checked when collating

    def _mode(self) -> str:
        mode = self.collate
        if mode == "auto":
            module = self._consumer()
            mode = module.collate_mode if module is not None else "sft"
        return mode

    def _check_prompt_lengths(self, ds, src: DataSource, processor, mode: str):
        """Refuse (or, with ``on_bad_record: skip``, drop and list) rows whose prompt exceeds ``max_length``.

        Text longer than ``max_length`` tokens could ever hold is refused by its character count, before any
        tokenising; the others are tokenised as the collators do (images expanded).
        """
        limit = self.max_length - 1 if mode == "sft" else self.max_length  # SFT needs room for a target
        tok = getattr(processor, "tokenizer", processor)
        max_chars = (limit + 1) * max_token_chars(tok)
        rows = ds.select_columns(["id", "origin", "problem", "text_view"])
        need = ("at most max_length - 1 tokens (room for the target)" if mode == "sft"
                else "at most max_length tokens")
        fix = ("Raise data.max_length, shorten the problem or downscale its images, or set data.on_bad_record: skip "
               "to skip it.")
        msgs: dict[int, str] = {}
        for i, r in enumerate(rows):
            for name in ("problem", "text_view"):
                n = len(r[name] or "")
                if n > max_chars:
                    msgs[i] = (f"{r['origin'] or src.path} (id={r['id']!r}): field '{name}': {n} characters, more "
                               f"than data.max_length={self.max_length} tokens can hold (one token is at most "
                               f"{max_token_chars(tok)} characters); a {mode} prompt must be {need}. {fix}")
                    break
        rest = [i for i in range(len(ds)) if i not in msgs]
        lengths = prompt_lengths(processor, ds.select(rest), self.view, self.instruction) if rest else []
        for i, n in zip(rest, lengths):
            if n > limit:
                r = rows[i]
                msgs[i] = (f"{r['origin'] or src.path} (id={r['id']!r}): the prompt is {n} tokens (images included), "
                           f"above data.max_length={self.max_length}; a {mode} prompt must be {need}. {fix}")
        if not msgs:
            return ds
        bad = sorted(msgs)
        if self.on_bad_record == "error":
            more = f" ({len(bad) - 1} more record(s) of this source are too long as well)" if len(bad) > 1 else ""
            raise RecordError(msgs[bad[0]] + more)
        self.skipped += [msgs[i] for i in bad]
        keep = [i for i in range(len(ds)) if i not in msgs]
        if not keep:
            raise UserError(f"data source {src.path}: every prompt is longer than data.max_length={self.max_length}.")
        return ds.select(keep)

    def _check_trace_lengths(self, ds, src: DataSource, processor, mode: str) -> None:
        """Warn when most traces would be clipped: SFT rows longer than ``max_length`` lose the end of their
        target, RL completions stop at the module's ``max_new_tokens``. Measured on a seeded sample of rows."""
        limit_name, limit = "data.max_length", self.max_length
        if mode != "sft":
            module = self._consumer()
            budget = module.completion_budget if module is not None else None
            if budget is None:
                return
            limit_name, limit = "model.sampling.max_new_tokens", int(budget)
        with_trace = [i for i, r in enumerate(ds.select_columns(["trace"])) if r["trace"]]
        if not with_trace:
            return
        g = torch.Generator().manual_seed(self.seed)
        sample = ds.select([with_trace[i] for i in torch.randperm(len(with_trace), generator=g)[:LENGTH_SAMPLE]])
        tok = getattr(processor, "tokenizer", processor)
        cap = (limit + 1) * max_token_chars(tok)  # enough text to tell "longer than limit"; no more is tokenised
        rows = sample.select_columns(["trace", "answer"])
        targets = [len(tok(target_text(r)[:cap], add_special_tokens=False)["input_ids"]) + 1 for r in rows]  # + eos
        if mode == "sft":
            prompts = prompt_lengths(processor, sample, self.view, self.instruction)
            lengths = [t + p for t, p in zip(targets, prompts)]
        else:
            lengths = targets
        clipped = sum(n > limit for n in lengths)
        if clipped * 2 > len(lengths):
            q = sorted(lengths)
            p90 = q[min(len(q) - 1, int(0.9 * len(q)))]
            clip_effect = ("SFT targets lose their end" if mode == "sft"
                           else "completions are cut before the answer the traces show")
            print(f"[vold-pl] warning: data source {src.path}: {clipped} of {len(lengths)} sampled traces are longer "
                  f"than {limit_name}={limit} tokens (median {int(statistics.median(q))}, 90th percentile {p90}, "
                  f"longest {q[-1]}), so most {clip_effect}. "
                  f"Raise {limit_name} to about {p90}, or use shorter traces.", file=sys.stderr)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for split in wanted.get(stage, ["train", "val", "test", "predict"]):
            sources = getattr(self, f"{split}_sources")
            if sources and split not in self.datasets:
                self.datasets[split] = self._load(sources, split)
        if self.skipped:
            self._write_skipped()

    def _skipped_path(self) -> Path:
        log_dir = self.trainer.log_dir if self._trainer_attached() else None
        return Path(log_dir or ".") / "skipped_records.txt"

    def _write_skipped(self) -> None:
        path = self._skipped_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.skipped) + "\n")
        print(f"[vold-pl] skipped {len(self.skipped)} malformed record(s); listed in {path}")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count and list the records skipped while this batch was drawn; the model never sees the list."""
        if isinstance(batch, dict) and SKIPPED_KEY in batch:
            for msg in batch.pop(SKIPPED_KEY):
                if msg in self.skipped:
                    continue  # met again (another epoch, another worker)
                self.skipped.append(msg)
                path = self._skipped_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as fh:
                    fh.write(msg + "\n")
                print(f"[vold-pl] skipped a record that failed to load ({len(self.skipped)} skipped in all; listed in "
                      f"{path}): {msg}", file=sys.stderr)
        return batch

    def _collator(self, mode: str | None = None, train: bool = False):
        mode = mode if mode not in (None, "auto") else self._mode()
        processor = self._processor()
        if mode == "sft":
            return SFTCollator(processor, self.view, self.instruction, self.max_length, keep_batch_size=train)
        return PromptCollator(processor, self.view, self.instruction, keep_batch_size=train)

    # -- loaders -----------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        rank, world = 0, 1
        if self._trainer_attached():
            rank, world = self.trainer.global_rank, self.trainer.world_size
            if world > 1 and uses_distributed_sampler(self.trainer):
                raise UserError("ReasoningDataModule splits its mixed draws across ranks itself (and resumes from "
                                 "them); Lightning's DistributedSampler on top would split them again. Set "
                                 "Trainer(use_distributed_sampler=False) (vold-pl fit does by default).")
        sizes = [len(d) for d in ds.datasets]
        self._sampler = MixedSampler(sizes, [s.weight for s in self.train_sources], self._per_rank(sum(sizes), world),
                                     self.seed, rank, world)
        # Its own generator: creating an iterator draws a worker base seed, which must not consume (and so shift)
        # the global RNG that rollouts sample from.
        self._train_loader = ResumableDataLoader(
            ds, batch_size=self.batch_size, sampler=self._sampler, collate_fn=self._collator(train=True),
            num_workers=self.num_workers, drop_last=True, generator=torch.Generator().manual_seed(self.seed),
            stage_filter=self._curriculum_filter, plan=self._draw_plan)
        self._train_loader.prepare_epoch()  # the current stage's records: the length Lightning reads now
        return self._train_loader

    @property
    def train_epoch(self) -> int:
        """Index of the epoch the train loader draws (Lightning sets it on the sampler at every epoch start)."""
        return self._sampler.epoch if self._sampler is not None else 0

    def _per_rank(self, n_records: int, world: int) -> int:
        # At least one batch per rank, so a stage with fewer records than a batch still trains (with repeats).
        return max(self.batch_size, math.ceil((self.epoch_size or n_records) / world))

    # -- curriculum --------------------------------------------------------------------------------------------
    def _curriculum_filter(self) -> dict | None:
        """The current stage's record filter (plain data), or ``None`` without a curriculum."""
        if self.curriculum_stage is None:
            return None
        s = self.curriculum_state
        return {"name": s.get("name"), "answer_types": s.get("answer_types"), "difficulties": s.get("difficulties")}

    def curriculum_pools(self, stage_filter: dict | Any | None) -> list[list[int]] | None:
        """Eligible local indices of each training source under a stage filter (``None``: no filter);
        :class:`~vold_pl.data.curriculum.EmptyStageError` when the stage selects nothing. Cached per filter."""
        get = (lambda k: stage_filter.get(k)) if isinstance(stage_filter, dict) else (
            lambda k: getattr(stage_filter, k, None))
        if stage_filter is None or (get("answer_types") is None and get("difficulties") is None):
            return None
        key = json.dumps([get("answer_types"), get("difficulties")])
        if key not in self._pools_cache:
            from vold_pl.data.curriculum import stage_pools

            if "train" not in self.datasets:
                raise RuntimeError("curriculum_pools needs the training data loaded (setup('fit') first).")
            parts = self.datasets["train"].datasets
            self._pools_cache[key] = stage_pools([(src.label, d) for src, d in zip(self.train_sources, parts)],
                                                 stage_filter)
        return self._pools_cache[key]

    def _draw_plan(self, stage_filter: dict | None) -> tuple[list[list[int]] | None, int]:
        """(pools, draws per rank) of an epoch under ``stage_filter``: the epoch is ``epoch_size`` draws, or one
        pass over the eligible records."""
        pools = self.curriculum_pools(stage_filter)
        n = sum(len(p) for p in pools) if pools is not None else sum(self._sampler.sizes)
        return pools, self._per_rank(n, self._sampler.world_size)

    def _eval_loader(self, split: str) -> DataLoader | list:
        if split not in self.datasets:
            return []
        # Predicting always generates, so it always needs bare prompts.
        mode = "prompt" if split == "predict" else None
        ds, sampler = self.datasets[split], None
        if self._trainer_attached() and self.trainer.world_size > 1 and not uses_distributed_sampler(self.trainer):
            # Each rank evaluates / generates its own share, evened out with repeats of its own rows (never
            # scored twice by TraceWriter): equal batch counts, so no rank waits in a collective for another.
            sampler = EvenShardSampler(len(ds), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False, sampler=sampler,
                          collate_fn=self._collator(mode), num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("predict")

    # -- resume ------------------------------------------------------------------------------------------
    # The position inside the epoch is the train loader's own state (Lightning saves it with the loops); the data
    # module keeps what identifies the mix, so a resume on different data is called out, and the curriculum.
    def state_dict(self) -> dict:
        train = self.datasets.get("train")
        return {"seed": self.seed, "skipped": len(self.skipped),
                "train_sizes": [len(d) for d in train.datasets] if train is not None else None,
                "train_sources": [s.path for s in self.train_sources],
                "curriculum_stage": self.curriculum_stage, "curriculum_state": self.curriculum_state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            print(f"[vold-pl] data seed changed on resume ({state['seed']} -> {self.seed}): the mix order differs.")
        train = self.datasets.get("train")
        sizes = [len(d) for d in train.datasets] if train is not None else None
        saved = state.get("train_sizes")
        if saved is not None and sizes is not None and saved != sizes:
            print(f"[vold-pl] the training sources changed since the checkpoint (sizes {saved} -> {sizes}, sources "
                  f"{state.get('train_sources')} -> {[s.path for s in self.train_sources]}): the resumed run "
                  "continues on a different mix order, not exactly where it stopped.")
        self.curriculum_stage = state.get("curriculum_stage")
        self.curriculum_state = dict(state.get("curriculum_state") or {})

    def set_curriculum_stage(self, stage: int | None, **state) -> None:
        """Hook for a curriculum: record the stage and its state (plain values: they travel with checkpoints).

        ``answer_types`` / ``difficulties`` in ``state`` filter the training draws from the next epoch on (the
        running epoch keeps its draws); a filter that selects nothing raises at once when the data is loaded.
        """
        self.curriculum_stage = stage
        self.curriculum_state.update(state)
        if stage is not None and "train" in self.datasets:
            self.curriculum_pools(self._curriculum_filter())


def prompt_lengths(processor, ds, view: str = "student", instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """Token count of every row's prompt as the collators build it, images expanded, without decoding pixels.

    Image sizes come from the file headers; the image processor says how many patches each image becomes.
    """
    from PIL import Image

    tok = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", None)
    merge = getattr(image_processor, "merge_size", 2) or 1
    columns = ds.select_columns([c for c in ("id", "problem", "text_view", "image_paths") if c in ds.column_names])
    rows = list(columns)
    for r in rows:
        r["images"] = r.get("image_paths") or []
    texts = [render_prompt(processor, r, view, instruction) for r in rows]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    out = []
    for r, seq in zip(rows, ids):
        n = len(seq)
        if view != "teacher" and image_processor is not None:
            for path in r["images"]:
                with Image.open(path) as im:
                    w, h = im.size
                patches = image_processor.get_number_of_image_patches(h, w)
                n += patches // (merge * merge) - 1  # the one placeholder token becomes this many
        out.append(n)
    return out


def check_prompts_render(processor, ds, view: str = "student", instruction: str = DEFAULT_INSTRUCTION,
                         where: str = "data", view_key: str = "data.view") -> None:
    """Render prompts of ``ds`` (a data set of the record schema) with the model's own chat template and verify
    them (:func:`vold_pl.prompts.check_rendered_prompt`): in the student view the first text-only row and the
    first row with images among the first :data:`RENDER_PROBE_ROWS` (the two forms a user turn takes), in the
    teacher view the first row the teacher can read. Image paths stand in for the pixels (only their count
    matters). Raises :class:`~vold_pl.errors.UserError` naming the model, the template's behaviour and the fix.
    """
    cols = [c for c in ("id", "problem", "text_view", "image_paths", "choices") if c in ds.column_names]
    rows = ds.select_columns(cols).select(range(min(len(ds), RENDER_PROBE_ROWS)))
    probes: dict[str, dict] = {}
    for r in rows:
        r["images"] = r.get("image_paths") or []
        if view == "teacher":
            kind = "seen" if teacher_text(r) is not None else "stand-in"
        else:
            kind = "images" if r["images"] else "text"
        probes.setdefault(kind, r)
        if len(probes) == 2:
            break
    if view == "teacher" and "seen" in probes:
        probes.pop("stand-in", None)  # the teacher's bare stand-in prompt is masked out of the loss
    for r in probes.values():
        check_rendered_prompt(processor, r, view, instruction, where=where, view_key=view_key)
