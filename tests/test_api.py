"""The Python API (``from pipeline import load_job, run_job``), its seams, the logs, and what a
missing optional package does."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml
from click.testing import CliRunner
from conftest import default_table
from doubles import RecordingFake
from test_bench import setup  # noqa: F401  (the bench fixture: a job, profiles and prices)

from pipeline import load_job, run_job
from pipeline.backends.fake import FakeBackend, FakeSettings
from pipeline.cache import ResultCache
from pipeline.cli import main
from pipeline.errors import ConfigError, MissingDependencyError
from pipeline.plan import make_backend, plan_job


def test_the_api_runs_a_job_like_the_command(make_job, read_parts):
    job_files = make_job(default_table(12), chunk_rows=5)
    summary = run_job(load_job(job_files.path))
    assert summary["complete"] and summary["rows_done"] == 12
    again = CliRunner().invoke(main, ["run", "--quiet", str(job_files.path)])
    assert again.exit_code == 0 and "resuming: 3/3 chunks already done" in again.output
    assert read_parts(job_files.output).num_rows == 12


def test_the_answer_store_is_injectable(make_job, tmp_path):
    job = make_job(default_table(6), chunk_rows=2).load()
    store = ResultCache(tmp_path / "my-store", plan_job(job).namespace, file_rows=2)
    summary = run_job(job, store=store)
    assert summary["model_calls"] == 6 and "cache" not in summary  # the caller's store, not the cache
    store.close()
    assert len(ResultCache(tmp_path / "my-store", plan_job(job).namespace)) == 6
    assert len(list((tmp_path / "my-store").glob("*/seg-*.arrows"))) == 3  # its own file size: 2 answers
    assert not (tmp_path / "home" / "cache").exists()


def test_an_injected_backend_is_used_and_left_open(make_job):
    job = make_job(default_table(4)).load()
    backend = RecordingFake(job)
    run_job(job, backend=backend)
    assert len(backend.asked) == 4
    assert backend.starts == 0  # the cache is on: nothing made it start early, and close is the caller's


def test_a_backend_built_for_another_job_is_refused(make_job):
    job = make_job(default_table(4)).load()
    with pytest.raises(ConfigError, match="other settings"):
        run_job(job, backend=FakeBackend(FakeSettings(seconds_per_row=0.5), "fake"))
    with pytest.raises(ConfigError, match="model 'other'"):
        run_job(job, backend=FakeBackend(FakeSettings(), "other"))
    assert isinstance(make_backend(plan_job(job)), FakeBackend)


def test_json_logs_carry_the_events_of_a_nightly_run(make_job):
    job_files = make_job(default_table(12), chunk_rows=5)
    result = CliRunner().invoke(main, ["--log-format", "json", "run", str(job_files.path)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stderr.splitlines()]
    events = [r.get("event") for r in records]
    assert events[0] == "start" and events.count("chunk_done") == 3 and events[-1] == "summary"
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    done = [r for r in records if r.get("event") == "chunk_done"]
    assert [r["chunk"] for r in done] == [0, 1, 2] and [r["rows"] for r in done] == [5, 5, 2]
    assert records[-1]["summary"]["rows_done"] == 12
    assert "chunks  3/3" not in result.output  # no table for people in a log collector's stream

    resumed = CliRunner().invoke(main, ["--log-format", "json", "run", str(job_files.path)])
    assert "resume" in [json.loads(line).get("event") for line in resumed.stderr.splitlines()]


def test_text_logs_are_timestamped(make_job):
    result = CliRunner().invoke(main, ["run", "--quiet", str(make_job(default_table(3)).path)])
    assert result.exit_code == 0
    started = next(line for line in result.stderr.splitlines() if "labelmill.run" in line)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} INFO labelmill\.run: run ", started), started


def test_eval_and_bench_without_matplotlib(setup, monkeypatch):  # noqa: F811
    job, tmp = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it looks like
    args = ["bench", str(job.path), "--backends", "fake", "--sample", "10", "--out", str(tmp / "b"),
            "--profiles", str(tmp / "profiles.yaml"), "--prices", str(tmp / "prices.yaml")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == MissingDependencyError.exit_code == 7, result.output
    assert "matplotlib" in result.output and "--no-charts" in result.output
    assert not (tmp / "b").exists()  # refused before any run, not after an hour of them
    result = CliRunner().invoke(main, [*args, "--no-charts"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp / "b").glob("bench.*")) == ["bench.json", "bench.md"]


def test_profiles_switch_backends_and_leave_other_sections_unused(make_job, tmp_path):
    job_files = make_job(engine={"dtype": "float32"}, fake={"seconds_per_row": 0})
    result = CliRunner().invoke(main, ["validate", str(job_files.path)])
    assert result.exit_code == 0, result.output
    assert "section(s) engine belong to other backends: not used by fake" in result.output
    written = yaml.safe_load((tmp_path / "job1" / "job.yaml").read_text())
    assert written["engine"] == {"dtype": "float32"}


def test_job_yaml_round_trips(make_job):
    job = make_job(default_table(3), keep_columns=["title"]).load()
    run_job(job)
    again = load_job(job.output + "/job.yaml")  # the written job names every resolved key
    assert again == job and again.to_dict() == job.to_dict()


def test_with_json_logs_errors_are_json_records_too(make_job, tmp_path):
    job_files = make_job(default_table(3), chunk_rows=2)
    (job_files.input).write_bytes(b"not parquet")
    result = CliRunner().invoke(main, ["--log-format", "json", "run", str(job_files.path)])
    assert result.exit_code == 2
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert (
        record["event"] == "error"
        and record["exit_code"] == 2
        and "not a readable Parquet" in record["message"]
    )
