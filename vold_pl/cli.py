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

A checkpoint is data, never configuration: LightningCLI would merge a ``--ckpt_path`` checkpoint's saved
hyper-parameters into the run's config, so a crafted checkpoint could point ``model.name_or_path`` at a folder
with code and switch on ``trust_remote_code``. ``vold-pl`` runs with the user's config and flags only; each value
the checkpoint was saved with that differs is listed in a warning (``--ckpt_hparams error``: an error). The
checkpoint file itself is read with ``torch.load(weights_only=True)``, so one holding pickled Python objects is
refused with vold-pl's message before anything else reads it.

At start it sets torch's CPU threads (:func:`vold_pl.startup.configure_cpu_threads`: ``$VOLD_NUM_THREADS``,
else ``$OMP_NUM_THREADS`` as set, else torch's default capped at the cores this process may use).

Errors in what the user gave (:class:`vold_pl.errors.UserError`: data records, config values, checkpoints,
model paths) print as one message and exit with code 2; ``--debug`` (or ``VOLD_PL_DEBUG=1``) shows the
traceback too.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from vold_pl.data.datamodule import ReasoningDataModule
from vold_pl.errors import UserError, find_user_error
from vold_pl.startup import configure_cpu_threads

DEBUG_ENV = "VOLD_PL_DEBUG"


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


class CheckpointHparamsError(UserError):
    """A ``--ckpt_path`` checkpoint saved with hyper-parameters that differ from the run's config, under
    ``--ckpt_hparams error``."""


class VoldCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        _import_classes()
        # The data module's MixedSampler splits draws across ranks itself, and its evaluation / predict loaders
        # split their rows with EvenShardSampler (equal counts per rank); Lightning must not wrap either.
        parser.set_defaults({"seed_everything": 0, "trainer.use_distributed_sampler": False})
        parser.add_argument(
            "--ckpt_hparams", choices=["warn", "error"], default="warn",
            help="A --ckpt_path checkpoint's saved hyper-parameters never change this run's config (a checkpoint "
                 "cannot switch on trust_remote_code or move a model path); where they differ from it: 'warn' "
                 "lists the differences and goes on with the config, 'error' stops.")
        parser.add_argument("--debug", action="store_true",
                            help=f"show the Python traceback of errors in the input too (or set {DEBUG_ENV}=1)")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Reward plugins run code: enable (and load, so errors show now) exactly those named in the user's own
        # config files and flags, parsed here before LightningCLI merges a --ckpt_path's saved hyperparameters.
        from vold_pl.rewards.plugins import load_reward_plugins, plugin_names_in

        load_reward_plugins(plugin_names_in(self.config))
        # What the user's config files and flags say, before LightningCLI merges a --ckpt_path's hyper-parameters
        # in; checked now with weights_only=True so an unsafe checkpoint gets vold-pl's message, not torch's.
        self._user_config = self.config.clone()
        self._check_checkpoint_file()

    def _check_checkpoint_file(self) -> None:
        from pathlib import Path

        from vold_pl.checkpointing import read_hyperparameters

        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(str(ckpt)).is_file():  # ("last" and sharded folders: Lightning reads no hparams)
            read_hyperparameters(ckpt)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's merge of a ``--ckpt_path`` checkpoint's hyper-parameters, kept only so that
        :meth:`before_instantiate_classes` can list what differs (and then puts the user's config back).

        LightningCLI has no public hook for this step and its own version reads the whole checkpoint into memory
        (weights and optimizer state) just for the hyper-parameters, and exits when they no longer parse; this
        one reads them memory-mapped and turns a parse failure into a warning. Should LightningCLI stop calling
        this method, the user's config is still restored by the public hooks.
        """
        from pathlib import Path

        from jsonargparse import ArgumentError

        from vold_pl.checkpointing import read_hyperparameters

        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or not Path(str(ckpt)).is_file():
            return
        hparams = read_hyperparameters(ckpt)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        exit_on_error, self.parser.exit_on_error = self.parser.exit_on_error, False
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except ArgumentError as e:
            first = " ".join(str(e).split())[:300]
            print(f"[vold-pl] warning: checkpoint {ckpt}: its saved hyper-parameters do not parse as this version's "
                  f"options ({first}), so they are not compared with the config; the run uses the config.",
                  file=sys.stderr)
        finally:
            self.parser.exit_on_error = exit_on_error

    def before_instantiate_classes(self) -> None:
        """Undo the checkpoint's hyper-parameters: the model is built from the user's config alone."""
        sub = self.config.get("subcommand")
        mine = getattr(self, "_user_config", None)
        if not sub or mine is None:
            return
        merged_model, my_model = self.config[sub].get("model"), mine[sub].get("model")
        diffs = config_differences(my_model, merged_model, "model")
        if diffs:
            ckpt = self.config[sub].get("ckpt_path")
            lines = "; ".join(f"{k}: config {a!r}, checkpoint {b!r}" for k, a, b in diffs[:20])
            more = f" (and {len(diffs) - 20} more)" if len(diffs) > 20 else ""
            head = (f"checkpoint {ckpt} was saved with hyper-parameters that differ from this run's config: "
                    f"{lines}{more}.")
            if mine[sub].get("ckpt_hparams") == "error":
                raise CheckpointHparamsError(
                    f"{head} Put the values you want in the config or on the command line (a checkpoint never sets "
                    "them), or pass --ckpt_hparams warn to go on with the config.")
            print(f"[vold-pl] warning: {head} The run uses the config's values: a checkpoint never changes the "
                  "config (set them in the config if you meant the checkpoint's).", file=sys.stderr)
        self.config[sub]["model"] = my_model

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


def config_differences(mine, other, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, value in mine, value in other)`` for every place where two config namespaces differ; a
    section present on one side only is one entry (as a dict)."""
    from jsonargparse import Namespace

    if isinstance(mine, Namespace) and isinstance(other, Namespace):
        a, b = vars(mine), vars(other)
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    if mine == other:
        return []
    plain = [x.as_dict() if isinstance(x, Namespace) else x for x in (mine, other)]
    return [(prefix, plain[0], plain[1])]


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(args: list[str] | None = None) -> None:
    """``vold-pl``: errors in the input print as their message alone and exit 2 (``--debug``: with the trace)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if args is None else args)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"  # launched ranks inherit it
        if args is None:
            sys.argv[1:] = argv
        else:
            args = argv
    check_config_files(argv)
    try:
        configure_cpu_threads()  # process set-up, here once (launched ranks run main again)
        VoldCLI(
            model_class=None,
            datamodule_class=ReasoningDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
        )
    except Exception as e:
        err = find_user_error(e)
        if err is None:
            raise
        if debug_enabled():
            import traceback

            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
