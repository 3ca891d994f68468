"""Reward plugins: a config's ``rewards:`` may name a user's function besides the registry's rewards.

Two forms (EasyR1 / verl style)::

    rewards:
      accuracy: 1.0                              # a registered reward (vold_pl.rewards.functions)
      my_pkg.rewards:length_penalty: 0.1         # module.path:function, imported from the Python path
      ./my_rewards.py:brevity: 0.2               # path/to/file.py:function, relative to the working directory

The function must follow the reward contract of :func:`vold_pl.rewards.functions.compute_rewards`: called
as ``fn(completion: str, record) -> float`` (two positional arguments; ``record`` has ``answer``,
``answer_type``, ``choices``, ``id`` …); a finite number is expected, anything else scores 0 and is counted.

**Plugins run code, so they are loaded only when enabled explicitly.** ``vold-pl`` enables exactly the plugin
names found under a ``rewards:`` key of the user's own config files and command line, parsed *before* a
checkpoint's saved hyperparameters are merged in: a checkpoint (or any other data file) can never bring in a
plugin the user did not name. A name that was not enabled fails with a :class:`~vold_pl.errors.UserError`.
In Python, call :func:`load_reward_plugins` (or set ``VOLD_PL_REWARD_PLUGINS`` to a JSON list of names) before
building a module whose rewards name plugins.

Each plugin is imported once per process and cached; the enabled names are also put in the environment
variable ``VOLD_PL_REWARD_PLUGINS`` so that every rank (subprocess or spawned) may load them too.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from vold_pl.errors import UserError

ENV_VAR = "VOLD_PL_REWARD_PLUGINS"
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_FN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")

_loaded: dict[str, Callable[[str, Any], float]] = {}
_enabled: set[str] = set()


class RewardPluginError(UserError):
    """A reward plugin that cannot be used: not enabled, not found, or with the wrong signature."""


def is_plugin_name(name: Any) -> bool:
    """True for ``module.path:function`` and ``path/to/file.py:function`` (a ``:`` followed by an identifier)."""
    if not isinstance(name, str) or ":" not in name:
        return False
    target, _, fn = name.rpartition(":")
    return bool(target) and _FN_RE.fullmatch(fn) is not None


def _split(name: str) -> tuple[str, str, bool]:
    """``(target, function, is_file)`` of a plugin name; the file form ends in ``.py`` or contains a slash."""
    target, _, fn = name.rpartition(":")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    return target, fn, is_file


def _env_names() -> set[str]:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return set()
    try:
        names = json.loads(raw)
    except ValueError:
        raise RewardPluginError(f"environment variable {ENV_VAR} must be a JSON list of reward plugin names "
                                f"(e.g. '[\"my_pkg.rewards:fn\"]'), got {raw[:200]!r}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RewardPluginError(f"environment variable {ENV_VAR} must be a JSON list of strings, got {raw[:200]!r}")
    return set(names)


def enabled_plugins() -> set[str]:
    """The plugin names this process may load (enabled here or inherited through ``VOLD_PL_REWARD_PLUGINS``)."""
    return _enabled | _env_names()


def enable_reward_plugins(names: Iterable[str]) -> list[str]:
    """Allow these plugin names to be loaded in this process and its child processes (other ranks); returns them.

    Only call it with names the user chose (their config or code), never with names read from a checkpoint.
    """
    names = [n for n in names if is_plugin_name(n)]
    if names:
        _enabled.update(names)
        os.environ[ENV_VAR] = json.dumps(sorted(enabled_plugins()))
    return names


def load_reward_plugins(names: Iterable[str]) -> dict[str, Callable[[str, Any], float]]:
    """Enable and load plugin names now (errors surface at once); registry names are ignored."""
    return {n: get_plugin(n) for n in enable_reward_plugins(names)}


def plugin_names_in(config: Any) -> list[str]:
    """Every plugin name used as a key of a ``rewards:`` mapping anywhere in a (nested) config.

    Finds the module's ``rewards`` and each curriculum stage's ``rewards`` alike; order of first appearance.
    """
    found: list[str] = []

    def walk(node: Any) -> None:
        if hasattr(node, "as_dict") and callable(node.as_dict):  # a jsonargparse Namespace
            node = node.as_dict()
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "rewards" and isinstance(value, Mapping):
                    found.extend(k for k in value if is_plugin_name(k) and k not in found)
                walk(value)
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)

    walk(config)
    return found


def get_plugin(name: str) -> Callable[[str, Any], float]:
    """The function a plugin name points to, imported once per process; :class:`RewardPluginError` otherwise."""
    fn = _loaded.get(name)
    if fn is not None:
        return fn
    if name not in enabled_plugins():
        raise RewardPluginError(
            f"reward plugin {name!r} is not enabled, so it was not loaded (a plugin runs code). Name it under "
            "`rewards:` in your own config or command line (vold-pl enables those; names that only come from a "
            f"checkpoint's saved hyperparameters never are), or in Python call "
            f"vold_pl.rewards.plugins.load_reward_plugins([{name!r}]) first.")
    target, fn_name, is_file = _split(name)
    module = _import_file(name, target) if is_file else _import_module(name, target)
    obj: Any = module
    for part in fn_name.split("."):
        if not hasattr(obj, part):
            available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                               and getattr(v, "__module__", None) == module.__name__)
            raise RewardPluginError(f"reward plugin {name!r}: {target} has no function {fn_name!r}. Functions "
                                    f"defined there: {', '.join(available) or '(none)'}.")
        obj = getattr(obj, part)
    check_reward_signature(obj, name)
    _loaded[name] = obj
    return obj


def _import_module(name: str, target: str):
    if _MODULE_RE.fullmatch(target) is None:
        raise RewardPluginError(f"reward plugin {name!r}: {target!r} is neither a dotted module path "
                                "(my_pkg.rewards) nor a Python file (path/to/file.py)")
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and target.startswith(e.name):
            raise RewardPluginError(
                f"reward plugin {name!r}: module {e.name!r} not found on the Python path. Install the package, "
                f"add its folder to PYTHONPATH, or name the file instead (path/to/file.py:{name.rpartition(':')[2]})."
            ) from e
        raise RewardPluginError(f"reward plugin {name!r}: importing {target} failed: {e}") from e
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing: say where
        raise RewardPluginError(f"reward plugin {name!r}: importing {target} raised {type(e).__name__}: {e}") from e


def _import_file(name: str, target: str):
    path = Path(target).expanduser()
    if not path.is_file():
        raise RewardPluginError(f"reward plugin {name!r}: file {target} not found (resolved to {path.resolve()}; "
                                f"relative paths are relative to the working directory {os.getcwd()}).")
    if path.suffix != ".py":
        raise RewardPluginError(f"reward plugin {name!r}: {target} is not a .py file")
    resolved = path.resolve()
    # One module per file, named after its absolute path: two files called rewards.py do not collide.
    mod_name = f"vold_pl_reward_plugin_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file raised while loading: name it
        del sys.modules[mod_name]
        raise RewardPluginError(f"reward plugin {name!r}: running {target} raised {type(e).__name__}: {e}") from e
    return module


def check_reward_signature(fn: Any, name: str) -> None:
    """Raise :class:`RewardPluginError` unless ``fn(completion, record)`` is a valid call (the reward contract)."""
    if not callable(fn):
        raise RewardPluginError(f"reward plugin {name!r} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: let the call decide (failures are counted, not fatal)
    try:
        sig.bind("completion", object())
    except TypeError as e:
        raise RewardPluginError(
            f"reward plugin {name!r} has the signature {getattr(fn, '__name__', name)}{sig}, but rewards are "
            f"called as fn(completion: str, record) -> float ({e}). Give it exactly two positional parameters "
            "(others need defaults).") from None
