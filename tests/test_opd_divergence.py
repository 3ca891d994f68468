"""The divergence diagnostic (benchmarks/opd_divergence.py): its first divergence is the first token over the
threshold, and the teacher's continuations start from the student's prefix cut there, under the teacher's view."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def diag():
    return load_benchmark("opd_divergence")


def test_the_first_divergence_is_the_first_token_over_the_threshold(diag):
    k1 = torch.tensor([[0.1, 3.0, 5.0, 0.0],   # over 2 nats at 1
                       [0.5, -4.0, 1.9, 1.0],  # never
                       [0.0, 0.2, 0.1, 9.0],   # over only on padding
                       [2.5, 0.0, 0.0, 0.0]])  # at its first token
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    assert diag.first_divergence(k1, mask, 2.0) == [1, None, None, 0]
    assert diag.first_divergence(k1, mask, 4.0) == [2, None, None, None]
    # the same as a loop over the tokens
    for nats in (-1.0, 0.15, 1.0, 2.0, 3.0):
        want = [next((t for t in range(4) if mask[i, t] and k1[i, t] > nats), None) for i in range(4)]
        assert diag.first_divergence(k1, mask, nats) == want, nats


@pytest.mark.parametrize("nats", [-1e9, 1e9])
def test_the_teacher_continues_from_the_students_prefix_under_its_own_view(diag, synth_data, nats):
    """The shipped toy models (the perceiving student, which answers nothing yet, and the SFT'd teacher). At a
    threshold every token is over, every rollout diverges at its first token, so "before" is the teacher's own
    greedy answer from its prompt (generated here from the rendered text view, unpadded), right as the teacher is;
    "after" starts with the student's first token. At a threshold none is over, nothing is continued."""
    from vold_pl.data.sources import read_records, to_dataset
    from vold_pl.prompts import DEFAULT_INSTRUCTION, render_messages, teacher_prompt
    from vold_pl.quickstart import PRETRAINED

    seen = [r for r in read_records(synth_data["train"])[0] if r.images and r.text_view]
    # text views of different lengths: the shorter teacher prompt is left-padded in the batch, not in the check
    records = [seen[0], next(r for r in seen if abs(len(r.text_view) - len(seen[0].text_view)) > 20)]
    # a hot sampler: the student's first token is seldom the "<think>" that the teacher and its greedy self write
    module = diag.build_module(str(PRETRAINED / "perception"), str(PRETRAINED / "teacher"), group_size=2,
                               temperature=30.0, max_new_tokens=8)
    torch.manual_seed(0)
    rows = diag.diagnose(module, records, nats, batch_size=2, max_new_tokens=96, progress=lambda s: None,
                         student=True)
    assert [r["id"] for r in rows] == [records[0].id] * 2 + [records[1].id] * 2
    assert all(r["success"] == 0 for r in rows)  # the perceiving student states facts, no answer
    summary = diag.summarize(rows)
    assert summary["rollouts"] == 4 and summary["failed"] == 4
    if nats > 0:
        assert all(r["t_star"] is None and "before" not in r for r in rows)
        assert summary["failed_with_divergence"] == 0.0 and summary["teacher_before"] is None
        return
    tok, teacher = module.teacher_tokenizer, module.teacher
    for r in rows:
        assert r["t_star"] == 0 and r["prefix"] == ""
        row = to_dataset(records)[[x.id for x in records].index(r["id"])]  # the row the collator reads
        msgs, available = teacher_prompt(row, DEFAULT_INSTRUCTION)
        assert available
        ids = torch.tensor([tok(render_messages(tok, msgs), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=96,
                                   do_sample=False, pad_token_id=tok.pad_token_id)
        assert r["before"] == tok.decode(out[0, ids.size(1):], skip_special_tokens=True)
        assert r["teacher_top"] == tok.decode(out[0, ids.size(1): ids.size(1) + 1])
        assert r["after"].lstrip().startswith(r["student_token"].strip())
        # the student goes on from the teacher's token (corrected) and from its own (kept)
        assert r["corrected"].lstrip().startswith(r["teacher_top"].strip())
        assert r["kept"].lstrip().startswith(r["student_token"].strip())
        assert r["corrected_ok"] in (0.0, 1.0) and r["kept_ok"] in (0.0, 1.0)
    assert any(r["teacher_top"] != r["student_token"] for r in rows)  # so corrected and kept start apart
    assert summary["failed_with_divergence"] == 1.0
    assert 0.0 <= summary["student_corrected"] <= 1.0 and 0.0 <= summary["student_kept"] <= 1.0
    assert summary["teacher_before"] == 1.0  # from its own prompt the teacher answers both problems right


def test_the_student_continues_greedily_under_its_own_view(diag, synth_data):
    """``student_continues``: each token it adds is the argmax of the student's logits, with the image, over the
    sampler's support, checked by one forward pass over the whole sequence (no generation cache); the given tokens
    are kept as they are."""
    from vold_pl.data.collate import PromptCollator
    from vold_pl.data.sources import read_records, to_dataset
    from vold_pl.quickstart import PRETRAINED
    from vold_pl.rl.rollout_types import blocked_token_ids

    rec = next(r for r in read_records(synth_data["val"])[0] if r.images)
    module = diag.build_module(str(PRETRAINED / "perception"), str(PRETRAINED / "teacher"), group_size=2,
                               temperature=1.0, max_new_tokens=8)
    tok = module.tokenizer
    one = PromptCollator(module.processor)([to_dataset([rec])[0]])
    given = torch.tensor(tok("<think> I see", add_special_tokens=False)["input_ids"])  # [c]
    text, new = diag.student_continues(module, one, given, 24)
    assert text.startswith("<think> I see") and 0 < new.numel() <= 24
    ids = torch.cat([one["input_ids"][0], given, new])[None]  # [1, P + c + new]
    P = one["input_ids"].size(1) + given.numel()
    mm = torch.cat([one["mm_token_type_ids"][0], torch.zeros(ids.size(1) - one["input_ids"].size(1),
                                                             dtype=torch.long)])[None]
    with torch.no_grad():
        logits = module.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=one["pixel_values"],
                              image_grid_thw=one["image_grid_thw"], mm_token_type_ids=mm).logits[0].float()
    logits[:, list(blocked_token_ids(tok))] = float("-inf")
    assert torch.equal(logits[P - 1 : ids.size(1) - 1].argmax(-1), new)
