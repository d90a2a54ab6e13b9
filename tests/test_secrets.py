"""Secrets stay out: of the run folder, the result cache, the logs and every message.

A distinctive secret is planted everywhere a user or a server could put one: the API key in its
environment variable, and (refused) in ``base_url`` user info and query, in ``extra_body`` at the
top level and nested, in a labels file and in a prompt file. A real HTTP server on loopback echoes
the key back in other letter cases in every kind of answer. The command runs through the CLI with
text and JSON logs; then every file written and every line printed is searched for the secret in
any case.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import default_table
from fault_server import FaultServer, _Handler

from pipeline.cli import main

SECRET = "PLANTED-SECRET-0xC0FFEE"
KEY = f"sk-{SECRET}-live"
ENV = "LABELMILL_SECRETS_TEST_KEY"
LEAK = re.compile(re.escape(SECRET), re.IGNORECASE)
LOG_FORMATS = ("text", "json")


class _EchoHandler(_Handler):
    """FaultServer's handler, but rows marked ECHO... get answers that quote the key they were sent
    in another letter case; with ``server.refuse_all`` every request gets a 401 that does."""

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length", 0)))
        sent = (self.headers.get("authorization") or "").removeprefix("Bearer ")
        self.server.keys_seen.add(sent)
        text = json.loads(raw)["messages"][-1]["content"]
        if self.server.refuse_all:
            return self._json(401, {"error": {"message": f"Incorrect API key provided: {sent.swapcase()}"}})
        if "ECHO400" in text:
            return self._json(400, {"error": {"message": f"bad request from {sent.upper()}"}})
        if "ECHO500" in text:
            return self._json(500, {"error": {"message": f"upstream rejected {sent.lower()}"}})
        if "ECHOGARBLED" in text:
            return self._raw(200, f'{{"choices": [{{"key": "{sent.title()}"'.encode())
        if "ECHOANSWER" in text:
            return self._json(200, _completion(f"Bearer {sent.upper()}"))
        self.rfile, kept = io.BytesIO(raw), self.rfile  # the base handler reads the body itself
        try:
            return super().do_POST()
        finally:
            self.rfile = kept


def _completion(content: str) -> dict:
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2},
    }


@pytest.fixture
def server():
    with FaultServer(KEY) as srv:
        srv.RequestHandlerClass = _EchoHandler
        srv.refuse_all = False
        srv.keys_seen = set()
        yield srv


def _api(server: FaultServer, **extra) -> dict:
    return {"base_url": server.base_url, "api_key_env": ENV, "max_retries": 1, "timeout_s": 5.0, **extra}


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={ENV: KEY})


def _printed(result: Result) -> str:
    return result.stdout + result.stderr


def _leaks(root: Path, planted: set[Path]) -> list[str]:
    """Files under ``root`` (bar the ones the test planted secrets in on purpose) holding the secret."""
    return sorted(
        str(path)
        for path in root.rglob("*")
        if path.is_file() and path not in planted and LEAK.search(_contents(path))
    )


def _contents(path: Path) -> str:
    """The file's bytes, and for Parquet parts (zstd) and Arrow cache files their decoded values."""
    data = path.read_bytes()
    texts = [data.decode("latin-1")]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        texts += [repr(table.schema.metadata), repr(table.to_pylist())]
    elif path.suffix in (".arrows", ".arrow"):
        table = pa.ipc.open_stream(data).read_all()
        texts += [repr(table.schema.metadata), repr(table.to_pylist())]
    return "\n".join(texts)


def _planted(*job_files) -> set[Path]:
    return {j.path for j in job_files}


def _titles() -> list[str]:
    return [f"Green tea {i}" for i in range(6)] + ["ECHO400 a", "ECHO500 a", "ECHOGARBLED a", "ECHOANSWER a"]


@pytest.mark.parametrize("log_format", LOG_FORMATS)
def test_a_server_echoing_the_key_leaves_no_trace(
    make_job, read_parts, server, labelmill_home, tmp_path, log_format
):
    titles = _titles()
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})
    job_files = make_job(data, backend="openai", model="m", api=_api(server), keep_columns=["title"])
    printed = ""
    for _ in range(2):  # the rerun sends the failed rows again: the same echoes, through the resume path
        result = _cli("--log-format", log_format, "-v", "run", str(job_files.path))
        assert result.exit_code == 6, _printed(result)  # finished, some rows failed or invalid
        printed += _printed(result)
    assert server.keys_seen == {KEY}  # the key was really sent, and echoed back
    rows = {r["title"]: r for r in read_parts(job_files.output).to_pylist()}
    assert rows["ECHO400 a"]["status"] == "error" and "***" in rows["ECHO400 a"]["error"]
    assert rows["ECHO500 a"]["status"] == "error" and "***" in rows["ECHO500 a"]["error"]
    assert rows["ECHOGARBLED a"]["status"] == "error" and "malformed" in rows["ECHOGARBLED a"]["error"]
    assert "***" in rows["ECHOGARBLED a"]["error"]
    assert rows["ECHOANSWER a"]["status"] == "invalid" and "***" in rows["ECHOANSWER a"]["error"]
    assert "retrying a request" in printed and "***" in printed  # the retry lines, with reasons

    assert not LEAK.search(printed), printed
    assert list((labelmill_home / "cache").rglob("*.arrows"))  # the cache was written, and is searched
    assert _leaks(tmp_path, _planted(job_files)) == []  # run folder, result cache, anything else


@pytest.mark.parametrize("log_format", LOG_FORMATS)
def test_a_401_echoing_the_key_stops_the_run_without_it(make_job, server, tmp_path, log_format):
    server.refuse_all = True
    job_files = make_job(default_table(4), backend="openai", model="m", api=_api(server))
    result = _cli("--log-format", log_format, "run", str(job_files.path))
    assert result.exit_code == 4, _printed(result)
    printed = _printed(result)
    assert "401" in printed and server.base_url in printed and "***" in printed
    assert not LEAK.search(printed), printed
    assert _leaks(tmp_path, _planted(job_files)) == []


REFUSED = {
    "base_url user info": (
        lambda srv: {"base_url": srv.base_url.replace("://", f"://admin:{SECRET.lower()}@")},
        ["api.base_url", "user name or password", "api_key_env"],
    ),
    "base_url query": (
        lambda srv: {"base_url": f"{srv.base_url}?region=eu&API_KEY={SECRET.swapcase()}"},
        ["api.base_url", "query parameter #2", "api_key_env"],
    ),
    "base_url query without a value": (
        lambda srv: {"base_url": f"{srv.base_url}?{SECRET}"},
        ["api.base_url", "query parameter #1"],
    ),
    "top-level password": (
        lambda srv: {"extra_body": {"password": SECRET}},
        ["extra_body.password", "credential", "api_key_env"],
    ),
    "nested provider.api_key": (
        lambda srv: {"extra_body": {"provider": {"sort": "price", "api_key": SECRET.lower()}}},
        ["extra_body.provider.api_key", "credential"],
    ),
    "headers.Authorization": (
        lambda srv: {"extra_body": {"headers": {"Authorization": f"Bearer {SECRET.upper()}"}}},
        ["extra_body.headers.Authorization", "credential"],
    ),
    "deep in a list": (
        lambda srv: {"extra_body": {"metadata": {"hooks": [{"X-Auth-Token": SECRET}]}}},
        ["extra_body.metadata.hooks[0].X-Auth-Token"],
    ),
    "credential named in the old extra_fields": (
        lambda srv: {"extra_body": {"clientSecret": SECRET}, "extra_fields": ["clientSecret"]},
        ["extra_body.clientSecret", "credential"],
    ),
    "under a field labelmill doesn't know": (
        lambda srv: {"extra_body": {"x_vendor": {"region": "eu", "session_token": SECRET}}},
        ["extra_body.x_vendor.session_token", "credential"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_credentials_in_the_api_section_are_refused_unechoed(make_job, server, tmp_path, case):
    api_changes, expected = REFUSED[case]
    job_files = make_job(
        default_table(3), backend="openai", model="m", api=_api(server, **api_changes(server))
    )
    for log_format in LOG_FORMATS:
        for command in ("validate", "run"):
            result = _cli("--log-format", log_format, command, str(job_files.path))
            printed = _printed(result)
            assert result.exit_code == 2, printed
            for text in expected:
                assert text in printed, (text, printed)
            assert not LEAK.search(printed), printed
    assert not job_files.output.exists()  # refused before the run folder was made
    assert server.requests == 0
    assert _leaks(tmp_path, set()) == [str(job_files.path)]  # the search finds what is there


@pytest.mark.parametrize(
    "extra_body, owner",
    [
        ({"messages": [{"role": "user", "content": "answer Tea"}]}, "'prompt'"),
        ({"model": "gpt-4o"}, "'model'"),
        ({"max_tokens": 500}, "'sampling.max_tokens'"),
        ({"max_completion_tokens": 500}, "'sampling.max_tokens'"),
        ({"Temperature": 1.5}, "'sampling.temperature'"),
        ({"logprobs": False}, "'api.logprobs'"),
        ({"response_format": {"type": "json_object"}}, "'api.constraint'"),
        ({"structured_outputs": {"regex": ".*"}}, "'api.constraint'"),
        ({"guided_choice": ["Tea"]}, "'api.constraint'"),
        ({"stream": True}, "one whole plain-text answer"),
        ({"n": 3}, "one whole plain-text answer"),
    ],
)
def test_fields_labelmill_sets_are_refused_naming_their_job_key(make_job, server, extra_body, owner):
    key = next(iter(extra_body))
    job_files = make_job(
        default_table(3), backend="openai", model="m", api=_api(server, extra_body=extra_body)
    )
    result = _cli("validate", str(job_files.path))
    assert result.exit_code == 2, _printed(result)
    assert f"extra_body.{key}" in _printed(result) and owner in _printed(result)


@pytest.mark.parametrize("log_format", LOG_FORMATS)
def test_a_breaker_stop_on_errors_echoing_the_key_is_unechoed(make_job, server, tmp_path, log_format):
    titles = [f"ECHO400 {i}" for i in range(12)]
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})
    api = _api(server, max_consecutive_client_errors=4, max_concurrency=2)
    job_files = make_job(data, backend="openai", model="m", api=api)
    result = _cli("--log-format", log_format, "run", str(job_files.path))
    printed = _printed(result)
    assert result.exit_code == 4, printed
    assert "4 rows in a row" in printed and "bad request from ***" in printed
    assert server.keys_seen == {KEY}
    assert not LEAK.search(printed), printed
    assert _leaks(tmp_path, _planted(job_files)) == []


SECRET_LINE = f"{SECRET} hunter2"


@pytest.mark.parametrize(
    "kind, content, expected",
    [
        ("labels_file", f"gid://shopify/TaxonomyCategory/aa : Apparel\n{SECRET_LINE}\n", "line 2"),
        ("labels_file", f"# labels\nTea\n{SECRET_LINE}\n{SECRET_LINE.lower()}\n", "line 3 / line 4"),
        ("labels_file", f"{SECRET_LINE}\n", "only one label (line 1)"),
        ("labels_file", f"Tea\n{SECRET_LINE}\x07\n", "line 2"),
        ("labels_file", f"Tea\n{SECRET_LINE}\n".encode() + b"\xff\n", "line 3"),
        ("prompt", f"system: [{SECRET_LINE}\nuser: '{{text}}'\n", "line 2, column 5"),
        ("prompt", f"{SECRET_LINE}\nroot:x:0:0:root:/root:/bin/bash\n", "line 1"),
        ("prompt", f"system: x\n{SECRET}: y\nuser: '{{text}}'\n", "line 2: unknown key"),
        ("prompt", f"system: '{{labels}} {{{SECRET}!r}}'\nuser: '{{text}}'\n", "line 1 of the message"),
        ("prompt", f"system: '{{labels}}'\nuser: '{{text}} {{{SECRET_LINE}}}'\n", "line 1 of the message"),
    ],
)
def test_labels_and_prompt_files_are_named_not_quoted(make_job, tmp_path, kind, content, expected):
    planted = tmp_path / "planted" / ("labels.txt" if kind == "labels_file" else "prompt.yaml")
    planted.parent.mkdir()
    if isinstance(content, bytes):
        planted.write_bytes(content)
    else:
        planted.write_text(content, encoding="utf-8")
    changes = (
        {"labels": None, "labels_file": str(planted)} if kind == "labels_file" else {"prompt": str(planted)}
    )
    job_files = make_job(default_table(3), **changes)
    for log_format in LOG_FORMATS:
        result = _cli("--log-format", log_format, "validate", str(job_files.path))
        printed = _printed(result)
        assert result.exit_code == 2, printed
        assert str(planted) in printed and expected in printed, printed
        assert not LEAK.search(printed) and "hunter2" not in printed and "root:" not in printed, printed
    assert _leaks(tmp_path, {job_files.path, planted}) == []


@pytest.mark.skipif(not Path("/etc/passwd").is_file(), reason="no /etc/passwd here")
def test_a_system_file_as_prompt_is_refused_unquoted(make_job):
    job_files = make_job(default_table(3), prompt="/etc/passwd")
    result = _cli("validate", str(job_files.path))
    assert result.exit_code == 2 and "/etc/passwd" in _printed(result), _printed(result)
    assert "root:" not in _printed(result) and "/bin/" not in _printed(result), _printed(result)


def test_a_job_that_passes_writes_no_credential_into_job_yaml(make_job, server):
    """The settings that reach the run folder are exactly those validated: nothing to scrub there."""
    api = _api(server, extra_body={"top_k": 1, "provider": {"sort": "price"}})
    job_files = make_job(default_table(3), backend="openai", model="m", api=api)
    result = _cli("run", "--quiet", str(job_files.path))
    assert result.exit_code == 0, _printed(result)
    written = yaml.safe_load((job_files.output / "job.yaml").read_text(encoding="utf-8"))
    assert written["api"]["extra_body"] == {"top_k": 1, "provider": {"sort": "price"}}
    assert written["api"]["api_key_env"] == ENV
    run_json = json.loads((job_files.output / "run.json").read_text(encoding="utf-8"))
    assert KEY not in json.dumps(run_json)
