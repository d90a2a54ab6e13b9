"""What the parts of labelmill hand each other: answers, constraints, decoding, row statuses.

Tasks, backends, the answer stores and the chunk pipeline all speak in these types, and none of
them needs to import another to do so. This module imports nothing from labelmill.

    Status          a row's outcome in the output (``ok``, ``truncated``, ``empty_input``, ...)
    Constraint      what an answer must be: one of a set of strings, or JSON matching a schema
    Sampling        how an answer is decoded (the job's ``sampling:`` section)
    Request         what a task asks of a backend for a batch of texts
    Completion      one answer as a backend returned it
    ANSWER_SCHEMA   answers as columns: the fields of Completion, one row per request
    Options         the base of every settings model (unknown keys refused, frozen)
"""

from __future__ import annotations

import sys
from dataclasses import astuple, dataclass, fields
from enum import Enum

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


Messages = list[dict[str, str]]
"""A chat conversation: ``[{"role": "system", "content": ...}, {"role": "user", ...}]``."""


class Status(StrEnum):
    """A row's outcome. Every input row is in the output with one of these and, unless ``ok``, a
    reason in ``error``."""

    OK = "ok"
    TRUNCATED = "truncated"
    """Labelled, but the text was cut to fit the token budget; the answer is for the cut text."""
    EMPTY = "empty_input"
    """Null or blank text: never sent to the model."""
    INVALID = "invalid"
    """The model answered, but not within the task (the raw answer is kept; a rerun won't change it)."""
    ERROR = "error"
    """No answer came (the backend failed for this row after its retries); a rerun retries it."""


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
"""Status values in the order summaries print them."""
LABELLED: tuple[str, ...] = (Status.OK.value, Status.TRUNCATED.value)
"""Statuses of rows that carry an answer."""


class Options(BaseModel):
    """Base of every settings model: unknown keys are refused with their name, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(Options):
    """How the answer is decoded. Greedy by default, so a rerun gives the same labels."""

    temperature: float = Field(default=0.0, ge=0)
    """0 = greedy (argmax at each step); above 0 samples from the label-constrained distribution."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    """Answer length cap. None = computed by the task from its longest valid answer, so none is cut."""
    seed: int | None = None
    """Per-request seed for sampling (temperature > 0)."""


@dataclass(frozen=True)
class Constraint:
    """What the answer must be: one of ``choice``, or a JSON document matching ``json_schema``."""

    choice: tuple[str, ...] | None = None
    json_schema: dict | None = None

    def __post_init__(self) -> None:
        if (self.choice is None) == (self.json_schema is None):
            raise ValueError("a Constraint is either a choice or a JSON schema")


PATH_SEP = " > "
"""Between the levels of a taxonomy path label (``Home > Kitchen > Kettles``)."""

GENERATE = "generate"
SCORE = "score"


@dataclass(frozen=True)
class Request:
    """What the task asks of the backend for every text of a batch."""

    constraint: Constraint
    max_tokens: int
    """Answer budget that no valid answer exceeds."""
    sampling: Sampling
    decoding: str = GENERATE
    """``generate``: the answer is decoded within the constraint. ``score`` (a ``choice``
    constraint only): every choice is scored as a whole and the most probable one is the answer
    (``pipeline/scoring.py``); no answer is spelled out token by token."""
    alternatives: int = 0
    """``score``: how many of the most probable choices come back with their probabilities
    (``Completion.alternatives``); at least the answer itself."""
    calibrate: bool = False
    """``score``: divide out what content-free inputs get (contextual calibration, see
    ``pipeline/scoring.py``)."""


@dataclass(frozen=True)
class Completion:
    """One answer, as the backend returned it. Parsing it into columns is the task's job."""

    text: str
    logprob: float | None
    """Sum of the answer tokens' log-probabilities after the constraint was applied (the
    constrained decoder's probability of this answer), or None if not available."""
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None
    cached_tokens: int | None = None
    """Prompt tokens served from a prefix or prompt cache, where the backend says so."""
    error: str | None = None
    """Why no answer came (after retries); the row gets status ``error`` and is retried on rerun."""
    retries: int = 0
    alternatives: tuple[tuple[str, float], ...] | None = None
    """Scored answers (``Request.decoding`` ``score``): the most probable choices with their
    log-probabilities, normalised over the choices, most probable first; None otherwise."""
    choices: tuple[str, ...] | None = None
    """The row's own label set the answer was picked from (a shortlist's candidates); None when
    every row had the job's."""
    levels: tuple[tuple[str, float], ...] | None = None
    """Answers picked level by level (a taxonomy walked top-down): the node chosen at each level
    with its log-probability among that level's options; ``logprob`` is their sum."""

    @classmethod
    def failed(cls, reason: str, retries: int = 0) -> Completion:
        return cls("", None, 0, 0, None, error=reason, retries=retries)


ALTERNATIVES_TYPE = pa.list_(pa.struct([pa.field("text", pa.string()), pa.field("logprob", pa.float64())]))
"""Scored answers' alternatives as a column: a list of (text, logprob) per answer."""

ANSWER_SCHEMA = pa.schema(
    [
        pa.field("text", pa.string()),
        pa.field("logprob", pa.float64()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("cached_tokens", pa.int32()),
        pa.field("error", pa.string()),
        pa.field("retries", pa.int32()),
        pa.field("alternatives", ALTERNATIVES_TYPE),
        pa.field("choices", pa.list_(pa.string())),
        pa.field("levels", ALTERNATIVES_TYPE),
    ]
)
"""Answers as columns, one row per request: the fields of :class:`Completion`, in its order."""


def answers_table(completions: list[Completion]) -> pa.Table:
    """Completions as an answers table (``ANSWER_SCHEMA``)."""
    columns = [list(col) for col in zip(*(astuple(c) for c in completions), strict=True)]
    columns = columns or [[] for _ in ANSWER_SCHEMA]
    for name in ("alternatives", "levels"):  # pairs as structs
        at = ANSWER_SCHEMA.get_field_index(name)
        columns[at] = [
            None if pairs is None else [{"text": t, "logprob": lp} for t, lp in pairs]
            for pairs in columns[at]
        ]
    return pa.Table.from_arrays(
        [pa.array(col, f.type) for col, f in zip(columns, ANSWER_SCHEMA, strict=True)], schema=ANSWER_SCHEMA
    )


def table_completions(answers: pa.Table) -> list[Completion]:
    """An answers table back as Completion objects (for code that handles one answer at a time)."""
    names = [f.name for f in fields(Completion)]
    rows = answers.select(names).to_pylist()
    for row in rows:
        for name in ("alternatives", "levels"):
            pairs = row[name]
            row[name] = None if pairs is None else tuple((a["text"], a["logprob"]) for a in pairs)
        if row["choices"] is not None:
            row["choices"] = tuple(row["choices"])
    return [Completion(**row) for row in rows]


COMMON_FIELDS = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("cached_tokens", pa.int32()),
]
"""Output columns every task's rows carry after the task's own."""


class Source(StrEnum):
    """Where a row's final answer came from (the ``source`` column of a job with a cascade or an
    escalation)."""

    MODEL = "model"
    """Asked of the job's backend in this run."""
    STUDENT = "student"
    """Answered by the cascade's student in the model's place."""
    ESCALATED = "escalated"
    """Asked again of the escalation backend; the first answer is in ``first_label``."""
    CACHE = "cache"
    """The job's backend's answer from the result cache (an earlier run or chunk)."""
    DUPLICATE = "duplicate"
    """The answer of an earlier row of the chunk with the same normalised text."""


def route_fields(cascade: bool, escalate: bool) -> list[pa.Field]:
    """Output columns that say how a row was routed; none for a job without cascade or escalation."""
    if not (cascade or escalate):
        return []
    fields = [pa.field("source", pa.string())]
    if cascade:
        fields.append(pa.field("student_confidence", pa.float64()))
    if escalate:
        fields += [pa.field("first_label", pa.string()), pa.field("first_confidence", pa.float64())]
    return fields
