"""The exceptions that mean "what you gave is wrong", as opposed to a bug.

Every check of user input (paths, data, arguments, configs, checkpoints) raises a
:class:`UserError`; the drivers print those as one ``error: ...`` line and exit 2
(:func:`mpvit.training.user_errors_in_one_line`). Anything else, a ``ValueError`` from
deep inside a model included, keeps its full traceback. Each subclass also derives
from the builtin a caller would expect (``ValueError``, ``FileNotFoundError``,
``KeyError``), so library code can catch it as before.
"""
from __future__ import annotations

from typing import Iterable

__all__ = ['CheckpointError', 'DivergenceError', 'InvalidInputError', 'MissingFileError', 'UnknownNameError',
           'UserError', 'first_few']


def first_few(items: Iterable[object], show: int = 5) -> str:
    """``a, b, c, ... (+7 more)``: the first ``show`` items of a list for a one-line message, with the count
    of the rest."""
    items = [str(item) for item in items]
    rest = f', ... (+{len(items) - show} more)' if len(items) > show else ''
    return ', '.join(items[:show]) + rest


class UserError(Exception):
    """Something the user supplied is wrong or missing; the message says what and where, in one line."""


class InvalidInputError(UserError, ValueError):
    """A bad argument, config value or data file."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UnknownNameError(UserError, KeyError):
    """A name (dataset, checkpoint, model) that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ''


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, may not be read, or whose tensors do not fit the model."""


class DivergenceError(UserError, FloatingPointError):
    """Training produced a non-finite loss (learning rate, data or precision): stopped before it is saved."""
