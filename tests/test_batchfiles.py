"""Batch JSONL round trip: export, answer every request through a real HTTP server, import."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from click.testing import CliRunner
from fault_server import FaultServer

from pipeline.batchfiles import export, import_results
from pipeline.cli import main
from pipeline.config import load_job
from pipeline.errors import ConfigError, InputFormatError
from pipeline.runner import run

KEY = "sk-batch-test-0b7e"
ENV = "LABELMILL_BATCH_TEST_KEY"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with FaultServer(KEY) as srv:
        yield srv


def _job(make_job, server, name, titles, **api):
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})
    return make_job(
        data,
        name=name,
        backend="openai",
        model="served-model",
        keep_columns=["title"],
        chunk_rows=4,
        api={"base_url": server.base_url, "api_key_env": ENV, "max_retries": 0, **api},
    )


def _answer_batch(server: FaultServer, request_files: list[Path], out: Path, skip: set[str]) -> Path:
    """What a batch runner does: send each request line, write OpenAI's result line format."""
    with out.open("w") as fh:
        for path in request_files:
            for raw in path.read_text().splitlines():
                req = json.loads(raw)
                if req["custom_id"] in skip:
                    continue
                resp = httpx.post(
                    server.base_url.removesuffix("/v1") + req["url"],
                    json=req["body"],
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                line = {
                    "id": "batch_req_" + req["custom_id"],
                    "custom_id": req["custom_id"],
                    "response": {"status_code": resp.status_code, "request_id": "x", "body": resp.json()},
                    "error": None,
                }
                fh.write(json.dumps(line) + "\n")
    return out


def test_round_trip_gives_the_labels_of_a_live_run(make_job, read_parts, server, tmp_path):
    titles = [f"Green tea {i}" for i in range(9)] + ["", "OUTSIDE x"]
    live = _job(make_job, server, "live", titles)
    run(load_job(live.path), progress=False, log=lambda _m: None)

    batch = _job(make_job, server, "batch", titles)
    job = load_job(batch.path)
    result = export(job, tmp_path / "requests", max_requests=4)
    assert result["requests"] == 10  # the empty row needs no request
    files = [tmp_path / "requests" / f for f in result["files"]]
    assert len(files) == 3  # 4 + 4 + 2, split by max_requests
    first = json.loads(files[0].read_text().splitlines()[0])
    assert first["method"] == "POST" and first["url"] == "/v1/chat/completions"
    assert first["body"]["structured_outputs"] == {"choice": batch.spec["labels"]}
    assert KEY not in "".join(f.read_text() for f in files)

    answers = _answer_batch(server, files, tmp_path / "results.jsonl", skip={"c1-r2"})
    summary = import_results(job, [str(answers)])
    assert summary["import"]["rows_without_answer"] == 1

    got = read_parts(batch.output).to_pylist()
    want = read_parts(live.output).to_pylist()
    assert [r["id"] for r in got] == list(range(len(titles)))
    skipped = 6  # chunk 1, row 2
    for g, w in zip(got, want, strict=True):
        if g["id"] == skipped:
            assert g["status"] == "error" and "no answer" in g["error"]
        else:
            assert (g["label"], g["status"], g["confidence"]) == (w["label"], w["status"], w["confidence"])

    # The row the batch missed goes through the live API on the next run of the same job.
    again = run(job, progress=False, log=lambda _m: None)
    assert again["status_counts"]["error"] == 0
    fixed = {r["id"]: r for r in read_parts(batch.output).to_pylist()}
    assert fixed[skipped]["label"] == {r["id"]: r for r in want}[skipped]["label"]


def test_export_splits_by_size(make_job, server, tmp_path):
    job = load_job(_job(make_job, server, "size", [f"Coffee beans {i}" for i in range(6)]).path)
    result = export(job, tmp_path / "req", max_bytes=1)  # every line alone exceeds it
    assert len(result["files"]) == 6


def test_export_needs_an_api_job(make_job, tmp_path):
    job = make_job()  # fake backend
    with pytest.raises(ConfigError, match="backend: openai"):
        export(load_job(job.path), tmp_path / "req")


def test_import_refuses_request_files_and_foreign_ids(make_job, server, tmp_path):
    job = load_job(_job(make_job, server, "refuse", ["Tea"]).path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(InputFormatError, match="line 1"):
        import_results(job, [str(bad)])
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(
        json.dumps({"custom_id": "request-1", "response": {"status_code": 200, "body": {}}}) + "\n"
    )
    with pytest.raises(InputFormatError, match="request-1"):
        import_results(job, [str(foreign)])


def test_failed_batch_lines_become_error_rows(make_job, read_parts, server, tmp_path):
    job_files = _job(make_job, server, "failed", ["Tea one", "Tea two"])
    results = tmp_path / "r.jsonl"
    results.write_text(
        json.dumps(
            {"custom_id": "c0-r0", "response": None, "error": {"code": "server_error", "message": "boom"}}
        )
        + "\n"
        + json.dumps(
            {"custom_id": "c0-r1", "response": {"status_code": 500, "body": {"error": "x"}}, "error": None}
        )
        + "\n"
    )
    cli = CliRunner()
    res = cli.invoke(main, ["import", str(job_files.path), str(results)])
    assert res.exit_code == 6, res.output
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["error", "error"]
    assert "boom" in rows[0]["error"] and "500" in rows[1]["error"]


def test_export_cli(make_job, server, tmp_path):
    job_files = _job(make_job, server, "cli", ["Tea", "Coffee"])
    res = CliRunner().invoke(main, ["export", str(job_files.path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "2 requests for 2 rows in 1 file(s)" in res.output
