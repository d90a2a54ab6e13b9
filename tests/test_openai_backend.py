"""The OpenAI-compatible backend against a real HTTP server on loopback that misbehaves on cue."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import default_table
from fault_server import FaultServer

from pipeline import logs
from pipeline.backends import chat_api
from pipeline.backends.openai import ApiSettings, OpenAIBackend, RateLimiter, looks_like_credential
from pipeline.config import load_job
from pipeline.contracts import Constraint, Request, Sampling
from pipeline.errors import BackendError, JobFileError
from pipeline.runner import run_job

KEY = "sk-test-5f1e9c0a7d3b-DO-NOT-LEAK"
ENV = "LABELMILL_TEST_API_KEY"


def _api(server: FaultServer, **extra) -> dict:
    return {
        "base_url": server.base_url,
        "api_key_env": ENV,
        "max_concurrency": 8,
        "timeout_s": 2.0,
        "max_retries": 3,
        **extra,
    }


def _run(job_files, **kwargs) -> dict:
    return run_job(load_job(job_files.path), **kwargs)


def _titles() -> list[str]:
    plain = [f"Green tea bags {i}" for i in range(20)]
    faulty = ["RATE a", "RATE b", "FLAKY a", "FLAKY b", "HANG a", "DROP a", "GARBLED a", "OUTSIDE a"]
    return plain + faulty + ["DOWN a", "DOWN b", "", None]


@pytest.fixture
def server():
    with FaultServer(KEY, hang_s=4.0, burst_429=4) as srv:
        yield srv


def test_faults_lose_no_row_and_get_the_right_status(make_job, read_parts, server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    titles = _titles()
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})
    job_files = make_job(
        data, backend="openai", model="test-model", api=_api(server), keep_columns=["title"], chunk_rows=10
    )

    log = io.StringIO()
    handler = logs.setup("json", logging.DEBUG, stream=log)
    try:
        summary = _run(job_files)
    finally:
        logging.getLogger(logs.ROOT).removeHandler(handler)
    rows = {r["title"]: r for r in read_parts(job_files.output).to_pylist()}
    assert len(read_parts(job_files.output)) == len(titles)  # rows in == rows out
    records = [json.loads(line) for line in log.getvalue().splitlines()]
    assert sum(r.get("retries", 0) for r in records if r.get("event") == "retries") == summary["retries"]
    assert any("retrying a request" in r["message"] and "429" in r["message"] for r in records), [
        r["message"] for r in records if "retry" in r["message"]
    ][:5]
    assert KEY not in log.getvalue()  # not in the log either
    for t in [*titles[:20], "RATE a", "RATE b", "FLAKY a", "FLAKY b", "HANG a", "DROP a"]:
        assert rows[t]["status"] == "ok", rows[t]
        assert rows[t]["label"] in job_files.spec["labels"]
        assert rows[t]["confidence"] == pytest.approx(0.7408182, rel=1e-6)  # exp(-0.25 - 0.05)
        assert (rows[t]["prompt_tokens"], rows[t]["cached_tokens"], rows[t]["output_tokens"]) == (100, 64, 2)
    assert rows["OUTSIDE a"]["status"] == "invalid"
    assert "'HACKED'" in rows["OUTSIDE a"]["error"] and rows["OUTSIDE a"]["label"] is None
    assert rows["GARBLED a"]["status"] == "error" and "malformed" in rows["GARBLED a"]["error"]
    for t in ("DOWN a", "DOWN b"):
        assert rows[t]["status"] == "error" and "503" in rows[t]["error"]
    assert server.attempts_for("GARBLED a") == 4  # 1 + max_retries
    assert server.attempts_for("RATE a") >= 3 and server.attempts_for("FLAKY a") == 3
    assert summary["status_counts"] == {"ok": 26, "truncated": 0, "empty_input": 2, "invalid": 1, "error": 3}
    assert summary["retries"] >= 4 + 4 + 1 + 1 + 3 + 3 + 3  # RATE, FLAKY, HANG, DROP, GARBLED, DOWN x2
    assert summary["cached_tokens"] == 64 * 27

    # Every request asked for the label set as a constraint, and for logprobs.
    assert all(b["structured_outputs"] == {"choice": job_files.spec["labels"]} for b in server.seen_bodies)
    assert all(b["logprobs"] is True for b in server.seen_bodies)

    # The key reached the server in the header, and no file the run wrote.
    for path in Path(job_files.output).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path

    # The provider recovers: a rerun sends only the rows that failed.
    server.down = False
    before = {t: server.attempts_for(t) for t in titles if t}
    again = _run(job_files)
    sent_again = {t for t in before if server.attempts_for(t) != before[t]}
    assert sent_again == {"DOWN a", "DOWN b", "GARBLED a"}
    rows = {r["title"]: r for r in read_parts(job_files.output).to_pylist()}
    assert rows["DOWN a"]["status"] == rows["DOWN b"]["status"] == "ok"
    assert rows["GARBLED a"]["status"] == "error"  # still garbled: still an error, still in the output
    assert rows["OUTSIDE a"]["status"] == "invalid"  # an answer, not a failure: not retried
    assert again["status_counts"]["error"] == 1 and again["rows_done"] == len(titles)


def test_wrong_key_stops_the_run_without_echoing_it(make_job, server, monkeypatch):
    monkeypatch.setenv(ENV, "sk-wrong-key-0000")
    job_files = make_job(default_table(5), backend="openai", model="m", api=_api(server))
    with pytest.raises(BackendError) as info:
        _run(job_files)
    assert "401" in str(info.value) and "authentication" in str(info.value)
    assert "sk-wrong-key-0000" not in str(info.value)
    assert server.requests <= 8  # stopped on the first answers, not after retrying every row


def test_missing_key_variable_is_named(make_job, server, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    job_files = make_job(default_table(3), backend="openai", model="m", api=_api(server))
    with pytest.raises(BackendError, match=ENV):
        _run(job_files)
    assert server.requests == 0


def test_json_schema_constraint_parses_the_label(make_job, read_parts, server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    job_files = make_job(
        default_table(4), backend="openai", model="m", api=_api(server, constraint="json_schema")
    )
    _run(job_files)
    body = server.seen_bodies[-1]
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == job_files.spec["labels"]
    assert "structured_outputs" not in body and "logprobs" not in body
    # This server ignores response_format and answers "Tea": plain text, not JSON, still a label.
    rows = read_parts(job_files.output).to_pylist()
    assert all(r["status"] == "ok" and r["confidence"] is None for r in rows)


def test_a_key_in_extra_body_is_refused(make_job, server, tmp_path):
    job_files = make_job(
        default_table(2), backend="openai", model="m", api=_api(server, extra_body={"api_key": "x"})
    )
    with pytest.raises(JobFileError, match="credential"):
        load_job(job_files.path)


def test_known_fields_go_through_and_others_only_when_named(make_job, server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    extra = {"top_k": 1, "min_tokens": 1, "stop_token_ids": [7], "provider": {"sort": "price"}}
    refused = make_job(
        default_table(2), backend="openai", model="m", api=_api(server, extra_body={**extra, "x_trace": "on"})
    )
    with pytest.raises(JobFileError, match=r"extra_body\.x_trace is not a known .* api\.extra_fields"):
        load_job(refused.path)
    api = _api(server, extra_body={**extra, "x_trace": "on"}, extra_fields=["x_trace"])
    _run(make_job(default_table(2), backend="openai", model="m", api=api))
    assert server.seen_bodies and all(
        {**extra, "x_trace": "on"}.items() <= body.items() for body in server.seen_bodies
    )


@pytest.mark.parametrize(
    "name",
    ["api_key", "apiKey", "X-Api-Key", "Authorization", "access_token", "clientSecret", "PASSWD", "Cookie",
     "headers", "x.auth", "privatekey", "id_token"],
)  # fmt: skip
def test_credential_names_in_any_spelling(name):
    assert looks_like_credential(name)
    with pytest.raises(ValueError, match="credential"):
        ApiSettings(base_url="http://127.0.0.1:1/v1", extra_body={"provider": {name: "x"}})


@pytest.mark.parametrize(
    "name", ["min_tokens", "max_tokens", "stop_token_ids", "skip_special_tokens", "thinking_token_budget",
             "sort", "author", "monkey", "order", "allow_fallbacks"],
)  # fmt: skip
def test_counting_tokens_is_not_a_credential(name):
    assert not looks_like_credential(name)


def test_the_escape_hatch_never_opens_for_labelmills_own_fields_or_credentials():
    with pytest.raises(ValueError, match="job key 'prompt'"):
        ApiSettings(base_url="http://127.0.0.1:1/v1", extra_body={"messages": []}, extra_fields=["messages"])
    with pytest.raises(ValueError, match="extra_fields entry 'session_key' look like credentials"):
        ApiSettings(
            base_url="http://127.0.0.1:1/v1", extra_body={"session_key": "x"}, extra_fields=["session_key"]
        )


def test_a_request_body_refuses_extra_fields_that_replace_its_own():
    # Settings built without validation (model_construct) must not slip a prompt past the wire format.
    request = Request(constraint=Constraint(choice=("A", "B")), max_tokens=4, sampling=Sampling())
    with pytest.raises(ValueError, match="messages"):
        chat_api.request_body("m", [{"role": "user", "content": "x"}], request, extra_body={"messages": []})


def test_identity_covers_what_changes_an_answer_and_nothing_else():
    base = ApiSettings(base_url="http://127.0.0.1:8000/v1")
    same = [
        {"base_url": "http://127.0.0.1:8000/v1/"},
        {"timeout_s": 5.0, "max_retries": 0, "max_concurrency": 1},
        {"requests_per_minute": 10, "tokens_per_minute": 1000, "api_key_env": "OTHER_KEY"},
    ]
    different = [
        {"base_url": "http://127.0.0.1:8001/v1"},
        {"constraint": "none"},
        {"logprobs": False},
        {"extra_body": {"top_k": 5}},
        {"max_model_len": 2048},
    ]
    identity = OpenAIBackend.identity(base)
    for change in same:
        assert OpenAIBackend.identity(base.model_copy(update=change)) == identity, change
    for change in different:
        assert OpenAIBackend.identity(base.model_copy(update=change)) != identity, change
    described = OpenAIBackend.describe_settings(base.model_copy(update={"extra_body": {"top_k": 5}}))
    assert described["base_url"] == identity["base_url"] and described["extra_body"] == {"top_k": 5}


def test_rate_limiter_spreads_requests_over_the_window():
    limiter = RateLimiter(per_minute=3, window_s=0.5)

    async def take(n: int) -> list[float]:
        t0 = time.monotonic()
        stamps = []
        for _ in range(n):
            await limiter.acquire()
            stamps.append(time.monotonic() - t0)
        return stamps

    stamps = asyncio.run(take(7))
    assert stamps[2] < 0.2  # the first 3 go at once
    assert stamps[3] >= 0.45 and stamps[6] >= 0.95  # then 3 per window
