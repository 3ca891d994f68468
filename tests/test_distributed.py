"""FSDP2 through Lightning's ModelParallelStrategy (``vold_pl.sharding``).

The end-to-end test launches a real 2-process run on CPU (gloo): OPD-GRPO with a sharded student, teacher
and reference, where rank 0 only ever sees text-only batches and rank 1 only image batches, and validation
data that does not split evenly over the ranks. The run is a subprocess with a hard timeout and its own
process group, so a hang fails the test (and is killed) instead of blocking the suite.

The other tests are single-process and cheap: the dummy visual forward, the FSDP1 refusal, the even
evaluation sampler and which modules get sharded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import read_records, to_dataset
from vold_pl.sharding import FSDP1_MESSAGE, BackboneHooks, FSDP2Strategy, check_strategy, install_backbone_hooks, shard_blocks
from vold_pl.data.samplers import EvenShardSampler
from vold_pl.rl.unsharded import keeps_ranks_in_step
from vold_pl.memory import local_param_bytes
from vold_pl.models.factory import ModelSpec, load_model, load_processor
from vold_pl.rl.hf_engine import HFGenerateEngine
from vold_pl.rl.rollout_types import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 420  # the 2-rank run takes ~1 min on 2 busy cores; a collective mismatch would hang forever


# ------------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def student(tiny_models):
    model, _ = load_model(ModelSpec(str(tiny_models["student"])))
    return model.eval()


@pytest.fixture(scope="module")
def processor(tiny_models):
    return load_processor(ModelSpec(str(tiny_models["student"])))


def _batch(processor, path: Path, n: int = 2) -> dict:
    recs, _ = read_records(path)
    ds = to_dataset(recs[:n])
    return PromptCollator(processor)([ds[i] for i in range(n)])


def _inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return {k: batch[k] for k in keys if k in batch}


# ----------------------------------------------------------------------------------- dummy visual forward

def test_dummy_visual_forward_is_exact_and_reaches_every_vision_parameter(tiny_models, synth_data, processor):
    model, _ = load_model(ModelSpec(str(tiny_models["student"])))
    text = _inputs(_batch(processor, synth_data["train_text"]))
    assert "pixel_values" not in text
    with torch.no_grad():
        plain = model(**text, use_cache=False).logits

    hooks = install_backbone_hooks(model, dummy_visual=True)
    assert isinstance(hooks, BackboneHooks) and install_backbone_hooks(model) is hooks  # idempotent
    out = model(**text, use_cache=False).logits
    assert hooks.dummy_calls == 1
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # + 0 * features: the values are unchanged

    # Backward reaches every vision parameter with an exact zero: each rank's reduce-scatters line up.
    out.float().logsumexp(-1).mean().backward()
    visual = dict(model.model.visual.named_parameters())
    assert visual and all(p.grad is not None for p in visual.values()), [n for n, p in visual.items() if p.grad is None]
    assert all(float(p.grad.abs().max()) == 0.0 for p in visual.values())
    lm = [p for n, p in model.named_parameters() if "visual" not in n]
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in lm)

    # A batch with images runs the real vision forward only.
    images = _inputs(_batch(processor, synth_data["train"]))
    with torch.no_grad():
        model(**images, use_cache=False)
    assert hooks.dummy_calls == 1

    # generate: the dummy runs at the prefill only, like the real vision forward of an image rank.
    engine = HFGenerateEngine(processor.tokenizer)
    hooks.dummy_calls = 0
    engine.generate(model, _batch(processor, synth_data["train_text"]), 1, SamplingConfig(max_new_tokens=4, do_sample=False))
    assert hooks.dummy_calls == 1
    hooks.remove()


def test_text_only_model_gets_no_dummy(tiny_models):
    teacher, _ = load_model(ModelSpec(str(tiny_models["teacher"])))
    hooks = install_backbone_hooks(teacher, dummy_visual=True)
    assert hooks is not None and not hooks.dummy_visual
    hooks.remove()


# ------------------------------------------------------------------------------------------- configuration

def test_fsdp1_is_refused_naming_model_parallel_strategy(tiny_models):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    with pytest.raises(ValueError, match="ModelParallelStrategy") as ei:
        check_strategy(FSDPStrategy())
    assert "summon_full_params" in str(ei.value) and str(ei.value) == FSDP1_MESSAGE
    for ok in (None, DDPStrategy(), ModelParallelStrategy(), FSDP2Strategy()):
        check_strategy(ok)

    # configure_model refuses before loading any weight.
    from vold_pl.modules.sft import SFTModule

    module = SFTModule(ModelSpec(str(tiny_models["student"])), export=False)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        module.configure_model()
    assert module.model is None


def test_fsdp2_strategy_options():
    s = FSDP2Strategy(frozen="replicate", mixed_precision="bf16", activation_checkpointing=True)
    assert s.sharding.frozen == "replicate" and s.sharding.mixed_precision == "bf16"
    assert s.sharding.activation_checkpointing is True and s._tensor_parallel_size == 1
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        FSDP2Strategy(tensor_parallel_size=2)


def test_shard_units_are_decoder_layers_and_vision_blocks(student, tiny_models):
    blocks = shard_blocks(student)
    names = {type(b).__name__ for b in blocks}
    assert names == {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"}
    cfg = student.config
    assert len(blocks) == cfg.text_config.num_hidden_layers + cfg.vision_config.depth
    teacher, _ = load_model(ModelSpec(str(tiny_models["teacher"])))
    assert {type(b).__name__ for b in shard_blocks(teacher)} == {"Qwen3DecoderLayer"}


def test_rollout_engines_that_keep_ranks_in_step():
    from tests.scripted_engine import ScriptedEngine
    from vold_pl.rl.cached_sampler import CachedSamplingEngine

    tok = SimpleNamespace(convert_tokens_to_ids=lambda t: 0, unk_token_id=None, eos_token_id=1)
    assert keeps_ranks_in_step(HFGenerateEngine(tok))
    assert keeps_ranks_in_step(ScriptedEngine(tok, {}))
    assert not keeps_ranks_in_step(CachedSamplingEngine(tok))
    custom = SimpleNamespace(eos_ids=[1])
    assert not keeps_ranks_in_step(custom)
    custom.keeps_ranks_in_step = True
    assert keeps_ranks_in_step(custom)


def test_adamw8bit_steps_fsdp2_shards_like_plain_adamw8bit(tmp_path):
    """bitsandbytes' fused 8-bit update cannot take DTensors; the sharded AdamW8bit updates each rank's shard
    and matches plain AdamW8bit on an unsharded copy exactly (a 1-rank gloo group, in this process)."""
    import copy

    import bitsandbytes as bnb
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vold_pl.optimizers import make_adamw8bit
    from vold_pl.memory import optimizer_state_bytes

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
        ref = copy.deepcopy(net)
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(net[0], mesh=mesh)
        fully_shard(net, mesh=mesh)
        x = torch.randn(8, 64)
        net(x).square().mean().backward()
        with pytest.raises(RuntimeError, match="DTensor"):
            bnb.optim.AdamW8bit(net.parameters(), lr=1e-2).step()
        net.zero_grad()
        opt = make_adamw8bit(net.parameters(), lr=1e-2, weight_decay=0.1)
        ref_opt = bnb.optim.AdamW8bit(ref.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            x = torch.randn(8, 64)
            for model, o in ((net, opt), (ref, ref_opt)):
                o.zero_grad()
                model(x).square().mean().backward()
                o.step()
        got = {k: v.full_tensor() for k, v in net.state_dict().items()}
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
        assert optimizer_state_bytes(opt) == optimizer_state_bytes(ref_opt)
        assert any(st["state1"].dtype == torch.uint8 for st in opt.state.values())  # 8-bit moments
        opt.state_dict()  # one rank: a plain checkpoint is fine
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n,world", [(5, 2), (4, 2), (1, 2), (7, 3), (0, 2)])
def test_even_shard_sampler_gives_every_rank_the_same_count(n, world):
    shards = [list(EvenShardSampler(n, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and all(len(s) == len(EvenShardSampler(n, r, world))
                                                      for r, s in enumerate(shards))
    assert set().union(*map(set, shards)) == set(range(n))  # every item is evaluated
    assert all(0 <= i < n for s in shards for i in s)


# ------------------------------------------------------------------------------- 2 processes, FSDP2, gloo

RUN_SCRIPT = textwrap.dedent('''
    """2-rank OPD-GRPO under FSDP2 (gloo): rank 0 text-only batches, rank 1 image batches, uneven validation."""
    import json, sys, time
    from datetime import timedelta
    from pathlib import Path

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource
    from vold_pl.data.samplers import EvenShardSampler
    from vold_pl.sharding import FSDP2Strategy, is_fsdp2
    from vold_pl.memory import local_param_bytes, optimizer_state_bytes
    from vold_pl.models.factory import ModelSpec, load_model
    from vold_pl.modules.base import OptimConfig
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.logprobs import model_token_logprobs
    from vold_pl.rl.hf_engine import HFGenerateEngine
    from vold_pl.rl.rollout_types import SamplingConfig

    tiny, data, out, kind = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)


    class RankSplit(ReasoningDataModule):
        """Train source i goes to rank i (text-only to rank 0, images to rank 1); evaluation is split unevenly
        (5 rows over 2 ranks), padded to equal counts by EvenShardSampler."""

        def train_dataloader(self):
            ds = self.datasets["train"].datasets[self.trainer.global_rank]
            return DataLoader(ds, batch_size=self.batch_size, shuffle=False, collate_fn=self._collator(),
                              drop_last=True)

        def _eval_loader(self, split):
            ds = self.datasets[split]
            sampler = EvenShardSampler(len(ds), self.trainer.global_rank, self.trainer.world_size)
            return DataLoader(ds, batch_size=self.val_batch_size, sampler=sampler, collate_fn=self._collator())


    class Probe(L.Callback):
        def __init__(self):
            self.info = {"has_pixels": [], "val_batches": 0}

        def on_train_start(self, trainer, pl_module):
            m = pl_module.model
            self.info["param_bytes_local"] = local_param_bytes(m)
            self.info["frozen_sharded"] = {k: is_fsdp2(f) for k, f in pl_module._frozen.items()}
            self.info["student_sharded"] = is_fsdp2(m)

        @torch.no_grad()
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.info["has_pixels"].append("pixel_values" in batch)
            if batch_idx:
                return
            # Sharded vs unsharded copies, on this rank's own batch (images on rank 1 only), before any update.
            spec = pl_module.model_spec
            plain, _ = load_model(spec)
            plain.eval()
            engine, greedy = HFGenerateEngine(pl_module.tokenizer), SamplingConfig(max_new_tokens=6, do_sample=False)
            ro_sharded = engine.generate(pl_module.model, batch, 1, greedy)
            ro_plain = engine.generate(plain, batch, 1, greedy)
            self.info["greedy_equal"] = torch.equal(ro_sharded.completion_ids, ro_plain.completion_ids)
            ids = torch.cat([ro_plain.prompt_ids, ro_plain.completion_ids], 1)
            attn = torch.cat([ro_plain.prompt_mask, ro_plain.completion_mask], 1)
            start = ro_plain.prompt_ids.size(1)
            extra = dict(ro_plain.extra)
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"],
                                                    torch.zeros_like(ro_plain.completion_ids)], 1)
            diffs = {}
            ref_plain = model_token_logprobs(plain, ids, attn, start, **extra)
            for name, model in (("student", pl_module.model), ("reference", pl_module._frozen["reference"])):
                lp = model_token_logprobs(model, ids, attn, start, chunk_size=3, **extra)
                diffs[name] = float((lp - ref_plain).abs().max())
            teacher_plain, _ = load_model(pl_module.teacher_spec)
            tp = model_token_logprobs(teacher_plain.eval(), ids, attn, start)
            ts = model_token_logprobs(pl_module.teacher, ids, attn, start, chunk_size=3)
            diffs["teacher"] = float((ts - tp).abs().max())
            self.info["logprob_maxdiff"] = diffs

        def on_validation_start(self, trainer, pl_module):
            hooks = pl_module.model._vold_backbone_hooks
            self.info.setdefault("dummy_calls_before_val", hooks.dummy_calls)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.info["val_batches"] += 1
            self.info.setdefault("val_has_pixels", []).append("pixel_values" in batch)

        def on_train_end(self, trainer, pl_module):
            self.info["optim_bytes_local"] = optimizer_state_bytes(pl_module.optimizers().optimizer)
            hooks = getattr(pl_module.model, "_vold_backbone_hooks", None)
            self.info["dummy_calls"] = getattr(hooks, "dummy_calls", None)
            self.info["global_step"] = trainer.global_step
            self.info["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}


    module = OPDGRPOModule(
        ModelSpec(str(tiny / "student")), teacher=ModelSpec(str(tiny / "teacher")),
        optim=OptimConfig(lr=1e-2, schedule="constant"),
        grpo=GRPOConfig(num_generations=2, num_iterations=2, beta_ref=0.04, loss_aggregation="token"),
        opd=OPDConfig(lam=0.5, gate="all"), sampling=SamplingConfig(max_new_tokens=4),
        rewards={"accuracy": 1.0, "format": 0.1}, export_dir=str(out / "export"), log_completions_every_n_steps=0)
    dm = RankSplit(train=[DataSource(str(data / "train_text.jsonl")), DataSource(str(data / "train.jsonl"))],
                   val=[DataSource(str(data / "val_text.jsonl"), limit=2), DataSource(str(data / "val.jsonl"), limit=3)],
                   batch_size=2, val_batch_size=2)
    probe = Probe()
    if kind == "fsdp2":
        strategy = FSDP2Strategy(frozen="shard", timeout=timedelta(seconds=120))
    else:  # plain DDP: no find_unused_parameters, so every vision parameter must get a gradient on every rank
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(timeout=timedelta(seconds=120))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, val_check_interval=2,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[probe],
                        default_root_dir=str(out))
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    probe.info["seconds"] = time.time() - t0
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(probe.info))
''')


def _run_two_ranks(script: Path, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Run ``script`` (which starts a 2-device Lightning Trainer) in its own process group; kill it on timeout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=str(script.parent), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks: Lightning's launcher shares the process group
        out, _ = proc.communicate()
        pytest.fail(f"the 2-rank run did not finish in {timeout}s (a hang); last output:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_opd_grpo_two_ranks_text_rank_and_image_rank(kind, tiny_models, synth_data, tmp_path, student):
    """The issue's acceptance test (``fsdp2``), and the same run under plain DDP, which the dummy vision
    forward also keeps working (no unused vision parameters on the text-only rank)."""
    from safetensors.torch import load_file

    script = tmp_path / "run_two_ranks.py"
    script.write_text(RUN_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    res = _run_two_ranks(script, [str(tiny_models["student"].parent), str(synth_data["train"].parent), str(out),
                                  kind], RUN_TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # The batches really were mixed across ranks: rank 0 never had pixels, rank 1 always did.
    assert ranks[0]["has_pixels"] == [False, False] and ranks[1]["has_pixels"] == [True, True]
    # Rank 0 ran the dummy visual forward in training (rollout prefill and every log-prob pass); rank 1 did
    # not need it there, only in validation, where its padded last batch is text-only while rank 0's has an image.
    assert ranks[0]["dummy_calls_before_val"] > 0 and ranks[1]["dummy_calls_before_val"] == 0
    assert ranks[0]["val_has_pixels"] == [True, True] and ranks[1]["val_has_pixels"] == [True, False]
    assert ranks[1]["dummy_calls"] > 0
    # Trained to the end on both ranks (4 optimizer steps = 2 rollout batches with mu = 2), through a
    # validation on 5 rows split over 2 ranks: 3 rows (2 batches) each after padding.
    for r in ranks:
        assert r["global_step"] == 4
        assert r["val_batches"] == 2
        assert all(v == v and abs(v) != float("inf") for v in r["metrics"].values()), r["metrics"]
        sharded = kind == "fsdp2"
        assert r["student_sharded"] == sharded
        assert r["frozen_sharded"] == {"teacher": sharded, "reference": sharded}
        # Sharded generate is token-for-token the unsharded model's; sharded log-probs equal unsharded ones.
        assert r["greedy_equal"]
        assert max(r["logprob_maxdiff"].values()) < 1e-4, r["logprob_maxdiff"]

    # FSDP2 halves the student: each rank holds about half the single-process parameter bytes (dim-0 shards,
    # padded to a multiple of the world size), and its AdamW state is 2 x its shard.
    single = local_param_bytes(student)
    if kind == "ddp":  # a full replica per rank
        assert all(r["param_bytes_local"] == single for r in ranks)
    for r in ranks if kind == "fsdp2" else []:
        assert abs(r["param_bytes_local"] / single - 0.5) < 0.02, (r["param_bytes_local"], single)
        assert abs(r["optim_bytes_local"] / r["param_bytes_local"] - 2.0) < 0.02
    if kind == "fsdp2":
        assert abs(sum(r["param_bytes_local"] for r in ranks) / single - 1.0) < 0.02

    # The export gathered the full weights on rank 0, and training changed them.
    exported = load_file(str(out / "export" / "model.safetensors"))
    initial = load_file(str(tiny_models["student"] / "model.safetensors"))
    assert exported.keys() == initial.keys()
    assert all(exported[k].shape == initial[k].shape for k in initial)
    changed = [k for k in initial if not torch.equal(exported[k], initial[k])]
    assert any("visual" not in k for k in changed)


def test_fsdp_config_parses(capsys, monkeypatch):
    import yaml

    from vold_pl.cli import main

    monkeypatch.chdir(REPO)
    try:
        main(["fit", "--config", "configs/real/opd_grpo_qwen2_5_vl_3b_fsdp.yaml", "--print_config"])
    except SystemExit as e:
        assert e.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "vold_pl.sharding.FSDP2Strategy"
    assert strategy["init_args"]["data_parallel_size"] == "auto" and strategy["init_args"]["tensor_parallel_size"] == 1
    assert printed["trainer"]["num_nodes"] == 2 and printed["trainer"]["devices"] == 8
    args = printed["model"]["init_args"]
    assert args["teacher"]["quantization"] == "4bit" and args["logprob_chunk_size"] == 1024
    script = (REPO / "configs/real/opd_grpo_qwen2_5_vl_3b_fsdp_slurm.sh").read_text()
    assert "opd_grpo_qwen2_5_vl_3b_fsdp.yaml" in script and "--ntasks-per-node=8" in script
    assert subprocess.run(["bash", "-n", str(REPO / "configs/real/opd_grpo_qwen2_5_vl_3b_fsdp_slurm.sh")]).returncode == 0
