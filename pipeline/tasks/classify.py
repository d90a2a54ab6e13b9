"""Task ``classify``: one label per row, or up to ``labels_max`` labels (multi-label).

Single label, ``decoding: score`` (the default where the backend can): every label is scored and
the most probable is the answer (``pipeline/scoring.py``); confidence is its probability over the
label set, and ``label_probs`` (when asked for) the most probable labels with theirs.

Single label, ``decoding: constrained``: the backend is asked for one of the labels (a ``choice``
constraint); the answer is checked against the set again here, because a constraint cut short by
``max_tokens`` yields a prefix of a label, not a label. Confidence is ``exp(logprob)`` of the
constrained answer.

Strategies (``strategy:``) for label sets too big for one prompt, such as a taxonomy of thousands
of categories: ``flat`` puts every label in the prompt; ``shortlist`` gives each row the ``k``
labels its retrievers find most likely (``pipeline/retrieval.py``) and the row picks among those;
``hierarchical`` walks the taxonomy top-down, each row choosing among the children of the node it
chose at the level above. Rows that choose among options of their own show them through
``{choices}`` in the prompt; how the options are found and asked is ``pipeline/strategies.py``.

Multi-label: the answer is JSON ``{"labels": [...]}`` constrained by a schema (each item one of the
labels, 1 to ``labels_max`` items). ``label`` holds the first, ``labels`` all of them (repeats
dropped, order kept); confidence is null, as a probability of a set would need every subset scored.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal, get_args

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.contracts import (
    GENERATE,
    PATH_SEP,
    SCORE,
    Completion,
    Constraint,
    Options,
    Request,
    Sampling,
    Status,
)
from pipeline.errors import ConfigError
from pipeline.labels import Taxonomy, load_label_ids
from pipeline.models import resolve_model
from pipeline.retrieval import model_digest
from pipeline.tasks.base import TRUNCATED_NOTE, RowResult, Task

RetrieverName = Literal["lexical", "embeddings", "examples"]
RETRIEVERS: tuple[str, ...] = get_args(RetrieverName)
CONSTRAINED_MAX_LABELS = 2000
"""Most labels ``strategy: flat`` generates within (``decoding: constrained``): guided decoding
compiles the choice into a grammar per label set, and its engines slow down or refuse past about
this many options (guidance refuses more than 2,000). Scored labels have no such limit."""


class ShortlistSettings(Options):
    """The ``shortlist:`` section: how each row's candidates are found."""

    k: int = Field(default=20, ge=1)
    """Candidates each retriever offers a row; with several retrievers their lists are merged (a
    row gets up to ``k`` times their number)."""
    retrievers: tuple[RetrieverName, ...] = ("lexical",)
    """``lexical``: TF-IDF of character n-grams between the text and the label paths (no model;
    works for Polish). ``embeddings``: sentence embeddings of the text and the labels
    (``embedding_model``). ``examples``: the labels of the most similar already-labelled texts
    (``examples_file``, and this job's earlier answers in the result cache)."""
    embedding_model: str = "all-minilm-l6-v2"
    """A sentence-transformers model: a local folder, an alias of ``labelmill models list``, or a
    Hugging Face id in the local cache. Used by ``embeddings`` (and by ``examples`` when
    ``examples_by`` is ``embeddings``)."""
    embedding_device: str | None = None
    """Where embeddings are computed (``cpu``, ``cuda``); None: the GPU when there is one."""
    examples_file: str | None = None
    """Labelled texts (Parquet, CSV, TSV or JSON Lines) for the ``examples`` retriever."""
    examples_text_column: str = "text"
    examples_label_column: str = "label"
    examples_from_cache: bool = True
    """The ``examples`` retriever also learns from this job's earlier answers in the result cache
    (those at least ``examples_min_confidence`` sure)."""
    examples_min_confidence: float = Field(default=0.5, ge=0, le=1)
    examples_by: Literal["lexical", "embeddings"] = "lexical"
    """How the ``examples`` retriever finds similar texts."""
    neighbours: int = Field(default=50, ge=1)
    """Similar labelled texts the ``examples`` retriever reads per row."""

    @model_validator(mode="after")
    def _retrievers(self) -> ShortlistSettings:
        if not self.retrievers:
            raise ValueError("name at least one retriever: " + ", ".join(RETRIEVERS))
        if len(set(self.retrievers)) != len(self.retrievers):
            raise ValueError("a retriever is named twice in 'retrievers'")
        if "examples" in self.retrievers and not (self.examples_file or self.examples_from_cache):
            raise ValueError("the examples retriever needs examples_file or examples_from_cache: true")
        return self


LABEL_PROBS_TYPE = pa.list_(pa.struct([pa.field("label", pa.string()), pa.field("prob", pa.float64())]))


class ClassifySettings(Options):
    """The job keys of ``task: classify``."""

    labels: list[str] | None = None
    """The label set. Give this or ``labels_file``."""
    labels_file: str | None = None
    """Labels from a file: one per line (``#`` comments allowed), or a Shopify taxonomy
    ``categories.txt`` (``gid://... : A > B > C``), where each label is the full path."""
    labels_max_depth: int | None = Field(default=None, ge=1)
    """For taxonomy files: keep categories at most this deep (1 = top level only)."""
    assign: Literal["any", "leaf"] = "any"
    """For taxonomy files: ``any`` category may be the answer, or only a ``leaf`` (a category with
    none below it, in the tree as cut at ``labels_max_depth``)."""
    labels_max: int | None = Field(default=None, ge=2)
    """Multi-label classification: up to this many labels per row (output column ``labels``)."""
    decoding: Literal["auto", "score", "constrained"] = "auto"
    """How a single label is picked. ``score``: every label is scored in one decode step, or a
    few where labels share their first tokens, and the most probable one is the answer (see
    README, "How confidence is computed"). ``constrained``: the answer is generated token by token
    within the label set. ``auto``: ``score`` where it applies (single label, greedy sampling, a
    backend that can score), else ``constrained``; ``labelmill validate`` says which and why."""
    score_calibration: Literal["content_free", "none"] | None = None
    """With ``score``: ``content_free`` divides each label's probability by what the same prompt
    gives it for content-free inputs (``N/A``, an empty text, ``[MASK]``), at every step, and
    normalises again: a label whose first token is a common fragment (``S`` for ``Sunscreen``) or
    that the prompt favours no longer wins rows it has no evidence for (contextual calibration).
    Costs a few requests per label set per run. ``none``: the model's probabilities as they are.
    Default: ``content_free``, except with ``strategy: shortlist``, whose rows each have a set of
    their own (calibrating each would cost three more requests per row): ``none``. With
    ``hierarchical``, each option set of a level is calibrated (a level has few distinct sets)."""
    label_probs: int = Field(default=0, ge=0)
    """With ``score``: an output column ``label_probs`` with this many of the most probable labels
    and their probabilities (list of ``{label, prob}``, most probable first). 0: no column."""
    strategy: Literal["flat", "shortlist", "hierarchical"] = "flat"
    """``flat``: every label in the prompt (refused when they don't fit the context).
    ``shortlist``: each row chooses among its own candidates (``shortlist:`` says how they are
    found); output column ``candidates``. ``hierarchical``: a taxonomy walked top-down, one level
    per engine call, each row choosing among the children of what it chose above; output column
    ``level_confidences``. Both need a template with ``{choices}`` (``*_choices`` built-ins)."""
    shortlist: ShortlistSettings | None = None
    """How ``strategy: shortlist`` finds candidates; kept, unused, under another strategy (so
    ``--set strategy=flat`` tries the same job flat)."""

    @model_validator(mode="after")
    def _one_source(self) -> ClassifySettings:
        if (self.labels is None) == (self.labels_file is None):
            raise ValueError("give exactly one of 'labels' or 'labels_file'")
        if self.labels_max and self.decoding == "score":
            raise ValueError("decoding: score picks one label; multi-label (labels_max) is constrained")
        if self.labels_max and self.label_probs:
            raise ValueError("'label_probs' applies to single-label classification (without labels_max)")
        if self.decoding == "constrained" and self.label_probs:
            raise ValueError("'label_probs' needs decoding: score (or auto)")
        if self.strategy != "flat" and self.labels_max:
            raise ValueError(
                f"strategy: {self.strategy} picks one label per row; labels_max needs strategy: flat"
            )
        if self.strategy == "hierarchical" and self.label_probs:
            raise ValueError(
                "label_probs lists one label set's probabilities; strategy: hierarchical has one per level"
            )
        if self.strategy == "shortlist" and self.score_calibration == "content_free":
            raise ValueError(
                "score_calibration: content_free calibrates a label set with three content-free "
                "prompts, and strategy: shortlist gives each row a set of its own; leave it out"
            )
        return self


class ClassifyTask(Task):
    name = "classify"
    Settings = ClassifySettings
    fingerprint_part = "labels"
    evaluation = "classify"

    def __init__(self, settings: ClassifySettings, sampling: Sampling | None = None) -> None:
        super().__init__(settings, sampling or Sampling())
        self.strategy = settings.strategy
        self.shortlist = (settings.shortlist or ShortlistSettings()) if self.strategy == "shortlist" else None
        self.labels, self.label_ids = load_label_ids(
            settings.labels, settings.labels_file, settings.labels_max_depth, settings.assign
        )
        self._identity: dict | None = None
        self.tree: Taxonomy | None = None
        if self.strategy == "hierarchical":
            self.tree = Taxonomy(self.labels, leaves_only=settings.assign == "leaf")
            if self.tree.depth < 2:
                raise ConfigError(
                    f"strategy: hierarchical walks a taxonomy level by level, and these {len(self.labels)} "
                    f"labels have no levels (no '{PATH_SEP.strip()}' paths)",
                    hint="use strategy: flat or shortlist, or a taxonomy file",
                )
        self.labels_max = settings.labels_max if settings.labels_max and settings.labels_max > 1 else None
        self._max_tokens = self.sampling.max_tokens
        self._label_set = set(self.labels)
        # labels from a taxonomy: the output also gives each label's path as a list, and its id
        # (``label_ids``) where the file has ids
        self.taxonomy = any(PATH_SEP in label for label in self.labels)
        self.label_probs = settings.label_probs
        self.decoding = SCORE if settings.decoding != "constrained" and not self.labels_max else GENERATE
        self.decoding_note: str | None = None
        """Why ``auto`` chose constrained decoding, when it did."""
        self.calibration = settings.score_calibration or (
            "none" if self.strategy == "shortlist" else "content_free"
        )
        if self.decoding == SCORE and self.sampling.temperature > 0:
            self._no_scoring("temperature > 0 samples the answer token by token")

    def use_backend(self, cannot_score: str | None) -> None:
        """Settle ``decoding: auto`` once the backend is known: ``cannot_score`` is why it can't
        score a label set (None: it can)."""
        if self.decoding == SCORE and cannot_score:
            self._no_scoring(cannot_score)
        if self.strategy == "flat" and not self.scored and len(self.labels) > CONSTRAINED_MAX_LABELS:
            raise ConfigError(
                f"strategy: flat with {len(self.labels)} labels, generated within the label set "
                f"(decoding: constrained{', ' + self.decoding_note if self.decoding_note else ''}): "
                f"constrained decoding takes at most {CONSTRAINED_MAX_LABELS} labels",
                hint="use strategy: shortlist (each row chooses among its k best candidates) or "
                "strategy: hierarchical (one level of the taxonomy at a time), or a backend that "
                "scores labels (decoding: score)",
            )

    def too_long_hint(self) -> str:
        """What to do when the prompt leaves no room for the row (``text_budget``)."""
        if self.strategy == "flat":
            return (
                f"the {len(self.labels)} labels are in every prompt: use strategy: shortlist (each row "
                "sees only its k best candidates) or strategy: hierarchical (one level of the taxonomy "
                "at a time), or raise max_model_len"
            )
        if self.shortlist is not None:
            return "lower shortlist.k or use fewer retrievers, or raise max_model_len"
        return "a level of this taxonomy has too many categories for the context: raise max_model_len"

    def _no_scoring(self, reason: str) -> None:
        if self.settings.decoding == "score":
            raise ConfigError(
                f"decoding: score can't be used here: {reason}", hint="use decoding: constrained"
            )
        if self.label_probs:
            raise ConfigError(f"label_probs needs scored labels, and {reason}", hint="leave label_probs out")
        self.decoding, self.decoding_note = GENERATE, reason

    @property
    def scored(self) -> bool:
        return self.decoding == SCORE

    def request(self) -> Request:
        if not self.scored:
            return super().request()
        return Request(
            self.constraint(),
            self.max_tokens(),
            self.sampling,
            SCORE,
            max(1, self.label_probs),
            calibrate=self.calibration == "content_free",
        )

    @property
    def row_choices(self) -> bool:
        """Each row chooses among options of its own (its candidates, or a level's children)."""
        return self.strategy != "flat"

    @property
    def row_choices_why(self) -> str:
        return f"strategy: {self.strategy} gives each row its own options"

    def widest_choices(self) -> list[str]:
        """The longest options any row can be shown (for the prompt's token budget)."""
        if self.strategy == "flat":
            return self.labels
        if self.tree is not None:
            return self.tree.widest_options()
        width = self.shortlist.k * len(self.shortlist.retrievers)
        return sorted(self.labels, key=lambda label: len(label.encode()), reverse=True)[:width]

    @property
    def single_label(self) -> bool:
        return not self.labels_max

    def lines(self) -> list[tuple[str, str]]:
        shown = ", ".join(self.labels[:8]) + (" ..." if len(self.labels) > 8 else "")
        kind = f", up to {self.labels_max} per row" if self.labels_max else ""
        lines = [("labels", f"{len(self.labels)}{kind}: {shown}")]
        if self.shortlist is not None:
            s = self.shortlist
            lines.append(
                ("strategy", f"shortlist: each row chooses among the {s.k} best candidates of "
                 f"{' + '.join(s.retrievers)} (merged: up to {s.k * len(s.retrievers)})")
            )  # fmt: skip
        elif self.tree is not None:
            lines.append(
                ("strategy", f"hierarchical: {self.tree.depth} levels, at most "
                 f"{len(self.tree.widest_options())} options per level; the answer is "
                 + ("a leaf" if self.tree.leaves_only else "any category"))
            )  # fmt: skip
        if self.scored:
            lines.append(("decoding", "score: each label's probability, the most probable is the answer"))
        elif not self.labels_max:
            why = f" ({self.decoding_note})" if self.decoding_note else ""
            lines.append(("decoding", f"constrained: the label is generated token by token{why}"))
        return lines

    @property
    def fields(self) -> list[pa.Field]:
        fields = [pa.field("label", pa.string()), pa.field("confidence", pa.float64())]
        if self.labels_max:
            fields.append(pa.field("labels", pa.list_(pa.string())))
        if self.label_probs:
            fields.append(pa.field("label_probs", LABEL_PROBS_TYPE))
        if self.shortlist is not None:
            fields.append(pa.field("candidates", pa.list_(pa.string())))
        if self.tree is not None:
            fields.append(pa.field("level_confidences", pa.list_(pa.float64())))
        if self.label_ids:
            fields.append(pa.field("label_id", pa.string()))
        if self.taxonomy:
            fields.append(pa.field("label_path", pa.list_(pa.string())))
        return fields

    def prompt_values(self, language: str = "en") -> dict[str, str]:
        if self.row_choices:  # a shared list would defeat the strategy: rows show {choices}
            return {"labels_max": "1"}
        return {
            "labels": "\n".join(f"- {label}" for label in self.labels),
            "labels_inline": ", ".join(self.labels),
            "labels_max": str(self.labels_max or 1),
        }

    def constraint(self) -> Constraint:
        if not self.labels_max:
            return Constraint(choice=tuple(self.labels))
        return Constraint(
            json_schema={
                "type": "object",
                "properties": {
                    "labels": {
                        "type": "array",
                        "items": {"type": "string", "enum": self.labels},
                        "minItems": 1,
                        "maxItems": self.labels_max,
                    }
                },
                "required": ["labels"],
                "additionalProperties": False,
            }
        )

    def max_tokens(self) -> int:
        """Most answer tokens any spelling of any valid answer can take.

        The constraint lets the model spell a label with any tokenisation, down to one byte per
        token, so the bound is the longest label in UTF-8 bytes, plus the end-of-answer token
        (for multi-label: ``labels_max`` of the longest, with JSON punctuation). Greedy decoding
        stops at the end of the answer, so a generous cap costs nothing.
        """
        if self._max_tokens:
            return self._max_tokens
        longest = max(len(label.encode("utf-8")) for label in self.labels)
        if not self.labels_max:
            return longest + 1
        return 16 + self.labels_max * (longest + 4)

    def describe(self) -> dict:
        described = {"labels": self.labels, "labels_max": self.labels_max}
        if self.scored:  # constrained jobs keep the fingerprint they had before scoring existed
            described |= {
                "decoding": SCORE,
                "label_probs": self.label_probs,
                "score_calibration": self.calibration,
            }
        if self.strategy != "flat":  # flat jobs keep the fingerprint they had before strategies
            described["strategy"] = self.strategy
            described["assign"] = self.settings.assign
        if self.shortlist is not None:
            described["shortlist"] = self.shortlist.model_dump(mode="json", exclude={"embedding_device"})
            described["retrievers"] = self._retriever_identity()
        return described

    def _retriever_identity(self) -> dict:
        """What decides the candidates besides the settings: the embedding model's weights and the
        examples file's bytes (a file or model changed in place gets new answers too)."""
        if self._identity is None:
            s, identity = self.shortlist, {}
            if "embeddings" in s.retrievers or ("examples" in s.retrievers and s.examples_by == "embeddings"):
                identity["embedding_model"] = model_digest(resolve_model(s.embedding_model))
            if "examples" in s.retrievers and s.examples_file:
                identity["examples_file"] = file_digest(s.examples_file)
            self._identity = identity
        return self._identity

    def parse(self, completion: Completion, truncated: bool) -> RowResult:
        if completion.error is not None:
            return RowResult.failed(completion)
        result = RowResult.answered(completion)
        picked = self._parse_multi(completion) if self.labels_max else self._parse_one(completion, result)
        if picked is None:
            result.status = Status.INVALID
            result.error = self._invalid_reason(completion.text, completion.finish_reason)
            result.values = {}
            return result
        result.values["label"] = picked[0]
        if self.labels_max:
            result.values["labels"] = picked
        if truncated:
            result.status = Status.TRUNCATED
            result.error = TRUNCATED_NOTE
        return result

    def parse_answers(self, answers: pa.Table, truncated: pa.Array) -> pa.Table:
        """Single label: ``parse`` on whole columns (the common case, and the one that must keep
        up with a fast engine); multi-label answers are JSON and are parsed one by one."""
        return self._with_taxonomy(self._parse_answers(answers, truncated))

    def _with_taxonomy(self, table: pa.Table) -> pa.Table:
        """The taxonomy columns, from ``label``: its id and its path as a list."""
        if not (self.label_ids or self.taxonomy):
            return table
        label = pl.Series(table.column("label"))
        names = [f.name for f in self.result_fields]
        if self.label_ids:
            ids = label.replace_strict(self.label_ids, default=None, return_dtype=pl.String)
            table = table.set_column(names.index("label_id"), "label_id", ids.to_arrow().cast(pa.string()))
        if self.taxonomy:
            paths = label.str.split(PATH_SEP).to_arrow().cast(pa.list_(pa.string()))
            table = table.set_column(names.index("label_path"), "label_path", paths)
        return table

    def _parse_answers(self, answers: pa.Table, truncated: pa.Array) -> pa.Table:
        if self.labels_max:
            return super().parse_answers(answers, truncated)
        frame = pl.from_arrow(answers).with_columns(
            answer=pl.col("text").str.strip_chars(), truncated=pl.Series(truncated, dtype=pl.Boolean)
        )
        failed = pl.col("error").is_not_null()
        valid = ~failed & pl.col("answer").is_in(self.labels)
        if self.row_choices:  # and one of the row's own options
            valid = valid & pl.col("choices").list.contains(pl.col("answer")).fill_null(True)
        answered = pl.when(~failed)
        frame = frame.select(
            label=pl.when(valid).then(pl.col("answer")),
            confidence=pl.when(valid & pl.col("logprob").is_not_nan()).then(
                pl.col("logprob").exp().clip(0.0, 1.0)
            ),
            status=pl.when(failed)
            .then(pl.lit(Status.ERROR.value))
            .when(~valid)
            .then(pl.lit(Status.INVALID.value))
            .when(pl.col("truncated"))
            .then(pl.lit(Status.TRUNCATED.value))
            .otherwise(pl.lit(Status.OK.value)),
            error=pl.when(failed)
            .then(pl.col("error"))
            .when(valid & pl.col("truncated"))
            .then(pl.lit(TRUNCATED_NOTE)),
            prompt_tokens=answered.then(pl.col("prompt_tokens")),
            output_tokens=answered.then(pl.col("output_tokens")),
            cached_tokens=answered.then(pl.col("cached_tokens")),
            invalid=~failed & ~valid,
            **(
                {
                    "label_probs": pl.when(valid).then(
                        pl.col("alternatives")
                        .list.head(self.label_probs)
                        .list.eval(
                            pl.struct(
                                label=pl.element().struct.field("text"),
                                prob=pl.element().struct.field("logprob").exp(),
                            )
                        )
                    )
                }
                if self.label_probs
                else {}
            ),
            **(
                {"candidates": pl.when(~failed).then(pl.col("choices"))} if self.shortlist is not None else {}
            ),
            **(
                {
                    "level_confidences": pl.when(~failed).then(
                        pl.col("levels").list.eval(pl.element().struct.field("logprob").exp())
                    )
                }
                if self.tree is not None
                else {}
            ),
        )
        invalid = np.flatnonzero(frame["invalid"].to_numpy())
        if len(invalid):  # rare: word the reason row by row, as ``parse`` does
            rows = answers.take(pa.array(invalid)).select(["text", "finish_reason"]).to_pylist()
            reasons = [self._invalid_reason(r["text"], r["finish_reason"]) for r in rows]
            frame = frame.with_columns(frame["error"].scatter(invalid, reasons))
        table = frame.drop("invalid").to_arrow()
        return pa.Table.from_arrays(
            [
                table.column(f.name).cast(f.type)
                if f.name in table.column_names
                else pa.nulls(table.num_rows, f.type)  # the taxonomy's, filled from the label
                for f in self.result_fields
            ],
            schema=pa.schema(self.result_fields),
        )

    def _invalid_reason(self, text: str, finish_reason: str | None) -> str:
        answer = text.strip()
        if finish_reason == "length":
            return f"answer cut at max_tokens={self.max_tokens()} before it was complete: {answer!r}"
        if self.row_choices and answer in self._label_set:
            return f"answer is not one of the row's options: {answer[:200]!r}"
        return f"answer is not one of the labels: {answer[:200]!r}"

    def _parse_one(self, completion: Completion, result: RowResult) -> list[str] | None:
        answer = completion.text.strip()
        if answer not in self._label_set:
            return None
        if completion.choices is not None and answer not in completion.choices:
            return None
        if completion.logprob is not None and not math.isnan(completion.logprob):
            result.values["confidence"] = min(1.0, max(0.0, math.exp(completion.logprob)))
        return [answer]

    def _parse_multi(self, completion: Completion) -> list[str] | None:
        try:
            value = json.loads(completion.text)
        except ValueError:
            return None
        items = value.get("labels") if isinstance(value, dict) else None
        if not isinstance(items, list) or not items or len(items) > self.labels_max:
            return None
        if not all(isinstance(x, str) and x in self._label_set for x in items):
            return None
        return list(dict.fromkeys(items))


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (first 16 hex digits); a ConfigError naming it when unreadable."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise ConfigError(f"shortlist.examples_file {path} can't be read ({exc.strerror or exc})") from None
    return h.hexdigest()[:16]
