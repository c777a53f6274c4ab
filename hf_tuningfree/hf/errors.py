"""Errors about the user's input, which the scripts and the CLI print as one line (no traceback).

Each is a ``ValueError`` (or also a ``TypeError``), so code that catches those keeps working; the
message names the field, file or option that was wrong and what is allowed.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input (an argument, a config value, a data file): the message says what to change."""


class ScriptArgumentError(UserInputError):
    """Bad command-line or config-file arguments; the message says what to change."""


class OptimizerArgumentError(UserInputError):
    """An optimizer setting (``optim``, ``optim_args``, ``learning_rate``, ``adam_*``,
    ``weight_decay``) that the optimizer would reject; raised when the arguments are built, before
    any model or data is loaded."""


class OptimizerArgumentTypeError(OptimizerArgumentError, TypeError):
    """An ``optim_args`` value of the wrong type (``beta2=high``)."""


class ResumeError(UserInputError):
    """``resume_from_checkpoint`` names a checkpoint that this run cannot continue (written by
    another optimizer)."""
