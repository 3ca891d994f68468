"""What an export folder carries besides the weights: a model card, and optionally a push to the Hugging Face Hub.

``PolicyModule.export_model`` writes ``save_pretrained`` safetensors + the processor, then calls
:func:`finish_export`, which writes ``README.md`` (a model card: base model, recipe, data, benchmark results when
a :class:`~vold_pl.callbacks.benchmark.BenchmarkCallback` ran, training steps, library versions) and, when the
trainer has a :class:`PushToHub` callback, uploads the folder. Pushing is off unless that callback is configured::

    trainer:
      callbacks:
        - class_path: vold_pl.export.PushToHub
          init_args: {repo_id: my-org/qwen2.5-vl-3b-vold, private: true}

The token comes from ``HF_TOKEN`` or ``huggingface-cli login`` (never from a config file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L

from vold_pl.errors import UserError

CARD = "README.md"


def _plain(value: Any) -> Any:
    """Hyper-parameters as JSON-able values (dataclasses as dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _is_hub_id(name: str | None) -> bool:
    """``org/name`` that is not a local path: what the Hub's ``base_model`` metadata may name."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("vold-pl", "torch", "transformers", "lightning", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def benchmark_results(trainer) -> dict[str, dict]:
    """``{benchmark: {accuracy, n, ...}}`` of the last benchmark evaluation of this run (empty when none ran)."""
    for cb in getattr(trainer, "callbacks", None) or []:
        report = getattr(cb, "last_report", None)
        if isinstance(report, dict) and report.get("benchmarks"):
            return {"step": report.get("step"), **{k: v for k, v in report["benchmarks"].items()}}
    return {}


def card_facts(module, trainer=None) -> dict:
    """Everything the model card says, as data (also handy for tests and scripts)."""
    spec = getattr(module, "model_spec", None)
    hparams = {k: _plain(v) for k, v in dict(getattr(module, "hparams", {}) or {}).items()}
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    lora = getattr(spec, "lora", None)
    data = [{"path": s.path, "weight": s.weight} for s in getattr(dm, "train_sources", None) or []]
    return {
        "base_model": getattr(spec, "name_or_path", None),
        "base_revision": getattr(spec, "revision", None),
        "recipe": type(module).__name__,
        "hyperparameters": hparams,
        "data": data,
        "benchmarks": benchmark_results(trainer) if trainer is not None else {},
        "global_step": getattr(trainer, "global_step", None) if trainer is not None else None,
        "lora": _plain(lora) if lora is not None and getattr(lora, "r", 0) > 0 else None,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


_RECIPES = {
    "OPDGRPOModule": "GRPO with on-policy distillation from a text-only teacher (VOLD, arXiv 2510.23497); with "
                     "`opd.lam: 0`, plain GRPO",
    "SFTModule": "supervised fine-tuning on reasoning traces (completion-only next-token NLL)",
}


def render_model_card(facts: dict, is_vision: bool = True) -> str:
    """The ``README.md`` text: Hub metadata front matter, then what was trained, on what, and how well."""
    import yaml

    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["vold-pl", "reasoning", facts["recipe"]]}
    meta["pipeline_tag"] = "image-text-to-text" if is_vision else "text-generation"
    if _is_hub_id(facts["base_model"]):
        meta["base_model"] = facts["base_model"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(str(facts['base_model'] or 'model')).name} trained with vold-pl", ""]
    base = facts["base_model"] or "(unknown)"
    rev = f" (revision `{facts['base_revision']}`)" if facts.get("base_revision") else ""
    lines += [f"- **Base model:** `{base}`{rev}",
              f"- **Recipe:** `{facts['recipe']}`: {_RECIPES.get(facts['recipe'], 'see hyper-parameters below')}"]
    if facts.get("global_step") is not None:
        lines.append(f"- **Optimizer steps:** {facts['global_step']}")
    lines.append(f"- **Created:** {facts['created']}")
    if facts.get("lora"):
        lines.append(f"- **LoRA:** {json.dumps(facts['lora'])}")
    lines += ["", "## Training data", ""]
    if facts["data"]:
        lines += ["| source | weight |", "|---|---:|"] + [f"| `{d['path']}` | {d['weight']:g} |" for d in facts["data"]]
    else:
        lines.append("(not recorded: the export was written outside a fit with a vold-pl data module)")
    lines += ["", "## Benchmark results", ""]
    bench = {k: v for k, v in (facts.get("benchmarks") or {}).items() if isinstance(v, dict)}
    if bench:
        step = facts["benchmarks"].get("step")
        lines += [f"Evaluated by vold-pl's BenchmarkCallback at step {step} (accuracy = mean score over samples).", "",
                  "| benchmark | n | accuracy | format valid |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {b.get('n', '')} | {100 * b.get('accuracy', 0.0):.1f}% | "
                  f"{100 * b.get('format_valid', 0.0):.1f}% |" for name, b in bench.items()]
    else:
        lines.append("No benchmark ran in this run (add a `BenchmarkCallback` to report results here).")
    lines += ["", "## Hyper-parameters", "", "```yaml",
              yaml.safe_dump(facts["hyperparameters"], sort_keys=True).strip(), "```", "",
              "## Software", "", ", ".join(f"{k} {v}" for k, v in facts["versions"].items()), ""]
    return "\n".join(lines)


def write_model_card(out_path: str | Path, module, trainer=None) -> Path:
    """Write ``<out_path>/README.md`` (atomically) and return its path."""
    from vold_pl.io import atomic_write_text

    is_vision = getattr(getattr(getattr(module, "model", None), "config", None), "vision_config", None) is not None
    path = Path(out_path) / CARD
    atomic_write_text(path, render_model_card(card_facts(module, trainer), is_vision))
    return path


class PushToHub(L.Callback):
    """Upload the export folder to the Hugging Face Hub when fit ends (off unless this callback is configured).

    Args:
        repo_id: the Hub repository, ``org/name``; created (``private`` as given) when it does not exist.
        private: create the repository private.
        revision: branch to push to (default the repository's main branch).
        commit_message: the upload's commit message.
    """

    def __init__(self, repo_id: str, private: bool = True, revision: str | None = None,
                 commit_message: str = "Upload model trained with vold-pl"):
        if not _is_hub_id(repo_id):
            raise UserError(f"PushToHub.repo_id must be a Hub repository id like 'my-org/my-model', got {repo_id!r}")
        self.repo_id, self.private, self.revision, self.commit_message = repo_id, private, revision, commit_message
        self.pushed: str | None = None

    def push(self, folder: str | Path) -> str:
        """Create the repo if needed and upload ``folder``; returns the commit URL (or what the client returns)."""
        from huggingface_hub import HfApi

        if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
            raise UserError(f"PushToHub: HF_HUB_OFFLINE is set, so {folder} was not uploaded to {self.repo_id}. "
                            f"Unset it and run `huggingface-cli upload {self.repo_id} {folder}` to push this export.")
        api = HfApi()
        try:
            api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
            result = api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), repo_type="model",
                                       revision=self.revision, commit_message=self.commit_message)
        except Exception as e:
            raise UserError(f"PushToHub: uploading {folder} to {self.repo_id} failed ({type(e).__name__}: {e}). The "
                            f"export is complete on disk; retry with `huggingface-cli upload {self.repo_id} {folder}` "
                            "after `huggingface-cli login` (or with HF_TOKEN set).") from e
        self.pushed = str(getattr(result, "commit_url", result))
        print(f"[vold-pl] pushed {folder} to the Hub: {self.repo_id} ({self.pushed})")
        return self.pushed


def finish_export(out_path: str | Path, module, trainer=None) -> None:
    """After ``save_pretrained`` (rank 0): the model card, then the Hub push if a :class:`PushToHub` is set."""
    card = write_model_card(out_path, module, trainer)
    print(f"[vold-pl] model card: {card}")
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, PushToHub):
            cb.push(out_path)
