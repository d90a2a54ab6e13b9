"""What every backend offers the pipeline: token counting and constrained chat completion.

A backend is one class, registered under the entry point group ``labelmill.backends`` (see
``pipeline/plugins.py``). It owns its section of the job file (``section``, validated by its
``Settings`` model) and receives only that section and the model name; what to answer comes with
each call as a :class:`~pipeline.contracts.Request` (constraint, answer budget, decoding).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from pipeline.contracts import (
    ANSWER_SCHEMA,
    SCORE,
    Completion,
    Constraint,
    Messages,
    Options,
    Request,
    answers_table,
)
from pipeline.scoring import NEUTRAL_TEXTS, LabelTrie

if TYPE_CHECKING:
    import polars as pl

    from pipeline.prompts import RenderedPrompt


_TRIES_KEPT = 4096
"""Label sets whose trie a backend keeps (rows with their own candidates repeat sets often)."""


class NoSettings(Options):
    """A backend without settings of its own."""


class Backend(ABC):
    """A model behind a narrow interface.

    ``start`` loads the model; everything else (``count_tokens``, ``truncate``,
    ``prompt_tokens``) works before it, so ``labelmill validate`` can count tokens without
    loading weights. ``answer`` starts the backend the first time it has something to answer, so
    a run whose texts all come from the cache never loads a model.
    """

    name: ClassVar[str]
    section: ClassVar[str | None] = None
    """The job file's key for this backend's settings (``engine``, ``api``); None: it has none."""
    Settings: ClassVar[type[Options]] = NoSettings
    loads_weights: ClassVar[bool] = False
    """True when ``model:`` names weights this machine loads (resolved to a local folder); False when
    it is a name passed verbatim to a server."""

    def __init__(self, settings: Options | None = None, model: str = "") -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.model = model
        self.start_seconds = 0.0
        """Time spent loading the model, so throughput figures can leave it out."""
        self.on_answers: Callable[[int], None] | None = None
        """Set by whoever shows progress: called with a count as answers come in during a call."""

    def answered(self, count: int) -> None:
        """Say that ``count`` more answers of the current call are in (for progress within a
        chunk: a chunk of 50,000 rows is one call, minutes long on a slow model)."""
        if self.on_answers is not None and count:
            self.on_answers(count)

    @classmethod
    def identity(cls, settings: Options, request: Request | None = None) -> dict[str, Any] | None:
        """The settings that can change an answer (part of the job fingerprint and the cache key),
        or None when none can. Settings that only change speed or memory stay out, so changing
        them neither refuses a resume nor empties the cache. ``request``: what the job asks (a
        setting that only shapes JSON answers is no part of a job whose answers are labels)."""
        return None

    @classmethod
    def describe_settings(cls, settings: Options) -> dict[str, Any]:
        """The settings as the run's provenance records them (``run.json``)."""
        return settings.model_dump(mode="json")

    def start(self) -> None:  # noqa: B027 - optional hook: a backend without a model has nothing to load
        """Load the model. Idempotent."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any engine process."""

    @property
    def max_model_len(self) -> int | None:
        """Context length in tokens, once known; None for no limit."""
        return None

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
    def complete(self, conversations: list[Messages], request: Request) -> list[Completion]:
        """Answer every conversation within ``request.constraint``; results in input order."""

    def answer(
        self,
        prompt: RenderedPrompt,
        texts: pl.Series,
        request: Request,
        choices: Sequence[Sequence[str]] | None = None,
    ) -> pa.Table:
        """Answer ``prompt`` filled with each of ``texts``; an answers table (``ANSWER_SCHEMA``),
        one row per text, in order. This is what the pipeline calls: a backend whose cost per
        answer is tiny (the test double) answers whole columns at once here; the others answer
        through ``complete``, or ``score`` when the request says so.

        ``choices``: each text's own options (shown through the prompt's ``{choices}``), which
        replace the request's choice constraint row by row; they come back in the ``choices``
        column."""
        if not len(texts):
            return ANSWER_SCHEMA.empty_table()
        if choices is not None:
            return self._answer_each(prompt, texts, request, [tuple(c) for c in choices])
        conversations = [prompt.messages(t) for t in texts]
        if request.decoding == SCORE:
            neutral = [prompt.messages(t) for t in NEUTRAL_TEXTS] if request.calibrate else []
            return answers_table(self.score(conversations, request, neutral=neutral))
        return answers_table(self.complete(conversations, request))

    def _answer_each(
        self, prompt: RenderedPrompt, texts: pl.Series, request: Request, choices: list[tuple[str, ...]]
    ) -> pa.Table:
        conversations = [prompt.messages(t, c) for t, c in zip(texts, choices, strict=True)]
        if request.decoding == SCORE and not request.calibrate:
            completions = self.score(conversations, request, choices=choices)
        elif request.decoding == SCORE:
            # Calibrated: the content-free prompts must show the same options as the rows they
            # calibrate, so rows are scored set by set (a taxonomy level has few distinct sets).
            completions = _per_set(
                conversations,
                choices,
                lambda asked, options: self.score(
                    asked,
                    request,
                    [options] * len(asked),
                    [prompt.messages(t, options) for t in NEUTRAL_TEXTS],
                ),
            )
        else:
            # Generated answers: one call per distinct option set, the set as its choice
            # constraint (a level of a taxonomy shares sets; a shortlist's rows rarely do).
            completions = _per_set(
                conversations,
                choices,
                lambda asked, options: self.complete(
                    asked, replace(request, constraint=Constraint(choice=options))
                ),
            )
        table = answers_table(completions)
        at = ANSWER_SCHEMA.get_field_index("choices")
        return table.set_column(
            at, ANSWER_SCHEMA.field("choices"), pa.array(choices, ANSWER_SCHEMA.field("choices").type)
        )

    # Scoring a label set (``decoding: score``, see ``pipeline/scoring.py``).

    @classmethod
    def cannot_score(cls, settings: Options) -> str | None:
        """Why this backend, with these settings, can't score a label set; None if it can."""
        return f"the {cls.name} backend can't score a label set"

    def score(
        self,
        conversations: list[Messages],
        request: Request,
        choices: Sequence[tuple[str, ...]] | None = None,
        neutral: Sequence[Messages] = (),
    ) -> list[Completion]:
        """The most probable of the choices for each conversation, scored (``pipeline/scoring.py``),
        with ``request.alternatives`` of them in ``Completion.alternatives``. ``choices``: each
        conversation's own label set; None: ``request.constraint.choice`` for all. ``neutral``:
        content-free conversations of the same prompt, whose answers calibrate the scores."""
        raise NotImplementedError(f"the {self.name} backend can't score a label set")

    def score_tries(
        self,
        conversations: list[Messages],
        request: Request,
        choices: Sequence[tuple[str, ...]] | None = None,
    ) -> list[LabelTrie]:
        """Each conversation's label trie: its own set's (``choices``), or the request's for all."""
        if choices is not None:
            return [self.label_trie(tuple(c), conversations[0]) for c in choices]
        if request.constraint.choice is None:
            raise ValueError("scoring needs a choice constraint or per-row choices")
        return [self.label_trie(tuple(request.constraint.choice), conversations[0])] * len(conversations)

    def label_trie(self, labels: tuple[str, ...], messages: Messages) -> LabelTrie:
        """The token trie of ``labels`` as this model writes them after the chat template's opening
        of the answer (``messages``: any conversation of the job); built once per label set."""
        tries = self.__dict__.setdefault("_tries", {})
        trie = tries.get(labels)
        if trie is None:
            if len(tries) >= _TRIES_KEPT:
                tries.pop(next(iter(tries)))
            trie = tries[labels] = LabelTrie(labels, self.label_paths(labels, messages), self.end_tokens())
        return trie

    def label_paths(self, labels: Sequence[str], messages: Messages) -> list[list[int]]:
        """Each label's canonical token ids as the answer (backends that can score)."""
        raise NotImplementedError

    def end_tokens(self) -> list[int]:
        """The token ids that end an answer (backends that can score)."""
        raise NotImplementedError

    # Batch files (labelmill export / import). A backend that can say what one request looks like
    # on the wire, and read an answer back, can have a job's requests written to files and sent
    # through a provider's batch API or ``vllm run-batch``.

    batch_url: ClassVar[str | None] = None
    """The endpoint batch request lines name (``/v1/chat/completions``); None: no batch files."""

    def request_body(self, messages: Messages, request: Request) -> dict:
        """One request's body, as a batch file line carries it (backends with a ``batch_url``)."""
        raise NotImplementedError

    def read_response(self, body: dict, request: Request) -> Completion | None:
        """A batch result's response body as a Completion; None if it is not one."""
        raise NotImplementedError

    def version(self) -> str:
        return self.name

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _per_set(
    conversations: list[Messages],
    choices: list[tuple[str, ...]],
    ask: Callable[[list[Messages], tuple[str, ...]], list[Completion]],
) -> list[Completion]:
    """``ask`` once per distinct option set with that set's conversations; the answers back in the
    conversations' order."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, options in enumerate(choices):
        groups.setdefault(options, []).append(i)
    completions: list[Completion] = [None] * len(conversations)  # type: ignore[list-item]
    for options, rows in groups.items():
        for i, done in zip(rows, ask([conversations[i] for i in rows], options), strict=True):
            completions[i] = done
    return completions


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
