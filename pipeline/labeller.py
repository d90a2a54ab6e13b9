"""What labels a chunk in a process: the chunks that need work, the answer store, the chunk
pipeline with its strategy, student and escalation, and the commit of a labelled chunk's part and
marker. The runner uses it in its own process (the local executor); the Ray executor
(``pipeline/executors/ray.py``) builds one per engine actor, so every chunk goes through the same
code wherever it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import logs
from pipeline.cache import MirroredCache, ResultCache
from pipeline.contracts import STATUSES, Status
from pipeline.errors import RunStateError
from pipeline.flow import AnswerStore, BackendSource, ChunkPipeline
from pipeline.io import Chunk, ChunkReader
from pipeline.plan import Plan, cache_remote, cache_root, make_escalation_backend, now
from pipeline.routing import Escalation
from pipeline.runfolder import ChunkMarker, ChunkStats, RunFolder, part_width
from pipeline.strategies import make_strategy

log = logs.get("run")


@dataclass
class WorkItem:
    chunk: Chunk
    earlier: ChunkMarker | None = None
    """The chunk's marker when it is finished and only its failed rows are asked again."""


def pending_work(
    plan: Plan, folder: RunFolder, *, clean: bool = False
) -> tuple[list[WorkItem], dict[int, ChunkMarker]]:
    """The chunks that need work, in order, and the finished ones this run can trust (see
    ``RunFolder.verify``; with ``clean``, under the folder's lock, what it can't trust is removed).
    A folder that holds another job's run (or none) has nothing finished for this plan."""
    manifest = folder.manifest() if folder.has_manifest() else None
    finished: dict[int, ChunkMarker] = {}
    if manifest is not None and manifest.fingerprint == plan.manifest.fingerprint:
        folder.width = part_width(plan.manifest.chunks)
        rows = {c.index: c.rows for c in plan.chunks}
        finished, problems = folder.verify(plan.manifest.fingerprint, rows, clean=clean)
        for problem in problems:
            log.warning(
                "%s; it is labelled again", problem,
                extra=logs.fields("chunk_distrusted", problem=problem),
            )  # fmt: skip
    work = []
    for chunk in plan.chunks:
        marker = finished.get(chunk.index)
        if marker is None:
            work.append(WorkItem(chunk))
        elif marker.count(Status.ERROR):
            work.append(WorkItem(chunk, marker))
    return work, finished


def previous_output(folder: RunFolder, item: WorkItem) -> pa.Table | None:
    """A finished chunk's output, when only its failed rows are asked again."""
    if item.earlier is None:
        return None
    try:
        return folder.read_part(folder.part_name(item.chunk.index))
    except (OSError, pa.ArrowException) as exc:
        raise RunStateError(
            f"{folder.part_path(item.chunk.index)} became unreadable during the run: {exc}",
            hint="rerun the same command",
        ) from None


def check_store(store: AnswerStore | None, finished: dict[int, ChunkMarker], work: list[WorkItem]) -> None:
    """Refuse to go on when the answer store the finished chunks shared their answers through is
    gone (cleared, moved or replaced): the chunks still to do could give a text another answer
    than the finished ones gave it."""
    current = getattr(store, "store_id", None)
    if current is None or not work:
        return
    used = {m.store for m in finished.values() if m.store is not None}
    if used and used != {current}:
        raise RunStateError(
            f"the answers this run's {len(finished)} finished chunk(s) shared are gone from "
            f"{getattr(store, 'folder', 'the answer store')} (it was cleared or replaced since): "
            "the chunks still to do could label a text differently from the finished ones",
            hint="rerun with --restart to label every row again with one store, or give the job "
            "a new output: folder",
        )


def open_store(plan: Plan, folder: RunFolder) -> ResultCache | None:
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
            "created_at": now(),
        }
        return open_cache(job, plan.namespace, about)
    return ResultCache(folder.answers, plan.namespace) if job.dedupe.enabled else None


def open_cache(job, namespace: str, about: dict) -> ResultCache:
    """The job's result cache: a local folder, or a bucket prefix worked on through a mirror."""
    remote = cache_remote(job)
    if remote is not None:
        return MirroredCache(remote, namespace, within_run=job.dedupe.enabled, about=about)
    return ResultCache(cache_root(job), namespace, within_run=job.dedupe.enabled, about=about)


def open_escalation(plan: Plan, strategy, stack: ExitStack) -> Escalation:
    """The ``escalate:`` backend (started on the first row that goes to it) with its own answer
    store, so a row asked again tomorrow costs nothing."""
    esc, job = plan.escalation, plan.job
    backend = stack.enter_context(make_escalation_backend(plan))
    store = None
    if job.cache.enabled:
        store = open_cache(
            job, esc.namespace,
            {"task": job.task, "model": job.escalate.model, "backend": job.escalate.backend,
             "prompt": job.prompt, "escalation_of": job.model, "created_at": now()},
        )  # fmt: skip
        stack.callback(store.close)
    rule = job.escalate
    return Escalation(backend, esc.task, esc.request, strategy, store, rule.confidence_below, rule.statuses)


def chunk_pipeline(
    plan: Plan,
    backend,
    budget: int | None,
    store,
    stack: ExitStack,
    source=None,
    progress: Callable[[float], None] | None = None,
) -> ChunkPipeline:
    """The job's chunk pipeline around ``backend``: its strategy, ``source`` (default: the backend,
    asked through the strategy, telling ``progress``), and the escalation backend where the job has
    one (closed with ``stack``). The runner builds it in its process, an engine actor in its own."""
    strategy = make_strategy(plan, store)
    answers = source or BackendSource(backend, progress, strategy)
    escalation = open_escalation(plan, strategy, stack) if plan.escalation is not None else None
    return ChunkPipeline(plan, backend, budget, store, answers, escalation)


def labelled_chunks(
    pipeline: ChunkPipeline,
    folder: RunFolder,
    work: list[WorkItem],
    starting: Callable[[WorkItem], None] | None = None,
) -> Iterator[tuple[WorkItem, pa.Table | None, ChunkStats, float]]:
    """Each chunk of ``work`` through the pipeline, in order: the item, its output table (None when
    the answer source answers later), where its answers came from, and its labelling seconds.
    ``starting`` is told of each item as its work begins."""
    plan, backend = pipeline.plan, pipeline.backend
    reader = ChunkReader(plan.read_columns)  # across chunks: each row group is decoded once
    for item in work:
        if starting is not None:
            starting(item)
        t0, started_before = time.perf_counter(), backend.start_seconds
        table = reader.read(plan.files[item.chunk.file_index], item.chunk)
        out, stats = pipeline.label(table, item.chunk, previous_output(folder, item))
        # a model load during this chunk is start-up, not labelling
        yield item, out, stats, time.perf_counter() - t0 - (backend.start_seconds - started_before)


def commit_chunk(
    plan: Plan, folder: RunFolder, item: WorkItem, out: pa.Table, stats: ChunkStats, seconds: float,
    store_id: str | None,
) -> ChunkMarker:  # fmt: skip
    """Write a labelled chunk's part, then its marker; returns the marker."""
    marker = chunk_marker(plan, item.chunk, out, seconds, stats, item.earlier)
    marker.store = store_id
    folder.commit(out, marker)
    return marker


def chunk_marker(
    plan: Plan, chunk: Chunk, out: pa.Table, seconds: float, stats: ChunkStats, earlier: ChunkMarker | None
) -> ChunkMarker:
    counts = {c["values"].as_py(): c["counts"].as_py() for c in pc.value_counts(out.column("status"))}
    # A retried chunk adds to what its first pass cost, so the totals stay honest.
    added = {
        name: (getattr(earlier, name) if earlier else 0) + value for name, value in stats.stats().items()
    }
    return ChunkMarker(
        chunk=chunk.index,
        file=str(plan.files[chunk.file_index].path),
        start=chunk.start,
        rows=chunk.rows,
        part=f"parts/part-{chunk.index:0{part_width(len(plan.chunks))}d}.parquet",
        status_counts={s: counts.get(s, 0) for s in STATUSES},
        seconds=round((earlier.seconds if earlier else 0.0) + seconds, 3),
        finished_at=now(),
        fingerprint=plan.manifest.fingerprint,
        **added,
    )
