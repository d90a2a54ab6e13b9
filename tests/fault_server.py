"""A real OpenAI-style HTTP server on loopback whose failures the tests script.

It is not a mock of labelmill's client: it speaks HTTP over a socket, and labelmill's backend
talks to it exactly as to a provider. What it does with a request depends on a marker in the row
text (the last user message):

    RATE      answers 429 with Retry-After: 1 twice, then normally
    FLAKY     answers 500 twice, then normally
    HANG      first attempt: waits longer than the client's timeout; then normally
    DROP      first attempt: closes the connection without an answer; then normally
    GARBLED   always answers 200 with a body that is not JSON
    OUTSIDE   answers with a word that is not a label
    DOWN      answers 503 while ``server.down`` is true

Every request must carry ``Authorization: Bearer <key>``, else 401. ``burst_429`` makes the first
N requests of the server's life answer 429 whatever they hold.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKERS = ("RATE", "FLAKY", "HANG", "DROP", "GARBLED", "OUTSIDE", "DOWN")


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, key: str, hang_s: float = 3.0, burst_429: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.key = key
        self.hang_s = hang_s
        self.burst_429 = burst_429
        self.down = True
        self.attempts: Counter[str] = Counter()
        self.requests = 0
        self.seen_bodies: list[dict] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def attempts_for(self, row_text: str) -> int:
        """Requests whose user message ends with ``row_text`` (the template puts the row last)."""
        return sum(n for text, n in self.attempts.items() if text.endswith(row_text))

    def count(self, text: str) -> tuple[int, int]:
        with self._lock:
            self.requests += 1
            self.attempts[text] += 1
            return self.requests, self.attempts[text]


class _Handler(BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length))
        if self.headers.get("authorization") != f"Bearer {self.server.key}":
            return self._json(401, {"error": {"message": "Incorrect API key provided"}})
        text = body["messages"][-1]["content"]
        nth_request, attempt = self.server.count(text)
        self.server.seen_bodies.append(body)
        marker = next((m for m in MARKERS if m in text), None)
        if nth_request <= self.server.burst_429:
            return self._json(429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"})
        if marker == "RATE" and attempt <= 2:
            return self._json(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
        if marker == "FLAKY" and attempt <= 2:
            return self._json(500, {"error": {"message": "internal error"}})
        if marker == "HANG" and attempt == 1:
            time.sleep(self.server.hang_s)
        if marker == "DROP" and attempt == 1:
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        if marker == "GARBLED":
            return self._raw(200, b'{"choices": [{"message": {"content": "Tea"')
        if marker == "DOWN" and self.server.down:
            return self._json(503, {"error": {"message": "upstream unavailable"}})
        choices = body.get("structured_outputs", {}).get("choice") or ["Tea"]
        pick = int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(choices)
        answer = "HACKED" if marker == "OUTSIDE" else choices[pick]
        return self._json(
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                        "logprobs": {
                            "content": [{"token": answer, "logprob": -0.25}, {"token": "", "logprob": -0.05}]
                        },
                    }
                ],
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": 2,
                    "total_tokens": 102,
                    "prompt_tokens_details": {"cached_tokens": 64},
                },
            },
        )

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._raw(status, json.dumps(payload).encode(), headers)

    def _raw(self, status: int, data: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (HANG): exactly what the test wants
