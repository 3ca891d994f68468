"""The one base class for errors in what the user gave us (configs, data files, checkpoints, model paths).

``vold-pl`` prints such an error as its message alone and exits with code 2; ``VOLD_PL_DEBUG=1`` shows the
traceback too. Raise a subclass (or ``UserError`` itself) whenever the fix is in the user's hands, and say in
the message which file, line and field is wrong and what to do.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix: the message names the file/line/field (or config key) and the remedy."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file the user named (data source, checkpoint, image) that does not exist; the message says what
    produces it or where to point instead."""


def find_user_error(e: BaseException | None) -> UserError | None:
    """``e`` itself or the first :class:`UserError` in its chain of causes (config parsers and Lightning may
    wrap the error raised by a constructor or a hook)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
