"""The run folder: what is finished, what the run was, and who holds it.

    out/<run>/
      run.json            manifest: job fingerprint and its parts, provenance, chunk plan size
      job.yaml            the resolved job, as run
      parts/part-00012.parquet
      done/chunk-00012.json   marker, written only after its part is on disk
      summary.json        totals of the last invocation
      cascade.json        the student this run routes with (pipeline/cascade.py): a resumed run
                          uses the same
      answers/            the run's own answer store, when the shared result cache is off
                          (see pipeline/cache.py); removed when the run is complete
      .lock               held (flock) by the running process; on an object store, a lease
                          object (see pipeline/storage.py)

A run folder may be a local folder or a prefix in an object store (``s3://bucket/runs/x``): the
same files, written through :class:`_Disk` or :class:`_Bucket`. An object appears only once its
upload is whole, so the order "part, then marker" holds there as the rename gives it on disk.

A chunk counts as finished only when its marker is readable, names this run's job fingerprint,
and its part is the file the marker vouches for: same size and SHA-256, so a truncated, zero-filled,
bit-flipped or copied part is caught. Before a run goes on, every finished chunk is checked this
way; one that fails is labelled again, and the run says so. A part with no marker (killed between
the two writes), or of another plan, is removed. ``run.json`` and the markers are typed
(:class:`Manifest`, :class:`ChunkMarker`): every reader goes through this module, and damage is a
message naming the file, never a traceback. Part names have five digits, more when a run has more
than 100,000 chunks, so they always sort in chunk order.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import locks, logs, storage
from pipeline.contracts import STATUSES
from pipeline.errors import JobChangedError, OutputError, RunLockedError, RunStateError
from pipeline.io import write_parquet_atomic, write_text_atomic
from pipeline.storage import ObjectPath

log = logs.get("run")


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
    student_labels + duplicates; the token counts are what the model processed, not what the rows
    carry. They add up over chunks, and over the passes of one chunk."""

    model_calls: int = 0
    """Distinct texts sent to the answer source (the model, or batch results)."""
    cache_hits: int = 0
    """Distinct texts answered from the answer store."""
    duplicates: int = 0
    """Rows answered by an earlier row of the chunk with the same normalised text."""
    student_labels: int = 0
    """Distinct texts the cascade's student answered in the model's place."""
    escalations: int = 0
    """Distinct texts whose final answer is the escalation backend's (asked now, or its cache's)."""
    escalation_calls: int = 0
    """Of those, the ones sent to the escalation backend in this run."""
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
    fingerprint: str | None = None
    """The job fingerprint the chunk was labelled under (None: written before markers had it)."""
    part_bytes: int | None = None
    part_sha256: str | None = None
    """Size and digest of the part, as written: a part that differs is not trusted."""
    store: str | None = None
    """The answer store's id (``pipeline.cache``) the chunk's answers were shared through."""

    def count(self, status: str) -> int:
        return self.status_counts.get(status, 0)


def _read(model: type[_Record], files: _Disk | _Bucket, name: str) -> Any:
    where = files.at(name)
    try:
        data = files.read_bytes(name)
    except OSError as exc:
        raise RunStateError(
            f"cannot read {where}: {exc.strerror or exc}", hint="check its permissions"
        ) from None
    try:
        return model.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise RunStateError(
            f"{where} is damaged ({first})",
            hint="rerun with --restart to start this run folder over, or give the job a new output: folder",
        ) from None


class _Disk:
    """A run folder on a local (or mounted) file system: atomic, synced writes; ``flock``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def at(self, name: str) -> Path:
        return self.root / name

    def read_bytes(self, name: str) -> bytes:
        return self.at(name).read_bytes()

    def exists(self, name: str) -> bool:
        return self.at(name).exists()

    def size(self, name: str) -> int | None:
        try:
            return self.at(name).stat().st_size
        except OSError:
            return None

    def sha256(self, name: str) -> str:
        return file_sha256(self.at(name))

    def names(self, folder: str, pattern: str) -> list[str]:
        where = self.at(folder)
        return sorted(f"{folder}/{p.name}" for p in where.glob(pattern)) if where.is_dir() else []

    def open(self, name: str) -> pa.NativeFile:
        return pa.OSFile(str(self.at(name)))

    def write_text(self, name: str, text: str) -> None:
        write_text_atomic(text, self.at(name))

    def write_part(self, name: str, table: pa.Table) -> tuple[int, str]:
        path = self.at(name)
        write_parquet_atomic(table, path)
        try:
            return path.stat().st_size, file_sha256(path)
        except OSError as exc:
            raise OutputError(f"cannot read back {path}: {exc}") from None

    def delete(self, name: str) -> None:
        self.at(name).unlink(missing_ok=True)

    def delete_folder(self, folder: str) -> None:
        shutil.rmtree(self.at(folder), ignore_errors=True)

    def make_folders(self, *folders: str) -> None:
        for folder in folders:
            self.at(folder).mkdir(parents=True, exist_ok=True)
        for folder in (*folders, ""):
            for tmp in self.at(folder).glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)


class _Bucket:
    """A run folder in an object store: each file one object, written whole in one upload."""

    def __init__(self, root: ObjectPath) -> None:
        self.root = root

    def at(self, name: str) -> ObjectPath:
        return self.root / name

    def read_bytes(self, name: str) -> bytes:
        return storage.read_bytes(self.at(name))

    def exists(self, name: str) -> bool:
        return storage.exists(self.at(name))

    def size(self, name: str) -> int | None:
        return storage.size(self.at(name))

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.read_bytes(name)).hexdigest()

    def names(self, folder: str, pattern: str) -> list[str]:
        prefix = self.at(folder)
        return sorted(
            f"{folder}/{path.name}"
            for path, _ in storage.list_files(prefix)
            if path.parent == prefix and fnmatch.fnmatch(path.name, pattern)
        )

    def open(self, name: str) -> pa.NativeFile:
        return storage.open_input(self.at(name))

    def write_text(self, name: str, text: str) -> None:
        storage.write_bytes(self.at(name), text.encode())

    def write_part(self, name: str, table: pa.Table) -> tuple[int, str]:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(self.at(name), data)
        return len(data), hashlib.sha256(data).hexdigest()

    def delete(self, name: str) -> None:
        storage.delete(self.at(name))

    def delete_folder(self, folder: str) -> None:
        storage.delete_tree(self.at(folder))

    def make_folders(self, *folders: str) -> None:
        """Nothing to make: an object store has no folders."""


_DAMAGED = object()


class RunFolder:
    def __init__(self, root: str | Path | ObjectPath, chunks: int | None = None) -> None:
        where = storage.location(root)
        self.files: _Disk | _Bucket = _Bucket(where) if isinstance(where, ObjectPath) else _Disk(where)
        self.root = where
        self.parts = where / "parts"
        self.markers = where / "done"
        self.manifest_path = where / "run.json"
        self.lock_path = where / ".lock"
        self.width = part_width(chunks or 0)
        self._lease: storage.LeaseLock | None = None

    @property
    def answers(self) -> Path:
        """The run's own answer store: in the folder, or for a folder in an object store, in a
        local scratch folder named after it (memory-mapped files need a local disk)."""
        if isinstance(self.root, Path):
            return self.root / "answers"
        from pipeline.models import labelmill_home

        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        return labelmill_home() / "scratch" / digest / "answers"

    def part_name(self, chunk: int) -> str:
        return f"parts/part-{chunk:0{self.width}d}.parquet"

    def marker_name(self, chunk: int) -> str:
        return f"done/chunk-{chunk:0{self.width}d}.json"

    def part_path(self, chunk: int) -> Path | ObjectPath:
        return self.files.at(self.part_name(chunk))

    def marker_path(self, chunk: int) -> Path | ObjectPath:
        return self.files.at(self.marker_name(chunk))

    def read_part(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """A part by its name in the folder (``parts/part-00012.parquet``)."""
        with self.files.open(name) as handle:
            return pq.read_table(handle, columns=columns)

    def part_names(self) -> list[str]:
        return self.files.names("parts", "part-*.parquet")

    def read_text(self, name: str) -> str | None:
        """A small file of the folder (``cascade.json``), or None when there is none."""
        try:
            return self.files.read_bytes(name).decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        self.files.write_text(name, text)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process; the kernel drops the lock if the process dies (its
        forked children, an engine's workers, do not keep it: see pipeline/locks.py). A folder in
        an object store is held by a lease (``pipeline.storage.LeaseLock``)."""
        if isinstance(self.root, ObjectPath):
            lease = storage.LeaseLock(self.root / ".lock")
            lease.acquire()
            self._lease = lease
            try:
                yield
            finally:
                self._lease = None
                lease.release()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            held = locks.take(self.lock_path)
        except OSError as exc:
            raise OutputError(f"cannot create run folder {self.root}: {exc}") from None
        if held is None:
            raise RunLockedError(
                f"run folder {self.root} is in use by {locks.holder(self.lock_path)}",
                hint="wait for that run to finish (labelmill status shows its progress), or "
                "give this job another output: folder",
            )
        # only the message for a refused second run: not worth stopping for (disk full)
        with contextlib.suppress(OSError):
            held.write(f"process {os.getpid()}")
        with held:
            yield

    def check_lock(self) -> None:
        """Raise when this process held the folder's lease and lost it: nothing more may be written."""
        if self._lease is not None:
            self._lease.check()

    def is_locked(self) -> bool:
        if isinstance(self.root, ObjectPath):
            return storage.LeaseLock(self.root / ".lock").held_by_other()
        return locks.held_by_other(self.lock_path)

    def has_manifest(self) -> bool:
        return self.files.exists("run.json")

    def manifest(self) -> Manifest | None:
        if not self.files.exists("run.json"):
            return None
        return _read(Manifest, self.files, "run.json")

    def prepare(
        self, manifest: Manifest, job_yaml: str, restart: bool, restart_on: frozenset[str] = frozenset()
    ) -> None:
        """Start a new run, or check that the one on disk is the same job. Call under ``lock``.
        ``restart_on``: fingerprint components whose change (alone) starts the run over instead of
        being refused (``on_input_change: restart`` gives ``{"input"}``)."""
        try:
            self._prepare(manifest, job_yaml, restart, restart_on)
        except OSError as exc:
            raise OutputError(
                f"cannot prepare run folder {self.root}: {exc}",
                hint="check free disk space and permissions there",
            ) from None

    def _prepare(self, manifest: Manifest, job_yaml: str, restart: bool, restart_on: frozenset[str]) -> None:
        self.width = part_width(manifest.chunks)
        try:
            old = self.manifest()
        except RunStateError:
            old = _DAMAGED
        if not restart and isinstance(old, Manifest) and old.fingerprint != manifest.fingerprint:
            changed = _changed(old.components, manifest.components)
            if changed and set(changed) <= restart_on:
                log.warning(
                    "%s: %s changed since this run folder was started: labelling it again from "
                    "the start (the result cache answers the texts it has seen)",
                    self.root, ", ".join(changed),
                    extra=logs.fields("restart_on_change", changed=changed),
                )  # fmt: skip
                restart = True
        if restart:
            for folder in ("parts", "done"):
                self.files.delete_folder(folder)
            shutil.rmtree(self.answers, ignore_errors=True)
            for name in ("run.json", "summary.json", "cascade.json"):
                self.files.delete(name)
            old = None
        markers = self._markers()
        if old is None or old is _DAMAGED:
            foreign = {}
            for marker in markers.values():
                print_ = marker.fingerprint or self._part_fingerprint(marker.chunk)
                if print_ is not None and print_ != manifest.fingerprint:
                    foreign[print_] = foreign.get(print_, 0) + 1
            if foreign:
                what = "damaged" if old is _DAMAGED else "missing"
                raise RunStateError(
                    f"{self.manifest_path} is {what}, and {self.markers} holds "
                    f"{sum(foreign.values())} finished chunk(s) of another job (fingerprint "
                    f"{', '.join(sorted(foreign))}): they can't be resumed under this one",
                    hint="to keep them, give this job a new output: folder; to discard them and "
                    "start over here, rerun with --restart",
                )
            if old is _DAMAGED:
                log.warning(
                    "%s was damaged: written again from the job; finished chunks are checked against it",
                    self.manifest_path,
                    extra=logs.fields("manifest_rewritten", path=str(self.manifest_path)),
                )
        elif old.fingerprint != manifest.fingerprint:
            if any(self.files.exists(self.part_name(i)) for i in markers):
                changed = _changed(old.components, manifest.components)
                hint = (
                    "to keep the finished parts, give the job a new output: folder; to discard "
                    f"them and start over here, rerun with --restart ({len(markers)} "
                    "finished chunk(s) would be deleted)"
                )
                if changed == ["input"]:
                    hint = (
                        "the input files changed (a new export?): for a run folder per night give "
                        "output: a {date} (out/keywords/{date}); to label this folder again each "
                        "time its input changes, set on_input_change: restart; --restart does it once"
                    )
                raise JobChangedError(
                    f"the job changed since {self.root} was started: {', '.join(changed)} differ",
                    hint=hint,
                )
            old = None  # nothing was finished under the old job (it failed at start): nothing to protect
        self.files.make_folders("parts", "done")
        if old is None or old is _DAMAGED:
            self.files.delete("summary.json")
            legacy = {"attributes"} if manifest.attributes is None else None
            self.files.write_text("run.json", manifest.model_dump_json(indent=2, exclude=legacy))
        self.files.write_text("job.yaml", job_yaml)

    def _markers(self) -> dict[int, ChunkMarker]:
        """Every readable marker whose name and content agree, by chunk index; no checks of parts."""
        found: dict[int, ChunkMarker] = {}
        for name in self.files.names("done", "chunk-*.json"):
            index = _index(name)
            try:
                marker = _read(ChunkMarker, self.files, name)
            except RunStateError:
                continue
            if index is not None and marker.chunk == index:
                found[index] = marker
        return found

    def _part_fingerprint(self, chunk: int) -> str | None:
        try:
            with self.files.open(self.part_name(chunk)) as handle:
                meta = pq.read_schema(handle).metadata or {}
            return json.loads(meta[b"labelmill"])["job_fingerprint"]
        except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
            return None

    def finished(self) -> dict[int, ChunkMarker]:
        """Markers of finished chunks whose part is there at the size they name, by chunk index.
        Cheap (no part is read); a run checks more before it trusts them (see ``verify``)."""
        done = {}
        for index, marker in self._markers().items():
            size = self.files.size(self.part_name(index))
            if size is None:
                continue
            if marker.part_bytes in (None, size):
                done[index] = marker
        return done

    def verify(
        self, fingerprint: str, chunks: dict[int, int], *, clean: bool = True
    ) -> tuple[dict[int, ChunkMarker], list[str]]:
        """The finished chunks a run can trust, and why the others can't be: ``chunks`` maps the
        plan's chunk indexes to their row counts. With ``clean`` (under ``lock``), markers that
        fail and parts nobody vouches for are removed, so the folder holds only what is listed."""
        trusted: dict[int, ChunkMarker] = {}
        problems: list[str] = []
        unusable: list[str] = []
        for name in self.files.names("done", "chunk-*.json"):
            index = _index(name)
            try:
                marker = _read(ChunkMarker, self.files, name)
            except RunStateError as exc:
                problems.append(exc.message)
                unusable.append(name)
                continue
            why = self._distrust(marker, index, fingerprint, chunks)
            if why:
                problems.append(f"chunk {index}: {why}")
                unusable.append(name)
            else:
                trusted[marker.chunk] = marker
        if clean:
            keep = {self.part_name(i) for i in trusted}
            stray = [name for name in self.part_names() if name not in keep]
            try:
                for name in unusable + stray:
                    self.files.delete(name)
            except OSError as exc:
                raise OutputError(
                    f"cannot remove {exc.filename} from {self.root}: {exc.strerror or exc}",
                    hint="check the permissions of the run folder",
                ) from None
        return trusted, problems

    def _distrust(
        self, marker: ChunkMarker, index: int | None, fingerprint: str, chunks: dict[int, int]
    ) -> str | None:
        """Why a finished chunk can't be trusted, or None."""
        if index is None or marker.chunk != index:
            return f"its marker names chunk {marker.chunk}"
        if chunks.get(index) != marker.rows:
            return "the marker is not of this run's chunk plan"
        if marker.fingerprint not in (None, fingerprint):
            return f"its marker is of another job (fingerprint {marker.fingerprint})"
        name = self.part_name(index)
        size = self.files.size(name)
        if size is None:
            return "its part is missing"
        if marker.part_bytes is not None and size != marker.part_bytes:
            return f"its part has {size} bytes, the marker says {marker.part_bytes}"
        if marker.part_sha256 is not None:
            if self.files.sha256(name) != marker.part_sha256:
                return "its part's content changed since it was written (checksum differs)"
            return None
        # written before markers held a checksum: what the part says about itself must agree
        try:
            with self.files.open(name) as handle:
                meta = pq.read_metadata(handle)
            stamp = json.loads((meta.schema.to_arrow_schema().metadata or {})[b"labelmill"])
        except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
            return "its part is not readable"
        if meta.num_rows != marker.rows:
            return f"its part has {meta.num_rows} rows, the marker says {marker.rows}"
        if stamp.get("job_fingerprint") != fingerprint:
            return "its part is of another job"
        return None

    def commit(self, table: pa.Table, marker: ChunkMarker) -> None:
        """Part first, marker second: a marker always vouches for a complete part, by its size and
        checksum."""
        self.check_lock()
        marker.part_bytes, marker.part_sha256 = self.files.write_part(self.part_name(marker.chunk), table)
        self.files.write_text(self.marker_name(marker.chunk), marker.model_dump_json())

    def write_summary(self, summary: dict) -> None:
        self.files.write_text("summary.json", json.dumps(summary, indent=2, ensure_ascii=False))

    def summarise(self, manifest: Manifest, markers: Iterable[ChunkMarker] | None = None) -> dict[str, Any]:
        """Totals over finished chunks (all invocations of the run): ``markers``, or those on disk."""
        markers = list(self.finished().values() if markers is None else markers)
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


def _changed(before: dict[str, str], now: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def part_width(chunks: int) -> int:
    """Digits in part and marker names: five, or as many as the last chunk's index needs."""
    return max(5, len(str(max(chunks - 1, 0))))


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _index(name: str) -> int | None:
    found = re.fullmatch(r"chunk-(\d+)\.json", name.rsplit("/", 1)[-1])
    return int(found.group(1)) if found else None


def status_totals(markers: Iterable[ChunkMarker]) -> dict[str, int]:
    """Rows per status over some finished chunks, every status named (in summary order)."""
    totals = dict.fromkeys(STATUSES, 0)
    for m in markers:
        for k, v in m.status_counts.items():
            totals[k] = totals.get(k, 0) + v
    return totals
