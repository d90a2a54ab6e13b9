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
import os
import time
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator

from pipeline import logs
from pipeline.backends import chat_api
from pipeline.backends.base import Backend, ByteTokens
from pipeline.contracts import Completion, Messages, Options, Request
from pipeline.errors import BackendError, BackendUnavailableError

log = logs.get("openai")

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


class ApiSettings(Options):
    """An OpenAI-compatible chat completions server: the job's ``api:`` section."""

    base_url: str
    """Up to and including ``/v1``, e.g. ``http://127.0.0.1:8000/v1`` or ``https://openrouter.ai/api/v1``."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the API key (never the key itself). None: no key."""
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    """Requests in flight at once."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Seconds to wait for one answer before it counts as a failed attempt."""
    max_retries: int = Field(default=5, ge=0, le=50)
    """Retries of a request after 429, 5xx, timeouts, dropped connections or garbled answers."""
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    """Client-side rate limits (estimated prompt tokens + answer budget per request)."""
    constraint: Literal["choice", "json_schema", "none"] = "choice"
    """How answers are held to the label set: ``choice`` (vLLM server's structured outputs),
    ``json_schema`` (OpenAI-style ``response_format`` with an enum; no confidence), ``none``
    (prompt only). Answers are validated against the labels in every case."""
    logprobs: bool = True
    """Ask for token logprobs, for the confidence column (servers that don't return them give null)."""
    max_model_len: int | None = Field(default=None, gt=0)
    """The served model's context length in tokens, if you want row text cut to fit it before it is
    sent (counted at 4 bytes a token); None: texts are sent whole and the server decides."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Provider-specific fields merged into every request body."""

    @field_validator("extra_body")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if any(word in key.lower() for word in ("key", "token", "secret", "authorization")):
                raise ValueError(f"'{key}' looks like a credential; put it in an environment variable")
        return value


class OpenAIBackend(ByteTokens, Backend):
    name = "openai"
    section = "api"
    Settings = ApiSettings
    batch_url = chat_api.URL

    _key: str | None = None
    _started = False

    @classmethod
    def identity(cls, settings: ApiSettings) -> dict[str, Any]:
        # How the answer is constrained and read, and the provider fields, decide what comes back.
        return {
            "constraint": settings.constraint,
            "logprobs": settings.logprobs,
            "extra_body": settings.extra_body,
        }

    @classmethod
    def describe_settings(cls, settings: ApiSettings) -> dict[str, Any]:
        data = settings.model_dump(mode="json")
        data["base_url"] = _without_userinfo(settings.base_url)  # no password in run.json
        return data

    @property
    def api(self) -> ApiSettings:
        return self.settings

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
        return self.api.max_model_len

    def request_body(self, messages: Messages, request: Request) -> dict:
        api = self.api
        return chat_api.request_body(
            self.model, messages, request, api.constraint, api.logprobs, api.extra_body
        )

    def read_response(self, body: dict, request: Request) -> Completion | None:
        return chat_api.parse_completion(body, chat_api.wraps_label(self.api.constraint, request.constraint))

    def complete(self, conversations: list[Messages], request: Request) -> list[Completion]:
        if not conversations:
            return []
        if not self._started:
            self.start()
        return asyncio.run(self._complete_all(conversations, request))

    async def _complete_all(self, conversations: list[Messages], request: Request) -> list[Completion]:
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
                        await tpm.acquire(self.prompt_tokens(messages) + request.max_tokens)
                    return await self._with_retries(client, messages, request)

            return list(await asyncio.gather(*(one(m) for m in conversations)))

    async def _with_retries(self, client, messages: Messages, request: Request) -> Completion:
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
                delay = min(exc.retry_after, RETRY_AFTER_CAP_S)  # the server said when
            else:
                delay = jitter(state)
            log.debug("retrying a request in %.1f s (attempt %d failed: %s)",
                      delay, state.attempt_number, self._scrub(str(exc)))  # fmt: skip
            return delay

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
                    return await self._request(client, messages, request, attempt_no - 1)
        except _RowFailure as exc:
            return _failed(self._scrub(str(exc)), attempt_no - 1)
        except _Transient as exc:
            return _failed(f"gave up after {attempt_no} attempts: {self._scrub(str(exc))}", attempt_no - 1)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _request(self, client, messages: Messages, request: Request, retries: int) -> Completion:
        import httpx

        body = self.request_body(messages, request)
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
        completion = self.read_response(data, request)
        if completion is None:
            raise _Transient(f"malformed response body: {resp.text[:200]!r}")
        return replace(completion, retries=retries)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _failed(reason: str, retries: int) -> Completion:
    return Completion.failed(reason, retries)


def _retry_after(resp) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; fall back to backoff
