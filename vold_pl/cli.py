"""``vold-pl``: the LightningCLI entry point (fit / validate / test / predict).

Every option comes from a typed signature and its docstring, so ``vold-pl fit --help`` documents them all
and ``vold-pl fit --config configs/quickstart/sft_student.yaml --print_config`` shows a whole run.

``vold-pl fit`` is preemption-safe by default (see :mod:`vold_pl.checkpointing`,
:mod:`vold_pl.callbacks.preemption`): unless the config says otherwise it adds

- a :class:`~vold_pl.checkpointing.ResumableCheckpoint` (``last.ckpt`` every 50 steps in
  ``<default_root_dir>/checkpoints``, written atomically) when checkpointing is enabled and the config names no
  ``ModelCheckpoint``;
- a :class:`~vold_pl.callbacks.preemption.PreemptionCallback` (SIGTERM/SIGUSR1: checkpoint, then a clean exit);
- a :class:`~vold_pl.callbacks.step_progress.StepProgressBar` (the bar states the run's step budget, not
  "Epoch 0/-2") when the config names no progress bar and ``rich`` is installed;
- the :class:`~vold_pl.checkpointing.AtomicCheckpointIO` plugin when no ``CheckpointIO`` plugin is configured.

Resume with ``vold-pl fit <same options> --ckpt_path last`` (or a checkpoint file).

A checkpoint is data, never configuration: LightningCLI would parse a ``--ckpt_path`` checkpoint's saved
hyper-parameters into the run's config, importing whatever module its ``_class_path`` names and letting a crafted
checkpoint point ``model.name_or_path`` at a folder with code and switch on ``trust_remote_code``. ``vold-pl``
runs with the user's config and flags only and reads the checkpoint's hyper-parameters as plain data (nothing they
name is imported or called); each value that differs is listed in a warning (``--ckpt_hparams error``: an error). The
checkpoint file itself is read with ``torch.load(weights_only=True)``, so one holding pickled Python objects is
refused with vold-pl's message before anything else reads it.

At start it sets torch's CPU threads (:func:`vold_pl.startup.configure_cpu_threads`: ``$VOLD_NUM_THREADS``,
else ``$OMP_NUM_THREADS`` as set, else torch's default capped at the cores this process may use).

Errors in what the user gave (:class:`vold_pl.errors.UserError`: data records, config values, checkpoints,
model paths) print as one message and exit with code 2; ``--debug`` (or ``VOLD_PL_DEBUG=1``) shows the
traceback too.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
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


class OptionError(UserError):
    """An option the parser refused (unknown key, wrong type, missing value): one line, no usage text."""


class VoldCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        _import_classes()
        self._subcommand_parser_list = [*getattr(self, "_subcommand_parser_list", []), parser]  # for suggestions
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
        from jsonargparse import ArgumentError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            raise self._option_error(e, sys.argv[1:] if args is None else list(args)) from e
        # Reward plugins run code: enable (and load, so errors show now) exactly those named in the user's own
        # config files and flags (a --ckpt_path checkpoint's saved hyper-parameters are never parsed).
        from vold_pl.rewards.plugins import load_reward_plugins, plugin_names_in

        load_reward_plugins(plugin_names_in(self.config))

    def _option_error(self, e: Exception, argv: list[str]) -> OptionError:
        from vold_pl.option_errors import option_error_line

        sub = next((a for a in argv if a in self.subcommands()), None)
        keys: set[str] = set()
        for p in getattr(self, "_subcommand_parser_list", []):
            try:
                keys.update(p.get_defaults().keys())
            except Exception:  # (a parser whose defaults do not resolve: no suggestions from it)
                continue
        return OptionError(option_error_line(str(e), sub, sorted(keys)))

    def _parse_ckpt_path(self) -> None:
        """Nothing: LightningCLI's version parses a ``--ckpt_path`` checkpoint's saved hyper-parameters as
        configuration, and jsonargparse then imports the module its ``_class_path`` (or any ``class_path``) names
        before anything is compared. LightningCLI calls this private method from ``__init__`` with no public hook to
        turn it off; the comparison is done as plain data by the public :meth:`before_instantiate_classes`."""

    def before_instantiate_classes(self) -> None:
        """Compare a ``--ckpt_path`` checkpoint's hyper-parameters with the user's model config, as plain data
        (nothing the checkpoint names is imported or called), and report the differences: the model is built
        from the user's config alone."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or not os.path.isfile(str(ckpt)):
            return
        from vold_pl.checkpointing import read_hyperparameters

        saved = read_hyperparameters(ckpt)
        saved.pop("_instantiator", None)
        if not saved:
            return
        diffs = checkpoint_hparams_differences(self._model_config_as_saved(), saved)
        if not diffs:
            return
        lines = "; ".join(f"{k}: config {_show(a)}, checkpoint {_show(b)}" for k, a, b in diffs[:20])
        more = f" (and {len(diffs) - 20} more)" if len(diffs) > 20 else ""
        head = (f"checkpoint {ckpt} was saved with hyper-parameters that differ from this run's config: "
                f"{lines}{more}.")
        if self.config[sub].get("ckpt_hparams") == "error":
            raise CheckpointHparamsError(
                f"{head} Put the values you want in the config or on the command line (a checkpoint never sets "
                "them), or pass --ckpt_hparams warn to go on with the config.")
        print(f"[vold-pl] warning: {head} The run uses the config's values: a checkpoint never changes the "
              "config (set them in the config if you meant the checkpoint's).", file=sys.stderr)

    def _model_config_as_saved(self) -> dict:
        """The user's model config in the form LightningCLI saves as a module's hyper-parameters: the YAML dump
        of the config, ``class_path`` as ``_class_path`` next to the init arguments."""
        import yaml

        sub = self.config["subcommand"]
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml"))
        model = (dump.get(sub) or {}).get("model") or {}
        if isinstance(model, dict) and "class_path" in model:
            model = {"_class_path": model["class_path"], **(model.get("init_args") or {}),
                     **(model.get("dict_kwargs") or {})}
        return model if isinstance(model, dict) else {}

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
            if config.get("enable_progress_bar", True) is not False and not any(
                    isinstance(c, ProgressBar) for c in given) and importlib.util.find_spec("rich") is not None:
                from vold_pl.callbacks.step_progress import StepProgressBar

                extra.append(StepProgressBar())
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


def list_option_items() -> dict[str, tuple[str, type]]:
    """The options whose value is a list of dataclass items, by their last key: ``(what the full key starts with,
    the item's dataclass)``, read from the signatures of the data module and the callbacks that take such lists
    (the data sources, ``benchmarks``, the curriculum's ``stages``)."""
    import dataclasses
    import types
    import typing

    from vold_pl.callbacks.benchmark import BenchmarkCallback
    from vold_pl.callbacks.curriculum import Curriculum

    out: dict[str, tuple[str, type]] = {}
    for prefix, cls in (("data.", ReasoningDataModule), ("trainer.callbacks", BenchmarkCallback),
                        ("trainer.callbacks", Curriculum)):
        for name, hint in typing.get_type_hints(cls.__init__).items():
            arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            for arm in arms:
                item = typing.get_args(arm)[0] if typing.get_origin(arm) is list and typing.get_args(arm) else None
                if item is not None and dataclasses.is_dataclass(item):
                    out[name] = (prefix, item)
    return out


def _whole_item(cls: type, item: dict) -> dict:
    """``item`` (a mapping given for dataclass ``cls``) with each field it does not name at its default; a field
    without a default stays missing, for the parser to report."""
    import dataclasses

    full = dict(item)
    for f in dataclasses.fields(cls):
        if f.name in full:
            continue
        if f.default is not dataclasses.MISSING:
            full[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            full[f.name] = f.default_factory()
    return full


def whole_list_items(argv: list[str]) -> list[str]:
    """``argv`` with every list of dataclass items given on the command line (``--data.val '[{path: v.jsonl}]'``)
    made whole: each item's unnamed fields written out at their defaults.

    Why: jsonargparse merges a list given on the command line with the config's list of the same length, item by
    item, so ``--data.val '[{path: v.jsonl}]'`` over a config whose one val source has ``limit: 32`` kept the
    limit, and a benchmark given over ``configs/quickstart/bench.yaml`` kept ``loader: synthetic``; a list of
    another length was taken as given. A list on the command line now always replaces the config's. (A second
    ``--config`` file's list still merges with the first's, as jsonargparse composes config files.)"""
    import json

    import yaml

    items = list_option_items()
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        key, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        spec = items.get(key.rsplit(".", 1)[-1]) if key else None
        if spec is None or not key.startswith(spec[0]) or (not eq and i + 1 >= len(argv)):
            out.append(a)
            i += 1
            continue
        if not eq:
            value, i = argv[i + 1], i + 1
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = None  # the parser reports it
        if isinstance(parsed, list) and parsed and all(isinstance(x, dict) for x in parsed):
            value = json.dumps([_whole_item(spec[1], x) for x in parsed])
        out.extend([f"--{key}={value}"] if eq else [f"--{key}", value])
        i += 1
    return out


_ABSENT = object()


def checkpoint_hparams_differences(mine: dict, saved: dict) -> list[tuple[str, object, object]]:
    """``(option, value in the config, value in the checkpoint)`` for every place where a checkpoint's saved
    hyper-parameters (plain data, never parsed or imported) differ from the user's model config in the same form
    (:meth:`VoldCLI._model_config_as_saved`); options named as on the command line (``model.class_path``,
    ``model.init_args.<key>``), a value missing on one side as :data:`_ABSENT`."""
    def flat(d, prefix):
        out = {}
        for k, v in d.items():
            key = f"{prefix}.{k}"
            if isinstance(v, dict) and v:
                out.update(flat(v, key))
            else:
                out[key] = v
        return out

    def top(d):
        d = dict(d)
        cls = d.pop("_class_path", _ABSENT)
        out = flat(d, "model.init_args")
        if cls is not _ABSENT:
            out["model.class_path"] = cls
        return out

    a, b = top(mine), top(saved)
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b), key=str)
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _show(value: object) -> str:
    """A value of a difference, short (a checkpoint's strings can be anything, of any length)."""
    if value is _ABSENT:
        return "(not set)"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


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
    whole = whole_list_items(argv)
    if whole != argv:
        argv = whole
        if args is None:
            sys.argv[1:] = argv  # launched ranks read sys.argv again
        else:
            args = argv
    try:
        configure_cpu_threads()  # process set-up, here once (launched ranks run main again)
        VoldCLI(
            model_class=None,
            datamodule_class=ReasoningDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},  # parse errors: one line (OptionError), the usage with --help
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
