"""The prompts each model reads: the student's chat (images + problem + instruction), the text-only teacher's
view of the same problem (METHODS.md §1), and the SFT target in the output format (METHODS.md §6).

One home for prompt construction: the collators (``vold_pl.data.collate``), the teacher's scoring
(``vold_pl.rl.teacher``) and the benchmarks all build their chats here.
"""

from __future__ import annotations

from typing import Any

DEFAULT_INSTRUCTION = (
    "Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>."
)


def student_messages(row: dict, instruction: str = DEFAULT_INSTRUCTION) -> list[dict]:
    """The student's chat: its images, then the problem and the output-format instruction."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in row.get("images") or []]
    content.append({"type": "text", "text": f"{row['problem']}\n{instruction}".strip()})
    return [{"role": "user", "content": content}]


def teacher_text(row: dict) -> str | None:
    """What a text-only teacher reads: the text view of an image problem, the problem itself otherwise.

    ``None`` for an image problem without a text view: the teacher cannot see it, so it gets no OPD term.
    """
    if row.get("images") or row.get("has_image"):  # dataset rows carry images, batch metadata has_image
        return row.get("text_view") or None
    return row.get("text_view") or row["problem"]


def teacher_messages(row: dict, instruction: str = DEFAULT_INSTRUCTION) -> list[dict] | None:
    """The teacher's chat prompt for a row, or ``None`` when the teacher cannot see the problem."""
    text = teacher_text(row)
    if text is None:
        return None
    return [{"role": "user", "content": f"{text}\n{instruction}".strip()}]


def teacher_prompt(row: dict, instruction: str = DEFAULT_INSTRUCTION) -> tuple[list[dict], bool]:
    """``(messages, available)``: the teacher's prompt, or for a row it cannot see (an image problem without a
    text view) a stand-in with the bare problem that keeps batches rectangular (its KL is masked out, its
    length still counts toward the prompt limits)."""
    msgs = teacher_messages(row, instruction)
    return (msgs, True) if msgs is not None else ([{"role": "user", "content": row["problem"]}], False)


def target_text(row: dict) -> str:
    """The SFT target in the output format of METHODS.md §6 (the closing ``<|im_end|>`` is added as a token)."""
    trace = (row.get("trace") or "").strip()
    return f"<think> {trace} </think><answer> {row['answer']} </answer>"
