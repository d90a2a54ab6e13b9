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

Scoring a label set (``decoding: score``, ``api.label_scoring``) needs vLLM's own server: the chat
template's token ids come from its ``/tokenize``, and each decode step is one ``/v1/completions``
request on a token-id prompt with ``max_tokens: 1``, ``allowed_token_ids`` (the labels' next
tokens) and their ``logprobs``, under the same concurrency, rate limits and retries as chat
requests (see ``pipeline/scoring.py``).

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator

from pipeline import logs, scoring
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
T = TypeVar("T")
_FATAL_HINT = "check api_key_env, base_url and model in the job file"
_SCORING_HINT = (
    "check api_key_env, base_url and model in the job file; api.label_scoring needs vLLM's "
    "OpenAI-compatible server (vllm serve), which has /tokenize and takes token-id prompts on "
    "/v1/completions (otherwise leave label_scoring out, and decoding: auto is constrained)"
)
# vLLM's 400 for more logprobs than --max-logprobs: "Requested sample logprobs of 30, which is
# greater than max allowed: 20"
_MAX_LOGPROBS = re.compile(r"greater than max allowed:\s*(\d+)")
_TOKEN_ID = "token_id:"  # how vLLM names a token in logprobs with return_tokens_as_token_ids

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


class _BadRequest(_RowFailure):
    """HTTP 400: the server refused the request as sent; ``text`` is its whole answer, for the
    caller to read what was refused."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(reason)
        self.text = text


class _GaveUp(Exception):
    """A request that failed for good: after its retries, or at once where retrying can't help.
    ``reason`` is scrubbed of the key."""

    def __init__(self, reason: str, retries: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retries = retries


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


@dataclass
class _Session:
    """What the requests of one call share: the HTTP client, how many may be in flight, and the
    client-side rate limits."""

    client: Any
    gate: asyncio.Semaphore
    rpm: RateLimiter | None
    tpm: RateLimiter | None

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        """A place among the requests in flight, once the rate limits allow one more request of
        ``tokens`` (estimated prompt and answer); held while it and its retries run."""
        async with self.gate:
            if self.rpm:
                await self.rpm.acquire()
            if self.tpm and tokens:
                await self.tpm.acquire(tokens)
            yield


@dataclass(eq=False)
class _Scored:
    """One row's scoring over HTTP: its prompt's token ids, the prompt tokens its first step found
    in the server's prefix cache, the retries its requests took, and why it failed, if it did."""

    prompt: list[int]
    cached: int | None = None
    retries: int = 0
    error: str | None = None
    asked: bool = False


async def _all(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Every call's result, in order. When one raises, the others stop sending now, not after
    their retries, and the exception goes on."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


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
    label_scoring: bool = False
    """The server is vLLM's OpenAI-compatible server (``vllm serve``) started with
    ``--logprobs-mode processed_logprobs``: it takes token-id prompts on ``/v1/completions`` with
    ``allowed_token_ids``, ``logprobs`` and ``return_tokens_as_token_ids``, and has ``/tokenize``
    (which renders the model's chat template, with ``extra_body.chat_template_kwargs`` where given).
    Labels can then be scored (``decoding: score``, and ``auto`` picks it): one request per row
    and decode step, asking for as many logprobs as the widest step allows tokens; a label set
    wider than the server's ``--max-logprobs`` (default 20) stops the run, naming the value to
    start it with. False: ``decoding: auto`` is ``constrained``. OpenAI's own API, OpenRouter
    and Groq have no ``allowed_token_ids`` and no ``/tokenize`` of the chat template: they stay on
    ``constrained``."""

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
        self._opening: tuple[Messages, list[int]] | None = None
        """Scoring: a conversation to render answers after, and its ids up to the answer."""
        self._end_ids: list[int] | None = None
        """Scoring: the token that ends the answer's turn (empty: not known)."""

    @classmethod
    def identity(cls, settings: ApiSettings, request: Request | None = None) -> dict[str, Any]:
        # Everything that can change an answer: which server (and so which weights), how the answer
        # is constrained and read, the provider fields, and where row text is cut. How fast and how
        # often it is asked (and with which key) can't. Nor can the budget field's name or the
        # reasoning room: both only decide where an answer is cut, and an answer cut while the
        # model reasons is a failure, which is neither cached nor kept by a rerun.
        identity = {
            "base_url": _public_url(settings.base_url),
            "constraint": settings.constraint,
            "logprobs": settings.logprobs,
            "extra_body": settings.extra_body,
            "max_model_len": settings.max_model_len,
        }
        if settings.label_scoring:  # only when on: jobs from before the setting keep their fingerprint
            identity["label_scoring"] = True
        return identity

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
        return self._run(lambda session: self._complete_all(session, conversations, request))

    def _run(self, work: Callable[[_Session], Awaitable[T]]) -> T:
        """``work`` on a fresh session (client, concurrency gate, rate limits), to its end."""

        async def main() -> T:
            async with self._session() as session:
                return await work(session)

        return asyncio.run(main())

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[_Session]:
        import httpx

        api = self.api
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(
            max_connections=api.max_concurrency, max_keepalive_connections=api.max_concurrency
        )
        async with httpx.AsyncClient(
            base_url=api.base_url.rstrip("/"), headers=headers, timeout=api.timeout_s, limits=limits
        ) as client:
            yield _Session(
                client,
                asyncio.Semaphore(api.max_concurrency),
                RateLimiter(api.requests_per_minute) if api.requests_per_minute else None,
                RateLimiter(api.tokens_per_minute) if api.tokens_per_minute else None,
            )

    async def _complete_all(
        self, session: _Session, conversations: list[Messages], request: Request
    ) -> list[Completion]:
        budget = request.max_tokens + self.reasoning_budget

        async def one(messages: Messages) -> Completion:
            async with session.slot(self.prompt_tokens(messages) + budget):
                done = await self._answer_row(session.client, messages, request)
            self.answered(1)
            return done

        return await _all([one(m) for m in conversations])

    async def _answer_row(self, client, messages: Messages, request: Request) -> Completion:
        try:
            completion = await self._with_retries(
                lambda retries: self._request(client, messages, request, retries)
            )
        except _GaveUp as failed:
            return _failed(failed.reason, failed.retries)
        self._count_client_error(completion.error)
        return completion

    async def _with_retries(self, call: Callable[[int], Awaitable[T]]) -> T:
        """``call(retries)`` until it answers: transient failures are tried again after a backoff
        with jitter, or when the server's ``Retry-After`` says. Raises ``_GaveUp`` when the tries
        run out, or at once on a failure that trying again can't fix; either counts towards the
        breaker (``_count_client_error``), as an answer's own outcome is left to the caller."""
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
                    return await call(attempt_no - 1)
        except _RowFailure as exc:
            reason = self._scrub(str(exc))
            self._count_client_error(reason)
            raise _GaveUp(reason, attempt_no - 1) from None
        except _Transient as exc:
            self._count_client_error(None)
            reason = f"gave up after {attempt_no} attempts: {self._scrub(str(exc))}"
            raise _GaveUp(reason, attempt_no - 1) from None
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
        try:
            data, text = await self._post(client, "/chat/completions", body)
        except _BadRequest as refused:
            field = chat_api.refused_field(refused.text)
            if field in _ADAPTABLE and field in body:
                raise _Refused(field, str(refused)) from None
            raise
        completion = self.read_response(data, request)
        if completion is None:
            raise _Transient(f"malformed response body: {text[:200]!r}")
        # The answer is kept in the output (an invalid one with its raw text): a server that echoes
        # the key must not write it there.
        return replace(completion, text=self._scrub(completion.text), retries=retries)

    async def _post(self, client, url: str, body: dict, hint: str = _FATAL_HINT) -> tuple[Any, str]:
        """POST ``body`` to ``url`` (relative to ``base_url``, or absolute); the answer's JSON and
        its text (scrubbed of the key). A failure worth trying again raises ``_Transient``; a 400
        ``_BadRequest``, for the caller to read; another 4xx ``_RowFailure``; 401, 403 and 404
        ``BackendError`` (every row would fail), with ``hint``."""
        import httpx

        if self._stopped is not None:
            raise self._stopped
        try:
            resp = await client.post(url, json=body)
        except httpx.TimeoutException:
            raise _Transient(f"no answer within timeout_s={self.api.timeout_s}") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed: {type(exc).__name__}: {self._scrub(str(exc))}") from None
        # Scrubbed before it is cut: a key cut in half would no longer match.
        text = self._scrub(resp.text)
        if resp.status_code in FATAL_STATUS:
            raise BackendError(
                f"{_display_url(str(resp.request.url))}: HTTP {resp.status_code} "
                f"{FATAL_STATUS[resp.status_code]}: {text[:300]}",
                hint=hint,
            )
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Transient(f"HTTP {resp.status_code}: {text[:200]}", _retry_after(resp))
        if resp.status_code == 400:
            raise _BadRequest(f"HTTP 400: {text[:300]}", text)
        if resp.status_code >= 400:
            raise _RowFailure(f"HTTP {resp.status_code}: {text[:300]}")
        try:
            return resp.json(), text
        except ValueError:
            raise _Transient(f"malformed response body: {text[:200]!r}") from None

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

    # Scoring a label set (``decoding: score``) through vLLM's server: the steps of
    # ``VllmBackend.score`` over HTTP (see ``pipeline/scoring.py``).

    @classmethod
    def cannot_score(cls, settings: ApiSettings) -> str | None:
        if settings.label_scoring:
            return None
        return (
            "api.label_scoring is off (scoring needs vLLM's server: token-id prompts and allowed_token_ids)"
        )

    def score(
        self,
        conversations: list[Messages],
        request: Request,
        choices: Sequence[tuple[str, ...]] | None = None,
        neutral: Sequence[Messages] = (),
    ) -> list[Completion]:
        if not conversations:
            return []
        self._start_scoring()
        tries = self.score_tries(conversations, request, choices)
        return self._run(
            lambda session: self._score_all(session, conversations, tries, request.alternatives, neutral)
        )

    async def _score_all(
        self,
        session: _Session,
        conversations: list[Messages],
        tries: list[scoring.LabelTrie],
        top: int,
        neutral: Sequence[Messages] = (),
    ) -> list[Completion]:
        # the rows' prompts, then the content-free ones (calibration): row numbers past the rows
        everyone = await _all([self._prompt(session, c) for c in [*conversations, *neutral]])
        rows, calibration = everyone[: len(conversations)], everyone[len(conversations) :]
        failed = next((row.error for row in calibration if row.error is not None), None)
        if failed is not None:
            raise BackendError(f"the content-free prompts for calibration could not be tokenized: {failed}")
        owners = [*tries, *([tries[0]] * len(neutral))]
        live = [i for i, row in enumerate(rows) if row.error is None]
        self.answered(len(rows) - len(live))
        loop = asyncio.get_running_loop()

        def ask_rows(requests: list[tuple[int, scoring.Node]]) -> list[dict[int, float]]:
            steps = [self._step(session, everyone[r], owners[r], node) for r, node in requests]
            return asyncio.run_coroutine_threadsafe(_all(steps), loop).result()

        def ask(requests: list[tuple[int, scoring.Node]]) -> list[dict[int, float]]:
            return ask_rows([(live[n], node) for n, node in requests])

        key = tuple(tuple(row.prompt) for row in calibration)

        def search() -> list[scoring.Search]:
            if neutral:  # the content-free prompts' answers at every node, once per label set
                scoring.read_priors(tries, range(len(rows), len(everyone)), key, ask_rows)
                failed = next((row.error for row in calibration if row.error is not None), None)
                if failed is not None:  # a prior read with gaps would skew every row: not kept
                    for trie in tries:
                        trie.priors.pop(key, None)
                    raise BackendError(f"the content-free prompts for calibration got no answer: {failed}")
            found = [
                scoring.Search(tries[i], top, tries[i].priors.get(key) if neutral else None) for i in live
            ]
            scoring.search_all(found, ask)
            return found

        # The search asks step by step and waits for each; it runs beside this event loop, which
        # sends every step's requests on the one session (its concurrency and rate limits hold
        # across steps as across rows).
        searches = await asyncio.to_thread(search)
        finished = dict(zip(live, searches, strict=True))
        return [
            replace(scoring.answer(finished[i], len(row.prompt), row.cached), retries=row.retries)
            if row.error is None
            else _failed(row.error, row.retries)
            for i, row in enumerate(rows)
        ]

    def label_paths(self, labels: Sequence[str], messages: Messages) -> list[list[int]]:
        """Each label's tokens as the chat template writes it as the assistant's answer, from the
        server's ``/tokenize``: the ids between the prompt (with the template's opening of the
        answer) and the end of the turn; the label's tokens on their own where the template
        writes the answer in another way (as ``VllmBackend.label_paths``)."""
        self._start_scoring()
        try:
            return self._run(lambda session: self._label_paths(session, labels, messages))
        except _GaveUp as failed:
            raise self._untokenized(failed) from None

    def end_tokens(self) -> list[int]:
        """The token that closes the assistant's turn right after its answer (``<|im_end|>`` in
        ChatML), as the server renders the chat template; none where the template can't say."""
        if self._end_ids is None:
            self._start_scoring()
            try:
                self._run(lambda session: self._probe(session, [{"role": "user", "content": "x"}]))
            except _GaveUp as failed:
                raise self._untokenized(failed) from None
        return list(self._end_ids or ())

    def _start_scoring(self) -> None:
        if not self._started:
            self.start()
        self._stopped = None

    def _untokenized(self, failed: _GaveUp) -> BackendError:
        return BackendError(
            f"{_display_url(self._server_url('/tokenize'))}: the labels could not be tokenised with "
            f"the model's chat template: {failed.reason}",
            hint=_SCORING_HINT,
        )

    async def _label_paths(
        self, session: _Session, labels: Sequence[str], messages: Messages
    ) -> list[list[int]]:
        probe, opening = await self._probe(session, messages)
        ends = set(self._end_ids or ())

        async def path_of(label: str) -> list[int]:
            ids = await self._chat_ids(session, [*probe, {"role": "assistant", "content": label}], False)
            path: list[int] = []
            if ids[: len(opening)] == opening:
                for token in ids[len(opening) :]:
                    if token in ends:
                        break
                    path.append(token)
            if not path or (await self._detokenize(session, path)).strip() != label:
                path = await self._tokenize(session, {"prompt": label, "add_special_tokens": False})
            return path

        return await _all([path_of(label) for label in labels])

    async def _probe(self, session: _Session, messages: Messages) -> tuple[Messages, list[int]]:
        """A conversation to render answers after, with its ids up to the opening of the answer;
        the first time, also the end of the answer's turn (``_end_ids``). Kept for the run."""
        if self._opening is None:
            probe: Messages = [{"role": "user", "content": "x"}]
            try:
                opening = await self._chat_ids(session, probe, True)
            except _GaveUp:  # a template that wants the job's own roles (a system message first)
                probe = [dict(m) for m in messages]
                opening = await self._chat_ids(session, probe, True)
            self._opening = probe, opening
        if self._end_ids is None:
            self._end_ids = await self._turn_end(session, self._opening[0])
        return self._opening

    async def _turn_end(self, session: _Session, probe: Messages) -> list[int]:
        # The answer's turn rendered open (the answer continued) and closed: the first token the
        # closed one has beyond the open one ends the answer.
        answered = [*probe, {"role": "assistant", "content": "x"}]
        try:
            open_ids = await self._chat_ids(session, answered, False, continued=True)
        except _GaveUp:  # a template that rewrites the answer: the end is not known
            return []
        closed = await self._chat_ids(session, answered, False)
        if len(closed) > len(open_ids) and closed[: len(open_ids)] == open_ids:
            return [closed[len(open_ids)]]
        return []

    async def _prompt(self, session: _Session, messages: Messages) -> _Scored:
        try:
            return _Scored(await self._chat_ids(session, messages, True))
        except _GaveUp as failed:
            return _Scored([], retries=failed.retries, error=failed.reason)

    async def _step(
        self, session: _Session, row: _Scored, trie: scoring.LabelTrie, node: scoring.Node
    ) -> dict[int, float]:
        """One decode step of a row's search: the log-probabilities of the tokens allowed at
        ``node``. A failed row is fed even odds without asking, so that the search goes on without
        it; its answer is the failure."""
        allowed = trie.allowed(node)
        found = None
        if row.error is None:
            try:
                found, cached, retries = await self._next_token(
                    session, row.prompt + list(node.prefix), trie, allowed
                )
            except _GaveUp as failed:
                row.error, row.retries = failed.reason, row.retries + failed.retries
            else:
                row.retries += retries
                if not row.asked:
                    row.cached = cached
        if not row.asked:
            row.asked = True
            self.answered(1)
        return found if found is not None else dict.fromkeys(allowed, 0.0)

    async def _next_token(
        self, session: _Session, prompt: list[int], trie: scoring.LabelTrie, allowed: list[int]
    ) -> tuple[dict[int, float], int | None, int]:
        """The log-probabilities of the ``allowed`` tokens after ``prompt`` (vLLM renormalises them
        over those tokens in processed_logprobs mode), the prompt tokens served from the server's
        prefix cache where it says, and the retries it took."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": len(allowed),
            "allowed_token_ids": allowed,
            "return_tokens_as_token_ids": True,
        }

        async def call(retries: int) -> tuple[dict[int, float], int | None, int]:
            try:
                data, text = await self._post(session.client, "/completions", body, _SCORING_HINT)
            except _BadRequest as refused:
                most = _MAX_LOGPROBS.search(refused.text)
                if most is None:
                    raise
                raise BackendError(
                    f"{_display_url(self.api.base_url)}: the label set needs up to {trie.width} "
                    f"log-probabilities per step, and the server gives at most {most.group(1)}",
                    hint=f"start the server with --max-logprobs {trie.width} (or more); finished "
                    "chunks are kept, and rerunning the same command resumes",
                ) from None
            return (*self._read_step(data, text, allowed), retries)

        async with session.slot(len(prompt) + 1):
            found = await self._with_retries(call)
        self._count_client_error(None)
        return found

    def _read_step(self, data: Any, text: str, allowed: list[int]) -> tuple[dict[int, float], int | None]:
        try:
            top = data["choices"][0]["logprobs"]["top_logprobs"][0]
            usage = data.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            pairs = list(top.items())
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Transient(f"malformed response body: {text[:200]!r}") from None
        found: dict[int, float] = {}
        for key, value in pairs:
            token = key.removeprefix(_TOKEN_ID)
            if token == key or not token.isdigit() or not isinstance(value, (int, float)):
                raise BackendError(
                    f"{_display_url(self.api.base_url)}: the server's logprobs name tokens as "
                    f"{self._scrub(repr(key))[:60]}, not as token_id:<id>: it does not take "
                    "return_tokens_as_token_ids",
                    hint=_SCORING_HINT,
                )
            found[int(token)] = float(value)
        if not found:
            raise _Transient(f"no log-probabilities in the answer: {text[:200]!r}")
        stray = sorted(set(found) - set(allowed))
        if stray:
            raise BackendError(
                f"{_display_url(self.api.base_url)}: the server gave log-probabilities of tokens the "
                f"request did not allow ({', '.join(map(str, stray[:5]))}): they are the model's raw "
                "ones, not renormalised over the labels' tokens",
                hint="start vLLM's server with --logprobs-mode processed_logprobs (label scoring reads "
                "the log-probabilities after allowed_token_ids has masked the other tokens)",
            )
        return found, cached if isinstance(cached, int) and not isinstance(cached, bool) else None

    async def _chat_ids(
        self, session: _Session, messages: Messages, generation: bool, continued: bool = False
    ) -> list[int]:
        """A conversation's token ids as the server renders the model's chat template: with its
        opening of the answer (``generation``), or with the last message left open (``continued``)."""
        body: dict[str, Any] = {"messages": messages, "add_generation_prompt": generation}
        if continued:
            body["continue_final_message"] = True
        extra = self.api.extra_body  # as the server would render the job's chat requests
        body |= {k: extra[k] for k in ("chat_template", "chat_template_kwargs") if k in extra}
        return await self._tokenize(session, body)

    async def _tokenize(self, session: _Session, body: dict) -> list[int]:
        async def call(retries: int) -> list[int]:
            data, text = await self._post(
                session.client, self._server_url("/tokenize"), {"model": self.model, **body}, _SCORING_HINT
            )
            tokens = data.get("tokens") if isinstance(data, dict) else None
            if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
                raise _Transient(f"malformed response body: {text[:200]!r}")
            return tokens

        async with session.slot(0):
            return await self._with_retries(call)

    async def _detokenize(self, session: _Session, tokens: list[int]) -> str:
        async def call(retries: int) -> str:
            data, text = await self._post(
                session.client, self._server_url("/detokenize"), {"model": self.model, "tokens": tokens},
                _SCORING_HINT,
            )  # fmt: skip
            decoded = data.get("prompt") if isinstance(data, dict) else None
            if not isinstance(decoded, str):
                raise _Transient(f"malformed response body: {text[:200]!r}")
            return decoded

        async with session.slot(0):
            return await self._with_retries(call)

    def _server_url(self, path: str) -> str:
        """``path`` on the server's root (``base_url`` without ``/v1``), where vLLM serves
        ``/tokenize`` and ``/detokenize``."""
        parts = urlsplit(self.api.base_url)
        root = parts.path.rstrip("/").removesuffix("/v1")
        return urlunsplit(parts._replace(path=root + path, fragment=""))


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
