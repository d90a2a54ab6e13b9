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
before the chunk is marked done, so a resumed run finds every answer its finished chunks used. A
batch cut short by a crash is ignored when the file is read (every batch before it is whole).
A file is closed once it holds about a million answers, then read back memory-mapped; a new one
starts. Several runs may share a store: each writes its own files (locked while it writes) and sees
those that existed when it opened the store, plus its own. When a namespace holds more than
``MERGE_ABOVE`` files, closing the store merges those nobody is writing.

The index, in memory, holds 8 bytes per entry: a 32-bit hash of the key and the entry's number,
sorted. A hit is confirmed by comparing the stored key with the key asked, so two texts that share
a hash are never confused. At 10 million answers the index takes 80 MB; the files are mapped, and
the pages a lookup touches are handed back to the operating system after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.contracts import ANSWER_SCHEMA
from pipeline.errors import OutputError
from pipeline.io import write_text_atomic

ENTRY_SCHEMA = pa.schema(
    [pa.field("key", pa.string()), pa.field("sent", pa.string())]
    + [f for f in ANSWER_SCHEMA if f.name != "error"]
)
"""One stored answer: the key, the text sent, then the answer's fields (``retries`` stored as 0)."""
_ANSWER_FIELDS = [f.name for f in ENTRY_SCHEMA][2:]
_SEED = 7
_ID_BITS = 32
_ID_MASK = np.uint64((1 << _ID_BITS) - 1)
FILE_ROWS = 1_000_000
"""Answers in a file before it is closed and mapped."""
MERGE_ABOVE = 32
"""Files in a namespace before closing the store merges them."""


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
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if about is not None and not (self.folder / "about.json").exists():
                write_text_atomic(json.dumps(about, indent=2, ensure_ascii=False), self.folder / "about.json")
            for path in sorted(self.folder.glob("seg-*.arrows")):
                for table, mapping in _map_file(path):
                    self._add_segment(table, mapping)
            self._release()  # indexing read every stored key once
        except OSError as exc:
            raise OutputError(
                f"cannot open the result store {self.folder}: {exc}", hint="use --no-cache"
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
            self._writer.write_table(table)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise OutputError(
                f"cannot write the result store {self.folder}: {exc}", hint="use --no-cache"
            ) from None
        self._file_rows += table.num_rows
        if self.within_run:
            if self._unmapped is None:
                self._unmapped = len(self._segments)
            self._add_segment(table)
        if self._file_rows >= self.max_file_rows:
            self._close_file()

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
                _merge(self.folder, files, self.max_file_rows)
        except OSError:
            pass  # merging is housekeeping; the next run tries again

    def _open_file(self) -> None:
        self._path = self.folder / f"seg-{time.time_ns():020d}-{os.getpid()}.arrows"
        self._file = self._path.open("xb")
        fcntl.flock(self._file, fcntl.LOCK_EX)  # tells a merging run to leave this file alone
        self._writer = pa.ipc.new_stream(self._file, ENTRY_SCHEMA)
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
        handle.close()
        first, self._unmapped = self._unmapped, None
        if first is None:
            return  # nothing of this file is held in memory
        mapped = _map_file(path)
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


def describe_stores(root: str | Path) -> list[dict]:
    """Every namespace under a store's root: what it holds answers of, how many, and their size."""
    found = []
    for folder in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        files = sorted(folder.glob("seg-*.arrows"))
        about = folder / "about.json"
        found.append(
            {
                "namespace": folder.name,
                "entries": sum(t.num_rows for f in files for t, _ in _map_file(f)),
                "bytes": sum(f.stat().st_size for f in files),
                "files": len(files),
                "last_written": max((f.stat().st_mtime for f in files), default=None),
                "about": json.loads(about.read_text(encoding="utf-8")) if about.exists() else {},
            }
        )
    return found


def _map_file(path: Path) -> list[tuple[pa.Table, mmap.mmap]]:
    """A file's whole record batches, read in place (no copy), each as a table with the mapping.

    Reading stops at the first batch that is not whole (a crash cut it, or its writer is still at
    it); a file that is not an answer file at all gives nothing: it is ignored, never trusted.
    """
    try:
        with path.open("rb") as fh:
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        reader = pa.ipc.open_stream(pa.py_buffer(mapping))
    except (pa.ArrowInvalid, OSError, ValueError):
        return []
    if not reader.schema.equals(ENTRY_SCHEMA):
        return []
    tables = []
    while True:
        try:
            batch = reader.read_next_batch()
        except (StopIteration, pa.ArrowInvalid, OSError):
            break
        tables.append((pa.Table.from_batches([batch], schema=ENTRY_SCHEMA), mapping))
    return tables


def _merge(folder: Path, files: list[Path], batch_rows: int) -> None:
    """Write the answers of ``files`` nobody is writing into one new file, then drop them. Its
    batches hold about ``batch_rows`` answers each, so a lookup visits few of them."""
    with (folder / ".merge.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another run is merging
        target = folder / f"seg-{time.time_ns():020d}-{os.getpid()}-merged.arrows"
        tmp = folder / f".{target.name}.tmp"
        merged, handles, pending = [], [], []
        try:
            with tmp.open("wb") as sink, pa.ipc.new_stream(sink, ENTRY_SCHEMA) as writer:
                for path in files:
                    try:
                        handle = path.open("rb")
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except (BlockingIOError, FileNotFoundError):
                        continue  # a run is still writing it (or merged it away)
                    handles.append(handle)
                    for table, _ in _map_file(path):
                        pending.append(table)
                        if sum(t.num_rows for t in pending) >= batch_rows:
                            writer.write_table(pa.concat_tables(pending).combine_chunks())
                            pending = []
                    merged.append(path)
                if pending:
                    writer.write_table(pa.concat_tables(pending).combine_chunks())
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            if len(merged) < 2:
                tmp.unlink()
                return
            os.replace(tmp, target)
            for path in merged:
                path.unlink(missing_ok=True)
        finally:
            tmp.unlink(missing_ok=True)
            for handle in handles:
                handle.close()
