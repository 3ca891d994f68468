"""The prompts each model reads: the student's chat (images + problem + instruction), the text-only teacher's
view of the same problem (METHODS.md §1), and the SFT target in the output format (METHODS.md §6).

One home for prompt construction: the collators (``vold_pl.data.collate``, which the benchmarks and trace writing
use too), the teacher's scoring (``vold_pl.rl.teacher``) and the data module's length checks build their chats
and render them here.

The form of a user turn is decided in one place, :func:`user_turn`: ``content`` is a plain string unless the turn
carries images. Chat templates differ in what they accept: Qwen2.5-VL's renders a string or a list of parts
(images, then text); Qwen3's renders any content that is not a string as nothing (an empty prompt), and text-only
Qwen2.5's concatenates the content to a string, so a list fails there. A string is what every template renders;
parts are used only where there are images, for a processor that has an image processor.
:func:`check_rendered_prompt` verifies one rendered prompt against what was put into it (the data module and the
benchmark callback run it at setup), so a template that drops or garbles the content stops the run at once.
"""

from __future__ import annotations

from typing import Any

from vold_pl.errors import UserError
from vold_pl.models.factory import get_tokenizer

DEFAULT_INSTRUCTION = (
    "Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>."
)


def user_turn(text: str, n_images: int = 0) -> list[dict]:
    """A one-turn chat in the form chat templates expect: string content without images, parts (one image
    part per image, then the text) with them. The one place that decides the form of a prompt."""
    if n_images <= 0:
        return [{"role": "user", "content": text}]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def turn_text(messages: list[dict]) -> str:
    """The text of a one-turn chat built by :func:`user_turn` (its text part when it has images)."""
    content = messages[-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def student_messages(row: dict, instruction: str = DEFAULT_INSTRUCTION, with_images: bool = True) -> list[dict]:
    """The student's chat: its images, then the problem and the output-format instruction.

    ``with_images=False`` (a model without an image processor) leaves the image parts out: the turn is a string.
    """
    n_images = len(row.get("images") or []) if with_images else 0
    return user_turn(f"{row['problem']}\n{instruction}".strip(), n_images)


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
    return user_turn(f"{text}\n{instruction}".strip())


def teacher_prompt(row: dict, instruction: str = DEFAULT_INSTRUCTION) -> tuple[list[dict], bool]:
    """``(messages, available)``: the teacher's prompt, or for a row it cannot see (an image problem without a
    text view) a stand-in with the bare problem that keeps batches rectangular (its KL is masked out, its
    length still counts toward the prompt limits)."""
    msgs = teacher_messages(row, instruction)
    return (msgs, True) if msgs is not None else (user_turn(row["problem"]), False)


def prompt_messages(row: dict, view: str = "student", instruction: str = DEFAULT_INSTRUCTION,
                    with_images: bool = True) -> list[dict]:
    """The chat of ``row`` in a view: ``student`` (images + problem) or ``teacher`` (the text view, or the
    stand-in of :func:`teacher_prompt`)."""
    if view == "teacher":
        return teacher_prompt(row, instruction)[0]
    return student_messages(row, instruction, with_images)


def has_image_processor(processor) -> bool:
    """Whether ``processor`` turns images into pixels (a vision-language model's processor)."""
    return getattr(processor, "image_processor", None) is not None


def render_messages(tokenizer, messages: list[dict]) -> str:
    """The prompt text of a chat through the tokenizer's own chat template, ready for the assistant's turn."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_prompt(processor, row: dict, view: str = "student", instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The prompt text a model reads for ``row``: image parts only when the processor has an image processor."""
    msgs = prompt_messages(row, view, instruction, with_images=has_image_processor(processor))
    return render_messages(get_tokenizer(processor), msgs)


def check_rendered_prompt(processor, row: dict, view: str = "student", instruction: str = DEFAULT_INSTRUCTION,
                          where: str = "data", view_key: str = "data.view") -> str:
    """Render ``row`` with the model's own chat template and verify that the model reads what was put in.

    Every piece of the turn's text (the whole text, the problem or text view, the instruction, each option of a
    choice question that the text lists) must appear in the rendered prompt as often as in the text itself
    (normally once), counting only what the content adds to the template's own text (the same chat rendered
    with an empty text); with images, one image placeholder per image. A template that drops the content
    (Qwen3's on a list), prints it as a Python list, repeats or alters it raises :class:`UserError` naming the
    model, what the template did and the fix. ``where`` names the data (a source, a benchmark) and ``view_key``
    the option that sets the view, for the message. Returns the rendered prompt.
    """
    tok = get_tokenizer(processor)
    model = getattr(tok, "name_or_path", "") or type(tok).__name__
    at = f"{where} (id={row.get('id')!r}, {view} view)"
    n_images = len(row.get("images") or []) if view == "student" else 0
    if n_images and not has_image_processor(processor):
        raise UserError(
            f"{at}: the record has {n_images} image(s), but the model {model} has no image "
            f"processor (a text-only model), so under {view_key}: student it would never see them. Set "
            f"{view_key}: teacher (the model reads each record's text view) or use text-only records.")
    msgs = prompt_messages(row, view, instruction)
    text = turn_text(msgs)
    form = "a list of image parts and the text" if n_images else "a plain string"
    fix = (f"Use a chat template that renders image and text parts (as Qwen2.5-VL's does), or set {view_key}: "
           "teacher to give the model the records' text views as plain strings." if n_images else
           "Use a chat template that renders a string user turn as it is (the model's published chat_template "
           "in tokenizer_config.json / chat_template.jinja).")
    try:
        rendered = render_messages(tok, msgs)
        empty = render_messages(tok, user_turn("", n_images))  # the template's own text around the content
        plain = render_messages(tok, user_turn("", 0)) if n_images else empty
    except Exception as e:  # noqa: BLE001 - a template may raise anything (TypeError on a list, its own errors)
        raise UserError(f"{at}: the chat template of {model} fails on a user turn whose content is "
                        f"{form}: {type(e).__name__}: {e}. {fix}") from e
    problem = ("the problem", row["problem"]) if view == "student" else ("the text view", teacher_text(row) or "")
    pieces = [("the prompt text", text), problem, ("the instruction", instruction)]
    pieces += [(f"option {i + 1} ({c!r:.40})", c) for i, c in enumerate(row.get("choices") or []) if c in text]
    for name, piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        want, got = text.count(piece), rendered.count(piece) - empty.count(piece)
        if got != want:
            raise UserError(f"{at}: the chat template of {model} {_behaviour(rendered, got, want)}: "
                            f"{name} appears {got} time(s) in the rendered prompt, {want} in the user turn "
                            f"({form}). The rendered prompt: {rendered[:400]!r}. {fix}")
    image_token = getattr(processor, "image_token", None)
    if n_images and image_token:
        got = rendered.count(image_token) - plain.count(image_token)
        if got != n_images:
            raise UserError(f"{at}: the chat template of {model} renders {got} image placeholder(s) "
                            f"({image_token}) for the record's {n_images} image(s). The rendered prompt: "
                            f"{rendered[:400]!r}. {fix}")
    return rendered


def _behaviour(rendered: str, got: int, want: int) -> str:
    """What a template did to the content, in words, for the error message."""
    if "'type': 'text'" in rendered or '"type": "text"' in rendered:
        return "prints the message content as a list (its Python form) instead of its text"
    if got == 0:
        return "renders the user turn's content as nothing"
    if got > want:
        return "repeats the content"
    return "alters the content"


def target_text(row: dict) -> str:
    """The SFT target in the output format of METHODS.md §6 (the closing ``<|im_end|>`` is added as a token)."""
    trace = (row.get("trace") or "").strip()
    return f"<think> {trace} </think><answer> {row['answer']} </answer>"
