"""The one exception type for mistakes a user can fix (a config key, a data file, a tokenizer, a
resume path, a checkpoint directory in use). ``train.py`` prints its message as one line
(``seqpar: <message>``) and exits with status 2; anything else is a bug or a fault and keeps its
traceback. Messages name the key or file and say what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave seqpar (exit status 2, no traceback)."""


class DataError(UserError, ValueError):
    """A data file, dataset setting or tokenizer cannot be used as given."""
