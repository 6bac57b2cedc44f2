"""Exceptions. `BadInputError` and its subclasses are the user's to fix (exit code 2); anything else that
escapes is an internal failure (exit code 1).

Every message names the file, row, column or value at fault and says how to fix it, in one line.
"""

from __future__ import annotations


class BadInputError(Exception):
    """Input, configuration or usage the user has to fix."""


class InputFileError(BadInputError):
    """A file that is missing, unreadable, empty, not text in the expected encoding, or malformed."""


class SchemaError(BadInputError):
    """A table whose columns or ids do not fit the contract or the config."""


class ConfigError(BadInputError):
    """A config file that is missing, not YAML, or does not describe the fields correctly."""


class CorrectionsLogError(BadInputError):
    """A corrections log row that cannot be replayed."""


class ModelLoadError(BadInputError):
    """A model URI or folder that does not exist or cannot be loaded by this version."""


class OutputError(BadInputError):
    """An output folder that exists already or cannot be written."""


class TrainingDataError(BadInputError):
    """History and log that are too small or too unlabelled to learn from."""


class RequestError(BadInputError):
    """A request to `serve` that the service refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status
