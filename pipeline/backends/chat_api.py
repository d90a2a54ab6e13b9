"""The OpenAI chat completions wire format: a request body for one row, and an answer read back.

Shared by the ``openai`` backend (over HTTP), and by batch files (``labelmill export`` writes these
bodies; ``labelmill import`` reads result bodies) for every backend that can be served this way.

``extra_body`` fields go in last, and may not be fields this module sets (``OWNED_FIELDS``).

Constraint modes: ``choice`` sends vLLM's structured outputs (``structured_outputs: {choice:
[...]}`` or ``{json: schema}``); ``json_schema`` sends OpenAI's ``response_format`` (a bare choice
becomes ``{"label": <one of them>}``, unwrapped again when read); ``none`` relies on the prompt.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.contracts import Completion, Constraint, Messages, Request

URL = "/v1/chat/completions"

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
constraint or the sampling that the job's fingerprint vouches for."""

KNOWN_FIELDS = frozenset(
    {
        # OpenAI
        "frequency_penalty", "presence_penalty", "logit_bias", "stop", "user", "top_logprobs",
        "reasoning_effort", "verbosity", "service_tier", "metadata", "store", "parallel_tool_calls",
        "prompt_cache_key", "safety_identifier",
        # vLLM's server
        "top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens", "stop_token_ids",
        "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
        "truncate_prompt_tokens", "chat_template_kwargs", "priority", "cache_salt", "bad_words",
        # OpenRouter
        "provider", "transforms", "models", "route", "reasoning", "usage",
    }
)  # fmt: skip
"""Chat completions request fields an ``extra_body`` may set without being listed in
``api.extra_fields``."""


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
) -> dict:
    """The chat completions request for one row."""
    s, constraint = request.sampling, request.constraint
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": request.max_tokens,
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
            body["max_tokens"] = request.max_tokens + 16
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
    clash = sorted(set(extra_body or {}) & set(body))
    if clash:  # a validated job never gets here; a caller that skipped validation does
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
