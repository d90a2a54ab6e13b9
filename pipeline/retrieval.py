"""Candidate labels for a row, before any model: the retrievers of a shortlist.

    LexicalRetriever   TF-IDF over character n-grams of the labels (scikit-learn): no model, works
                       for Polish, and for keywords typed without diacritics (accents are folded)

A retriever is built once per label set and answers whole columns: ``top(texts, k)`` gives, per
text, the indices of the ``k`` most similar labels, best first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.contracts import PATH_SEP
from pipeline.errors import MissingDependencyError

_BATCH = 2048
"""Texts scored against every label at once: a dense batch x labels block (2048 x 10,000 float32
is 80 MB)."""


class LexicalRetriever:
    """Cosine similarity of TF-IDF vectors over character 3- to 5-grams taken inside words
    (``char_wb``), lower-cased with accents folded. A taxonomy path is matched as its words
    (``A > B > C`` reads ``A B C``)."""

    def __init__(self, labels: Sequence[str], ngrams: tuple[int, int] = (3, 5)) -> None:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError:
            raise MissingDependencyError(
                "the lexical retriever needs scikit-learn", hint="pip install 'labelmill[taxonomy]'"
            ) from None
        self.labels = list(labels)
        self._vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=ngrams, lowercase=True, strip_accents="unicode",
            sublinear_tf=True, dtype=np.float32,
        )  # fmt: skip
        documents = [label.replace(PATH_SEP, " ") for label in self.labels]
        # rows are L2-normalised, so a dot product is the cosine
        self._matrix = self._vectorizer.fit_transform(documents).T.tocsr()

    def top(self, texts: Sequence[str], k: int) -> np.ndarray:
        """Per text, the indices of the ``k`` most similar labels, most similar first (ties in the
        label set's order); shape ``(len(texts), min(k, labels))``."""
        k = min(k, len(self.labels))
        found = np.empty((len(texts), k), dtype=np.int64)
        for start in range(0, len(texts), _BATCH):
            batch = list(texts[start : start + _BATCH])
            scores = (self._vectorizer.transform(batch) @ self._matrix).toarray()
            if k < scores.shape[1]:
                # the k best in any order, then those sorted: cheaper than sorting every label
                part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            else:
                part = np.tile(np.arange(scores.shape[1]), (len(batch), 1))
            chosen = np.take_along_axis(scores, part, axis=1)
            order = np.lexsort((part, -chosen), axis=1)
            found[start : start + len(batch)] = np.take_along_axis(part, order, axis=1)
        return found
