"""Students: cheap classifiers trained on an LLM's own answers, and the threshold that says when
one may answer in the LLM's place (the cascade, ``pipeline/cascade.py``).

Two kinds, both scikit-learn's logistic regression over a text representation:

    tfidf        character n-grams (2-5, within words) weighted by TF-IDF: no model to load, trains
                 on 100,000 texts in about a minute on one core, and reads brand names, units and
                 misspellings that a word model splits badly
    embeddings   sentence vectors from a sentence-transformers model (``all-minilm-l6-v2`` by
                 default): texts that share meaning but no letters

A student's confidence is the probability logistic regression gives its answer (the largest of
``predict_proba``). Whether that number can be trusted is not assumed: ``choose_threshold`` measures
it on answers the student never trained on.

The guarantee (``choose_threshold``): among the rows whose confidence is at least the threshold,
the student agrees with the LLM at least ``target`` of the time, with probability at least
``1 - delta`` over the draw of the held-out sample. Each candidate threshold's agreement gets a
one-sided Clopper-Pearson lower bound (exact for a binomial count, no normal approximation, so it
holds at the 60-200 held-out texts a nightly sample affords); the thresholds are tested from the
strictest down in one fixed sequence, stopping at the first whose bound falls under the target.
Testing in a sequence fixed before the data is seen controls the chance of any false acceptance at
``delta`` without dividing it among the thresholds (fixed-sequence testing, as in Learn-then-Test,
Angelopoulos et al. 2021; BARGAIN, Zeighami et al. 2025, does the same with a betting-based bound
and adaptive sampling, which needs the LLM in the loop while the threshold is chosen; a fixed sample
labelled through the normal pipeline keeps the LLM's answers in the cache for everything else).
The grid is fixed (0.995 down to 0 in steps of 0.005); the sequence starts at the strictest grid
threshold that accepts at least ``min_accepted(target, delta)`` held-out texts, the fewest with which
even perfect agreement could clear the bound (59 for 0.95 and 0.05), and at least 30: a first test
on a handful of texts would end the sequence on one disagreement. The bound is on agreement per
distinct text drawn at random from the input the sample came from; a later night whose input differs
is covered only as far as it resembles that one, hence the retraining rule in the cascade.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import MissingDependencyError

StudentKind = Literal["tfidf", "embeddings"]
STUDENT_FILE = "student.joblib"
_INSTALL = "pip install 'labelmill[cascade]' (scikit-learn, sentence-transformers)"
_MAX_WEIGHTS = 25_000_000
"""Most weights (features x labels) a tfidf student keeps."""
FIRST_TEST = 30
"""Held-out texts the first threshold in the sequence accepts, at least (or ``min_accepted``
where that is more)."""
GRID = np.round(np.arange(199, -1, -1) * 0.005, 3)
"""Candidate thresholds, strictest first; fixed before any data is seen (see the module's text)."""


def clopper_pearson_lower(agreed: int, n: int, delta: float) -> float:
    """One-sided lower confidence bound at level ``1 - delta`` for a binomial proportion."""
    if n == 0 or agreed == 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(delta, agreed, n - agreed + 1))


def min_accepted(target: float, delta: float) -> int:
    """The fewest held-out texts whose perfect agreement clears ``target`` at ``delta``: below it
    no threshold can be certified, whatever the student does."""
    return math.ceil(math.log(delta) / math.log(target))


@dataclass
class Threshold:
    """The outcome of ``choose_threshold``: ``value`` None when no threshold meets the target
    (the student answers no row)."""

    value: float | None
    target: float
    delta: float
    held_out: int
    """Held-out texts the choice was made on."""
    accepted: int = 0
    """Of them, those at or above the threshold."""
    agreed: int = 0
    """Of those, the ones where the student's label is the LLM's."""
    bound: float | None = None
    """Clopper-Pearson lower bound on the agreement of accepted rows, at ``1 - delta``."""
    tested: int = 0
    """Thresholds tested in the sequence (each at the full ``delta``)."""
    why: str = ""

    @property
    def coverage(self) -> float:
        """Share of held-out texts the student would answer."""
        return self.accepted / self.held_out if self.held_out else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"coverage": round(self.coverage, 4)}


def choose_threshold(confidence: np.ndarray, agree: np.ndarray, target: float, delta: float) -> Threshold:
    """The lowest threshold of the fixed grid whose accepted held-out texts agree with the LLM at
    least ``target`` with probability at least ``1 - delta`` (fixed-sequence testing from the
    strictest threshold down, Clopper-Pearson at each)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    agree = np.asarray(agree, dtype=bool)
    held_out = len(confidence)
    need = min_accepted(target, delta)
    chosen = Threshold(None, target, delta, held_out)
    if held_out < need:
        chosen.why = (
            f"{held_out} held-out texts, and at least {need} are needed for any threshold to certify "
            f"agreement {target} at delta {delta}"
        )
        return chosen
    # a first test on a handful of texts fails on one disagreement and ends the sequence: it
    # starts where at least FIRST_TEST texts are accepted (or all there are), which depends on the
    # confidences only, never on agreement
    start = max(need, min(FIRST_TEST, held_out))
    for t in GRID:
        accepted = confidence >= t
        n = int(accepted.sum())
        if n < start:
            continue  # too few texts to test: the sequence starts further down
        agreed = int(agree[accepted].sum())
        bound = clopper_pearson_lower(agreed, n, delta)
        chosen.tested += 1
        if bound < target:
            if chosen.value is None:
                chosen.accepted, chosen.agreed, chosen.bound = n, agreed, bound
                chosen.why = (
                    f"at the strictest testable threshold ({t:.3f}) {agreed}/{n} held-out texts agree, "
                    f"a lower bound of {bound:.3f} under the target {target}"
                )
            break
        chosen.value, chosen.accepted, chosen.agreed, chosen.bound = float(t), n, agreed, bound
        chosen.why = ""
    return chosen


@dataclass
class Student:
    """A trained classifier: ``predict`` gives each text a label and a confidence."""

    kind: StudentKind
    estimator: object
    """scikit-learn: a TF-IDF + logistic regression pipeline, or logistic regression over vectors."""
    labels: list[str] = field(default_factory=list)
    embedding_model: str | None = None
    """The sentence-transformers folder the vectors come from (``embeddings`` only)."""
    _encoder: object = field(default=None, repr=False)

    @classmethod
    def train(
        cls,
        kind: StudentKind,
        texts: list[str],
        labels: list[str],
        *,
        embedding_model: str | None = None,
        seed: int = 0,
    ) -> Student:
        """Fit on ``texts`` and the LLM's ``labels``. One label only: a constant student (it
        answers that label with confidence 1; the threshold decides whether that is trusted)."""
        try:
            from sklearn.dummy import DummyClassifier
            from sklearn.feature_extraction.text import TfidfVectorizer
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
        except ImportError:
            raise MissingDependencyError("a cascade's student needs scikit-learn", hint=_INSTALL) from None
        student = cls(kind, None, sorted(set(labels)), embedding_model)
        if len(student.labels) < 2:
            head = DummyClassifier(strategy="most_frequent")
        else:
            # C=100: the classes a nightly sample sees are few per label; weaker regularisation lets
            # a handful of titles per label still give a confident answer
            head = LogisticRegression(C=100.0, max_iter=2000, random_state=seed)
        if kind == "tfidf":
            # logistic regression keeps a weight per feature and label: the vocabulary shrinks as
            # labels grow so the model stays under about 200 MB (10 labels: 200,000 n-grams;
            # 5,000 labels: 5,000)
            features = int(min(200_000, max(5_000, _MAX_WEIGHTS // max(len(student.labels), 1))))
            vectorizer = TfidfVectorizer(
                analyzer="char_wb", ngram_range=(2, 5), lowercase=True, sublinear_tf=True,
                min_df=1, max_features=features, dtype=np.float32,
            )  # fmt: skip
            estimator, features = make_pipeline(vectorizer, head), texts
        else:
            estimator, features = head, student._vectors(texts)
        with warnings.catch_warnings():
            # many labels with few answers each is the normal start of a cascade, not a mistake
            warnings.filterwarnings("ignore", message="The number of unique classes")
            student.estimator = estimator.fit(features, labels)
        return student

    def predict(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each text's label (object array of str) and confidence (float64, 0-1)."""
        if not texts:
            return np.empty(0, dtype=object), np.empty(0, dtype=np.float64)
        features = texts if self.kind == "tfidf" else self._vectors(texts)
        probs = self.estimator.predict_proba(features)
        best = probs.argmax(axis=1)
        classes = np.asarray(self.estimator.classes_, dtype=object)
        return classes[best], probs[np.arange(len(texts)), best].astype(np.float64)

    def _vectors(self, texts: list[str]) -> np.ndarray:
        if self._encoder is None:
            from pipeline.retrieval import Encoder

            self._encoder = Encoder(self.embedding_model, None, 64)
        return self._encoder.encode(list(texts), "query")

    def save(self, folder: Path, about: dict) -> None:
        """The estimator and ``about`` (its training and threshold) into ``folder``, written to a
        temporary folder first, so a reader sees a whole student or none."""
        import joblib
        import sklearn

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            joblib.dump(self.estimator, tmp / STUDENT_FILE)
            meta = {
                "kind": self.kind,
                "labels": self.labels,
                "embedding_model": self.embedding_model,
                "sklearn_version": sklearn.__version__,
                **about,
            }
            (tmp / "student.json").write_text(
                json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8"
            )
            os.replace(tmp, folder)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: Path) -> tuple[Student, dict] | None:
        """A saved student and its ``about``; None when the folder holds none, or one written by
        another scikit-learn (its pickled estimator may not load the same): it is trained again."""
        try:
            import joblib
            import sklearn

            meta = json.loads((folder / "student.json").read_text(encoding="utf-8"))
            if meta.get("sklearn_version") != sklearn.__version__:
                return None
            estimator = joblib.load(folder / STUDENT_FILE)
        except (OSError, ValueError, ImportError, EOFError):
            return None
        return cls(meta["kind"], estimator, meta["labels"], meta.get("embedding_model")), meta
