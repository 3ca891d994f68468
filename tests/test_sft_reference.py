"""The SFT loss against a reference written out by hand: next-token NLL on the completion tokens only.

The reference builds its (logits row, target) pairs with an explicit loop over positions — position ``t`` of a
row predicts its token ``t + 1``, and only target tokens that the collator marked as completion count — and hands
them to ``torch.nn.functional.cross_entropy``. The module's loss and its gradient must equal it. Without the
one-token shift (the model then learns to copy its input) or with padding / prompt tokens counted, they do not.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vold_pl.data.collate import IGNORE_INDEX, SFTCollator, encode_prompts, target_text
from vold_pl.data.sources import read_records, to_dataset
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.sft import SFTModule, completion_nll, completion_nll_from_hidden

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`:UserWarning")


def _reference_pairs(logits: torch.Tensor, ids: torch.Tensor, prompt_lens: list[int], target_lens: list[int]):
    """(logit rows [K, V], targets [K]) from the prompt/target lengths alone, not from the labels tensor."""
    rows, targets = [], []
    for i, (p, n) in enumerate(zip(prompt_lens, target_lens)):
        for pos in range(p, p + n):  # every target token, the closing <|im_end|> included
            rows.append(logits[i, pos - 1])  # predicted by the position before it
            targets.append(int(ids[i, pos]))
    return torch.stack(rows).float(), torch.tensor(targets)


@pytest.fixture(scope="module")
def sft_batch(tiny_models, synth_data):
    """A padded batch of two image rows and two text rows of different lengths, with their prompt/target sizes."""
    module = SFTModule(ModelSpec(str(tiny_models["student"])), export=False)
    module.configure_model()
    module.model.eval()  # no dropout: the module and the reference see the same function
    img, _ = read_records(synth_data["train"])
    txt, _ = read_records(synth_data["train_text"])
    ds_img, ds_txt = to_dataset(img[:2]), to_dataset(txt[:2])
    rows = [ds_img[0], ds_txt[0], ds_img[1], ds_txt[1]]
    batch = SFTCollator(module.processor)(rows)
    tok = module.tokenizer
    prompt_lens = [len(p) for p in encode_prompts(module.processor, rows)["input_ids"]]
    target_lens = [len(tok(target_text(r), add_special_tokens=False)["input_ids"]) + 1 for r in rows]  # + EOS
    return module, batch, prompt_lens, target_lens


def test_sft_loss_and_gradient_equal_shifted_cross_entropy(sft_batch):
    module, batch, prompt_lens, target_lens = sft_batch
    width = batch["input_ids"].shape[1]
    assert len(set(p + n for p, n in zip(prompt_lens, target_lens))) > 1, "rows should differ in length (padding)"
    assert max(p + n for p, n in zip(prompt_lens, target_lens)) == width

    params = [p for p in module.model.parameters() if p.requires_grad]
    module.model.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)  # the module's own loss (no trainer: logging is a no-op)
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]

    module.model.zero_grad(set_to_none=True)
    logits = module.model(**module.model_inputs(batch), use_cache=False).logits  # [B, T, V]
    rows, targets = _reference_pairs(logits, batch["input_ids"], prompt_lens, target_lens)
    assert rows.shape[0] == sum(target_lens)
    ref = F.cross_entropy(rows, targets)  # mean over the completion tokens of the whole batch
    ref.backward()

    assert math.isfinite(ref.item()) and ref.item() > 0.1
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads)


def test_completion_nll_accuracy_and_count_by_hand(sft_batch):
    module, batch, prompt_lens, target_lens = sft_batch
    with torch.no_grad():
        logits = module.model(**module.model_inputs(batch), use_cache=False).logits  # [B, T, V]
    loss, acc, n = completion_nll(logits, batch["labels"])
    rows, targets = _reference_pairs(logits, batch["input_ids"], prompt_lens, target_lens)
    assert n == sum(target_lens)
    nll = [-torch.log_softmax(r, -1)[t].item() for r, t in zip(rows, targets)]
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    hits = sum(int(r.argmax()) == int(t) for r, t in zip(rows, targets))
    assert acc.item() == pytest.approx(hits / len(nll))


def test_completion_nll_small_hand_values():
    # One row of 4 positions over a vocabulary of 3: labels [-100, 2, 0, -100] (a prompt token, two targets,
    # padding). Position 0 predicts label 2, position 1 predicts label 0; positions 2 and 3 predict nothing.
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 5.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX]])
    loss, acc, n = completion_nll(logits, labels)
    nll0 = -(2.0 - math.log(1 + math.e + math.e ** 2))  # -log softmax([0, 1, 2])[2]
    nll1 = -(3.0 - math.log(math.e ** 3 + 2))  # -log softmax([3, 0, 0])[0]
    assert n == 2
    assert loss.item() == pytest.approx((nll0 + nll1) / 2, rel=1e-6)
    assert acc.item() == 1.0  # both argmaxes hit their targets
    # no target token at all: loss and accuracy are 0, never NaN
    loss, acc, n = completion_nll(logits, torch.full((1, 4), IGNORE_INDEX))
    assert n == 0 and loss.item() == 0.0 and acc.item() == 0.0


def test_the_head_on_target_positions_only_gives_the_full_logits_loss_and_gradient():
    """The LM head applied only where a target is (the module's path) equals the NLL of the full logits, in value,
    accuracy, count and gradient; rows with no target and a batch with none at all included."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 6, 8, generator=g, requires_grad=True)  # [B, T, H]
    labels = torch.randint(0, 11, (3, 6), generator=g)  # [B, T]
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, 4:] = IGNORE_INDEX  # padding
    labels[2] = IGNORE_INDEX  # a row with no target
    # the reference: cross-entropy of the full shifted logits, prompt and padding ignored
    logits, targets = head(hidden)[:, :-1], labels[:, 1:]  # [B, T-1, V], [B, T-1]
    mask = targets != IGNORE_INDEX  # [B, T-1]
    n = int(mask.sum())
    nll = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    full = (nll / n, ((logits.argmax(-1) == targets) & mask).sum() / n, n)
    grads_full = torch.autograd.grad(full[0], [hidden, head.weight])
    picked = completion_nll_from_hidden(hidden, head, labels)
    grads_picked = torch.autograd.grad(picked[0], [hidden, head.weight])
    assert picked[2] == full[2] == 3 + 3
    torch.testing.assert_close(picked[0], full[0])
    torch.testing.assert_close(picked[1], full[1])
    for a, b in zip(grads_picked, grads_full):
        torch.testing.assert_close(a, b)
    assert grads_picked[0][2].abs().sum() == 0 and grads_picked[0][0].abs().sum() > 0
    loss, acc, n = completion_nll_from_hidden(hidden, head, torch.full((3, 6), IGNORE_INDEX))
    assert n == 0 and loss.item() == 0.0 and acc.item() == 0.0


def test_validation_and_test_log_the_batch_weighted_nll(sft_batch, synth_data):
    """``val/loss`` and ``test/loss`` of two batches of 3 and 1 rows are their NLLs weighted by batch size, shown
    in the progress bar; the token accuracy is logged beside them."""
    import lightning as L
    from torch.utils.data import DataLoader

    module, _, _, _ = sft_batch
    ds = to_dataset(read_records(synth_data["val_text"])[0][:4])
    rows = [ds[i] for i in range(4)]
    collate = SFTCollator(module.processor)
    batches = [collate(rows[:3]), collate(rows[3:4])]
    with torch.no_grad():
        nll = [completion_nll(module.model(**module.model_inputs(b), use_cache=False).logits, b["labels"])
               for b in batches]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        run(module, dataloaders=loader, verbose=False)
        m = trainer.callback_metrics
        assert m[f"{stage}/loss"].item() == pytest.approx((3 * nll[0][0].item() + nll[1][0].item()) / 4, rel=1e-5)
        assert m[f"{stage}/token_accuracy"].item() == pytest.approx((3 * nll[0][1].item() + nll[1][1].item()) / 4)
        assert f"{stage}/loss" in trainer.progress_bar_metrics


def test_sft_module_options_reach_the_module(tiny_models):
    from vold_pl.modules.base import OptimConfig

    spec = ModelSpec(str(tiny_models["student"]))
    default = SFTModule(spec)
    assert (default.gradient_checkpointing, default.export, default.export_dir, default.seed,
            default.max_consecutive_skips) == (False, True, None, 0, 10)
    optim = OptimConfig(lr=3e-4)
    m = SFTModule(spec, optim, gradient_checkpointing=True, export_dir="out", export=False, seed=7,
                  max_consecutive_skips=3)
    assert (m.optim_cfg, m.gradient_checkpointing, m.export_dir, m.export, m.seed, m.max_consecutive_skips) == (
        optim, True, "out", False, 7, 3)


def test_training_step_logs_the_train_metrics_and_skips_a_non_finite_loss(sft_batch):
    """The training step logs its loss and accuracy as ``train/*`` (the loss in the progress bar, not synced: the
    step's own value), and returns None, skipping the update, when the loss is not finite."""
    module, batch, prompt_lens, target_lens = sft_batch
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, (value, kw))  # the instance's own record
    try:
        with torch.no_grad():
            loss = module.training_step(batch, 0)
            logits = module.model(**module.model_inputs(batch), use_cache=False).logits
        rows, targets = _reference_pairs(logits, batch["input_ids"], prompt_lens, target_lens)
        assert logged.keys() == {"train/loss", "train/token_accuracy", "train/tokens_per_second", "train/truncated"}
        value, kw = logged["train/loss"]
        assert value is loss and float(loss) == pytest.approx(float(F.cross_entropy(rows, targets)), rel=1e-5)
        assert kw == {"prog_bar": True, "batch_size": 4, "sync_dist": False}
        hits = sum(int(r.argmax()) == int(t) for r, t in zip(rows, targets))
        assert float(logged["train/token_accuracy"][0]) == pytest.approx(hits / len(targets))
        assert logged["train/token_accuracy"][1] == {"batch_size": 4, "sync_dist": False}
        assert logged["train/truncated"] == (0.0, {"batch_size": 4, "reduce_fx": "sum"})

        head = module.model.get_output_embeddings().weight
        saved = head.detach().clone()
        skipped = module.skipped_steps
        with torch.no_grad():
            head[0] = float("nan")  # every logit row then has a NaN: the loss is NaN
            assert module.training_step(batch, 0) is None
            head.copy_(saved)
        assert module.skipped_steps == skipped + 1
    finally:
        del module.log
