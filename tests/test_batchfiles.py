"""Batch JSONL: export, answer every request through a real HTTP server on loopback, import.

Export and import go through the same chunk pipeline as a run: one request per distinct text the
answer store does not hold, and an import fills duplicates and cache hits exactly as a run does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from click.testing import CliRunner
from engine_env import CHECKPOINT, ENGINE, needs_engine
from fault_server import FaultServer

from pipeline.batchfiles import export_job, import_job
from pipeline.cli import main
from pipeline.config import load_job
from pipeline.errors import ConfigError, InputFormatError
from pipeline.runner import run_job

KEY = "sk-batch-test-0b7e"
ENV = "LABELMILL_BATCH_TEST_KEY"
# 10 rows holding 4 distinct texts (after case and whitespace folding), and one empty row
REPEATS = ["Green tea", "green  TEA", "Coffee beans", "Green tea", "Vitamin C", "COFFEE BEANS",
           "", "Shoes", "shoes", "Vitamin  c", "Green Tea"]  # fmt: skip
COLUMNS = ["id", "label", "confidence", "status", "error"]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with FaultServer(KEY) as srv:
        yield srv


def _job(make_job, server, name, titles, **keys):
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})
    api = {"base_url": server.base_url, "api_key_env": ENV, "max_retries": 0, **keys.pop("api", {})}
    common = {"backend": "openai", "model": "served-model", "keep_columns": ["title"], "chunk_rows": 4}
    return make_job(data, name=name, api=api, **common, **keys)


def _lines(folder: Path, result: dict) -> list[dict]:
    return [json.loads(raw) for name in result["files"] for raw in (folder / name).read_text().splitlines()]


def _text(request: dict) -> str:
    return request["body"]["messages"][-1]["content"].split(": ", 1)[1]


def _answer_batch(server: FaultServer, requests: list[dict], out: Path, skip=lambda r: False) -> Path:
    """What a batch runner does: send each request line, write OpenAI's result line format."""
    with out.open("w") as fh:
        for req in requests:
            if skip(req):
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


def _rows(read_parts, job_files) -> list[dict]:
    return read_parts(job_files.output).select(COLUMNS).to_pylist()


def test_export_writes_one_request_per_distinct_text_and_import_equals_a_run(
    make_job, read_parts, server, tmp_path
):
    live = _job(make_job, server, "live", REPEATS, cache={"enabled": False})
    run_job(live.load())
    assert server.requests == 4  # the run asked each distinct text once

    batch = _job(make_job, server, "batch", REPEATS)
    job = batch.load()
    result = export_job(job, tmp_path / "requests")
    requests = _lines(tmp_path / "requests", result)
    assert result["requests"] == len(requests) == 4  # not 10: duplicates collapsed across chunks
    assert result["rows_sharing_a_duplicate"] + result["texts_already_requested"] == 10 - 4
    assert len({r["custom_id"] for r in requests}) == 4
    sent = [_text(r) for r in requests]
    assert sent == ["Green tea", "Coffee beans", "Vitamin C", "Shoes"]  # the first spelling met
    first = requests[0]
    assert first["method"] == "POST" and first["url"] == "/v1/chat/completions"
    assert first["body"]["structured_outputs"] == {"choice": batch.spec["labels"]}
    assert KEY not in (tmp_path / "requests" / result["files"][0]).read_text()
    assert json.loads((tmp_path / "requests" / "export.json").read_text())["requests"] == 4

    summary = import_job(job, [str(_answer_batch(server, requests, tmp_path / "results.jsonl"))])
    assert summary["import"]["answers_used"] == 4 and summary["import"]["requests_without_answer"] == 0
    assert (summary["model_calls"], summary["duplicates"] + summary["cache_hits"]) == (4, 6)
    assert _rows(read_parts, batch) == _rows(read_parts, live)  # row for row, the run's output

    again = export_job(job, tmp_path / "again")
    assert again["requests"] == 0 and again["files"] == []  # everything is answered now
    after_run = export_job(_job(make_job, server, "later", [*REPEATS, "Tea bags"]).load(), tmp_path / "later")
    assert after_run["requests"] == 1  # only the new text: the cache holds the rest


def test_a_missing_answer_becomes_error_rows_that_the_next_run_fills(make_job, read_parts, server, tmp_path):
    batch = _job(make_job, server, "batch", REPEATS)
    job = batch.load()
    requests = _lines(tmp_path / "req", export_job(job, tmp_path / "req"))
    results = _answer_batch(server, requests, tmp_path / "r.jsonl", skip=lambda r: "Coffee" in _text(r))
    summary = import_job(job, [str(results)])
    assert summary["import"]["requests_without_answer"] == 1
    rows = {r["id"]: r for r in _rows(read_parts, batch)}
    coffee = [i for i, t in enumerate(REPEATS) if "coffee" in t.lower()]
    assert all(rows[i]["status"] == "error" and "no answer" in rows[i]["error"] for i in coffee)
    assert sum(r["status"] == "error" for r in rows.values()) == len(coffee)  # both spellings, nothing else

    # The next export asks for just that text; the next run sends it through the live API.
    assert export_job(job, tmp_path / "retry")["requests"] == 1
    before = server.requests
    again = run_job(job)
    assert again["status_counts"]["error"] == 0 and server.requests == before + 1
    fixed = {r["id"]: r for r in _rows(read_parts, batch)}
    assert fixed[coffee[0]]["label"] == fixed[coffee[1]]["label"] is not None


def test_without_duplicate_collapsing_every_row_is_a_request(make_job, read_parts, server, tmp_path):
    batch = _job(make_job, server, "rows", REPEATS, dedupe={"enabled": False}, cache={"enabled": False})
    job = batch.load()
    result = export_job(job, tmp_path / "req", max_requests=4)
    requests = _lines(tmp_path / "req", result)
    assert result["requests"] == 10 and len(result["files"]) == 3  # 4 + 4 + 2, split by max_requests
    assert requests[0]["custom_id"] == "c0-r0"
    import_job(job, [str(_answer_batch(server, requests, tmp_path / "r.jsonl"))])
    assert [r["status"] for r in _rows(read_parts, batch)].count("ok") == 10


def test_export_splits_by_size_and_replaces_an_earlier_export(make_job, server, tmp_path):
    job = _job(make_job, server, "size", [f"Coffee beans {i}" for i in range(6)]).load()
    result = export_job(job, tmp_path / "req", max_bytes=1)  # every line alone exceeds it
    assert len(result["files"]) == 6
    smaller = export_job(job, tmp_path / "req")
    assert smaller["files"] == ["batch-00000.jsonl"] and len(smaller["stale_files_removed"]) == 5
    assert sorted(p.name for p in (tmp_path / "req").glob("batch-*.jsonl")) == ["batch-00000.jsonl"]


def test_export_needs_a_backend_that_describes_its_requests(make_job, tmp_path):
    job = make_job()  # fake backend
    with pytest.raises(ConfigError, match="cannot describe its requests"):
        export_job(load_job(job.path), tmp_path / "req")


def test_import_refuses_request_files_and_foreign_ids(make_job, server, tmp_path):
    job = _job(make_job, server, "refuse", ["Tea"]).load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(InputFormatError, match="line 1"):
        import_job(job, [str(bad)])
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(
        json.dumps({"custom_id": "request-1", "response": {"status_code": 200, "body": {}}}) + "\n"
    )
    with pytest.raises(InputFormatError, match="request-1"):
        import_job(job, [str(foreign)])


def test_failed_batch_lines_become_error_rows(make_job, read_parts, server, tmp_path):
    job_files = _job(make_job, server, "failed", ["Tea one", "Tea two"])
    requests = _lines(tmp_path / "req", export_job(job_files.load(), tmp_path / "req"))
    first, second = (r["custom_id"] for r in requests)
    results = tmp_path / "r.jsonl"
    results.write_text(
        json.dumps(
            {"custom_id": first, "response": None, "error": {"code": "server_error", "message": "boom"}}
        )
        + "\n"
        + json.dumps(
            {"custom_id": second, "response": {"status_code": 500, "body": {"error": "x"}}, "error": None}
        )
        + "\n"
    )
    res = CliRunner().invoke(main, ["import", str(job_files.path), str(results)])
    assert res.exit_code == 6, res.output
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["error", "error"]
    assert "boom" in rows[0]["error"] and "500" in rows[1]["error"]


def test_export_cli(make_job, server, tmp_path):
    job_files = _job(make_job, server, "cli", ["Tea", "Coffee", "TEA"])
    res = CliRunner().invoke(main, ["export", str(job_files.path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "2 requests for 3 rows in 1 file(s)" in res.output
    assert "1 rows sharing a duplicate's request" in res.output


@needs_engine[0]
@needs_engine[1]
def test_a_vllm_job_exports_for_vllm_run_batch_and_imports_its_results(make_job, read_parts, tmp_path):
    # Export is not tied to a backend name: the offline engine's backend describes the same request
    # for ``vllm run-batch`` (only its tokenizer is loaded, to fit texts to the context).
    titles = ["Green tea", "Coffee", "GREEN TEA", "Tea"]
    data = pa.table({"id": pa.array(range(4), pa.int64()), "title": titles})
    job_files = make_job(data, backend="vllm", model=str(CHECKPOINT), engine=ENGINE)
    job = job_files.load()
    result = export_job(job, tmp_path / "req")
    requests = _lines(tmp_path / "req", result)
    assert result["requests"] == 3
    body = requests[0]["body"]
    assert body["model"] == str(CHECKPOINT.resolve()) and body["logprobs"] is True
    assert body["structured_outputs"] == {"choice": job_files.spec["labels"]}
    results = tmp_path / "results.jsonl"
    with results.open("w") as fh:
        for n, req in enumerate(requests):
            answer = {"choices": [{"message": {"content": "Tea"}, "finish_reason": "stop",
                                   "logprobs": {"content": [{"logprob": -0.1 * (n + 1)}]}}],
                      "usage": {"prompt_tokens": 90, "completion_tokens": 2}}  # fmt: skip
            line = {"custom_id": req["custom_id"], "response": {"status_code": 200, "body": answer}}
            fh.write(json.dumps(line) + "\n")
    import_job(job, [str(results)])
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 4 and {r["label"] for r in rows} == {"Tea"}
    assert rows[0]["confidence"] == rows[2]["confidence"] == pytest.approx(math.exp(-0.1))


def test_a_failed_answer_is_counted_once_however_many_chunks_ask_for_it(make_job, server, tmp_path):
    job = _job(make_job, server, "counts", REPEATS).load()  # "Coffee beans" in chunks 0 and 1
    requests = _lines(tmp_path / "req", export_job(job, tmp_path / "req"))
    results = _answer_batch(server, requests, tmp_path / "r.jsonl")
    lines = [json.loads(raw) for raw in results.read_text().splitlines()]
    for line in lines:
        if "Coffee" in _text(next(r for r in requests if r["custom_id"] == line["custom_id"])):
            line["response"] = {"status_code": 500, "body": {"error": "x"}}
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    counts = import_job(job, [str(results)])["import"]
    assert (counts["answers_used"], counts["failed_answers"], counts["answers_not_needed"]) == (4, 1, 0)
