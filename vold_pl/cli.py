"""``vold-pl``: the LightningCLI entry point (fit / validate / test / predict).

Every option comes from a typed signature and its docstring, so ``vold-pl fit --help`` documents them all
and ``vold-pl fit --config configs/quickstart/sft_student.yaml --print_config`` shows a whole run.

``vold-pl fit`` is preemption-safe by default (see :mod:`vold_pl.checkpointing`,
:mod:`vold_pl.callbacks.preemption`): unless the config says otherwise it adds

- a :class:`~vold_pl.checkpointing.ResumableCheckpoint` (``last.ckpt`` every 50 steps in
  ``<default_root_dir>/checkpoints``, written atomically) when checkpointing is enabled and the config names no
  ``ModelCheckpoint``;
- a :class:`~vold_pl.callbacks.preemption.PreemptionCallback` (SIGTERM/SIGUSR1: checkpoint, then a clean exit);
- the :class:`~vold_pl.checkpointing.AtomicCheckpointIO` plugin when no ``CheckpointIO`` plugin is configured.

Resume with ``vold-pl fit <same options> --ckpt_path last`` (or a checkpoint file).
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from vold_pl.data.datamodule import ReasoningDataModule


def _import_classes() -> None:
    """Import vold-pl's modules and callbacks so that short class names resolve (``--model OPDGRPOModule``,
    ``class_path: BenchmarkCallback``): jsonargparse looks short names up among the subclasses imported so far."""
    import vold_pl.callbacks.benchmark  # noqa: F401
    import vold_pl.callbacks.curriculum  # noqa: F401
    import vold_pl.callbacks.preemption  # noqa: F401
    import vold_pl.callbacks.trace_writer  # noqa: F401
    import vold_pl.export  # noqa: F401
    import vold_pl.modules.opd_grpo  # noqa: F401
    import vold_pl.modules.sft  # noqa: F401


class VoldCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        _import_classes()
        # The data module's MixedSampler splits draws across ranks itself; Lightning must not wrap it.
        parser.set_defaults({"seed_everything": 0, "trainer.use_distributed_sampler": False})

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Reward plugins run code: enable (and load, so errors show now) exactly those named in the user's own
        # config files and flags, parsed here before LightningCLI merges a --ckpt_path's saved hyperparameters.
        from vold_pl.rewards.plugins import load_reward_plugins, plugin_names_in

        load_reward_plugins(plugin_names_in(self.config))

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if self.subcommand == "fit":
            from vold_pl.callbacks.preemption import PreemptionCallback
            from vold_pl.checkpointing import AtomicCheckpointIO, ResumableCheckpoint

            given = list(config.get("callbacks") or []) + list(callbacks)
            extra = []
            if config.get("enable_checkpointing", True) is not False and not any(
                    isinstance(c, ModelCheckpoint) for c in given):
                extra.append(ResumableCheckpoint())
            if not any(isinstance(c, PreemptionCallback) for c in given):
                extra.append(PreemptionCallback())
            callbacks = list(callbacks) + extra
            plugins = config.get("plugins")
            plugins = [] if plugins is None else (list(plugins) if isinstance(plugins, (list, tuple)) else [plugins])
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                config["plugins"] = plugins + [AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)


def _config_files(args: list[str]) -> list[str]:
    files = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def check_config_files(args: list[str]) -> None:
    """Exit with a message naming the file, line and problem when a ``--config`` file is not valid YAML.

    (LightningCLI reports YAML syntax errors against ``<unicode string>``, without the file name.)
    """
    import yaml

    for f in _config_files(args):
        if not os.path.isfile(f):
            continue  # LightningCLI says "File does not exist" itself
        try:
            with open(f, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{f}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f
            problem = getattr(e, "problem", None) or str(e)
            print(f"error: config file {where} is not valid YAML: {problem}. Fix the file there (check indentation, "
                  "brackets and quotes); `vold-pl fit --print_config` shows a valid config.", file=sys.stderr)
            raise SystemExit(2) from None
        except UnicodeDecodeError as e:
            print(f"error: config file {f} is not UTF-8 text ({e}).", file=sys.stderr)
            raise SystemExit(2) from None
        if data is not None and not isinstance(data, dict):
            print(f"error: config file {f} must be a YAML mapping (keys such as trainer:, model:, data:), got a "
                  f"{type(data).__name__}.", file=sys.stderr)
            raise SystemExit(2)


def main(args: list[str] | None = None) -> None:
    # Model and data hubs are never needed for local folders; keep libraries from phoning home.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_config_files(list(sys.argv[1:] if args is None else args))
    VoldCLI(
        model_class=None,
        datamodule_class=ReasoningDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
