"""The lexical retriever (``pipeline/retrieval.py``): candidates by character n-grams, best first."""

from __future__ import annotations

import numpy as np
from conftest import TAXONOMY_PL

from pipeline.labels import load_labels
from pipeline.retrieval import LexicalRetriever

LABELS = [
    "Dom i ogród > Kuchnia > Czajniki",
    "Dom i ogród > Ogród > Konewki",
    "Zwierzęta > Żółwie",
    "Elektronika > Telefony komórkowe",
    "Żywność > Herbata",
]


def test_the_most_similar_labels_come_first():
    top = LexicalRetriever(LABELS).top(["czajnik elektryczny 1,7 l", "telefon komórkowy samsung"], 2)
    assert top.shape == (2, 2)
    assert LABELS[top[0][0]] == "Dom i ogród > Kuchnia > Czajniki"
    assert LABELS[top[1][0]] == "Elektronika > Telefony komórkowe"


def test_keywords_typed_without_diacritics_still_match():
    # search keywords are often typed without Polish letters: accents are folded on both sides
    top = LexicalRetriever(LABELS).top(["zolwie wodne", "herbata zielona"], 1)
    assert [LABELS[i] for i in top[:, 0]] == ["Zwierzęta > Żółwie", "Żywność > Herbata"]


def test_k_beyond_the_label_set_gives_every_label_once_in_a_stable_order():
    retriever = LexicalRetriever(LABELS)
    top = retriever.top(["konewka", "konewka"], 50)
    assert top.shape == (2, len(LABELS))
    assert sorted(top[0]) == list(range(len(LABELS)))
    assert np.array_equal(top[0], top[1])  # the same text, the same order (ties by label order)
    assert LABELS[top[0][0]] == "Dom i ogród > Ogród > Konewki"


def test_a_ten_thousand_category_taxonomy_in_batches():
    labels = load_labels(None, str(TAXONOMY_PL))
    retriever = LexicalRetriever(labels)
    texts = ["szampon do włosów", "wiertarka udarowa"] * 1500  # more than one batch
    top = retriever.top(texts, 20)
    assert top.shape == (3000, 20) and np.array_equal(top[0], top[2998])
    assert any("Włosy" in labels[i] or "włosów" in labels[i] for i in top[0][:5])
    assert any("Wiertarki" in labels[i] or "wiertar" in labels[i].lower() for i in top[1][:5])
