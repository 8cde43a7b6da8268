"""Exceptions of the core library.

`InputError` is the user's fault (bad file, mismatched adapters, bad parameter): the CLI maps it to exit
code 2 and the service to an HTTP 4xx / a failed job with `code`. Anything else is an internal failure.
"""

from __future__ import annotations


class SSTMergeError(Exception):
    """Base class of every error raised on purpose by sstmerge_core."""

    code = "internal_error"


class InputError(SSTMergeError):
    """The inputs are wrong: the message says which file, module or parameter, in one line."""

    code = "invalid_input"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class AdapterError(InputError):
    """An adapter folder is missing, corrupt, pickled, unsupported or does not fit the base model."""

    code = "invalid_adapter"


class DatasetError(InputError):
    """A data file is missing, empty, badly encoded or lacks a required column."""

    code = "invalid_dataset"


class ModelError(InputError):
    """The base model cannot be found or loaded."""

    code = "invalid_base_model"


class Cancelled(SSTMergeError):
    """The caller asked to stop; raised at the next stage boundary."""

    code = "cancelled"
