"""The user-error family: a refusal of what the user gave (a config, data, a stage that cannot run, a request).

The front door (``cli.main``) prints a ``UserError`` (and a missing file) as one line and exits 2; any other
exception is a bug or a failure and keeps its traceback. Each class is also a ``ValueError`` (or, where it was
one before, a ``RuntimeError``), so callers that caught those still do.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is refused; the message names what and where."""


class ConfigError(UserError, ValueError):
    """A config file, flag, override or environment setting that does not match what the job accepts."""


class DataError(UserError, ValueError):
    """A dataset, prepared split, annotation or submission file that cannot be used as it is."""


class StageError(UserError, ValueError):
    """A training stage that cannot start: wrong data, a missing previous stage, impossible settings."""


class RequestError(UserError):
    """A request the server refuses: answered as ``{"error": {"code", "message"}}`` with HTTP ``status``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
