"""Awkward inputs end in a labelled row, a clear refusal or a named error, never a traceback:
invisible-only text, files that differ in type width, damaged pages, inputs gone mid-run, and the
durability of what a run writes."""

from __future__ import annotations

import errno
import os
import random
import re
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import LABELS, default_table, write_table
from doubles import RecordingFake

from pipeline.backends.fake import FakeBackend
from pipeline.cli import main
from pipeline.errors import DuplicateIdError, InputFormatError, InputNotFoundError, OutputError
from pipeline.io import (
    Chunk,
    check_columns,
    check_ids,
    describe,
    fsync_dir,
    plan_chunks,
    read_chunk,
    with_types,
    write_parquet_atomic,
    write_text_atomic,
)
from pipeline.plan import plan_job
from pipeline.runner import run_job, run_plan
from pipeline.text import row_texts

# --- invisible-only text -------------------------------------------------------------------------

INVISIBLE_ONLY = [
    "\u200b",
    "\u200b\u200c\u200d\u2060\ufeff",
    "\u00ad",
    " \ufeff \u200b\t\u00a0",
    "\U000e0041\U000e0042\U000e007f",  # tag characters
    "\u2061\u2062\u202e\u2066\u200e",  # invisible operators, bidi controls
    "\u3164",  # Hangul filler: no glyph, though not a format character
    "\ufe0f\u200d",
    "\x00\u200b\x07",
]


def test_invisible_only_rows_are_empty_input_and_never_sent(make_job, read_parts) -> None:
    titles = [
        "Green tea",
        *INVISIBLE_ONLY,
        "Cof\u00adfee beans",  # soft hyphen from a CMS: the same product as the next row
        "\ufeffCoffee beans\u200b",
        "Coffee \u2615\ufe0f family \U0001f469\u200d\U0001f469\u200d\U0001f467",
    ]
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})
    job_files = make_job(data, chunk_rows=4, keep_columns=["title"])
    job = job_files.load()
    backend = RecordingFake(job)
    summary = run_job(job, backend=backend)
    rows = read_parts(job_files.output).to_pylist()
    n = len(INVISIBLE_ONLY)
    assert [r["status"] for r in rows] == ["ok"] + ["empty_input"] * n + ["ok"] * 3
    assert all(r["label"] is None and r["prompt_tokens"] is None for r in rows[1 : n + 1])
    assert all(r["label"] in LABELS for r in rows[:1] + rows[n + 1 :])
    assert summary["status_counts"]["empty_input"] == n
    # only visible text reached the model, without the format characters that split its words,
    # and the two spellings of "Coffee beans" were asked once
    assert sorted(backend.texts()) == sorted(
        [
            "Green tea",
            "Coffee beans",
            "Coffee \u2615\ufe0f family \U0001f469\u200d\U0001f469\u200d\U0001f467",
        ]
    )
    assert summary["model_calls"] == 3
    assert rows[n + 1]["label"] == rows[n + 2]["label"]
    # the kept column is the input as written
    assert [r["title"] for r in rows] == titles


def test_invisible_only_fields_of_a_template_count_as_empty(make_job, read_parts) -> None:
    data = pa.table(
        {
            "id": pa.array(range(3), pa.int64()),
            "title": ["\u200b\u00ad", "\u2060", "Green\u200b tea"],
            "brand": [None, "\ufeff Lipton", "\u200d"],
        }
    )
    job_files = make_job(data, text_column=None, text_template="{title} (brand: {brand})")
    job = job_files.load()
    assert row_texts(pq.read_table(job_files.input), None, job.text_template) == [
        None,
        "(brand: Lipton)",
        "Green tea (brand: )",  # a field with nothing visible adds nothing
    ]
    run_job(job, backend=RecordingFake(job))
    assert [r["status"] for r in read_parts(job_files.output).to_pylist()] == ["empty_input", "ok", "ok"]


# What cleaning does to each kind of character: the reference the vectorised code is held to.
_VISIBLE = ["a", "\u017c", "\u2615", "\u0600", "Z", "\u05d0"]  # \u0600: an Arabic number sign, drawn
_SPACE = [" ", "\t", "\n", "\u00a0", "\u3000"]
_CONTROL = ["\x00", "\x1b", "\x7f", "\x9f"]
_DROPPED = ["\u200b", "\u00ad", "\ufeff", "\u2060", "\u202e", "\u200e", "\U000e0041"]
_KEPT_INVISIBLE = ["\u200c", "\u200d", "\ufe0f", "\u3164"]


def _reference(text: str) -> str | None:
    text = "".join(" " if c in _CONTROL else c for c in text if c not in _DROPPED)
    return text.strip() if any(c in _VISIBLE for c in text) else None


def test_cleaning_matches_the_reference_on_random_text() -> None:
    rng = random.Random(7)
    alphabet = _VISIBLE + _SPACE + _CONTROL + _DROPPED + _KEPT_INVISIBLE
    # mostly plain rows, as in real inputs, so the rows needing repair sit between untouched ones
    texts = [
        "".join(rng.choices(alphabet, k=rng.randint(0, 8))) if i % 3 else f"plain row {i}"
        for i in range(3000)
    ]
    texts[5] = None
    table = pa.table({"t": pa.array(texts, pa.large_string())})
    got = row_texts(table, "t", None)
    expected = [None if t is None else _reference(t) for t in texts]
    assert got == expected
    assert sum(t is None for t in got) > 100 and sum(t is not None for t in got) > 2000


# --- files that differ in type width -------------------------------------------------------------


def _product_file(path: Path, ids: range, text_type: pa.DataType, id_type: pa.DataType) -> Path:
    titles = [f"product number {i} with a title" for i in ids]
    brands = pa.array([f"brand {i % 3}" for i in ids], text_type)
    if text_type == pa.string():
        brands = brands.dictionary_encode()  # as pandas writes a categorical
    table = pa.table({"id": pa.array(ids, id_type), "title": pa.array(titles, text_type), "brand": brands})
    return write_table(path, table, row_group_size=4)


def test_folder_mixing_string_and_large_string_runs_with_one_schema(make_job, read_parts, tmp_path) -> None:
    folder = tmp_path / "inputs"
    _product_file(folder / "a.parquet", range(0, 9), pa.string(), pa.int32())
    _product_file(folder / "b.parquet", range(9, 20), pa.large_string(), pa.int64())
    _product_file(folder / "c.parquet", range(20, 23), pa.string(), pa.int64())
    job_files = make_job(input=folder, chunk_rows=5, keep_columns=["brand"])
    job = job_files.load()
    summary = run_job(job, backend=RecordingFake(job))
    assert summary["status_counts"]["ok"] == 23
    parts = sorted((job_files.output / "parts").glob("part-*.parquet"))
    schemas = {pq.read_schema(p).remove_metadata() for p in parts}
    assert len(parts) == 2 + 3 + 1 and len(schemas) == 1
    (schema,) = schemas
    assert schema.field("id").type == pa.int64()
    assert schema.field("brand").type == pa.large_string()
    out = read_parts(job_files.output)
    assert out.column("id").to_pylist() == list(range(23))
    assert out.column("brand").to_pylist() == [f"brand {i % 3}" for i in range(23)]
    # text read through a cast is the text as written
    labels = out.column("label").to_pylist()
    assert labels == [_fake_label(job, f"product number {i} with a title") for i in range(23)]


def _fake_label(job, text: str) -> str:
    plan = plan_job(job, check_id_values=False)
    answers = FakeBackend(job.backend_settings, plan.model).answer(
        plan.prompt, pl.Series([text], dtype=pl.String), plan.request
    )
    return answers.column("text")[0].as_py()


def test_compatible_types_settle_on_the_wider_one(tmp_path: Path) -> None:
    a = _product_file(tmp_path / "a.parquet", range(0, 6), pa.string(), pa.int32())
    b = _product_file(tmp_path / "b.parquet", range(6, 10), pa.large_string(), pa.uint32())
    files = describe([a, b])
    types = check_columns(files, ["id", "title", "brand"])
    assert types == {"id": pa.int64(), "title": pa.large_string(), "brand": pa.large_string()}
    files = with_types(files, types)
    for f in files:
        for chunk in plan_chunks([f], 5):
            got = read_chunk(f, chunk, ["id", "title", "brand"])
            assert got.schema == pa.schema(types.items())
    # a file without rows is read as the plan's types too
    empty = write_table(tmp_path / "e.parquet", pa.table({"id": pa.array([], pa.int16())}))
    (e,) = with_types(describe([empty]), {"id": pa.int64()})
    assert read_chunk(e, Chunk(0, 0, 0, 0), ["id"]).schema == pa.schema({"id": pa.int64()})


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (pa.string(), pa.int64()),
        (pa.large_string(), pa.large_binary()),
        (pa.int64(), pa.uint64()),  # no integer type holds both
        (pa.int64(), pa.float64()),
    ],
)
def test_incompatible_types_are_refused_naming_both_files(tmp_path, first, second) -> None:
    a = write_table(tmp_path / "a.parquet", pa.table({"x": pa.array([], first)}))
    b = write_table(tmp_path / "b.parquet", pa.table({"x": pa.array([], second)}))
    c = write_table(tmp_path / "c.parquet", pa.table({"x": pa.array([], first)}))
    with pytest.raises(InputFormatError) as info:
        check_columns(describe([a, c, b]), ["x"])
    message = str(info.value)
    assert "b.parquet" in message and "a.parquet" in message
    assert str(first) in message and str(second) in message


def test_ids_of_different_widths_are_compared_as_one_type(tmp_path: Path) -> None:
    # read as they were written, an int32 2 and an int64 2 hash differently: the repeat would pass
    a = write_table(tmp_path / "a.parquet", {"id": pa.array([1, 2], pa.int32()), "t": ["x", "y"]})
    b = write_table(tmp_path / "b.parquet", {"id": pa.array([2, 3], pa.int64()), "t": ["z", "w"]})
    files = describe([a, b])
    files = with_types(files, check_columns(files, ["id"]))
    with pytest.raises(DuplicateIdError, match="2 x2"):
        check_ids(files, "id")


# --- damaged pages -------------------------------------------------------------------------------


def _damage(path: Path, row_group: int, column: int, where: str) -> None:
    """Flip one byte of a column chunk's data page: in its header, or among its values."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    page = meta.data_page_offset
    # a dictionary page, when there is one, comes first and is counted in the chunk's size
    end = (meta.dictionary_page_offset if meta.has_dictionary_page else page) + meta.total_compressed_size
    at = page + 2 if where == "header" else (page + end) // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _titles(n: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "title": [f"product number {i} with a fairly long title" for i in range(n)],
        }
    )


def _damaged_file(
    path, rows: int, compression: str, *, row_group: int, column: int, where="values", checksums=True
):
    """A file of ``rows`` titles, ten to a row group, with a byte flipped in ``column`` of
    ``row_group``: among its values, or in its page header."""
    pq.write_table(
        _titles(rows),
        path,
        row_group_size=10,
        compression=compression,
        use_dictionary=False,
        write_statistics=False,  # keeps page headers short: the flip lands among values
        write_page_checksum=checksums,
    )
    _damage(path, row_group=row_group, column=column, where=where)
    return path


# A flipped byte among the values of an uncompressed page, or inside a zstd frame where it only
# changes a literal, still decodes: Parquet can't see it unless the writer stored page checksums.
# So the "values" cases write checksums (write_page_checksum=True; Spark writes them by default), and
# pass only because chunks are read with checksum verification on; a damaged page header breaks
# its Thrift decoding with or without checksums.
@pytest.mark.parametrize(
    ("compression", "where", "checksums"),
    [("none", "values", True), ("zstd", "values", True), ("zstd", "header", False)],
)
def test_damaged_page_exits_2_naming_file_and_rows(make_job, tmp_path, compression, where, checksums) -> None:
    path = _damaged_file(
        tmp_path / "damaged.parquet", 40, compression, row_group=2, column=1, where=where, checksums=checksums
    )
    job_files = make_job(input=path, chunk_rows=10)
    result = CliRunner().invoke(main, ["run", "--quiet", str(job_files.path)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert str(path) in result.output
    assert "row group 2 (rows 20-29)" in result.output
    assert "damaged" in result.output and "->" in result.output  # the hint
    assert "Traceback" not in result.output
    # the chunks before the damaged one are kept for the rerun
    done = sorted(p.name for p in (job_files.output / "parts").glob("part-*.parquet"))
    assert done == ["part-00000.parquet", "part-00001.parquet"]


def test_damaged_id_page_is_named_while_checking_ids(make_job, tmp_path) -> None:
    path = _damaged_file(tmp_path / "damaged.parquet", 30, "none", row_group=1, column=0)
    job_files = make_job(input=path)
    with pytest.raises(InputFormatError, match=r"damaged\.parquet is damaged: row group 1 \(rows 10-19\)"):
        plan_job(job_files.load())


def test_damaged_page_in_a_real_process_prints_no_traceback(make_job, tmp_path) -> None:
    path = _damaged_file(tmp_path / "damaged.parquet", 20, "zstd", row_group=1, column=1)
    job_files = make_job(input=path, chunk_rows=10)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--quiet", str(job_files.path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert str(path) in done.stdout + done.stderr


# --- inputs gone or replaced mid-run -------------------------------------------------------------


def test_input_removed_while_the_inputs_are_described_is_named(tmp_path: Path) -> None:
    a = write_table(tmp_path / "a.parquet", default_table(3))
    with pytest.raises(InputNotFoundError, match=r"b\.parquet disappeared"):
        describe([a, tmp_path / "b.parquet"])  # listed by find_inputs, then deleted


def test_input_removed_after_planning_is_named(make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    plan = plan_job(job_files.load())
    job_files.input.unlink()
    with pytest.raises(InputNotFoundError) as info:
        run_plan(plan, backend=RecordingFake(job_files.load()))
    assert str(job_files.input) in str(info.value)
    assert "--restart" in info.value.hint
    assert info.value.exit_code == 2


class _RemovesInput(RecordingFake):
    """Deletes (or rewrites) the input file while it answers the first chunk."""

    def __init__(self, job, path: Path, replacement: pa.Table | None = None) -> None:
        super().__init__(job)
        self.path, self.replacement = path, replacement

    def complete(self, conversations, request):
        if self.path.exists() and not self.batches:
            if self.replacement is None:
                self.path.unlink()
            else:
                write_table(self.path, self.replacement)
        return super().complete(conversations, request)


def test_input_removed_mid_run_stops_with_its_name_and_keeps_finished_chunks(make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5, decoding="constrained")  # through complete
    job = job_files.load()
    with pytest.raises(InputNotFoundError, match=re.escape(str(job_files.input))):
        run_job(job, backend=_RemovesInput(job, job_files.input))
    assert [p.name for p in (job_files.output / "parts").glob("*.parquet")] == ["part-00000.parquet"]


def test_input_replaced_mid_run_is_refused_not_labelled(make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5, decoding="constrained")  # through complete
    job = job_files.load()
    other = default_table(12).set_column(1, "title", pa.array([f"other {i}" for i in range(12)]))
    with pytest.raises(InputFormatError) as info:
        run_job(job, backend=_RemovesInput(job, job_files.input, replacement=other))
    assert str(job_files.input) in str(info.value)
    assert "changed after this run was planned" in str(info.value)
    assert "--restart" in info.value.hint


def test_rereading_an_unchanged_file_is_not_mistaken_for_a_change(tmp_path: Path) -> None:
    path = write_table(tmp_path / "a.parquet", default_table(12), row_group_size=5)
    (f,) = describe([path])
    os.utime(path, (1, 1))  # touched, not changed
    assert sum(read_chunk(f, c, ["id"]).num_rows for c in plan_chunks([f], 5)) == 12


# --- durable writes ------------------------------------------------------------------------------


def test_atomic_writes_sync_the_folder_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(("dir", (tmp_path / "x.json").exists()))
        else:
            synced.append(("file", (tmp_path / "x.json").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_text_atomic("one", tmp_path / "x.json")
    # the file's data before the rename, the folder (holding the renamed file) after it
    assert synced == [("file", False), ("dir", True)]
    synced.clear()
    write_parquet_atomic(default_table(3), tmp_path / "p.parquet")
    assert [kind for kind, _ in synced] == ["file", "dir"]


def test_fsync_dir_tolerates_a_file_system_that_cannot_sync_folders(tmp_path, monkeypatch) -> None:
    def refuse(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    fsync_dir(tmp_path)  # nothing stronger to ask for: not an error


def test_a_failed_folder_sync_is_an_output_error(tmp_path: Path, monkeypatch) -> None:
    real_fsync = os.fsync

    def failing_dir_sync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_dir_sync)
    with pytest.raises(OutputError, match=r"x\.json"):
        write_text_atomic("one", tmp_path / "x.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
