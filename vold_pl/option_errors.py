"""One line for an option the parser refused: the key, the nearest valid keys, what to run for the full list.

jsonargparse reports an unknown or invalid option as a nested tree (``Parser key "model": ... Problem with given
class_path ...: Option 'x' is not accepted``) after the whole usage text; :func:`option_error_line` turns that
tree into one sentence. Nothing is imported here: the classes named in the tree are looked up only among the
modules the user's own config already imported.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Iterable

_PARSER_KEY = re.compile(r'^(\s*)(?:- )?Parser key "([^"]+)":')
_CLASS = re.compile(r"^(\s*)- Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"^(\s*)Option '([^']+)' is not accepted")
_SUBCOMMAND_KEY = re.compile(r"does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)", re.IGNORECASE)
# structure lines of jsonargparse's tree, not the reason
_NOISE = re.compile(r"^\s*(- )?(Does not validate against|Subtypes:|Errors:|Expected a <class 'NoneType'>|Given value"
                    r"( type)?:|Parser key |Problem with given class_path)")


def _loaded_class(path: str) -> type | None:
    """The class at dotted ``path`` if its module is already imported (by the user's config), else None."""
    module, _, name = path.rpartition(".")
    obj = getattr(sys.modules.get(module), name, None)
    return obj if isinstance(obj, type) else None


def _init_keys(cls: type | None) -> list[str]:
    if cls is None:
        return []
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _nearest(key: str, valid: Iterable[str], prefix: str = "") -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # compare the last part only: 'max_step' in trainer.* vs trainer.max_steps
        last = key.rsplit(".", 1)[-1]
        by_last = {v.rsplit(".", 1)[-1]: v for v in valid}
        close = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.6)]
    return ", ".join(prefix + c for c in close)


def option_error_line(message: str, subcommand: str | None, parser_keys: Iterable[str]) -> str:
    """One line for jsonargparse's ``message``: an unknown key with its nearest valid keys, or the reason alone.

    ``parser_keys`` are the subcommand parser's dotted option names (``trainer.max_steps``, ``data.batch_size``);
    the options of a class given by ``class_path`` (the model and its config sections) come from its signature.
    """
    cmd = f"vold-pl {subcommand}" if subcommand else "vold-pl"
    helps = f"`{cmd} --help` lists the options"
    m = _SUBCOMMAND_KEY.search(message) or _UNRECOGNIZED.search(message)
    if m:
        key = m.group(1).lstrip("-").split("=", 1)[0]
        near = _nearest(key, parser_keys)
        hint = f"; nearest valid: {near}" if near else ""
        return f"unknown option '{key}'{hint}. {helps}."
    path: list[tuple[int, str]] = []  # (indent, key) of the Parser key lines above the current line
    cls, model_class = None, None
    for line in message.splitlines():
        if pk := _PARSER_KEY.match(line):
            indent = len(pk.group(1))
            path = [(i, k) for i, k in path if i < indent] + [(indent, pk.group(2))]
        elif c := _CLASS.match(line):
            cls = c.group(2)
            model_class = model_class or cls
        elif na := _NOT_ACCEPTED.match(line):
            keys = [k for _, k in path] + [na.group(2)]
            key = ".".join(keys)
            near = _nearest(na.group(2), _init_keys(_loaded_class(cls or "")), ".".join(keys[:-1]) + ".")
            hint = f"; nearest valid: {near}" if near else ""
            where = f" ({cls.rpartition('.')[2]} has no option '{na.group(2)}')" if cls else ""
            more = (f" `{cmd} --model.help {model_class.rpartition('.')[2]}` lists the model's options."
                    if model_class and keys[0] == "model" else f" {helps}.")
            return f"unknown option '{key}'{where}{hint}.{more}"
    reasons = [ln.strip().lstrip("- ").strip() for ln in message.splitlines()
               if ln.strip() and not _NOISE.match(ln)]
    key = ".".join(k for _, k in path)
    head = f"option '{key}': " if key else ""
    return f"{head}{'; '.join(reasons) or message.strip()}. {helps}."
