"""The chunk pipeline: what happens to one chunk of rows, the same for every command.

    rows -> text (cleaned, cut to the token budget; empty rows set aside)
         -> questions: rows whose normalised text is equal are asked once, with the first spelling
         -> the answer store: texts answered before (this run's earlier chunks, earlier runs)
         -> the cascade's student, where the job has one: it answers the texts it is sure of
         -> the answer source: the backend (``run``), batch request files (``export``) or batch
            result files (``import``)
         -> the escalation backend, where the job has one: the answers its rule picks, asked again
         -> the task parses the answers -> the chunk's output table, every row, in input order

``run``, ``export``, ``import`` and ``bench`` differ only in the answer source they plug in and in
what they do with the result; everything here is shared, and works on whole columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import __version__
from pipeline.backends.base import Backend
from pipeline.contracts import ANSWER_SCHEMA, Request, Source, Status, route_fields
from pipeline.dedupe import group_rows, normalise_texts
from pipeline.errors import BackendError
from pipeline.io import Chunk, InputFile
from pipeline.plan import Plan
from pipeline.prompts import RenderedPrompt
from pipeline.routing import Escalation, Router, in_order, lookup, route_columns
from pipeline.runfolder import ChunkStats
from pipeline.strategies import Flat, Strategy
from pipeline.tasks.base import RowResult
from pipeline.text import text_series


@dataclass
class Questions:
    """What a chunk still needs answered after the answer store: one entry per distinct text."""

    chunk: Chunk
    texts: pl.Series
    """Each text as it is sent: the first spelling met, cleaned and cut to the budget."""
    keys: pl.Series
    """Each text's key: its normalised form (the text itself when duplicates are not collapsed)."""
    rows: np.ndarray
    """The chunk row each text was first met in."""
    prompt: RenderedPrompt
    request: Request

    def __len__(self) -> int:
        return len(self.texts)


class AnswerSource(Protocol):
    """Where answers come from once the answer store has none."""

    def answer(self, questions: Questions) -> pa.Table | None:
        """An answers table (``ANSWER_SCHEMA``), one row per question in order; or None when the
        answers come later (``export`` writes requests), and the chunk stays unfinished."""


class AnswerStore(Protocol):
    """Answers kept by normalised text (``pipeline/cache.py``)."""

    def lookup(self, keys: pl.Series) -> tuple[np.ndarray, pa.Table]: ...

    def add(self, keys: pl.Series, sent: pl.Series, answers: pa.Table) -> None: ...


class BackendSource:
    """The live backend, asked through the job's strategy (``pipeline/strategies.py``): once per
    chunk with every question, or once per level of a taxonomy. ``progress`` (if given) is told
    the share of the chunk's questions answered so far, as the backend reports answers."""

    def __init__(
        self,
        backend: Backend,
        progress: Callable[[float], None] | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.backend = backend
        self.progress = progress
        self.strategy = strategy or Flat()

    def _ask(self, questions: Questions) -> pa.Table:
        return self.strategy.answer(self.backend, questions.prompt, questions.texts, questions.request)

    def answer(self, questions: Questions) -> pa.Table:
        if self.progress is None or not len(questions):
            return self._ask(questions)
        done, total, report = 0, len(questions), self.progress

        def answered(count: int) -> None:
            nonlocal done
            done = min(total, done + count)
            report(done / total)

        self.backend.on_answers = answered
        try:
            return self._ask(questions)
        finally:
            self.backend.on_answers = None


@dataclass
class PendingChunk:
    """A chunk's rows with their text ready; ``todo`` are the rows still needing an answer.

    Rows not in ``todo`` take their result from ``kept`` (row ``source[i]`` for row ``i``): the
    empty-input result, or this chunk's earlier output when only its failed rows are redone.
    """

    chunk: Chunk
    table: pa.Table
    texts: pl.Series
    """Each row's text as it is sent (cleaned, cut to the budget); null where the row has none."""
    todo: np.ndarray
    truncated: np.ndarray
    """Per row: its text was cut to fit the token budget."""
    kept: pa.Table
    source: np.ndarray


@dataclass
class Routes:
    """How a chunk's distinct texts were answered (the ``source`` column's makings), one entry per
    text in the order the store was asked."""

    origin: np.ndarray
    """A ``Source`` value per text."""
    student_confidence: np.ndarray
    """The student's confidence (NaN where it did not score the text)."""
    first: pa.Table | None = None
    """The first backend's ``label`` and ``confidence`` (null where the text was not escalated)."""


class ChunkPipeline:
    """Labels chunks of one plan: ``label`` turns a chunk's input rows into its output rows."""

    def __init__(
        self,
        plan: Plan,
        backend: Backend,
        budget: int | None,
        store: AnswerStore | None,
        source: AnswerSource,
        escalation: Escalation | None = None,
    ) -> None:
        """``backend`` counts and cuts tokens (it is not started for that); ``budget`` is the most
        tokens a row's text may have; ``store`` may be None (nothing shared, every row asked).
        ``router`` (set once the cascade's student is chosen) answers what it is sure of before
        the source is asked; ``escalation`` asks again what its rule picks."""
        self.plan = plan
        self.backend = backend
        self.budget = budget
        self.store = store
        self.source = source
        self.request = plan.request
        self.router: Router | None = None
        self.escalation = escalation
        self.route_fields = route_fields(plan.job.cascade is not None, plan.escalation is not None)

    def label(
        self, table: pa.Table, chunk: Chunk, previous: pa.Table | None = None
    ) -> tuple[pa.Table | None, ChunkStats]:
        """The chunk's output table (same rows, same order) and where its answers came from; the
        table is None when the source answers later. With ``previous`` (this chunk's earlier
        output), only its rows with status ``error`` are asked again."""
        return self.label_prepared(self.prepare(table, chunk, previous))

    def label_prepared(self, pending: PendingChunk) -> tuple[pa.Table | None, ChunkStats]:
        """``label`` for a chunk whose text is ready (``prepare``)."""
        chunk = pending.chunk
        texts = pending.texts.gather(pending.todo)
        dedupe = self.plan.job.dedupe
        if dedupe.enabled:
            keys = normalise_texts(texts, dedupe)
            first, group = group_rows(keys)
        else:
            keys = texts
            first = group = np.arange(len(texts), dtype=np.int64)
        # A group's key is its normalised text. Each key is asked once per store: the first spelling
        # met is sent, and every spelling of the key, in any chunk, gets its answer.
        sent, keys = texts.gather(first), keys.gather(first)
        hits, stored, ask = lookup(self.store, keys)
        routes = Routes(np.full(len(sent), Source.CACHE.value, dtype=object), np.full(len(sent), np.nan))
        taught, taught_answers = np.empty(0, dtype=np.int64), ANSWER_SCHEMA.empty_table()
        if self.router is not None and len(ask):
            accept, taught_answers, confidence = self.router.route(sent.gather(ask))
            routes.student_confidence[ask] = confidence
            taught, ask = ask[accept], ask[~accept]
            routes.origin[taught] = Source.STUDENT.value
        routes.origin[ask] = Source.MODEL.value
        stats = ChunkStats(
            model_calls=len(ask), cache_hits=len(hits), student_labels=len(taught),
            duplicates=len(texts) - len(sent),
        )  # fmt: skip
        fresh = ANSWER_SCHEMA.empty_table()
        if len(ask):
            questions = Questions(
                chunk,
                sent.gather(ask),
                keys.gather(ask),
                pending.todo[first[ask]],
                self.plan.prompt,
                self.request,
            )
            answers = self.source.answer(questions)
            if answers is None:
                return None, stats
            if answers.num_rows != len(ask):
                raise BackendError(
                    f"the answer source gave {answers.num_rows} answers to {len(ask)} questions"
                )
            fresh = answers
            if self.store is not None:
                self.store.add(questions.keys, questions.texts, fresh)
        per_group = in_order(len(sent), [(hits, stored), (ask, fresh), (taught, taught_answers)])
        stats.count_answers(fresh)
        if self.escalation is not None:
            per_group = self._escalate(per_group, routes, sent, keys, stats)
        routed = None
        if self.route_fields:
            duplicate = first[group] != np.arange(len(group))
            first_answers = routes.first.take(pa.array(group)) if routes.first is not None else None
            routed = route_columns(
                self.route_fields,
                routes.origin[group],
                duplicate,
                routes.student_confidence[group],
                first_answers,
            )
        return self.finish(pending, per_group.take(pa.array(group)), routed), stats

    def _escalate(
        self, answers: pa.Table, routes: Routes, sent: pl.Series, keys: pl.Series, stats: ChunkStats
    ) -> pa.Table:
        """The model's answers (fresh or cached) that the escalation rule picks, replaced by the
        escalation backend's; ``routes`` records the first answers and the new origin."""
        escalation = self.escalation
        from_model = np.isin(routes.origin, [Source.MODEL.value, Source.CACHE.value])
        picked, first = escalation.picks(answers)
        picked &= from_model
        nulls = pa.Table.from_arrays(
            [pa.nulls(answers.num_rows, pa.string()), pa.nulls(answers.num_rows, pa.float64())],
            names=["label", "confidence"],
        )
        where = np.flatnonzero(picked)
        if not len(where):
            routes.first = nulls
            return answers
        again, asked = escalation.answer(self.plan.prompt, keys.gather(where), sent.gather(where))
        stats.escalations += len(where)
        stats.escalation_calls += asked
        kept = np.flatnonzero(~picked)
        routes.origin[where] = Source.ESCALATED.value
        keep = pa.array(picked)
        routes.first = pa.Table.from_arrays(
            [pc.if_else(keep, first.column(c), nulls.column(c)) for c in ("label", "confidence")],
            names=["label", "confidence"],
        )
        return in_order(answers.num_rows, [(kept, answers.take(pa.array(kept))), (where, again)])

    def prepare(self, table: pa.Table, chunk: Chunk, previous: pa.Table | None = None) -> PendingChunk:
        """Row text, empty rows, truncation."""
        job, task = self.plan.job, self.plan.task
        texts = text_series(table, job.text_column, job.text_template)
        rows = table.num_rows
        if previous is None:
            todo = np.flatnonzero(texts.is_not_null().to_numpy())
            kept = task.results_table([RowResult(status=Status.EMPTY, error="text is null or blank")])
            for f in self.route_fields:  # never answered: no source
                kept = kept.append_column(f, pa.nulls(1, f.type))
            source = np.zeros(rows, dtype=np.int64)
        else:
            schema = pa.schema(task.result_fields + self.route_fields)
            kept = pa.Table.from_arrays([previous.column(f.name).cast(f.type) for f in schema], schema=schema)
            failed = pc.equal(previous.column("status"), Status.ERROR.value)
            todo = np.flatnonzero(failed.to_numpy(zero_copy_only=False))
            source = np.arange(rows, dtype=np.int64)
        truncated = np.zeros(rows, dtype=bool)
        budget = self.budget
        if budget is not None and len(todo):
            # A token carries at least one byte of the text (one more for a tokenizer's leading word
            # marker), so only texts longer than the budget in bytes can be over it: count just those.
            lengths = texts.gather(todo).str.len_bytes().to_numpy()
            longer = todo[lengths + 1 > budget]
            candidates = texts.gather(longer).to_list()
            counts = self.backend.count_tokens(candidates)
            cut = [
                (i, self.backend.truncate(text, budget))
                for i, text, n in zip(longer, candidates, counts, strict=True)
                if n > budget
            ]
            if cut:
                where = np.array([i for i, _ in cut], dtype=np.int64)
                texts = texts.scatter(where, [text for _, text in cut])
                truncated[where] = True
        return PendingChunk(chunk, table, texts, todo, truncated, kept, source)

    def finish(self, pending: PendingChunk, answers: pa.Table, routed: pa.Table | None = None) -> pa.Table:
        """The chunk's output table, given the answers (``ANSWER_SCHEMA``) of its ``todo`` rows and,
        where the job routes rows, their route columns."""
        parsed = self.plan.task.parse_answers(answers, pa.array(pending.truncated[pending.todo]))
        if self.route_fields:
            if routed is None:  # an answer source of its own (batch results) routes nothing
                routed = pa.table({f.name: pa.nulls(parsed.num_rows, f.type) for f in self.route_fields})
            for f in self.route_fields:
                parsed = parsed.append_column(f, routed.column(f.name))
        index = pending.source.copy()
        index[pending.todo] = pending.kept.num_rows + np.arange(len(pending.todo))
        results = pa.concat_tables([pending.kept, parsed]).take(pa.array(index))
        return output_table(self.plan, pending.table, pending.chunk, results)


def output_table(plan: Plan, table: pa.Table, chunk: Chunk, results: pa.Table) -> pa.Table:
    """Ids, kept columns, then the task's and the common result columns, with provenance in the
    schema metadata."""
    job = plan.job
    if job.id_column:
        ids = table.column(job.id_column)
    else:
        name = _relative_name(plan.files[chunk.file_index].path, plan.files)
        rows = pl.int_range(chunk.start, chunk.start + table.num_rows, eager=True).cast(pl.String)
        ids = (f"{name}:" + rows).to_arrow().cast(pa.string())
    columns = [ids] + [table.column(c) for c in job.keep_columns if c != job.id_column]
    columns += results.columns
    metadata = {
        b"labelmill": json.dumps(
            {
                "job_fingerprint": plan.manifest.fingerprint,
                "model": job.model,
                "model_fingerprint": plan.manifest.provenance["model_fingerprint"],
                "prompt_fingerprint": plan.prompt.fingerprint,
                "chunk": chunk.index,
                "labelmill_version": __version__,
            }
        ).encode()
    }
    return pa.Table.from_arrays(columns, schema=plan.schema.with_metadata(metadata))


def _relative_name(path, files: list[InputFile]) -> str:
    if len(files) == 1:
        return path.name
    root = os.path.commonpath([str(f.path.parent) for f in files])
    return os.path.relpath(path, root)
