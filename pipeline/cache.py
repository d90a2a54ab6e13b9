"""A result cache that outlives runs: answers on disk, keyed by the exact text sent.

Layout (``$LABELMILL_HOME/cache/`` unless the job's ``cache.path`` says otherwise)::

    cache/
      <namespace>/                  one folder per job identity (see below)
        seg-<time>-<pid>.arrow      answers, one segment per committed chunk (Arrow IPC, read mapped)

The namespace is a digest of everything that decides an answer besides the text: the model (with
its checkpoint fingerprint), the prompt, the labels or attributes, sampling and the engine settings
that change outputs. Each entry holds the text exactly as it was sent (after cleaning and
truncation) and the answer as the backend returned it, so an answer from the cache is parsed like
a fresh one, and a cached run's output equals an uncached one's. Tomorrow's nightly run of the same
job asks the model only about new texts. Failed requests are never stored.

Safe against a crash: a segment is written under a temporary name, flushed and renamed, so it is
there whole or not at all. New answers are written once about a million have gathered (and when
the run ends), so a crash loses at most those from the cache; the run's own output, which a
resumed run reads, is committed chunk by chunk and loses nothing. Several runs may share a
cache: each writes its own segments and sees those that existed when it opened the cache, plus its
own. When a namespace holds many segments, closing the cache merges them into one (under a lock;
a crash mid-merge leaves duplicates, which are harmless).

The index, in memory, holds 8 bytes per entry: a 32-bit hash of the text and the entry's number,
sorted. A hit is confirmed by comparing the stored text with the text asked, so two texts that
share a hash are never confused. At 10 million cached answers the index takes 80 MB; the segments
are memory-mapped, so the operating system pages them in and out as lookups touch them.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.backends.base import ANSWER_SCHEMA
from pipeline.errors import OutputError

ENTRY_SCHEMA = pa.schema([pa.field("sent", pa.string()), *[f for f in ANSWER_SCHEMA if f.name != "error"]])
"""One cached answer: the text sent, then the answer's fields (``retries`` is stored as 0)."""
_ANSWER_FIELDS = [f.name for f in ENTRY_SCHEMA][1:]
_SEED = 7
_ID_BITS = 32
_ID_MASK = np.uint64((1 << _ID_BITS) - 1)
_FLUSH_ROWS = 1_000_000  # answers held in memory before they are written as one segment
_MERGE_ABOVE = 32  # segments in a namespace before closing the cache merges them


def text_hashes(texts: pl.Series) -> np.ndarray:
    """32-bit hashes (as uint64) of texts, for the index only: they are never stored."""
    return texts.hash(seed=_SEED).to_numpy() >> np.uint64(64 - _ID_BITS)


class ResultCache:
    def __init__(self, root: str | Path, namespace: str) -> None:
        self.root = Path(root)
        self.namespace = namespace
        self.folder = self.root / namespace
        self._segments: list[pa.Table] = []
        self._mappings: list[mmap.mmap | None] = []
        """Each segment's file mapping; None while it is held in memory only."""
        self._starts: list[int] = []
        self._entries = 0
        self._index = np.empty(0, dtype=np.uint64)
        self._unwritten: int | None = None
        """Index of the first segment held only in memory (added since the last flush)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.folder.glob("seg-*.arrow")):
                mapped = _map_segment(path)
                if mapped is not None:
                    self._add_segment(*mapped)
            self._release()  # indexing read every stored text once
        except OSError as exc:
            raise OutputError(
                f"cannot open the result cache {self.folder}: {exc}", hint="use --no-cache"
            ) from None

    def __len__(self) -> int:
        return self._entries

    def lookup(self, texts: pl.Series) -> tuple[np.ndarray, pa.Table]:
        """Which of ``texts`` have a cached answer: their positions in ``texts`` (ascending), and
        their answers (``ANSWER_SCHEMA``) in that order."""
        if not self._entries or not len(texts):
            return np.empty(0, dtype=np.int64), ANSWER_SCHEMA.empty_table()
        hashes = text_hashes(texts)
        position = np.searchsorted(self._index, hashes << np.uint64(_ID_BITS))
        found = np.full(len(texts), -1, dtype=np.int64)
        open_ = np.arange(len(texts))
        while len(open_):  # candidates with the same hash sit side by side; usually one round
            at = position[open_]
            inside = at < len(self._index)
            open_, at = open_[inside], at[inside]
            candidate = self._index[at]
            same_hash = (candidate >> np.uint64(_ID_BITS)) == hashes[open_]
            open_, at, candidate = open_[same_hash], at[same_hash], candidate[same_hash]
            entries = (candidate & _ID_MASK).astype(np.int64)
            stored = self._take(entries, ["sent"]).column("sent")
            equal = (pl.Series(stored) == texts.gather(open_)).fill_null(False).to_numpy()
            found[open_[equal]] = entries[equal]
            open_ = open_[~equal]
            position[open_] += 1
        hits = np.flatnonzero(found >= 0)
        answers = self._take(found[hits], _ANSWER_FIELDS).combine_chunks()
        self._release()
        answers = answers.append_column("error", pa.nulls(len(hits), pa.string()))
        return hits, answers.select([f.name for f in ANSWER_SCHEMA]).cast(ANSWER_SCHEMA)

    def add(self, texts: pl.Series, answers: pa.Table) -> None:
        """Store answers (``ANSWER_SCHEMA``) to ``texts``; failed ones are skipped. They are
        found by lookups at once, and reach the disk in segments of about ``_FLUSH_ROWS``."""
        columns = {"sent": texts.to_arrow().cast(pa.string())}
        columns |= {name: answers.column(name) for name in _ANSWER_FIELDS}
        columns["retries"] = pa.array(np.zeros(len(answers), dtype=np.int32))
        table = pa.Table.from_arrays([columns[f.name] for f in ENTRY_SCHEMA], schema=ENTRY_SCHEMA)
        table = table.filter(pc.is_null(answers.column("error")))
        if not table.num_rows:
            return
        if self._unwritten is None:
            self._unwritten = len(self._segments)
        self._add_segment(table)
        if self._entries - self._starts[self._unwritten] >= _FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the answers added since the last flush as one segment, and map it back."""
        if self._unwritten is None:
            return
        first, self._unwritten = self._unwritten, None
        table = pa.concat_tables(self._segments[first:])
        path = self.folder / f"seg-{time.time_ns():020d}-{os.getpid()}.arrow"
        try:
            _write_segment(table, path)
            mapped = _map_segment(path)
            if mapped is None:
                raise OSError("the segment just written cannot be read back")
        except OSError as exc:
            raise OutputError(
                f"cannot write the result cache {self.folder}: {exc}", hint="use --no-cache"
            ) from None
        # the same entries, numbered the same, now read from the disk instead of held in memory
        self._segments[first:] = [mapped[0]]
        self._mappings[first:] = [mapped[1]]
        del self._starts[first + 1 :]

    def stats(self) -> dict:
        """Entries and bytes on disk: the whole cache, and this job's namespace."""
        entries = size = 0
        for path in self.root.glob("*/seg-*.arrow"):
            table = _read_segment(path)
            entries += table.num_rows if table is not None else 0
            size += path.stat().st_size
        return {
            "path": str(self.root),
            "entries": entries,
            "entries_for_this_job": self._entries,
            "bytes": size,
        }

    def close(self) -> None:
        """Write what is still in memory; merge the namespace's segments when there are many."""
        self.flush()
        self._segments.clear()
        self._mappings.clear()
        try:
            segments = sorted(self.folder.glob("seg-*.arrow"))
            if len(segments) > _MERGE_ABOVE:
                _merge(self.folder, segments)
        except OSError:
            pass  # merging is housekeeping; the next run tries again

    def _add_segment(self, table: pa.Table, mapping: mmap.mmap | None = None) -> None:
        ids = np.arange(self._entries, self._entries + table.num_rows, dtype=np.uint64)
        keys = (text_hashes(pl.Series(table.column("sent"))) << np.uint64(_ID_BITS)) | ids
        # Two sorted runs: a stable sort merges them in one pass.
        index = np.concatenate([self._index, np.sort(keys)])
        index.sort(kind="stable")
        self._index = index
        self._segments.append(table)
        self._mappings.append(mapping)
        self._starts.append(self._entries)
        self._entries += table.num_rows

    def _release(self) -> None:
        """Let go of the segment pages lookups touched: they stay in the operating system's file
        cache, but stop counting as this process's memory, which would otherwise grow to the size
        of the cache."""
        for mapping in self._mappings:
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)

    def _take(self, entries: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows of the given entry numbers, in that order."""
        if not len(entries):
            return pa.schema([ENTRY_SCHEMA.field(c) for c in columns]).empty_table()
        segment = np.searchsorted(np.asarray(self._starts), entries, side="right") - 1
        order = np.argsort(segment, kind="stable")
        parts, bounds = [], np.flatnonzero(np.diff(segment[order])) + 1
        for run in np.split(order, bounds):
            s = segment[run[0]]
            rows = pa.array(entries[run] - self._starts[s])
            parts.append(self._segments[s].select(columns).take(rows))  # a copy, out of the mapping
            if self._mappings[s] is not None:
                self._mappings[s].madvise(mmap.MADV_DONTNEED)  # see _release
        taken = pa.concat_tables(parts).combine_chunks()
        return taken.take(pa.array(np.argsort(order)))


def _read_segment(path: Path) -> pa.Table | None:
    mapped = _map_segment(path)
    return mapped[0] if mapped else None


def _map_segment(path: Path) -> tuple[pa.Table, mmap.mmap] | None:
    """A segment read in place (no copy), with its mapping; None if it is not a whole segment."""
    try:
        with path.open("rb") as fh:
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        table = pa.ipc.open_file(pa.py_buffer(mapping)).read_all()
    except (pa.ArrowInvalid, OSError, ValueError):
        return None  # a foreign or broken file: ignored, never trusted
    return (table, mapping) if table.schema.equals(ENTRY_SCHEMA) else None


def _write_segment(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, ENTRY_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=1 << 20)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _merge(folder: Path, segments: list[Path]) -> None:
    with (folder / ".merge.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another run is merging
        segments = [p for p in segments if p.exists()]
        target = folder / f"seg-{time.time_ns():020d}-{os.getpid()}-merged.arrow"
        tmp = target.with_name(f".{target.name}.tmp")
        merged = []
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, ENTRY_SCHEMA) as writer:
            for path in segments:
                table = _read_segment(path)
                if table is not None:
                    writer.write_table(table, max_chunksize=1 << 20)
                    merged.append(path)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        for path in merged:
            path.unlink(missing_ok=True)
