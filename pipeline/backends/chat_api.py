"""The OpenAI chat completions wire format: a request body for one row, and an answer read back.

Shared by the ``openai`` backend (over HTTP), and by batch files (``labelmill export`` writes these
bodies; ``labelmill import`` reads result bodies) for every backend that can be served this way.

Constraint modes: ``choice`` sends vLLM's structured outputs (``structured_outputs: {choice:
[...]}`` or ``{json: schema}``); ``json_schema`` sends OpenAI's ``response_format`` (a bare choice
becomes ``{"label": <one of them>}``, unwrapped again when read); ``none`` relies on the prompt.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.contracts import Completion, Constraint, Messages, Request

URL = "/v1/chat/completions"


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
