"""Writing verified reasoning traces as a new data set: ``vold-pl predict`` with :class:`TraceWriter`.

One mechanism serves three recipes: VOLD's cold-start traces (the text teacher answers the text views of
image problems), Curr-ReFT's rejection-sampled SFT set, and each OpenVLThinker round's next SFT set. For
each prompt the model writes k samples; the ones whose answer verifies against the gold (the same
``score_answer`` as the RL reward) are filtered (OpenVLThinker: shortest correct, reflections cut, length
cap) and written in the record schema, next to ``<out>.summary.json``: provenance (model, checkpoint, sampling
settings, filters) and kept / total per source. The summary is written before the JSONL, both atomically, so
an existing JSONL always has its summary (drivers use the JSONL as the "stage done" marker).

Sharded and resumable: with several ranks each one generates its own share of the prompts (the data module
splits the predict set, see ``docs/distributed.md``). Every rank writes what it has done to
``<out>.shards/r<rank>-<n>.jsonl`` every ``shard_every`` prompts (atomically; one line per prompt with its kept
records and counts, a prompt without a kept trace included). A rerun with the same ``out_path`` reads the shards,
leaves the prompts already done out of the predict set before any is generated, and generates only the rest;
the end of the run gathers the new lines once and rank 0 merges them with the earlier shards into the final
JSONL, every prompt id exactly once, then removes the shard folder (``keep_shards`` keeps it).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import lightning as L

from vold_pl.checkpointing import atomic_write_text
from vold_pl.errors import UserError
from vold_pl.progress import format_eta
from vold_pl.rewards.extract import extract_answer
from vold_pl.rewards.functions import score_answer
from vold_pl.rl.rollout_types import SamplingConfig

REFLECTION_PHRASES = ("But wait", "Wait,", "Wait.", "Wait ", "Hmm,", "Let me double-check", "Let me re-check",
                      "Actually,")
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
KEEP_MODES = ("shortest", "drop_longest", "first", "all")


def think_text(completion: str) -> str | None:
    """The reasoning inside ``<think>…</think>``; ``None`` when there is none."""
    m = _THINK_RE.search(completion or "")
    return m.group(1).strip() if m else None


def strip_reflections(trace: str, phrases=REFLECTION_PHRASES) -> str:
    """Drop every sentence that opens with a reflection phrase (OpenVLThinker: 55.0 → 62.5 on MathVista)."""
    sentences = re.split(r"(?<=[.!?])\s+", trace.strip())
    kept = [s for s in sentences if not any(s.startswith(p) for p in phrases)]
    return " ".join(kept).strip()


def select_traces(candidates: list[str], keep: str = "shortest") -> list[str]:
    """Choose among the correct traces of one prompt: ``shortest``, ``drop_longest``, ``first`` or ``all``.

    Ties keep sample order (``shortest`` takes the first of equally short traces).
    """
    if keep not in KEEP_MODES:
        raise UserError(f"keep must be shortest, drop_longest, first or all; got {keep!r}")
    if not candidates:
        return []
    if keep == "shortest":
        return [min(candidates, key=len)]
    if keep == "first":
        return [candidates[0]]
    if keep == "drop_longest":
        return sorted(candidates, key=len)[:-1] if len(candidates) > 1 else list(candidates)
    return list(candidates)


def verified_traces(texts: list[str], record: dict, strip_reflection: bool = True,
                    max_words: int = 0) -> tuple[list[str], Counter]:
    """The traces of the samples whose answer grades correct, after the filters; with counts of what was dropped.

    A sample counts as ``wrong`` without a ``<think>`` block or when its answer does not verify; a correct one
    is dropped as ``empty`` when nothing is left after cutting reflections, as ``too_long`` above ``max_words``.
    """
    out, dropped = [], Counter()
    gold = SimpleNamespace(**record)
    for t in texts:
        trace = think_text(t)
        if trace is None or score_answer(extract_answer(t), gold) < 1.0:
            dropped["wrong"] += 1
            continue
        if strip_reflection:
            trace = strip_reflections(trace)
        if not trace:
            dropped["empty"] += 1
        elif max_words and len(trace.split()) > max_words:
            dropped["too_long"] += 1
        else:
            out.append(trace)
    return out, dropped


def base_source(source: str | None) -> str:
    """A record's original source, without the ``+traces(...)`` tags of earlier sampling rounds."""
    return (source or "unknown").split("+traces", 1)[0]


class TraceWriter(L.pytorch.callbacks.BasePredictionWriter):
    """Samples k completions per prompt in ``vold-pl predict``, keeps verified ones, writes a JSONL data set.

    Args:
        out_path: the JSONL to write (records in the project schema; ``trace`` is the kept reasoning, ``source``
            is ``<original source>+traces(<model>)``); the summary goes to ``<out>.summary.json``, the shards of
            an unfinished run to ``<out>.shards/``.
        num_samples: k samples per prompt.
        max_new_tokens: completion length cap while sampling.
        temperature: sampling temperature (0 → greedy, as OpenVLThinker samples its next SFT set).
        keep: ``shortest`` correct trace, ``drop_longest``, ``first`` or ``all``.
        strip_reflection: cut sentences opening with reflection phrases ("Wait", "But wait", …).
        max_words: drop traces longer than this many words (0 = no cap; OpenVLThinker: 500).
        text_only_path: a JSONL of text-only records to mix in (Curr-ReFT keeps general abilities this way).
        text_only_ratio: fraction of the written set taken from ``text_only_path`` (e.g. 0.3).
        model_name: provenance: the model that wrote the traces (default: the module's model path).
        seed: seed of the text-only mix draw.
        shard_every: each rank writes a shard after every this many of its prompts (a crash loses at most this
            many per rank); a rerun skips the prompts of the shards already written.
        keep_shards: keep ``<out>.shards/`` after the final JSONL is written (default: remove it, so a rerun of
            a finished run samples afresh).
    """

    def __init__(self, out_path: str, num_samples: int = 4, max_new_tokens: int = 128, temperature: float = 1.0,
                 keep: Literal["shortest", "drop_longest", "first", "all"] = "shortest",
                 strip_reflection: bool = True, max_words: int = 0, text_only_path: str | None = None,
                 text_only_ratio: float = 0.0, model_name: str | None = None, seed: int = 0,
                 shard_every: int = 256, keep_shards: bool = False):
        super().__init__(write_interval="batch")
        select_traces([], keep)  # validates ``keep`` now, not after an hour of sampling
        if not 0.0 <= text_only_ratio < 1.0:
            raise UserError(f"text_only_ratio: {text_only_ratio} is outside [0, 1); use the share of text-only "
                            "records to write, e.g. 0.2 (0: none).")
        if shard_every < 1:
            raise UserError(f"shard_every: {shard_every} is below 1; use the number of records per output shard.")
        self.out_path, self.num_samples, self.keep = Path(out_path), num_samples, keep
        self.temperature = temperature
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=max(temperature, 1e-5),
                                       do_sample=temperature > 0)
        self.strip_reflection, self.max_words = strip_reflection, max_words
        self.text_only_path, self.text_only_ratio = text_only_path, text_only_ratio
        self.model_name, self.seed = model_name, seed
        self.shard_every, self.keep_shards = shard_every, keep_shards
        self.shard_dir = self.out_path.with_suffix(".shards")
        self.stats: Counter = Counter()
        self._reset_run()

    def _reset_run(self) -> None:
        self.stats = Counter()  # this rank, this run (progress lines); the summary is rebuilt from every shard
        self._new: list[dict] = []  # this rank's prompts of this run (one entry each, see _entry)
        self._buffer: list[dict] = []  # ... not yet in a shard
        self._earlier: dict[str, dict] = {}  # rank 0: prompt id -> entry, from the shards of earlier runs
        self._done_ids: set[str] = set()  # every rank: ids done by earlier runs
        self._seen: set[str] = set()  # ids this rank has handled in this run (repeats padding a share are skipped)
        self._expected: set[str] | None = None  # the predict set's ids, when the data module is known
        self._seq, self._finished, self._restore = 0, False, None
        self._done, self._total, self._shown = 0, None, 0
        self._t0 = time.perf_counter()

    # -- resume: read the shards of earlier runs, leave their prompts out --------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self._reset_run()
        payload = None
        if trainer.global_rank == 0:
            try:
                self._earlier = self._read_shards(self._fingerprint(trainer, pl_module))
                payload = sorted(self._earlier)
            except UserError as e:
                payload = e  # raised on every rank below, so none waits in a collective for rank 0
        payload = trainer.strategy.broadcast(payload, src=0)
        if isinstance(payload, Exception):
            raise payload
        self._done_ids = set(payload)
        self._skip_done(trainer)
        if self._expected is not None and not (self._expected - self._done_ids):
            # Nothing left: Lightning skips an empty predict loop, so finish (merge and write) here.
            self._finish(trainer, pl_module)

    def _fingerprint(self, trainer, pl_module) -> dict:
        """What must not change between a run and its resume: the model and how its samples are filtered."""
        return {"model": self._model(pl_module), "num_samples": self.num_samples, "keep": self.keep,
                "sampling": {"temperature": self.temperature, "max_new_tokens": self.sampling.max_new_tokens},
                "filters": {"strip_reflection": self.strip_reflection, "max_words": self.max_words},
                "view": getattr(getattr(trainer, "datamodule", None), "view", None)}

    def _read_shards(self, fingerprint: dict) -> dict[str, dict]:
        """Entries of the shards already written (prompt id -> entry); writes ``meta.json`` on a fresh start."""
        meta = self.shard_dir / "meta.json"
        if not meta.is_file():
            if self.shard_dir.is_dir() and any(self.shard_dir.glob("r*.jsonl")):
                raise UserError(f"{self.shard_dir}: shards without meta.json; remove the folder to start afresh.")
            atomic_write_text(meta, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
            return {}
        before = json.loads(meta.read_text())
        for key in fingerprint:
            if before.get(key) != fingerprint[key]:
                raise UserError(
                    f"{meta}: field {key!r}: the unfinished run in {self.shard_dir} used {before.get(key)!r}, this "
                    f"run {fingerprint[key]!r}. Resume with the same settings, or remove {self.shard_dir} (or choose "
                    "another out_path) to start afresh.")
        entries: dict[str, dict] = {}
        for f in sorted(self.shard_dir.glob("r*.jsonl")):  # whole files only: each was renamed into place
            for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    e = json.loads(line)
                    entries.setdefault(e["id"], e)
                except (ValueError, KeyError, TypeError) as err:
                    raise UserError(f"{f}:{lineno}: not a shard line ({err}); remove the file to redo its "
                                    "prompts.") from err
        return entries

    def _skip_done(self, trainer) -> None:
        """Leave the prompts done by earlier runs out of the data module's predict set, before any is generated."""
        dm = getattr(trainer, "datamodule", None)
        ds = (getattr(dm, "datasets", None) or {}).get("predict")
        ids = _dataset_ids(ds)
        if ids is None:  # a loader handed to trainer.predict directly: done ids are skipped after sampling only
            return
        seen: dict[str, int] = {}
        for i, x in enumerate(ids):
            if x in seen:
                raise UserError(f"predict data: id {x!r} appears twice (rows {seen[x]} and {i} of the sources "
                                f"{[s.path for s in dm.predict_sources]}). TraceWriter writes one data set keyed "
                                "by id: give every record a unique id.")
            seen[x] = i
        self._expected = set(ids)
        todo = [i for i, x in enumerate(ids) if x not in self._done_ids]
        if len(todo) < len(ids):
            import torch

            self._restore = (dm.datasets, ds)
            dm.datasets["predict"] = torch.utils.data.Subset(ds, todo)
            if trainer.global_rank == 0:
                print(f"[vold-pl] traces: resuming from {self.shard_dir}: {len(ids) - len(todo)} of {len(ids)} "
                      f"prompts already done, {len(todo)} to go", flush=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._restore is not None:  # the data module's own set again, for whatever runs next
            datasets, ds = self._restore
            datasets["predict"], self._restore = ds, None

    # -- sampling -------------------------------------------------------------------------------------------
    def on_predict_start(self, trainer, pl_module) -> None:
        pl_module.set_predict_sampling(self.num_samples, self.sampling)
        self._done, self._total, self._shown = 0, None, 0
        self._t0 = time.perf_counter()

    def _model(self, pl_module) -> str:
        return self.model_name or str(pl_module.model_spec.name_or_path)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for rec, texts in zip(prediction["records"], prediction["texts"]):
            if rec["id"] in self._seen or rec["id"] in self._done_ids:
                continue  # a repeat that evens out the ranks' shares, or done by an earlier run
            self._seen.add(rec["id"])
            entry = self._entry(rec, texts, self._model(pl_module))
            self._new.append(entry)
            self._buffer.append(entry)
            for k, v in entry["counts"].items():
                self.stats[f"{entry['source']}/{k}"] += v
        if len(self._buffer) >= self.shard_every:
            self._flush(trainer)
        self._progress(trainer, len(prediction["records"]))

    def _entry(self, rec: dict, texts: list[str], model: str) -> dict:
        """One prompt's outcome, as a shard line: its kept records and its counts (total, kept, dropped why)."""
        correct, dropped = verified_traces(texts, rec, self.strip_reflection, self.max_words)
        chosen = select_traces(correct, self.keep)
        counts = {"total": 1, "kept": int(bool(chosen)), **dropped}
        return {"id": rec["id"], "source": base_source(rec.get("source")), "counts": counts,
                "records": [self._record(rec, trace, model, j) for j, trace in enumerate(chosen)]}

    def _flush(self, trainer) -> None:
        """This rank's new entries to the next shard file, atomically (a crash leaves whole shards only)."""
        if not self._buffer:
            return
        rank = trainer.global_rank
        if self._seq == 0:  # after the shards this rank wrote in earlier runs (the world size may have changed)
            taken = [int(f.stem.split("-")[1]) for f in self.shard_dir.glob(f"r{rank:05d}-*.jsonl")]
            self._seq = max(taken, default=-1) + 1
        path = self.shard_dir / f"r{rank:05d}-{self._seq:06d}.jsonl"
        atomic_write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self._buffer))
        self._seq += 1
        self._buffer = []

    def _progress(self, trainer, n: int) -> None:
        """Prompts done / total, rate and ETA on rank 0 at every tenth of the run, for logs (Lightning's predict bar
        shows the same live in a terminal)."""
        if self._total is None:
            dls = trainer.predict_dataloaders
            try:
                self._total = sum(len(dl.dataset) for dl in (dls if isinstance(dls, (list, tuple)) else [dls]))
            except (TypeError, AttributeError):
                self._total = 0
        self._done += n * trainer.world_size
        tenth = 10 * min(self._done, self._total) // self._total if self._total else 0
        if trainer.global_rank == 0 and tenth > self._shown:
            self._shown = tenth
            kept = sum(v for k, v in self.stats.items() if k.endswith("/kept"))
            done = min(self._done, self._total)
            print(f"[vold-pl] traces: {done}/{self._total} prompts ({kept} with a verified trace on rank 0; "
                  f"{format_eta(done, self._total, time.perf_counter() - self._t0, 'prompts')})", flush=True)

    def _record(self, rec: dict, trace: str, model: str, j: int) -> dict:
        out = {k: rec.get(k) for k in ("problem", "answer", "answer_type", "choices", "text_view", "difficulty",
                                        "category")}
        out["id"] = rec["id"] if j == 0 else f"{rec['id']}-{j}"
        out["choices"] = rec.get("choices") or None  # the datasets reader turns a null list into []
        out["images"] = rec.get("image_paths") or []
        out["trace"] = trace
        # The schema's one free-text provenance field: the original source and the model that wrote the trace.
        out["source"] = f"{base_source(rec.get('source'))}+traces({model})"
        return out

    # -- the end: gather once, merge with earlier shards, write -------------------------------------------------
    def on_predict_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module)

    def _finish(self, trainer, pl_module) -> None:
        if self._finished:
            return
        self._finished = True
        self._flush(trainer)
        new = self._gather(trainer)
        if trainer.global_rank != 0:
            return
        entries = dict(self._earlier)
        for e in new:
            entries.setdefault(e["id"], e)  # a prompt two ranks both had (Lightning's padding) counts once
        missing: set[str] = set()
        if self._expected is not None:  # shards of prompts no longer in the predict set are left out
            entries = {i: e for i, e in entries.items() if i in self._expected}
            missing = self._expected - set(entries)
            if missing:  # e.g. limit_predict_batches: keep the shards, a rerun completes the set
                print(f"[vold-pl] WARNING: {len(missing)} prompts were not sampled (e.g. {sorted(missing)[:3]}); "
                      f"the shards in {self.shard_dir} are kept, rerun to complete the set.")
        resumed = sum(1 for i in entries if i in self._earlier)
        self.stats = Counter()
        for e in entries.values():
            for k, v in e["counts"].items():
                self.stats[f"{e['source']}/{k}"] += v
        rows = [r for i in sorted(entries) for r in entries[i]["records"]]
        rows.sort(key=lambda r: r["id"])
        n_main = len(rows)
        rows += self._text_only_mix(n_main)
        summary = self.summary(trainer, pl_module, n_main, len(rows))
        summary["resumed_prompts"], summary["sampled_prompts"] = resumed, len(entries) - resumed
        summary_path = self.out_path.with_suffix(".summary.json")
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        from vold_pl.data.schema import write_jsonl

        write_jsonl(rows, self.out_path)  # atomic, after the summary: the JSONL marks a finished run
        if not self.keep_shards and not missing:
            shutil.rmtree(self.shard_dir, ignore_errors=True)
        for src, row in summary["kept_per_source"].items():
            print(f"[vold-pl]   {src:<24} kept {row['kept']:>6}/{row['total']:<6} ({100 * row['rate']:.1f}%)")
        if resumed:
            print(f"[vold-pl] {resumed} prompts were taken from the shards of an earlier run, "
                  f"{len(entries) - resumed} sampled now")
        print(f"[vold-pl] kept {summary['kept']}/{summary['total']} prompts with a verified trace; wrote "
              f"{len(rows)} records to {self.out_path} (summary: {summary_path})")
        if summary["kept"] == 0:
            print("[vold-pl] WARNING: no verified trace was kept. Try more samples (num_samples), a higher "
                  "temperature, a longer max_new_tokens, or a stronger model.")

    def summary(self, trainer, pl_module, n_main: int, n_written: int) -> dict:
        """Provenance and counts of this run (the ``.summary.json`` content)."""
        sources = sorted({k.rsplit("/", 1)[0] for k in self.stats if k.endswith("/total")})
        per_source = {}
        for s in sources:
            kept, total = self.stats[f"{s}/kept"], self.stats[f"{s}/total"]
            per_source[s] = {"kept": kept, "total": total, "rate": kept / total if total else 0.0}
        dm = getattr(trainer, "datamodule", None)
        return {
            "out_path": str(self.out_path), "written": n_written, "verified_records": n_main,
            "kept": sum(r["kept"] for r in per_source.values()), "total": sum(r["total"] for r in per_source.values()),
            "kept_per_source": per_source, "text_only_mixed_in": n_written - n_main, "counts": dict(self.stats),
            "provenance": {
                "model": self._model(pl_module), "checkpoint": getattr(trainer, "ckpt_path", None),
                "num_samples": self.num_samples,
                "sampling": {"temperature": self.temperature, "do_sample": self.sampling.do_sample,
                             "max_new_tokens": self.sampling.max_new_tokens, "top_p": self.sampling.top_p,
                             "top_k": self.sampling.top_k},
                "keep": self.keep, "filters": {"strip_reflection": self.strip_reflection, "max_words": self.max_words},
                "text_only": {"path": self.text_only_path, "ratio": self.text_only_ratio, "seed": self.seed},
                "data": [s.path for s in getattr(dm, "predict_sources", None) or []],
                "view": getattr(dm, "view", None),
            },
        }

    def _gather(self, trainer) -> list[dict]:
        """Every rank's new entries on every rank (one ``all_gather_object``); the rank's own when alone."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or trainer.world_size == 1:
            return self._new
        parts: list = [None] * trainer.world_size
        dist.all_gather_object(parts, self._new)
        return [e for part in parts for e in part or []]

    def _text_only_mix(self, n_main: int) -> list[dict]:
        """``round(n · r / (1 − r))`` text-only records, so they make a fraction ``r`` of the written set."""
        if not self.text_only_path or self.text_only_ratio <= 0:
            return []
        from vold_pl.data.schema import read_jsonl

        pool, _ = read_jsonl(self.text_only_path)
        want = round(n_main * self.text_only_ratio / (1 - self.text_only_ratio))
        if want > len(pool):
            print(f"[vold-pl] text-only mix: wanted {want} records, {self.text_only_path} has {len(pool)}; "
                  "using them all.")
        picked = random.Random(self.seed).sample(pool, min(want, len(pool)))
        self.stats["text_only/mixed_in"] = len(picked)
        return [r.to_json() for r in picked]



def _dataset_ids(ds) -> list[str] | None:
    """The ``id`` of every row of a data module's predict set, read from the id column (no image is decoded);
    ``None`` for a data set of another kind."""
    parts = getattr(ds, "datasets", None)
    if ds is None or parts is None:
        return None
    try:
        return [x for part in parts for x in part["id"]]
    except (KeyError, TypeError):
        return None
