"""Parquet in, Parquet out.

Reading is planned from Parquet footers alone: every chunk is a (file, first row, row count)
triple, read by touching only the row groups it overlaps, so a resumed run jumps straight to its
first unfinished chunk without reading what came before. A row group is decoded once however the
chunks fall on it: the reader keeps the last one it decoded while the next chunk still needs it,
so a file written as one huge row group costs one decode, not one per chunk (and memory holds one
row group's columns, besides the chunk). CSV, TSV and JSON Lines inputs are read through their
Parquet copies, and Hive partition values (``country=PL/``) become columns, constant per file
(see ``pipeline/sources.py``).
Files may differ in how wide a column's type is (string and large_string, int32 and int64): the
plan settles on the wider one and every chunk is read as it, so all parts share one schema.
A chunk's read checks that the file is still the one planned and verifies page checksums where
the writer stored them; a damaged page names the file and the rows it holds.
Writing is atomic and durable: a part is written under a temporary name, flushed to disk, renamed,
and the rename itself flushed (the folder is synced).
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import DuplicateIdError, InputFormatError, InputNotFoundError, OutputError
from pipeline.sources import Source, TextSource, convert, find_sources, text_format


@dataclass(frozen=True)
class InputFile:
    path: Path | storage.ObjectPath
    rows: int
    size: int
    footer_sha: str
    """sha256 of the Parquet footer (schema, row groups, column statistics)."""
    schema: pa.Schema
    row_group_rows: tuple[int, ...]
    read_types: tuple[tuple[str, pa.DataType], ...] = ()
    """Columns read as a wider type than the file's own, so that every file gives the plan's."""
    partition: tuple[tuple[str, str | None], ...] = ()
    """Hive partition columns and this file's values: string columns, the same on every row, at
    the end of ``schema``."""
    text: TextSource | None = None
    """For a CSV, TSV or JSON Lines input: the file, and the Parquet copy read in its place (which
    ``size``, ``footer_sha`` and the row groups describe)."""

    @property
    def read_path(self) -> Path:
        return self.text.parquet if self.text else self.path

    @property
    def identity(self) -> dict:
        if self.text:  # the source's bytes, so an edit of the file is a change of input
            return {"path": str(self.path), "rows": self.rows, **self.text.identity}
        return {"path": str(self.path), "rows": self.rows, "size": self.size, "footer": self.footer_sha}


@dataclass(frozen=True)
class Chunk:
    index: int
    file_index: int
    start: int
    rows: int


def find_inputs(spec: str) -> list[Path]:
    """A file, a folder (its data files, and those of its ``name=value`` subfolders) or a glob,
    in sorted order; ``~`` is expanded."""
    return [s.path for s in find_sources(spec)]


def open_inputs(spec: str, copies: Path) -> list[InputFile]:
    """The inputs ``spec`` names, described; text formats are converted into ``copies`` first."""
    return describe(find_sources(spec), copies)


def describe(paths: list[Path | Source], copies: Path | None = None) -> list[InputFile]:
    """Each file's footer facts (a CSV, TSV or JSON Lines file's from its Parquet copy, made in
    ``copies``), with its partition columns."""
    files = []
    for item in paths:
        source = item if isinstance(item, Source) else Source(Path(item))
        path = source.path
        text = convert(path, copies) if copies is not None and text_format(path) else None
        read_path = text.parquet if text else path
        try:
            # one handle for the footer read and its hash, so the two always describe one file
            with storage.open_input(read_path) as handle:
                meta = pq.read_metadata(handle)
                size, footer_sha = handle.size(), _footer_sha(handle)
        except FileNotFoundError:
            raise InputNotFoundError(
                f"{read_path} disappeared while the inputs were being read",
                hint="check that nothing else moves or deletes the input files, then rerun",
            ) from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputFormatError(
                f"{read_path} is not a readable Parquet file ({exc})",
                hint="name CSV, TSV and JSON Lines files .csv, .tsv, .jsonl or .ndjson (with .gz, "
                ".zst or .bz2 when compressed), or point 'input:' at Parquet files only",
            ) from None
        schema = meta.schema.to_arrow_schema()
        for name, _ in source.partition:
            if name in schema.names:
                raise InputFormatError(
                    f"{path}: column '{name}' is both in the file and a partition folder ({name}=...)",
                    hint="rename the folder level or the column, so the two can't disagree",
                )
            schema = schema.append(pa.field(name, pa.string()))
        files.append(
            InputFile(
                path=path,
                rows=meta.num_rows,
                size=size,
                footer_sha=footer_sha,
                schema=schema,
                row_group_rows=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
                partition=source.partition,
                text=text,
            )
        )
    return files


def _footer_sha(source: pa.NativeFile) -> str:
    """sha256 of a Parquet file's footer: it holds the schema and per row-group statistics, so any
    edit of the data changes it, and hashing it costs one small read."""
    size = source.size()
    footer_len = int.from_bytes(source.read_at(4, max(0, size - 8)), "little")
    start = max(0, size - 8 - footer_len)
    return hashlib.sha256(source.read_at(size - start, start)).hexdigest()[:16]


def check_columns(files: list[InputFile], columns: list[str]) -> dict[str, pa.DataType]:
    """Every needed column exists in every file, with one type across files: the same, or types
    that one type holds without loss (string and large_string, binary and large_binary, integer or
    float widths, a dictionary and its values), which is then the column's type."""
    types: dict[str, pa.DataType] = {}
    for f in files:
        for col in columns:
            if col not in f.schema.names:
                raise InputFormatError(
                    f"{f.path}: column '{col}' not found; it has {f.schema.names}",
                    hint="fix text_column / text_template / id_column / keep_columns in the job",
                )
            typ = f.schema.field(col).type
            common = _common_type(types[col], typ) if col in types else typ
            if common is None:
                other = next(
                    (g for g in files if _common_type(g.schema.field(col).type, typ) is None), files[0]
                )
                raise InputFormatError(
                    f"{f.path}: column '{col}' is {typ}, but {other.path} has {other.schema.field(col).type}",
                    hint="give all input files the same schema (string and large_string, or integer "
                    "widths, may be mixed; other types may not)",
                )
            types[col] = common
    return types


def with_types(files: list[InputFile], types: dict[str, pa.DataType]) -> list[InputFile]:
    """The files, each set to be read with ``types`` (what :func:`check_columns` settled on)."""
    return [
        replace(f, read_types=tuple((c, t) for c, t in types.items() if f.schema.field(c).type != t))
        for f in files
    ]


def _common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type both ``a`` and ``b`` cast to without loss, or None. Text and bytes take the large
    (64-bit offset) variant: a chunk cast to it can't overflow, whatever its size."""
    if a == b:
        return a
    if pa.types.is_dictionary(a) or pa.types.is_dictionary(b):
        return _common_type(
            a.value_type if pa.types.is_dictionary(a) else a, b.value_type if pa.types.is_dictionary(b) else b
        )
    for family, wide in ((_is_text, pa.large_string()), (_is_bytes, pa.large_binary())):
        if family(a) and family(b):
            return wide
    if pa.types.is_floating(a) and pa.types.is_floating(b):
        return max(a, b, key=lambda t: t.bit_width)
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        signed = [t for t in (a, b) if pa.types.is_signed_integer(t)]
        if len(signed) != 1:
            return max(a, b, key=lambda t: t.bit_width)
        unsigned = b if signed[0] is a else a
        # a signed type holds an unsigned one of half its width
        return _SIGNED.get(max(signed[0].bit_width, 2 * unsigned.bit_width))
    return None


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


_SIGNED = {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}


def plan_chunks(files: list[InputFile], chunk_rows: int) -> list[Chunk]:
    """Chunks never span files, so a chunk's rows are one contiguous slice of one file."""
    chunks = []
    for fi, f in enumerate(files):
        for start in range(0, f.rows, chunk_rows):
            chunks.append(Chunk(len(chunks), fi, start, min(chunk_rows, f.rows - start)))
    return chunks


def read_chunk(file: InputFile, chunk: Chunk, columns: list[str]) -> pa.Table:
    """Read rows [start, start + rows) of one file, touching only the row groups they span, as the
    plan's types. To read several chunks, keep one :class:`ChunkReader`."""
    return ChunkReader(columns).read(file, chunk)


class ChunkReader:
    """Reads chunks of input files, decoding each row group once however the chunks fall on it.

    A chunk decodes the row groups it overlaps that it can't take from the last one decoded; that
    one is kept while the chunk ended inside it, so the chunks that follow take their rows from it.
    A file written as one row group of millions of rows is decoded once, not once per chunk; the
    price is that group's columns in memory until the chunks are past it. Chunks read out of order
    (a resumed run starting mid-file, a finished chunk's failed rows asked again) cost at most
    one decode of the groups they span. Each read checks the file is still the one planned.
    """

    def __init__(self, columns: list[str]) -> None:
        self.columns = list(columns)
        self.decoded = 0
        """Row groups decoded so far."""
        self._kept: tuple[tuple[str, str, int], pa.Table] | None = None

    def read(self, file: InputFile, chunk: Chunk) -> pa.Table:
        partition = dict(file.partition)
        own = [c for c in self.columns if c not in partition]
        missing = [c for c in own if c not in file.schema.names]
        if missing:  # not a damaged page: say so before a read would fail
            raise InputFormatError(
                f"{file.path}: column(s) {missing} not found; it has {file.schema.names}",
                hint="fix text_column / text_template / id_column / keep_columns in the job",
            )
        end, pieces, offset = chunk.start + chunk.rows, [], 0
        spans = []
        for gi, n in enumerate(file.row_group_rows):
            if offset < end and offset + n > chunk.start:
                spans.append((gi, offset, n))
            offset += n
        if not spans:
            return cast_to_plan(file, file.schema.empty_table().select(self.columns))
        kept, self._kept = self._kept, None
        with _open_planned(file, chunk) as parquet:
            for gi, first, n in spans:
                key = (str(file.path), file.footer_sha, gi)
                if kept is not None and kept[0] == key:
                    group = kept[1]
                else:
                    try:
                        group = parquet.read_row_group(gi, columns=own)
                    except (OSError, pa.ArrowException) as exc:
                        raise _damaged(file, gi, exc) from None
                    self.decoded += 1
                lo, hi = max(chunk.start, first), min(end, first + n)
                pieces.append(group.slice(lo - first, hi - lo))
                if hi < first + n:  # the chunk ends inside this group: the next one starts there
                    self._kept = (key, group)
        table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        if table.num_rows != chunk.rows:
            raise InputFormatError(
                f"{file.path}: expected {chunk.rows} rows from row {chunk.start}, read {table.num_rows}",
                hint="the file changed during the run; start over with --restart",
            )
        for name, value in file.partition:
            if name in self.columns:
                table = table.append_column(name, pa.repeat(pa.scalar(value, pa.string()), table.num_rows))
        return cast_to_plan(file, table.select(self.columns))


def cast_to_plan(file: InputFile, table: pa.Table) -> pa.Table:
    """A table read from ``file`` with the plan's column types (see :func:`with_types`)."""
    if not file.read_types:
        return table
    wanted = dict(file.read_types)
    return table.cast(pa.schema([pa.field(f.name, wanted.get(f.name, f.type)) for f in table.schema]))


@contextmanager
def _open_planned(file: InputFile, chunk: Chunk | None = None) -> Iterator[pq.ParquetFile]:
    """The file, opened once and checked to be the one planned: a file removed or rewritten during
    a run must stop it with its name, never label rows other than the planned ones. Reading from
    the handle that was checked keeps a rename over it, mid-read, from mixing two files."""
    if file.text is not None:
        _check_text_source(file, chunk)
    try:
        source = storage.open_input(file.read_path)
    except FileNotFoundError:
        if file.text is not None:
            raise InputNotFoundError(
                f"the Parquet copy of {file.path} ({file.read_path}) is gone: it was there when "
                "this run was planned",
                hint="rerun: the copy is made again (finished chunks are kept)",
            ) from None
        raise InputNotFoundError(
            f"input file {file.path} is gone: it was there when this run was planned",
            hint="put it back and rerun (finished chunks are kept), or rerun with --restart to "
            "label the input as it is now",
        ) from None
    except OSError as exc:
        raise InputFormatError(
            f"input file {file.read_path} can't be opened: {exc}", hint="check its permissions"
        ) from None
    with source:
        size, footer_sha = source.size(), _footer_sha(source)
        if (size, footer_sha) != (file.size, file.footer_sha):
            raise _changed(file, source, chunk)
        # Without page checksums a flipped byte among a page's values often still decodes, into
        # wrong text. Only pages whose writer stored one are checked (parquet-java, so Spark and
        # Hive, by default; pyarrow with write_page_checksum): about 20 ns a row, a fifth of
        # decoding a zstd page and under 1% of a run's time around the model.
        yield pq.ParquetFile(source, page_checksum_verification=True)


def _check_text_source(file: InputFile, chunk: Chunk | None) -> None:
    """A text input is read from its copy, but it is the input: one removed or edited during a
    run stops the run as a Parquet input would (its size and modification time are compared;
    its hash, once per run, when the run is planned)."""
    try:
        now = file.path.stat()
    except FileNotFoundError:
        raise InputNotFoundError(
            f"input file {file.path} is gone: it was there when this run was planned",
            hint="put it back and rerun (finished chunks are kept), or rerun with --restart to "
            "label the input as it is now",
        ) from None
    if (now.st_size, now.st_mtime_ns) != (file.text.size, file.text.mtime_ns):
        raise InputFormatError(
            f"input file {file.path} changed after this run was planned: its size or "
            "modification time differ",
            hint="put the original back and rerun (finished chunks are kept), or rerun with "
            "--restart to label the file as it is now",
        )


def _changed(file: InputFile, source: pa.NativeFile, chunk: Chunk | None) -> InputFormatError:
    try:
        rows = pq.ParquetFile(source).metadata.num_rows
    except (OSError, pa.ArrowException):
        rows = None
    if chunk is not None and rows != file.rows:
        what = f"expected {chunk.rows} rows from row {chunk.start} of {file.rows}; "
        what += f"it now has {rows} rows" if rows is not None else "it is no longer readable Parquet"
    else:
        what = "its size or footer differ (the file was replaced or rewritten)"
    return InputFormatError(
        f"input file {file.path} changed after this run was planned: {what}",
        hint="put the original back and rerun (finished chunks are kept), or rerun with --restart "
        "to label the file as it is now",
    )


def _damaged(file: InputFile, group: int, exc: Exception) -> InputFormatError:
    """Name the row group that can't be read, and its rows (groups are read one at a time, so the
    one that failed is known)."""
    first = sum(file.row_group_rows[:group])
    last = first + file.row_group_rows[group] - 1
    where = f"row group {group}"
    reason = " ".join(str(exc).split())
    if file.text is not None:
        return InputFormatError(
            f"the Parquet copy of input file {file.path} ({file.read_path}) is damaged: {where} "
            f"(rows {first}-{last}) can't be read: {reason}",
            hint="delete the copy and rerun: it is made again from the file (finished chunks are kept)",
        )
    return InputFormatError(
        f"input file {file.path} is damaged: {where} (rows {first}-{last}) can't be read: {reason}",
        hint="copy an undamaged version of the file over it and rerun (finished chunks are kept "
        "if it is the same file; if its content differs, rerun with --restart)",
    )


def check_ids(files: list[InputFile], id_column: str) -> None:
    """Refuse null or repeated ids across all input files before any model work.

    The ids are read in batches and only a 64-bit hash of each is kept; equal hashes are then
    confirmed (or not) on the ids themselves in a last pass. Memory is bounded whatever the row
    count: an input of more than ``_IDS_PER_PASS`` rows is checked in several passes over its id
    column, each keeping the hashes of one residue class (``hash % passes``), so equal ids always
    meet in the same pass.
    """
    import numpy as np
    import polars as pl

    def batches():
        for f in files:
            partition = dict(f.partition)
            if id_column in partition:  # one value for the whole file
                for start in range(0, f.rows, 1 << 20):
                    n = min(1 << 20, f.rows - start)
                    yield pl.Series(id_column, pa.repeat(pa.scalar(partition[id_column], pa.string()), n))
                continue
            with _open_planned(f) as parquet:
                for gi in range(len(f.row_group_rows)):
                    try:
                        for batch in parquet.iter_batches(1 << 20, [gi], columns=[id_column]):
                            yield pl.Series(cast_to_plan(f, pa.Table.from_batches([batch])).column(0))
                    except (OSError, pa.ArrowException) as exc:
                        raise _damaged(f, gi, exc) from None

    passes = max(1, -(-sum(f.rows for f in files) // _IDS_PER_PASS))
    found = []
    for current in range(passes):
        nulls, hashes = 0, []
        for ids in batches():
            nulls += ids.null_count()
            hashed = ids.hash(seed=_ID_SEED).to_numpy()
            hashes.append(hashed[hashed % passes == current] if passes > 1 else hashed)
        if nulls:
            raise DuplicateIdError(
                f"id column '{id_column}' has {nulls} null value(s)",
                hint="fill them, or drop id_column to use ids made from file name and row number",
            )
        if not hashes:
            return
        sorted_hashes = np.sort(np.concatenate(hashes))
        del hashes
        found.append(np.unique(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]]))
        del sorted_hashes
    shared = np.concatenate(found)
    if not len(shared):
        return
    shared_set = pl.Series(shared).implode()
    candidates = pl.concat([ids.filter(ids.hash(seed=_ID_SEED).is_in(shared_set)) for ids in batches()])
    dupes = candidates.value_counts(name="n").filter(pl.col("n") > 1).sort(candidates.name).head(5)
    if dupes.height:
        examples = ", ".join(f"{v!r} x{n}" for v, n in dupes.iter_rows())
        raise DuplicateIdError(
            f"id column '{id_column}' repeats values, e.g. {examples}",
            hint="ids must be unique across all input files; deduplicate the input, or drop "
            "id_column to use ids made from file name and row number",
        )


_ID_SEED = 11
_IDS_PER_PASS = 8 << 20
"""Id hashes held at once while checking ids: 64 MB, and as much again while they are sorted."""


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file so that a reader (or a resumed run) never sees half of it."""
    _write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_text_atomic(text: str, path: Path) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync_dir(path: Path | str) -> None:
    """Flush a folder's entries to disk: until then a rename, a new file or a removal in it can be
    lost to a power cut, even when the files' own data was synced."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # A file system that can't sync a folder (some FUSE and network mounts) answers EINVAL:
        # it offers nothing stronger to ask for, and the rename is done.
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """Write to a temporary name, fsync, rename over the target, then fsync the folder so that
    the rename survives a power cut."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"could not write {path}: {exc}", hint="check free disk space and permissions"
        ) from None
