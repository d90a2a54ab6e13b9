"""The run folder: what is finished, what the run was, and who holds it.

    out/<run>/
      run.json            manifest: job fingerprint and its parts, provenance, chunk plan size
      job.yaml            the resolved job, as run
      parts/part-00012.parquet
      done/chunk-00012.json   marker, written only after its part is on disk
      summary.json        totals of the last invocation
      answers/            the run's own answer store, when the shared result cache is off
                          (see pipeline/cache.py); removed when the run is complete
      .lock               held (flock) by the running process

A chunk counts as finished when its marker exists and its part file is there. A part without a
marker (killed between the two writes) is simply redone; a temporary file is removed on start.
``run.json`` and the markers are typed (:class:`Manifest`, :class:`ChunkMarker`): every reader
goes through this module.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.contracts import STATUSES
from pipeline.errors import JobChangedError, OutputError, RunLockedError, RunStateError
from pipeline.io import write_parquet_atomic, write_text_atomic


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Manifest(_Record):
    """``run.json``: what the run is, written once when it starts."""

    labelmill_version: str
    created_at: str
    fingerprint: str
    """Digest of ``components``: a run folder holds the output of exactly one job."""
    components: dict[str, str]
    """Named digests of everything that decides the output (input, rows, task, prompt, model,
    sampling, backend settings, chunking), so a changed job is refused naming what changed."""
    task: str = "classify"
    evaluation: str | None = None
    """Which ``labelmill eval`` scoring applies (the task's say), or None."""
    attributes: list[dict[str, Any]] | None = None
    """Older run folders: an extract job's attributes (now in ``provenance``)."""
    provenance: dict[str, Any]
    """Backend, model and its fingerprint, prompt, the task's description, sampling, backend settings."""
    inputs: list[dict[str, Any]]
    rows: int
    chunks: int
    chunk_rows: int
    id_column: str


class ChunkStats(_Record):
    """Where a chunk's answers came from. Rows needing an answer = model_calls + cache_hits +
    duplicates; the token counts are what the model processed, not what the rows carry. They add
    up over chunks, and over the passes of one chunk."""

    model_calls: int = 0
    """Distinct texts sent to the answer source (the model, or batch results)."""
    cache_hits: int = 0
    """Distinct texts answered from the answer store."""
    duplicates: int = 0
    """Rows answered by an earlier row of the chunk with the same normalised text."""
    retries: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    def count_answers(self, answers: pa.Table) -> None:
        """Add the retries and tokens of fresh answers (``ANSWER_SCHEMA``)."""
        for name in ("retries", "prompt_tokens", "output_tokens", "cached_tokens"):
            total = pc.sum(answers.column(name)).as_py() if answers.num_rows else 0
            setattr(self, name, getattr(self, name) + (total or 0))

    def stats(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in STAT_KEYS}


STAT_KEYS = tuple(ChunkStats.model_fields)


class ChunkMarker(ChunkStats):
    """``done/chunk-NNNNN.json``: a finished chunk, written after its part."""

    chunk: int
    file: str
    start: int
    rows: int
    part: str
    status_counts: dict[str, int]
    seconds: float
    """Labelling time of the chunk, summed over its passes."""
    finished_at: str

    def count(self, status: str) -> int:
        return self.status_counts.get(status, 0)


def _read(model: type[_Record], path: Path) -> Any:
    try:
        return model.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise RunStateError(
            f"{path} is damaged ({first})",
            hint="rerun with --restart to start this run folder over, or give the job a new output: folder",
        ) from None


class RunFolder:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.parts = self.root / "parts"
        self.markers = self.root / "done"
        self.answers = self.root / "answers"
        self.manifest_path = self.root / "run.json"
        self.summary_path = self.root / "summary.json"
        self.job_path = self.root / "job.yaml"
        self.lock_path = self.root / ".lock"

    def part_path(self, chunk: int) -> Path:
        return self.parts / f"part-{chunk:05d}.parquet"

    def marker_path(self, chunk: int) -> Path:
        return self.markers / f"chunk-{chunk:05d}.json"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process; the kernel drops the lock if the process dies."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = self.lock_path.open("a+")
        except OSError as exc:
            raise OutputError(f"cannot create run folder {self.root}: {exc}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunLockedError(
                f"run folder {self.root} is in use by {holder}",
                hint="wait for that run to finish (labelmill status shows its progress), or "
                "give this job another output: folder",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.close()

    def is_locked(self) -> bool:
        if not self.lock_path.exists():
            return False
        with self.lock_path.open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def manifest(self) -> Manifest | None:
        if not self.manifest_path.exists():
            return None
        return _read(Manifest, self.manifest_path)

    def prepare(self, manifest: Manifest, job_yaml: str, restart: bool) -> None:
        """Start a new run, or check that the one on disk is the same job. Call under ``lock``."""
        if restart:
            for path in (self.parts, self.markers, self.answers):
                shutil.rmtree(path, ignore_errors=True)
            for path in (self.manifest_path, self.summary_path):
                path.unlink(missing_ok=True)
        old = self.manifest()
        if old is not None and old.fingerprint != manifest.fingerprint and not self.finished():
            old = None  # nothing was finished under the old job (it failed at start): nothing to protect
        if old is not None and old.fingerprint != manifest.fingerprint:
            before, now = old.components, manifest.components
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise JobChangedError(
                f"the job changed since {self.root} was started: {', '.join(changed)} differ",
                hint="to keep the finished parts, give the job a new output: folder; to discard "
                f"them and start over here, rerun with --restart ({len(self.finished())} "
                "finished chunk(s) would be deleted)",
            )
        self.parts.mkdir(parents=True, exist_ok=True)
        self.markers.mkdir(parents=True, exist_ok=True)
        for folder in (self.parts, self.markers, self.root):
            for tmp in folder.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
        if old is None:
            self.summary_path.unlink(missing_ok=True)
            legacy = {"attributes"} if manifest.attributes is None else None
            write_text_atomic(manifest.model_dump_json(indent=2, exclude=legacy), self.manifest_path)
        write_text_atomic(job_yaml, self.job_path)

    def finished(self) -> dict[int, ChunkMarker]:
        """Markers of finished chunks whose part file exists, by chunk index."""
        done: dict[int, ChunkMarker] = {}
        if not self.markers.is_dir():
            return done
        for path in sorted(self.markers.glob("chunk-*.json")):
            marker = _read(ChunkMarker, path)
            if self.part_path(marker.chunk).exists():
                done[marker.chunk] = marker
        return done

    def commit(self, table: pa.Table, marker: ChunkMarker) -> None:
        """Part first, marker second: a marker always vouches for a complete part."""
        write_parquet_atomic(table, self.part_path(marker.chunk))
        write_text_atomic(marker.model_dump_json(), self.marker_path(marker.chunk))

    def write_summary(self, summary: dict) -> None:
        write_text_atomic(json.dumps(summary, indent=2, ensure_ascii=False), self.summary_path)

    def summarise(self, manifest: Manifest) -> dict[str, Any]:
        """Totals over every finished chunk on disk (all invocations of the run)."""
        markers = list(self.finished().values())
        rows_done = sum(m.rows for m in markers)
        seconds = sum(m.seconds for m in markers)
        rate = rows_done / seconds if seconds else None
        remaining = manifest.rows - rows_done
        return {
            "run_folder": str(self.root),
            "complete": len(markers) == manifest.chunks,
            "chunks_done": len(markers),
            "chunks_total": manifest.chunks,
            "rows_done": rows_done,
            "rows_total": manifest.rows,
            "status_counts": status_totals(markers),
            **{k: sum(getattr(m, k) for m in markers) for k in STAT_KEYS},
            "labelling_seconds": round(seconds, 3),
            "rows_per_second": round(rate, 2) if rate else None,
            "eta_seconds": round(remaining / rate, 1)
            if rate and remaining
            else (0 if not remaining else None),
            "model": manifest.provenance.get("model"),
            "backend": manifest.provenance.get("backend"),
            "fingerprint": manifest.fingerprint,
        }


def status_totals(markers: Iterable[ChunkMarker]) -> dict[str, int]:
    """Rows per status over some finished chunks, every status named (in summary order)."""
    totals = dict.fromkeys(STATUSES, 0)
    for m in markers:
        for k, v in m.status_counts.items():
            totals[k] = totals.get(k, 0) + v
    return totals
