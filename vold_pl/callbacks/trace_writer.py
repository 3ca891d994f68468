"""Writing verified reasoning traces as a new data set: ``vold-pl predict`` with :class:`TraceWriter`.

One mechanism serves three recipes: VOLD's cold-start traces (the text teacher answers the text views of
image problems), Curr-ReFT's rejection-sampled SFT set, and each OpenVLThinker round's next SFT set. For
each prompt the model writes k samples; the ones whose answer verifies against the gold (the same
``score_answer`` as the RL reward) are filtered (OpenVLThinker: shortest correct, reflections cut, length
cap) and written in the record schema with provenance, next to a summary of kept / total per source.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import lightning as L

from vold_pl.rewards.extract import extract_answer
from vold_pl.rewards.functions import score_answer
from vold_pl.rl.rollout import SamplingConfig

REFLECTION_PHRASES = ("But wait", "Wait,", "Wait.", "Wait ", "Hmm,", "Let me double-check", "Let me re-check",
                      "Actually,")
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)


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
    """Choose among the correct traces of one prompt: ``shortest``, ``drop_longest``, ``first`` or ``all``."""
    if not candidates:
        return []
    if keep == "shortest":
        return [min(candidates, key=len)]
    if keep == "first":
        return [candidates[0]]
    if keep == "drop_longest":
        return sorted(candidates, key=len)[:-1] if len(candidates) > 1 else list(candidates)
    if keep == "all":
        return list(candidates)
    raise ValueError(f"keep must be shortest, drop_longest, first or all; got {keep!r}")


class TraceWriter(L.pytorch.callbacks.BasePredictionWriter):
    """Samples k completions per prompt in ``vold-pl predict``, keeps verified ones, writes a JSONL data set.

    Args:
        out_path: the JSONL to write (records in the project schema; ``trace`` is the kept reasoning).
        num_samples: k samples per prompt.
        max_new_tokens: completion length cap while sampling.
        temperature: sampling temperature (0 → greedy, as OpenVLThinker samples its next SFT set).
        keep: ``shortest`` correct trace, ``drop_longest``, ``first`` or ``all``.
        strip_reflection: cut sentences opening with reflection phrases ("Wait", "But wait", …).
        max_words: drop traces longer than this many words (0 = no cap).
        text_only_path: a JSONL of text-only records to mix in (Curr-ReFT keeps general abilities this way).
        text_only_ratio: fraction of the written set taken from ``text_only_path`` (e.g. 0.3).
        model_name: provenance: the model that wrote the traces (default: the module's model path).
        seed: seed of the text-only mix draw.
    """

    def __init__(self, out_path: str, num_samples: int = 4, max_new_tokens: int = 128, temperature: float = 1.0,
                 keep: Literal["shortest", "drop_longest", "first", "all"] = "shortest",
                 strip_reflection: bool = True, max_words: int = 0, text_only_path: str | None = None,
                 text_only_ratio: float = 0.0, model_name: str | None = None, seed: int = 0):
        super().__init__(write_interval="batch")
        select_traces([], keep)  # validates ``keep`` now, not after an hour of sampling
        self.out_path, self.num_samples, self.keep = Path(out_path), num_samples, keep
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=max(temperature, 1e-5),
                                       do_sample=temperature > 0)
        self.strip_reflection, self.max_words = strip_reflection, max_words
        self.text_only_path, self.text_only_ratio = text_only_path, text_only_ratio
        self.model_name, self.seed = model_name, seed
        self.rows: list[dict] = []
        self.stats: Counter = Counter()

    def on_predict_start(self, trainer, pl_module) -> None:
        pl_module.predict_num_samples, pl_module.predict_sampling = self.num_samples, self.sampling
        self.rows, self.stats = [], Counter()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for rec, texts in zip(prediction["records"], prediction["texts"]):
            src = rec.get("source") or "unknown"
            self.stats[f"{src}/total"] += 1
            correct = []
            for t in texts:
                trace = think_text(t)
                if trace is None or score_answer(extract_answer(t), SimpleNamespace(**rec)) < 1.0:
                    continue
                if self.strip_reflection:
                    trace = strip_reflections(trace)
                if not trace or (self.max_words and len(trace.split()) > self.max_words):
                    self.stats[f"{src}/too_long_or_empty"] += 1
                    continue
                correct.append(trace)
            chosen = select_traces(correct, self.keep)
            self.stats[f"{src}/kept"] += bool(chosen)
            for j, trace in enumerate(chosen):
                self.rows.append(self._record(rec, trace, pl_module, j))

    def _record(self, rec: dict, trace: str, pl_module, j: int) -> dict:
        out = {k: rec.get(k) for k in ("problem", "answer", "answer_type", "choices", "text_view", "difficulty",
                                        "category")}
        out["id"] = rec["id"] if j == 0 else f"{rec['id']}-{j}"
        out["images"] = rec.get("image_paths") or []
        out["trace"] = trace
        out["source"] = f"{rec.get('source') or 'unknown'}+traces"
        return out

    def on_predict_end(self, trainer, pl_module) -> None:
        rows = self._gather(trainer)
        if trainer.global_rank != 0:
            return
        rows.sort(key=lambda r: r["id"])
        rows += self._text_only_mix(len(rows))
        from vold_pl.data.schema import write_jsonl

        write_jsonl(rows, self.out_path)
        summary = {"out_path": str(self.out_path), "written": len(rows), "counts": dict(self.stats),
                   "provenance": {"model": self.model_name or pl_module.model_spec.name_or_path,
                                  "checkpoint": getattr(trainer, "ckpt_path", None),
                                  "num_samples": self.num_samples, "sampling": vars(self.sampling),
                                  "keep": self.keep, "strip_reflection": self.strip_reflection,
                                  "max_words": self.max_words, "text_only_ratio": self.text_only_ratio}}
        summary_path = self.out_path.with_suffix(".summary.json")
        summary_path.write_text(json.dumps(summary, indent=2))
        kept = sum(v for k, v in self.stats.items() if k.endswith("/kept"))
        total = sum(v for k, v in self.stats.items() if k.endswith("/total"))
        print(f"[vold-pl] kept {kept}/{total} prompts with a verified trace; wrote {len(rows)} records to "
              f"{self.out_path} (summary: {summary_path})")

    def _gather(self, trainer) -> list[dict]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or trainer.world_size == 1:
            return self.rows
        parts: list = [None] * trainer.world_size
        dist.all_gather_object(parts, (self.rows, dict(self.stats)))
        self.stats = Counter()
        for _, st in parts:
            self.stats.update(st)
        return [r for rows, _ in parts for r in rows]

    def _text_only_mix(self, n_main: int) -> list[dict]:
        if not self.text_only_path or self.text_only_ratio <= 0:
            return []
        from vold_pl.data.schema import read_jsonl

        pool, _ = read_jsonl(self.text_only_path)
        want = round(n_main * self.text_only_ratio / max(1e-9, 1 - self.text_only_ratio))
        picked = random.Random(self.seed).sample(pool, min(want, len(pool)))
        self.stats["text_only/mixed_in"] = len(picked)
        return [r.to_json() for r in picked]
