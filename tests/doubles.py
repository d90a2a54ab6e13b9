"""Test doubles, handed to ``run_job(..., backend=...)`` or registered as plugins: never monkeypatched
into labelmill's own classes."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl
import pyarrow as pa

from pipeline.backends.base import Backend
from pipeline.backends.fake import FakeBackend
from pipeline.config import JobConfig
from pipeline.contracts import Completion, Messages, Request

Reply = Callable[[Messages, Completion, Request], Completion]


class RecordingFake(FakeBackend):
    """The fake backend answering row by row through ``complete``, as the HTTP and vLLM backends
    do, and recording what it is asked. ``reply(conversation, fake_answer, request)`` may replace
    any answer."""

    def __init__(self, job: JobConfig, reply: Reply | None = None, asked: list[str] | None = None) -> None:
        super().__init__(job.backend_settings, job.model)
        self.reply = reply
        self.asked = asked if asked is not None else []
        """The user message of every conversation asked, in order."""
        self.batches: list[int] = []
        """How many conversations each call held."""
        self.starts = 0

    def start(self) -> None:
        self.starts += 1

    def answer(self, prompt, texts: pl.Series, request: Request) -> pa.Table:
        return Backend.answer(self, prompt, texts, request)

    def complete(self, conversations: list[Messages], request: Request) -> list[Completion]:
        self.batches.append(len(conversations))
        self.asked.extend(c[-1]["content"] for c in conversations)
        out = super().complete(conversations, request)
        if self.reply is not None:
            out = [self.reply(c, o, request) for c, o in zip(conversations, out, strict=True)]
        return out

    def score(
        self, conversations: list[Messages], request: Request, choices=None, neutral=()
    ) -> list[Completion]:
        """Scored labels (``decoding: score``) are recorded and replaced the same way."""
        self.batches.append(len(conversations))
        self.asked.extend(c[-1]["content"] for c in conversations)
        out = super().score(conversations, request, choices, neutral)
        if self.reply is not None:
            out = [self.reply(c, o, request) for c, o in zip(conversations, out, strict=True)]
        return out

    def texts(self) -> list[str]:
        """The row text of each conversation asked (after the template's ``Product: `` prefix)."""
        return [m.split(": ", 1)[1] for m in self.asked]


def always(text: str, logprob: float | None = None) -> Reply:
    """A reply that answers ``text`` to everything."""
    return lambda conversation, answer, request: Completion(text, logprob, 50, 9, "stop")


class NoLabelBackend(FakeBackend):
    """A backend plugin (``tests`` registers it under ``labelmill.backends``) whose every answer is
    outside the label set: a run with it finishes with every row ``invalid``."""

    name = "no-label"
    section = None

    def answer(self, prompt, texts: pl.Series, request: Request) -> pa.Table:
        return Backend.answer(self, prompt, texts, request)

    def complete(self, conversations: list[Messages], request: Request) -> list[Completion]:
        return [Completion("none of them", None, 10, 2, "stop") for _ in conversations]

    def score(
        self, conversations: list[Messages], request: Request, choices=None, neutral=()
    ) -> list[Completion]:
        return self.complete(conversations, request)
