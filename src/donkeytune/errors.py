"""Errors that reach the user as a clear message and an exit status, never a traceback."""

from __future__ import annotations


class DonkeyError(Exception):
    """An error the user can fix. `fix` says how; `status` is the process exit status."""

    status = 1

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class ConfigError(DonkeyError):
    """Options that contradict each other or cannot be parsed."""

    status = 2


class DataError(DonkeyError):
    """Bad training data: names the file and line."""

    status = 2

    def __init__(self, path, line: int | None, message: str, fix: str | None = None):
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}", fix)
        self.path = path
        self.line = line


class ModelError(DonkeyError):
    """A model reference that cannot be resolved or used."""

    status = 2
