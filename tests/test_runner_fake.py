"""The whole chunk loop on the fake backend: rows in == rows out, types, statuses, resume, locks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LABELS, default_table, write_table
from doubles import RecordingFake

from pipeline.backends.fake import FakeBackend
from pipeline.config import JobConfig
from pipeline.contracts import STATUSES, Completion
from pipeline.errors import (
    ConfigError,
    DuplicateIdError,
    InputFormatError,
    JobChangedError,
    LabelmillError,
    RunLockedError,
    RunStateError,
)
from pipeline.plan import plan_job
from pipeline.runfolder import RunFolder
from pipeline.runner import run_job
from pipeline.text import row_texts

OUTPUT_TYPES = {
    "label": pa.string(),
    "confidence": pa.float64(),
    "status": pa.string(),
    "error": pa.string(),
    "prompt_tokens": pa.int32(),
    "output_tokens": pa.int32(),
    "cached_tokens": pa.int32(),
}


def quiet_run(job: JobConfig, restart: bool = False, backend=None) -> dict:
    return run_job(job, restart=restart, backend=backend)


def fake_label(job: JobConfig, text: str) -> str:
    """The label the fake backend gives a row whose cleaned text is ``text``."""
    plan = plan_job(job, check_id_values=False)
    answers = FakeBackend(job.backend_settings, plan.model).answer(
        plan.prompt, pl.Series([text], dtype=pl.String), plan.request
    )
    return answers.column("text")[0].as_py()


def by_id(table: pa.Table) -> dict:
    return {row["id"]: row for row in table.to_pylist()}


# --- rows in == rows out -------------------------------------------------------------------------


def test_rows_in_equal_rows_out_across_chunks(make_job, read_parts) -> None:
    job_files = make_job(default_table(25), chunk_rows=10, keep_columns=["title"])
    job = job_files.load()
    summary = quiet_run(job)
    out = read_parts(job_files.output)
    assert out.num_rows == 25
    assert out.column("id").to_pylist() == list(range(1000, 1025))
    assert out.column("title").to_pylist() == default_table(25).column("title").to_pylist()
    assert len(list((job_files.output / "parts").glob("part-*.parquet"))) == 3
    assert len(list((job_files.output / "done").glob("chunk-*.json"))) == 3
    assert summary["complete"] is True
    assert summary["rows_done"] == summary["rows_total"] == 25
    assert summary["chunks_done"] == summary["chunks_total"] == 3
    assert summary["status_counts"] == {"ok": 25, "truncated": 0, "empty_input": 0, "invalid": 0, "error": 0}
    assert summary["this_invocation"]["chunks_labelled"] == 3
    assert summary["this_invocation"]["chunks_resumed"] == 0
    assert json.loads((job_files.output / "summary.json").read_text())["rows_done"] == 25


def test_rows_in_equal_rows_out_across_files(make_job, read_parts, tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    write_table(folder / "a.parquet", default_table(13), row_group_size=4)
    b = default_table(21)
    b = b.set_column(0, "id", pa.array(range(2000, 2021), pa.int64()))
    write_table(folder / "b.parquet", b, row_group_size=5)
    write_table(folder / "c.parquet", default_table(0).set_column(0, "id", pa.array([], pa.int64())))
    job_files = make_job(input=folder, chunk_rows=6)
    summary = quiet_run(job_files.load())
    out = read_parts(job_files.output)
    expected = list(range(1000, 1013)) + list(range(2000, 2021))
    assert out.column("id").to_pylist() == expected
    assert len(set(out.column("id").to_pylist())) == out.num_rows == 34
    assert summary["chunks_total"] == 3 + 4  # chunks never span files
    assert summary["rows_total"] == 34


def test_output_schema_and_types(make_job, read_parts) -> None:
    job_files = make_job(default_table(12), chunk_rows=5, keep_columns=["brand"])
    quiet_run(job_files.load())
    out = read_parts(job_files.output)
    assert out.column_names == ["id", "brand", *OUTPUT_TYPES]
    assert out.schema.field("id").type == pa.int64()
    assert out.schema.field("brand").type == pa.string()
    for name, typ in OUTPUT_TYPES.items():
        assert out.schema.field(name).type == typ, name
    for part in sorted((job_files.output / "parts").glob("part-*.parquet")):
        schema = pq.read_schema(part)
        assert schema.field("id").type == pa.int64()
        assert schema.field("status").nullable is False


def test_labels_and_confidence_are_valid(make_job, read_parts) -> None:
    job_files = make_job(default_table(40), chunk_rows=16)
    quiet_run(job_files.load())
    out = read_parts(job_files.output).to_pylist()
    assert {r["status"] for r in out} == {"ok"}
    assert all(r["label"] in LABELS for r in out)
    assert all(0.0 <= r["confidence"] <= 1.0 for r in out)
    assert all(r["error"] is None for r in out)
    assert all(r["prompt_tokens"] > 0 and r["output_tokens"] > 0 for r in out)
    # 40 distinct titles hashed over 4 labels: more than one label is used
    assert len({r["label"] for r in out}) > 1


@pytest.mark.parametrize("id_type", [pa.int32(), pa.string(), pa.large_string()])
def test_id_type_is_preserved(make_job, read_parts, id_type: pa.DataType) -> None:
    values = list(range(7)) if pa.types.is_integer(id_type) else [f"sku-{i}" for i in range(7)]
    data = pa.table({"id": pa.array(values, id_type), "title": [f"t{i}" for i in range(7)]})
    job_files = make_job(data, chunk_rows=3)
    quiet_run(job_files.load())
    out = read_parts(job_files.output)
    assert out.schema.field("id").type == id_type
    assert out.column("id").to_pylist() == values


def test_labels_are_deterministic(make_job, read_parts) -> None:
    a = make_job(default_table(15), name="a")
    b = make_job(default_table(15), name="b", chunk_rows=4)
    quiet_run(a.load())
    quiet_run(b.load())
    assert read_parts(a.output).column("label") == read_parts(b.output).column("label")


# --- awkward text --------------------------------------------------------------------------------


def test_null_blank_and_whitespace_text_is_empty_input(make_job, read_parts) -> None:
    titles = ["Green tea", None, "", "   ", "\t\n ", "\x00\x07", "Coffee beans"]
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": pa.array(titles, pa.string())})
    job_files = make_job(data, chunk_rows=3)
    summary = quiet_run(job_files.load())
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] + ["empty_input"] * 5 + ["ok"]
    for r in rows[1:6]:
        assert r["label"] is None
        assert r["confidence"] is None
        assert r["error"]
        assert r["prompt_tokens"] is None
    assert rows[0]["label"] in LABELS and rows[6]["label"] in LABELS
    assert summary["status_counts"]["empty_input"] == 5
    assert summary["status_counts"]["ok"] == 2


def test_control_characters_emoji_and_long_text(make_job, read_parts) -> None:
    long_text = ("Kawa ziarnista 1 kg, palona średnio 🫘 " * 3000)[:100_000]
    assert len(long_text.encode("utf-8")) > 100_000
    titles = [
        "Tea\x00with\x07bells\x1b[31m red\x7f\x9f end",
        "Coffee ☕🫖 with emoji 👩‍👩‍👧 family",
        long_text,
        "Tab\tand\nnewline stay",
        "\u200b zero width and \u00a0 nbsp",
    ]
    data = pa.table({"id": pa.array(range(5), pa.int64()), "title": titles})
    job_files = make_job(data, chunk_rows=2, keep_columns=["title"])
    job = job_files.load()
    quiet_run(job)
    out = read_parts(job_files.output)
    rows = out.to_pylist()
    assert out.num_rows == 5
    assert all(r["status"] == "ok" and r["label"] in LABELS for r in rows)
    # the kept column is the input as it was, control characters and all
    assert out.column("title").to_pylist() == titles
    # control characters became spaces before the text went to the model
    assert rows[0]["label"] == fake_label(job, "Tea with bells [31m red   end")
    assert rows[1]["label"] == fake_label(job, titles[1])
    assert rows[2]["label"] == fake_label(job, long_text.strip())
    assert rows[3]["label"] == fake_label(job, titles[3])
    assert rows[2]["prompt_tokens"] > 25_000


def test_invalid_utf8_in_binary_column(make_job, read_parts) -> None:
    raw = [b"Green tea", b"caf\xe9 au lait", b"\xff\xfe\xfd", None, b"ok \xc3\xa9 ok"]
    data = pa.table({"id": pa.array(range(5), pa.int64()), "title": pa.array(raw, pa.binary())})
    job_files = make_job(data, chunk_rows=2)
    job = job_files.load()
    quiet_run(job)
    rows = read_parts(job_files.output).to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "empty_input", "ok"]
    assert rows[1]["label"] == fake_label(job, "caf\ufffd au lait")
    assert rows[2]["label"] == fake_label(job, "\ufffd\ufffd\ufffd")
    assert rows[4]["label"] == fake_label(job, "ok é ok")


def test_invalid_utf8_in_string_column(make_job, read_parts) -> None:
    # another tool wrote bytes that are not UTF-8 into a Parquet string column
    raw = pa.array([b"Green tea", b"bad \xff\xfe bytes", None], pa.binary())
    strings = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), null_count=raw.null_count)
    data = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "title": strings})
    job_files = make_job(data)
    job = job_files.load()
    quiet_run(job)
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "empty_input"]
    assert rows[1]["label"] == fake_label(job, "bad \ufffd\ufffd bytes")


def test_numeric_text_column_is_cast_to_text(make_job, read_parts) -> None:
    data = pa.table(
        {"id": pa.array([1, 2, 3], pa.int64()), "code": pa.array([5901234, None, 42], pa.int64())}
    )
    job_files = make_job(data, text_column="code")
    job = job_files.load()
    quiet_run(job)
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "empty_input", "ok"]
    assert rows[0]["label"] == fake_label(job, "5901234")


def test_max_input_tokens_marks_long_rows_truncated(make_job, read_parts) -> None:
    # the fake backend counts 4 UTF-8 bytes per token: 5 tokens = 20 bytes
    titles = ["short", "exactly twenty bytes", "this title is clearly longer than twenty bytes", "ż" * 30]
    data = pa.table({"id": pa.array(range(4), pa.int64()), "title": titles})
    job_files = make_job(data, max_input_tokens=5)
    job = job_files.load()
    summary = quiet_run(job)
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "truncated", "truncated"]
    for r in rows[2:]:
        assert r["label"] in LABELS
        assert r["confidence"] is not None
        assert "cut" in r["error"]
    assert rows[2]["label"] == fake_label(job, titles[2][:20])
    assert rows[3]["label"] == fake_label(job, "ż" * 10)
    assert summary["status_counts"]["truncated"] == 2


def test_max_model_len_limits_text_too(make_job, read_parts) -> None:
    long = "word " * 400
    data = pa.table({"id": pa.array([1, 2], pa.int64()), "title": ["tiny", long]})
    job_files = make_job(data, fake={"max_model_len": 200})
    quiet_run(job_files.load())
    assert [r["status"] for r in read_parts(job_files.output).to_pylist()] == ["ok", "truncated"]


def test_max_model_len_too_small_for_the_prompt(make_job) -> None:
    job_files = make_job(fake={"max_model_len": 20})
    with pytest.raises(ConfigError, match="no room"):
        quiet_run(job_files.load())


def test_fixing_a_job_that_failed_before_any_chunk_needs_no_restart(make_job, read_parts) -> None:
    # The first try fails at the token budget check, after the run folder was prepared but
    # before any chunk was labelled. With nothing finished there is nothing to protect, so the
    # corrected job should simply run.
    job_files = make_job(default_table(4), fake={"max_model_len": 20})
    with pytest.raises(ConfigError, match="no room"):
        quiet_run(job_files.load())
    assert RunFolder(job_files.output).finished() == {}
    job_files.rewrite(fake={"max_model_len": 4096})
    summary = quiet_run(job_files.load())
    assert summary["complete"] is True
    assert read_parts(job_files.output).num_rows == 4


def test_text_column_of_an_unsupported_type_is_refused_clearly(make_job) -> None:
    data = pa.table({"id": pa.array([1, 2], pa.int64()), "title": pa.array([["a", "b"], None])})
    job_files = make_job(data)
    with pytest.raises(LabelmillError) as info:
        quiet_run(job_files.load())
    assert "title" in str(info.value)


def test_text_template_over_two_columns_with_nulls(make_job, read_parts) -> None:
    data = pa.table(
        {
            "id": pa.array(range(4), pa.int64()),
            "title": ["Green tea", None, "Running shoes", None],
            "brand": [None, "Lipton", "  Asics ", None],
        }
    )
    job_files = make_job(data, text_column=None, text_template="{title} (brand: {brand})")
    job = job_files.load()
    table = pq.read_table(job_files.input)
    assert row_texts(table, None, job.text_template) == [
        "Green tea (brand: )",
        "(brand: Lipton)",
        "Running shoes (brand: Asics)",
        None,
    ]
    quiet_run(job)
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "empty_input"]
    assert rows[0]["label"] == fake_label(job, "Green tea (brand: )")
    assert rows[1]["label"] == fake_label(job, "(brand: Lipton)")
    assert rows[2]["label"] == fake_label(job, "Running shoes (brand: Asics)")
    assert rows[3]["label"] is None


def test_text_template_missing_column_refused(make_job) -> None:
    job_files = make_job(text_column=None, text_template="{title} by {maker}")
    with pytest.raises(InputFormatError, match="'maker'"):
        quiet_run(job_files.load())
    assert not job_files.output.exists()


def test_answers_outside_the_label_set_become_invalid_rows(make_job, read_parts) -> None:
    def reply(messages, answer, request):
        if "HALLUCINATE" in messages[-1]["content"]:
            return Completion("Not a label", -0.1, answer.prompt_tokens, 3, "stop")
        if "CUT" in messages[-1]["content"]:
            return Completion("Cof", -0.1, answer.prompt_tokens, request.max_tokens, "length")
        if "SPACED" in messages[-1]["content"]:
            return Completion(" Tea\n", -0.5, answer.prompt_tokens, 2, "stop")
        return answer

    titles = ["Green tea", "HALLUCINATE please", "CUT short", "SPACED answer"]
    data = pa.table({"id": pa.array(range(4), pa.int64()), "title": titles})
    job_files = make_job(data)
    job = job_files.load()
    summary = quiet_run(job, backend=RecordingFake(job, reply))
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "invalid", "invalid", "ok"]
    assert rows[1]["label"] is None and rows[1]["confidence"] is None
    assert "not one of the labels" in rows[1]["error"]
    assert "'Not a label'" in rows[1]["error"]
    assert rows[2]["label"] is None
    assert "max_tokens" in rows[2]["error"]
    assert rows[3]["label"] == "Tea"
    assert rows[3]["confidence"] == pytest.approx(math.exp(-0.5))
    assert summary["status_counts"]["invalid"] == 2
    assert summary["status_counts"]["error"] == 0
    assert summary["rows_done"] == 4


def test_id_column_listed_in_keep_columns_appears_once(make_job, read_parts) -> None:
    job_files = make_job(default_table(5), keep_columns=["id", "title"])
    quiet_run(job_files.load())
    out = read_parts(job_files.output)
    assert out.column_names == ["id", "title", *OUTPUT_TYPES]


# --- generated ids -------------------------------------------------------------------------------


def test_generated_ids_single_file(make_job, read_parts) -> None:
    job_files = make_job(default_table(12), id_column=None, chunk_rows=5, keep_columns=["id"])
    quiet_run(job_files.load())
    out = read_parts(job_files.output)
    assert out.column_names[0] == "row_id"
    assert out.schema.field("row_id").type == pa.string()
    assert out.column("row_id").to_pylist() == [f"input.parquet:{i}" for i in range(12)]
    assert out.column("id").to_pylist() == list(range(1000, 1012))
    manifest = json.loads((job_files.output / "run.json").read_text())
    assert manifest["id_column"] == "row_id"


def test_generated_ids_several_files(make_job, read_parts, tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    write_table(folder / "a.parquet", default_table(4))
    write_table(folder / "b.parquet", default_table(3))
    job_files = make_job(input=folder, id_column=None, chunk_rows=3)
    quiet_run(job_files.load())
    ids = read_parts(job_files.output).column("row_id").to_pylist()
    assert ids == [
        "a.parquet:0",
        "a.parquet:1",
        "a.parquet:2",
        "a.parquet:3",
        "b.parquet:0",
        "b.parquet:1",
        "b.parquet:2",
    ]
    assert len(set(ids)) == len(ids)


def test_generated_ids_same_file_name_in_two_folders_stay_unique(make_job, read_parts, tmp_path) -> None:
    write_table(tmp_path / "inputs" / "2024" / "data.parquet", default_table(2))
    write_table(tmp_path / "inputs" / "2025" / "data.parquet", default_table(2))
    job_files = make_job(input=str(tmp_path / "inputs" / "*" / "data.parquet"), id_column=None)
    quiet_run(job_files.load())
    ids = read_parts(job_files.output).column("row_id").to_pylist()
    assert ids == ["2024/data.parquet:0", "2024/data.parquet:1", "2025/data.parquet:0", "2025/data.parquet:1"]


def test_duplicate_ids_refused_before_any_work(make_job) -> None:
    data = pa.table({"id": pa.array([1, 2, 2], pa.int64()), "title": ["a", "b", "c"]})
    job_files = make_job(data)
    with pytest.raises(DuplicateIdError):
        quiet_run(job_files.load())
    assert not job_files.output.exists()


@pytest.mark.parametrize(
    ("overrides", "clash"),
    [
        ({"keep_columns": ["label"]}, "label"),
        ({"keep_columns": ["title", "status"]}, "status"),
        ({"id_column": "confidence"}, "confidence"),
        ({"id_column": None, "keep_columns": ["row_id"]}, "row_id"),
    ],
)
def test_clashing_column_names_refused_before_anything_runs(make_job, overrides: dict, clash: str) -> None:
    data = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "title": ["a", "b"],
            "label": ["x", "y"],
            "status": ["x", "y"],
            "confidence": pa.array([1, 2], pa.int64()),
            "row_id": ["r1", "r2"],
        }
    )
    job_files = make_job(data, **overrides)
    with pytest.raises(ConfigError) as info:
        quiet_run(job_files.load())
    assert f"'{clash}'" in str(info.value)
    assert not job_files.output.exists()


# --- resume --------------------------------------------------------------------------------------


def test_rerun_of_a_finished_run_does_nothing(make_job, read_parts) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    first = quiet_run(job_files.load())
    before = read_parts(job_files.output)
    again = quiet_run(job_files.load())
    assert again["this_invocation"]["chunks_labelled"] == 0
    assert again["this_invocation"]["chunks_resumed"] == 3
    assert again["this_invocation"]["rows_labelled"] == 0
    assert again["fingerprint"] == first["fingerprint"]
    assert read_parts(job_files.output).equals(before, check_metadata=True)


def test_resume_after_losing_last_part_and_marker(make_job, read_parts) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    quiet_run(job_files.load())
    before = read_parts(job_files.output)
    folder = RunFolder(job_files.output)
    folder.part_path(2).unlink()
    folder.marker_path(2).unlink()
    summary = quiet_run(job_files.load())
    assert summary["this_invocation"]["chunks_resumed"] == 2
    assert summary["this_invocation"]["chunks_labelled"] == 1
    assert summary["this_invocation"]["rows_labelled"] == 5
    assert summary["complete"] is True
    assert summary["rows_done"] == 25
    assert read_parts(job_files.output).equals(before, check_metadata=True)


def test_resume_after_losing_only_the_marker(make_job, read_parts) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    quiet_run(job_files.load())
    before = read_parts(job_files.output)
    folder = RunFolder(job_files.output)
    folder.marker_path(2).unlink()
    assert set(folder.finished()) == {0, 1}
    summary = quiet_run(job_files.load())
    assert summary["this_invocation"]["chunks_resumed"] == 2
    assert summary["this_invocation"]["chunks_labelled"] == 1
    assert summary["complete"] is True
    assert read_parts(job_files.output).equals(before, check_metadata=True)
    assert json.loads(folder.marker_path(2).read_text())["rows"] == 5


def test_resume_after_losing_a_middle_part_only(make_job, read_parts) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    quiet_run(job_files.load())
    before = read_parts(job_files.output)
    folder = RunFolder(job_files.output)
    folder.part_path(1).unlink()  # marker left: it no longer vouches for anything
    summary = quiet_run(job_files.load())
    assert summary["this_invocation"]["chunks_labelled"] == 1
    assert summary["this_invocation"]["chunks_resumed"] == 2
    assert read_parts(job_files.output).equals(before, check_metadata=True)


def test_resume_removes_stale_temporary_files(make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    quiet_run(job_files.load())
    stale = job_files.output / "parts" / ".part-00001.parquet.tmp-99999"
    stale.write_bytes(b"half a file")
    quiet_run(job_files.load())
    assert not stale.exists()


def test_changed_labels_refused_naming_labels(make_job, read_parts) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    quiet_run(job_files.load())
    job_files.rewrite(labels=["Coffee", "Tea", "Vitamin", "Shoes", "Sunscreen"])
    with pytest.raises(JobChangedError) as info:
        quiet_run(job_files.load())
    assert "labels" in str(info.value)
    assert "--restart" in str(info.value)
    changed = str(info.value).split("was started: ", 1)[1].split(" differ", 1)[0]
    assert changed.split(", ") == ["labels", "prompt"]
    # nothing on disk was touched by the refusal
    assert read_parts(job_files.output).num_rows == 12
    assert JobChangedError("x").exit_code == 3


def test_changed_input_refused_naming_input(make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    quiet_run(job_files.load())
    write_table(job_files.input, default_table(13))
    with pytest.raises(JobChangedError, match="input"):
        quiet_run(job_files.load())


def test_speed_only_setting_change_is_not_a_job_change(make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    first = quiet_run(job_files.load())
    job_files.rewrite(
        engine={"enforce_eager": True, "gpu_memory_utilization": 0.5}, fake={"seconds_per_row": 0}
    )
    second = quiet_run(job_files.load())
    assert second["fingerprint"] == first["fingerprint"]
    assert second["this_invocation"]["chunks_resumed"] == 3


def test_restart_after_a_job_change(make_job, read_parts) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    quiet_run(job_files.load())
    new_labels = ["Kawa", "Herbata"]
    job_files.rewrite(labels=new_labels, chunk_rows=4)
    summary = quiet_run(job_files.load(), restart=True)
    assert summary["this_invocation"]["chunks_resumed"] == 0
    assert summary["this_invocation"]["chunks_labelled"] == 3
    assert summary["complete"] is True
    out = read_parts(job_files.output)
    assert out.num_rows == 12
    assert set(out.column("label").to_pylist()) <= set(new_labels)
    assert len(list((job_files.output / "parts").glob("part-*.parquet"))) == 3
    manifest = json.loads((job_files.output / "run.json").read_text())
    assert manifest["provenance"]["labels"] == new_labels
    assert manifest["fingerprint"] == summary["fingerprint"]
    # and the restarted run now resumes normally
    assert quiet_run(job_files.load())["this_invocation"]["chunks_resumed"] == 3


# --- lock ----------------------------------------------------------------------------------------

_HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    fh = open(sys.argv[1], "a+")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.seek(0); fh.truncate(); fh.write(f"process {os.getpid()}"); fh.flush()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_run_locked_by_another_process(make_job, read_parts) -> None:
    job_files = make_job(default_table(6), chunk_rows=5)
    job_files.output.mkdir(parents=True)
    lock = job_files.output / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert RunFolder(job_files.output).is_locked()
        with pytest.raises(RunLockedError) as info:
            quiet_run(job_files.load())
        assert f"process {holder.pid}" in str(info.value)
        assert RunLockedError("x").exit_code == 3
        assert not (job_files.output / "parts").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # the kernel dropped the lock with the process: the run goes ahead now
    assert not RunFolder(job_files.output).is_locked()
    summary = quiet_run(job_files.load())
    assert summary["complete"] is True
    assert read_parts(job_files.output).num_rows == 6


# --- provenance ----------------------------------------------------------------------------------


def test_parquet_metadata_holds_the_job_fingerprint(make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    summary = quiet_run(job_files.load())
    manifest = json.loads((job_files.output / "run.json").read_text())
    for index, part in enumerate(sorted((job_files.output / "parts").glob("part-*.parquet"))):
        meta = pq.read_schema(part).metadata
        assert b"labelmill" in meta
        info = json.loads(meta[b"labelmill"])
        assert info["job_fingerprint"] == manifest["fingerprint"] == summary["fingerprint"]
        assert info["chunk"] == index
        assert info["model"] == "fake"
        assert info["prompt_fingerprint"] == manifest["provenance"]["prompt_fingerprint"]


def test_run_json_provenance(make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    job = job_files.load()
    quiet_run(job)
    manifest = json.loads((job_files.output / "run.json").read_text())
    plan = plan_job(job)
    prov = manifest["provenance"]
    assert prov["model"] == "fake"
    assert prov["backend"] == "fake"
    assert prov["prompt_fingerprint"] == plan.prompt.fingerprint
    assert len(prov["prompt_fingerprint"]) == 16
    assert prov["labels"] == LABELS
    assert manifest["rows"] == 12
    assert manifest["chunks"] == 3
    assert manifest["chunk_rows"] == 5
    assert manifest["task"] == "classify"
    assert set(manifest["components"]) >= {"input", "labels", "prompt", "model"}
    assert (job_files.output / "job.yaml").is_file()


def test_markers_count_statuses_and_tokens(make_job, read_parts) -> None:
    titles = ["Green tea", None, "Coffee", "Shoes", " "]
    data = pa.table({"id": pa.array(range(5), pa.int64()), "title": titles})
    job_files = make_job(data, chunk_rows=5)
    quiet_run(job_files.load())
    marker = json.loads(RunFolder(job_files.output).marker_path(0).read_text())
    out = read_parts(job_files.output)
    assert marker["rows"] == 5
    assert marker["status_counts"] == {"ok": 3, "truncated": 0, "empty_input": 2, "invalid": 0, "error": 0}
    assert marker["prompt_tokens"] == sum(x or 0 for x in out.column("prompt_tokens").to_pylist())
    assert marker["part"] == "parts/part-00000.parquet"


def test_statuses_constant_matches_summary_keys(make_job) -> None:
    summary = quiet_run(make_job(default_table(3)).load())
    assert list(summary["status_counts"]) == list(STATUSES)


def test_rows_the_backend_failed_on_are_retried_on_rerun(make_job, read_parts) -> None:
    def flaky(messages, answer, request):
        # the first pass over the 3 chunks: every "FLAKY" row fails
        if len(backend.batches) <= 3 and "FLAKY" in messages[-1]["content"]:
            return Completion.failed("HTTP 503 after 5 retries", retries=5)
        return answer

    titles = [f"FLAKY row {i}" if i in (3, 17) else f"Green tea {i}" for i in range(25)]
    data = pa.table({"id": pa.array(range(25), pa.int64()), "title": titles})
    job_files = make_job(data, chunk_rows=10)
    backend = RecordingFake(job_files.load(), flaky)
    calls = backend.batches
    first = quiet_run(job_files.load(), backend=backend)
    assert first["status_counts"]["error"] == 2
    assert first["retries"] == 10
    before = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in before if r["id"] in (3, 17)] == ["error", "error"]
    assert all(r["label"] is None for r in before if r["status"] == "error")

    second = quiet_run(job_files.load(), backend=backend)
    # Only the two failed rows went to the backend again, one call per chunk that held them.
    assert calls[3:] == [1, 1]
    assert second["status_counts"]["error"] == 0
    assert second["status_counts"]["ok"] == 25
    assert second["this_invocation"]["chunks_retried"] == 2
    after = read_parts(job_files.output).to_pylist()
    assert [r["id"] for r in after] == list(range(25))
    unchanged = [(a["label"], a["confidence"]) for a in after if a["id"] not in (3, 17)]
    assert unchanged == [(b["label"], b["confidence"]) for b in before if b["id"] not in (3, 17)]
    assert all(r["label"] for r in after)


def test_a_damaged_marker_or_manifest_is_redone_and_said(make_job, read_parts, caplog) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    quiet_run(job_files.load())
    before = read_parts(job_files.output).to_pylist()
    marker = RunFolder(job_files.output).marker_path(1)
    marker.write_text('{"chunk": 1, "rows": ')
    summary = quiet_run(job_files.load())
    assert summary["this_invocation"]["chunks_labelled"] == 1
    assert any(
        "chunk-00001.json is damaged" in r.message and "labelled again" in r.message for r in caplog.records
    )
    assert read_parts(job_files.output).to_pylist() == before
    (job_files.output / "run.json").write_text("{}")
    summary = quiet_run(job_files.load())
    assert summary["this_invocation"]["chunks_labelled"] == 0  # same job: run.json written again
    assert json.loads((job_files.output / "run.json").read_text())["rows"] == 12
    # status names a damaged run.json instead of a traceback
    (job_files.output / "run.json").write_text("{}")
    with pytest.raises(RunStateError, match=r"run\.json is damaged"):
        RunFolder(job_files.output).manifest()
