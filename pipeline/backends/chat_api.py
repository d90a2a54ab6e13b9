"""The OpenAI chat completions wire format: a request body for one row, and an answer read back.

Shared by the ``openai`` backend (over HTTP), and by batch files (``labelmill export`` writes these
bodies; ``labelmill import`` reads result bodies) for every backend that can be served this way.

``extra_body`` fields go in last, and may not be fields this module sets (``OWNED_FIELDS``).

Constraint modes: ``choice`` sends vLLM's structured outputs (``structured_outputs: {choice:
[...]}`` or ``{json: schema}``); ``json_schema`` sends OpenAI's ``response_format`` (a bare choice
becomes ``{"label": <one of them>}``, unwrapped again when read); ``none`` relies on the prompt.

Reasoning models (OpenAI's o-series and GPT-5, gpt-oss, DeepSeek-R1, ...) think in hidden tokens
that count against the answer budget and are billed as output: a body can leave them room
(``reasoning_budget``), and an answer reads them back into ``output_tokens``. OpenAI's reasoning
models refuse ``max_tokens`` and take ``max_completion_tokens`` (``token_limit_field``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from pipeline.contracts import Completion, Constraint, Messages, Request

URL = "/v1/chat/completions"

TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")
"""The two names of the answer budget: the older one, and the one OpenAI's reasoning models take
(it covers their hidden reasoning as well as the answer)."""

OWNED_FIELDS: dict[str, str | None] = {
    "model": "model",
    "messages": "prompt",
    "max_tokens": "sampling.max_tokens",
    "max_completion_tokens": "sampling.max_tokens",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "seed": "sampling.seed",
    "logprobs": "api.logprobs",
    "response_format": "api.constraint",
    "structured_outputs": "api.constraint",
    # None: no job key; labelmill reads one whole plain-text answer per request
    "stream": None,
    "stream_options": None,
    "n": None,
    "best_of": None,
    "use_beam_search": None,
    "echo": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
}
"""Request fields labelmill sets (or needs left alone), each with the job key that decides it.
An ``extra_body`` may not touch them: merged in, they would silently replace the prompt, the
constraint, the sampling or the answer budget that the job's fingerprint vouches for."""

CREDENTIAL_LOOKALIKES = frozenset({"prompt_cache_key"})
"""Request fields named like credentials that hold none (OpenAI's prompt cache routing hint)."""

# OpenAI's reasoning families, also behind a provider prefix ("openai/o4-mini") or with a date or
# size suffix ("gpt-5-mini", "o3-2025-04-16", "gpt-5.1").
_OPENAI_REASONING = re.compile(r"(?:^|/)(?:o\d+|gpt-5)(?:$|[-.:_@])", re.IGNORECASE)
# Open-weight models that think before they answer, whatever server runs them.
_OTHER_REASONING = re.compile(
    r"(?:^|[/_-])(?:gpt-oss|deepseek-r1|deepseek-reasoner|qwq)|thinking", re.IGNORECASE
)


def openai_reasoning_model(model: str) -> bool:
    """One of OpenAI's reasoning families (o1, o3, o4-mini, gpt-5, ...): they take
    ``max_completion_tokens`` and refuse ``max_tokens``."""
    return bool(_OPENAI_REASONING.search(model))


def reasoning_model(model: str) -> bool:
    """A model known to spend hidden reasoning tokens before its answer."""
    return openai_reasoning_model(model) or bool(_OTHER_REASONING.search(model))


def token_limit_field(model: str, setting: str = "auto") -> str:
    """The request field that carries the answer budget: ``setting`` unless it is ``auto``, which
    picks ``max_completion_tokens`` for OpenAI's reasoning families and ``max_tokens`` (which
    every OpenAI-compatible server takes) for the rest."""
    if setting != "auto":
        return setting
    return "max_completion_tokens" if openai_reasoning_model(model) else "max_tokens"


def owned(field: str) -> bool:
    """Whether labelmill decides this request field itself (in any letter case)."""
    name = field.lower()
    return name in OWNED_FIELDS or name.startswith("guided_")  # guided_*: vLLM's older constraints


def owner_of(field: str) -> str | None:
    """The job key that decides an owned request field; None when no job key does."""
    name = field.lower()
    return "api.constraint" if name.startswith("guided_") else OWNED_FIELDS.get(name)


def request_body(
    model: str,
    messages: Messages,
    request: Request,
    constraint_mode: str = "choice",
    logprobs: bool = True,
    extra_body: dict[str, Any] | None = None,
    *,
    token_field: str = "max_tokens",
    reasoning_budget: int = 0,
    leave_out: Collection[str] = (),
) -> dict:
    """The chat completions request for one row.

    ``token_field`` names the answer budget (``TOKEN_LIMIT_FIELDS``); ``reasoning_budget`` tokens
    are added to it for a model's hidden reasoning; ``leave_out`` names sampling fields a server
    refused for this model (``temperature``, ``top_p``, ``logprobs``), which are then not sent.
    """
    if token_field not in TOKEN_LIMIT_FIELDS:
        raise ValueError(f"token_field must be one of {TOKEN_LIMIT_FIELDS}, not {token_field!r}")
    s, constraint = request.sampling, request.constraint
    budget = request.max_tokens + reasoning_budget
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": s.temperature,
        "top_p": s.top_p,
        token_field: budget,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if logprobs and constraint_mode != "json_schema":
        body["logprobs"] = True
    if constraint_mode == "choice":  # vLLM's structured outputs
        if constraint.choice is not None:
            body["structured_outputs"] = {"choice": list(constraint.choice)}
        else:
            body["structured_outputs"] = {"json": constraint.json_schema, "disable_any_whitespace": True}
    elif constraint_mode == "json_schema":  # OpenAI's response_format
        schema = constraint.json_schema
        if constraint.choice is not None:  # a bare choice becomes {"label": <one of them>}
            body[token_field] = budget + 16
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
    for name in leave_out:
        if name not in ("temperature", "top_p", "logprobs"):
            raise ValueError(f"only temperature, top_p and logprobs can be left out, not {name!r}")
        body.pop(name, None)
    # A validated job never gets here; a caller that skipped validation does.
    clash = sorted(k for k in extra_body or {} if owned(k) or k in body)
    if clash:
        raise ValueError(f"extra_body may not set {clash}: labelmill sets them")
    body.update(extra_body or {})
    return body


def wraps_label(constraint_mode: str, constraint: Constraint) -> bool:
    """The answer comes as ``{"label": ...}``: a choice asked through ``response_format``."""
    return constraint_mode == "json_schema" and constraint.choice is not None


def parse_completion(data: dict, wrapped_label: bool = False) -> Completion | None:
    """A chat completion response body -> Completion; None if it is not one.

    ``wrapped_label``: the answer is ``{"label": ...}``; the label is unwrapped, and logprobs
    (which cover the JSON) are not used.

    ``output_tokens`` includes hidden reasoning tokens (see ``output_tokens``). An answer cut at the
    token limit after the model reasoned is a failure (``error`` set, its tokens kept, as they are
    billed): the budget that fits every valid answer went to reasoning, and a larger one may get
    the answer; as a failure it is not cached, and a rerun asks again.
    """
    try:
        choice = data["choices"][0]
        message = choice["message"]
        text = message["content"] or ""
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(usage, dict) or not isinstance(details, dict):
        return None
    finish_reason = choice.get("finish_reason")
    output = output_tokens(usage)
    reasoning = reasoning_tokens(usage)
    error = None
    if finish_reason == "length" and (reasoning or _reasoning_text(message)):
        spent = f"{reasoning} of its {output} output tokens" if reasoning else "part of its output tokens"
        error = (
            f"the token limit was reached before the answer was complete, after {spent} went to "
            f"hidden reasoning: give reasoning more room (api.reasoning_budget) or ask for less of "
            f"it (e.g. extra_body: {{reasoning_effort: low}})"
        )
    return Completion(
        text=_label_from_json(text) if wrapped_label else text,
        logprob=None if wrapped_label else _sum_logprobs(choice),
        prompt_tokens=usage.get("prompt_tokens", 0),
        output_tokens=output,
        finish_reason=finish_reason,
        cached_tokens=details.get("cached_tokens"),
        error=error,
    )


def reasoning_tokens(usage: dict) -> int:
    """Hidden reasoning tokens an answer's ``usage`` reports (0 when it reports none):
    ``completion_tokens_details.reasoning_tokens`` (OpenAI, OpenRouter, DeepSeek, Groq),
    ``output_tokens_details.reasoning_tokens`` (Responses-style servers) or a top-level
    ``reasoning_tokens``."""
    for where in ("completion_tokens_details", "output_tokens_details"):
        details = usage.get(where)
        if isinstance(details, dict) and _count(details.get("reasoning_tokens")):
            return _count(details["reasoning_tokens"])
    return _count(usage.get("reasoning_tokens"))


def output_tokens(usage: dict) -> int:
    """Tokens the model generated, hidden reasoning included: what output is billed by.

    ``completion_tokens`` already includes reasoning on OpenAI and servers that follow it. Some
    gateways leave reasoning out of it and report it only in ``total_tokens`` or beside it (a
    Gemini thinking model: ``completion_tokens: 0``, ``reasoning_tokens: 60``, ``total_tokens`` =
    prompt + 60); then the larger count, which includes it, is taken.
    """
    completion = _count(usage.get("completion_tokens"))
    out = completion
    total, prompt = usage.get("total_tokens"), usage.get("prompt_tokens")
    if _is_count(total) and _is_count(prompt):
        out = max(out, total - prompt)
    reasoning = reasoning_tokens(usage)
    if reasoning > completion:  # reasoning can't outnumber a count that includes it
        out = max(out, completion + reasoning)
    return out


_UNSUPPORTED = (
    # OpenAI: "Unsupported parameter: 'max_tokens' is not supported with this model. Use ..."
    #         "Unsupported value: 'temperature' does not support 0 with this model. Only the default ..."
    re.compile(r"unsupported (?:parameter|value)s?\W+'?\"?([a-z_]+)", re.IGNORECASE),
    re.compile(r"['\"]([a-z_]+)['\"] (?:is|are) not supported", re.IGNORECASE),
)


def refused_field(answer: str) -> str | None:
    """The request field an HTTP 400 answer says the model doesn't take ("Unsupported parameter:
    'max_tokens' ...", "Unsupported value: 'temperature' ..."), or None when it says something else.
    Read from OpenAI's ``error.param`` when its ``code`` says so, else from the message."""
    try:
        data = json.loads(answer)
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        param, code = error.get("param"), str(error.get("code") or "")
        if isinstance(param, str) and param and code.startswith("unsupported"):
            return param
        message = error.get("message")
        answer = message if isinstance(message, str) else answer
    for pattern in _UNSUPPORTED:
        found = pattern.search(answer)
        if found:
            return found.group(1)
    return None


def _reasoning_text(message: dict) -> bool:
    # vLLM's reasoning parsers and OpenRouter return the thinking beside the answer.
    texts = (message.get(k) for k in ("reasoning_content", "reasoning"))
    return any(isinstance(t, str) and t.strip() for t in texts)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(value: Any) -> int:
    return value if _is_count(value) else 0


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
