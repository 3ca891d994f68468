"""Shared pieces of the benchmark scripts: offline tiny models and data, step timers, tables and JSON output.

Nothing here touches a model hub: the text policy is a Qwen2 built from a config with the project's own BPE
tokenizer (``vold_pl.toy.tiny.train_tokenizer``), the VLM student and the text teacher come from
``vold_pl.toy.tiny.save_tiny_models``, and prompts from the synthetic generator.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as ``python benchmarks/x.py`` from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------- models and data

def text_policy_config(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_text_policy(out: Path, hidden: int = 128, layers: int = 2, vocab: int = 1024, seed: int = 0) -> Path:
    """A tiny Qwen2 text policy (``save_pretrained`` folder with its tokenizer); built once per folder."""
    from transformers import Qwen2ForCausalLM

    from vold_pl.data.synthetic import corpus_texts
    from vold_pl.toy.tiny import train_tokenizer

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tok = train_tokenizer(corpus_texts(seed=seed, n=500), vocab_size=vocab)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(text_policy_config(tok, hidden, layers))
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_vlm(out: Path, seed: int = 0) -> dict[str, Path]:
    """The tiny Qwen2.5-VL student and Qwen3 teacher of ``vold_pl.toy.tiny`` (default sizes); built once."""
    from vold_pl.data.synthetic import corpus_texts
    from vold_pl.toy.tiny import save_tiny_models

    out = Path(out)
    paths = {"student": out / "student", "teacher": out / "teacher"}
    if not (paths["student"] / "config.json").is_file():
        save_tiny_models(out, corpus_texts(seed=seed, n=500), seed=seed)
    return paths


def build_data(out: Path, n: int = 64, seed: int = 0) -> dict[str, Path]:
    from vold_pl.data.synthetic import generate_dataset

    out = Path(out)
    if (out / "manifest.json").is_file():
        return {p.stem: p for p in out.glob("*.jsonl")} | {"images": out / "images"}
    return generate_dataset(out, seed=seed, n_train=n, n_val=4, n_test=4)


def read_rows(path: Path, n: int) -> list[dict]:
    """Rows as the data module hands them to a collator (images decoded to PIL)."""
    from vold_pl.data.sources import read_records, to_dataset

    recs, _ = read_records(path)
    ds = to_dataset(recs[:n])
    return [ds[i] for i in range(min(n, len(recs)))]


def eos_biased(model: torch.nn.Module, eos_id: int, bias: float) -> torch.nn.Module:
    """Add a bias on the EOS logit (an ``nn.Linear`` head with bias): ``-1e4`` never stops (equal lengths), a
    positive bias stops after ~``1/p(EOS)`` tokens, geometrically distributed (very unequal lengths)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
    model.lm_head = head
    return model


# ---------------------------------------------------------------------------------------------- the proposed change

def lightning_step_timer():
    """A Lightning callback recording ``perf_counter`` at every training-batch boundary."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_train_batch_end(self, trainer, *args, **kwargs):
            self.marks.append(time.perf_counter())

        @property
        def steps(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    return StepTimer()


def trl_step_timer():
    """A ``transformers.TrainerCallback`` recording ``perf_counter`` at every optimizer-step boundary."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        @property
        def steps(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    return StepTimer()


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------- output

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (pastes into the README as is)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def environment() -> dict[str, Any]:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cuda": torch.cuda.is_available()}
    try:
        import trl

        env["trl"] = trl.__version__
    except ImportError:
        pass
    try:
        env["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return env


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"\n[results] {path}")
    return path


def quiet() -> None:
    """Silence progress bars and advisory warnings so the tables stay readable."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
