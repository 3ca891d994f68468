"""What a model reads, decoded from the ids it is given: helpers shared by the prompt tests.

:func:`decoded_prompts` turns a collated batch back into prompt text (the tokens the model attends to, the SFT
target left out); :func:`assert_reads` checks one decoded prompt against its record; :class:`PromptRecorder`
records the decoded prompts of every stage of a run in this process (the student's batches, the teacher's
inputs, trace writing and benchmarks) by wrapping the collators, the teacher's input builder and the trace
writer's batch hook: the wrapped code runs unchanged, what it builds or receives is decoded on the side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vold_pl.models.factory import get_tokenizer
from vold_pl.prompts import DEFAULT_INSTRUCTION, teacher_text

VISION_START = "<|vision_start|>"


def decoded_prompts(tokenizer, batch: dict) -> list[str]:
    """The prompt of every row of a collated batch, decoded: attended tokens, minus the SFT target (labelled)."""
    keep = batch["attention_mask"].bool()  # [B, S]
    if "labels" in batch:
        keep &= batch["labels"] == -100
    return [tokenizer.decode(ids[k]) for ids, k in zip(batch["input_ids"], keep)]


def teacher_decoded_prompts(tokenizer, inputs) -> list[str]:
    """The teacher's prompt of every row of :class:`~vold_pl.rl.teacher.TeacherInputs`, decoded."""
    s = inputs.completion_start
    ids, mask = inputs.input_ids[:, :s], inputs.attention_mask[:, :s].bool()  # [N, S]
    return [tokenizer.decode(i[m]) for i, m in zip(ids, mask)]


def assert_reads(decoded: str, record: dict, view: str, instruction: str = DEFAULT_INSTRUCTION) -> None:
    """``decoded`` holds the record's problem (student) or text view (teacher) exactly once, each option as often
    as that text lists it, the instruction exactly once, and one image placeholder per image the view shows."""
    text = record["problem"] if view == "student" else teacher_text(record)
    assert text, f"nothing for the {view} to read in {record.get('id')!r}"
    where = f"{view} prompt of {record.get('id')!r}: {decoded!r:.600}"
    assert decoded.count(text) == 1, f"the problem is not there exactly once: {where}"
    assert decoded.count(instruction) == 1, f"the instruction is not there exactly once: {where}"
    for c in record.get("choices") or []:
        assert decoded.count(c) == text.count(c) >= 1, f"option {c!r} is not there as listed: {where}"
    n_images = len(record.get("images") or record.get("image_paths") or []) or int(bool(record.get("has_image")))
    assert decoded.count(VISION_START) == (n_images if view == "student" else 0), f"image placeholders: {where}"
    assert "'type'" not in decoded and decoded.rstrip().endswith("<|im_start|>assistant"), where


@dataclass
class Seen:
    """One decoded prompt: which code built it (``sft`` / ``prompt``: the collators, ``teacher``: the teacher's
    inputs, ``traces``: a batch trace writing sampled from), the view, the row's metadata and the instruction."""

    kind: str
    view: str
    record: dict
    text: str
    instruction: str


@dataclass
class PromptRecorder:
    """Decoded prompts of everything collated, scored or sampled for traces while it is installed (see the module
    docstring); benchmarks collate with :class:`~vold_pl.data.collate.PromptCollator` (kind ``prompt``)."""

    seen: list[Seen] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> PromptRecorder:
        from vold_pl.callbacks.trace_writer import TraceWriter
        from vold_pl.data import collate
        from vold_pl.modules import opd_grpo
        from vold_pl.rl import teacher

        for cls, kind in ((collate.PromptCollator, "prompt"), (collate.SFTCollator, "sft")):
            monkeypatch.setattr(cls, "__call__", self._collator(cls.__call__, kind))
        build = teacher.build_teacher_inputs

        def build_and_record(tokenizer, records, completion_ids, completion_mask, group_size,
                             instruction=DEFAULT_INSTRUCTION):
            out = build(tokenizer, records, completion_ids, completion_mask, group_size, instruction)
            texts = teacher_decoded_prompts(tokenizer, out)
            for i, rec in enumerate(records):  # rows are group-contiguous: one prompt per record
                if out.available[i * group_size]:
                    self.seen.append(Seen("teacher", "teacher", rec, texts[i * group_size], instruction))
            return out

        monkeypatch.setattr(opd_grpo, "build_teacher_inputs", build_and_record)
        write = TraceWriter.write_on_batch_end

        def write_and_record(writer, trainer, pl_module, prediction, batch_indices, batch, *args, **kwargs):
            dm = trainer.datamodule
            for rec, text in zip(batch["records"], decoded_prompts(pl_module.tokenizer, batch)):
                self.seen.append(Seen("traces", dm.view, rec, text, dm.instruction))
            return write(writer, trainer, pl_module, prediction, batch_indices, batch, *args, **kwargs)

        monkeypatch.setattr(TraceWriter, "write_on_batch_end", write_and_record)
        return self

    def _collator(self, call, kind: str):
        recorder = self

        def call_and_record(collator, rows):
            batch = call(collator, rows)
            texts = decoded_prompts(get_tokenizer(collator.processor), batch)
            for rec, text in zip(batch["records"], texts):
                recorder.seen.append(Seen(kind, collator.view, rec, text, collator.instruction))
            return batch

        return call_and_record

    def of(self, kind: str, id_part: str = "") -> list[Seen]:
        """The prompts recorded for ``kind`` whose record id contains ``id_part``."""
        return [s for s in self.seen if s.kind == kind and id_part in str(s.record.get("id"))]

    def check(self, kind: str, id_part: str = "", view: str = "student", at_least: int = 1) -> list[Seen]:
        """Every recorded prompt of ``kind`` / ``id_part`` is in ``view`` and reads right (:func:`assert_reads`),
        with the default instruction; at least ``at_least`` of them were seen. Returns them."""
        found = self.of(kind, id_part)
        assert len(found) >= at_least, f"{len(found)} {kind} prompts of ids *{id_part}* seen, {at_least}+ expected"
        for s in found:
            assert s.view == view and s.instruction == DEFAULT_INSTRUCTION, (s.kind, s.view, s.instruction)
            assert_reads(s.text, s.record, s.view, s.instruction)
        return found


def image_row(n: int = 1) -> list:
    """``n`` tiny PIL images (56 px)."""
    from PIL import Image

    return [Image.new("RGB", (56, 56), color=(200, 30, 30)) for _ in range(n)]


__all__ = ["PromptRecorder", "Seen", "assert_reads", "decoded_prompts", "image_row", "teacher_decoded_prompts"]
