"""What a task is to the rest of labelmill, and all a new task has to say.

A task is one class, registered under the entry point group ``labelmill.tasks`` (see
``pipeline/plugins.py``), plus a prompt template that names it (``task:`` in the template). It
declares:

    Settings        its own top-level job keys (a pydantic model; unknown keys are refused)
    fields          its output columns, placed after the id and kept columns
    prompt_values   the template variables it fills (``labels``, ``attributes``, ...)
    request         the constraint on the answer and the answer budget
    parse_answers   how answers become its columns and a status per row
    describe        what defines its answers: part of the job fingerprint and the cache key
    lines           what ``labelmill validate`` prints about it
    evaluation      which ``labelmill eval`` scoring applies to its output ("classify",
                    "extract", or None)

The pipeline knows nothing else about tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from pipeline.contracts import (
    COMMON_FIELDS,
    Completion,
    Constraint,
    Options,
    Request,
    Sampling,
    Status,
    table_completions,
)

TRUNCATED_NOTE = "input text was cut to fit the token budget; the answer is for the cut text"


@dataclass
class RowResult:
    values: dict[str, Any] = field(default_factory=dict)
    """The task's own columns (label, confidence, attributes, ...); missing ones are null."""
    status: str = Status.OK
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None

    @classmethod
    def failed(cls, completion: Completion) -> RowResult:
        return cls(status=Status.ERROR, error=completion.error)

    @classmethod
    def answered(cls, completion: Completion) -> RowResult:
        return cls(
            prompt_tokens=completion.prompt_tokens,
            output_tokens=completion.output_tokens,
            cached_tokens=completion.cached_tokens,
        )


class Task(ABC):
    name: ClassVar[str]
    Settings: ClassVar[type[Options]]
    """The task's own job keys, at the top level of the job file next to the common ones."""
    fingerprint_part: ClassVar[str] = "task"
    """Its name among the fingerprint's components in ``run.json`` (shown when a job changed)."""
    evaluation: ClassVar[str | None] = None
    """Which ``labelmill eval`` scoring applies to the output: "classify", "extract" or None."""

    def __init__(self, settings: Options, sampling: Sampling) -> None:
        """Build from the task's own settings; raise a ConfigError (or subclass) on anything that
        can't work, such as an unreadable labels file. No model is loaded here."""
        self.settings = settings
        self.sampling = sampling

    @property
    @abstractmethod
    def fields(self) -> list[pa.Field]:
        """The task's output columns, placed after the id and kept columns."""

    @abstractmethod
    def prompt_values(self, language: str = "en") -> dict[str, str]:
        """Template variables (besides ``text``), worded for the template's language."""

    @abstractmethod
    def constraint(self) -> Constraint: ...

    @abstractmethod
    def max_tokens(self) -> int:
        """Answer budget that no valid answer can exceed (``sampling.max_tokens`` overrides)."""

    def use_backend(self, cannot_score: str | None) -> None:  # noqa: B027 - optional hook
        """Told, once the backend is known, why it can't score a label set (None: it can)."""

    def request(self) -> Request:
        """What the backend is asked for each text: the constraint, the budget and the decoding."""
        return Request(self.constraint(), self.max_tokens(), self.sampling)

    @abstractmethod
    def parse(self, completion: Completion, truncated: bool) -> RowResult: ...

    @abstractmethod
    def describe(self) -> dict:
        """What defines the task's answers (labels, attributes): part of the job fingerprint, of
        the cache key and of the run's provenance. JSON-serialisable."""

    def lines(self) -> list[tuple[str, str]]:
        """``(heading, text)`` lines ``labelmill validate`` prints about the task."""
        return []

    @property
    def single_label(self) -> bool:
        """The output has one ``label`` per row (what ``labelmill bench`` compares)."""
        return False

    @property
    def result_fields(self) -> list[pa.Field]:
        """Every column a parsed answer fills: the task's own, then the common ones."""
        return self.fields + COMMON_FIELDS

    def parse_answers(self, answers: pa.Table, truncated: pa.Array) -> pa.Table:
        """An answers table (``ANSWER_SCHEMA``) as result columns (``result_fields``), row by row.

        A task whose answers can be checked on whole columns overrides this; the default parses
        each answer with ``parse``.
        """
        flags = truncated.to_pylist()
        return self.results_table(
            [self.parse(c, t) for c, t in zip(table_completions(answers), flags, strict=True)]
        )

    def results_table(self, results: list[RowResult]) -> pa.Table:
        columns = [pa.array([r.values.get(f.name) for r in results], f.type) for f in self.fields]
        columns += [pa.array([getattr(r, f.name) for r in results], f.type) for f in COMMON_FIELDS]
        return pa.Table.from_arrays(columns, schema=pa.schema(self.result_fields))
