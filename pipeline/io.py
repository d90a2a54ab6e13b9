"""Parquet in, Parquet out.

Reading is planned from Parquet footers alone: every chunk is a (file, first row, row count)
triple, read by touching only the row groups it overlaps, so memory follows ``chunk_rows`` and a
resumed run jumps straight to its first unfinished chunk without reading what came before.
Writing is atomic: a part is written under a temporary name, flushed to disk, then renamed.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DuplicateIdError, InputFormatError, InputNotFoundError, OutputError


@dataclass(frozen=True)
class InputFile:
    path: Path
    rows: int
    size: int
    footer_sha: str
    """sha256 of the Parquet footer (schema, row groups, column statistics)."""
    schema: pa.Schema
    row_group_rows: tuple[int, ...]

    @property
    def identity(self) -> dict:
        return {"path": str(self.path), "rows": self.rows, "size": self.size, "footer": self.footer_sha}


@dataclass(frozen=True)
class Chunk:
    index: int
    file_index: int
    start: int
    rows: int


def find_inputs(spec: str) -> list[Path]:
    """A file, a folder (its ``*.parquet`` files) or a glob, in sorted order."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.glob("*.parquet") if p.is_file())
        where = f"folder {path}"
    else:
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        where = f"path or glob {spec!r}"
    if not found:
        raise InputNotFoundError(
            f"input: no Parquet file at {where}",
            hint="check 'input:' in the job file (relative paths start at the current directory)",
        )
    return found


def describe(paths: list[Path]) -> list[InputFile]:
    files = []
    for path in paths:
        try:
            meta = pq.read_metadata(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputFormatError(
                f"{path} is not a readable Parquet file ({exc})",
                hint="convert it to Parquet first, or point 'input:' at Parquet files only",
            ) from None
        size = path.stat().st_size
        # The footer (its length is in the last 8 bytes) holds the schema and per row-group
        # statistics, so any edit of the data changes it; hashing it costs one small read.
        with path.open("rb") as fh:
            fh.seek(size - 8)
            footer_len = int.from_bytes(fh.read(4), "little")
            fh.seek(max(0, size - 8 - footer_len))
            footer_sha = hashlib.sha256(fh.read()).hexdigest()[:16]
        files.append(
            InputFile(
                path=path,
                rows=meta.num_rows,
                size=size,
                footer_sha=footer_sha,
                schema=meta.schema.to_arrow_schema(),
                row_group_rows=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
            )
        )
    return files


def check_columns(files: list[InputFile], columns: list[str]) -> dict[str, pa.DataType]:
    """Every needed column exists in every file, with one type across files."""
    types: dict[str, pa.DataType] = {}
    for f in files:
        for col in columns:
            if col not in f.schema.names:
                raise InputFormatError(
                    f"{f.path}: column '{col}' not found; it has {f.schema.names}",
                    hint="fix text_column / text_template / id_column / keep_columns in the job",
                )
            typ = f.schema.field(col).type
            if col in types and types[col] != typ:
                raise InputFormatError(
                    f"{f.path}: column '{col}' is {typ}, but {files[0].path} has {types[col]}",
                    hint="give all input files the same schema",
                )
            types[col] = typ
    return types


def plan_chunks(files: list[InputFile], chunk_rows: int) -> list[Chunk]:
    """Chunks never span files, so a chunk's rows are one contiguous slice of one file."""
    chunks = []
    for fi, f in enumerate(files):
        for start in range(0, f.rows, chunk_rows):
            chunks.append(Chunk(len(chunks), fi, start, min(chunk_rows, f.rows - start)))
    return chunks


def read_chunk(file: InputFile, chunk: Chunk, columns: list[str]) -> pa.Table:
    """Read rows [start, start + rows) of one file, touching only the row groups they span."""
    groups, offset, first_group_start = [], 0, None
    end = chunk.start + chunk.rows
    for gi, n in enumerate(file.row_group_rows):
        if offset < end and offset + n > chunk.start:
            groups.append(gi)
            if first_group_start is None:
                first_group_start = offset
        offset += n
    if not groups:
        return file.schema.empty_table().select(columns)
    table = pq.ParquetFile(file.path).read_row_groups(groups, columns=columns)
    table = table.slice(chunk.start - first_group_start, chunk.rows)
    if table.num_rows != chunk.rows:
        raise InputFormatError(
            f"{file.path}: expected {chunk.rows} rows from row {chunk.start}, read {table.num_rows}",
            hint="the file changed during the run; start over with --restart",
        )
    return table


def check_ids(files: list[InputFile], id_column: str) -> None:
    """Refuse null or repeated ids across all input files before any model work.

    Memory stays at 8 bytes per row: the ids are read in batches and only a 64-bit hash of each is
    kept; equal hashes are then confirmed (or not) on the ids themselves in a second pass.
    """
    import numpy as np
    import polars as pl

    def batches():
        for f in files:
            for batch in pq.ParquetFile(f.path).iter_batches(batch_size=1 << 20, columns=[id_column]):
                yield pl.Series(batch.column(0))

    nulls, hashes = 0, []
    for ids in batches():
        nulls += ids.null_count()
        hashes.append(ids.hash(seed=_ID_SEED).to_numpy())
    if nulls:
        raise DuplicateIdError(
            f"id column '{id_column}' has {nulls} null value(s)",
            hint="fill them, or drop id_column to use ids made from file name and row number",
        )
    if not hashes:
        return
    sorted_hashes = np.sort(np.concatenate(hashes))
    del hashes
    shared = np.unique(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]])
    del sorted_hashes
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


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file so that a reader (or a resumed run) never sees half of it."""
    _write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_text_atomic(text: str, path: Path) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_atomic(path: Path, write) -> None:
    """Write to a temporary name, fsync, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"could not write {path}: {exc}", hint="check free disk space and permissions"
        ) from None
