"""Where a job's rows come from: finding the input files, and reading the text formats.

    input: a file, a folder or a glob (``~`` expanded) -> the files, in sorted order, each with
           the Hive partition values of its folders (``country=PL/``)
    a CSV, TSV or JSON Lines file -> checked line by line -> a Parquet copy, made once per content

Everything after this reads Parquet, so chunk planning, fingerprints and resume work alike for
every format. A text file's copy is named by the SHA-256 of the file's bytes: a rerun hashes the
file again (at disk speed; about half a second a GB once the OS has it cached) and finds its copy,
and an edited file gets a new one. Every column of a text file is read as text (large_string): a
type guessed from the first lines can be wrong further down (an id column of numbers that holds
"A-17" on line 900,000), and a guess that changes between two files or two runs would change the
output's schema. A line that can't be read stops the conversion with the file and line named; no
line is ever dropped.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputFormatError, InputNotFoundError, OutputError

TEXT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
CONVERTER = 1
"""Version of the conversion rules below: part of a copy's name and of the input's identity, so
a change of rules makes new copies and refuses to resume a run labelled under the old ones."""
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
"""The folder name Hive and Spark give a partition whose value is null."""

_ROW_GROUP_ROWS = 128 * 1024
_ROW_GROUP_BYTES = 64 << 20
_KEY_VALUE = re.compile(r"^([^=]+)=(.*)$")


@dataclass(frozen=True)
class Source:
    """One input file, and the partition columns its folders give it (``name=value`` folders
    below the input folder, or below a glob's fixed part)."""

    path: Path | storage.ObjectPath
    partition: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class TextSource:
    """A CSV, TSV or JSON Lines input and the Parquet copy that is read in its place."""

    format: str
    """``csv``, ``tsv`` or ``jsonl``."""
    sha256: str
    """Of the file's bytes as stored (compressed, for a compressed file)."""
    size: int
    mtime_ns: int
    parquet: Path

    @property
    def identity(self) -> dict:
        return {"size": self.size, "sha256": self.sha256, "format": self.format, "converter": CONVERTER}


def find_sources(spec: str) -> list[Source]:
    """A file, a folder (its data files, and those in its ``name=value`` subfolders), or a glob;
    locally or in an object store (``s3://bucket/exports/``, see ``pipeline/storage.py``)."""
    if storage.is_remote(spec):
        return _object_sources(spec)
    expanded = os.path.expanduser(spec)
    path = Path(expanded)
    if path.is_file():
        return [Source(path)]
    if path.is_dir():
        found, root, where = _folder_files(path), path, f"folder {path}"
    else:
        found = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        root, where = _fixed_part(expanded), f"path or glob {spec!r}"
    if not found:
        raise InputNotFoundError(
            f"input: no Parquet file (nor CSV, TSV or JSON Lines file) at {where}",
            hint="check 'input:' in the job file (relative paths start at the current directory)",
        )
    sources = [Source(p, _partition(p, root)) for p in found]
    _check_partitions(sources)
    return sources


def _object_sources(spec: str) -> list[Source]:
    """The Parquet objects an ``s3://`` or ``gs://`` input names, read in place (ranged reads of
    footers and row groups): the object itself, every object below a prefix that is a folder
    (through ``name=value`` levels only), or those a glob matches (``*`` within a level, ``**``
    across levels)."""
    where = storage.ObjectPath.parse(spec)
    try:
        if glob.escape(where.key) != where.key:
            fixed = [part for part in _fixed_part(where.key).parts if part != "."]
            root = storage.ObjectPath(f"{where.scheme}://{where.bucket}/{'/'.join(fixed)}")
            pattern = _glob_regex(where.key)
            found = [p for p, _ in storage.list_files(root) if pattern.fullmatch(p.key)]
            what = f"glob {spec!r}"
        elif storage.size(where) is not None:
            found, root, what = [where], where.parent, spec
        else:
            root, what = where, f"prefix {spec}"
            found = [p for p, _ in storage.list_files(where) if _in_data_folder(p, where)]
    except (OSError, pa.ArrowException) as exc:
        raise storage.failure(f"input: cannot list {spec}", exc, InputNotFoundError) from None
    texts = [p for p in found if text_format(p)]
    if texts:
        raise InputFormatError(
            f"input: {texts[0]} is a CSV, TSV or JSON Lines object: on object storage labelmill "
            "reads Parquet only",
            hint="convert it to Parquet, or copy it to a local folder and point input: there",
        )
    found = [p for p in found if p.suffix.lower() == ".parquet"]
    if not found:
        raise InputNotFoundError(
            f"input: no Parquet object at {what}",
            hint="check 'input:' in the job file (a prefix lists the objects below it)",
        )
    top = PurePosixPath(root.fs_path)
    sources = [Source(p, _partition(PurePosixPath(p.fs_path), top)) for p in found]
    _check_partitions(sources)
    return sources


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob over object keys as Python's ``glob`` reads one over paths: ``*``, ``?`` and
    ``[...]`` within one level, ``**`` across levels."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            inner = pattern[i + 1 : end]
            out.append(
                "[" + ("^" + inner[1:] if inner.startswith("!") else inner).replace("\\", "\\\\") + "]"
            )
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _in_data_folder(path: storage.ObjectPath, root: storage.ObjectPath) -> bool:
    """An object of a folder input: below it directly or through ``name=value`` levels, and not a
    ``.``- or ``_``-named side file (``_SUCCESS``)."""
    parts = PurePosixPath(path.fs_path).relative_to(PurePosixPath(root.fs_path)).parts
    if any(part.startswith((".", "_")) for part in parts):
        return False
    return all(_KEY_VALUE.match(part) for part in parts[:-1])


def _folder_files(folder: Path) -> list[Path]:
    """The folder's data files, and recursively those of its ``name=value`` subfolders. Names
    starting with ``.`` or ``_`` are skipped, as Spark and Hive write ``_SUCCESS`` and ``.crc``
    files beside the data."""
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir() and _KEY_VALUE.match(entry.name):
            found += _folder_files(entry)
        elif entry.is_file() and (entry.suffix.lower() == ".parquet" or text_format(entry)):
            found.append(entry)
    return sorted(found)


def _fixed_part(pattern: str) -> Path:
    """The folders of a glob before its first wildcard: partition folders are looked for below."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if glob.escape(part) != part:
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _partition(path: Path, root: Path) -> tuple[tuple[str, str | None], ...]:
    try:
        folders = path.parent.relative_to(root).parts
    except ValueError:
        return ()
    values = []
    for folder in folders:
        match = _KEY_VALUE.match(folder)
        if match:
            value = unquote(match.group(2))  # Hive escapes '/', '=' and others as %XX
            values.append((unquote(match.group(1)), None if value == HIVE_NULL else value))
    return tuple(values)


def _check_partitions(sources: list[Source]) -> None:
    first = sources[0]
    for s in sources:
        names = [k for k, _ in s.partition]
        if len(set(names)) != len(names):
            raise InputFormatError(
                f"{s.path}: partition column(s) named twice in its folders {names}",
                hint="each name=value folder level must name another column",
            )
        if names != [k for k, _ in first.partition]:
            raise InputFormatError(
                f"input files sit in different partition folders: {s.path} has "
                f"{names or 'none'}, {first.path} has {[k for k, _ in first.partition] or 'none'}",
                hint="every file must sit under the same name=value folder levels (Hive layout); "
                "point 'input:' at one layout",
            )


def text_format(path: Path) -> tuple[str, str | None] | None:
    """``(format, compression)`` for a CSV, TSV or JSON Lines file name, else None (Parquet)."""
    suffix = path.suffix.lower()
    compression = COMPRESSIONS.get(suffix)
    fmt = TEXT_FORMATS.get(Path(path.stem).suffix.lower() if compression else suffix)
    return (fmt, compression) if fmt else None


def convert(path: Path, copies: Path) -> TextSource:
    """The Parquet copy of a text input, made in ``copies`` unless a sound one is there."""
    fmt, compression = text_format(path)
    try:
        before = path.stat()
        with path.open("rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        raise InputNotFoundError(
            f"{path} disappeared while the inputs were being read",
            hint="check that nothing else moves or deletes the input files, then rerun",
        ) from None
    except OSError as exc:
        raise InputFormatError(
            f"input file {path} can't be read: {exc}", hint="check its permissions"
        ) from None
    target = copies / f"{sha[:32]}.{fmt}.v{CONVERTER}.parquet"
    if not _sound_copy(target):
        _write_copy(path, fmt, compression, target, before)
    return TextSource(fmt, sha, before.st_size, before.st_mtime_ns, target)


def _sound_copy(target: Path) -> bool:
    """A copy appears under its name only once complete (written aside, synced, renamed), so a
    readable footer is enough; anything else there is made again."""
    try:
        pq.read_metadata(target)
    except (OSError, pa.ArrowException):
        return False
    return True


def _write_copy(path: Path, fmt: str, compression: str | None, target: Path, before: os.stat_result) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    plain = target.with_name(f".{target.name}.plain-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        readable = _plain_copy(path, compression, plain, strip_bom=fmt == "jsonl")
        try:
            if fmt == "jsonl":
                rows = _jsonl_to_parquet(path, readable, tmp)
            else:
                rows = _csv_to_parquet(path, readable, "\t" if fmt == "tsv" else ",", tmp)
        except pa.ArrowInvalid as exc:
            raise InputFormatError(
                f"{path} can't be read as {fmt.upper()}: {' '.join(str(exc).split())}",
                hint="fix the line named, or convert the file to Parquet yourself",
            ) from None
        written = pq.read_metadata(tmp).num_rows
        if written != rows:  # two independent counts of one file: a dropped line shows here
            raise InputFormatError(
                f"{path}: holds {rows} rows, but {written} were read from it",
                hint="check the file's quoting and line ends, or convert it to Parquet yourself",
            )
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            # the copy is named by the hash of what was there before: it must hold just that
            raise InputFormatError(f"{path} changed while it was being read", hint="rerun once it is written")
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except FileNotFoundError as exc:
        if Path(exc.filename or "") == path:
            raise InputNotFoundError(
                f"{path} disappeared while it was being read", hint="put it back and rerun"
            ) from None
        raise _copy_failed(path, target, exc) from None
    except OSError as exc:
        raise _copy_failed(path, target, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
        plain.unlink(missing_ok=True)


def _copy_failed(path: Path, target: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"could not write the Parquet copy of {path} to {target}: {exc}",
        hint="check free disk space and permissions, or set LABELMILL_HOME to another folder",
    )


def _plain_copy(path: Path, compression: str | None, plain: Path, strip_bom: bool) -> Path:
    """The file to parse: the input itself, or an uncompressed copy of it (without a leading
    byte-order mark, which the JSON reader refuses), written in blocks so memory stays small."""
    with path.open("rb") as fh:
        bom = fh.read(3) == b"\xef\xbb\xbf"
    if compression is None and not (strip_bom and bom):
        return path
    try:
        with pa.input_stream(str(path), compression=compression) as src, plain.open("wb") as out:
            block = src.read(1 << 20)
            if strip_bom and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            while block:
                out.write(block)
                block = src.read(1 << 20)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk, not the file: reported as a write error
        raise InputFormatError(
            f"{path} can't be decompressed as {compression}: {exc}",
            hint="check that the file is complete and that its name's ending matches its compression",
        ) from None
    return plain


# --- CSV and TSV ---------------------------------------------------------------------------------


def _csv_to_parquet(path: Path, readable: Path, delimiter: str, tmp: Path) -> int:
    import pyarrow.csv as pacsv

    names, rows = _check_csv(path, readable, delimiter)
    text = pa.large_string()
    reader = pacsv.open_csv(
        str(readable),
        read_options=pacsv.ReadOptions(block_size=16 << 20),  # a record may not straddle two blocks
        # quoted fields may hold line breaks (product descriptions do)
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        # an empty field is null; a quoted empty one ("") is an empty string; "NA" and "null" are
        # text like any other
        convert_options=pacsv.ConvertOptions(
            column_types={n: text for n in names},
            strings_can_be_null=True,
            null_values=[""],
            quoted_strings_can_be_null=False,
        ),
    )
    schema = pa.schema([pa.field(n, text) for n in names])
    _write_batches(iter(reader), schema, tmp)
    return rows


def _check_csv(path: Path, readable: Path, delimiter: str) -> tuple[list[str], int]:
    """The header and the number of records, read with Python's csv module in strict mode: every
    record must have as many fields as the header. Blank lines are not records (Arrow's reader
    skips them too). Raises naming the first bad line."""
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long descriptions are no error
    try:
        with readable.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter, strict=True)
            header, rows = None, 0
            while True:
                start = reader.line_num + 1
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise _bad_line(path, start, str(exc)) from None
                if not record:
                    continue
                if header is None:
                    header = record
                    _check_header(path, start, header)
                elif len(record) != len(header):
                    raise _bad_line(path, start, f"{len(record)} field(s) where the header has {len(header)}")
                else:
                    rows += 1
    except UnicodeDecodeError:
        raise _bad_line(path, _first_non_utf8_line(readable), "not valid UTF-8") from None
    finally:
        csv.field_size_limit(limit)
    if header is None:
        raise InputFormatError(
            f"{path} is empty: a CSV file starts with a header line naming its columns",
            hint="add the header line (column names), or point 'input:' at another file",
        )
    return header, rows


def _check_header(path: Path, line: int, header: list[str]) -> None:
    seen: set[str] = set()
    for name in header:
        if not name.strip():
            raise _bad_line(path, line, f"the header has an empty column name: {header}")
        if name in seen:
            raise _bad_line(path, line, f"the header names column '{name}' twice")
        seen.add(name)


# --- JSON Lines ----------------------------------------------------------------------------------


def _jsonl_to_parquet(path: Path, readable: Path, tmp: Path) -> int:
    """One JSON object a line, every field as text: strings as they are, other values (numbers,
    true/false, lists, objects) as their JSON text, a missing field or null as null. Polars reads
    the lines (Arrow's JSON reader can't take a number as text) and streams them into Parquet;
    Python only counts them, and on a failure finds the line."""
    import polars as pl

    rows = _count_lines(readable)
    if rows == 0:  # no object: no columns either
        pq.write_table(pa.table({}), tmp)
        return 0
    try:
        names = pl.scan_ndjson(readable, infer_schema_length=None).collect_schema().names()
        frame = pl.scan_ndjson(readable, schema={n: pl.String for n in names})
        frame.sink_parquet(tmp, compression="zstd", row_group_size=_ROW_GROUP_ROWS)
    except pl.exceptions.PolarsError as exc:
        where = _first_bad_json_line(readable)
        if where is not None:
            raise _bad_line(path, *where) from None
        raise InputFormatError(
            f"{path} can't be read as JSON Lines: {' '.join(str(exc).split())}",
            hint="each line must hold one JSON object",
        ) from None
    return rows


def _count_lines(readable: Path) -> int:
    with readable.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _first_bad_json_line(readable: Path) -> tuple[int, str] | None:
    import json

    with readable.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                return n, "not valid UTF-8"
            except ValueError as exc:
                return n, f"not valid JSON ({exc})"
            if not isinstance(value, dict):
                return n, f"a JSON {type(value).__name__}, not an object"
    return None


# --- shared --------------------------------------------------------------------------------------


def _write_batches(batches: Iterator[pa.RecordBatch], schema: pa.Schema, tmp: Path) -> None:
    """Row groups of up to 128K rows or 64 MB, whichever comes first: memory stays at one of
    them however large the file."""
    with pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as writer:
        held, rows, size = [], 0, 0
        for batch in batches:
            held.append(batch)
            rows, size = rows + batch.num_rows, size + batch.nbytes
            if rows >= _ROW_GROUP_ROWS or size >= _ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_batches(held, schema=schema), row_group_size=rows)
                held, rows, size = [], 0, 0
        if held:
            writer.write_table(pa.Table.from_batches(held, schema=schema), row_group_size=rows)


def _first_non_utf8_line(readable: Path) -> int:
    with readable.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            try:
                line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                return n
    return 0


def _bad_line(path: Path, line: int, reason: str) -> InputFormatError:
    return InputFormatError(
        f"{path}, line {line}: {reason}",
        hint="fix or remove that line and rerun (no line is skipped: rows in = rows out)",
    )
