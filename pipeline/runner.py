"""Running a job: the one place that knows the whole order of a run.

    plan (no model) -> lock the run folder -> check it holds this job (or start it)
    which chunks need work: the unfinished ones, and finished ones with rows whose status is error
    for each: read its rows -> the chunk pipeline (pipeline/flow.py) -> part + marker
    summary (summary.json)

``run_job`` is the Python API behind ``labelmill run``; ``import`` and ``bench`` run through it
too, with another answer source or job. The backend and the answer store can be handed in (a test
double, an engine shared by several jobs); what is handed in is not closed here.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import ExitStack
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from pipeline import logs
from pipeline.backends.base import Backend
from pipeline.cascade import cascade_summary, choose_router, run_record
from pipeline.config import JobConfig
from pipeline.contracts import Status
from pipeline.errors import ConfigError, MissingDependencyError
from pipeline.flow import AnswerSource, AnswerStore
from pipeline.labeller import (
    WorkItem,
    check_store,
    chunk_pipeline,
    commit_chunk,
    labelled_chunks,
    open_store,
    pending_work,
)
from pipeline.plan import (
    Plan,
    check_backend,
    make_backend,
    plan_job,
    text_budget,
)
from pipeline.runfolder import ChunkMarker, ChunkStats, RunFolder, status_totals

log = logs.get("run")


def run_job(
    job: JobConfig,
    *,
    backend: Backend | None = None,
    store: AnswerStore | None = None,
    restart: bool = False,
    progress: bool | Any = False,
) -> dict:
    """Run (or resume) a job to the end; returns the summary, also written to summary.json.

    ``backend``: a backend built for this job (``pipeline.plan.make_backend``), e.g. an engine
    shared by several jobs; by default one is made, started on the first uncached text, and
    closed at the end. ``store``: the answer store (``pipeline.cache.ResultCache``); by default the
    job's ``cache:`` setting decides. ``progress``: True for a progress bar on stderr, or a bar
    of your own to draw on (anything with tqdm's ``update``, ``set_postfix`` and ``close``, e.g.
    ``tqdm.notebook.tqdm(total=...)``).
    """
    return run_plan(plan_job(job), backend=backend, store=store, restart=restart, progress=progress)


def run_plan(
    plan: Plan,
    *,
    backend: Backend | None = None,
    store: AnswerStore | None = None,
    source: AnswerSource | None = None,
    restart: bool = False,
    progress: bool | Any = False,
) -> dict:
    """``run_job`` for a plan; ``source`` replaces the backend as the answer source (``import``
    answers from batch result files), the backend then only counts tokens."""
    started = time.perf_counter()
    job = plan.job
    folder = RunFolder(job.output)
    handed_backend = backend is not None
    with folder.lock(), ExitStack() as closing:
        if backend is None:
            backend = closing.enter_context(make_backend(plan))
        else:
            check_backend(plan, backend)
        # a prompt that can't fit stops here, before any model loads and before the run folder
        # records this job (a refused job must not stand in the way of the corrected one)
        budget = text_budget(plan, backend)
        job_yaml = yaml.safe_dump(job.to_dict(), sort_keys=False, allow_unicode=True)
        log.info(
            "run %s: %d rows in %d chunks, task %s, backend %s, model %s",
            folder.root, plan.rows, len(plan.chunks), job.task, job.backend, job.model,
            extra=logs.fields("start", rows=plan.rows, chunks=len(plan.chunks), run_folder=str(folder.root)),
        )  # fmt: skip
        restart_on = frozenset({"input"}) if job.on_input_change == "restart" else frozenset()
        folder.prepare(plan.manifest, job_yaml, restart, restart_on)
        work, finished = pending_work(plan, folder, clean=True)
        repair = [w for w in work if w.earlier is not None]
        done_rows = sum(m.rows for m in finished.values())
        if finished:
            log.info(
                "resuming: %d/%d chunks already done (%d rows)", len(finished), len(plan.chunks), done_rows,
                extra=logs.fields("resume", chunks_done=len(finished), rows_done=done_rows),
            )  # fmt: skip
        if repair:
            failed = sum(w.earlier.count(Status.ERROR) for w in repair)
            log.info(
                "retrying %d row(s) with status error in %d finished chunk(s)", failed, len(repair),
                extra=logs.fields("retry_failed_rows", rows=failed, chunks=len(repair)),
            )  # fmt: skip
        labelling = 0.0
        rows_now = 0
        cache_stats = None
        routed_by = None
        if work and job.executor == "ray" and source is None:
            if store is not None or handed_backend:
                raise ConfigError(
                    "executor: ray builds the backend and the answer store on each engine actor; "
                    "one handed to run_job lives in this process",
                    hint="leave backend= and store= out, or run with executor: local",
                )
            rows_now, labelling, routed_by = _run_on_ray(plan, budget, work, finished, done_rows, progress)
        elif work:
            with ExitStack() as stack:
                if source is None and not job.cache.enabled:
                    backend.start()  # no earlier run's answers to use: fail early if it can't start
                own_store = store is None
                if own_store:
                    store = open_store(plan, folder)
                    if store is not None:
                        stack.callback(store.close)
                if job.cache.enabled:
                    # the run's own store is labelmill's to remove (when the run is complete);
                    # only the shared cache can be cleared behind a run's back
                    check_store(store, finished, work)
                for problem in getattr(store, "problems", []):
                    log.warning(
                        "result cache: %s; those texts are asked again (labelmill cache repair "
                        "rewrites the files without the damage)", problem,
                        extra=logs.fields("cache_damaged", problem=problem),
                    )  # fmt: skip
                given = None if isinstance(progress, bool) else progress
                bar = stack.enter_context(_Progress(plan.rows, done_rows, bool(progress), backend, given))
                progress_hook = bar.within if bar.enabled else None
                pipeline = chunk_pipeline(plan, backend, budget, store, stack, source, progress_hook)
                if job.cascade is not None:
                    pipeline.router, routed_by = choose_router(plan, pipeline, store, folder)
                totals = status_totals(finished.values())
                store_id = getattr(store, "store_id", None)
                for item, out, stats, seconds in labelled_chunks(pipeline, folder, work, bar.begin):
                    marker = commit_chunk(plan, folder, item, out, stats, seconds, store_id)
                    rows_now += _log_chunk(plan, item, marker, stats, seconds, totals)
                    labelling += seconds
                    bar.update(item.chunk.rows if item.earlier is None else 0, totals)
                if own_store and store is not None and job.cache.enabled:
                    store.close()  # merges files first, so the size it reports is the size left
                    cache_stats = store.stats()
        summary = folder.summarise(plan.manifest)
        if summary["complete"]:
            shutil.rmtree(folder.answers, ignore_errors=True)  # the run's own store: done with
        summary["this_invocation"] = {
            "rows_labelled": rows_now,
            "chunks_labelled": len(work) - len(repair),
            "chunks_retried": len(repair),
            "chunks_resumed": len(finished),
            "wall_seconds": round(time.perf_counter() - started, 2),
            "labelling_seconds": round(labelling, 2),
            "rows_per_second": round(rows_now / labelling, 2) if labelling else None,
        }
        if cache_stats:
            summary["cache"] = cache_stats
        if job.cascade is not None or plan.escalation is not None:
            _route_summary(plan, folder, summary, routed_by)
        folder.write_summary(summary)
    _log_summary(summary)
    return summary


def _run_on_ray(
    plan: Plan, budget: int | None, work: list[WorkItem], finished: dict, done_rows: int, progress
) -> tuple[int, float, dict | None]:
    """``work`` labelled by engine actors on a Ray cluster (``pipeline/executors/ray.py``); returns
    the rows labelled, the wall seconds it took (the actors label in parallel) and what the
    cascade routed with."""
    from types import SimpleNamespace

    try:
        from pipeline.executors.ray import run_chunks
    except ImportError as exc:
        if exc.name != "ray" and not str(exc.name or "").startswith("ray."):
            raise
        raise MissingDependencyError(
            "executor: ray needs Ray on this machine and on every node of the cluster",
            hint="pip install 'labelmill[ray]', or run with --executor local",
        ) from None

    job = plan.job
    totals = status_totals(finished.values())
    rows = 0
    given = None if isinstance(progress, bool) else progress
    started = time.perf_counter()

    def check(store_id: str | None) -> None:
        if job.cache.enabled:
            check_store(SimpleNamespace(store_id=store_id), finished, work)

    with _Progress(plan.rows, done_rows, bool(progress), None, given) as bar:

        def done(item: WorkItem, chunk) -> None:
            nonlocal rows
            rows += _log_chunk(plan, item, chunk.marker, chunk.stats, chunk.seconds, totals)
            bar.update(item.chunk.rows if item.earlier is None else 0, totals)

        routed_by = run_chunks(
            job, plan.manifest.fingerprint, budget, work, done, job.cascade is not None, check
        )  # fmt: skip
    return rows, time.perf_counter() - started, routed_by


def _route_summary(plan: Plan, folder: RunFolder, summary: dict, routed_by: dict | None) -> None:
    """Rows per source over the finished parts, and the cascade's student and bound."""
    sources: dict[str, int] = {}
    for marker in folder.finished().values():
        try:
            column = folder.read_part(marker.part, columns=["source"]).column("source")
        except (OSError, pa.ArrowException):
            continue  # the summary counts what it can read; verify reports the damage
        for item in pc.value_counts(column).to_pylist():
            key = item["values"] if item["values"] is not None else "none"
            sources[key] = sources.get(key, 0) + item["counts"]
    summary["rows_by_source"] = dict(sorted(sources.items()))
    if plan.job.cascade is None:
        return
    if routed_by is None:  # nothing was labelled in this invocation: what the run routed with
        record = run_record(plan, folder)
        routed_by = (record or {}).get("about")
        if routed_by is not None:
            routed_by = routed_by | {"student_id": record["student"]}
    if routed_by is not None:
        summary["cascade"] = cascade_summary(routed_by, summary, sources)
        # the sample is model calls the chunks don't count (its texts are cache hits there)
        sampled = (routed_by.get("sample") or {}) if routed_by.get("chosen") == "trained" else {}
        summary["sample_model_calls"] = sampled.get("model_calls", 0)
        summary["sample_tokens"] = {
            k: sampled.get(k, 0) for k in ("prompt_tokens", "output_tokens", "cached_tokens")
        }


def _log_chunk(
    plan: Plan, item: WorkItem, marker: ChunkMarker, stats: ChunkStats, seconds: float, totals: dict[str, int]
) -> int:
    """Add a committed chunk to the totals and log it; returns the rows it labelled."""
    chunk, earlier = item.chunk, item.earlier
    for k, v in marker.status_counts.items():
        totals[k] = totals.get(k, 0) - (earlier.count(k) if earlier else 0) + v
    rows = chunk.rows if earlier is None else earlier.count(Status.ERROR)
    log.info(
        "chunk %d/%d done: %d rows, %.2f s, %d from the model, %d from the cache, %d duplicates%s",
        chunk.index + 1, len(plan.chunks), rows, seconds, stats.model_calls, stats.cache_hits,
        stats.duplicates, f", {stats.retries} retries" if stats.retries else "",
        extra=logs.fields("chunk_done", chunk=chunk.index, rows=rows, seconds=round(seconds, 3),
                          status_counts=marker.status_counts,
                          **stats.stats()),
    )  # fmt: skip
    if stats.retries:
        log.warning(
            "chunk %d: %d request(s) were retried", chunk.index, stats.retries,
            extra=logs.fields("retries", chunk=chunk.index, retries=stats.retries),
        )  # fmt: skip
    return rows


def _log_summary(s: dict) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items() if v)
    log.info(
        "%s: %d/%d rows (%s); %d answers from the model, %d from the cache, %d rows shared a duplicate's",
        "finished" if s["complete"] else "stopped", s["rows_done"], s["rows_total"], counts or "none",
        s["model_calls"], s["cache_hits"], s["duplicates"],
        extra=logs.fields("summary", summary=s),
    )  # fmt: skip


class _Progress:
    """Rows/s and ETA on stderr (tqdm), for a person at a terminal; silent when not ``enabled``.

    The bar moves within a chunk as the backend reports answers (a chunk's share of its rows per
    share of its questions answered), and its rate leaves out the time the model took to load, so
    the first figure a person sees is the labelling rate, not the start-up."""

    def __init__(
        self, total: int, initial: int, enabled: bool, backend: Backend | None = None, bar=None
    ) -> None:
        """``bar``: a tqdm-like object to draw on instead of a new tqdm bar on stderr."""
        self._bar = bar
        if enabled and bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                unit="row",
                desc="labelling",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        self._backend = backend
        self._start_seen = backend.start_seconds if backend is not None else 0.0
        self._chunk_rows = 0
        self._moved = 0

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def begin(self, item: WorkItem) -> None:
        """A chunk's work begins: the bar may move through its rows (none for a retried chunk:
        its rows were counted when it was first finished)."""
        self._chunk_rows = item.chunk.rows if item.earlier is None else 0
        self._moved = 0

    def within(self, share: float) -> None:
        """``share`` of the current chunk's questions are answered."""
        if self._bar is None:
            return
        self._leave_out_start()
        target = int(self._chunk_rows * min(share, 1.0))
        if target > self._moved:
            self._bar.update(target - self._moved)
            self._moved = target

    def update(self, rows: int, counts: dict[str, int]) -> None:
        """The chunk is done: the bar shows all of its ``rows``."""
        if self._bar is not None:
            self._leave_out_start()
            self._bar.set_postfix({k: v for k, v in counts.items() if v}, refresh=False)
            self._bar.update(max(rows - self._moved, 0))
        self._moved = self._chunk_rows = 0

    def _leave_out_start(self) -> None:
        if self._backend is None:
            return
        loaded = self._backend.start_seconds - self._start_seen
        if loaded > 0:  # the model loaded since the last update: that time is not labelling
            self._start_seen = self._backend.start_seconds
            self._bar.start_t += loaded
            self._bar.last_print_t += loaded

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
