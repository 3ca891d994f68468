"""Foundation tests: tokenizer, teacher/student alignment, SFT label masking, mixed batches, record validation,
the mixing sampler, the HF export and the ``vold-pl`` CLI.

Everything runs offline on the session fixtures of ``conftest.py`` (tiny models, a small synthetic data set).
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vold_pl.data import schema
from vold_pl.data.collate import (
    IGNORE_INDEX,
    PromptCollator,
    SFTCollator,
    encode_prompts,
    student_messages,
    target_text,
)
from vold_pl.data.datamodule import MixedSampler, ReasoningDataModule
from vold_pl.data.schema import RecordError, read_jsonl
from vold_pl.data.sources import DataSource, read_records, to_dataset
from vold_pl.models.factory import ModelSpec, check_tokenizers_aligned, load_model, load_processor
from vold_pl.models.processor import Qwen2_5_VLImageTextProcessor

# In-process CLI calls pass ``args`` while pytest has its own ``sys.argv``; Lightning warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
REASONING = ["<think>", "</think>", "<answer>", "</answer>"]


# ---------------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def student_processor(tiny_models):
    return Qwen2_5_VLImageTextProcessor.from_pretrained(str(tiny_models["student"]))


@pytest.fixture(scope="module")
def rows(synth_data):
    """Rows as the data module hands them to a collator: a ``datasets`` row, images decoded to PIL."""
    img, _ = read_records(synth_data["train"])
    txt, _ = read_records(synth_data["train_text"])
    ds_img, ds_txt = to_dataset(img[:8]), to_dataset(txt[:8])
    return {"image": [ds_img[i] for i in range(8)], "text": [ds_txt[i] for i in range(8)]}


def _image_tokens(grid_thw: torch.Tensor, merge: int = 2) -> int:
    return int(grid_thw.prod(-1).sum()) // (merge * merge)


# ---------------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_special_tokens(student_processor):
    tok = student_processor.tokenizer
    chat = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many red squares are there?<|im_end|>\n"
            "<|im_start|>assistant\n<think> Red squares: a red square in row 2, column 1. That makes 1. </think>"
            "<answer> 1 </answer><|im_end|>")
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == chat

    for t in CHAT_SPECIALS:
        tid = tok.convert_tokens_to_ids(t)
        assert tok(t, add_special_tokens=False)["input_ids"] == [tid], f"{t} is not a single token"
        assert t in tok.all_special_tokens, f"{t} should be a special token"
    for t in REASONING:
        tid = tok.convert_tokens_to_ids(t)
        assert tid != tok.unk_token_id and tok(t, add_special_tokens=False)["input_ids"] == [tid], t
        assert t not in tok.all_special_tokens, f"{t} must not be special (rewards read it after decoding)"

    text = "<think> 2 + 3 = 5 </think><answer> 5 </answer>"
    ids = tok(text + "<|im_end|><|endoftext|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    # the tags stay whole tokens when glued to other text
    glued = tok("x<think>y</think>z", add_special_tokens=False)["input_ids"]
    for t in ("<think>", "</think>"):
        assert tok.convert_tokens_to_ids(t) in glued


def test_chat_template_renders_image_placeholder(student_processor, rows):
    tok = student_processor.tokenizer
    row = rows["image"][0]
    rendered = tok.apply_chat_template(student_messages(row), add_generation_prompt=True, tokenize=False)
    assert rendered.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert rendered.endswith("<|im_start|>assistant\n")
    assert row["problem"] in rendered
    # the processor expands the one placeholder to one <|image_pad|> per merged patch
    enc = student_processor(text=[rendered], images=row["images"], return_tensors="pt")
    n_pad = int((enc["input_ids"] == student_processor.image_token_id).sum())
    assert n_pad == _image_tokens(enc["image_grid_thw"]) > 1


# ---------------------------------------------------------------------------------------------------- alignment

def test_teacher_and_student_token_ids_identical(tiny_models, synth_data):
    from transformers import AutoTokenizer

    s_tok = load_processor(ModelSpec(str(tiny_models["student"]))).tokenizer
    t_tok = load_processor(ModelSpec(str(tiny_models["teacher"])))
    t_auto = AutoTokenizer.from_pretrained(str(tiny_models["teacher"]))
    recs, _ = read_jsonl(synth_data["val_text"])
    texts = [r.problem for r in recs[:10]] + [target_text(r.to_json()) for r in recs[:10]]
    texts.append("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>")
    for text in texts:
        ids = s_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == t_tok(text, add_special_tokens=False)["input_ids"] == t_auto(text, add_special_tokens=False)["input_ids"]
    check_tokenizers_aligned(s_tok, t_tok, student_vocab=len(s_tok), teacher_vocab=len(t_tok))


def test_check_tokenizers_aligned_rejects_other_tokenizer(tiny_models):
    from vold_pl.toy.tiny import train_tokenizer

    s_tok = load_processor(ModelSpec(str(tiny_models["student"]))).tokenizer
    other = train_tokenizer(["completely different corpus about apples and pears"] * 20, vocab_size=300)
    assert len(other) != len(s_tok)
    with pytest.raises(ValueError, match="do not line up") as ei:
        check_tokenizers_aligned(s_tok, other)
    assert "<think>" in str(ei.value)  # the message names the mismatched token
    # a teacher whose output layer is smaller than the student's vocabulary is refused too
    with pytest.raises(ValueError, match="smaller than the student tokenizer"):
        check_tokenizers_aligned(s_tok, s_tok, student_vocab=len(s_tok), teacher_vocab=len(s_tok) - 1)


# ---------------------------------------------------------------------------------------------------- SFT labels

def test_sft_labels_mask_prompt_and_padding(student_processor, rows):
    tok = student_processor.tokenizer
    batch_rows = [rows["image"][0], rows["text"][1], rows["image"][2], rows["text"][3]]
    batch = SFTCollator(student_processor)(batch_rows)
    prompts = encode_prompts(student_processor, batch_rows)["input_ids"]
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    assert batch["truncated"] == 0
    # every image placeholder is masked, and there is one per merged patch of each image
    img_pos = ids == student_processor.image_token_id
    assert int(img_pos.sum()) == _image_tokens(batch["image_grid_thw"])
    assert (labels[img_pos] == IGNORE_INDEX).all()
    for i, (row, prompt) in enumerate(zip(batch_rows, prompts)):
        n = int(mask[i].sum())
        p = len(prompt)
        assert ids[i, :p].tolist() == prompt
        assert (labels[i, :p] == IGNORE_INDEX).all(), "a prompt token is learned"
        assert (labels[i, p:n] != IGNORE_INDEX).all(), "a target token is masked"
        assert (labels[i, n:] == IGNORE_INDEX).all() and (ids[i, n:] == tok.pad_token_id).all(), "padding is learned"
        assert labels[i, p:n].tolist() == ids[i, p:n].tolist()
        assert tok.decode(labels[i, p:n].tolist()) == target_text(row) + "<|im_end|>"
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert batch["mm_token_type_ids"].tolist() == img_pos.long().tolist()


def test_sft_truncation_is_counted(student_processor, rows):
    r = rows["text"][0]
    p = len(encode_prompts(student_processor, [r])["input_ids"][0])
    batch = SFTCollator(student_processor, max_length=p + 3)([r])
    assert batch["truncated"] == 1 and batch["input_ids"].shape[1] == p + 3
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 3
    with pytest.raises(ValueError, match="above max_length"):
        SFTCollator(student_processor, max_length=p - 1)([r])


def test_mixed_text_image_batch_forward_backward(tiny_models, rows):
    from vold_pl.modules.sft import completion_nll

    model, processor = load_model(ModelSpec(str(tiny_models["student"])))
    model.train()
    batch_rows = [rows["text"][0], rows["image"][1], rows["text"][2], rows["image"][3], rows["image"][4]]
    batch = SFTCollator(processor)(batch_rows)
    n_images = sum(len(r["images"]) for r in batch_rows)
    grid = batch["image_grid_thw"]
    assert grid.shape == (n_images, 3)
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                     "mm_token_type_ids")}
    out = model(**inputs, use_cache=False)
    loss, acc, n = completion_nll(out.logits, batch["labels"])
    # the reference, one labelled position at a time: the logits one step earlier predict it
    nll, hits = [], 0
    for i, t in (batch["labels"] != IGNORE_INDEX).nonzero().tolist():
        row, target = out.logits[i, t - 1].float(), int(batch["labels"][i, t])
        nll.append(-torch.log_softmax(row.detach(), -1)[target].item())
        hits += int(row.argmax()) == target
    assert n == len(nll) > 0
    assert loss.item() == pytest.approx(sum(nll) / n, rel=1e-5)
    assert acc.item() == pytest.approx(hits / n)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(name.startswith("model.visual") and g.abs().sum() > 0 for name, g in grads.items()), \
        "image rows must reach the vision tower"
    # a text-only batch needs no pixels at all
    text_batch = SFTCollator(processor)([rows["text"][5], rows["text"][6]])
    assert "pixel_values" not in text_batch
    out = model(**{k: text_batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}, use_cache=False)
    loss, _, n = completion_nll(out.logits, text_batch["labels"])
    assert n == int((text_batch["labels"] != IGNORE_INDEX).sum()) and 0.1 < loss.item() < 20  # finite, not degenerate


# ---------------------------------------------------------------------------------------------------- bad records

def _good(rid: str = "r1", **kw) -> dict:
    rec = {"id": rid, "problem": "Is there a red square?", "answer": "yes", "answer_type": "yesno",
           "images": ["img/ok.png"], "difficulty": 1}
    rec.update(kw)
    return rec


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# (case id, second line of the file, field named in the error or None, extra check on the message)
BAD_RECORDS = [
    ("missing_field", json.dumps(_without(_good("r2"), "answer")), "answer", "missing required field"),
    ("wrong_type", json.dumps(_good("r2", answer=3)), "answer", "expected a string"),
    ("unknown_answer_type", json.dumps(_good("r2", answer_type="essay")), "answer_type", "unknown answer type"),
    ("bad_choice_letter", json.dumps(_good("r2", answer_type="choice", choices=["1", "2", "3"], answer="E")),
     "answer", "not an option letter"),
    ("bad_yesno", json.dumps(_good("r2", answer="maybe")), "answer", "not yes/no"),
    ("bad_bbox", json.dumps(_good("r2", answer_type="bbox", answer="[1, 2, 3]")), "answer", "not a box"),
    ("missing_image", json.dumps(_good("r2", images=["img/nope.png"])), "images", "not found"),
    ("corrupt_image", json.dumps(_good("r2", images=["img/corrupt.png"])), "images", "unreadable image"),
    ("image_too_large", json.dumps(_good("r2", images=["img/big.png"])), "images", "above the limit"),
    ("invalid_json", '{"id": "r2", "problem": "x",', None, "not valid JSON"),
    ("duplicate_id", json.dumps(_good("r1")), "id", "duplicate id"),
    ("bad_difficulty", json.dumps(_good("r2", difficulty=5)), "difficulty", "integer 1..3"),
    ("bad_difficulty_bool", json.dumps(_good("r2", difficulty=True)), "difficulty", "integer 1..3"),
    ("unknown_field", json.dumps(_good("r2", question="x")), "question", "unknown field"),
    ("images_not_list", json.dumps(_good("r2", images="img/ok.png")), "images", "list of path strings"),
]


def _data_dir(root: Path, monkeypatch) -> Path:
    """A folder with a good image, a corrupt one and a 'large' one (the pixel limit is lowered to 30x30)."""
    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 28), (255, 0, 0)).save(img / "ok.png")
    Image.new("RGB", (56, 56), (0, 0, 255)).save(img / "big.png")
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 30 * 30)
    return root


@pytest.mark.parametrize("case,line,field,msg", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_names_file_line_field(tmp_path, monkeypatch, case, line, field, msg):
    root = _data_dir(tmp_path, monkeypatch)
    path = root / "data.jsonl"
    path.write_text(json.dumps(_good("r1")) + "\n" + line + "\n" + json.dumps(_good("r3")) + "\n")
    with pytest.raises(RecordError) as ei:
        read_jsonl(path)
    text = str(ei.value)
    assert f"{path}:2" in text, text
    if field is not None:
        assert f"field '{field}'" in text, text
    assert msg in text, text
    # skip mode keeps the good lines and reports the bad one with the same message
    recs, skipped = read_jsonl(path, on_bad_record="skip")
    assert [r.id for r in recs] == ["r1", "r3"] and skipped == [text]


def test_good_record_resolves_image_paths(tmp_path, monkeypatch):
    root = _data_dir(tmp_path, monkeypatch)
    path = root / "data.jsonl"
    path.write_text(json.dumps(_good("r1")) + "\n\n" + json.dumps(_good("r2", images=[])) + "\n")
    recs, skipped = read_jsonl(path)
    assert skipped == [] and recs[0].images == [str(root / "img" / "ok.png")] and recs[1].images == []


def test_datamodule_skip_counts_and_lists_bad_records(tmp_path, monkeypatch, tiny_models):
    root = _data_dir(tmp_path, monkeypatch)
    path = root / "data.jsonl"
    good = [json.dumps(_good(f"g{i}")) for i in range(3)]
    bad = [line for _, line, _, _ in BAD_RECORDS if '"id": "r1"' not in line]  # all but the duplicate case
    path.write_text("\n".join(good[:2] + bad + good[2:] + [json.dumps(_good("g0"))]) + "\n")  # + a duplicate

    with pytest.raises(RecordError):
        ReasoningDataModule(train=[DataSource(str(path))], processor=str(tiny_models["student"])).setup("fit")

    monkeypatch.chdir(tmp_path)  # without a trainer, the list goes to the working directory
    dm = ReasoningDataModule(train=[DataSource(str(path))], processor=str(tiny_models["student"]),
                             on_bad_record="skip", batch_size=2)
    dm.setup("fit")
    assert len(dm.skipped) == len(bad) + 1
    assert len(dm.datasets["train"]) == 3
    listed = (tmp_path / "skipped_records.txt").read_text().strip().splitlines()
    assert listed == dm.skipped
    assert all(f"{path}:" in m for m in listed)
    assert dm.state_dict()["skipped"] == len(bad) + 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and "labels" in batch


# ---------------------------------------------------------------------------------------------------- sampler

def _draws(sampler: MixedSampler) -> list[int]:
    return list(iter(sampler))


def test_mixed_sampler_deterministic():
    a = MixedSampler([30, 20], [1.0, 1.0], 100, seed=3)
    b = MixedSampler([30, 20], [1.0, 1.0], 100, seed=3)
    assert _draws(a) == _draws(b)
    a.set_epoch(1)
    b.set_epoch(1)
    e1 = _draws(a)
    assert e1 == _draws(b)
    a.set_epoch(0)
    assert e1 != _draws(a)
    assert _draws(MixedSampler([30, 20], [1.0, 1.0], 100, seed=4)) != _draws(b)
    assert all(0 <= i < 50 for i in e1) and len(e1) == len(a) == 100


def test_mixed_sampler_weights_and_walk_order():
    n, p = 1000, 0.8
    draws = _draws(MixedSampler([400, 300], [4.0, 1.0], n, seed=0))  # unnormalised 0.8 / 0.2
    k = sum(i < 400 for i in draws)
    std = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) < 4 * std, (k, n * p, std)
    # each source is walked without repetition until exhausted
    first = [i for i in draws if i < 400][:400]
    assert len(set(first)) == len(first)
    second = [i - 400 for i in draws if i >= 400]
    assert len(set(second)) == len(second) and all(0 <= i < 300 for i in second)
    # a zero weight never draws its source
    assert all(i < 10 for i in _draws(MixedSampler([10, 10], [1.0, 0.0], 200, seed=1)))
    with pytest.raises(ValueError):
        MixedSampler([10, 10], [1.0], 5)
    with pytest.raises(ValueError):
        MixedSampler([10, 10], [0.0, 0.0], 5)


def test_mixed_sampler_ranks_disjoint():
    sizes, weights, per_rank, world = [600, 400], [0.5, 0.5], 150, 2
    full = _draws(MixedSampler(sizes, weights, per_rank * world, seed=7))
    ranks = [_draws(MixedSampler(sizes, weights, per_rank, seed=7, rank=r, world_size=world)) for r in range(world)]
    assert [len(r) for r in ranks] == [per_rank] * world
    assert not set(ranks[0]) & set(ranks[1])
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]


def test_mixed_sampler_start_skips_consumed_prefix():
    s = MixedSampler([30, 20], [0.6, 0.4], 64, seed=2, rank=1, world_size=2)
    full = _draws(s)
    s.start = 23
    assert len(s) == 64 - 23
    assert _draws(s) == full[23:]
    assert s.start == 0 and _draws(s) == full  # the skip applies once, to the resumed epoch


# ---------------------------------------------------------------------------------------------------- export

def test_sft_export_reloads_with_plain_transformers(tmp_path, tiny_models, synth_data):
    import lightning as L
    from transformers import AutoModelForImageTextToText

    from vold_pl.modules.base import OptimConfig
    from vold_pl.modules.sft import SFTModule

    spec = ModelSpec(str(tiny_models["student"]))
    initial, _ = load_model(spec)
    export = tmp_path / "export"
    module = SFTModule(spec, OptimConfig(lr=5e-3), export_dir=str(export))
    dm = ReasoningDataModule(train=[DataSource(str(synth_data["train"]), 0.5),
                                    DataSource(str(synth_data["train_text"]), 0.5)],
                             val=[DataSource(str(synth_data["val"]))], batch_size=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert (export / "model.safetensors").is_file()

    reloaded = AutoModelForImageTextToText.from_pretrained(str(export))
    processor = Qwen2_5_VLImageTextProcessor.from_pretrained(str(export))
    trained = module.model.state_dict()
    reloaded_sd = reloaded.state_dict()
    assert set(trained) == set(reloaded_sd)
    for k, v in trained.items():
        assert torch.equal(v.cpu(), reloaded_sd[k]), k
    changed = [k for k, v in initial.state_dict().items() if not torch.equal(v, trained[k])]
    assert changed, "three optimizer steps changed no weight"

    row = to_dataset(read_records(synth_data["val"])[0][:2])
    prompt = PromptCollator(processor)([row[0], row[1]])
    inputs = {k: prompt[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                      "mm_token_type_ids")}
    reloaded.eval()
    module.model.eval()
    with torch.no_grad():
        out = reloaded.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        ref = module.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    width = prompt["input_ids"].shape[1]
    assert out.shape == (2, width + 4)
    assert torch.equal(out[:, :width], prompt["input_ids"])
    assert torch.equal(out, ref), "the export generates differently from the trained model"


# ---------------------------------------------------------------------------------------------------- CLI

def _run_cli(args: list[str]) -> None:
    from vold_pl.cli import main

    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), f"vold-pl {' '.join(args)} exited with {e.code}"


def _val_losses(metrics_csv: Path) -> list[tuple[int, float]]:
    with metrics_csv.open() as fh:
        return [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(fh) if r.get("val/loss")]


def test_cli_fit_lowers_val_loss(tmp_path, tiny_models, synth_data, capsys):
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 30, "val_check_interval": 6,
            "limit_val_batches": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 6,
            "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
            "gradient_clip_val": 1.0, "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "logs"), "name": "sft"}},
        },
        "model": {"class_path": "vold_pl.modules.sft.SFTModule",
                  "init_args": {"model": {"name_or_path": str(tiny_models["student"])},
                                "optim": {"lr": 1.0e-2, "warmup_steps": 3}, "export": False}},
        # image rows only: their prompts are short (the text twins carry a long caption), so steps are cheap
        "data": {"train": [{"path": str(synth_data["train"])}], "val": [{"path": str(synth_data["val"])}],
                 "batch_size": 8},
    }
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(config))

    _run_cli(["fit", "--config", str(cfg), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["optim"]["lr"] == 1.0e-2
    assert printed["data"]["on_bad_record"] == "error"
    assert printed["trainer"]["use_distributed_sampler"] is False

    _run_cli(["fit", "--config", str(cfg)])
    losses = _val_losses(tmp_path / "logs" / "sft" / "version_0" / "metrics.csv")
    assert [s for s, _ in losses] == [5, 11, 17, 23, 29]
    first, last = losses[0][1], losses[-1][1]
    assert math.isfinite(last) and last < 0.6 * first, losses


def test_cli_help_documents_options(capsys):
    _run_cli(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--data.on_bad_record" in out
    assert "stops at the first malformed record naming file, line and field" in out
    assert "--data.batch_size" in out and "--trainer.max_steps" in out


def _class_paths(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "class_path" and isinstance(v, str):
                yield v
            else:
                yield from _class_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _class_paths(v)


CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_config_parses(config, capsys, monkeypatch):
    if "rounds" in (yaml.safe_load(config.read_text()) or {}):
        pytest.skip("a vold_pl.rounds driver config, not a vold-pl one (tests/test_rounds.py parses it)")
    for cp in _class_paths(yaml.safe_load(config.read_text())):
        if "." not in cp:
            continue  # a short class name (OPDGRPOModule): the CLI resolves it
        module = cp.rsplit(".", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            pytest.skip(f"{config.name}: class_path {cp} does not import yet ({e})")
    monkeypatch.chdir(REPO)  # configs use paths relative to the repository root
    cfg = yaml.safe_load(config.read_text()) or {}
    # An overlay (configs/examples: a logger, LoRA, a reward plugin) names no model class: it is parsed as
    # documented, stacked on a whole fit config.
    base = [] if "class_path" in (cfg.get("model") or {"class_path": None}) else [
        "--config", str(REPO / "configs/quickstart/opd_grpo.yaml")]
    _run_cli(["fit", *base, "--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "trainer" in printed and "model" in printed and "data" in printed
