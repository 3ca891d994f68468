"""``ReasoningDataModule``: several reasoning sources mixed by weight, collated for SFT or for rollouts."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from vold_pl.data.collate import DEFAULT_INSTRUCTION, PromptCollator, SFTCollator
from vold_pl.data.sources import DataSource, load_source


class MixedSampler(Sampler[int]):
    """Indices into a ``ConcatDataset`` drawn by source weight, reproducible from ``(seed, epoch)``.

    Each source is walked in its own shuffled order (reshuffled when exhausted), so a small source
    repeats only after every item was seen. Under DDP/FSDP each rank takes every ``world_size``-th draw.
    ``start`` skips draws already consumed, which is how a resumed run continues mid-epoch.
    """

    def __init__(self, sizes: list[int], weights: list[float], num_samples: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(sizes) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"source weights must be non-negative with a positive sum, got {weights}")
        self.sizes, self.weights, self.num_samples, self.seed = sizes, weights, num_samples, seed
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, 0, 0
        self.offsets = [0]
        for s in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + s)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draws(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.num_samples * self.world_size
        choice = torch.multinomial(torch.tensor(self.weights, dtype=torch.double), total, replacement=True, generator=g)
        orders = [torch.randperm(n, generator=g).tolist() for n in self.sizes]
        pos = [0] * len(self.sizes)
        out = []
        for s in choice.tolist():
            if pos[s] == self.sizes[s]:
                orders[s], pos[s] = torch.randperm(self.sizes[s], generator=g).tolist(), 0
            out.append(self.offsets[s] + orders[s][pos[s]])
            pos[s] += 1
        return out

    def __iter__(self) -> Iterator[int]:
        mine = self._draws()[self.rank :: self.world_size]
        start, self.start = self.start, 0
        return iter(mine[start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ReasoningDataModule(L.LightningDataModule):
    """Mixed text-only and image-text reasoning data for SFT, RL rollouts and evaluation.

    Args:
        train: training sources, mixed by their ``weight``.
        val: validation sources (concatenated, in order).
        test: test sources; defaults to ``val``.
        predict: sources for ``vold-pl predict`` (trace writing); defaults to ``train``.
        batch_size: rows per batch (per device). For RL this is the number of prompts; each gets G samples.
        epoch_size: rows per training epoch; default the sum of the training sources' sizes.
        collate: ``sft`` (prompt + target, masked labels), ``prompt`` (prompt only, for generation) or
            ``auto`` (ask the LightningModule's ``collate_mode``).
        view: ``student`` (images + problem) or ``teacher`` (the text view only, for a text-only model).
        processor: model folder or hub id whose processor/tokenizer collates; default the LightningModule's.
        instruction: appended to every prompt; says how to format the answer.
        max_length: SFT rows longer than this lose the end of their target (counted per batch).
        on_bad_record: ``error`` stops at the first malformed record naming file, line and field;
            ``skip`` skips it, counts it and lists it in ``<log_dir>/skipped_records.txt``.
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
        self.datasets: dict[str, ConcatDataset] = {}
        self.skipped: list[str] = []
        self._sampler: MixedSampler | None = None
        self._resume_consumed = 0

    # -- setup -------------------------------------------------------------------------------------------
    def _processor(self):
        if self.processor_name is not None:
            from vold_pl.models.factory import ModelSpec, load_processor

            return load_processor(ModelSpec(self.processor_name))
        module = getattr(self.trainer, "lightning_module", None) if self._trainer_attached() else None
        if module is None or getattr(module, "processor", None) is None:
            raise ValueError("ReasoningDataModule needs a processor: set data.processor to a model folder or use it "
                             "with a vold-pl LightningModule that has one.")
        return module.processor

    def _trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def _load(self, sources: list[DataSource]) -> ConcatDataset:
        parts = []
        for src in sources:
            ds, skipped = load_source(src, self.on_bad_record)
            self.skipped += skipped
            parts.append(ds)
        return ConcatDataset(parts)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for split in wanted.get(stage, ["train", "val", "test", "predict"]):
            sources = getattr(self, f"{split}_sources")
            if sources and split not in self.datasets:
                self.datasets[split] = self._load(sources)
        if self.skipped:
            self._write_skipped()

    def _write_skipped(self) -> None:
        log_dir = None
        if self._trainer_attached():
            log_dir = self.trainer.log_dir
        path = Path(log_dir or ".") / "skipped_records.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.skipped) + "\n")
        print(f"[vold-pl] skipped {len(self.skipped)} malformed record(s); listed in {path}")

    def _collator(self, mode: str | None = None):
        mode = mode or self.collate
        if mode == "auto":
            module = self.trainer.lightning_module if self._trainer_attached() else None
            mode = getattr(module, "collate_mode", "sft")
        processor = self._processor()
        if mode == "sft":
            return SFTCollator(processor, self.view, self.instruction, self.max_length)
        return PromptCollator(processor, self.view, self.instruction)

    # -- loaders -----------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        rank, world = 0, 1
        if self._trainer_attached():
            rank, world = self.trainer.global_rank, self.trainer.world_size
        sizes = [len(d) for d in ds.datasets]
        per_rank = math.ceil((self.epoch_size or sum(sizes)) / world)
        self._sampler = MixedSampler(sizes, [s.weight for s in self.train_sources], per_rank, self.seed, rank, world)
        if self._trainer_attached():
            self._sampler.set_epoch(self.trainer.current_epoch)
        if self._resume_consumed:
            self._sampler.start, self._resume_consumed = self._resume_consumed, 0
        return DataLoader(ds, batch_size=self.batch_size, sampler=self._sampler, collate_fn=self._collator(),
                          num_workers=self.num_workers, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader | list:
        if split not in self.datasets:
            return []
        # Predicting always generates, so it always needs bare prompts.
        mode = "prompt" if split == "predict" else None
        return DataLoader(self.datasets[split], batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=self._collator(mode), num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("predict")

    # -- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "skipped": len(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            print(f"[vold-pl] data seed changed on resume ({state['seed']} -> {self.seed}): the mix order differs.")

    def describe(self) -> str:
        parts = {k: len(v) for k, v in self.datasets.items()}
        return json.dumps(parts)
