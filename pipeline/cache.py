"""Answers kept on disk, keyed by the normalised text: the result cache, and a run's own memory.

Two stores share this format. The result cache (``$LABELMILL_HOME/cache/`` unless the job's
``cache.path`` says otherwise) outlives runs: tomorrow's nightly run of the same job asks the model
only about texts it has never answered. A run without it (``--no-cache``) keeps the same store in
its run folder (``answers/``), so that within the run, too, each distinct text is asked once,
however far apart its rows are; it is removed when the run is complete. Layout::

    <store>/
      <namespace>/                      one folder per job identity (see below)
        seg-<time>-<pid>.arrows         answers, appended chunk by chunk (Arrow IPC stream)

The namespace is a digest of everything that decides an answer besides the text: the model (with
its checkpoint fingerprint), the prompt, the labels or attributes, sampling, the engine settings
that change outputs, and the normalisation. An entry holds the normalised text (its key), the
text as it was sent (the first spelling met), and the answer as the backend returned it, so an
answer from the store is parsed like a fresh one. Failed requests are never stored.

Safe against a crash: each chunk's answers are appended as one record batch and flushed to disk
before the chunk is marked done, so a resumed run finds every answer its finished chunks used.
A file is closed once it holds about a million answers, then read back memory-mapped; a new one
starts. Several runs may share a store: each writes its own files (locked from before they have
their name until they are finished) and sees those that existed when it opened the store, plus
its own. When a namespace holds more than ``MERGE_ABOVE`` files, closing the store merges those
nobody is writing into one, keeping one answer per text.

Trusted only once checked: every batch carries a CRC-32 of its buffers, checked when the store is
opened, before any of its answers is used. A batch that fails the check is skipped (its texts are
asked again) and reported, never read: damage can cost a model call, never give a wrong answer or
crash the process. Reading a file stops at a batch that can't be read at all (a crash cut it
short, or its framing is damaged). ``labelmill cache verify`` reports all of this, ``labelmill
cache repair`` rewrites the files without it. Batches from before checksums existed are accepted
after a full structural validation and sealed by the next merge or repair.

Runs that have the store open hold a shared lock on ``<namespace>/.in-use``; ``labelmill cache
clear`` takes it exclusively, so it refuses while a run of that job is going, and a run that
starts meanwhile waits for it.

The index, in memory, holds 8 bytes per entry: a 32-bit hash of the key and the entry's number,
sorted. A hit is confirmed by comparing the stored key with the key asked, so two texts that share
a hash are never confused. At 10 million answers the index takes 80 MB; the files are mapped, and
the pages a lookup touches are handed back to the operating system after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import locks, storage
from pipeline.contracts import ANSWER_SCHEMA
from pipeline.errors import OutputError, StoreBusyError
from pipeline.io import fsync_dir, write_text_atomic
from pipeline.storage import ObjectPath

ENTRY_SCHEMA = pa.schema(
    [pa.field("key", pa.string()), pa.field("sent", pa.string())]
    + [f for f in ANSWER_SCHEMA if f.name != "error"]
)
"""One stored answer: the key, the text sent, then the answer's fields (``retries`` stored as 0)."""
_ADDED_LATER = ("alternatives", "choices", "levels")
"""Answer fields files written by earlier versions may lack (in the order they were added): such a
file is read as if they were null."""
_EARLIER_SCHEMAS = [
    pa.schema([f for f in ENTRY_SCHEMA if f.name not in _ADDED_LATER[n:]]) for n in range(len(_ADDED_LATER))
]
_FILE_SCHEMA = ENTRY_SCHEMA.with_metadata({"labelmill.cache": "2"})
"""What files are written with: the metadata says every batch in the file carries a checksum."""
_CRC = "labelmill.crc32"
_ANSWER_FIELDS = [f.name for f in ENTRY_SCHEMA][2:]
_SEED = 7
_ID_BITS = 32
_ID_MASK = np.uint64((1 << _ID_BITS) - 1)
FILE_ROWS = 1_000_000
"""Answers in a file before it is closed and mapped."""
MERGE_ABOVE = 32
"""Files in a namespace before closing the store merges them."""
IN_USE = ".in-use"


def key_hashes(keys: pl.Series) -> np.ndarray:
    """32-bit hashes (as uint64) of keys, for the in-memory index only: never stored."""
    return keys.hash(seed=_SEED).to_numpy() >> np.uint64(64 - _ID_BITS)


class ResultCache:
    def __init__(
        self,
        root: str | Path,
        namespace: str,
        within_run: bool = True,
        about: dict | None = None,
        *,
        file_rows: int = FILE_ROWS,
        merge_above: int = MERGE_ABOVE,
        key_hash=key_hashes,
    ) -> None:
        """``within_run``: lookups also find answers added since the store was opened (a text is
        asked once per run); off, they find only earlier runs' answers, and new ones are kept for
        later runs. ``about``: what the namespace holds answers of (model, prompt, task), kept in
        its ``about.json`` for ``labelmill cache info``. ``file_rows``, ``merge_above`` and
        ``key_hash`` (keys -> 32-bit hashes as uint64) are the store's tuning, given for tests."""
        self.root = Path(root)
        self.namespace = namespace
        self.within_run = within_run
        self.max_file_rows = file_rows
        self.merge_above = merge_above
        self.key_hash = key_hash
        self._file_rows = 0
        self._closed = False
        self.folder = self.root / namespace
        self._segments: list[pa.Table] = []
        self._mappings: list[mmap.mmap | None] = []
        """Each segment's file mapping; None while it is held in memory only."""
        self._starts: list[int] = []
        self._entries = 0
        self._index = np.empty(0, dtype=np.uint64)
        self._file = None
        self._writer = None
        self._path: Path | None = None
        self._unmapped: int | None = None
        """Index of the first segment held in memory (written to the open file, not mapped yet)."""
        self.problems: list[str] = []
        """What was found damaged when the store was opened (those answers are not used)."""
        self._in_use: locks.Lock | None = None
        try:
            self._in_use = _hold_in_use(self.folder)
            self.store_id = _store_id(self.folder)
            if about is not None and not (self.folder / "about.json").exists():
                write_text_atomic(json.dumps(about, indent=2, ensure_ascii=False), self.folder / "about.json")
            _sweep(self.folder)
            for path in sorted(self.folder.glob("seg-*.arrows")):
                contents = read_file(path)
                self.problems += contents.problems()
                for table, mapping in contents.batches:
                    self._add_segment(table, mapping)
            self._release()  # indexing read every stored key once
        except OSError as exc:
            self._unlock()
            raise OutputError(
                f"cannot open the result store {self.folder}: {exc}",
                hint="free space or fix permissions there, or set cache.path to another disk "
                "(--no-cache also works for a new run folder)",
            ) from None

    def __len__(self) -> int:
        return self._entries

    def lookup(self, keys: pl.Series) -> tuple[np.ndarray, pa.Table]:
        """Which of ``keys`` have a stored answer: their positions in ``keys`` (ascending), and
        their answers (``ANSWER_SCHEMA``) in that order."""
        if not self._entries or not len(keys):
            return np.empty(0, dtype=np.int64), ANSWER_SCHEMA.empty_table()
        hashes = self.key_hash(keys)
        position = np.searchsorted(self._index, hashes << np.uint64(_ID_BITS))
        found = np.full(len(keys), -1, dtype=np.int64)
        open_ = np.arange(len(keys))
        while len(open_):  # candidates with the same hash sit side by side; usually one round
            at = position[open_]
            inside = at < len(self._index)
            open_, at = open_[inside], at[inside]
            candidate = self._index[at]
            same_hash = (candidate >> np.uint64(_ID_BITS)) == hashes[open_]
            open_, at, candidate = open_[same_hash], at[same_hash], candidate[same_hash]
            entries = (candidate & _ID_MASK).astype(np.int64)
            stored = self._take(entries, ["key"]).column("key")
            equal = (pl.Series(stored) == keys.gather(open_)).fill_null(False).to_numpy()
            found[open_[equal]] = entries[equal]
            open_ = open_[~equal]
            position[open_] += 1
        hits = np.flatnonzero(found >= 0)
        answers = self._take(found[hits], _ANSWER_FIELDS)  # _take hands back what it touched
        answers = answers.append_column("error", pa.nulls(len(hits), pa.string()))
        return hits, answers.select([f.name for f in ANSWER_SCHEMA]).cast(ANSWER_SCHEMA)

    def add(self, keys: pl.Series, sent: pl.Series, answers: pa.Table) -> None:
        """Store answers (``ANSWER_SCHEMA``) to ``sent`` under ``keys``; failed ones are skipped.
        On return they are on disk and found by lookups."""
        columns = {"key": keys.to_arrow().cast(pa.string()), "sent": sent.to_arrow().cast(pa.string())}
        columns |= {name: answers.column(name) for name in _ANSWER_FIELDS}
        columns["retries"] = pa.array(np.zeros(len(answers), dtype=np.int32))
        table = pa.Table.from_arrays([columns[f.name] for f in ENTRY_SCHEMA], schema=ENTRY_SCHEMA)
        # one record batch per call: the file's batches then match the in-memory segments
        table = table.filter(pc.is_null(answers.column("error"))).combine_chunks()
        if not table.num_rows:
            return
        try:
            if self._writer is None:
                self._open_file()
            for batch in table.to_batches():
                _write_sealed(self._writer, batch)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise OutputError(
                f"cannot write the result store {self.folder}: {exc}",
                hint="free space there or set cache.path to another disk, then rerun: finished "
                "chunks are kept (a run started with the cache finishes with it; --no-cache works "
                "for a new run folder)",
            ) from None
        self._file_rows += table.num_rows
        if self.within_run:
            if self._unmapped is None:
                self._unmapped = len(self._segments)
            self._add_segment(table)
        if self._file_rows >= self.max_file_rows:
            self._close_file()

    def answers(self, columns: tuple[str, ...] | list[str] = ("sent", "text", "logprob")) -> pa.Table:
        """Every stored answer's ``columns`` (``ENTRY_SCHEMA`` fields): the ``examples`` retriever
        and the cascade's student learn from a job's earlier answers."""
        columns = list(columns)
        if not self._entries:
            return pa.schema([ENTRY_SCHEMA.field(c) for c in columns]).empty_table()
        return self._take(np.arange(self._entries, dtype=np.int64), columns)

    def stats(self) -> dict:
        """Entries and bytes on disk: the whole store, and this job's namespace."""
        stores = describe_stores(self.root)
        return {
            "path": str(self.root),
            "entries": sum(s["entries"] for s in stores),
            "entries_for_this_job": self._entries,
            "bytes": sum(s["bytes"] for s in stores),
        }

    def close(self) -> None:
        """Finish the open file; merge the namespace's files when there are many. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):  # every answer was flushed when it was added
            self._close_file()
        self._segments.clear()
        self._mappings.clear()
        try:
            files = sorted(self.folder.glob("seg-*.arrows"))
            if len(files) > self.merge_above:
                merge(self.folder, files, self.max_file_rows)
        except OSError:
            pass  # merging is housekeeping; the next run tries again
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._in_use is not None:
            self._in_use.release()
            self._in_use = None

    def _open_file(self) -> None:
        # Created under a hidden name and locked before it gets its real one: a merge only ever
        # sees it locked, so it can't take a file that is about to be written for a finished one.
        name = f"seg-{time.time_ns():020d}-{os.getpid()}.arrows"
        hidden = self.folder / f".{name}.tmp-{os.getpid()}"
        handle = hidden.open("xb")
        fcntl.flock(handle, fcntl.LOCK_EX)
        locks.close_in_children(handle.fileno())
        writer = pa.ipc.new_stream(handle, _FILE_SCHEMA)
        self._path = self.folder / name
        os.replace(hidden, self._path)
        fsync_dir(self.folder)  # the name must survive a power cut as long as the answers do
        self._file, self._writer = handle, writer
        self._file_rows = 0

    def _close_file(self) -> None:
        """End the open file and read its answers back mapped, in place of the in-memory copies."""
        if self._writer is None:
            return
        writer, handle, path = self._writer, self._file, self._path
        self._writer = self._file = self._path = None
        writer.close()
        handle.flush()
        os.fsync(handle.fileno())
        locks.closing(handle.fileno())
        handle.close()
        first, self._unmapped = self._unmapped, None
        if first is None:
            return  # nothing of this file is held in memory
        mapped = read_file(path, check=False).batches  # checked when written, a moment ago
        held = self._segments[first:]
        if [t.num_rows for t, _ in mapped] != [t.num_rows for t in held]:
            return  # keep the in-memory copies; the file is read whole next time
        # the same entries, numbered the same, now read from the disk instead of held in memory
        for i, (table, mapping) in enumerate(mapped, start=first):
            self._segments[i], self._mappings[i] = table, mapping

    def _add_segment(self, table: pa.Table, mapping: mmap.mmap | None = None) -> None:
        ids = np.arange(self._entries, self._entries + table.num_rows, dtype=np.uint64)
        keys = (self.key_hash(pl.Series(table.column("key"))) << np.uint64(_ID_BITS)) | ids
        # Two sorted runs: a stable sort merges them in one pass.
        index = np.concatenate([self._index, np.sort(keys)])
        index.sort(kind="stable")
        self._index = index
        self._segments.append(table)
        self._mappings.append(mapping)
        self._starts.append(self._entries)
        self._entries += table.num_rows

    def _release(self) -> None:
        """Hand back the mapped pages lookups touched: they stay in the operating system's file
        cache, but stop counting as this process's memory, which would grow to the store's size."""
        for mapping in {id(m): m for m in self._mappings if m is not None}.values():
            mapping.madvise(mmap.MADV_DONTNEED)

    def _take(self, entries: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows of the given entry numbers, in that order (copied out of the mappings)."""
        if not len(entries):
            return pa.schema([ENTRY_SCHEMA.field(c) for c in columns]).empty_table()
        segment = np.searchsorted(np.asarray(self._starts), entries, side="right") - 1
        order = np.argsort(segment, kind="stable")
        parts, bounds = [], np.flatnonzero(np.diff(segment[order])) + 1
        runs = np.split(order, bounds)
        for n, run in enumerate(runs):
            s = segment[run[0]]
            rows = pa.array(entries[run] - self._starts[s])
            parts.append(self._segments[s].select(columns).take(rows))
            mapping = self._mappings[s]
            following = segment[runs[n + 1][0]] if n + 1 < len(runs) else None
            if mapping is not None and (following is None or self._mappings[following] is not mapping):
                mapping.madvise(mmap.MADV_DONTNEED)  # done with this file for now: see _release
        taken = pa.concat_tables(parts).combine_chunks()
        return taken.take(pa.array(np.argsort(order)))


class MirroredCache(ResultCache):
    """A result cache kept in an object store (``cache: {path: s3://bucket/labelmill-cache}``).

    The store's files are memory-mapped and locked, which needs a local disk, so each machine
    works on a mirror (``$LABELMILL_HOME/mirrors/<digest of the URI>/``): opening downloads the
    namespace's answer files it lacks, closing uploads the files this machine finished, each as
    one whole object, and deletes from the bucket those its merge replaced. Runs on several
    machines (Ray's engine actors) share answers through the bucket from one run to the next;
    within a run each machine finds its own. A file still being written by a live process is
    never uploaded. The namespace's ``store-id`` is created once in the bucket, by a conditional
    write, so every machine reports the same store. Students of a cascade stay in the mirror.
    """

    def __init__(
        self, remote: ObjectPath, namespace: str, within_run: bool = True, about=None, **tuning
    ) -> None:
        self.remote = remote / namespace
        local = mirror_root(remote)
        try:
            self._pulled = _pull(self.remote, local / namespace)
        except (OSError, pa.ArrowException) as exc:
            raise storage.failure(
                f"cannot read the result store {self.remote}", exc, also="; or run with --no-cache"
            ) from None
        super().__init__(local, namespace, within_run, about, **tuning)

    def stats(self) -> dict:
        """As the local store's, with the bucket's place (the figures are of this machine's mirror)."""
        return {**super().stats(), "path": str(self.remote.parent), "mirror": str(self.root)}

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        with contextlib.suppress(OSError, pa.ArrowException, OutputError):  # tried again next run
            _push(self.folder, self.remote, self._pulled)


def mirror_root(remote: ObjectPath) -> Path:
    from pipeline.models import labelmill_home

    return labelmill_home() / "mirrors" / hashlib.sha256(str(remote).encode()).hexdigest()[:16]


def _pull(remote: ObjectPath, folder: Path) -> set[str]:
    """Download what the mirror lacks; the names of the answer files in the bucket."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = {path.name: (path, size) for path, size in storage.list_files(remote) if path.parent == remote}
    if "store-id" not in listed:  # a new namespace in the bucket: one id for every machine
        storage.create_if_absent(remote / "store-id", os.urandom(8).hex().encode())
        listed["store-id"] = (remote / "store-id", None)
    for name, (path, size) in listed.items():
        local = folder / name
        wanted = (name.startswith("seg-") and name.endswith(".arrows")) or name in ("store-id", "about.json")
        if not wanted or (local.exists() and name != "store-id" and local.stat().st_size == size):
            continue
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(storage.read_bytes(path))
        os.replace(tmp, local)
    return {name for name in listed if name.startswith("seg-")}


def _push(folder: Path, remote: ObjectPath, pulled: set[str]) -> None:
    """Upload the finished answer files the bucket lacks; delete those a merge replaced."""
    there = {path.name for path, _ in storage.list_files(remote) if path.parent == remote}
    for path in sorted(folder.glob("seg-*.arrows")):
        if path.name not in there and not locks.held_by_other(path):
            storage.write_bytes(remote / path.name, path.read_bytes())
    for name in pulled:
        if name in there and not (folder / name).exists():
            storage.delete(remote / name)
    about = folder / "about.json"
    if "about.json" not in there and about.exists():
        storage.write_bytes(remote / "about.json", about.read_bytes())


@dataclass
class FileContents:
    """What reading one answer file found: its whole, checked batches, and what it could not use."""

    path: Path
    batches: list[tuple[pa.Table, mmap.mmap]] = field(default_factory=list)
    damaged: list[tuple[int, str]] = field(default_factory=list)
    """(batch number from 1, why): batches skipped."""
    unreadable: str | None = None
    """Why reading stopped before the end of the file, if it did."""
    unsealed: int = 0
    """Batches without a checksum (written before checksums existed), validated instead."""
    writing: bool = False
    """A run holds the file: it is being written, so a cut-short end is expected."""

    @property
    def entries(self) -> int:
        return sum(t.num_rows for t, _ in self.batches)

    def problems(self) -> list[str]:
        found = [f"{self.path}: batch {n} skipped: {why}" for n, why in self.damaged]
        if self.unreadable and not self.writing:
            found.append(f"{self.path}: {self.unreadable}")
        return found


def read_file(path: Path, check: bool = True) -> FileContents:
    """A file's batches that pass their checks, read in place (no copy), each as a table with the
    mapping. Never raises for what the file holds: damage is reported in the result, not read.
    ``check`` off: batches are only counted, not checksummed (``cache info``: reading every byte of
    a large cache to count it would cost time and memory for nothing)."""
    contents = FileContents(path)
    contents.writing = locks.held_by_other(path)
    try:
        with path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                contents.unreadable = "empty file"
                return contents
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        reader = pa.ipc.open_stream(pa.py_buffer(mapping))
    except (pa.ArrowException, OSError, ValueError) as exc:
        contents.unreadable = f"not readable as an answer file ({_short(exc)})"
        return contents
    if any(reader.schema.equals(earlier) for earlier in _EARLIER_SCHEMAS):
        entries = _with_later_fields
    elif reader.schema.equals(ENTRY_SCHEMA):
        entries = _entries
    else:
        contents.unreadable = "not an answer file (other columns)"
        return contents
    sealed = (reader.schema.metadata or {}).get(b"labelmill.cache") is not None
    number = 0
    while True:
        try:
            batch, meta = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError) as exc:
            contents.unreadable = f"unreadable from batch {number + 1} on ({_short(exc)})"
            break
        number += 1
        if not check:
            contents.batches.append((entries(batch), mapping))
            continue
        stored = (meta or {}).get(_CRC.encode()) if meta is not None else None
        if stored is not None:
            good = stored.decode(errors="replace") == _checksum(batch)
            # checking read every page of the batch: hand them back, or a large cache would be
            # counted whole in this process's memory while it opens (see ResultCache._release)
            mapping.madvise(mmap.MADV_DONTNEED)
            if not good:
                contents.damaged.append((number, "checksum mismatch"))
                continue
        elif sealed:
            contents.damaged.append((number, "its checksum is missing"))
            continue
        else:
            try:
                batch.validate(full=True)
            except pa.ArrowException as exc:
                contents.damaged.append((number, f"invalid ({_short(exc)})"))
                continue
            contents.unsealed += 1
        contents.batches.append((entries(batch), mapping))
    return contents


def _entries(batch: pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([batch], schema=ENTRY_SCHEMA)


def _with_later_fields(batch: pa.RecordBatch) -> pa.Table:
    table = pa.Table.from_batches([batch])
    for name in _ADDED_LATER:
        if name not in table.column_names:
            table = table.append_column(
                ENTRY_SCHEMA.field(name), pa.nulls(batch.num_rows, ENTRY_SCHEMA.field(name).type)
            )
    return table


def _checksum(batch: pa.RecordBatch) -> str:
    """CRC-32 of a batch's row count and every buffer, in order (None buffers marked as such)."""
    crc = zlib.crc32(batch.num_rows.to_bytes(8, "little"))
    for column in batch.columns:
        for buffer in column.buffers():
            crc = zlib.crc32(b"\x00" if buffer is None else b"\x01" + buffer.size.to_bytes(8, "little"), crc)
            if buffer is not None:
                crc = zlib.crc32(memoryview(buffer), crc)
    return f"{crc:08x}"


def _write_sealed(writer, batch: pa.RecordBatch) -> None:
    """Write a batch with the checksum of the buffers a reader will see: those of the batch after
    one trip through the IPC format (writing may trim or copy buffers it was handed)."""
    seen = pa.ipc.read_record_batch(batch.serialize(), ENTRY_SCHEMA)
    writer.write_batch(seen, custom_metadata={_CRC: _checksum(seen)})


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def describe_stores(root: str | Path) -> list[dict]:
    """Every namespace under a store's root: what it holds answers of, how many, and their size."""
    found = []
    for folder in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        files = sorted(folder.glob("seg-*.arrows"))
        about = folder / "about.json"
        try:
            what = json.loads(about.read_text(encoding="utf-8")) if about.exists() else {}
        except (OSError, ValueError):
            what = {"damaged": str(about)}
        found.append(
            {
                "namespace": folder.name,
                "entries": sum(read_file(f, check=False).entries for f in files),
                "bytes": sum(f.stat().st_size for f in files),
                "files": len(files),
                "last_written": max((f.stat().st_mtime for f in files), default=None),
                "about": what if isinstance(what, dict) else {},
            }
        )
    return found


def verify_store(root: str | Path, namespace: str | None = None) -> list[dict]:
    """Every file of a store (or of one namespace), checked: entries usable, batches damaged,
    unreadable ends, unsealed batches, and texts held more than once."""
    report = []
    for folder in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        if namespace not in (None, folder.name):
            continue
        keys = []
        for path in sorted(folder.glob("seg-*.arrows")):
            contents = read_file(path)
            keys += [t.column("key") for t, _ in contents.batches]
            report.append(
                {
                    "namespace": folder.name,
                    "file": str(path),
                    "entries": contents.entries,
                    "damaged_batches": len(contents.damaged),
                    "unreadable": contents.unreadable if not contents.writing else None,
                    "unsealed_batches": contents.unsealed,
                    "being_written": contents.writing,
                    "problems": contents.problems(),
                }
            )
        leftovers = [str(p) for p in folder.glob(".*.tmp-*") if not _alive(_writer_pid(p))]
        duplicates = 0
        if keys:
            stored = pl.Series(pa.chunked_array(keys))
            duplicates = len(stored) - stored.n_unique()
        report.append(
            {
                "namespace": folder.name,
                "file": None,
                "duplicate_entries": duplicates,
                "leftover_files": leftovers,
            }
        )
    return report


def merge(folder: Path, files: list[Path], batch_rows: int, *, always: bool = False) -> dict:
    """Write the checked answers of ``files`` nobody is writing into one new file, one answer per
    text (the oldest), then drop them. Its batches hold about ``batch_rows`` answers each, so a
    lookup visits few of them. ``always``: also rewrite a single file (repair: drops what is
    damaged, seals old batches). Returns what it did."""
    done = {"files_merged": 0, "entries_kept": 0, "duplicates_dropped": 0, "batches_dropped": 0}
    lock = locks.take(folder / ".merge.lock")
    if lock is None:
        return done  # another run is merging
    with lock:
        _sweep(folder)
        merged, handles, tables = [], [], []
        try:
            for path in files:
                try:
                    handle = path.open("rb")
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except (BlockingIOError, FileNotFoundError):
                    continue  # a run is still writing it (or merged it away)
                handles.append(handle)
                contents = read_file(path)
                if contents.damaged or contents.unreadable or contents.unsealed:
                    always = True  # rewriting it is the repair
                done["batches_dropped"] += len(contents.damaged)
                tables += [t for t, _ in contents.batches]
                merged.append(path)
            if len(merged) < (1 if always else 2):
                return done
            if tables:
                whole = pa.concat_tables(tables)
                first = pl.Series(whole.column("key")).is_first_distinct().to_arrow()
                kept = whole.filter(first)
                done["duplicates_dropped"] = whole.num_rows - kept.num_rows
                done["entries_kept"] = kept.num_rows
            else:
                kept = ENTRY_SCHEMA.empty_table()
            name = f"seg-{time.time_ns():020d}-{os.getpid()}-merged.arrows"
            if kept.num_rows:
                _write_file(folder, name, kept, batch_rows)
            for path in merged:
                path.unlink(missing_ok=True)
            fsync_dir(folder)
            done["files_merged"] = len(merged)
            return done
        finally:
            for handle in handles:
                handle.close()


def _write_file(folder: Path, name: str, table: pa.Table, batch_rows: int) -> None:
    """A whole answer file under a hidden name, made durable, then given its name. A process killed
    meanwhile leaves the hidden file, which the next process to open the store removes."""
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as sink:
            fcntl.flock(sink, fcntl.LOCK_EX)
            with pa.ipc.new_stream(sink, _FILE_SCHEMA) as writer:
                for batch in table.combine_chunks().to_batches(max_chunksize=batch_rows):
                    _write_sealed(writer, batch)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, folder / name)
        fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)


def repair(root: str | Path, namespace: str | None = None, batch_rows: int = FILE_ROWS) -> list[dict]:
    """Rewrite each namespace's files nobody is writing into one: only checked answers, one per
    text, every batch sealed; leftovers of killed processes removed."""
    done = []
    for folder in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        if namespace not in (None, folder.name):
            continue
        files = sorted(folder.glob("seg-*.arrows"))
        dupes = sum(r.get("duplicate_entries", 0) for r in verify_store(root, folder.name))
        result = merge(folder, files, batch_rows, always=dupes > 0)
        done.append({"namespace": folder.name, **result})
    return done


def clear(root: Path, namespace: str) -> bool:
    """Remove a namespace's answers; refuses (StoreBusyError) while a run has them open. False
    when there was nothing to remove."""
    import shutil

    folder = root / namespace
    if not folder.is_dir():
        return False
    lock = locks.take(folder / IN_USE)
    if lock is None:
        raise StoreBusyError(
            f"the cached answers in {folder} are in use by a running job",
            hint="wait for that run to finish (labelmill status shows its progress), then clear",
        )
    with lock:
        shutil.rmtree(folder)
    return True


def _hold_in_use(folder: Path) -> locks.Lock:
    """The shared lock every open store holds, so ``cache clear`` can tell it is in use. Waits
    while a clear holds it; if the clear removed the folder meanwhile, it is made again."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return locks.take(folder / IN_USE, shared=True, wait=True)
        except FileNotFoundError:
            continue


def _store_id(folder: Path) -> str:
    """A random name the namespace keeps for its life: a run can tell that the answers its
    finished chunks used were cleared since, even though a folder of that name exists again."""
    path = folder / "store-id"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    tmp = folder / f".store-id.tmp-{os.getpid()}"
    tmp.write_text(os.urandom(8).hex(), encoding="utf-8")
    try:
        os.link(tmp, path)  # the first process to publish an id wins; the others read it
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="utf-8").strip()


def _sweep(folder: Path) -> None:
    """Remove hidden files left by processes that were killed while writing them."""
    for path in folder.glob(".*.tmp-*"):
        if not _alive(_writer_pid(path)) and not locks.held_by_other(path):
            path.unlink(missing_ok=True)


def _writer_pid(path: Path) -> int | None:
    tail = path.name.rsplit(".tmp-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
