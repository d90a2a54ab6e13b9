"""The chunk loop: the one place that knows the whole order of a run.

    plan (no model): inputs, columns, ids, task (labels or attributes), prompt, fingerprint, chunks
    for each unfinished chunk (and each finished one with failed rows):
        read rows -> row text -> token budget -> duplicates -> result cache
            -> backend (answers constrained by the task) -> parse -> part + marker

``plan_job`` does every check that can fail before a model loads, so ``labelmill validate`` and
``labelmill run`` fail the same way on a bad job, and neither wastes a model start on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline import __version__
from pipeline.backends import Backend, backend_class
from pipeline.backends.base import ANSWER_SCHEMA
from pipeline.cache import ResultCache
from pipeline.config import JobConfig
from pipeline.dedupe import group_rows, normalise_texts
from pipeline.errors import ConfigError, InputFormatError
from pipeline.io import (
    Chunk,
    InputFile,
    check_columns,
    check_ids,
    describe,
    find_inputs,
    plan_chunks,
    read_chunk,
)
from pipeline.models import labelmill_home, model_fingerprint, resolve_model
from pipeline.prompts import RenderedPrompt, render
from pipeline.state import RunFolder
from pipeline.tasks import make_task
from pipeline.tasks.base import COMMON_FIELDS, EMPTY, ERROR, STATUSES, RowResult, Task
from pipeline.text import text_columns, text_series

# Tokens kept free between the prompt and the context limit: a cut text can re-tokenise a little
# longer where it joins the template.
_TOKEN_MARGIN = 8
GENERATED_ID = "row_id"


@dataclass
class Plan:
    job: JobConfig
    task: Task
    prompt: RenderedPrompt
    model: str
    files: list[InputFile]
    chunks: list[Chunk]
    id_column: str
    read_columns: list[str]
    schema: pa.Schema
    manifest: dict = field(repr=False)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def max_tokens(self) -> int:
        return self.task.max_tokens()


def plan_job(job: JobConfig, check_id_values: bool = True) -> Plan:
    """Everything that can be checked without a model; raises a LabelmillError on the first problem."""
    files = describe(find_inputs(job.input))
    task = make_task(job)
    prompt = render(job.prompt, task, job.prompt_vars)
    model = resolve_model(job.model) if backend_class(job.backend).loads_weights else job.model
    text_cols = text_columns(job.text_column, job.text_template)
    id_cols = [job.id_column] if job.id_column else []
    read_columns = list(dict.fromkeys(id_cols + job.keep_columns + text_cols))
    types = check_columns(files, read_columns)
    for col in text_cols:
        if pa.types.is_nested(types[col]):
            raise InputFormatError(
                f"text column '{col}' is {types[col]}: a list, struct or map can't be read as text",
                hint="point text_column / text_template at a string column",
            )
    id_column = job.id_column or GENERATED_ID
    output_fields = task.fields + COMMON_FIELDS
    clash = {f.name for f in output_fields} | ({GENERATED_ID} if not job.id_column else set())
    bad = sorted(clash & set(job.keep_columns + id_cols))
    if bad:
        raise ConfigError(
            f"column(s) {bad} would clash with labelmill's output columns",
            hint="rename them in the input, or leave them out of keep_columns",
        )
    if job.id_column and check_id_values:
        check_ids(files, job.id_column)
    out_fields = [pa.field(id_column, types[job.id_column] if job.id_column else pa.string())]
    out_fields += [pa.field(c, types[c]) for c in job.keep_columns if c != job.id_column]
    schema = pa.schema(out_fields + output_fields)
    chunks = plan_chunks(files, job.chunk_rows)
    weights = model_fingerprint(model)
    answers_spec = task.describe()
    components = {
        "input": _digest([f.identity for f in files]),
        "rows": _digest(
            [text_cols, job.text_template, job.id_column, job.keep_columns, job.dedupe.model_dump()]
        ),
        ("labels" if job.task == "classify" else "attributes"): _digest(answers_spec),
        "prompt": prompt.fingerprint,
        "model": _digest([job.backend, job.model, weights]),
        "sampling": _digest(job.sampling.model_dump()),
        "engine": _digest({k: getattr(job.engine, k) for k in job.engine.OUTPUT_FIELDS}),
        "chunking": _digest([job.chunk_rows, job.max_input_tokens, job.task]),
    }
    manifest = {
        "labelmill_version": __version__,
        "created_at": _now(),
        "fingerprint": _digest(components),
        "components": components,
        "task": job.task,
        **({"attributes": answers_spec["attributes"]} if job.task == "extract" else {}),
        "provenance": {
            "backend": job.backend,
            "model": job.model,
            "model_path": model,
            "model_fingerprint": weights,
            "prompt_file": job.prompt,
            "prompt_fingerprint": prompt.fingerprint,
            **answers_spec,
            "sampling": job.sampling.model_dump(),
            "engine": job.engine.model_dump(),
        },
        "inputs": [f.identity for f in files],
        "rows": sum(f.rows for f in files),
        "chunks": len(chunks),
        "chunk_rows": job.chunk_rows,
        "id_column": id_column,
    }
    return Plan(job, task, prompt, model, files, chunks, id_column, read_columns, schema, manifest)


def make_backend(plan: Plan, log=None) -> Backend:
    """The job's backend, not started: it starts on its first uncached text."""
    return backend_class(plan.job.backend)(plan.job, plan.model, log)


def text_budget(plan: Plan, backend: Backend) -> int | None:
    """Most tokens a row's text may have, or None for no limit."""
    budgets = []
    if plan.job.max_input_tokens:
        budgets.append(plan.job.max_input_tokens)
    limit = backend.max_model_len
    if limit:
        overhead = backend.prompt_tokens(plan.prompt.messages(""))
        room = limit - overhead - plan.max_tokens - _TOKEN_MARGIN
        if room <= 0:
            raise ConfigError(
                f"the prompt alone takes {overhead} tokens and the answer up to {plan.max_tokens}, "
                f"which leaves no room for row text in max_model_len={limit}",
                hint="raise engine.max_model_len, or shorten the prompt or the label list",
            )
        budgets.append(room)
    return min(budgets) if budgets else None


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

    def todo_texts(self) -> pl.Series:
        return self.texts.gather(self.todo)

    def conversations(self, plan: Plan) -> list[list[dict[str, str]]]:
        return [plan.prompt.messages(t) for t in self.todo_texts()]

    def finish(self, plan: Plan, answers: pa.Table) -> pa.Table:
        """The chunk's output table, given the answers (``ANSWER_SCHEMA``) of its ``todo`` rows."""
        parsed = plan.task.parse_answers(answers, pa.array(self.truncated[self.todo]))
        index = self.source.copy()
        index[self.todo] = self.kept.num_rows + np.arange(len(self.todo))
        results = pa.concat_tables([self.kept, parsed]).take(pa.array(index))
        return _output_table(plan, self.table, self.chunk, results)


def prepare_chunk(
    plan: Plan,
    backend: Backend,
    table: pa.Table,
    chunk: Chunk,
    budget: int | None,
    previous: pa.Table | None = None,
) -> PendingChunk:
    """Row text, empty rows, truncation. With ``previous`` (this chunk's earlier output), only its
    rows with status ``error`` are pending; every other row keeps its earlier result."""
    job = plan.job
    task = plan.task
    texts = text_series(table, job.text_column, job.text_template)
    rows = table.num_rows
    if previous is None:
        todo = np.flatnonzero(texts.is_not_null().to_numpy())
        kept = task.results_table([RowResult(status=EMPTY, error="text is null or blank")])
        source = np.zeros(rows, dtype=np.int64)
    else:
        schema = pa.schema(task.result_fields)
        kept = pa.Table.from_arrays([previous.column(f.name).cast(f.type) for f in schema], schema=schema)
        todo = np.flatnonzero(pc.equal(previous.column("status"), ERROR).to_numpy(zero_copy_only=False))
        source = np.arange(rows, dtype=np.int64)
    truncated = np.zeros(rows, dtype=bool)
    if budget is not None and len(todo):
        # A token carries at least one byte of the text (one more for a tokenizer's leading word
        # marker), so only texts longer than the budget in bytes can be over it: count just those.
        lengths = texts.gather(todo).str.len_bytes().to_numpy()
        longer = todo[lengths + 1 > budget]
        candidates = texts.gather(longer).to_list()
        cut = [
            (i, backend.truncate(text, budget))
            for i, text, n in zip(longer, candidates, backend.count_tokens(candidates), strict=True)
            if n > budget
        ]
        if cut:
            where = np.array([i for i, _ in cut], dtype=np.int64)
            texts = texts.scatter(where, [text for _, text in cut])
            truncated[where] = True
    return PendingChunk(chunk, table, texts, todo, truncated, kept, source)


@dataclass
class ChunkStats:
    """Where a chunk's answers came from. rows needing an answer = model_calls + cache_hits +
    duplicates; the token counts are what the model processed, not what the rows carry."""

    model_calls: int = 0
    """Distinct texts sent to the backend."""
    cache_hits: int = 0
    """Distinct texts answered from the result cache."""
    duplicates: int = 0
    """Rows answered by an earlier row of the chunk with the same normalised text."""
    retries: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    def count(self, answers: pa.Table) -> None:
        """Add the retries and tokens of fresh answers (``ANSWER_SCHEMA``)."""
        for name in ("retries", "prompt_tokens", "output_tokens", "cached_tokens"):
            total = pc.sum(answers.column(name)).as_py() if answers.num_rows else 0
            setattr(self, name, getattr(self, name) + (total or 0))


def label_chunk(
    plan: Plan,
    backend: Backend,
    table: pa.Table,
    chunk: Chunk,
    budget: int | None,
    previous: pa.Table | None = None,
    cache: ResultCache | None = None,
) -> tuple[pa.Table, ChunkStats]:
    """Label one chunk of input rows: the output table (same rows, same order) and its stats.

    Rows with the same normalised text are asked once; texts answered in earlier chunks (or, with
    the result cache, earlier runs) come from ``cache``; the rest go to the backend in one call, in
    first-seen order, so a redone chunk is sent exactly as before. All of it works on whole
    columns.
    """
    pending = prepare_chunk(plan, backend, table, chunk, budget, previous)
    texts = pending.todo_texts()
    if plan.job.dedupe.enabled:
        normalised = normalise_texts(texts, plan.job.dedupe)
        first, group = group_rows(normalised)
    else:
        normalised = texts
        first = group = np.arange(len(texts), dtype=np.int64)
    # A group's key is its normalised text. Each key is asked once per store: the first spelling
    # met is sent, and every spelling of the key, in any chunk, gets its answer.
    sent, keys = texts.gather(first), normalised.gather(first)
    if cache is not None:
        hits, cached = cache.lookup(keys)
    else:
        hits, cached = np.empty(0, dtype=np.int64), ANSWER_SCHEMA.empty_table()
    missing = np.ones(len(sent), dtype=bool)
    missing[hits] = False
    ask = np.flatnonzero(missing)
    fresh = ANSWER_SCHEMA.empty_table()
    if len(ask):
        asked = sent.gather(ask)
        fresh = backend.answer(plan.prompt, asked, plan.task.constraint(), plan.max_tokens)
        if cache is not None:
            cache.add(keys.gather(ask), asked, fresh)
    order = np.empty(len(sent), dtype=np.int64)
    order[hits] = np.arange(len(hits))
    order[ask] = len(hits) + np.arange(len(ask))
    per_group = pa.concat_tables([cached, fresh]).take(pa.array(order))
    stats = ChunkStats(model_calls=len(ask), cache_hits=len(hits), duplicates=len(texts) - len(sent))
    stats.count(fresh)
    return pending.finish(plan, per_group.take(pa.array(group))), stats


def cache_namespace(plan: Plan) -> str:
    """Everything besides the text that decides an answer (see ``pipeline/cache.py``)."""
    c = plan.manifest["components"]
    parts = [c[k] for k in ("model", "prompt", "sampling", "engine") if k in c]
    parts += [c.get("labels") or c.get("attributes"), plan.job.task, plan.job.dedupe.model_dump()]
    return _digest(parts)


def open_cache(plan: Plan, folder: RunFolder) -> ResultCache | None:
    """Where answers are shared: the result cache; with it off, the run's own store in its folder,
    so each distinct text is still asked once per run. With ``dedupe`` off, rows share nothing
    within a run: every row is sent, and the cache only offers earlier runs' answers."""
    job = plan.job
    if job.cache.enabled:
        about = {
            "task": job.task,
            "model": job.model,
            "backend": job.backend,
            "prompt": job.prompt,
            "first_job_output": job.output,
            "created_at": _now(),
        }
        root = cache_root(job)
        return ResultCache(root, cache_namespace(plan), within_run=job.dedupe.enabled, about=about)
    return ResultCache(folder.answers, cache_namespace(plan)) if job.dedupe.enabled else None


def cache_root(job: JobConfig) -> Path:
    return Path(job.cache.path) if job.cache.path else labelmill_home() / "cache"


def _output_table(plan: Plan, table: pa.Table, chunk: Chunk, results: pa.Table) -> pa.Table:
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
                "job_fingerprint": plan.manifest["fingerprint"],
                "model": job.model,
                "model_fingerprint": plan.manifest["provenance"]["model_fingerprint"],
                "prompt_fingerprint": plan.prompt.fingerprint,
                "chunk": chunk.index,
                "labelmill_version": __version__,
            }
        ).encode()
    }
    return pa.Table.from_arrays(columns, schema=plan.schema.with_metadata(metadata))


def _relative_name(path: Path, files: list[InputFile]) -> str:
    if len(files) == 1:
        return path.name
    root = os.path.commonpath([str(f.path.parent) for f in files])
    return os.path.relpath(path, root)


class Progress:
    """Rows/s and ETA on stderr (tqdm); silent when ``enabled`` is false."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="row", desc="labelling", dynamic_ncols=True)

    def update(self, rows: int, counts: dict[str, int]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: v for k, v in counts.items() if v}, refresh=False)
            self._bar.update(rows)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def open_run(folder: RunFolder, plan: Plan, restart: bool) -> None:
    """Start or check the run folder for this plan (call under ``folder.lock()``)."""
    job_yaml = yaml.safe_dump(plan.job.model_dump(), sort_keys=False, allow_unicode=True)
    folder.prepare(plan.manifest, job_yaml, restart)


def run(job: JobConfig, restart: bool = False, progress: bool = True, log=print) -> dict:
    """Run (or resume) a job to the end; returns the summary, also written to summary.json."""
    started = time.perf_counter()
    folder = RunFolder(job.output)
    plan = plan_job(job, check_id_values=True)
    with folder.lock():
        open_run(folder, plan, restart)
        finished = folder.finished()
        todo = [c for c in plan.chunks if c.index not in finished]
        # Finished chunks with rows the backend failed on (status error) get those rows retried.
        repair = [c for c in plan.chunks if finished.get(c.index, {}).get("status_counts", {}).get("error")]
        done_rows = sum(m["rows"] for m in finished.values())
        if finished:
            log(f"resuming: {len(finished)}/{len(plan.chunks)} chunks already done ({done_rows} rows)")
        if repair:
            failed = sum(finished[c.index]["status_counts"]["error"] for c in repair)
            log(f"retrying {failed} row(s) with status error in {len(repair)} finished chunk(s)")
        model_seconds = 0.0
        rows_now = 0
        cache_stats = None
        if todo or repair:
            backend = make_backend(plan, log)
            cache = bar = None
            try:
                if not plan.job.cache.enabled:
                    backend.start()  # no earlier run's answers to use: fail early if it can't start
                cache = open_cache(plan, folder)
                bar = Progress(plan.rows, done_rows, progress)
                budget = text_budget(plan, backend)
                totals = _count(finished.values())
                for chunk in sorted(repair + todo, key=lambda c: c.index):
                    t0, started_before = time.perf_counter(), backend.start_seconds
                    table = read_chunk(plan.files[chunk.file_index], chunk, plan.read_columns)
                    earlier = finished.get(chunk.index)
                    previous = pq.read_table(folder.part_path(chunk.index)) if earlier else None
                    out, stats = label_chunk(plan, backend, table, chunk, budget, previous, cache)
                    # a model load during this chunk is start-up, not labelling
                    seconds = time.perf_counter() - t0 - (backend.start_seconds - started_before)
                    marker = chunk_marker(plan, chunk, out, seconds, stats, earlier)
                    folder.commit(chunk.index, out, marker)
                    model_seconds += seconds
                    rows_now += chunk.rows if earlier is None else earlier["status_counts"]["error"]
                    for k, v in marker["status_counts"].items():
                        totals[k] = totals.get(k, 0) - (earlier or {}).get("status_counts", {}).get(k, 0) + v
                    bar.update(chunk.rows if earlier is None else 0, totals)
            finally:
                if bar is not None:
                    bar.close()
                if cache is not None:
                    cache.close()
                    if plan.job.cache.enabled:
                        cache_stats = cache.stats()
                backend.close()
        summary = summarise(folder, plan.manifest)
        if summary["complete"]:
            shutil.rmtree(folder.answers, ignore_errors=True)  # the run's own store: done with
        wall = time.perf_counter() - started
        summary["this_invocation"] = {
            "rows_labelled": rows_now,
            "chunks_labelled": len(todo),
            "chunks_retried": len(repair),
            "chunks_resumed": len(finished),
            "wall_seconds": round(wall, 2),
            "labelling_seconds": round(model_seconds, 2),
            "rows_per_second": round(rows_now / model_seconds, 2) if model_seconds else None,
        }
        if cache_stats:
            summary["cache"] = cache_stats
        folder.write_summary(summary)
    return summary


def chunk_marker(
    plan: Plan, chunk: Chunk, out: pa.Table, seconds: float, stats: ChunkStats, earlier: dict | None
) -> dict:
    counts = {c["values"].as_py(): c["counts"].as_py() for c in pc.value_counts(out.column("status"))}
    earlier = earlier or {}
    marker = {
        "chunk": chunk.index,
        "file": str(plan.files[chunk.file_index].path),
        "start": chunk.start,
        "rows": chunk.rows,
        "part": f"parts/part-{chunk.index:05d}.parquet",
        "status_counts": {s: counts.get(s, 0) for s in STATUSES},
        "seconds": round(earlier.get("seconds", 0.0) + seconds, 3),
        "finished_at": _now(),
    }
    # A retried chunk adds to what its first pass cost, so the totals stay honest.
    for name, value in asdict(stats).items():
        marker[name] = earlier.get(name, 0) + value
    return marker


def _count(markers) -> dict[str, int]:
    totals = {s: 0 for s in STATUSES}
    for m in markers:
        for k, v in m["status_counts"].items():
            totals[k] = totals.get(k, 0) + v
    return totals


def summarise(folder: RunFolder, manifest: dict) -> dict:
    """Totals over every finished chunk on disk (all invocations of the run)."""
    markers = list(folder.finished().values())
    rows_done = sum(m["rows"] for m in markers)
    seconds = sum(m["seconds"] for m in markers)
    rate = rows_done / seconds if seconds else None
    remaining = manifest["rows"] - rows_done
    return {
        "run_folder": str(folder.root),
        "complete": len(markers) == manifest["chunks"],
        "chunks_done": len(markers),
        "chunks_total": manifest["chunks"],
        "rows_done": rows_done,
        "rows_total": manifest["rows"],
        "status_counts": _count(markers),
        **{k: sum(m.get(k, 0) for m in markers) for k in STAT_KEYS},
        "labelling_seconds": round(seconds, 3),
        "rows_per_second": round(rate, 2) if rate else None,
        "eta_seconds": round(remaining / rate, 1) if rate and remaining else (0 if not remaining else None),
        "model": manifest["provenance"]["model"],
        "backend": manifest["provenance"]["backend"],
        "fingerprint": manifest["fingerprint"],
    }


STAT_KEYS = [f.name for f in fields(ChunkStats)]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
