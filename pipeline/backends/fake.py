"""A deterministic test double. It loads no model and knows nothing about language.

The label is picked by a hash of the user message (for a JSON schema: every enum value, list
length and presence of an optional value likewise; strings are the row's last words), the
confidence is another part of the hash mapped into (0, 1], and a "token" is four bytes of UTF-8.
It answers whole columns at once, so a benchmark with it measures the pipeline, not the fake.
Use it for tests of the machinery (chunking, resume, output format) and for demos without a GPU;
never for a claim about model quality or speed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field

from pipeline.backends.base import Backend, ByteTokens
from pipeline.contracts import (
    ALTERNATIVES_TYPE,
    ANSWER_SCHEMA,
    SCORE,
    Completion,
    Constraint,
    Messages,
    Options,
    Request,
    table_completions,
)

_SEED = 20240917


class FakeSettings(Options):
    """Settings of the ``fake`` test-double backend: the job's ``fake:`` section."""

    seconds_per_row: float = Field(default=0.0, ge=0)
    """Sleep this long per row, to make progress and crash tests observable."""
    max_model_len: int | None = Field(default=None, gt=0)
    """A context length to pretend, so truncation can be tried without a model (4 bytes a token)."""


class FakeBackend(ByteTokens, Backend):
    name = "fake"
    section = "fake"
    Settings = FakeSettings

    @classmethod
    def identity(cls, settings: FakeSettings, request: Request | None = None) -> dict | None:
        # Row text is cut to fit max_model_len, which can change the answer; speed can't.
        return {"max_model_len": settings.max_model_len} if settings.max_model_len else None

    @property
    def max_model_len(self) -> int | None:
        return self.settings.max_model_len

    @classmethod
    def cannot_score(cls, settings: FakeSettings) -> str | None:
        return None

    def answer(self, prompt, texts: pl.Series, request: Request, choices=None) -> pa.Table:
        if choices is not None:  # each row its own set: the base's way, one row at a time
            return super().answer(prompt, texts, request, choices)
        users = prompt.user_messages(texts)
        other = self._tokens(prompt.system) + 4 + 4  # the system message, and the user message's own 4
        if request.decoding == SCORE:
            return self._scores(users, np.full(len(users), other), request)
        return self._answers(users, np.full(len(users), other), request.constraint)

    def score(
        self, conversations: list[Messages], request: Request, choices=None, neutral=()
    ) -> list[Completion]:
        # ``neutral`` (calibration) is ignored: hashes have no bias to divide out
        if choices is not None:  # each row its own label set: one at a time
            return [
                self.score([c], replace(request, constraint=Constraint(choice=tuple(x))))[0]
                for c, x in zip(conversations, choices, strict=True)
            ]
        return table_completions(self._scores(*self._split(conversations), request))

    def _scores(self, users: pl.Series, other_tokens: np.ndarray, request: Request) -> pa.Table:
        """A probability for every label from hashes of the row and the label, softmax-normalised:
        as a model's scores would be, they sum to 1 over the set."""
        self._pace(len(users))
        labels = request.constraint.choice
        digest = users.hash(seed=_SEED).to_numpy()
        salt = pl.Series(labels, dtype=pl.String).hash(seed=_SEED + 1).to_numpy()
        mixed = (digest[:, None] ^ salt[None, :]) * np.uint64(0x9E3779B97F4A7C15)
        logits = ((mixed >> np.uint64(40)) % np.uint64(1000)).astype(np.float64) / 200
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        order = np.argsort(-logprobs, axis=1, kind="stable")[:, : max(1, request.alternatives)]
        picked = np.take_along_axis(logprobs, order, axis=1)
        n = len(users)
        alternatives = [
            [{"text": labels[j], "logprob": float(lp)} for j, lp in zip(o, p, strict=True)]
            for o, p in zip(order, picked, strict=True)
        ]
        return _table(
            pa.array([labels[o[0]] for o in order], pa.string()),
            picked[:, 0],
            other_tokens + -(-users.str.len_bytes().to_numpy().astype(np.int64) // 4),
            np.ones(n, dtype=np.int32),
            pa.array(alternatives, ALTERNATIVES_TYPE),
        )

    def complete(self, conversations: list[Messages], request: Request) -> list[Completion]:
        return table_completions(self._answers(*self._split(conversations), request.constraint))

    def _split(self, conversations: list[Messages]) -> tuple[pl.Series, np.ndarray]:
        """Each conversation's user message, and the tokens of the rest of it."""
        users = pl.Series([c[-1]["content"] for c in conversations], dtype=pl.String)
        other = [sum(self._tokens(m["content"]) + 4 for m in c[:-1]) + 4 for c in conversations]
        return users, np.array(other, dtype=np.int64)

    def _pace(self, rows: int) -> None:
        if self.settings.seconds_per_row:
            # paced like a model: answers come in over the call, in a few steps
            for step in np.array_split(np.arange(rows), min(rows, 20)):
                time.sleep(self.settings.seconds_per_row * len(step))
                self.answered(len(step))
        else:
            self.answered(rows)

    def _answers(self, users: pl.Series, other_tokens: np.ndarray, constraint: Constraint) -> pa.Table:
        """Whole columns at once: the fake's cost must not hide the pipeline's in a benchmark."""
        self._pace(len(users))
        digest = users.hash(seed=_SEED).to_numpy()
        confidence = ((digest >> np.uint64(32)) % np.uint64(1000) + np.uint64(1)).astype(np.float64) / 1000
        if constraint.choice is not None:
            pick = (digest & np.uint64(0xFFFFFFFF)) % np.uint64(len(constraint.choice))
            answers = pa.array(constraint.choice, pa.string()).take(pa.array(pick.astype(np.int64)))
        else:
            answers = pa.array(
                [
                    json.dumps(_fill(constraint.json_schema, hashlib.sha256(u.encode()).digest(), u))
                    for u in users.to_list()
                ],
                pa.string(),
            )
        answer_bytes = pl.Series(answers).str.len_bytes().to_numpy().astype(np.int64)
        user_bytes = users.str.len_bytes().to_numpy().astype(np.int64)
        return _table(
            answers,
            np.log(confidence),
            other_tokens + -(-user_bytes // 4),
            -(-answer_bytes // 4) + 1,
            pa.nulls(len(users), ALTERNATIVES_TYPE),
        )


def _table(text, logprob, prompt_tokens, output_tokens, alternatives) -> pa.Table:
    """An answers table (``ANSWER_SCHEMA``) of answers that all came: finished, uncached, no retry."""
    n = len(text)
    columns = {
        "text": text,
        "logprob": logprob,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "finish_reason": pa.array(["stop"] * n, pa.string()),
        "cached_tokens": pa.nulls(n, pa.int32()),
        "error": pa.nulls(n, pa.string()),
        "retries": np.zeros(n, dtype=np.int32),
        "alternatives": alternatives,
        "choices": pa.nulls(n, ANSWER_SCHEMA.field("choices").type),
        "levels": pa.nulls(n, ALTERNATIVES_TYPE),
    }
    return pa.Table.from_arrays(
        [pa.array(columns[f.name], f.type) for f in ANSWER_SCHEMA], schema=ANSWER_SCHEMA
    )


def _fill(schema: dict, digest: bytes, text: str):
    """A deterministic document that satisfies the JSON schemas labelmill's tasks build."""
    if "anyOf" in schema:  # optional value: present for about half of the rows
        return _fill(schema["anyOf"][0], digest, text) if digest[8] % 2 else None
    if "enum" in schema:
        return schema["enum"][digest[9] % len(schema["enum"])]
    kind = schema.get("type")
    if kind == "object":
        return {
            key: _fill(sub, hashlib.sha256(digest + key.encode()).digest(), text)
            for key, sub in schema["properties"].items()
        }
    if kind == "array":
        count = max(schema.get("minItems", 0), 1 + digest[10] % min(2, schema.get("maxItems", 2)))
        items = [_fill(schema["items"], bytes([b ^ i for b in digest]), text) for i in range(count)]
        return list(dict.fromkeys(items))
    if kind == "number":
        return float(digest[11] % 50)
    return " ".join(text.split()[-2:])[: schema.get("maxLength", 200)]  # string: the row's last words
