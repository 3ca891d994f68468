"""Bad input everywhere a user can give it (issue 6): each case fails with an error that names the problem and
what to do, at setup time, or (``on_bad_record: skip``) is a counted skip listed in a file.

The malformed-record cases of ``test_foundation.py`` (missing field, wrong answer type, bad choice letter,
yes/no, bbox, missing / corrupt / oversized image, invalid JSON, duplicate id, difficulty, unknown field, images
not a list) are not repeated; the record cases here cover the other fields and ways. The teacher-tokenizer
mismatch is ``test_opd_grpo.py::test_tokenizer_mismatch_fails_at_construction``; a raising reward is in
``test_faults.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from vold_pl.checkpointing import AtomicCheckpointIO, CheckpointMismatchError, model_fingerprint
from vold_pl.cli import main
from vold_pl.data.datamodule import ReasoningDataModule
from vold_pl.data.schema import RecordError, read_jsonl
from vold_pl.data.sources import DataSource
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.opd_grpo import OPDGRPOModule
from vold_pl.modules.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]


def _good(rid: str = "r1", **kw) -> dict:
    rec = {"id": rid, "problem": "Is there a red square?", "answer": "yes", "answer_type": "yesno", "images": []}
    rec.update(kw)
    return rec


# ------------------------------------------------------------------------------------------------ records

# (case, second line of the file, field named in the error or None, text the error must contain)
RECORDS = [
    ("problem_not_string", json.dumps(_good("r2", problem=7)), "problem", "expected a string, got int"),
    ("problem_empty", json.dumps(_good("r2", problem="  ")), "problem", "empty problem text"),
    ("id_empty", json.dumps(_good("", answer="no")), "id", "empty id"),
    ("id_not_string", json.dumps(_good(5)), "id", "expected a string, got int"),
    ("answer_null", json.dumps(_good("r2", answer=None)), "answer", "missing required field"),
    ("answer_list", json.dumps(_good("r2", answer=["yes"])), "answer", "expected a string, got list"),
    ("answer_bool", json.dumps(_good("r2", answer=True)), "answer", "expected a string, got bool"),
    ("answer_empty", json.dumps(_good("r2", answer="")), "answer", "empty answer"),
    ("answer_type_not_string", json.dumps(_good("r2", answer_type=1)), "answer_type", "expected a string"),
    ("bbox_nan", json.dumps(_good("r2", answer_type="bbox", answer="[1, 2, 3, NaN]")), "answer", "not a box"),
    ("choices_not_list", json.dumps(_good("r2", answer_type="choice", answer="A", choices="A or B")), "choices",
     "list of strings or null"),
    ("choices_too_few", json.dumps(_good("r2", answer_type="choice", answer="A", choices=["only"])), "choices",
     "at least two choices"),
    ("choices_not_strings", json.dumps(_good("r2", answer_type="choice", answer="A", choices=[1, 2])), "choices",
     "list of strings or null"),
    ("images_not_strings", json.dumps(_good("r2", images=[3])), "images", "list of path strings"),
    ("trace_number", json.dumps(_good("r2", trace=12)), "trace", "string or null"),
    ("text_view_list", json.dumps(_good("r2", text_view=["a"])), "text_view", "string or null"),
    ("category_dict", json.dumps(_good("r2", category={"a": 1})), "category", "string or null"),
    ("difficulty_string", json.dumps(_good("r2", difficulty="hard")), "difficulty", "integer 1..3"),
    ("record_not_object", json.dumps([_good("r2")]), None, "must be a JSON object, got list"),
    ("empty_image_file", json.dumps(_good("r2", images=["img/empty.png"])), "images", "unreadable image"),
    ("text_as_image", json.dumps(_good("r2", images=["img/notes.png"])), "images", "unreadable image"),
]


@pytest.mark.parametrize("case,line,field,msg", RECORDS, ids=[c[0] for c in RECORDS])
def test_bad_record_is_named(tmp_path, case, line, field, msg):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    (tmp_path / "img" / "notes.png").write_text("print('not an image')")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_good("r1")) + "\n" + line + "\n" + json.dumps(_good("r3")) + "\n")
    with pytest.raises(RecordError) as ei:
        read_jsonl(path)
    text = str(ei.value)
    assert f"{path}:2" in text and msg in text, text
    if field is not None:
        assert f"field '{field}'" in text, text
    recs, skipped = read_jsonl(path, on_bad_record="skip")
    assert [r.id for r in recs] == ["r1", "r3"] and skipped == [text]


# ------------------------------------------------------------------------------------------------ prompt length

def test_prompt_longer_than_max_length_fails_at_setup_or_is_skipped(tmp_path, tiny_models, monkeypatch):
    path = tmp_path / "data.jsonl"
    long_problem = "How many squares are there? " * 40
    path.write_text("\n".join(json.dumps(r) for r in [
        _good("short1"), _good("too_long", problem=long_problem), _good("short2", answer="no")]) + "\n")
    student = str(tiny_models["student"])
    dm = ReasoningDataModule(train=[DataSource(str(path))], processor=student, max_length=128)
    with pytest.raises(RecordError) as ei:
        dm.setup("fit")
    text = str(ei.value)
    assert str(path) in text and "id='too_long'" in text and "data.max_length=128" in text, text
    assert re.search(r"the prompt is \d+ tokens", text) and "on_bad_record: skip" in text, text

    monkeypatch.chdir(tmp_path)  # without a trainer, the skip list goes to the working directory
    dm = ReasoningDataModule(train=[DataSource(str(path))], processor=student, max_length=128, on_bad_record="skip",
                             batch_size=2)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and len(dm.skipped) == 1 and "too_long" in dm.skipped[0]
    assert (tmp_path / "skipped_records.txt").read_text().strip() == dm.skipped[0]
    batch = next(iter(dm.train_dataloader()))  # the kept rows collate; nothing fails mid-training
    assert sorted(r["id"] for r in batch["records"]) == ["short1", "short2"]


def test_missing_data_file_names_it_and_the_fix(tmp_path, tiny_models):
    dm = ReasoningDataModule(train=[DataSource(str(tmp_path / "nope.jsonl"))], processor=str(tiny_models["student"]))
    with pytest.raises(FileNotFoundError, match=r"data source not found: .*nope\.jsonl.*Generate the synthetic"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------ YAML and options

def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as ei:
        main(args)
    assert ei.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("trainer:\n  max_steps: 3\n  accelerator: [cpu\nmodel:\n")
    err = _cli_error(["fit", "--config", str(cfg)], capsys)
    assert f"config file {cfg}:" in err and "is not valid YAML" in err, err
    cfg.write_text("- a\n- list\n")
    assert "must be a YAML mapping" in _cli_error(["fit", "--config", str(cfg)], capsys)


def test_yaml_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"trainer: !!python/object/apply:os.system ['touch {marker}']\n")
    err = _cli_error(["fit", "--config", str(cfg)], capsys)
    assert "is not valid YAML" in err and "python/object" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("args,needle", [
    (["--trainer.max_stepz", "3"], "trainer.max_stepz"),
    (["--data.batch_size", "many"], "option 'data.batch_size'"),
    (["--data.on_bad_record", "sometimes"], "data.on_bad_record"),
], ids=["unknown_option", "wrong_type", "bad_choice"])
def test_bad_option_is_named(args, needle, capsys):
    err = _cli_error(["fit", "--model", "vold_pl.modules.sft.SFTModule", "--model.model.name_or_path", "x", *args],
                     capsys)
    assert needle in err and "fit --help" in err, err


# ------------------------------------------------------------------------------------------------ checkpoints

def _module(path, cls=SFTModule, **kw):
    m = cls(ModelSpec(str(path)), export=False, **kw)
    m.configure_model()
    return m


def test_checkpoint_of_another_model_is_refused_before_loading(tiny_models, synth_data, tmp_path):
    other = _module(tiny_models["teacher"])  # a text-only Qwen3, not the Qwen2.5-VL student
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict(), "vold_pl": {"fingerprint": model_fingerprint(other)},
                "pytorch-lightning_version": L.__version__}, ckpt)
    student = SFTModule(ModelSpec(str(tiny_models["student"])), export=False)
    dm = ReasoningDataModule(train=[DataSource(str(synth_data["train"]), limit=4)], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=str(tmp_path))
    with pytest.raises(CheckpointMismatchError) as ei:
        trainer.fit(student, datamodule=dm, ckpt_path=str(ckpt))
    text = str(ei.value)
    assert str(tiny_models["teacher"]) in text and str(tiny_models["student"]) in text, text
    assert "qwen3" in text and "qwen2_5_vl" in text and "Resume with the model" in text, text

    # a foreign checkpoint without a vold-pl fingerprint is judged by its weights' shapes
    with pytest.raises(CheckpointMismatchError, match="no vold-pl fingerprint"):
        student.on_load_checkpoint({"state_dict": other.state_dict()})
    student.on_load_checkpoint({"state_dict": student.state_dict()})  # same shapes: accepted


def test_sft_checkpoint_into_rl_run_says_to_use_the_export(tiny_models):
    sft = _module(tiny_models["student"])
    rl = _module(tiny_models["student"], OPDGRPOModule)
    with pytest.raises(CheckpointMismatchError) as ei:
        rl.on_load_checkpoint({"vold_pl": {"fingerprint": model_fingerprint(sft)}})
    assert "written by SFTModule, but this run is OPDGRPOModule" in str(ei.value)
    assert "export" in str(ei.value)


def test_truncated_or_missing_checkpoint(tmp_path):
    good = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:300])
    io = AtomicCheckpointIO()
    with pytest.raises(RuntimeError, match=r"cut\.ckpt cannot be read .*truncated.*earlier checkpoint"):
        io.load_checkpoint(tmp_path / "cut.ckpt")
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope\.ckpt.*'last'"):
        io.load_checkpoint(tmp_path / "nope.ckpt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Evil(marker)}, path)
    with pytest.raises(RuntimeError, match="cannot be read"):
        AtomicCheckpointIO().load_checkpoint(path)  # Lightning's default: torch.load(weights_only=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ security

def test_no_remote_code_or_unsafe_loading_in_the_package():
    assert ModelSpec("x").trust_remote_code is False
    offenders = []
    for f in sorted((REPO / "vold_pl").rglob("*.py")):
        src = f.read_text()
        for pat in (r"trust_remote_code\s*=\s*True", r"\bpickle\.loads?\(", r"(?<![\w.])eval\(", r"\bexec\(",
                    r"yaml\.(unsafe_)?load\(", r"weights_only\s*=\s*False"):
            offenders += [f"{f.name}: {m.group(0)}" for m in re.finditer(pat, src)]
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{f.name}: {m.group(0)}")
    assert not offenders, offenders
