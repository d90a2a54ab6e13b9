"""Parquet in: finding inputs, refusing bad files, chunking by row groups, checking ids."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_table

from pipeline.errors import DuplicateIdError, InputError, InputFormatError, InputNotFoundError
from pipeline.io import (
    check_columns,
    check_ids,
    describe,
    find_inputs,
    plan_chunks,
    read_chunk,
    write_parquet_atomic,
    write_text_atomic,
)


def small(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(start, start + n), pa.int64()),
            "text": pa.array([f"row {i}" for i in range(start, start + n)], pa.string()),
        }
    )


# --- find_inputs ---------------------------------------------------------------------------------


def test_find_inputs_single_file(tmp_path: Path) -> None:
    path = write_table(tmp_path / "a.parquet", small(3))
    assert find_inputs(str(path)) == [path]


def test_find_inputs_file_without_parquet_suffix_is_taken_as_given(tmp_path: Path) -> None:
    path = write_table(tmp_path / "data.pq", small(3))
    assert find_inputs(str(path)) == [path]


def test_find_inputs_folder_sorted_parquet_only(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    b = write_table(folder / "b.parquet", small(2))
    a = write_table(folder / "a.parquet", small(2))
    (folder / "notes.txt").write_text("not data")
    (folder / "sub").mkdir()
    write_table(folder / "sub" / "c.parquet", small(2))
    assert find_inputs(str(folder)) == [a, b]


def test_find_inputs_glob(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    a = write_table(folder / "part-1.parquet", small(2))
    b = write_table(folder / "part-2.parquet", small(2))
    write_table(folder / "other.parquet", small(2))
    assert find_inputs(str(folder / "part-*.parquet")) == [a, b]


def test_find_inputs_recursive_glob(tmp_path: Path) -> None:
    a = write_table(tmp_path / "in" / "x" / "a.parquet", small(2))
    b = write_table(tmp_path / "in" / "y" / "b.parquet", small(2))
    assert find_inputs(str(tmp_path / "in" / "**" / "*.parquet")) == [a, b]


def test_find_inputs_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="no Parquet file"):
        find_inputs(str(tmp_path / "missing.parquet"))
    with pytest.raises(InputNotFoundError):
        find_inputs(str(tmp_path / "*.parquet"))


def test_find_inputs_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="folder"):
        find_inputs(str(tmp_path / "empty"))


def test_input_errors_exit_with_2() -> None:
    assert issubclass(InputFormatError, InputError)
    assert InputNotFoundError("x").exit_code == 2
    assert DuplicateIdError("x").exit_code == 2


# --- describe / check_columns --------------------------------------------------------------------


def test_describe_reads_footer_only_facts(tmp_path: Path) -> None:
    path = write_table(tmp_path / "a.parquet", small(20), row_group_size=7)
    (f,) = describe([path])
    assert f.rows == 20
    assert f.row_group_rows == (7, 7, 6)
    assert f.schema.field("id").type == pa.int64()
    assert f.size == path.stat().st_size
    assert len(f.footer_sha) == 16
    assert f.identity["rows"] == 20


def test_footer_hash_changes_when_data_changes(tmp_path: Path) -> None:
    path = write_table(tmp_path / "a.parquet", small(5))
    before = describe([path])[0].footer_sha
    write_table(path, small(5, start=1))
    assert describe([path])[0].footer_sha != before


def test_csv_renamed_parquet_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "products.parquet"
    path.write_text("id,title\n1,Coffee beans\n2,Green tea\n", encoding="utf-8")
    with pytest.raises(InputFormatError) as info:
        describe(find_inputs(str(path)))
    assert str(path) in str(info.value)
    assert "not a readable Parquet file" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"PAR1", b"PAR1" + b"\0" * 100])
def test_truncated_or_empty_file_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(content)
    with pytest.raises(InputFormatError, match=r"broken\.parquet"):
        describe([path])


def test_non_parquet_file_in_a_folder_refused(tmp_path: Path) -> None:
    write_table(tmp_path / "a.parquet", small(2))
    (tmp_path / "b.parquet").write_text("x,y\n")
    with pytest.raises(InputFormatError, match=r"b\.parquet"):
        describe(find_inputs(str(tmp_path)))


def test_missing_column_named(tmp_path: Path) -> None:
    files = describe([write_table(tmp_path / "a.parquet", small(3))])
    with pytest.raises(InputFormatError) as info:
        check_columns(files, ["id", "title"])
    assert "'title'" in str(info.value)
    assert "a.parquet" in str(info.value)


def test_column_types_must_agree_across_files(tmp_path: Path) -> None:
    a = write_table(tmp_path / "a.parquet", small(3))
    b = write_table(tmp_path / "b.parquet", {"id": pa.array(["x"], pa.string()), "text": ["t"]})
    with pytest.raises(InputFormatError, match="'id'"):
        check_columns(describe([a, b]), ["id", "text"])


def test_check_columns_returns_types(tmp_path: Path) -> None:
    files = describe([write_table(tmp_path / "a.parquet", small(3))])
    assert check_columns(files, ["id", "text"]) == {"id": pa.int64(), "text": pa.string()}


# --- plan_chunks / read_chunk --------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 5, 7, 10, 1000])
def test_chunks_reproduce_every_row_once_in_order(tmp_path: Path, chunk_rows: int) -> None:
    original = small(50)
    path = write_table(tmp_path / "a.parquet", original, row_group_size=7)
    files = describe([path])
    assert len(files[0].row_group_rows) == 8  # 7 x 7 + 1
    chunks = plan_chunks(files, chunk_rows)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert len(chunks) == -(-50 // chunk_rows)
    assert all(c.rows <= chunk_rows for c in chunks)
    parts = [read_chunk(files[c.file_index], c, ["id", "text"]) for c in chunks]
    for chunk, part in zip(chunks, parts, strict=True):
        assert part.num_rows == chunk.rows
        assert part.column("id").to_pylist() == list(range(chunk.start, chunk.start + chunk.rows))
    joined = pa.concat_tables(parts)
    assert joined.equals(original)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 13])
def test_chunks_never_span_files(tmp_path: Path, chunk_rows: int) -> None:
    a = write_table(tmp_path / "a.parquet", small(11), row_group_size=7)
    b = write_table(tmp_path / "b.parquet", small(9, start=11), row_group_size=7)
    files = describe([a, b])
    chunks = plan_chunks(files, chunk_rows)
    for c in chunks:
        assert c.start + c.rows <= files[c.file_index].rows
    ids = []
    for c in chunks:
        ids += read_chunk(files[c.file_index], c, ["id"]).column("id").to_pylist()
    assert ids == list(range(20))


def test_read_chunk_selects_only_the_asked_columns(tmp_path: Path) -> None:
    files = describe([write_table(tmp_path / "a.parquet", small(10), row_group_size=3)])
    (chunk,) = [c for c in plan_chunks(files, 4) if c.start == 4]
    table = read_chunk(files[0], chunk, ["text"])
    assert table.column_names == ["text"]
    assert table.column("text").to_pylist() == ["row 4", "row 5", "row 6", "row 7"]


def test_empty_file_has_no_chunks(tmp_path: Path) -> None:
    files = describe([write_table(tmp_path / "a.parquet", small(0))])
    assert files[0].rows == 0
    assert plan_chunks(files, 10) == []


def test_read_chunk_notices_a_file_that_shrank(tmp_path: Path) -> None:
    path = write_table(tmp_path / "a.parquet", small(20), row_group_size=7)
    files = describe([path])
    last = plan_chunks(files, 10)[-1]
    write_table(path, small(15), row_group_size=7)
    with pytest.raises(InputFormatError, match="expected 10 rows"):
        read_chunk(files[0], last, ["id"])


# --- check_ids -----------------------------------------------------------------------------------


def test_check_ids_accepts_unique_ids(tmp_path: Path) -> None:
    a = write_table(tmp_path / "a.parquet", small(5))
    b = write_table(tmp_path / "b.parquet", small(5, start=5))
    check_ids(describe([a, b]), "id")


def test_check_ids_repeats_within_a_file(tmp_path: Path) -> None:
    path = write_table(tmp_path / "a.parquet", {"id": [1, 2, 3, 2, 2], "text": list("abcde")})
    with pytest.raises(DuplicateIdError, match="repeats") as info:
        check_ids(describe([path]), "id")
    assert "2 x3" in str(info.value)


def test_check_ids_repeats_across_files(tmp_path: Path) -> None:
    a = write_table(tmp_path / "a.parquet", {"id": ["k1", "k2"], "text": ["a", "b"]})
    b = write_table(tmp_path / "b.parquet", {"id": ["k3", "k1"], "text": ["c", "d"]})
    with pytest.raises(DuplicateIdError) as info:
        check_ids(describe([a, b]), "id")
    assert "'k1' x2" in str(info.value)


def test_check_ids_in_several_passes_finds_every_repeat_and_no_other(tmp_path: Path, monkeypatch) -> None:
    """An input larger than one pass's hashes is checked residue class by residue class: equal ids
    share a hash, so they meet in one pass, whichever it is."""
    import pipeline.io

    monkeypatch.setattr(pipeline.io, "_IDS_PER_PASS", 7)  # 200 rows: 29 passes
    ids = [f"k{i}" for i in range(200)]
    a = write_table(tmp_path / "a.parquet", {"id": ids[:100], "text": ["t"] * 100})
    b = write_table(tmp_path / "b.parquet", {"id": ids[100:], "text": ["t"] * 100})
    check_ids(describe([a, b]), "id")
    c = write_table(tmp_path / "c.parquet", {"id": ["k7", "k150", "k199", "new"], "text": ["t"] * 4})
    with pytest.raises(DuplicateIdError) as info:
        check_ids(describe([a, b, c]), "id")
    assert all(f"'{k}' x2" in str(info.value) for k in ("k150", "k199", "k7"))


def test_check_ids_nulls(tmp_path: Path) -> None:
    path = write_table(
        tmp_path / "a.parquet", {"id": pa.array([1, None, 3, None], pa.int64()), "text": list("abcd")}
    )
    with pytest.raises(DuplicateIdError, match="2 null"):
        check_ids(describe([path]), "id")


# --- atomic writes -------------------------------------------------------------------------------


def test_write_parquet_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "part.parquet"
    write_parquet_atomic(small(4), path)
    assert pq.read_table(path).equals(small(4))
    assert os.listdir(tmp_path) == ["part.parquet"]


def test_write_text_atomic_replaces(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_text_atomic("one", path)
    write_text_atomic("two ż", path)
    assert path.read_text(encoding="utf-8") == "two ż"
    assert os.listdir(tmp_path) == ["x.json"]
