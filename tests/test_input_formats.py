"""Inputs as users have them: CSV, TSV and JSON Lines (plain or compressed), Hive-partitioned
folders, ``~`` in paths, and files written as one huge row group."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, write_table
from doubles import RecordingFake

import pipeline.labeller
import pipeline.runner
from pipeline.cli import main
from pipeline.errors import DuplicateIdError, InputFormatError, InputNotFoundError, JobChangedError
from pipeline.io import Chunk, ChunkReader, find_inputs, open_inputs, plan_chunks
from pipeline.plan import plan_job
from pipeline.runner import run_job

TITLES = [
    "Kawa ziarnista 1 kg",
    'Herbata "Earl Grey", 100 torebek',  # a comma and quotes
    "Buty do biegania\nrozmiar 42",  # a line break inside a value
    "Witamina C 1000 mg — 60 tabletek 🍊",
    "",  # an empty title: empty_input, in every format
    "tab\tinside",
    "NA",  # text, not a null
]


def _rows(n: int = 21) -> list[dict]:
    return [
        {"id": 100 + i, "title": TITLES[i % len(TITLES)] + (f" #{i}" if TITLES[i % len(TITLES)] else ""),
         "brand": None if i % 5 == 0 else f"brand {i % 3}"}
        for i in range(n)
    ]  # fmt: skip


def _write(path: Path, rows: list[dict]) -> Path:
    """``rows`` in the format ``path``'s name says, as another tool would write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    if name.endswith(".parquet"):
        return write_table(path, pa.Table.from_pylist(rows))
    if name.endswith((".csv", ".tsv")):
        lines = _csv_text(rows, "\t" if name.endswith(".tsv") else ",")
        data = lines.encode()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = pa.compress(data, "zstd", asbytes=True)
    path.write_bytes(data)
    return path


def _csv_text(rows: list[dict], delimiter: str) -> str:
    """Quoted where needed; an empty string quoted (""), a null left empty."""

    def field(value) -> str:
        if value is None:
            return ""
        text = str(value)
        if text == "" or any(c in text for c in (delimiter, '"', "\n", "\r")):
            return '"' + text.replace('"', '""') + '"'
        return text

    lines = [delimiter.join(rows[0])] + [delimiter.join(field(v) for v in r.values()) for r in rows]
    return "\n".join(lines) + "\n"


def _outcome(table: pa.Table) -> list[tuple]:
    return list(
        zip(
            [str(v) for v in table.column("id").to_pylist()],
            table.column("title").to_pylist(),
            table.column("brand").to_pylist(),
            table.column("status").to_pylist(),
            table.column("label").to_pylist(),
            table.column("confidence").to_pylist(),
            strict=True,
        )
    )


# --- CSV, TSV, JSON Lines ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["in.csv", "in.tsv", "in.jsonl", "in.ndjson", "in.csv.gz", "in.jsonl.zst"])
def test_text_formats_label_like_the_same_rows_in_parquet(make_job, read_parts, tmp_path, name) -> None:
    rows = _rows()
    parquet = make_job(input=_write(tmp_path / "p" / "in.parquet", rows), keep_columns=["title", "brand"])
    text = make_job(input=_write(tmp_path / "t" / name, rows), keep_columns=["title", "brand"])
    run_job(parquet.load())
    summary = run_job(text.load())
    assert summary["rows_done"] == len(rows)
    got, want = read_parts(text.output), read_parts(parquet.output)
    assert _outcome(got) == _outcome(want)
    assert got.column("status").to_pylist().count("empty_input") == 3
    assert got.schema.field("id").type == pa.large_string()  # every text column is read as text
    # the markers and generated names speak of the file the user gave, not of its copy
    marker = json.loads((text.output / "done" / "chunk-00000.json").read_text())
    assert marker["file"] == str(text.input)
    assert json.loads((text.output / "run.json").read_text())["inputs"][0]["path"] == str(text.input)


def test_jsonl_values_that_are_not_strings_become_their_json_text(make_job, read_parts, tmp_path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": 1, "title": "a", "price": 9.5, "tags": ["x", "y"], "ok": true}\n'
        "\n"  # a blank line is no row
        '{"id": "A-2", "title": "b", "extra": {"k": null}}\n',
        encoding="utf-8",
    )
    job = make_job(input=path, keep_columns=["price", "tags", "ok", "extra"])
    run_job(job.load())
    out = read_parts(job.output).to_pylist()
    assert [r["id"] for r in out] == ["1", "A-2"]
    assert [(r["price"], r["tags"], r["ok"]) for r in out] == [("9.5", '["x", "y"]', "true"), (None,) * 3]
    assert out[1]["extra"] == '{"k": null}'


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ('id,title\n1,a\n2,"b\nc"\n3,d,extra\n4,e\n', 5, "3 field(s) where the header has 2"),
        ('id,title\n1,a\n2,"never closed\n3,c\n', 3, "unexpected end of data"),
        (b"id,title\n1,a\n2,caf\xe9\n", 3, "not valid UTF-8"),
        ("id,id\n1,a\n", 1, "names column 'id' twice"),
    ],
)
def test_bad_csv_line_is_named_with_its_number(make_job, tmp_path, content, line, reason) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    job = make_job(input=path)
    with pytest.raises(InputFormatError) as info:
        plan_job(job.load())
    assert f"{path}, line {line}:" in str(info.value)
    assert reason in str(info.value)
    result = CliRunner().invoke(main, ["run", "--quiet", str(job.path)])
    assert result.exit_code == 2 and f"line {line}" in result.output
    assert not (job.output / "parts").exists() or not any((job.output / "parts").iterdir())


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ('{"id": 1, "title": "a"}\n\n{"id": 2, "title": "b"\n{"id": 3, "title": "c"}\n', 3, "not valid JSON"),
        ('{"id": 1, "title": "a"}\n["id", 2]\n', 2, "not an object"),
        (b'{"id": 1, "title": "a"}\n{"id": 2, "title": "caf\xe9"}\n', 2, "not valid UTF-8"),
    ],
)
def test_bad_jsonl_line_is_named_with_its_number(make_job, tmp_path, content, line, reason) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputFormatError) as info:
        plan_job(make_job(input=path).load())
    assert f"{path}, line {line}:" in str(info.value)
    assert reason in str(info.value)


def test_csv_job_resumes_from_its_copy(make_job, read_parts, tmp_path) -> None:
    rows = _rows(25)
    path = _write(tmp_path / "in.csv", rows)
    job_files = make_job(input=path, chunk_rows=10, cache={"enabled": False})
    job = job_files.load()
    run_job(job)
    first = read_parts(job_files.output)
    copies = list((Path(os.environ["LABELMILL_HOME"]) / "inputs").glob("*.parquet"))
    assert len(copies) == 1
    made = copies[0].stat().st_mtime_ns
    (job_files.output / "done" / "chunk-00001.json").unlink()
    backend = RecordingFake(job)
    summary = run_job(job, backend=backend)
    assert summary["this_invocation"]["chunks_resumed"] == 2
    assert summary["this_invocation"]["chunks_labelled"] == 1
    # only the chunk whose marker was lost is asked again (its two empty titles are not sent)
    assert sorted(backend.texts()) == sorted(r["title"] for r in rows[10:20] if r["title"])
    assert read_parts(job_files.output).equals(first)
    assert copies[0].stat().st_mtime_ns == made  # the copy was found, not made again


def test_a_changed_csv_changes_the_fingerprint_even_at_the_same_size_and_time(make_job, tmp_path) -> None:
    path = _write(tmp_path / "in.csv", _rows(12))
    job_files = make_job(input=path, chunk_rows=5)
    before = plan_job(job_files.load()).manifest
    run_job(job_files.load())
    stat = path.stat()
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("Kawa", "Kama"), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    after = plan_job(job_files.load()).manifest
    assert after.components["input"] != before.components["input"]
    assert after.inputs[0]["sha256"] != before.inputs[0]["sha256"]
    with pytest.raises(JobChangedError, match="input"):
        run_job(job_files.load())


def test_csv_removed_mid_run_stops_naming_it(make_job, tmp_path) -> None:
    path = _write(tmp_path / "in.csv", _rows(12))
    job = make_job(input=path, chunk_rows=5).load()
    plan = plan_job(job)
    path.unlink()
    with pytest.raises(InputNotFoundError, match=r"in\.csv is gone"):
        pipeline.runner.run_plan(plan, backend=RecordingFake(job))


# --- Hive partitions -----------------------------------------------------------------------------


def _hive(root: Path) -> Path:
    write_table(root / "country=PL" / "part-0.parquet", {"id": [1, 2], "title": ["kawa", "herbata"]})
    write_table(root / "country=DE" / "part-0.parquet", {"id": [3, 4], "title": ["Kaffee", "Tee"]})
    write_table(root / "country=US%2FCA" / "part-0.parquet", {"id": [5], "title": ["coffee"]})
    (root / "_SUCCESS").write_text("")  # what Spark leaves beside the data
    return root


def test_hive_partition_column_in_the_template_and_the_output(make_job, read_parts, tmp_path) -> None:
    root = _hive(tmp_path / "data")
    job_files = make_job(input=root, text_column=None, text_template="{title} ({country})",
                         keep_columns=["country"], chunk_rows=1)  # fmt: skip
    job = job_files.load()
    backend = RecordingFake(job)
    run_job(job, backend=backend)
    out = read_parts(job_files.output)
    assert out.column("id").to_pylist() == [3, 4, 1, 2, 5]  # sorted by path: DE, PL, US/CA
    assert out.column("country").to_pylist() == ["DE", "DE", "PL", "PL", "US/CA"]
    assert backend.texts() == ["Kaffee (DE)", "Tee (DE)", "kawa (PL)", "herbata (PL)", "coffee (US/CA)"]


def test_recursive_glob_keeps_partition_columns(tmp_path) -> None:
    root = _hive(tmp_path / "data")
    files = open_inputs(str(root / "**" / "*.parquet"), tmp_path / "copies")
    assert [dict(f.partition) for f in files] == [{"country": "DE"}, {"country": "PL"}, {"country": "US/CA"}]
    reader = ChunkReader(["id", "country"])
    assert reader.read(files[1], Chunk(0, 1, 0, 2)).to_pylist() == [
        {"id": 1, "country": "PL"},
        {"id": 2, "country": "PL"},
    ]


def test_hive_null_partition_and_csv_files_in_partition_folders(make_job, read_parts, tmp_path) -> None:
    root = tmp_path / "data"
    _write(root / "day=2026-01-01" / "a.csv", [{"id": "x1", "title": "kawa"}])
    _write(root / "day=__HIVE_DEFAULT_PARTITION__" / "a.csv", [{"id": "x2", "title": "herbata"}])
    job_files = make_job(input=root, keep_columns=["day"])
    run_job(job_files.load())
    out = read_parts(job_files.output)
    assert out.column("day").to_pylist() == ["2026-01-01", None]


def test_partition_name_that_is_also_a_column_is_refused(tmp_path) -> None:
    write_table(tmp_path / "data" / "id=1" / "a.parquet", {"id": [1], "title": ["kawa"]})
    with pytest.raises(InputFormatError, match="both in the file and a partition folder"):
        open_inputs(str(tmp_path / "data"), tmp_path / "copies")


def test_files_under_different_partition_levels_are_refused(tmp_path) -> None:
    write_table(tmp_path / "data" / "a=1" / "x.parquet", {"t": ["kawa"]})
    write_table(tmp_path / "data" / "a=1" / "b=2" / "x.parquet", {"t": ["kawa"]})
    with pytest.raises(InputFormatError, match="different partition folders"):
        open_inputs(str(tmp_path / "data"), tmp_path / "copies")


# --- ~ in paths ----------------------------------------------------------------------------------


def test_tilde_in_input_is_expanded(make_job, read_parts, tmp_path, monkeypatch) -> None:
    home = tmp_path / "home-dir"
    monkeypatch.setenv("HOME", str(home))
    path = write_table(home / "exports" / "in.parquet", {"id": [1, 2], "title": ["kawa", "herbata"]})
    _write(home / "exports" / "in.csv", [{"id": 1, "title": "kawa"}])
    assert find_inputs("~/exports/in.parquet") == [path]
    assert find_inputs("~/exports") == [home / "exports" / "in.csv", path]
    job_files = make_job(input="~/exports/in.parquet", output="~/runs/one")
    run_job(job_files.load())
    assert read_parts(home / "runs" / "one").column("id").to_pylist() == [1, 2]


# --- one huge row group --------------------------------------------------------------------------


def _keywords(n: int) -> pa.Table:
    return pa.table(
        {"id": pa.array(range(n), pa.int64()), "title": [f"keyword {i % 97} {i}" for i in range(n)]}
    )


def test_one_row_group_decoded_once_however_many_chunks(tmp_path) -> None:
    one = open_inputs(str(write_table(tmp_path / "one.parquet", _keywords(1000))), tmp_path / "c")
    many = open_inputs(
        str(write_table(tmp_path / "many.parquet", _keywords(1000), row_group_size=100)), tmp_path / "c"
    )
    assert (len(one[0].row_group_rows), len(many[0].row_group_rows)) == (1, 10)
    tables = {}
    for name, files in (("one", one), ("many", many)):
        reader = ChunkReader(["id", "title"])
        chunks = plan_chunks(files, 70)  # 15 chunks, most of them across row group edges
        tables[name] = pa.concat_tables([reader.read(files[0], c) for c in chunks])
        assert reader.decoded == len(files[0].row_group_rows), name
    assert tables["one"].equals(tables["many"])
    assert tables["one"].equals(_keywords(1000))


def test_chunks_read_out_of_order_are_still_right(tmp_path) -> None:
    files = open_inputs(
        str(write_table(tmp_path / "a.parquet", _keywords(500), row_group_size=120)), tmp_path / "c"
    )
    chunks = plan_chunks(files, 50)
    reader = ChunkReader(["id"])
    # a resumed run starting mid-file, then a finished chunk's failed rows asked again
    for c in [chunks[5], chunks[6], chunks[2], chunks[9], chunks[0], chunks[1]]:
        assert reader.read(files[0], c).column("id").to_pylist() == list(range(c.start, c.start + c.rows))


class _CountingReader(ChunkReader):
    made: ClassVar[list[ChunkReader]] = []

    def __init__(self, columns) -> None:
        super().__init__(columns)
        _CountingReader.made.append(self)


def test_a_run_decodes_a_one_row_group_file_once(make_job, read_parts, tmp_path, monkeypatch) -> None:
    data = _keywords(600)
    one = make_job(input=write_table(tmp_path / "one.parquet", data), chunk_rows=64)
    many = make_job(input=write_table(tmp_path / "many.parquet", data, row_group_size=50), chunk_rows=64)
    monkeypatch.setattr(pipeline.labeller, "ChunkReader", _CountingReader)
    _CountingReader.made = []
    run_job(one.load())
    assert [r.decoded for r in _CountingReader.made] == [1]  # one reader for the run's 10 chunks
    run_job(many.load())
    a, b = read_parts(one.output), read_parts(many.output)
    assert a.drop_columns("id").equals(b.drop_columns("id")) and a.column("id") == b.column("id")


def test_validate_reads_a_csv_job(make_job, tmp_path) -> None:
    job = make_job(input=_write(tmp_path / "in.csv", _rows(5)))
    result = CliRunner().invoke(main, ["validate", str(job.path)])
    assert result.exit_code == 0, result.output
    assert "1 file(s), 5 rows" in result.output
    assert "Kawa ziarnista 1 kg #0" in result.output


def test_row_groups_bench_script_runs(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "row_groups.py"), "--rows", "3000", "--groups", "4",
         "--runs", "1", "--out", str(tmp_path / "f.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["row_groups"] == {"one": 1, "many": 4}
    assert figures["wall_ratio_one_to_many"] > 0 and figures["max_peak_rss_mb"]["one"] > 0


def test_partition_column_as_the_id_column(make_job, read_parts, tmp_path) -> None:
    root = tmp_path / "data"
    for sku in ("A-1", "B-2"):
        write_table(root / f"sku={sku}" / "part-0.parquet", {"title": [f"kawa {sku}"]})
    job_files = make_job(input=root, id_column="sku")
    run_job(job_files.load())
    assert read_parts(job_files.output).column("sku").to_pylist() == ["A-1", "B-2"]
    write_table(root / "sku=B-2" / "part-1.parquet", {"title": ["herbata"]})  # B-2 twice now
    with pytest.raises(DuplicateIdError, match="'B-2' x2"):
        plan_job(job_files.load())
