"""Routing a chunk's questions: the cascade's student in front of the model, the escalation
backend behind it.

    questions the answer store can't answer
      -> Router: the student labels each; those at or above the threshold keep its label
      -> the rest go to the model (the chunk pipeline's answer source)
    the model's answers (fresh and cached)
      -> Escalation: those under the confidence rule, or with a status it names, are asked again
         of the second backend (through its own answer store); the first answer is kept beside

Both work on whole columns and are deterministic given the stored student, so a resumed run routes
every row as an uninterrupted one would. How the student is trained and its threshold chosen is
``pipeline/cascade.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.backends.base import Backend
from pipeline.contracts import ANSWER_SCHEMA, Request, Source, Status
from pipeline.prompts import RenderedPrompt
from pipeline.strategies import Strategy
from pipeline.students import Student
from pipeline.tasks.base import Task

STUDENT_FINISH = "student"
"""``finish_reason`` of an answer the student gave (it never reaches the answer store)."""


@dataclass
class Router:
    """The student and its threshold: which questions it answers, and with what."""

    student: Student | None
    """None: there was nothing to train one on; every text goes to the model."""
    threshold: float | None
    """None: the student could not meet the target and answers nothing."""
    student_id: str | None

    def route(self, texts: pl.Series) -> tuple[np.ndarray, pa.Table, np.ndarray]:
        """For each text: whether the student answers it, the student's answers for those it
        does (``ANSWER_SCHEMA``, in order), and its confidence for every text."""
        if self.student is None:
            return np.zeros(len(texts), dtype=bool), ANSWER_SCHEMA.empty_table(), np.full(len(texts), np.nan)
        labels, confidence = self.student.predict(texts.to_list())
        accept = np.zeros(len(texts), dtype=bool) if self.threshold is None else confidence >= self.threshold
        return accept, student_answers(labels[accept], confidence[accept]), confidence


def student_answers(labels: np.ndarray, confidence: np.ndarray) -> pa.Table:
    """The student's labels as answers a task parses like the model's: the label as the text,
    the log of its confidence as the logprob, no tokens."""
    n = len(labels)
    with np.errstate(divide="ignore"):
        logprob = np.log(np.asarray(confidence, dtype=np.float64))
    columns = {
        "text": pa.array(list(labels), pa.string()),
        "logprob": pa.array(logprob, pa.float64()),
        "prompt_tokens": pa.array(np.zeros(n, dtype=np.int32)),
        "output_tokens": pa.array(np.zeros(n, dtype=np.int32)),
        "finish_reason": pa.array([STUDENT_FINISH] * n, pa.string()),
        "retries": pa.array(np.zeros(n, dtype=np.int32)),
    }
    return pa.Table.from_arrays(
        [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in ANSWER_SCHEMA],
        schema=ANSWER_SCHEMA,
    )


def lookup(store, keys: pl.Series) -> tuple[np.ndarray, pa.Table, np.ndarray]:
    """What an answer store (or None) holds for ``keys``: the positions it answers, their answers
    in that order, and the positions still to ask."""
    if store is not None:
        hits, stored = store.lookup(keys)
    else:
        hits, stored = np.empty(0, dtype=np.int64), ANSWER_SCHEMA.empty_table()
    missing = np.ones(len(keys), dtype=bool)
    missing[hits] = False
    return hits, stored, np.flatnonzero(missing)


def in_order(n: int, parts: list[tuple[np.ndarray, pa.Table]]) -> pa.Table:
    """``n`` answers put together from ``parts``: each a table of answers and the positions they
    answer, in that order (positions of all parts together cover 0..n-1 once)."""
    order = np.empty(n, dtype=np.int64)
    offset = 0
    for positions, _ in parts:
        order[positions] = offset + np.arange(len(positions))
        offset += len(positions)
    return pa.concat_tables([table for _, table in parts]).take(pa.array(order))


class Escalation:
    """The second backend of ``escalate:``, asked through the job's strategy and its own answer
    store, for the answers the rule picks."""

    def __init__(
        self,
        backend: Backend,
        task: Task,
        request: Request,
        strategy: Strategy,
        store,
        confidence_below: float | None,
        statuses: list[str],
    ) -> None:
        """``task`` parses the first backend's answers for the rule; ``store`` (a
        ``ResultCache`` of the escalation's namespace, or None) keeps this backend's answers."""
        self.backend = backend
        self.task = task
        self.request = request
        self.strategy = strategy
        self.store = store
        self.confidence_below = confidence_below
        self.statuses = set(statuses)

    def picks(self, answers: pa.Table) -> tuple[np.ndarray, pa.Table]:
        """Which answers go up (bool per answer), and the first backend's ``label`` and
        ``confidence`` (the task's parse of its answers) for all of them."""
        parsed = self.task.parse_answers(answers, pa.array(np.zeros(answers.num_rows, dtype=bool)))
        status = parsed.column("status").to_numpy(zero_copy_only=False)
        picked = np.isin(status, list(self.statuses)) if self.statuses else np.zeros(len(status), dtype=bool)
        if self.confidence_below is not None:
            confidence = pc.fill_null(parsed.column("confidence"), math.inf).to_numpy(zero_copy_only=False)
            labelled = np.isin(status, [Status.OK.value, Status.TRUNCATED.value])
            picked |= labelled & (confidence < self.confidence_below)
        return picked, parsed.select(["label", "confidence"])

    def answer(self, prompt: RenderedPrompt, keys: pl.Series, texts: pl.Series) -> tuple[pa.Table, int]:
        """Answers for ``texts`` (``ANSWER_SCHEMA``, in order) and how many were asked now (the
        rest came from the escalation's store)."""
        hits, stored, ask = lookup(self.store, keys)
        fresh = ANSWER_SCHEMA.empty_table()
        if len(ask):
            fresh = self.strategy.answer(self.backend, prompt, texts.gather(ask), self.request)
            if self.store is not None:
                self.store.add(keys.gather(ask), texts.gather(ask), fresh)
        return in_order(len(texts), [(hits, stored), (ask, fresh)]), len(ask)


def route_columns(
    fields: list[pa.Field],
    origin: np.ndarray,
    duplicate: np.ndarray,
    student_confidence: np.ndarray,
    first: pa.Table | None,
) -> pa.Table:
    """The route columns (``contracts.route_fields``) of the rows asked: ``origin`` per row
    (a ``Source`` value), ``duplicate`` where the row took an earlier row's answer, the student's
    confidence (NaN where it did not score the row) and the first backend's label and confidence
    (null where the row was not escalated)."""
    source = np.where(duplicate, Source.DUPLICATE.value, origin)
    columns = {
        "source": pa.array(source.tolist(), pa.string()),
        "student_confidence": pa.array(student_confidence, pa.float64(), mask=np.isnan(student_confidence)),
    }
    n = len(origin)
    columns["first_label"] = first.column("label") if first is not None else pa.nulls(n, pa.string())
    columns["first_confidence"] = (
        first.column("confidence") if first is not None else pa.nulls(n, pa.float64())
    )
    return pa.Table.from_arrays([columns[f.name] for f in fields], schema=pa.schema(fields))
