"""``executor: ray``: a run's chunks labelled by long-lived engine actors on a Ray cluster.

    driver (``labelmill run``, holds the run folder's lock)
      plan, resume point and the chunks that need work, as for a local run
      -> ``ray.engines`` actors, each: the job planned again (its fingerprint must be the
         driver's), one backend loaded once, the answer store, the chunk pipeline
      -> each chunk handed to the next free actor, which reads it, labels it and writes its part
         and marker itself; the driver receives the marker (a few hundred bytes), never rows
      -> an actor that dies mid-chunk: the chunk is handed out again (the dead actor is restarted
         by Ray), up to ``chunk_attempts`` times; a chunk's part is written whole or not at all,
         so a chunk labelled twice leaves one part
      -> a labelmill error in an actor (a refused request, an engine that can't load) stops the
         run with that error, as it would locally

Why actors and not Ray Data: the unit of work, of resume and of output is labelmill's chunk, and
its part and marker must be written by the code that writes them locally, so a Ray run's folder is
a local run's folder. Ray Data would stream rows through its own operators and checkpoint on its
own terms (every finished id kept in memory, all input read again on resume). Here a resumed run
hands out only the unfinished chunks, and the driver's memory is the list of chunk numbers.

Every process must see the same files: the input, the run folder and the cache live on a file
system all nodes share (a local cluster, NFS, or object storage).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import ray

from pipeline import logs
from pipeline.config import JobConfig
from pipeline.errors import BackendUnavailableError, LabelmillError, RunStateError
from pipeline.labeller import WorkItem, chunk_pipeline, commit_chunk, labelled_chunks, open_store
from pipeline.runfolder import ChunkMarker, ChunkStats, RunFolder

log = logs.get("ray")
# Environment variables an actor needs to find what the driver found (models, the default cache,
# the object store's endpoint and region); credentials are never among them: each node takes its
# own from the provider's chain (its environment, profile or instance role).
_PASSED_ENV = (
    "LABELMILL_HOME", "HF_HOME", "HF_HUB_OFFLINE", "VLLM_ENABLE_V1_MULTIPROCESSING",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
)  # fmt: skip


@dataclass
class ChunkDone:
    """What an actor reports of a chunk it committed."""

    chunk: int
    marker: ChunkMarker
    stats: ChunkStats
    seconds: float
    actor: str


class EngineWorker:
    """One engine actor: the job's backend loaded once, and the chunk pipeline around it."""

    def __init__(self, job: JobConfig, fingerprint: str, budget: int | None) -> None:
        from contextlib import ExitStack

        from pipeline.plan import make_backend, plan_job

        # the ids were checked by the driver; the rest of the plan is re-read from the same files
        self.plan = plan_job(job, check_id_values=False)
        if self.plan.manifest.fingerprint != fingerprint:
            raise RunStateError(
                f"an engine actor planned this job with fingerprint {self.plan.manifest.fingerprint}, the "
                f"driver with {fingerprint}: the input or the job changed between them",
                hint="rerun when the input is no longer being written",
            )
        self.folder = RunFolder(job.output, len(self.plan.chunks))
        self._stack = ExitStack()
        self.backend = self._stack.enter_context(make_backend(self.plan))
        self.store = open_store(self.plan, self.folder)
        if self.store is not None:
            self._stack.callback(self.store.close)
        self.pipeline = chunk_pipeline(self.plan, self.backend, budget, self.store, self._stack)
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def store_id(self) -> str | None:
        return getattr(self.store, "store_id", None)

    def choose_router(self) -> dict:
        """Train or load the cascade's student: the first actor trains it (or finds the stored or
        this run's one), the others then find it in the run folder's record."""
        from pipeline.cascade import choose_router

        self.pipeline.router, routed_by = choose_router(self.plan, self.pipeline, self.store, self.folder)
        return routed_by

    def label(self, item: WorkItem) -> ChunkDone:
        for done, out, stats, seconds in labelled_chunks(self.pipeline, self.folder, [item]):
            marker = commit_chunk(self.plan, self.folder, done, out, stats, seconds, self.store_id())
            return ChunkDone(item.chunk.index, marker, stats, seconds, self.name)
        raise RuntimeError("no chunk labelled")  # pragma: no cover - labelled_chunks yields one per item

    def close(self) -> None:
        self._stack.close()


def run_chunks(
    job: JobConfig,
    fingerprint: str,
    budget: int | None,
    work: list[WorkItem],
    on_done: Callable[[WorkItem, ChunkDone], None],
    cascade: bool,
    check_store: Callable[[str | None], None] = lambda store_id: None,
) -> dict | None:
    """Label ``work`` on the cluster; ``on_done`` is told of each chunk as it is committed, and
    ``check_store`` of the answer store the actors opened before any chunk is handed out. Returns
    what the cascade routed with (None without one)."""
    cfg = job.ray
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=cfg.address, logging_level="warning", log_to_driver=True)
    resources = ray.cluster_resources()
    log.info(
        "ray: %d engine actor(s) on a cluster of %s CPU(s), %s GPU(s)", cfg.engines,
        resources.get("CPU", 0), resources.get("GPU", 0),
        extra=logs.fields("ray_start", engines=cfg.engines, cluster=resources),
    )  # fmt: skip
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    actor_class = ray.remote(EngineWorker).options(
        num_cpus=cfg.cpus_per_engine, num_gpus=cfg.gpus_per_engine, max_restarts=-1,
        scheduling_strategy="SPREAD", runtime_env={"env_vars": env} if env else None,
    )  # fmt: skip
    actors = [actor_class.remote(job, fingerprint, budget) for _ in range(cfg.engines)]
    try:
        routed_by = _prepare(actors, cascade, check_store)
        _schedule(actors, work, on_done, cfg.chunk_attempts)
        ray.get([a.close.remote() for a in actors])
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    log.info("ray: %d chunk(s) in %.1f s", len(work), time.perf_counter() - started)
    return routed_by


def _prepare(actors: list, cascade: bool, check_store: Callable[[str | None], None]) -> dict | None:
    """Every actor built (a job that can't be planned there stops the run here, with its reason);
    the store checked; the cascade's student chosen by the first and loaded by the rest."""
    check_store(_get([a.store_id.remote() for a in actors])[0])
    if not cascade:
        return None
    routed_by = _get(actors[0].choose_router.remote())
    _get([a.choose_router.remote() for a in actors[1:]])
    return routed_by


def _schedule(
    actors: list, work: list[WorkItem], on_done: Callable[[WorkItem, ChunkDone], None], attempts: int
) -> None:
    pending = deque(work)
    tried: dict[int, int] = {}
    running: dict = {}
    idle = list(actors)
    while pending or running:
        while idle and pending:
            actor, item = idle.pop(), pending.popleft()
            tried[item.chunk.index] = tried.get(item.chunk.index, 0) + 1
            running[actor.label.remote(item)] = (actor, item)
        (ref,), _ = ray.wait(list(running), num_returns=1)
        actor, item = running.pop(ref)
        try:
            done = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if tried[item.chunk.index] >= attempts:
                raise BackendUnavailableError(
                    f"chunk {item.chunk.index} was handed to an engine actor {attempts} time(s) and the "
                    f"actor died each time ({_reason(exc)})",
                    hint="see the Ray logs of the node it ran on (out of memory?); rerun to resume",
                ) from None
            log.warning(
                "ray: the actor labelling chunk %d died (%s); the chunk is handed out again",
                item.chunk.index, _reason(exc),
                extra=logs.fields("ray_actor_died", chunk=item.chunk.index, reason=_reason(exc)),
            )  # fmt: skip
            pending.appendleft(item)
            idle.append(actor)  # Ray restarts it; calls wait for the restart
            continue
        except ray.exceptions.RayTaskError as exc:
            _raise_cause(exc)
        idle.append(actor)
        on_done(item, done)


def _get(refs):
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        _raise_cause(exc)
    except ray.exceptions.RayActorError as exc:
        raise BackendUnavailableError(
            f"an engine actor could not start: {_reason(exc)}",
            hint="see the error above; an engine that can't load (out of memory) fails the same way locally",
        ) from None


def _raise_cause(exc: Exception):
    """A labelmill error raised in an actor, raised here as itself."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LabelmillError):
        raise cause from None
    if isinstance(cause, BaseException):
        raise BackendUnavailableError(f"an engine actor failed: {type(cause).__name__}: {cause}") from None
    raise exc


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
