"""What a task is to the runner: its output columns, its prompt variables, the constraint on the
answer, and how an answer becomes a row. The runner knows nothing else about tasks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from pipeline.backends.base import Completion, Constraint, table_completions

# Row statuses, in the order the summary prints them. ``invalid``: the model answered, but the answer
# does not fit the task (the raw answer is kept; rerunning won't change it). ``error``: no answer
# came (the backend failed for this row after its retries); rerunning the job retries these rows.
OK, EMPTY, TRUNCATED, INVALID, ERROR = "ok", "empty_input", "truncated", "invalid", "error"
STATUSES = (OK, TRUNCATED, EMPTY, INVALID, ERROR)

COMMON_FIELDS = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("cached_tokens", pa.int32()),
]
TRUNCATED_NOTE = "input text was cut to fit the token budget; the answer is for the cut text"


@dataclass
class RowResult:
    values: dict[str, Any] = field(default_factory=dict)
    """The task's own columns (label, confidence, attributes, ...); missing ones are null."""
    status: str = OK
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None

    @classmethod
    def failed(cls, completion: Completion) -> RowResult:
        return cls(status=ERROR, error=completion.error)

    @classmethod
    def answered(cls, completion: Completion) -> RowResult:
        return cls(
            prompt_tokens=completion.prompt_tokens,
            output_tokens=completion.output_tokens,
            cached_tokens=completion.cached_tokens,
        )


class Task(ABC):
    name: ClassVar[str]

    @property
    @abstractmethod
    def fields(self) -> list[pa.Field]:
        """The task's output columns, placed after the id and kept columns."""

    @abstractmethod
    def prompt_values(self, language: str = "en") -> dict[str, str]:
        """Built-in template variables (besides ``text``), worded for the template's language."""

    @abstractmethod
    def constraint(self) -> Constraint: ...

    @abstractmethod
    def max_tokens(self) -> int:
        """Answer budget that no valid answer can exceed."""

    @abstractmethod
    def parse(self, completion: Completion, truncated: bool) -> RowResult: ...

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

    @abstractmethod
    def describe(self) -> dict:
        """What defines the task's answers (labels, attributes): part of the job fingerprint and
        of the run's provenance."""

    def result_from_row(self, row: dict) -> RowResult:
        """Rebuild a result from an earlier output row (for retrying a chunk's failed rows)."""
        return RowResult(
            values={f.name: row[f.name] for f in self.fields},
            **{f.name: row[f.name] for f in COMMON_FIELDS},
        )
