"""Candidate labels for a row, before any model: the retrievers of a shortlist.

    LexicalRetriever    TF-IDF over character n-grams of the labels (scikit-learn): no model, works
                        for Polish, and for keywords typed without diacritics (accents are folded)
    EmbeddingRetriever  cosine of sentence embeddings (sentence-transformers) of the text and the
                        labels: finds a label that shares no word with the text ("kettle" under
                        "Kitchen Appliances")
    ExamplesRetriever   the labels of the most similar already-labelled texts, by either of the two
                        similarities: what a label means in this data, not what its name says

A retriever is built once per label set and answers whole columns: ``top(texts, k)`` gives, per
text, the indices of the ``k`` most similar labels, best first, ``-1`` past its last candidate.
``merge_candidates`` joins the answers of several retrievers into one list per row.

The embedding model is given as a local folder (or a Hugging Face id already in the local cache):
resolving an alias (``all-minilm-l6-v2``) is ``pipeline.models.resolve_model``'s, which sits in this
module's import layer and so is the caller's to call.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import numpy as np

from pipeline.contracts import PATH_SEP
from pipeline.errors import ConfigError, MissingDependencyError, ModelNotFoundError

_BATCH = 2048
"""Texts scored against every label at once: a dense batch x labels block (2048 x 10,000 float32
is 80 MB)."""
_BLOCK = _BATCH * 10_000
"""Scores held at once: a batch shrinks as the label set (or the examples) grow past 10,000, so a
100,000-label taxonomy takes the same memory as a 10,000-label one."""
_INSTALL = "pip install 'labelmill[taxonomy]'"
_Role = Literal["query", "document"]


class Retriever(Protocol):
    """What the shortlist asks of a retriever: candidates for a column of texts, and what decides
    them (part of the job's fingerprint, so a changed model or example set is a changed job)."""

    name: ClassVar[str]

    def top(self, texts: Sequence[str], k: int) -> np.ndarray:
        """int64 ``(len(texts), k)``: label indices, best first, ``-1`` past the last candidate."""
        ...

    def identity(self) -> dict:
        """JSON-serialisable: everything besides the label list that decides the candidates."""
        ...


def label_document(label: str) -> str:
    """The text a label is matched as: a taxonomy path reads as its words (``A > B > C`` reads
    ``A B C``), so the separator neither makes n-grams of its own nor tokens of an embedding."""
    return label.replace(PATH_SEP, " ")


class LexicalRetriever:
    """Cosine similarity of TF-IDF vectors over character 3- to 5-grams taken inside words
    (``char_wb``), lower-cased with accents folded. A taxonomy path is matched as its words
    (``A > B > C`` reads ``A B C``)."""

    name: ClassVar[str] = "lexical"

    def __init__(self, labels: Sequence[str], ngrams: tuple[int, int] = (3, 5)) -> None:
        self.labels = list(labels)
        self._ngrams = ngrams
        self._vectorizer = _tfidf(ngrams)
        # rows are L2-normalised, so a dot product is the cosine
        self._matrix = self._vectorizer.fit_transform([label_document(x) for x in self.labels]).T.tocsr()

    def identity(self) -> dict:
        return {"retriever": self.name, "ngrams": list(self._ngrams)}

    def top(self, texts: Sequence[str], k: int) -> np.ndarray:
        """Per text, the indices of the ``k`` most similar labels, most similar first (ties in the
        label set's order); every label is a candidate, so only ``k`` beyond the label set leaves
        ``-1`` in the last columns. Shape ``(len(texts), k)``."""
        found = np.empty((len(texts), k), dtype=np.int64)
        step = _rows_per_batch(len(self.labels))
        for start in range(0, len(texts), step):
            batch = list(texts[start : start + step])
            scores = (self._vectorizer.transform(batch) @ self._matrix).toarray()
            found[start : start + len(batch)] = _best(scores, k)
        return found


class EmbeddingRetriever:
    """Cosine similarity of sentence embeddings of the text and of each label's document.

    The label vectors are what costs: 10,000 taxonomy paths take tens of seconds on a CPU. They are
    computed once per label list and model and kept in ``cache_dir`` (``<digest>.npy``), so a rerun,
    or another job over the same taxonomy, encodes only its texts.
    """

    name: ClassVar[str] = "embeddings"

    def __init__(
        self,
        labels: Sequence[str],
        model: str | Path,
        cache_dir: Path,
        device: str | None = None,
        batch_size: int = 128,
    ) -> None:
        """``model``: a sentence-transformers folder (an alias resolved by the caller), or a Hugging
        Face id in the local cache. ``device``: None lets sentence-transformers choose (the GPU when
        there is one)."""
        self.labels = list(labels)
        self._encoder = _Encoder(model, device, batch_size)
        documents = [label_document(x) for x in self.labels]
        self._vectors = self._encoder.vectors(documents, "document", Path(cache_dir))

    @property
    def device(self) -> str:
        """Where the texts are encoded (``cpu``, ``cuda:0``): what ``device=None`` chose."""
        return self._encoder.device

    def identity(self) -> dict:
        return {"retriever": self.name, "model": self._encoder.fingerprint}

    def top(self, texts: Sequence[str], k: int) -> np.ndarray:
        """Per text, the indices of the ``k`` labels of the nearest embeddings, nearest first;
        ``-1`` only where ``k`` exceeds the label set. Shape ``(len(texts), k)``."""
        found = np.empty((len(texts), k), dtype=np.int64)
        step = _rows_per_batch(len(self.labels))
        for start in range(0, len(texts), step):
            batch = list(texts[start : start + step])
            scores = self._encoder.encode(batch, "query") @ self._vectors.T
            found[start : start + len(batch)] = _best(scores, k)
        return found


class ExamplesRetriever:
    """The labels of the ``neighbours`` labelled examples most similar to the text.

    Similarity is the lexical retriever's (TF-IDF of character n-grams, fitted on the example
    texts), or the cosine of sentence embeddings when ``model`` is given. A label scores the
    largest similarity among its neighbours (``aggregate="max"``), not their sum: on WANDS
    (bench/retrieval.py, 50 neighbours) the sum lost badly with embeddings (recall@1 0.16 against
    0.31, @5 0.39 against 0.49): MiniLM gives nearly every pair of texts a positive cosine (median
    0.15; a query's 50th nearest example still 0.21), so a label with many loosely similar examples
    outvotes the one whose example is nearly the text. With n-grams the sum won by 0.02 at K = 1 and
    0.01 at K = 5, and tied from K = 10. Only labels with a neighbour of
    positive similarity are candidates; a row with fewer than ``k`` of them is padded with ``-1``.
    """

    name: ClassVar[str] = "examples"

    def __init__(
        self,
        labels: Sequence[str],
        example_texts: Sequence[str],
        example_labels: Sequence[str],
        neighbours: int = 50,
        model: str | Path | None = None,
        cache_dir: Path | None = None,
        device: str | None = None,
        batch_size: int = 128,
        *,
        aggregate: Literal["max", "sum"] = "max",
    ) -> None:
        """Examples whose label is not in ``labels`` are left out and counted in ``dropped``
        (labels compare NFC-normalised, trimmed and case-insensitively, as the label set is
        unique); examples with a blank text are left out uncounted. ``cache_dir`` keeps the example
        vectors when ``model`` is given."""
        if len(example_texts) != len(example_labels):
            raise ValueError("example_texts and example_labels differ in length")
        if neighbours < 1:
            raise ValueError("neighbours must be at least 1")
        if aggregate not in ("max", "sum"):
            raise ValueError(f"aggregate must be 'max' or 'sum', not {aggregate!r}")
        self.labels = list(labels)
        index: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            index.setdefault(_label_key(label), i)
        texts, ids, self.dropped = [], [], 0
        for text, label in zip(example_texts, example_labels, strict=True):
            if not isinstance(text, str) or not text.strip():
                continue
            found = index.get(_label_key(label)) if isinstance(label, str) else None
            if found is None:
                self.dropped += 1
                continue
            texts.append(text)
            ids.append(found)
        if not texts:
            raise ConfigError(
                f"none of the examples' labels is in the label set ({self.dropped} examples, "
                f"{len(self.labels)} labels)",
                hint="write the examples' labels as the label list does (a taxonomy label is its "
                f"whole path, 'A{PATH_SEP}B{PATH_SEP}C')",
            )
        self.examples = len(texts)
        """Examples in use."""
        self.neighbours = neighbours
        self._aggregate = aggregate
        self._example_labels = np.asarray(ids, dtype=np.int64)
        self._digest = hashlib.sha256(
            json.dumps([[t, self.labels[i]] for t, i in zip(texts, ids, strict=True)]).encode()
        ).hexdigest()[:16]
        self._encoder = None if model is None else _Encoder(model, device, batch_size)
        if self._encoder is None:
            self._vectorizer = _tfidf((3, 5))
            self._matrix = self._vectorizer.fit_transform(texts).T.tocsr()
        else:
            cache = None if cache_dir is None else Path(cache_dir)
            self._vectors = self._encoder.vectors(texts, "query", cache)

    def identity(self) -> dict:
        similarity = {"ngrams": [3, 5]} if self._encoder is None else {"model": self._encoder.fingerprint}
        return {
            "retriever": self.name,
            "examples": self._digest,
            "neighbours": self.neighbours,
            "aggregate": self._aggregate,
            **similarity,
        }

    def top(self, texts: Sequence[str], k: int) -> np.ndarray:
        """Per text, up to ``k`` distinct labels of its nearest examples, best first (ties in the
        label set's order), ``-1`` after the last. Shape ``(len(texts), k)``."""
        found = np.empty((len(texts), k), dtype=np.int64)
        step = _rows_per_batch(max(len(self.labels), self.examples))
        for start in range(0, len(texts), step):
            batch = list(texts[start : start + step])
            if self._encoder is None:
                similar = (self._vectorizer.transform(batch) @ self._matrix).toarray()
            else:
                similar = self._encoder.encode(batch, "query") @ self._vectors.T
            found[start : start + len(batch)] = _best(self._label_scores(similar), k)
        return found

    def _label_scores(self, similar: np.ndarray) -> np.ndarray:
        """Rows x examples similarities -> rows x labels scores, ``-inf`` for a label with no
        neighbour of positive similarity (a shared nothing is no evidence)."""
        rows, examples = similar.shape
        n = min(self.neighbours, examples)
        near = np.argpartition(-similar, n - 1, axis=1)[:, :n] if n < examples else None
        near_sims = similar if near is None else np.take_along_axis(similar, near, axis=1)
        near_labels = self._example_labels[near] if near is not None else np.broadcast_to(
            self._example_labels, similar.shape
        )  # fmt: skip
        keep = near_sims > 0
        at = (np.broadcast_to(np.arange(rows)[:, None], keep.shape)[keep], near_labels[keep])
        scores = np.full((rows, len(self.labels)), -np.inf, dtype=np.float32)
        scores[at] = 0
        (np.add if self._aggregate == "sum" else np.maximum).at(scores, at, near_sims[keep])
        return scores


def merge_candidates(results: Sequence[np.ndarray]) -> list[list[int]]:
    """Per row, the candidates of several retrievers (their ``top`` answers, in the order given)
    as one list: every retriever's first, then every second, and so on, each label once (where it
    first appears), ``-1`` dropped. Retrievers may answer with different ``k``."""
    if not results:
        return []
    rows = {len(r) for r in results}
    if len(rows) != 1:
        raise ValueError(f"the retrievers answered different numbers of rows: {sorted(rows)}")
    width = max(r.shape[1] for r in results)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=-1) for r in results]
    # rank-major: [rank 1 of each retriever, rank 2 of each, ...]
    ranked = np.stack(padded, axis=2).reshape(len(results[0]), width * len(results)).astype(np.int64)
    # sorted by label, then position: a label's first appearance heads its run (-1 becomes 0, dropped)
    w = ranked.shape[1]
    label, position = np.divmod(np.sort((ranked + 1) * w + np.arange(w), axis=1), w)
    first = label > 0
    first[:, 1:] &= label[:, 1:] != label[:, :-1]
    keep = np.zeros(ranked.shape, dtype=bool)
    keep[np.nonzero(first)[0], position[first]] = True
    values = ranked[keep].tolist()
    ends = np.cumsum(keep.sum(axis=1)).tolist()
    starts = [0, *ends][: len(ends)]
    return [values[start:end] for start, end in zip(starts, ends, strict=True)]


def load_examples(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[str]]:
    """The (texts, labels) of a labelled-examples file: Parquet, CSV, TSV or JSON Lines, told by
    the suffix. Rows whose text or label is missing or blank are skipped; labels are trimmed.

    Errors name the file and the column, never the file's content (a job pointed at the wrong
    file must not copy it into a log).
    """
    import polars as pl

    path = Path(path)
    readers = {
        ".parquet": ("Parquet", pl.read_parquet),
        ".csv": ("CSV", lambda p: pl.read_csv(p, infer_schema=False)),
        ".tsv": ("TSV", lambda p: pl.read_csv(p, separator="\t", infer_schema=False, quote_char=None)),
        ".jsonl": ("JSON Lines", pl.read_ndjson),
        ".ndjson": ("JSON Lines", pl.read_ndjson),
    }
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise ConfigError(
            f"examples file {path}: unknown format '{suffix}'",
            hint="name it .parquet, .csv, .tsv, .jsonl or .ndjson",
        )
    if not path.is_file():
        raise ConfigError(f"examples file {path} does not exist")
    kind, read = readers[suffix]
    try:
        frame = read(path)
    except Exception as exc:  # polars raises a different error per format and fault
        problem = type(exc).__name__
        raise ConfigError(f"examples file {path} could not be read as {kind} ({problem})") from None
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in frame.columns:
            raise ConfigError(
                f"examples file {path} has no {role} column '{column}' (its columns: "
                f"{', '.join(frame.columns) or 'none'})",
                hint=f"set examples_{role}_column to one of them",
            )
    try:
        pairs = frame.select(pl.col(text_column).cast(pl.String), pl.col(label_column).cast(pl.String))
    except Exception:
        raise ConfigError(
            f"examples file {path}: columns '{text_column}' and '{label_column}' must hold text"
        ) from None
    texts, labels = [], []
    for text, label in pairs.iter_rows():
        if text is None or label is None or not text.strip() or not label.strip():
            continue
        texts.append(text)
        labels.append(label.strip())
    return texts, labels


class _Encoder:
    """A sentence-transformers model, and the vectors it has made before (on disk)."""

    def __init__(self, model: str | Path, device: str | None, batch_size: int) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MissingDependencyError(
                "the embeddings retriever (and examples by embeddings) needs sentence-transformers",
                hint=_INSTALL,
            ) from None
        self.folder = _model_folder(model)
        self.fingerprint = _folder_digest(self.folder)
        # local_files_only: labelmill never downloads weights (pipeline/models.py)
        self._model = SentenceTransformer(str(self.folder), device=device, local_files_only=True)
        self.device = str(self._model.device)
        self._batch_size = batch_size

    def encode(self, texts: list[str], role: _Role) -> np.ndarray:
        """L2-normalised float32 vectors, so a dot product is the cosine. ``role`` picks the
        model's own prompt where it has one (E5's ``query: ``/``passage: ``; MiniLM's are empty)."""
        prompts = getattr(self._model, "prompts", None) or {}
        vectors = self._model.encode(
            texts, prompt_name=role if role in prompts else None, batch_size=self._batch_size,
            normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False,
        )  # fmt: skip
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)

    def vectors(self, documents: list[str], role: _Role, cache: Path | None) -> np.ndarray:
        """``encode(documents)``, read from ``cache`` when an earlier run made it for the same
        documents, model and role, and written there (atomically) when not."""
        if cache is None:
            return self.encode(documents, role)
        key = json.dumps([1, self.fingerprint, role, documents], ensure_ascii=False)
        path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"
        try:
            kept = np.load(path, allow_pickle=False)
            if kept.dtype == np.float32 and kept.ndim == 2 and len(kept) == len(documents):
                return kept
        except (OSError, ValueError):  # absent, or not a vectors file: encode again
            pass
        vectors = self.encode(documents, role)
        _save_atomic(path, vectors)
        return vectors


Encoder = _Encoder
"""A sentence-transformers model that makes normalised vectors (the cascade's embeddings student)."""


def _model_folder(model: str | Path) -> Path:
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception:  # not an id, or not in the cache: said below
        pass
    raise ModelNotFoundError(
        f"embedding model '{model}' is neither a local folder nor a Hugging Face id in the local cache",
        hint="an alias is resolved by pipeline.models.resolve_model; fetch one with: labelmill models "
        "fetch all-minilm-l6-v2",
    )


_READ_WHOLE = {".json", ".txt", ".model", ".jinja"}


def model_digest(model: str | Path) -> str:
    """What identifies an embedding model's weights (a folder, or a Hugging Face id in the local
    cache): part of a job's fingerprint, so another model never reuses answers."""
    return _folder_digest(_model_folder(model))


def _folder_digest(folder: Path) -> str:
    """What identifies a model folder: every file's path and size, and the whole of its config and
    tokenizer files, subfolders included (a sentence-transformers folder keeps its pooling in
    ``1_Pooling/``, which changes every vector). ``pipeline.models.model_fingerprint`` reads the top
    level only (what vLLM loads); labelmill's own ``labelmill-model.json`` and hidden files (the
    Hub's ``.gitattributes``, ``.cache/``) say nothing about the weights and are left out."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.as_posix() == "labelmill-model.json" or any(x.startswith(".") for x in relative.parts):
            continue
        h.update(relative.as_posix().encode() + b"\0")
        size = path.stat().st_size
        h.update(path.read_bytes() if path.suffix in _READ_WHOLE and size < 1 << 24 else str(size).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Another job reading the file meanwhile sees the old one or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tfidf(ngrams: tuple[int, int]):
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError:
        raise MissingDependencyError(
            "TF-IDF similarity (the lexical and examples retrievers) needs scikit-learn", hint=_INSTALL
        ) from None
    return TfidfVectorizer(
        analyzer="char_wb", ngram_range=ngrams, lowercase=True, strip_accents="unicode",
        sublinear_tf=True, dtype=np.float32,
    )  # fmt: skip


def _label_key(label: object) -> str:
    return unicodedata.normalize("NFC", str(label)).strip().casefold()


def _rows_per_batch(columns: int) -> int:
    return max(1, min(_BATCH, _BLOCK // max(columns, 1)))


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the ``k`` highest scores, highest first, ties in column order;
    ``-1`` where the row has no more candidates (past the last column, or a ``-inf`` score)."""
    rows, columns = scores.shape
    found = np.full((rows, k), -1, dtype=np.int64)
    n = min(k, columns)
    if n == 0 or rows == 0:
        return found
    if n < columns:
        # the n best in any order, then those sorted: cheaper than sorting every label
        part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    else:
        part = np.tile(np.arange(columns), (rows, 1))
    chosen = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -chosen), axis=1)
    best = np.take_along_axis(part, order, axis=1)
    best[np.take_along_axis(chosen, order, axis=1) == -np.inf] = -1
    found[:, :n] = best
    return found
