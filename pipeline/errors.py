"""Every error labelmill raises on purpose, in one tree.

    LabelmillError                  base: the CLI prints it and exits with its ``exit_code``
    ├── ConfigError                 the job file or a file it names is wrong (exit 2)
    │   ├── JobFileError            unknown key, wrong type, unreadable YAML
    │   ├── LabelsError             empty label list, duplicates, unreadable labels file
    │   └── PromptError             template file wrong, unknown or missing template variable
    ├── InputError                  the input data is wrong (exit 2)
    │   ├── InputNotFoundError      no input file at the path, folder or glob
    │   ├── InputFormatError        not Parquet, missing column, mismatched schemas
    │   └── DuplicateIdError        the id column repeats or holds nulls
    ├── RunStateError               the run folder or the cache can't be used as it is (exit 3)
    │   ├── JobChangedError         the job's fingerprint differs from the one on disk
    │   ├── RunLockedError          another process holds the run folder
    │   ├── StoreBusyError          a running job has the cached answers open (cache clear)
    │   └── StoreDamagedError       cache verify found damage (cache repair fixes it)
    ├── BackendError                the model backend failed (exit 4)
    │   ├── BackendUnavailableError its package is not installed (also a MissingDependencyError)
    │   └── ModelNotFoundError      the model can't be found locally
    ├── OutputError                 a part file or marker could not be written (exit 5)
    └── MissingDependencyError      an optional package is not installed (exit 7); the hint names
                                    the pip install that fixes it

Row-level problems (empty text, text too long, an answer outside the label set) are never
exceptions: they become the row's ``status`` and ``error`` in the output, so no row disappears.
"""

from __future__ import annotations


class LabelmillError(Exception):
    """Base class. ``hint`` says what the user can do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  -> {self.hint}"


class ConfigError(LabelmillError):
    exit_code = 2


class JobFileError(ConfigError):
    pass


class LabelsError(ConfigError):
    pass


class PromptError(ConfigError):
    pass


class InputError(LabelmillError):
    exit_code = 2


class InputNotFoundError(InputError):
    pass


class InputFormatError(InputError):
    pass


class DuplicateIdError(InputError):
    pass


class RunStateError(LabelmillError):
    exit_code = 3


class JobChangedError(RunStateError):
    pass


class RunLockedError(RunStateError):
    pass


class StoreBusyError(RunStateError):
    pass


class StoreDamagedError(RunStateError):
    pass


class BackendError(LabelmillError):
    exit_code = 4


class MissingDependencyError(LabelmillError):
    """An optional package a command needs (matplotlib for charts, say) is not installed."""

    exit_code = 7


class BackendUnavailableError(BackendError, MissingDependencyError):
    """The backend's engine package is missing: a backend failure (exit 4), and also a missing
    dependency for code that catches those."""


class ModelNotFoundError(BackendError):
    pass


class OutputError(LabelmillError):
    exit_code = 5


def yaml_position(exc: Exception) -> str:
    """Where a YAML file is wrong, as ``line N, column M`` (or ""): PyYAML's own message quotes the
    offending line, and a path given by mistake (a system file) must not have its contents shown."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
