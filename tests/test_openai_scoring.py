"""``decoding: score`` through the openai backend (``api.label_scoring``), against a real HTTP server
on loopback that speaks the part of vLLM's server scoring uses.

The server's "model" is a toy: one token per character (its code point), a ChatML-like template with
special tokens 1000 (start of turn) and 1001 (end of turn), and log-probabilities that depend on the
prompt and the token, renormalised over ``allowed_token_ids`` as ``--logprobs-mode
processed_logprobs`` does. Its failures are scripted by a marker in the row text, as in
``fault_server``: ``FLAKY`` answers 500 twice, ``DOWN`` answers 503 while ``server.down``. The real
``vllm serve`` is in ``test_vllm_server.py``.
"""

from __future__ import annotations

import json
import math
import threading
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline.backends.openai import ApiSettings, OpenAIBackend
from pipeline.cli import main
from pipeline.config import load_job
from pipeline.errors import BackendError
from pipeline.runner import run_job

KEY = "sk-scoring-test-91d2-NOT-IN-FILES"
ENV = "LABELMILL_SCORING_TEST_KEY"
LABELS = ["Coffee", "Tea", "Tea Set", "Shoes"]  # "Tea" ends where "Tea Set" goes on
START, END = 1000, 1001


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def _render(messages: list[dict], generation: bool, continued: bool) -> list[int]:
    ids = []
    for m in messages:
        ids += [START, *_ids(m["role"]), 10, *_ids(m["content"]), END, 10]
    if continued:
        ids = ids[:-2]
    return ids + ([START, *_ids("assistant"), 10] if generation else [])


class ScoringServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, max_logprobs: int = 20, raw: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.max_logprobs = max_logprobs
        self.raw = raw
        """Log-probabilities of the top tokens of the whole vocabulary, as vLLM's default mode."""
        self.down = True
        self.attempts: Counter[str] = Counter()
        self.bodies: dict[str, list[dict]] = {"/tokenize": [], "/detokenize": [], "/v1/completions": []}
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> ScoringServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def attempt(self, text: str) -> int:
        with self._lock:
            self.attempts[text] += 1
            return self.attempts[text]


class _Handler(BaseHTTPRequestHandler):
    server: ScoringServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        self.server.bodies[self.path].append(body)
        if self.path == "/tokenize":  # not behind the key, as in vLLM
            if "messages" in body:
                tokens = _render(body["messages"], body["add_generation_prompt"],
                                 body.get("continue_final_message", False))  # fmt: skip
            else:
                tokens = _ids(body["prompt"])
            return self._json(200, {"count": len(tokens), "max_model_len": 4096, "tokens": tokens})
        if self.path == "/detokenize":
            return self._json(
                200, {"prompt": "".join(chr(t) if t < START else "<|>" for t in body["tokens"])}
            )
        if self.headers.get("authorization") != f"Bearer {KEY}":
            return self._json(401, {"error": "Unauthorized"})
        return self._complete(body)

    def _complete(self, body: dict) -> None:
        prompt, allowed = body["prompt"], body["allowed_token_ids"]
        if body["logprobs"] > self.server.max_logprobs:
            message = (f"Requested sample logprobs of {body['logprobs']}, which is greater than max "
                       f"allowed: {self.server.max_logprobs} (parameter=logprobs)")  # fmt: skip
            return self._json(400, {"error": {"message": message, "param": "logprobs", "code": 400}})
        text = "".join(chr(t) for t in prompt if t < START)
        attempt = self.server.attempt(text)
        if "FLAKY" in text and attempt <= 2:
            return self._json(500, {"error": {"message": "internal error"}})
        if "DOWN" in text and self.server.down:
            return self._json(503, {"error": {"message": "upstream unavailable"}})
        logits = {t: zlib.crc32(json.dumps([prompt[-40:], t]).encode()) % 700 / 100 for t in allowed}
        if self.server.raw:
            logits[ord("x")] = 9.0
        total = math.log(sum(math.exp(v) for v in logits.values()))
        top = {f"token_id:{t}": v - total for t, v in logits.items()}
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 16},
        }
        choice = {"index": 0, "text": "", "logprobs": {"top_logprobs": [top]}, "finish_reason": "length"}
        return self._json(200, {"object": "text_completion", "choices": [choice], "usage": usage})

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    with ScoringServer() as srv:
        yield srv


def _scored_job(make_job, server: ScoringServer, titles: list, **api):
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})
    api = {"base_url": server.base_url, "api_key_env": ENV, "label_scoring": True, "max_retries": 2, **api}
    return make_job(data, backend="openai", model="toy", labels=LABELS, decoding="score",
                    label_probs=len(LABELS), keep_columns=["title"], api=api)  # fmt: skip


def test_every_row_is_scored_and_only_rows_whose_requests_fail_are_errors(
    make_job, read_parts, server, monkeypatch
):
    monkeypatch.setenv(ENV, KEY)
    titles = [f"Green tea {i}" for i in range(6)] + ["FLAKY kettle", "DOWN teapot", None]
    job_files = _scored_job(make_job, server, titles, extra_body={"chat_template_kwargs": {"x": 1}})

    summary = run_job(load_job(job_files.path))
    rows = {r["title"]: r for r in read_parts(job_files.output).to_pylist()}
    assert len(rows) == len(titles)
    for title in [*titles[:6], "FLAKY kettle"]:
        row = rows[title]
        assert row["status"] == "ok", row
        assert [p["label"] for p in row["label_probs"]][:1] == [row["label"]]
        assert sorted(p["label"] for p in row["label_probs"]) == sorted(LABELS)
        assert sum(p["prob"] for p in row["label_probs"]) == pytest.approx(1.0, abs=1e-9)
        assert row["confidence"] == pytest.approx(row["label_probs"][0]["prob"], rel=1e-12)
        # "Tea" and "Tea Set" share their first three tokens: every row takes a second step
        assert row["output_tokens"] == 2 and row["cached_tokens"] == 16
        assert row["prompt_tokens"] > 50
    assert rows["DOWN teapot"]["status"] == "error" and "503" in rows["DOWN teapot"]["error"]
    assert rows[None]["status"] == "empty_input"
    assert summary["status_counts"]["error"] == 1 and summary["retries"] >= 2 + 2  # FLAKY, DOWN

    # each step asked for exactly the tokens a label can go on with, on token-id prompts
    steps = server.bodies["/v1/completions"]
    first_tokens = sorted({ord(label[0]) for label in LABELS})
    assert {tuple(sorted(b["allowed_token_ids"])) for b in steps} == {tuple(first_tokens), (ord(" "), END)}
    assert all(b["max_tokens"] == 1 and b["return_tokens_as_token_ids"] is True for b in steps)
    assert all(b["logprobs"] == len(b["allowed_token_ids"]) for b in steps)
    chats = [b for b in server.bodies["/tokenize"] if "messages" in b]
    assert chats and all(b["chat_template_kwargs"] == {"x": 1} and b["model"] == "toy" for b in chats)
    for path in Path(job_files.output).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path

    # the server recovers: a rerun scores only the row that failed
    server.down = False
    sent = len(steps)
    again = run_job(load_job(job_files.path))
    assert again["status_counts"]["error"] == 0
    resent = ["".join(chr(t) for t in b["prompt"] if t < START) for b in steps[sent:]]
    # the rows' requests (besides the content-free prompts that calibrate a new backend)
    of_rows = [text for text in resent if any(word in text for word in ("tea", "kettle", "teapot"))]
    assert of_rows and all("DOWN teapot" in text for text in of_rows)


def test_a_label_set_wider_than_the_servers_max_logprobs_stops_the_run(make_job, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with ScoringServer(max_logprobs=2) as server:
        job_files = _scored_job(make_job, server, ["Green tea", "Black coffee"])
        with pytest.raises(BackendError) as info:
            run_job(load_job(job_files.path))
    assert "needs up to 3 log-probabilities" in info.value.message and "at most 2" in info.value.message
    assert "--max-logprobs 3" in info.value.hint


def test_raw_logprobs_are_refused_naming_the_logprobs_mode(make_job, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with ScoringServer(raw=True) as server:
        job_files = _scored_job(make_job, server, ["Green tea"])
        with pytest.raises(BackendError) as info:
            run_job(load_job(job_files.path))
    assert "did not allow" in info.value.message and str(ord("x")) in info.value.message
    assert "--logprobs-mode processed_logprobs" in info.value.hint


def test_label_paths_and_end_of_answer_come_from_the_servers_template(server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    backend = OpenAIBackend(
        ApiSettings(base_url=server.base_url + "/", api_key_env=ENV, label_scoring=True), "toy"
    )
    assert backend.label_paths(LABELS, [{"role": "user", "content": "x"}]) == [
        _ids(label) for label in LABELS
    ]
    assert backend.end_tokens() == [END]


def test_without_label_scoring_auto_is_constrained_and_score_is_refused(make_job):
    api = {"base_url": "http://127.0.0.1:9/v1"}
    job_files = make_job(backend="openai", model="toy", api=api)
    result = CliRunner().invoke(main, ["validate", str(job_files.path)])
    assert result.exit_code == 0, result.output
    decoding = next(line for line in result.output.splitlines() if line.strip().startswith("decoding"))
    assert "constrained" in decoding and "api.label_scoring is off" in decoding

    job_files.rewrite(decoding="score")
    result = CliRunner().invoke(main, ["validate", str(job_files.path)])
    assert result.exit_code == 2, result.output
    assert "decoding: score can't be used here" in result.output and "label_scoring" in result.output

    job_files.rewrite(api={**api, "label_scoring": True})
    result = CliRunner().invoke(main, ["validate", str(job_files.path)])
    assert result.exit_code == 0, result.output
    assert "decoding score:" in " ".join(result.output.split())


def test_label_scoring_is_in_the_identity_only_when_on():
    off = ApiSettings(base_url="http://127.0.0.1:8000/v1")
    assert "label_scoring" not in OpenAIBackend.identity(off)
    assert OpenAIBackend.identity(off.model_copy(update={"label_scoring": True}))["label_scoring"] is True
