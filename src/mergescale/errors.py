"""One exception type per kind of bad input.

Every message names the file, model, tensor or key at fault, on one line, so the CLI can print it
without a traceback. All of them derive from :class:`MergeScaleError`, which the CLI catches.
"""

from __future__ import annotations


class MergeScaleError(Exception):
    """Base class of every error mergescale reports to a user."""


class ConfigError(MergeScaleError):
    """A configuration file or value is invalid (unknown key, unknown method, out-of-range value)."""


class InputModelError(MergeScaleError):
    """An input model cannot be used: missing path, unreadable or corrupt file, different architecture."""


class TensorMismatchError(MergeScaleError):
    """Input models disagree on a tensor: missing in one model, or different shapes."""


class NonFiniteError(MergeScaleError):
    """An input tensor holds NaN or Inf values, a merge overflows, or a model gives non-finite log-likelihoods.

    ``in_input`` says the cause is a NaN/Inf in an input tensor, which a merge can be told to accept
    (``allow_nonfinite``); each caller adds the remedy that applies to it, so the message carries none.
    """

    def __init__(self, message: str, *, in_input: bool = False) -> None:
        super().__init__(message)
        self.in_input = in_input


class NonFiniteScoreWarning(RuntimeWarning):
    """A task's score was marked undefined (NaN) because the model's log-likelihoods were not finite
    (``evaluate(..., on_nonfinite="undefined")``)."""


class OutputError(MergeScaleError):
    """The output location cannot be written (non-empty folder without overwrite, ...)."""


class TaskError(MergeScaleError):
    """An evaluation task, suite or data file is invalid."""
