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
    REFUSE    answers 400 with the same error every time (bar a request id that differs)

Every request must carry ``Authorization: Bearer <key>``, else 401. ``burst_429`` makes the first
N requests of the server's life answer 429 whatever they hold.

Modes for the whole server:

    reasoning=True      behaves like OpenAI's reasoning models (o-series, gpt-5): 400 with OpenAI's
                        own error bodies for ``max_tokens``, for a ``temperature`` other than 1 and
                        for ``logprobs``; otherwise ``reasoning_tokens`` hidden tokens are spent
                        inside ``max_completion_tokens`` before the answer (an answer that no longer
                        fits comes back empty with finish_reason "length", as OpenAI's does), and
                        usage reports them in ``completion_tokens_details.reasoning_tokens``
    reject_all=MESSAGE  answers every request 400 with MESSAGE and a request id that differs
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter

from loopback import JsonHandler, LoopbackServer

MARKERS = ("RATE", "FLAKY", "HANG", "DROP", "GARBLED", "OUTSIDE", "DOWN", "REFUSE")

# OpenAI's answers to a reasoning model asked for what it doesn't take, word for word.
MAX_TOKENS_REFUSED = {
    "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
    "Use 'max_completion_tokens' instead.",
    "type": "invalid_request_error",
    "param": "max_tokens",
    "code": "unsupported_parameter",
}
LOGPROBS_REFUSED = {
    "message": "Unsupported parameter: 'logprobs' is not supported with this model.",
    "type": "invalid_request_error",
    "param": "logprobs",
    "code": "unsupported_parameter",
}


def temperature_refused(value: float) -> dict:
    return {
        "message": f"Unsupported value: 'temperature' does not support {value} with this model. "
        "Only the default (1) value is supported.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "unsupported_value",
    }


class FaultServer(LoopbackServer):
    def __init__(
        self,
        key: str,
        hang_s: float = 3.0,
        burst_429: int = 0,
        *,
        reasoning: bool = False,
        reasoning_tokens: int = 300,
        reject_all: str | None = None,
    ) -> None:
        super().__init__(_Handler)
        self.key = key
        self.hang_s = hang_s
        self.burst_429 = burst_429
        self.reasoning = reasoning
        self.reasoning_tokens = reasoning_tokens
        self.reject_all = reject_all
        self.down = True
        self.attempts: Counter[str] = Counter()
        self.requests = 0
        self.seen_bodies: list[dict] = []
        self._lock = threading.Lock()

    def attempts_for(self, row_text: str) -> int:
        """Requests whose user message ends with ``row_text`` (the template puts the row last)."""
        return sum(n for text, n in self.attempts.items() if text.endswith(row_text))

    def count(self, text: str) -> tuple[int, int]:
        with self._lock:
            self.requests += 1
            self.attempts[text] += 1
            return self.requests, self.attempts[text]


class _Handler(JsonHandler):
    server: FaultServer

    def do_POST(self) -> None:
        body = self.authorised_body()
        if body is None:
            return None
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
        if self.server.reject_all is not None or marker == "REFUSE":
            message = self.server.reject_all or "This request was refused"
            return self._json(400, {"error": {"message": f"{message} (request id req_{nth_request:05d}f3)"}})
        choices = body.get("structured_outputs", {}).get("choice") or ["Tea"]
        pick = int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(choices)
        answer = "HACKED" if marker == "OUTSIDE" else choices[pick]
        if self.server.reasoning:
            return self._reason(body, answer)
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

    def _reason(self, body: dict, answer: str) -> None:
        """An OpenAI reasoning model's answer, or its 400 for a field it doesn't take."""
        if "max_tokens" in body:
            return self._json(400, {"error": MAX_TOKENS_REFUSED})
        if body.get("temperature", 1) != 1:
            return self._json(400, {"error": temperature_refused(body["temperature"])})
        if "logprobs" in body:
            return self._json(400, {"error": LOGPROBS_REFUSED})
        if "response_format" in body:
            answer = json.dumps({"label": answer})
        answer_tokens = 2
        reasoning = self.server.reasoning_tokens
        limit = body.get("max_completion_tokens")
        finish = "stop"
        if limit is not None and reasoning + answer_tokens > limit:
            # Out of budget while thinking: OpenAI sends no content at all.
            answer, answer_tokens, reasoning, finish = "", 0, limit, "length"
        return self._json(
            200,
            {
                "id": "chatcmpl-reasoning",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer, "refusal": None},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": answer_tokens + reasoning,
                    "total_tokens": 100 + answer_tokens + reasoning,
                    "prompt_tokens_details": {"cached_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": reasoning},
                },
            },
        )
