"""OpenAI-compatible chat completions over HTTP: vLLM's server, Ollama, OpenRouter, Groq, Together,
DeepInfra, Fireworks, OpenAI itself.

Requests run concurrently (``api.max_concurrency``), under optional request and token rate limits.
Transient failures (429, 5xx, timeouts, dropped connections, unparseable bodies) are retried with
exponential backoff and jitter, honouring ``Retry-After``. A row that still fails gets status
``error`` with the reason and the run goes on; rerunning the job retries only those rows.
Authentication and "not found" answers (401, 403, 404) stop the run at once: every row would fail.

The API key is read from the environment variable named by ``api.api_key_env`` when the backend
starts, sent only in the Authorization header, and scrubbed from any error text.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace

from pipeline.backends.base import Backend, ByteTokens, Completion, Constraint, Messages
from pipeline.errors import BackendError, BackendUnavailableError

FATAL_STATUS = {401: "authentication failed", 403: "access denied", 404: "not found"}
RETRY_AFTER_CAP_S = 120.0


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's own advice in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _RowFailure(Exception):
    """A failure retrying can't fix, for this row only (e.g. 400: prompt too long)."""


class RateLimiter:
    """At most ``per_minute`` units in any sliding window of ``window_s`` seconds."""

    def __init__(self, per_minute: int, window_s: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self._log: list[tuple[float, int]] = []
        self._lock = asyncio.Lock()

    async def acquire(self, units: int = 1) -> None:
        units = min(units, self.per_minute)
        async with self._lock:
            while True:
                now = time.monotonic()
                self._log = [(t, n) for t, n in self._log if now - t < self.window_s]
                if sum(n for _, n in self._log) + units <= self.per_minute:
                    self._log.append((now, units))
                    return
                await asyncio.sleep(max(0.005, self.window_s - (now - self._log[0][0])))


class OpenAIBackend(ByteTokens, Backend):
    name = "openai"

    _key: str | None = None
    _started = False

    @property
    def api(self):
        if self.job.api is None:
            raise BackendError("backend 'openai' needs an 'api:' section (base_url, ...) in the job file")
        return self.job.api

    def start(self) -> None:
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise BackendUnavailableError("httpx is not installed", hint="pip install httpx") from None
        env = self.api.api_key_env
        if env:
            self._key = os.environ.get(env)
            if not self._key:
                raise BackendError(
                    f"no API key: the environment variable {env} is not set",
                    hint=f"export {env}=... before running (the key never goes in the job file)",
                )
        self._started = True

    @property
    def max_model_len(self) -> int | None:
        return self.job.engine.max_model_len

    def complete(
        self, conversations: list[Messages], constraint: Constraint, max_tokens: int
    ) -> list[Completion]:
        if not conversations:
            return []
        if not self._started:
            self.start()
        return asyncio.run(self._complete_all(conversations, constraint, max_tokens))

    async def _complete_all(self, conversations, constraint, max_tokens) -> list[Completion]:
        import httpx

        api = self.api
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(
            max_connections=api.max_concurrency, max_keepalive_connections=api.max_concurrency
        )
        gate = asyncio.Semaphore(api.max_concurrency)
        rpm = RateLimiter(api.requests_per_minute) if api.requests_per_minute else None
        tpm = RateLimiter(api.tokens_per_minute) if api.tokens_per_minute else None
        async with httpx.AsyncClient(
            base_url=api.base_url.rstrip("/"), headers=headers, timeout=api.timeout_s, limits=limits
        ) as client:

            async def one(messages: Messages) -> Completion:
                async with gate:
                    if rpm:
                        await rpm.acquire()
                    if tpm:
                        await tpm.acquire(self.prompt_tokens(messages) + max_tokens)
                    return await self._with_retries(client, messages, constraint, max_tokens)

            return list(await asyncio.gather(*(one(m) for m in conversations)))

    async def _with_retries(self, client, messages, constraint, max_tokens) -> Completion:
        from tenacity import (
            AsyncRetrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_random_exponential,
        )

        jitter = wait_random_exponential(multiplier=0.5, max=30)

        def wait(state) -> float:
            exc = state.outcome.exception()
            if isinstance(exc, _Transient) and exc.retry_after is not None:
                return min(exc.retry_after, RETRY_AFTER_CAP_S)  # the server said when
            return jitter(state)

        attempt_no = 0
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.api.max_retries + 1),
                wait=wait,
                retry=retry_if_exception_type(_Transient),
                reraise=True,
            ):
                with attempt:
                    attempt_no = attempt.retry_state.attempt_number
                    return await self._request(client, messages, constraint, max_tokens, attempt_no - 1)
        except _RowFailure as exc:
            return _failed(self._scrub(str(exc)), attempt_no - 1)
        except _Transient as exc:
            return _failed(f"gave up after {attempt_no} attempts: {self._scrub(str(exc))}", attempt_no - 1)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _request(self, client, messages, constraint, max_tokens, retries) -> Completion:
        import httpx

        body = request_body(self.job, self.model, messages, constraint, max_tokens)
        try:
            resp = await client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            raise _Transient(f"no answer within timeout_s={self.api.timeout_s}") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed: {type(exc).__name__}: {exc}") from None
        if resp.status_code in FATAL_STATUS:
            raise BackendError(
                f"{self.api.base_url}: HTTP {resp.status_code} {FATAL_STATUS[resp.status_code]}: "
                f"{self._scrub(resp.text[:300])}",
                hint="check api_key_env, base_url and model in the job file",
            )
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Transient(f"HTTP {resp.status_code}: {self._scrub(resp.text[:200])}", _retry_after(resp))
        if resp.status_code >= 400:
            raise _RowFailure(f"HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            data = resp.json()
        except ValueError:
            raise _Transient(f"malformed response body: {resp.text[:200]!r}") from None
        completion = parse_completion(data, wraps_label(self.api.constraint, constraint))
        if completion is None:
            raise _Transient(f"malformed response body: {resp.text[:200]!r}")
        return replace(completion, retries=retries)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def request_body(job, model: str, messages: Messages, constraint: Constraint, max_tokens: int) -> dict:
    """The chat completions request for one row (also what ``labelmill export`` writes)."""
    api, s = job.api, job.sampling
    body = {
        "model": model,
        "messages": messages,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": max_tokens,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if api.logprobs and api.constraint != "json_schema":
        body["logprobs"] = True
    if api.constraint == "choice":  # vLLM's structured outputs
        if constraint.choice is not None:
            body["structured_outputs"] = {"choice": list(constraint.choice)}
        else:
            body["structured_outputs"] = {"json": constraint.json_schema, "disable_any_whitespace": True}
    elif api.constraint == "json_schema":  # OpenAI's response_format
        schema = constraint.json_schema
        if constraint.choice is not None:  # a bare choice becomes {"label": <one of them>}
            body["max_tokens"] = max_tokens + 16
            schema = {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": list(constraint.choice)}},
                "required": ["label"],
                "additionalProperties": False,
            }
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "strict": True, "schema": schema},
        }
    body.update(api.extra_body)
    return body


def wraps_label(mode: str, constraint: Constraint) -> bool:
    return mode == "json_schema" and constraint.choice is not None


def parse_completion(data: dict, wrapped_label: bool = False) -> Completion | None:
    """A chat completion response body -> Completion; None if it is not one.

    ``wrapped_label``: the answer is ``{"label": ...}`` (a choice asked through OpenAI's
    response_format); the label is unwrapped, and logprobs (which cover the JSON) are not used.
    """
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return Completion(
        text=_label_from_json(text) if wrapped_label else text,
        logprob=None if wrapped_label else _sum_logprobs(choice),
        prompt_tokens=usage.get("prompt_tokens", 0),
        output_tokens=usage.get("completion_tokens", 0),
        finish_reason=choice.get("finish_reason"),
        cached_tokens=details.get("cached_tokens"),
    )


def _failed(reason: str, retries: int) -> Completion:
    return Completion(text="", logprob=None, prompt_tokens=0, output_tokens=0, finish_reason=None,
                      error=reason, retries=retries)  # fmt: skip


def _retry_after(resp) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; fall back to backoff


def _sum_logprobs(choice: dict) -> float | None:
    content = (choice.get("logprobs") or {}).get("content")
    values = [item.get("logprob") for item in content or [] if isinstance(item, dict)]
    if not values or not all(isinstance(v, (int, float)) for v in values):
        return None
    return sum(values)


def _label_from_json(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value.get("label", text) if isinstance(value, dict) else text
