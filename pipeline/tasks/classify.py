"""Task ``classify``: exactly one label per row.

The backend is asked for one of the labels (the answer is constrained by the engine); the answer is
checked against the set again here, because a constraint cut short by ``max_tokens`` yields a
prefix of a label, not a label. Confidence is ``exp(logprob)`` of the constrained answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from pipeline.backends.base import Completion

# Row statuses, in the order the summary prints them. ``invalid``: the model answered, but not with
# a label (the answer is kept in ``error``; rerunning won't change it). ``error``: no answer came
# (the backend failed for this row after its retries); rerunning the job retries these rows.
OK, EMPTY, TRUNCATED, INVALID, ERROR = "ok", "empty_input", "truncated", "invalid", "error"
STATUSES = (OK, TRUNCATED, EMPTY, INVALID, ERROR)

OUTPUT_FIELDS = [
    pa.field("label", pa.string()),
    pa.field("confidence", pa.float64()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("cached_tokens", pa.int32()),
]


@dataclass
class RowResult:
    label: str | None = None
    confidence: float | None = None
    status: str = OK
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None


def answer_budget(labels: list[str]) -> int:
    """Most answer tokens any spelling of any label can take.

    The constraint lets the model spell a label with any tokenisation, down to one byte per
    token, so the bound is the longest label in UTF-8 bytes, plus the end-of-answer token.
    Greedy decoding stops at the end of the label, so a generous cap costs nothing.
    """
    return max(len(label.encode("utf-8")) for label in labels) + 1


def parse(completion: Completion, labels: set[str], truncated: bool, max_tokens: int) -> RowResult:
    """Turn a backend answer into the row's label, confidence and status."""
    if completion.error is not None:
        return RowResult(status=ERROR, error=completion.error)
    result = RowResult(
        prompt_tokens=completion.prompt_tokens,
        output_tokens=completion.output_tokens,
        cached_tokens=completion.cached_tokens,
    )
    answer = completion.text.strip()
    if answer not in labels:
        result.status = INVALID
        if completion.finish_reason == "length":
            result.error = f"answer cut at max_tokens={max_tokens} before a label was complete: {answer!r}"
        else:
            result.error = f"answer is not one of the labels: {answer[:200]!r}"
        return result
    result.label = answer
    if completion.logprob is not None and not math.isnan(completion.logprob):
        result.confidence = min(1.0, max(0.0, math.exp(completion.logprob)))
    if truncated:
        result.status = TRUNCATED
        result.error = "input text was cut to fit the token budget; label is for the cut text"
    return result
