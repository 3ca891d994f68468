"""The quickstart reruns its stages when the artifacts they were made from have changed."""

from __future__ import annotations

from pathlib import Path

from vold_pl.quickstart import artifacts_changed


def _artifacts(root: Path) -> Path:
    art = root / "art"
    (art / "data").mkdir(parents=True)
    (art / "tiny" / "student").mkdir(parents=True)
    (art / "data" / "train.jsonl").write_text('{"trace": "1 is option B."}\n')
    (art / "data" / "teacher_text.jsonl").write_text('{"trace": "x"}\n')
    (art / "tiny" / "student" / "tokenizer.json").write_text("{}")
    return art


def test_runs_are_reused_until_the_artifacts_change(tmp_path):
    art, runs = _artifacts(tmp_path), tmp_path / "runs"
    assert artifacts_changed(art, runs) is False  # first run: nothing to redo
    (runs / "teacher_sft").mkdir()  # a stage's output
    assert artifacts_changed(art, runs) is False  # same artifacts: an interrupted run resumes
    (art / "data" / "train.jsonl").write_text('{"trace": "Looking for 1: A. 2 no. B. 1 yes."}\n')
    assert artifacts_changed(art, runs) is True  # regenerated data: every stage reruns
    assert artifacts_changed(art, runs) is False  # ... once; the new fingerprint is kept
    (art / "tiny" / "student" / "tokenizer.json").write_text('{"v": 2}')
    assert artifacts_changed(art, runs) is True  # rebuilt models count too
    (art / "data" / "images").mkdir()
    (art / "data" / "images" / "a.png").write_bytes(b"png")  # images follow the JSONL; not hashed
    assert artifacts_changed(art, runs) is False


def test_outputs_without_a_fingerprint_count_as_stale(tmp_path):
    art, runs = _artifacts(tmp_path), tmp_path / "runs"
    (runs / "teacher_sft" / "export").mkdir(parents=True)  # made before fingerprints existed
    assert artifacts_changed(art, runs) is True
    assert (runs / "artifacts.sha256").is_file() and artifacts_changed(art, runs) is False
