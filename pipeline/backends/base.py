"""What every backend offers the runner: token counting and label-constrained chat completion."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import pyarrow as pa

from pipeline.config import JobConfig

if TYPE_CHECKING:
    import polars as pl

    from pipeline.prompts import RenderedPrompt

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    """One answer, as the backend returned it. Parsing into a label happens in the task."""

    text: str
    logprob: float | None
    """Sum of the answer tokens' log-probabilities after the label constraint was applied
    (the constrained decoder's probability of this answer), or None if not available."""
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None
    cached_tokens: int | None = None
    """Prompt tokens the server served from its cache, where it says so."""
    error: str | None = None
    """Why no answer came (after retries); the row gets status ``error`` and is retried on rerun."""
    retries: int = 0


ANSWER_SCHEMA = pa.schema(
    [
        pa.field("text", pa.string()),
        pa.field("logprob", pa.float64()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("cached_tokens", pa.int32()),
        pa.field("error", pa.string()),
        pa.field("retries", pa.int32()),
    ]
)
"""Answers as columns, one row per request: the fields of :class:`Completion`, in its order."""


def answers_table(completions: list[Completion]) -> pa.Table:
    """Completions as an answers table (``ANSWER_SCHEMA``)."""
    columns = list(zip(*(astuple(c) for c in completions), strict=True)) or [()] * len(ANSWER_SCHEMA)
    return pa.Table.from_arrays(
        [pa.array(col, f.type) for col, f in zip(columns, ANSWER_SCHEMA, strict=True)], schema=ANSWER_SCHEMA
    )


def table_completions(answers: pa.Table) -> list[Completion]:
    """An answers table back as Completion objects (for code that handles one answer at a time)."""
    names = [f.name for f in fields(Completion)]
    return [Completion(**row) for row in answers.select(names).to_pylist()]


@dataclass(frozen=True)
class Constraint:
    """What the answer must be: one of ``choice``, or a JSON document matching ``json_schema``."""

    choice: tuple[str, ...] | None = None
    json_schema: dict | None = None

    def __post_init__(self) -> None:
        if (self.choice is None) == (self.json_schema is None):
            raise ValueError("a Constraint is either a choice or a JSON schema")


class Backend(ABC):
    """A model behind a narrow interface.

    ``start`` loads the model; everything else (``count_tokens``, ``truncate``,
    ``prompt_tokens``) works before it, so ``labelmill validate`` can count tokens without
    loading weights. ``complete`` starts the backend the first time it has something to answer, so
    a run whose texts all come from the cache never loads a model.
    """

    name: ClassVar[str]
    loads_weights: ClassVar[bool] = False
    """True when ``model:`` names weights this machine loads (resolved to a local folder); False when
    it is a name passed verbatim to a server."""

    def __init__(self, job: JobConfig, model: str, log=None) -> None:
        self.job = job
        self.model = model
        self.log = log or (lambda _message: None)
        self.start_seconds = 0.0
        """Time spent loading the model, so throughput figures can leave it out."""

    def start(self) -> None:  # noqa: B027 - optional hook: a backend without a model has nothing to load
        """Load the model. Idempotent."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any engine process."""

    @property
    def max_model_len(self) -> int | None:
        """Context length in tokens, once known."""
        return self.job.engine.max_model_len

    @abstractmethod
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token count of each text on its own (no special tokens)."""

    @abstractmethod
    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` that is at most ``max_tokens`` tokens."""

    @abstractmethod
    def prompt_tokens(self, messages: Messages) -> int:
        """Tokens of a whole chat prompt, chat template included."""

    def render_chat(self, messages: Messages) -> str:
        """The prompt as the model sees it (for ``labelmill validate``)."""
        return "\n".join(f"<{m['role']}>\n{m['content']}" for m in messages)

    @abstractmethod
    def complete(
        self, conversations: list[Messages], constraint: Constraint, max_tokens: int
    ) -> list[Completion]:
        """Answer every conversation within ``constraint``; results in input order."""

    def answer(
        self, prompt: RenderedPrompt, texts: pl.Series, constraint: Constraint, max_tokens: int
    ) -> pa.Table:
        """Answer ``prompt`` filled with each of ``texts``; an answers table (``ANSWER_SCHEMA``),
        one row per text, in order. This is what the runner calls: a backend whose cost per answer
        is tiny (the test double) answers whole columns at once here; the others answer through
        ``complete``."""
        if not len(texts):
            return ANSWER_SCHEMA.empty_table()
        return answers_table(self.complete([prompt.messages(t) for t in texts], constraint, max_tokens))

    def version(self) -> str:
        return self.name

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_BYTES_PER_TOKEN = 4


class ByteTokens:
    """Token arithmetic for backends without a local tokenizer: one token per 4 bytes of UTF-8.

    Close enough for budgets and rate limits of English and Polish text; exact counts come back
    from the server with each answer.
    """

    @staticmethod
    def _tokens(text: str) -> int:
        return -(-len(text.encode("utf-8")) // _BYTES_PER_TOKEN)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [self._tokens(t) for t in texts]

    def truncate(self, text: str, max_tokens: int) -> str:
        return text.encode("utf-8")[: max_tokens * _BYTES_PER_TOKEN].decode("utf-8", errors="ignore")

    def prompt_tokens(self, messages: Messages) -> int:
        return sum(self._tokens(m["content"]) + 4 for m in messages)
