"""How a chunk's questions are put to the model: the classification strategies.

    Flat          one call, every row choosing among the job's whole label set
    Shortlist     the retrievers find each row's candidates (``pipeline/retrieval.py``); one call,
                  each row choosing among its own; the candidates come back with each answer
    Hierarchical  a taxonomy walked top-down: one call per level, each row choosing among the
                  children of the node it chose at the level above, until a leaf (or a node chosen
                  over its children, with ``assign: any``); the answer keeps every level's choice

A strategy turns texts into an answers table (``ANSWER_SCHEMA``), one row per text, and is the
only thing ``BackendSource`` asks: dedupe, the answer store, parsing and output are the chunk
pipeline's (``pipeline/flow.py``) and the same for every strategy. Answers picked among a row's
own options carry them (``choices``), so a stored answer is parsed and checked like a fresh one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import logs
from pipeline.backends.base import Backend
from pipeline.contracts import Completion, Request, answers_table, table_completions
from pipeline.errors import ConfigError
from pipeline.labels import Taxonomy
from pipeline.models import labelmill_home, resolve_model
from pipeline.plan import Plan
from pipeline.prompts import RenderedPrompt
from pipeline.retrieval import (
    EmbeddingRetriever,
    ExamplesRetriever,
    LexicalRetriever,
    Retriever,
    load_examples,
    merge_candidates,
)

log = logs.get("strategies")

NO_CANDIDATES = "no candidates: none of the retrievers offered a label for this text"


class Strategy(Protocol):
    name: str

    def answer(
        self, backend: Backend, prompt: RenderedPrompt, texts: pl.Series, request: Request
    ) -> pa.Table:
        """An answers table (``ANSWER_SCHEMA``) for ``texts``, one row each, in order."""


class Flat:
    name = "flat"

    def answer(
        self, backend: Backend, prompt: RenderedPrompt, texts: pl.Series, request: Request
    ) -> pa.Table:
        return backend.answer(prompt, texts, request)


class Shortlist:
    """Each row chooses among the candidates its retrievers find: each retriever's ``k`` best,
    merged rank by rank (``merge_candidates``)."""

    name = "shortlist"

    def __init__(self, labels: Sequence[str], retrievers: Callable[[], list[Retriever]], k: int) -> None:
        """``retrievers`` builds them, on first use: a run whose answers all come from the cache
        never computes a label vector or loads an embedding model."""
        self.labels = list(labels)
        self._build = retrievers
        self._retrievers: list[Retriever] | None = None
        self.k = k

    @property
    def retrievers(self) -> list[Retriever]:
        if self._retrievers is None:
            self._retrievers = self._build()
        return self._retrievers

    def candidates(self, texts: Sequence[str]) -> list[list[str]]:
        """Each text's candidates, merged, best first."""
        merged = merge_candidates([r.top(texts, self.k) for r in self.retrievers])
        return [[self.labels[i] for i in row] for row in merged]

    def by_retriever(self, texts: Sequence[str]) -> dict[str, list[list[str]]]:
        """Each retriever's own candidates for each text (for ``labelmill validate``)."""
        return {
            r.name: [[self.labels[i] for i in row if i >= 0] for row in r.top(texts, self.k)]
            for r in self.retrievers
        }

    def answer(
        self, backend: Backend, prompt: RenderedPrompt, texts: pl.Series, request: Request
    ) -> pa.Table:
        candidates = self.candidates(texts.to_list())
        some = np.flatnonzero([bool(c) for c in candidates])
        if len(some) == len(candidates):
            return backend.answer(prompt, texts, request, choices=candidates)
        # a row without candidates (an examples-only shortlist that found no similar text) gets
        # an error, and is asked again on the next run, when more examples may be known
        answered = table_completions(
            backend.answer(prompt, texts.gather(some), request, choices=[candidates[i] for i in some])
        )
        completions = [Completion.failed(NO_CANDIDATES)] * len(candidates)
        for i, done in zip(some, answered, strict=True):
            completions[i] = done
        return answers_table(completions)


class Hierarchical:
    """The taxonomy walked top-down, one engine call per level for all the rows still walking.

    A level with a single option is passed without asking. The answer's log-probability is the sum
    over the levels (its confidence the product); ``levels`` holds the node chosen at each level of
    the answer's path with its log-probability (where a row chose to stop at a node over its
    children, that choice's is added to the node's, so ``levels`` runs along the path), and
    ``choices`` the options of the last level, so the answer is checked against what was offered.
    """

    name = "hierarchical"

    def __init__(self, tree: Taxonomy) -> None:
        self.tree = tree

    def answer(
        self, backend: Backend, prompt: RenderedPrompt, texts: pl.Series, request: Request
    ) -> pa.Table:
        n = len(texts)
        at: list[str | None] = [None] * n
        levels: list[list[tuple[str, float]]] = [[] for _ in range(n)]
        last: list[Completion | None] = [None] * n
        offered: list[tuple[str, ...]] = [()] * n
        tokens = np.zeros((n, 3), dtype=np.int64)  # prompt, output, cached
        retries = np.zeros(n, dtype=np.int64)
        walking = list(range(n))
        while walking:
            ask, still = [], []
            for i in walking:
                options = tuple(self.tree.options(at[i]))
                offered[i] = options
                if len(options) == 1:  # nothing to choose: pass the level without asking
                    levels[i].append((options[0], 0.0))
                    if self._stop(at[i], options[0]):
                        last[i] = Completion(options[0], 0.0, 0, 0, "stop")
                    else:
                        still.append(i)
                    at[i] = options[0]
                else:
                    ask.append(i)
            if ask:
                rows = np.array(ask)
                table = backend.answer(prompt, texts.gather(rows), request, choices=[offered[i] for i in ask])
                for i, done in zip(ask, table_completions(table), strict=True):
                    tokens[i] += [done.prompt_tokens, done.output_tokens, done.cached_tokens or 0]
                    retries[i] += done.retries
                    chosen = done.text.strip()
                    if done.error is not None or chosen not in offered[i]:
                        last[i] = done  # failed or invalid: the walk ends, the task says why
                        continue
                    logprob = done.logprob if done.logprob is not None else math.nan
                    if chosen == at[i]:  # stopping here is part of this level's choice
                        node, above = levels[i][-1]
                        levels[i][-1] = (node, above + logprob)
                    else:
                        levels[i].append((chosen, logprob))
                    if self._stop(at[i], chosen):
                        last[i] = done
                    else:
                        at[i] = chosen
                        still.append(i)
            walking = still
        return answers_table(
            [self._final(last[i], levels[i], offered[i], tokens[i], retries[i]) for i in range(n)]
        )

    def _stop(self, node: str | None, chosen: str) -> bool:
        return chosen == node or self.tree.final(chosen)

    @staticmethod
    def _final(done: Completion, levels, offered, tokens, retries) -> Completion:
        if done.error is not None:
            return Completion.failed(done.error, int(retries))
        return replace(
            done,
            logprob=sum(lp for _, lp in levels) if levels else done.logprob,
            prompt_tokens=int(tokens[0]),
            output_tokens=int(tokens[1]),
            cached_tokens=int(tokens[2]) if tokens[2] else done.cached_tokens,
            retries=int(retries),
            alternatives=None,  # the last level's only: not the answer's
            choices=tuple(offered),
            levels=tuple(levels),
        )


def make_strategy(plan: Plan, store=None) -> Strategy:
    """The job's strategy, its retrievers built (label vectors read from disk or computed once).
    ``store``: the answer store, whose earlier answers the ``examples`` retriever learns from."""
    task = plan.task
    strategy = getattr(task, "strategy", "flat")
    if strategy == "hierarchical":
        return Hierarchical(task.tree)
    if strategy != "shortlist":
        return Flat()
    return Shortlist(task.labels, lambda: build_retrievers(task, store), task.shortlist.k)


def build_retrievers(task, store=None) -> list[Retriever]:
    settings = task.shortlist
    vectors = labelmill_home() / "vectors"
    built: list[Retriever] = []
    for name in settings.retrievers:
        if name == "lexical":
            built.append(LexicalRetriever(task.labels))
        elif name == "embeddings":
            model = resolve_model(settings.embedding_model)
            built.append(EmbeddingRetriever(task.labels, model, vectors, settings.embedding_device))
        else:
            texts, labels = example_pairs(task, store)
            if not texts and len(settings.retrievers) > 1:
                log.warning(
                    "examples retriever: no labelled texts yet (no examples_file, nothing in the "
                    "cache); the other retrievers find the candidates",
                    extra=logs.fields("examples", examples=0),
                )
                continue
            if not texts:
                raise ConfigError(
                    "the examples retriever has no labelled texts: no examples_file, and no earlier "
                    "answers of this job in the result cache",
                    hint="give shortlist.examples_file, or add the lexical or embeddings retriever",
                )
            model = resolve_model(settings.embedding_model) if settings.examples_by == "embeddings" else None
            retriever = ExamplesRetriever(
                task.labels, texts, labels, settings.neighbours, model, vectors, settings.embedding_device
            )
            log.info(
                "examples retriever: %d labelled texts (%d with a label outside the label set left out)",
                retriever.examples, retriever.dropped,
                extra=logs.fields("examples", examples=retriever.examples, dropped=retriever.dropped),
            )  # fmt: skip
            built.append(retriever)
    return built


def example_pairs(task, store=None) -> tuple[list[str], list[str]]:
    """The ``examples`` retriever's (text, label) pairs: the examples file's, then the job's earlier
    answers in ``store`` that were at least ``examples_min_confidence`` sure."""
    settings = task.shortlist
    texts: list[str] = []
    labels: list[str] = []
    if settings.examples_file:
        texts, labels = load_examples(
            Path(settings.examples_file), settings.examples_text_column, settings.examples_label_column
        )
    answers = getattr(store, "answers", None)
    if settings.examples_from_cache and answers is not None:
        earlier = pl.from_arrow(answers())
        if earlier.height:
            floor = (
                math.log(settings.examples_min_confidence)
                if settings.examples_min_confidence > 0
                else -math.inf
            )
            sure = earlier.filter(
                pl.col("text").is_in(task.labels) & (pl.col("logprob").fill_nan(None) >= floor)
            )
            texts += sure["sent"].to_list()
            labels += sure["text"].to_list()
    return texts, labels
