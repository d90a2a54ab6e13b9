"""The teacher server: real labelmill jobs on the ``openai`` backend get its known labels back,
with the confidence configured for each text."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pyarrow as pa
import pytest
from teacher_server import TeacherServer

from pipeline.config import load_job
from pipeline.errors import BackendError
from pipeline.runner import run_job

KEY = "sk-teacher-3c9d0e1f"
ENV = "LABELMILL_TEST_TEACHER_KEY"

ANSWERS = {
    "tea": "Tea",
    "green tea": "Vitamin",  # "tea" is its suffix: the longer text must win
    "espresso beans, dark roast": "Coffee",
    "Buty sportowe żółte, rozmiar 42": "Shoes",
    "Zielona herbata łagodna z jaśminem": "Tea",
}
CONFIDENCE = {
    "tea": 0.61,
    "green tea": 0.93,
    "Buty sportowe żółte, rozmiar 42": 0.42,
    "espresso beans, dark roast": 1.0,
}


def _input(titles: list[str]) -> pa.Table:
    return pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})


def _job(make_job, tmp_path, server: TeacherServer, titles: list[str], **overrides):
    api = {"base_url": server.base_url, "api_key_env": ENV, "max_concurrency": 4, "timeout_s": 5.0}
    spec = {
        "backend": "openai",
        "model": "teacher-model",
        "keep_columns": ["title"],
        "cache": {"path": str(tmp_path / "cache")},
        **overrides,
        "api": {**api, **overrides.get("api", {})},
    }
    return make_job(_input(titles), **spec)


@pytest.fixture
def teacher(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with TeacherServer(ANSWERS, key=KEY, confidence=CONFIDENCE, model_name_check="teacher-model") as srv:
        yield srv


def test_a_job_gets_the_teachers_labels_and_confidences(make_job, read_parts, tmp_path, teacher):
    titles = [*ANSWERS, "tea", "Zielona herbata łagodna z jaśminem"]  # two repeats: asked once each
    job_files = _job(make_job, tmp_path, teacher, titles)

    summary = run_job(load_job(job_files.path))

    rows = read_parts(job_files.output).to_pylist()
    assert len(rows) == len(titles)
    for row in rows:
        assert row["status"] == "ok", row
        assert row["label"] == ANSWERS[row["title"]]
        assert row["confidence"] == pytest.approx(CONFIDENCE.get(row["title"], 0.99), rel=1e-6)
    assert teacher.asked == dict.fromkeys(ANSWERS, 1)
    assert teacher.asked_texts() == set(ANSWERS)
    assert teacher.requests == len(ANSWERS)
    assert summary["status_counts"]["ok"] == len(titles)


def test_response_format_labels_come_back_wrapped_and_unwrapped(make_job, read_parts, tmp_path, teacher):
    job_files = _job(make_job, tmp_path, teacher, ["green tea", "tea"], api={"constraint": "json_schema"})

    run_job(load_job(job_files.path))

    rows = {r["title"]: r for r in read_parts(job_files.output).to_pylist()}
    assert {t: r["label"] for t, r in rows.items()} == {"green tea": "Vitamin", "tea": "Tea"}
    assert all(r["confidence"] is None for r in rows.values())  # OpenAI's JSON answers carry none


def test_a_single_confidence_and_an_unknown_text(make_job, read_parts, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with TeacherServer({"tea": "Tea"}, key=KEY, confidence=0.8, default="Shoes") as server:
        job_files = _job(make_job, tmp_path, server, ["tea", "mystery item"])
        run_job(load_job(job_files.path))
        rows = {r["title"]: r for r in read_parts(job_files.output).to_pylist()}
        assert rows["tea"]["label"] == "Tea" and rows["mystery item"]["label"] == "Shoes"
        assert rows["tea"]["confidence"] == pytest.approx(0.8, rel=1e-6)
        # Unknown: counted under the whole user message, which ends with the text.
        unknown = next(t for t in server.asked_texts() if t != "tea")
        assert unknown.endswith("mystery item") and server.asked[unknown] == 1


def test_unknown_text_without_default_gets_the_first_allowed_label(teacher):
    body = _body("Product title: no such thing", structured_outputs={"choice": ["Shoes", "Tea"]})
    status, answer = _post(teacher, body, KEY)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "Shoes"
    assert answer["usage"]["prompt_tokens"] == len("Product title: no such thing") // 4 + 10


def test_wrong_key_and_wrong_model_are_refused(teacher, make_job, tmp_path):
    assert _post(teacher, _body("tea"), "wrong")[0] == 401
    assert _post(teacher, {**_body("tea"), "model": "other"}, KEY)[0] == 404
    assert teacher.requests == 0
    job_files = _job(make_job, tmp_path, teacher, ["tea"], model="other-model")
    with pytest.raises(BackendError, match="404"):
        run_job(load_job(job_files.path))


def test_lookup_scales_to_thousands_of_texts():
    answers = {f"product {i} {'x' * (i % 97)}": "Tea" for i in range(2000)}
    server = TeacherServer(answers)
    try:
        for text in list(answers)[::50]:
            assert server.row_text(f"Product title: {text}\n") == text
        assert server.row_text("Product title: nothing known") is None
    finally:
        server.server_close()


def _body(content: str, **extra) -> dict:
    return {"model": "teacher-model", "messages": [{"role": "user", "content": content}], **extra}


def _post(server: TeacherServer, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as failed:
        return failed.code, json.loads(failed.read())
