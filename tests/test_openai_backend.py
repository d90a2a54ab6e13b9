"""The OpenAI-compatible backend against a real HTTP server on loopback that misbehaves on cue."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import default_table
from fault_server import MAX_TOKENS_REFUSED, FaultServer, temperature_refused

from pipeline import logs
from pipeline.backends import chat_api
from pipeline.backends.openai import ApiSettings, OpenAIBackend, RateLimiter, looks_like_credential
from pipeline.cli import main
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


@pytest.fixture
def plain():
    """A server that answers every unmarked row at once."""
    with FaultServer(KEY) as srv:
        yield srv


@pytest.fixture
def reasoning():
    """A server that behaves like OpenAI's reasoning models, 300 hidden tokens before each answer."""
    with FaultServer(KEY, reasoning=True, reasoning_tokens=300) as srv:
        yield srv


@contextmanager
def _captured_log():
    """labelmill's log records, as JSON lines, while the block runs."""
    stream = io.StringIO()
    handler = logs.setup("json", logging.DEBUG, stream=stream)
    records: list[dict] = []
    try:
        yield records
    finally:
        logging.getLogger(logs.ROOT).removeHandler(handler)
        records += [json.loads(line) for line in stream.getvalue().splitlines()]


def _titled(titles: list[str]) -> pa.Table:
    return pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})


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


def test_any_provider_field_goes_through(make_job, plain, monkeypatch):
    server = plain
    monkeypatch.setenv(ENV, KEY)
    extra = {
        "top_k": 1,
        "skip_special_tokens": False,
        "chat_template_kwargs": {"enable_thinking": False},
        "provider": {"sort": "price", "allow_fallbacks": False},
        "prompt_cache_key": "labels-v1",  # named like a credential, but OpenAI's cache routing hint
        "x_trace": "on",  # a field labelmill has never heard of
    }
    _run(make_job(default_table(3), backend="openai", model="m", api=_api(server, extra_body=extra)))
    assert len(server.seen_bodies) == 3
    assert all(extra.items() <= body.items() for body in server.seen_bodies)
    # extra_fields, which earlier versions needed for x_trace, is still accepted (and not needed)
    load_job(make_job(default_table(2), backend="openai", model="m",
                      api=_api(server, extra_body=extra, extra_fields=["x_trace"])).path)  # fmt: skip


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


@pytest.mark.parametrize(
    "extra_body, expected",
    [
        ({"messages": []}, "job key 'prompt'"),
        ({"model": "other"}, "job key 'model'"),
        ({"max_completion_tokens": 4096}, "job key 'sampling.max_tokens'.*api.reasoning_budget"),
        ({"MAX_TOKENS": 4096}, "job key 'sampling.max_tokens'"),
        ({"logprobs": False}, "job key 'api.logprobs'"),
        ({"response_format": {"type": "text"}}, "job key 'api.constraint'"),
        ({"guided_regex": ".*"}, "job key 'api.constraint'"),
        ({"n": 2}, "one whole plain-text answer"),
        ({"x_vendor": {"session_token": "x"}}, r"extra_body\.x_vendor\.session_token looks like a cred"),
        ({"session_key": "x"}, r"extra_body\.session_key looks like a credential"),
    ],
)
def test_labelmills_own_fields_and_credentials_are_still_refused(extra_body, expected):
    for extra_fields in ([], list(extra_body)):  # naming them in extra_fields changes nothing
        with pytest.raises(ValueError, match=expected):
            ApiSettings(base_url="http://127.0.0.1:1/v1", extra_body=extra_body, extra_fields=extra_fields)


def test_a_request_body_refuses_extra_fields_that_replace_its_own():
    # Settings built without validation (model_construct) must not slip a prompt past the wire format,
    # nor the budget field the body doesn't carry this time.
    request = Request(constraint=Constraint(choice=("A", "B")), max_tokens=4, sampling=Sampling())
    with pytest.raises(ValueError, match="messages"):
        chat_api.request_body("m", [{"role": "user", "content": "x"}], request, extra_body={"messages": []})
    with pytest.raises(ValueError, match="max_completion_tokens"):
        chat_api.request_body(
            "m", [{"role": "user", "content": "x"}], request, extra_body={"max_completion_tokens": 99}
        )


def test_identity_covers_what_changes_an_answer_and_nothing_else():
    base = ApiSettings(base_url="http://127.0.0.1:8000/v1")
    same = [
        {"base_url": "http://127.0.0.1:8000/v1/"},
        {"timeout_s": 5.0, "max_retries": 0, "max_concurrency": 1},
        {"requests_per_minute": 10, "tokens_per_minute": 1000, "api_key_env": "OTHER_KEY"},
        # where the budget goes and how much room reasoning gets only decide where an answer is cut
        # (a cut one is an error, never kept), and the breaker only when to stop
        {"token_limit_field": "max_completion_tokens", "reasoning_budget": 4096},
        {"max_consecutive_client_errors": 0, "extra_fields": ["x"]},
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


# Reasoning models: OpenAI's o-series and GPT-5 refuse max_tokens (and temperature 0, and logprobs),
# and spend hidden tokens inside the answer budget.

LABEL_BUDGET = len("Vitamin") + 1  # the classify task's answer budget for conftest's labels


@pytest.mark.parametrize(
    "model, field",
    [("gpt-5", "max_completion_tokens"), ("gpt-5-mini", "max_completion_tokens"),
     ("gpt-5.1-2025-11-13", "max_completion_tokens"), ("o1", "max_completion_tokens"),
     ("o3-mini", "max_completion_tokens"), ("o4-mini-2025-04-16", "max_completion_tokens"),
     ("openai/gpt-5-nano", "max_completion_tokens"), ("openai/o3", "max_completion_tokens"),
     ("gpt-4o-mini", "max_tokens"), ("gpt-4.1", "max_tokens"), ("olmo-2-7b", "max_tokens"),
     ("meta-llama/llama-3.1-8b-instruct", "max_tokens"), ("smollm2-135m", "max_tokens"),
     ("openai/gpt-oss-20b", "max_tokens"), ("my-gpt-5-deployment", "max_tokens")],
)  # fmt: skip
def test_auto_picks_the_budget_field_by_model_family(model, field):
    assert chat_api.token_limit_field(model) == field
    assert chat_api.token_limit_field(model, "max_tokens") == "max_tokens"  # a setting is a setting


@pytest.mark.parametrize(
    "model, budget",
    [("gpt-5-mini", 1024), ("o3", 1024), ("openai/gpt-oss-120b", 1024), ("deepseek-ai/DeepSeek-R1", 1024),
     ("Qwen/QwQ-32B", 1024), ("Qwen/Qwen3-4B-Thinking-2507", 1024), ("gpt-4o", 0), ("smollm2-135m", 0)],
)  # fmt: skip
def test_reasoning_models_get_room_to_think_by_default(model, budget):
    backend = OpenAIBackend(ApiSettings(base_url="http://127.0.0.1:1/v1"), model)
    assert backend.reasoning_budget == budget
    explicit = OpenAIBackend(ApiSettings(base_url="http://127.0.0.1:1/v1", reasoning_budget=64), model)
    assert explicit.reasoning_budget == 64


@pytest.mark.parametrize("constraint", ["choice", "json_schema"])
def test_a_reasoning_model_answers_every_row(make_job, read_parts, reasoning, monkeypatch, constraint):
    monkeypatch.setenv(ENV, KEY)
    job_files = make_job(
        default_table(12), backend="openai", model="gpt-5-mini", api=_api(reasoning, constraint=constraint)
    )
    with _captured_log() as records:
        summary = _run(job_files)

    rows = read_parts(job_files.output).to_pylist()
    assert summary["status_counts"]["ok"] == 12, [r["error"] for r in rows]
    assert all(r["label"] in job_files.spec["labels"] and r["confidence"] is None for r in rows)
    # the hidden reasoning is output: in each row's count, and so in the summary the bench prices
    assert all(r["output_tokens"] == 300 + 2 for r in rows)
    assert summary["output_tokens"] == 12 * 302
    # max_tokens was never sent: the family takes max_completion_tokens, with room to think
    bodies = reasoning.seen_bodies
    assert not any("max_tokens" in b for b in bodies)
    wrapped = 16 if constraint == "json_schema" else 0  # the {"label": ...} around a choice
    assert {b["max_completion_tokens"] for b in bodies} == {LABEL_BUDGET + wrapped + 1024}
    # temperature 0 (and logprobs, where asked) were refused once each, then left out
    refused = [r for r in records if r.get("event") == "api_field_refused"]
    expected = {"temperature"} | ({"logprobs"} if constraint == "choice" else set())
    assert sorted(r["field"] for r in refused) == sorted(expected), refused
    assert all(r["level"] == "WARNING" and "rest of the run" in r["message"] for r in refused)
    answered = [b for b in bodies if "temperature" not in b and "logprobs" not in b]
    assert len(answered) == 12 and len(bodies) <= 12 + 2 * 8  # at most the first wave was refused


def test_a_400_naming_max_tokens_switches_the_field_for_the_rest_of_the_run(
    make_job, read_parts, reasoning, monkeypatch
):
    # An Azure-style deployment name says nothing of the model behind it: auto sends max_tokens.
    monkeypatch.setenv(ENV, KEY)
    api = _api(reasoning, reasoning_budget=512, logprobs=False, max_concurrency=1)
    job_files = make_job(
        default_table(6), backend="openai", model="prod-classifier", api=api, sampling={"temperature": 1}
    )
    with _captured_log() as records:
        summary = _run(job_files)
    assert summary["status_counts"]["ok"] == 6
    assert summary["retries"] == 0  # sending the row again with the other field is not a retry
    bodies = reasoning.seen_bodies
    assert "max_tokens" in bodies[0] and len(bodies) == 7  # one refusal, then each row once
    assert all(b.get("max_completion_tokens") == LABEL_BUDGET + 512 for b in bodies[1:])
    switched = [r for r in records if r.get("event") == "api_field_refused"]
    assert len(switched) == 1 and "'max_completion_tokens' for the rest of the run" in switched[0]["message"]


def test_a_chosen_budget_field_is_not_switched(make_job, read_parts, reasoning, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    api = _api(reasoning, token_limit_field="max_tokens", logprobs=False, max_consecutive_client_errors=0)
    job_files = make_job(
        default_table(3), backend="openai", model="gpt-5", api=api, sampling={"temperature": 1}
    )
    summary = _run(job_files)
    assert summary["status_counts"]["error"] == 3
    rows = read_parts(job_files.output).to_pylist()
    assert all("Use 'max_completion_tokens' instead" in r["error"] for r in rows)
    assert all("max_tokens" in b and "max_completion_tokens" not in b for b in reasoning.seen_bodies)


def test_an_answer_cut_while_reasoning_is_an_error_and_its_tokens_are_counted(
    make_job, read_parts, reasoning, monkeypatch
):
    monkeypatch.setenv(ENV, KEY)
    api = _api(reasoning, reasoning_budget=0, logprobs=False, max_consecutive_client_errors=0)
    job_files = make_job(
        default_table(4), backend="openai", model="o4-mini", api=api, sampling={"temperature": 1}
    )
    summary = _run(job_files)
    rows = read_parts(job_files.output).to_pylist()
    assert summary["status_counts"]["error"] == 4
    assert all("api.reasoning_budget" in r["error"] and "reasoning_effort" in r["error"] for r in rows)
    assert summary["output_tokens"] == 4 * LABEL_BUDGET  # billed, so counted, though no answer came

    # More room, same job otherwise: the run folder resumes and asks just those rows again.
    sent = len(reasoning.seen_bodies)
    job_files.rewrite(api={**api, "reasoning_budget": 400})
    again = _run(job_files)
    assert again["status_counts"]["ok"] == 4 and len(reasoning.seen_bodies) == sent + 4
    assert again["output_tokens"] == 4 * LABEL_BUDGET + 4 * 302


def test_reasoning_tokens_are_output_tokens_whoever_reports_them():
    def usage(**fields) -> int:
        body = {"choices": [{"message": {"content": "Tea"}, "finish_reason": "stop"}], "usage": fields}
        return chat_api.parse_completion(body).output_tokens

    # OpenAI, OpenRouter: completion_tokens already includes them
    assert usage(prompt_tokens=10, completion_tokens=302, total_tokens=312,
                 completion_tokens_details={"reasoning_tokens": 300}) == 302  # fmt: skip
    # a gateway that leaves them out of completion_tokens but reports them beside it
    assert (
        usage(prompt_tokens=21, completion_tokens=0, completion_tokens_details={"reasoning_tokens": 60}) == 60
    )
    assert usage(prompt_tokens=21, completion_tokens=2, reasoning_tokens=60) == 62
    # ... or only in total_tokens (Gemini's thoughts)
    assert usage(prompt_tokens=20, completion_tokens=151, total_tokens=553) == 533
    # no reasoning: as before
    assert usage(prompt_tokens=10, completion_tokens=2, total_tokens=12) == 2
    assert usage(prompt_tokens=10, completion_tokens=2) == 2


def test_an_answer_cut_while_thinking_is_a_failure_for_any_server():
    def parse(message: dict, usage: dict) -> object:
        return chat_api.parse_completion(
            {"choices": [{"message": message, "finish_reason": "length"}], "usage": usage}
        )

    # vLLM with a reasoning parser: the thinking comes back beside the (empty) answer, uncounted
    cut = parse({"content": None, "reasoning_content": "Let me think"}, {"completion_tokens": 8})
    assert cut.error and "api.reasoning_budget" in cut.error and cut.output_tokens == 8
    cut = parse(
        {"content": ""}, {"completion_tokens": 8, "completion_tokens_details": {"reasoning_tokens": 8}}
    )
    assert cut.error and "8 of its 8 output tokens" in cut.error
    # a model that doesn't reason, cut short: an answer for the task to judge, as before
    plain = parse({"content": "Vita"}, {"completion_tokens": 8})
    assert plain.error is None and plain.text == "Vita"


def _error(**fields) -> str:
    return json.dumps({"error": fields})


@pytest.mark.parametrize(
    "answer, field",
    [
        # a proxy that keeps OpenAI's message but not its param and code
        (_error(message=MAX_TOKENS_REFUSED["message"], code="invalid_request_body"), "max_tokens"),
        (_error(message="x", param="logprobs", code="unsupported_parameter"), "logprobs"),
        (_error(message=temperature_refused(0)["message"]), "temperature"),
        ("'top_p' is not supported for this model", "top_p"),
        # a refused value, not a refused field: nothing to leave out
        (_error(message="'max_tokens' is too large: 90000.", param="max_tokens", code="invalid_value"), None),
        (
            json.dumps({"object": "error", "message": "This model's maximum context length is 8192 tokens"}),
            None,
        ),
    ],
)
def test_refused_fields_are_read_from_the_error(answer, field):
    assert chat_api.refused_field(answer) == field


# The breaker: the same client error row after row stops the run instead of failing every row.


def _cli(*args: str):
    return CliRunner().invoke(main, list(args), env={ENV: KEY})


def test_the_same_400_on_every_row_stops_the_run_with_its_message(make_job, read_parts, plain):
    # Chunk 1 is answered; from chunk 2 on the server refuses every request, each with its own id.
    titles = [f"Green tea {i}" for i in range(10)] + [f"REFUSE {i}" for i in range(30)]
    job_files = make_job(
        _titled(titles), backend="openai", model="m", keep_columns=["title"],
        api=_api(plain, max_consecutive_client_errors=5, max_concurrency=2),
    )  # fmt: skip
    result = _cli("run", str(job_files.path))
    printed = result.stdout + result.stderr
    assert result.exit_code == 4, printed
    assert "5 rows in a row failed with the same error" in printed and "This request was refused" in printed
    assert "max_consecutive_client_errors" in printed
    refused = sum(plain.attempts_for(t) for t in titles[10:])
    assert 5 <= refused <= 5 + 2  # stopped there, bar what was already in flight
    # chunk 1 is kept, chunk 2 is not written: a rerun asks chunk 2's rows again, not chunk 1's
    kept = read_parts(job_files.output).to_pylist()
    assert [r["title"] for r in kept] == titles[:10] and {r["status"] for r in kept} == {"ok"}
    before = sum(plain.attempts_for(t) for t in titles[:10])
    assert _cli("run", str(job_files.path)).exit_code == 4
    assert sum(plain.attempts_for(t) for t in titles[:10]) == before


@pytest.mark.parametrize("limit, stops", [(5, False), (4, True), (0, False)])
def test_only_errors_in_a_row_trip_the_breaker(make_job, read_parts, plain, monkeypatch, limit, stops):
    monkeypatch.setenv(ENV, KEY)
    titles = ([f"REFUSE {i}" for i in range(4)] + ["Green tea"]) * 3  # runs of 4 refusals
    if limit == 0:
        titles = [f"REFUSE {i}" for i in range(25)]  # 0: never stop
    job_files = make_job(
        _titled([f"{t} {n}" for n, t in enumerate(titles)]), backend="openai", model="m", chunk_rows=100,
        api=_api(plain, max_consecutive_client_errors=limit, max_concurrency=1),
    )  # fmt: skip
    if stops:
        with pytest.raises(BackendError, match="4 rows in a row"):
            _run(job_files)
        return
    summary = _run(job_files)
    assert summary["status_counts"]["error"] == sum("REFUSE" in t for t in titles)


def test_different_client_errors_do_not_add_up(plain):
    backend = OpenAIBackend(ApiSettings(base_url=plain.base_url, max_consecutive_client_errors=3), "m")
    for reason in ("HTTP 400: bad a", "HTTP 400: bad b", "HTTP 422: bad b", "HTTP 400: bad b", None):
        backend._count_client_error(reason)
    # the same error but for its request id and counts
    backend._count_client_error("HTTP 400: bad a, 12 tokens (request id req_123)")
    backend._count_client_error("HTTP 400: bad a, 14 tokens (request id req_456)")
    with pytest.raises(BackendError, match="3 rows in a row"):
        backend._count_client_error("HTTP 400: bad a, 99 tokens (request id req_789)")
