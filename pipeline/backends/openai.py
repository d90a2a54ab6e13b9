"""OpenAI-compatible chat completions over HTTP: vLLM's server, Ollama, OpenRouter, Groq, Together,
DeepInfra, Fireworks, OpenAI itself.

Requests run concurrently (``api.max_concurrency``), under optional request and token rate limits.
Transient failures (429, 5xx, timeouts, dropped connections, unparseable bodies) are retried with
exponential backoff and jitter, honouring ``Retry-After``. A row that still fails gets status
``error`` with the reason and the run goes on; rerunning the job retries only those rows.
Authentication and "not found" answers (401, 403, 404) stop the run at once: every row would fail.
So does the same client error (4xx) on ``api.max_consecutive_client_errors`` rows in a row.

Reasoning models: the answer budget goes in ``max_completion_tokens`` for OpenAI's reasoning
families (``api.token_limit_field``), with room for hidden reasoning (``api.reasoning_budget``).
When a server answers 400 that the model doesn't take a field labelmill sent (``max_tokens``,
``temperature``, ``top_p``, ``logprobs``), the backend sends the other budget field or leaves the
field out for the rest of the run, says so once in the log, and sends the row again.

The API key is read from the environment variable named by ``api.api_key_env`` when the backend
starts, sent only in the Authorization header, and scrubbed (in any letter case) from every text
built from a server's answer. Credentials anywhere in the ``api:`` section are refused when the job
is validated: the section is copied into the run folder's ``job.yaml`` and ``run.json``. That
covers user info and credential-named query parameters in ``base_url``, and credential-named keys
at any depth of ``extra_body``. Any other ``extra_body`` field is sent, bar the fields labelmill
sets itself (``chat_api.OWNED_FIELDS``).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator

from pipeline import logs
from pipeline.backends import chat_api
from pipeline.backends.base import Backend, ByteTokens
from pipeline.contracts import Completion, Messages, Options, Request
from pipeline.errors import BackendError, BackendUnavailableError

log = logs.get("openai")

FATAL_STATUS = {401: "authentication failed", 403: "access denied", 404: "not found"}
RETRY_AFTER_CAP_S = 120.0
DEFAULT_REASONING_BUDGET = 1024
"""Tokens of hidden reasoning a known reasoning model gets on top of the answer budget, unless
``api.reasoning_budget`` says otherwise: enough for a classification at low or medium effort."""
# Fields a server may refuse for a model, and what labelmill does then: send the other budget
# field, or leave the field out (the model decodes its own way; confidence is null without logprobs).
_ADAPTABLE = frozenset({*chat_api.TOKEN_LIMIT_FIELDS, "temperature", "top_p", "logprobs"})

# A key name made of one of these words looks like it holds a credential. "tokens" is not among
# them: min_tokens and max_tokens count tokens, they don't hold one.
_CREDENTIAL_WORDS = frozenset(
    {"key", "keys", "apikey", "apikeys", "token", "secret", "secrets", "password", "passwords",
     "passwd", "pwd", "credential", "credentials", "authorization", "auth", "bearer", "cookie",
     "cookies", "header", "headers", "jwt", "oauth"}
)  # fmt: skip
# ...and so does one holding these anywhere (run-together spellings like "xapikey", "authtoken").
_CREDENTIAL_STEMS = ("password", "passwd", "passphrase", "secret", "credential", "authoriz", "apikey",
                     "accesskey", "privatekey", "accesstoken", "authtoken", "bearer", "cookie")  # fmt: skip
# "token" followed by one of these counts or names tokens (stop_token_ids, thinking_token_budget).
_TOKEN_COUNTS = frozenset({"id", "ids", "budget", "limit", "limits", "count", "counts"})
_CREDENTIAL_FIX = (
    "refused, as the job file is copied into the run folder: put the key in an environment variable "
    "and name it in api.api_key_env"
)


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's own advice in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _RowFailure(Exception):
    """A failure retrying can't fix, for this row only (e.g. 400: prompt too long)."""


class _Refused(Exception):
    """A 400 saying the model doesn't take a field this request carried."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


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
    """Up to and including ``/v1``, e.g. ``http://127.0.0.1:8000/v1`` or ``https://openrouter.ai/api/v1``.
    No user name or password in it, and no credential in its query: the key goes in ``api_key_env``."""
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
    """Provider-specific fields merged into every request body (``top_k``, ``skip_special_tokens``,
    ``reasoning_effort``, ``provider``, ...). Never a field labelmill sets (``model``, ``messages``,
    ``max_tokens``, ``max_completion_tokens``, ``temperature``, ...: each has its own job key) and
    never a credential, at any depth."""
    extra_fields: list[str] = Field(default_factory=list)
    """Not needed any more: every ``extra_body`` field is sent. Accepted, and ignored, so that job
    files written for earlier versions (which sent only the fields listed here) still load."""
    token_limit_field: Literal["auto", "max_tokens", "max_completion_tokens"] = "auto"
    """The request field that carries the answer budget. ``auto``: ``max_completion_tokens`` for
    OpenAI's reasoning models (o1, o3, o4-mini, gpt-5, ... on any base_url), which refuse
    ``max_tokens``, and ``max_tokens`` for the rest; when the server refuses the one sent, the other
    is sent for the rest of the run."""
    reasoning_budget: int | None = Field(default=None, ge=0)
    """Tokens added to the answer budget for the model's hidden reasoning, which counts against it:
    without room, a reasoning model stops before it answers. None: 1024 for known reasoning models
    (OpenAI's o-series and gpt-5, gpt-oss, DeepSeek-R1, QwQ, ``*thinking*``), 0 for the rest. An
    answer cut while reasoning gets status ``error`` (asked again by a rerun), so raising this and
    rerunning asks only those rows again."""
    max_consecutive_client_errors: int = Field(default=20, ge=0)
    """Stop the run (exit 4) when this many rows in a row fail with the same client error (HTTP
    4xx, e.g. a 400 refusing a request field), instead of marking every row ``error``. 0: never."""

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        # The messages never quote the URL: whatever is wrong with it may be the secret.
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises on a port that isn't a number
        except ValueError:
            raise ValueError("is not a valid URL; write it like http://127.0.0.1:8000/v1") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "must start with http:// or https:// and name a host, e.g. http://127.0.0.1:8000/v1"
            )
        if "@" in parts.netloc:
            raise ValueError(f"holds a user name or password (user:password@host); {_CREDENTIAL_FIX}")
        names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
        flagged = [n for n, name in enumerate(names, 1) if looks_like_credential(name)]
        if flagged:
            raise ValueError(f"query parameter #{flagged[0]} is named like a credential; {_CREDENTIAL_FIX}")
        if parts.fragment:
            raise ValueError("ends in a #fragment, which is never sent to the server; remove it")
        return value

    @model_validator(mode="after")
    def _extra_body_fields(self) -> ApiSettings:
        problems = extra_body_problems(self.extra_body)
        if len(problems) == 1:
            raise ValueError(problems[0])
        if problems:
            raise ValueError("\n".join([f"{len(problems)} problems:", *(f"      * {p}" for p in problems)]))
        return self


def looks_like_credential(name: str) -> bool:
    """Whether a key name reads like one that holds a secret (``api_key``, ``X-Auth-Token``,
    ``clientSecret``, ``password``), in any case and spelling (``_``, ``-``, ``.``, camelCase)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", spaced)
    words = [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]
    for i, word in enumerate(words):
        if word == "token" and i + 1 < len(words) and words[i + 1] in _TOKEN_COUNTS:
            continue
        if word in _CREDENTIAL_WORDS:
            return True
    flat = name.lower()
    return any(stem in flat for stem in _CREDENTIAL_STEMS)


def extra_body_problems(extra_body: dict[str, Any]) -> list[str]:
    """What is wrong with an ``extra_body``, each naming the key's path and never its value; empty
    when nothing is. Refused: fields labelmill sets itself, and credential-like keys at any depth.
    Every other field is the provider's business and is sent as it is."""
    problems: list[str] = []
    credentials: list[str] = []
    for key, value in extra_body.items():
        path = f"extra_body.{key}"
        if chat_api.owned(key):
            problems.append(_owned(path, key))
        elif key not in chat_api.CREDENTIAL_LOOKALIKES and looks_like_credential(key):
            credentials.append(path)
        credentials += _credential_paths(value, path)
    if credentials:
        looks = "looks like a credential" if len(credentials) == 1 else "look like credentials"
        problems.insert(0, f"{', '.join(credentials)} {looks}; {_CREDENTIAL_FIX}")
    return problems


def _owned(path: str, key: str) -> str:
    owner = chat_api.owner_of(key)
    if owner is None:
        return f"{path} can't be set: labelmill reads one whole plain-text answer per request"
    if key.lower() in chat_api.TOKEN_LIMIT_FIELDS:
        return (
            f"{path} is set by labelmill from the job key '{owner}' (the answer budget, which "
            f"api.token_limit_field names); room for a model's hidden reasoning is api.reasoning_budget"
        )
    return f"{path} is set by labelmill from the job key '{owner}'; change it there"


def _credential_paths(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}"
            if looks_like_credential(str(key)):
                yield here
            yield from _credential_paths(item, here)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _credential_paths(item, f"{path}[{i}]")


class OpenAIBackend(ByteTokens, Backend):
    name = "openai"
    section = "api"
    Settings = ApiSettings
    batch_url = chat_api.URL

    _key: str | None = None
    _started = False

    def __init__(self, settings: ApiSettings | None = None, model: str = "") -> None:
        super().__init__(settings, model)
        self._refused: set[str] = set()
        """Fields the server said this model doesn't take: not sent again in this backend's life."""
        self._streak: tuple[str | None, int] = (None, 0)
        """The last row's client error (normalised) and how many rows in a row have had it."""
        self._stopped: BackendError | None = None
        """Set when the breaker stops a call: the requests still running stop sending."""

    @classmethod
    def identity(cls, settings: ApiSettings, request: Request | None = None) -> dict[str, Any]:
        # Everything that can change an answer: which server (and so which weights), how the answer
        # is constrained and read, the provider fields, and where row text is cut. How fast and how
        # often it is asked (and with which key) can't. Nor can the budget field's name or the
        # reasoning room: both only decide where an answer is cut, and an answer cut while the
        # model reasons is a failure, which is neither cached nor kept by a rerun.
        return {
            "base_url": _public_url(settings.base_url),
            "constraint": settings.constraint,
            "logprobs": settings.logprobs,
            "extra_body": settings.extra_body,
            "max_model_len": settings.max_model_len,
        }

    @classmethod
    def describe_settings(cls, settings: ApiSettings) -> dict[str, Any]:
        data = settings.model_dump(mode="json")
        data["base_url"] = _public_url(settings.base_url)
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

    @property
    def reasoning_budget(self) -> int:
        """Tokens of room for hidden reasoning on top of each answer budget."""
        if self.api.reasoning_budget is not None:
            return self.api.reasoning_budget
        return DEFAULT_REASONING_BUDGET if chat_api.reasoning_model(self.model) else 0

    @property
    def token_field(self) -> str:
        """The field the answer budget goes in now: the setting's, or with ``auto`` the other one
        once the server has refused it."""
        field = chat_api.token_limit_field(self.model, self.api.token_limit_field)
        other = next(f for f in chat_api.TOKEN_LIMIT_FIELDS if f != field)
        if self.api.token_limit_field == "auto" and field in self._refused and other not in self._refused:
            return other
        return field

    def request_body(self, messages: Messages, request: Request) -> dict:
        api = self.api
        return chat_api.request_body(
            self.model,
            messages,
            request,
            api.constraint,
            api.logprobs,
            api.extra_body,
            token_field=self.token_field,
            reasoning_budget=self.reasoning_budget,
            leave_out=sorted(self._refused - set(chat_api.TOKEN_LIMIT_FIELDS)),
        )

    def read_response(self, body: dict, request: Request) -> Completion | None:
        return chat_api.parse_completion(body, chat_api.wraps_label(self.api.constraint, request.constraint))

    def complete(self, conversations: list[Messages], request: Request) -> list[Completion]:
        if not conversations:
            return []
        if not self._started:
            self.start()
        self._stopped = None
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
        budget = request.max_tokens + self.reasoning_budget
        async with httpx.AsyncClient(
            base_url=api.base_url.rstrip("/"), headers=headers, timeout=api.timeout_s, limits=limits
        ) as client:

            async def one(messages: Messages) -> Completion:
                async with gate:
                    if rpm:
                        await rpm.acquire()
                    if tpm:
                        await tpm.acquire(self.prompt_tokens(messages) + budget)
                    done = await self._with_retries(client, messages, request)
                    self.answered(1)
                    return done

            tasks = [asyncio.ensure_future(one(m)) for m in conversations]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                # One row stopped the run: the others stop sending now, not after their retries.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

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
                    completion = await self._request(client, messages, request, attempt_no - 1)
                    self._count_client_error(completion.error)
                    return completion
        except _RowFailure as exc:
            reason = self._scrub(str(exc))
            self._count_client_error(reason)
            return _failed(reason, attempt_no - 1)
        except _Transient as exc:
            self._count_client_error(None)
            return _failed(f"gave up after {attempt_no} attempts: {self._scrub(str(exc))}", attempt_no - 1)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _request(self, client, messages: Messages, request: Request, retries: int) -> Completion:
        # Each pass sends the body as the run now knows the model: a field it refused (here or in a
        # request running beside this one) is not sent again. Every pass but the last learns one.
        for _ in range(len(_ADAPTABLE) + 1):
            body = self.request_body(messages, request)
            try:
                return await self._send(client, body, request, retries)
            except _Refused as refused:
                if not self._refuse(refused.field, body):
                    raise _RowFailure(str(refused)) from None
        raise AssertionError("unreachable: each pass leaves out one more field")

    async def _send(self, client, body: dict, request: Request, retries: int) -> Completion:
        import httpx

        if self._stopped is not None:
            raise self._stopped
        try:
            resp = await client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            raise _Transient(f"no answer within timeout_s={self.api.timeout_s}") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed: {type(exc).__name__}: {self._scrub(str(exc))}") from None
        # Scrubbed before it is cut: a key cut in half would no longer match.
        text = self._scrub(resp.text)
        if resp.status_code in FATAL_STATUS:
            raise BackendError(
                f"{_display_url(self.api.base_url)}: HTTP {resp.status_code} "
                f"{FATAL_STATUS[resp.status_code]}: {text[:300]}",
                hint="check api_key_env, base_url and model in the job file",
            )
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Transient(f"HTTP {resp.status_code}: {text[:200]}", _retry_after(resp))
        if resp.status_code == 400:
            field = chat_api.refused_field(text)
            if field in _ADAPTABLE and field in body:
                raise _Refused(field, f"HTTP 400: {text[:300]}")
        if resp.status_code >= 400:
            raise _RowFailure(f"HTTP {resp.status_code}: {text[:300]}")
        try:
            data = resp.json()
        except ValueError:
            raise _Transient(f"malformed response body: {text[:200]!r}") from None
        completion = self.read_response(data, request)
        if completion is None:
            raise _Transient(f"malformed response body: {text[:200]!r}")
        # The answer is kept in the output (an invalid one with its raw text): a server that echoes
        # the key must not write it there.
        return replace(completion, text=self._scrub(completion.text), retries=retries)

    def _refuse(self, field: str, body: dict) -> bool:
        """Note that the server refused ``field`` for this model; whether the body now sent for a
        row differs (then the row is sent again), else the refusal is the row's failure."""
        if field in chat_api.TOKEN_LIMIT_FIELDS and self.api.token_limit_field != "auto":
            return False  # the job chose the field: the server's message says what to choose instead
        learned = field not in self._refused
        self._refused.add(field)
        if field in chat_api.TOKEN_LIMIT_FIELDS and self.token_field == field:
            return False  # both refused: nothing left to try
        if learned:
            self._say_refused(field, body)
        return True

    def _say_refused(self, field: str, body: dict) -> None:
        model = self.model
        if field in chat_api.TOKEN_LIMIT_FIELDS:
            message = (
                f"the server refuses '{field}' for model {model}: the answer budget goes in "
                f"'{self.token_field}' for the rest of the run (api.token_limit_field sets it)"
            )
        elif field == "logprobs":
            message = (
                f"the server gives no logprobs for model {model}: they are no longer asked for, "
                f"and confidence is null for the rest of the run"
            )
        else:
            message = (
                f"the server refuses {field}={body.get(field)!r} for model {model} (it decodes only its "
                f"own way): {field} is left out for the rest of the run, so sampling.{field} does not "
                f"apply to its answers"
            )
        log.warning(message, extra=logs.fields("api_field_refused", field=field, model=model))

    def _count_client_error(self, reason: str | None) -> None:
        """Count a row's outcome towards the breaker: ``reason`` is its client error (a 4xx, or an
        answer cut while reasoning), None for anything else. The same error on
        ``api.max_consecutive_client_errors`` rows in a row stops the run: every row would fail."""
        limit = self.api.max_consecutive_client_errors
        key = _normalised(reason) if reason else None
        last, count = self._streak
        self._streak = (key, count + 1 if key is not None and key == last else 1)
        if not limit or key is None or self._streak[1] < limit or self._stopped is not None:
            return
        self._streak = (None, 0)  # a caller that goes on with this backend starts a fresh count
        self._stopped = BackendError(
            f"{_display_url(self.api.base_url)}: {limit} rows in a row failed with the same error, "
            f"so the run stops rather than fail every row: {reason}",
            hint=(
                "fix what the message names in the job file and run it again: finished chunks are "
                "kept, and this chunk's rows are asked again (api.max_consecutive_client_errors "
                "sets how many rows in a row stop a run; 0: never)"
            ),
        )
        raise self._stopped

    def _scrub(self, text: str) -> str:
        if not self._key:
            return text
        return re.sub(re.escape(self._key), "***", text, flags=re.IGNORECASE)


def _public_url(url: str) -> str:
    """The URL without user info or fragment: what run.json and the fingerprint record."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc, path=parts.path.rstrip("/"), fragment=""))


def _display_url(url: str) -> str:
    """The URL as messages print it: scheme, host, port and path; a query may hold more than
    its name suggests."""
    return urlunsplit(urlsplit(_public_url(url))._replace(query=""))


def _failed(reason: str, retries: int) -> Completion:
    return Completion.failed(reason, retries)


def _normalised(reason: str) -> str:
    """An error message with what differs from row to row (counts, request ids) taken out, so that
    the same error on two rows reads the same; the HTTP status stays."""
    status = re.match(r"HTTP \d+", reason)
    head = status.group(0) if status else ""
    rest = re.sub(r"\S*\d\S*", "#", reason[len(head) :].lower())
    return " ".join([head, *rest.split()])


def _retry_after(resp) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; fall back to backoff
