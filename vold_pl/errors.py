"""The one base class for errors in what the user gave us (configs, data files, checkpoints, model paths).

``vold-pl`` prints such an error as its message alone and exits with code 2; ``VOLD_PL_DEBUG=1`` shows the
traceback too. Raise a subclass (or ``UserError`` itself) whenever the fix is in the user's hands, and say in
the message which file, line and field is wrong and what to do.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix: the message names the file/line/field (or config key) and the remedy."""
