"""The retrievers of a shortlist (``pipeline/retrieval.py``): candidate labels per row, best first.

The embedding tests use the all-MiniLM-L6-v2 checkpoint of ``labelmill models fetch
all-minilm-l6-v2`` (90 MB); fetched once if it is not there, skipped with the reason if it can't be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import TAXONOMY_PL

from pipeline.errors import ConfigError, ModelNotFoundError
from pipeline.labels import load_labels
from pipeline.retrieval import (
    EmbeddingRetriever,
    ExamplesRetriever,
    LexicalRetriever,
    load_examples,
    merge_candidates,
)

# Read at import, before the autouse fixture points LABELMILL_HOME at an empty folder per test.

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


def test_k_beyond_the_label_set_gives_every_label_once_in_a_stable_order_then_minus_one():
    retriever = LexicalRetriever(LABELS)
    top = retriever.top(["konewka", "konewka"], 50)
    assert top.shape == (2, 50) and top.dtype == np.int64
    assert sorted(top[0][: len(LABELS)]) == list(range(len(LABELS)))
    assert (top[:, len(LABELS) :] == -1).all()  # every retriever answers exactly k columns
    assert np.array_equal(top[0], top[1])  # the same text, the same order (ties by label order)
    assert LABELS[top[0][0]] == "Dom i ogród > Ogród > Konewki"
    assert retriever.top([], 3).shape == (0, 3)


def test_a_ten_thousand_category_taxonomy_in_batches():
    labels = load_labels(None, str(TAXONOMY_PL))
    retriever = LexicalRetriever(labels)
    texts = ["szampon do włosów", "wiertarka udarowa"] * 1500  # more than one batch
    top = retriever.top(texts, 20)
    assert top.shape == (3000, 20) and np.array_equal(top[0], top[2998])
    assert any("Włosy" in labels[i] or "włosów" in labels[i] for i in top[0][:5])
    assert any("Wiertarki" in labels[i] or "wiertar" in labels[i].lower() for i in top[1][:5])


def test_identity_names_the_retriever_and_what_decides_its_candidates():
    assert LexicalRetriever(LABELS).identity() == {"retriever": "lexical", "ngrams": [3, 5]}
    assert LexicalRetriever(LABELS, ngrams=(2, 4)).identity()["ngrams"] == [2, 4]
    json.dumps(LexicalRetriever(LABELS).identity())


# --- merging --------------------------------------------------------------------------------------


def test_merge_interleaves_by_rank_keeps_the_first_of_a_repeat_and_drops_minus_one():
    lexical = np.array([[3, 1, 4], [0, 1, -1]])
    embeddings = np.array([[1, 5, 9], [-1, -1, -1]])
    examples = np.array([[2, 6], [1, 0]])  # another k: fewer columns
    assert merge_candidates([lexical, embeddings, examples]) == [
        [3, 1, 2, 5, 6, 4, 9],  # ranks 1: 3 1 2; ranks 2: 1 (seen) 5 6; ranks 3: 4 9
        [0, 1],
    ]
    assert merge_candidates([embeddings, lexical]) == [[1, 3, 5, 9, 4], [0, 1]]  # the order given
    assert merge_candidates([np.full((2, 4), -1)]) == [[], []]
    assert merge_candidates([]) == []
    assert merge_candidates([np.empty((0, 5), dtype=np.int64)]) == []
    with pytest.raises(ValueError, match="different numbers of rows"):
        merge_candidates([lexical, lexical[:1]])


# --- examples -------------------------------------------------------------------------------------

EXAMPLES = [
    ("iphone 13 mini 128gb", "Elektronika > Telefony komórkowe"),
    ("galaxy s21 ultra", "Elektronika > Telefony komórkowe"),
    ("sencha japońska 100 g", "Żywność > Herbata"),
    ("earl grey liściasta", "Żywność > Herbata"),
    ("tefal express 1.7", "Dom i ogród > Kuchnia > Czajniki"),
]


def test_examples_give_the_labels_of_the_most_similar_labelled_texts_first():
    texts, labels = zip(*EXAMPLES, strict=True)
    retriever = ExamplesRetriever(LABELS, texts, labels, neighbours=3)
    # none of these shares a word with its label's name: only the examples know
    top = retriever.top(["iphone 14 pro", "sencha zielona", "tefal czarny 1.7"], 2)
    assert top.shape == (3, 2)
    assert LABELS[top[0][0]] == "Elektronika > Telefony komórkowe"
    assert LABELS[top[1][0]] == "Żywność > Herbata"
    assert LABELS[top[2][0]] == "Dom i ogród > Kuchnia > Czajniki"
    assert retriever.dropped == 0 and retriever.examples == 5


def test_examples_pad_with_minus_one_past_the_labels_their_neighbours_carry():
    texts, labels = zip(*EXAMPLES, strict=True)
    top = ExamplesRetriever(LABELS, texts, labels, neighbours=50).top(["iphone 13", "xyzzy"], 4)
    assert top.shape == (2, 4)
    # "iphone 13" shares n-grams with the two phones only (one label); "xyzzy" with nothing
    assert LABELS[top[0][0]] == "Elektronika > Telefony komórkowe" and (top[0][1:] == -1).all()
    assert (top[1] == -1).all()


def test_examples_whose_label_is_not_in_the_set_are_dropped_and_counted():
    texts = ["iphone 13", "sencha", "kubek", "karma dla psa", "   "]
    labels = ["elektronika > telefony komórkowe ", "Żywność > Herbata", "Kubki", "Zwierzęta > Psy", "Kubki"]
    retriever = ExamplesRetriever(LABELS, texts, labels)
    # compared as the label set is unique: trimmed and case-insensitively; the blank text is no example
    assert retriever.dropped == 2 and retriever.examples == 2
    assert LABELS[retriever.top(["iphone 15"], 1)[0][0]] == "Elektronika > Telefony komórkowe"


def test_no_example_with_a_known_label_is_a_config_error_that_says_so():
    with pytest.raises(ConfigError, match="none of the examples' labels is in the label set") as info:
        ExamplesRetriever(LABELS, ["kubek", "miska"], ["Kubki", "Miski"])
    assert "2 examples" in str(info.value) and "whole path" in str(info.value.hint)


def test_examples_identity_follows_the_examples_and_the_settings():
    texts, labels = zip(*EXAMPLES, strict=True)
    base = ExamplesRetriever(LABELS, texts, labels).identity()
    assert base["retriever"] == "examples" and base["neighbours"] == 50 and base["aggregate"] == "max"
    assert ExamplesRetriever(LABELS, texts, labels).identity() == base
    assert ExamplesRetriever(LABELS, texts[:4], labels[:4]).identity()["examples"] != base["examples"]
    assert ExamplesRetriever(LABELS, texts, labels, neighbours=5).identity() != base
    json.dumps(base)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl"])
def test_load_examples_reads_each_format_and_skips_blank_rows(tmp_path: Path, suffix: str):
    frame = pl.DataFrame(
        {
            "query": ["iphone 13", "sencha, 100 g", None, "   ", "kubek"],
            "klasa": ["Elektronika > Telefony komórkowe", " Żywność > Herbata ", "Kubki", "Kubki", None],
            "other": [1, 2, 3, 4, 5],
        }
    )
    path = tmp_path / f"examples{suffix}"
    {
        ".parquet": frame.write_parquet,
        ".csv": frame.write_csv,
        ".tsv": lambda p: frame.write_csv(p, separator="\t"),
        ".jsonl": frame.write_ndjson,
    }[suffix](path)
    texts, labels = load_examples(path, text_column="query", label_column="klasa")
    assert texts == ["iphone 13", "sencha, 100 g"]
    assert labels == ["Elektronika > Telefony komórkowe", "Żywność > Herbata"]


def test_load_examples_errors_name_the_file_and_the_column(tmp_path: Path):
    path = tmp_path / "examples.parquet"
    pl.DataFrame({"query": ["a"], "query_class": ["b"]}).write_parquet(path)
    with pytest.raises(ConfigError) as info:
        load_examples(path)
    message = str(info.value)
    assert str(path) in message and "no text column 'text'" in message
    assert "query, query_class" in message and "examples_text_column" in message
    with pytest.raises(ConfigError, match="no label column 'label'"):
        load_examples(path, text_column="query")
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_examples(tmp_path / "missing.csv")
    assert str(tmp_path / "missing.csv") in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown format '\.xlsx'"):
        load_examples(tmp_path / "examples.xlsx")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match=f"{broken} could not be read as Parquet"):
        load_examples(broken)


def test_wands_examples_file_loads():
    texts, labels = load_examples(
        Path(__file__).resolve().parents[1] / "sample_data" / "wands" / "examples.parquet",
        text_column="query",
        label_column="query_class",
    )
    assert len(texts) == len(labels) == 174


# --- embeddings -----------------------------------------------------------------------------------

EN_LABELS = [
    "Home & Garden > Kitchen > Kettles",
    "Animals > Turtles",
    "Electronics > Mobile Phones",
    "Food > Tea",
    "Apparel > Shoes > Sneakers",
]


def _count_encodes(monkeypatch) -> list[int]:
    """Patch SentenceTransformer.encode to record how many texts each call encodes."""
    from sentence_transformers import SentenceTransformer

    calls: list[int] = []
    original = SentenceTransformer.encode

    def encode(self, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", encode)
    return calls


def test_embeddings_find_the_label_that_shares_no_word_with_the_text(minilm: Path, tmp_path: Path):
    retriever = EmbeddingRetriever(EN_LABELS, str(minilm), tmp_path / "vectors", device="cpu")
    top = retriever.top(["iphone 15 pro max", "tortoise", "green sencha", "stainless steel water boiler"], 2)
    assert top.shape == (4, 2) and top.dtype == np.int64
    assert [EN_LABELS[i] for i in top[:, 0]] == [
        "Electronics > Mobile Phones",
        "Animals > Turtles",
        "Food > Tea",
        "Home & Garden > Kitchen > Kettles",
    ]


def test_label_vectors_are_kept_on_disk_and_reused(minilm: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "vectors"
    calls = _count_encodes(monkeypatch)
    first = EmbeddingRetriever(EN_LABELS, minilm, cache, device="cpu")
    assert calls == [len(EN_LABELS)]
    (saved,) = cache.glob("*.npy")
    assert np.load(saved).shape == (len(EN_LABELS), 384)
    assert not list(cache.glob("*.tmp"))  # written through a temporary file, then renamed
    calls.clear()
    again = EmbeddingRetriever(EN_LABELS, minilm, cache, device="cpu")
    assert calls == []  # no label encoded: the vectors came from the file
    assert again.identity() == first.identity()
    assert np.array_equal(again.top(["tortoise"], 3), first.top(["tortoise"], 3))
    assert calls == [1, 1]  # only the texts
    EmbeddingRetriever(EN_LABELS[:3], minilm, cache, device="cpu")  # another label list: another file
    assert len(list(cache.glob("*.npy"))) == 2


def test_a_damaged_vectors_file_is_encoded_again(minilm: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "vectors"
    EmbeddingRetriever(EN_LABELS, minilm, cache, device="cpu")
    (saved,) = cache.glob("*.npy")
    saved.write_bytes(b"half a file")
    calls = _count_encodes(monkeypatch)
    retriever = EmbeddingRetriever(EN_LABELS, minilm, cache, device="cpu")
    assert calls == [len(EN_LABELS)] and np.load(saved).shape == (len(EN_LABELS), 384)
    assert EN_LABELS[retriever.top(["tortoise"], 1)[0][0]] == "Animals > Turtles"


def test_embeddings_pad_with_minus_one_when_k_exceeds_the_labels(minilm: Path, tmp_path: Path):
    top = EmbeddingRetriever(EN_LABELS, minilm, tmp_path, device="cpu").top(["tea", "tea"], 8)
    assert top.shape == (2, 8)
    assert sorted(top[0][:5]) == list(range(5)) and (top[:, 5:] == -1).all()
    assert np.array_equal(top[0], top[1])


def test_embeddings_identity_changes_with_the_model(minilm: Path, tmp_path: Path):
    # the same weights with another pooling (kept in a subfolder) are another model
    other = tmp_path / "minilm-cls"
    for path in minilm.rglob("*"):
        if path.is_file():
            (other / path.relative_to(minilm)).parent.mkdir(parents=True, exist_ok=True)
            (other / path.relative_to(minilm)).symlink_to(path)
    pooling = other / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    pooling.unlink()
    pooling.write_text(
        json.dumps({**config, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True})
    )
    cache = tmp_path / "vectors"
    mean = EmbeddingRetriever(EN_LABELS, minilm, cache, device="cpu")
    cls = EmbeddingRetriever(EN_LABELS, other, cache, device="cpu")
    assert mean.identity()["retriever"] == cls.identity()["retriever"] == "embeddings"
    assert mean.identity()["model"] != cls.identity()["model"]
    assert len(list(cache.glob("*.npy"))) == 2  # and its label vectors are its own
    json.dumps(mean.identity())


def test_embeddings_refuse_a_model_that_is_not_a_folder_naming_it(tmp_path: Path):
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    with pytest.raises(ModelNotFoundError, match="'all-minilm-l6-v2' is neither a local folder") as info:
        EmbeddingRetriever(EN_LABELS, "all-minilm-l6-v2", tmp_path)  # an alias: resolved by the caller
    assert "labelmill models fetch" in str(info.value.hint)


def test_examples_by_embeddings(minilm: Path, tmp_path: Path, monkeypatch):
    texts = ["iphone 13 mini", "box turtle", "matcha powder", "air jordan 1"]
    labels = ["Electronics > Mobile Phones", "Animals > Turtles", "Food > Tea", "Apparel > Shoes > Sneakers"]
    retriever = ExamplesRetriever(EN_LABELS, texts, labels, model=minilm, cache_dir=tmp_path, device="cpu")
    top = retriever.top(["samsung galaxy", "tortoise", "oolong", "running trainers"], 1)
    assert [EN_LABELS[i] for i in top[:, 0]] == labels
    identity = retriever.identity()
    assert (
        identity["model"] == EmbeddingRetriever(EN_LABELS, minilm, tmp_path, device="cpu").identity()["model"]
    )
    calls = _count_encodes(monkeypatch)
    ExamplesRetriever(EN_LABELS, texts, labels, model=minilm, cache_dir=tmp_path, device="cpu")
    assert calls == []  # the example vectors are kept like the label vectors
    assert identity != ExamplesRetriever(EN_LABELS, texts, labels).identity()
