"""The teacher's view of a student completion: its own prompt, then the student's very tokens.

VOLD's teacher is a text-only LLM (METHODS.md §1): it never sees pixels. For an image problem it reads the
record's text view, for a text-only problem the same prompt as the student. Its prompt is re-tokenised
with its own chat template, and the student's completion ids are appended unchanged; that is only
meaningful because the two share a vocabulary, which :func:`vold_pl.models.factory.check_tokenizers_aligned`
checks at setup. A record with an image and no text view is marked unavailable: it gets no OPD term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vold_pl.models.inputs import pad_left
from vold_pl.prompts import DEFAULT_INSTRUCTION, render_messages, teacher_prompt
from vold_pl.rl.logprobs import concat_prompt_completion, mask_blocked, model_token_logprobs


@dataclass
class TeacherInputs:
    input_ids: torch.Tensor  # [N, S + L] left-padded teacher prompt, then the student completion
    attention_mask: torch.Tensor  # [N, S + L]
    completion_start: int  # S: the column where completions begin
    available: torch.Tensor  # [N] bool: the teacher has a view of this prompt


def build_teacher_inputs(tokenizer, records: list[dict], completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor, group_size: int,
                         instruction: str = DEFAULT_INSTRUCTION) -> TeacherInputs:
    """Teacher prompt (one per record, repeated for its G samples) + the student's completion tokens.

    ``records`` has B entries; ``completion_ids`` has ``B * group_size`` rows, group-contiguous.
    """
    prompts, available = [], []
    for rec in records:
        msgs, ok = teacher_prompt(rec, instruction)  # a stand-in prompt where the teacher cannot see the row
        available.append(ok)
        text = render_messages(tokenizer, msgs)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt_ids, prompt_mask = pad_left(prompts, tokenizer.pad_token_id)  # [B, S]
    prompt_ids = prompt_ids.repeat_interleave(group_size, 0).to(completion_ids.device)  # [N, S]
    prompt_mask = prompt_mask.repeat_interleave(group_size, 0).to(completion_ids.device)  # [N, S]
    avail = torch.tensor(available, device=completion_ids.device).repeat_interleave(group_size)  # [N]
    ids, attn, _ = concat_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)  # [N, S + L]
    return TeacherInputs(input_ids=ids, attention_mask=attn, completion_start=prompt_ids.size(1), available=avail)


def teacher_rows(inputs: TeacherInputs, start: int, end: int, width: int) -> TeacherInputs:
    """Rows ``start:end`` of the teacher's inputs (a micro-batch), completions cut to ``width`` columns."""
    s = inputs.completion_start
    return TeacherInputs(inputs.input_ids[start:end, : s + width], inputs.attention_mask[start:end, : s + width],
                         s, inputs.available[start:end])


@torch.no_grad()
def teacher_token_logprobs(teacher: torch.nn.Module, inputs: TeacherInputs, temperature: float = 1.0,
                           chunk_size: int = 1024, blocked_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """``log π_T(o_t | q_T, o_<t)`` for every completion token: ``[N, L]``.

    ``blocked_ids`` (the rollout's, :attr:`vold_pl.rl.rollout_types.Rollout.blocked_ids`): the teacher is renormalised
    on the tokens the student may emit, so the KL compares two distributions on the same support."""
    return model_token_logprobs(teacher, inputs.input_ids, inputs.attention_mask, inputs.completion_start,
                                temperature=temperature, chunk_size=chunk_size, blocked_ids=blocked_ids)


@torch.no_grad()
def teacher_completion_logits(teacher: torch.nn.Module, inputs: TeacherInputs, temperature: float = 1.0,
                              blocked_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """Full next-token logits at every completion position, ``[N, L, V]``, for the full-vocabulary KL;
    temperature-scaled, ``-inf`` at ``blocked_ids`` (as :func:`teacher_token_logprobs`)."""
    s = inputs.completion_start
    out = teacher(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False)
    return mask_blocked(out.logits[:, s - 1 : -1].float() / temperature, blocked_ids)  # [N, L, V]
