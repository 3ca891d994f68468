"""From records to model inputs: chat prompts with image placeholders, SFT labels, teacher views.

Two collators share the prompt code:
- :class:`SFTCollator`: prompt + target, labels are ``-100`` on the prompt and padding (completion-only NLL);
- :class:`PromptCollator`: prompt only, left-padded for generation (rollouts, benchmarks, trace writing).
Both carry each row's metadata (``batch["records"]``) so rewards and the teacher's text view travel along.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vold_pl.data.images import to_rgb
from vold_pl.errors import UserError
from vold_pl.models.factory import get_tokenizer
from vold_pl.models.inputs import pad_left
from vold_pl.prompts import (  # noqa: F401 - re-exported: the collators' prompt API
    DEFAULT_INSTRUCTION,
    has_image_processor,
    render_prompt,
    student_messages,
    target_text,
    teacher_messages,
    teacher_prompt,
    teacher_text,
)

IGNORE_INDEX = -100
# Fields carried into ``batch["records"]``; images stay out of it (they are already pixel_values).
META_FIELDS = ("id", "problem", "answer", "answer_type", "choices", "trace", "text_view", "difficulty", "source",
               "category", "image_paths", "origin")
# Batch key listing the records skipped while the batch was drawn (``on_bad_record: skip``); the data module
# takes it out of the batch, counts and lists them before the batch reaches the model.
SKIPPED_KEY = "skipped_records"


@dataclass
class BadRow:
    """What a dataset yields in place of a row that cannot be read (e.g. its image no longer decodes).

    ``message`` names the file, line and field; ``substitute`` is the next readable row of the same source,
    which takes the bad row's place when the batch must keep its size (training).
    """

    message: str
    substitute: dict | None = None


def take_rows(rows: list, keep_batch_size: bool) -> tuple[list[dict], list[str]]:
    """``(rows to collate, messages of the bad rows)``: bad rows are dropped, or (``keep_batch_size``, and
    always when nothing else is left) replaced by their substitute."""
    bad = [r.message for r in rows if isinstance(r, BadRow)]
    if not bad:
        return rows, []
    good = [r for r in rows if not isinstance(r, BadRow)]
    if keep_batch_size or not good:
        good = [r.substitute if isinstance(r, BadRow) else r for r in rows]
        good = [r for r in good if r is not None]
    return good, bad


_MAX_TOKEN_CHARS: dict[int, int] = {}


def max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for (its longest vocabulary entry, at least 1).

    A text of ``n`` characters is at least ``n / max_token_chars`` tokens, so a text that is over a token limit
    by this bound is known to be too long without tokenising it (a 20 MB prompt is refused at once).
    """
    key = id(tokenizer)
    if key not in _MAX_TOKEN_CHARS:
        # Byte-level BPE entries spell each byte as one character, so an entry is at least as long as its text.
        _MAX_TOKEN_CHARS[key] = max([len(t) for t in tokenizer.get_vocab()] + [1])
    return _MAX_TOKEN_CHARS[key]


def encode_prompts(processor, rows: list[dict], view: str = "student",
                   instruction: str = DEFAULT_INSTRUCTION) -> dict[str, Any]:
    """Tokenise chat prompts, unpadded: ``input_ids`` is a list of lists; image tensors when there are images.

    ``view='teacher'`` renders each row as a text-only model sees it (no pixels, the text view). The chats are
    built and rendered by :func:`vold_pl.prompts.render_prompt` (string content unless a row has images).
    """
    tok = get_tokenizer(processor)
    texts = [render_prompt(processor, r, view, instruction) for r in rows]
    # every image as 8-bit RGB (16-bit grey scaled, alpha on white) before the processor sees it
    images = [] if view == "teacher" else [to_rgb(im) for r in rows for im in (r.get("images") or [])]
    if images:
        if not has_image_processor(processor):
            raise UserError("rows have images but the model has no image processor: a text-only model needs "
                            "view='teacher' (the text view) or text-only data.")
        enc = processor(text=texts, images=images, padding=False, return_tensors=None)
        out = {"input_ids": [list(x) for x in enc["input_ids"]],
               "pixel_values": torch.as_tensor(enc["pixel_values"]),
               "image_grid_thw": torch.as_tensor(enc["image_grid_thw"])}
    else:
        out = {"input_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts]}
    return out


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
    """1 on image placeholder tokens, 0 elsewhere: transformers 5 needs it for multimodal rope positions."""
    if image_token_id is None:
        return torch.zeros_like(input_ids)
    return (input_ids == image_token_id).long()


def image_token_id(processor) -> int | None:
    return getattr(processor, "image_token_id", None) if has_image_processor(processor) else None


def meta(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in META_FIELDS} | {"has_image": bool(r.get("images"))} for r in rows]


@dataclass
class PromptCollator:
    """Rows → left-padded prompts for generation, with each row's metadata under ``records`` and the output-format
    instruction the prompts end with under ``instruction`` (the teacher's prompts of OPD end with the same one)."""

    processor: Any
    view: str = "student"
    instruction: str = DEFAULT_INSTRUCTION
    keep_batch_size: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        rows, bad = take_rows(rows, self.keep_batch_size)
        enc = encode_prompts(self.processor, rows, self.view, self.instruction)
        ids, mask = pad_left(enc.pop("input_ids"), get_tokenizer(self.processor).pad_token_id)
        out = {"input_ids": ids, "attention_mask": mask,
               "mm_token_type_ids": mm_token_type_ids(ids, image_token_id(self.processor)),
               **enc, "records": meta(rows), "instruction": self.instruction}
        return out | ({SKIPPED_KEY: bad} if bad else {})


@dataclass
class SFTCollator:
    """Rows → prompt + target with labels only on the target (completion-only NLL).

    Prompt and target are tokenised apart and concatenated, so the boundary is exact: every prompt token,
    image placeholders included, is ``-100``; every target token and the closing ``<|im_end|>`` is learned.
    Rows longer than ``max_length`` lose the end of their target, and are counted in ``truncated``; a target's
    text is cut to what ``max_length`` tokens can hold before it is tokenised (a huge trace costs nothing).
    """

    processor: Any
    view: str = "student"
    instruction: str = DEFAULT_INSTRUCTION
    max_length: int = 1024
    keep_batch_size: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        tok = get_tokenizer(self.processor)
        rows, bad = take_rows(rows, self.keep_batch_size)
        enc = encode_prompts(self.processor, rows, self.view, self.instruction)
        seqs, labels, truncated = [], [], 0
        max_chars = self.max_length * max_token_chars(tok)
        for prompt, row in zip(enc.pop("input_ids"), rows):
            text = target_text(row)
            target = tok(text[:max_chars], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            room = self.max_length - len(prompt)
            if room <= 0:
                from vold_pl.data.schema import RecordError

                raise RecordError(f"{row.get('origin') or 'record'} (id={row['id']!r}): the prompt alone is "
                                  f"{len(prompt)} tokens, above max_length={self.max_length}. Raise max_length or "
                                  "shorten the problem.")
            if len(target) > room:
                target, truncated = target[:room], truncated + 1
            seqs.append(prompt + target)
            labels.append([IGNORE_INDEX] * len(prompt) + target)
        width = max(len(s) for s in seqs)
        # Right padding: labels line up with inputs and padding is never learned.
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(l)] = torch.tensor(l)
            mask[i, : len(s)] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": lab,
               "mm_token_type_ids": mm_token_type_ids(ids, image_token_id(self.processor)),
               **enc, "records": meta(rows), "truncated": truncated}
        return out | ({SKIPPED_KEY: bad} if bad else {})
