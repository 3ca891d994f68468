"""Prompts under the real chat templates: Qwen2.5-VL-Instruct's, Qwen3's and Qwen2.5-7B-Instruct's (text only).

The first two are the templates ``vold_pl/toy/qwen_shapes.py`` builds the real tokenizers with; the third is
the published ``chat_template`` of Qwen2.5-7B-Instruct, kept as data in ``tests/data/`` with its source. Every
prompt is checked on the ids the collators (student, SFT and generation), and the teacher's input builder give
the model, decoded: the problem (or the teacher's text view), each option and the instruction exactly once, one
image placeholder per image the view shows. The setup check (``vold_pl.prompts.check_rendered_prompt``) refuses
templates that drop, print as a list, repeat or fail on the content, from the data module and the benchmark
callback.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.prompt_checks import assert_reads, decoded_prompts, image_row, teacher_decoded_prompts
from vold_pl import prompts
from vold_pl.data.collate import PromptCollator, SFTCollator
from vold_pl.errors import UserError
from vold_pl.prompts import DEFAULT_INSTRUCTION

QWEN2_5_INSTRUCT = json.loads((Path(__file__).parent / "data" / "qwen2_5_instruct_chat_template.json").read_text())
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

# Options spelled so that each appears once in the problem: "exactly once" in the prompt is then literal.
TEXT_ROW = {"id": "text-1", "answer": "A", "answer_type": "choice", "trace": "17 + 25 = 42.",
            "problem": "Tom has 17 marbles and wins 25 more. How many marbles does he have? "
                       "Options: A. forty-two marbles B. thirty-nine marbles",
            "choices": ["forty-two marbles", "thirty-nine marbles"]}
IMAGE_ROW = {"id": "image-1", "answer": "A", "answer_type": "choice", "trace": "I count 7 red squares.",
             "problem": "How many red squares are in the picture? Options: A. seven red squares B. nine red squares",
             "choices": ["seven red squares", "nine red squares"],
             "text_view": "A 4x4 grid holds 7 red squares and 2 blue circles. How many red squares are in the grid? "
                          "Options: A. seven red squares B. nine red squares"}


@pytest.fixture(scope="module")
def models():
    """``qwen2.5-vl``: the Qwen2.5-VL processor (image processor + real tokenizer and template); ``qwen3`` and
    ``qwen2.5-instruct``: text-only tokenizers with Qwen3's and Qwen2.5-7B-Instruct's templates."""
    from vold_pl.models.processor import Qwen2_5_VLImageTextProcessor
    from vold_pl.toy.qwen_shapes import (
        QWEN2_5_VL_CHAT_TEMPLATE,
        extend_to_qwen3,
        make_image_processor,
        qwen2_5_vl_tokenizer,
    )

    vl_tok = qwen2_5_vl_tokenizer()
    vl_tok.name_or_path = "Qwen/Qwen2.5-VL-3B-Instruct"
    qwen3 = qwen2_5_vl_tokenizer()
    extend_to_qwen3(qwen3)  # Qwen3's added tokens and template
    qwen3.name_or_path = "Qwen/Qwen3-8B"
    instruct = qwen2_5_vl_tokenizer()  # Qwen2.5's text models share the added-token table up to 151664
    instruct.chat_template = QWEN2_5_INSTRUCT["chat_template"]
    instruct.name_or_path = QWEN2_5_INSTRUCT["model"]
    vl = Qwen2_5_VLImageTextProcessor(image_processor=make_image_processor(), tokenizer=vl_tok,
                                      chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    return {"qwen2.5-vl": vl, "qwen3": qwen3, "qwen2.5-instruct": instruct}


def rows(kind: str) -> list[dict]:
    row = dict(TEXT_ROW if kind == "text" else IMAGE_ROW)
    if kind == "image":
        row["images"] = image_row(1)
    return [row]


def test_published_template_is_the_recorded_one():
    """The stored Qwen2.5-7B-Instruct template is byte for byte the one its source quotes (hash recorded)."""
    assert hashlib.sha256(QWEN2_5_INSTRUCT["chat_template"].encode()).hexdigest() == QWEN2_5_INSTRUCT["sha256"]
    assert "You are Qwen, created by Alibaba Cloud" in QWEN2_5_INSTRUCT["chat_template"]


@pytest.mark.parametrize("name, expected_prefix", [("qwen3", ""), ("qwen2.5-instruct", QWEN_SYSTEM),
                                                   ("qwen2.5-vl", "<|im_start|>system\nYou are a helpful "
                                                                  "assistant.<|im_end|>\n")])
def test_text_prompt_is_the_chat_the_template_publishes(models, name, expected_prefix):
    """A text-only row through the generation collator, decoded: exactly the template's chat around the problem
    and instruction. Qwen3's template rendered the former list-of-parts turn as an empty user turn, Qwen2.5's
    failed on it (it concatenates the content to a string)."""
    batch = PromptCollator(models[name])([{"id": "q", "problem": "What is 2+3?", "answer": "5"}])
    (text,) = decoded_prompts(models[name] if name != "qwen2.5-vl" else models[name].tokenizer, batch)
    assert text == (f"{expected_prefix}<|im_start|>user\nWhat is 2+3?\n{DEFAULT_INSTRUCTION}<|im_end|>\n"
                    "<|im_start|>assistant\n")


CASES = [(m, v, k) for m in ("qwen2.5-vl", "qwen3", "qwen2.5-instruct") for v in ("student", "teacher")
         for k in ("text", "image") if not (m != "qwen2.5-vl" and v == "student" and k == "image")]


@pytest.mark.parametrize("name, view, kind", CASES)
def test_every_collator_prompt_reads_right(models, name, view, kind):
    """Generation and SFT prompts of each view, text-only and image rows: problem (or text view), options and
    instruction once each, the image placeholder only where the view shows the image; the setup check agrees."""
    proc = models[name]
    tok = getattr(proc, "tokenizer", proc)
    for collator in (PromptCollator(proc, view), SFTCollator(proc, view, max_length=512)):
        batch = collator(rows(kind))
        (text,) = decoded_prompts(tok, batch)
        assert_reads(text, batch["records"][0], view)
        if view == "student" and kind == "image":
            merged = int(batch["image_grid_thw"].prod(-1).sum()) // 4  # 2x2 patches per placeholder token
            assert merged >= 1 and text.count("<|image_pad|>") == merged
        if "labels" in batch:  # the target follows the prompt, learned
            target = tok.decode(batch["input_ids"][0][batch["labels"][0] != -100])
            assert target == f"<think> {rows(kind)[0]['trace']} </think><answer> A </answer><|im_end|>"
    rendered = prompts.check_rendered_prompt(proc, rows(kind)[0], view)
    assert rendered.count(DEFAULT_INSTRUCTION) == 1


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5-instruct"])
def test_teacher_inputs_read_right(models, name):
    """The teacher's prompts (OPD scoring) under a text-only template: the problem of the text row, the text view
    of the image row, each once with the options and the instruction; the student's tokens follow unchanged."""
    from vold_pl.rl.teacher import build_teacher_inputs

    tok, G = models[name], 2
    records = [{**TEXT_ROW, "has_image": False}, {**IMAGE_ROW, "has_image": True}]
    comp = torch.tensor([[11, 12, 13], [14, 15, 0], [16, 0, 0], [17, 18, 19]])  # [N, L] completion ids
    cmask = (comp > 0).long()
    tin = build_teacher_inputs(tok, records, comp, cmask, G)
    assert tin.available.tolist() == [True] * 4
    texts = teacher_decoded_prompts(tok, tin)
    for i, text in enumerate(texts):
        assert_reads(text, records[i // G], "teacher")
    assert torch.equal(tin.input_ids[:, tin.completion_start:], comp)


def test_text_only_model_refuses_image_rows_in_the_student_view(models):
    for name in ("qwen3", "qwen2.5-instruct"):
        with pytest.raises(UserError) as e:
            prompts.check_rendered_prompt(models[name], rows("image")[0], "student", where="data source x.jsonl")
        msg = str(e.value)
        assert "x.jsonl (id='image-1', student view)" in msg and "has no image processor" in msg
        assert models[name].name_or_path in msg and "data.view: teacher" in msg


def _with_template(proc, template: str):
    """A copy of the Qwen2.5-VL processor whose tokenizer renders with ``template``."""
    import copy

    out = copy.copy(proc)
    out.tokenizer = copy.copy(proc.tokenizer)
    out.tokenizer.chat_template = template
    return out


LOOP = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
END = "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
BAD_TEMPLATES = {
    # Qwen3's template keeps a turn's content only when it is a string: image turns come out empty.
    "qwen3 on parts": ("image", None, "renders the user turn's content as nothing"),
    # Qwen2.5-Instruct's concatenates the content to a string: a list raises.
    "qwen2.5-instruct on parts": ("image", None, "fails on a user turn whose content is a list of image parts"),
    "prints the list": ("image", LOOP + "{{ m['content'] }}" + END, "prints the message content as a list"),
    "repeats": ("text", LOOP + "{{ m['content'] }} {{ m['content'] }}" + END, "repeats the content"),
    "drops strings": ("text", LOOP + END, "renders the user turn's content as nothing"),
    "drops images": ("image", LOOP + "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}"
                     "{% endif %}{% endfor %}" + END, "renders 0 image placeholder(s)"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEMPLATES))
def test_setup_check_refuses_templates_that_lose_the_prompt(models, case):
    from vold_pl.toy.qwen_shapes import QWEN3_CHAT_TEMPLATE

    kind, template, behaviour = BAD_TEMPLATES[case]
    template = template or {"qwen3 on parts": QWEN3_CHAT_TEMPLATE,
                            "qwen2.5-instruct on parts": QWEN2_5_INSTRUCT["chat_template"]}[case]
    proc = _with_template(models["qwen2.5-vl"], template)
    with pytest.raises(UserError) as e:
        prompts.check_rendered_prompt(proc, rows(kind)[0], "student", where="data source d.jsonl")
    msg = str(e.value)
    assert behaviour in msg and "Qwen/Qwen2.5-VL-3B-Instruct" in msg and f"(id='{kind}-1', student view)" in msg
    assert ("data.view: teacher" in msg) == (kind == "image")  # the text view is the way out for image turns


def _folder_with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of a model folder whose tokenizer carries ``template``."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(dst))
    tok.chat_template = template
    tok.save_pretrained(str(dst))
    return dst


def test_data_module_setup_checks_student_and_teacher_templates(tiny_models, synth_data, tmp_path):
    """The data module renders a prompt of every source with the model's template at setup (view student), and
    with the teacher's in the teacher view when the LightningModule has a teacher (OPD)."""
    from transformers import AutoTokenizer

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource

    src = [DataSource(str(synth_data["train_text"]), limit=4)]
    bad = _folder_with_template(tiny_models["teacher"], tmp_path / "bad", LOOP + END)
    dm = ReasoningDataModule(train=src, val=src, processor=str(bad))
    with pytest.raises(UserError, match="renders the user turn's content as nothing") as e:
        dm.setup("fit")
    assert f"data source {synth_data['train_text']}" in str(e.value) and str(bad) in str(e.value)

    good = AutoTokenizer.from_pretrained(str(tiny_models["teacher"]))
    bad_teacher = AutoTokenizer.from_pretrained(str(bad))
    dm = ReasoningDataModule(train=src, val=src)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(processor=good, teacher_tokenizer=bad_teacher,
                                                                  collate_mode="prompt", completion_budget=None))
    with pytest.raises(UserError, match="teacher view") as e:
        dm.setup("fit")
    assert f"chat template of {bad}" in str(e.value)
    dm.trainer.lightning_module.teacher_tokenizer = good
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4


def test_benchmark_callback_checks_at_setup(models, synth_data):
    """The benchmark callback renders a prompt of each benchmark when it will evaluate in this stage: a text-only
    model on image problems in the student view is refused before any decoding, naming the benchmark."""
    from vold_pl.callbacks.benchmark import BenchmarkCallback, BenchmarkSpec

    spec = BenchmarkSpec("synthetic", str(synth_data["test"]), limit=2)
    text_only = SimpleNamespace(processor=models["qwen3"])
    with pytest.raises(UserError) as e:
        BenchmarkCallback([spec]).setup(None, text_only, "validate")
    assert "benchmark 'synthetic'" in str(e.value) and "trainer.callbacks.init_args.view: teacher" in str(e.value)
    BenchmarkCallback([spec], view="teacher").setup(None, text_only, "validate")  # the text views render
    BenchmarkCallback([spec], at_fit_end=False).setup(None, text_only, "fit")  # never evaluates in this fit
    BenchmarkCallback([spec]).setup(None, SimpleNamespace(processor=models["qwen2.5-vl"]), "validate")
