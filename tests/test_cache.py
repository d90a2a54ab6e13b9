"""The on-disk result cache on its own: lookups, crash safety, shared hashes, merging."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipeline import cache as cache_module
from pipeline.backends.base import ANSWER_SCHEMA, Completion, answers_table, table_completions
from pipeline.cache import ResultCache


def _answers(texts, error_at=()):
    return answers_table(
        [
            Completion("", None, 0, 0, None, error="HTTP 500")
            if i in error_at
            else Completion(f"label of {t}", -0.25 * (i + 1), 40 + i, 3, "stop", cached_tokens=i)
            for i, t in enumerate(texts)
        ]
    )


def _series(texts):
    return pl.Series(texts, dtype=pl.String)


def test_stored_answers_come_back_whole_and_in_order(tmp_path):
    cache = ResultCache(tmp_path, "ns")
    texts = ["zielona herbata", "kawa ziarnista", "buty do biegania"]
    cache.add(_series(texts), _answers(texts))
    hits, answers = cache.lookup(_series(["nowe", "buty do biegania", "zielona herbata"]))
    assert hits.tolist() == [1, 2]
    assert answers.schema == ANSWER_SCHEMA
    got = table_completions(answers)
    assert got[0] == Completion("label of buty do biegania", -0.75, 42, 3, "stop", cached_tokens=2)
    assert got[1].text == "label of zielona herbata" and got[1].error is None


def test_answers_outlive_the_process_and_failed_ones_are_not_kept(tmp_path):
    cache = ResultCache(tmp_path, "ns")
    cache.add(_series(["a", "b", "c"]), _answers(["a", "b", "c"], error_at={1}))
    cache.close()
    again = ResultCache(tmp_path, "ns")
    hits, _ = again.lookup(_series(["a", "b", "c"]))
    assert hits.tolist() == [0, 2] and len(again) == 2
    assert ResultCache(tmp_path, "other namespace").lookup(_series(["a"]))[0].tolist() == []


def test_texts_sharing_a_hash_are_told_apart_by_their_text(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "text_hashes", lambda texts: np.zeros(len(texts), dtype=np.uint64))
    cache = ResultCache(tmp_path, "ns")
    cache.add(_series(["a", "b"]), _answers(["a", "b"]))
    cache.add(_series(["c"]), _answers(["c"]))
    hits, answers = cache.lookup(_series(["c", "x", "a", "b"]))
    assert hits.tolist() == [0, 2, 3]
    assert answers.column("text").to_pylist() == ["label of c", "label of a", "label of b"]


def test_a_crash_keeps_what_was_written_and_ignores_half_files(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "_FLUSH_ROWS", 2)
    cache = ResultCache(tmp_path, "ns")
    cache.add(_series(["a", "b"]), _answers(["a", "b"]))  # reaches the flush size: written
    cache.add(_series(["c"]), _answers(["c"]))  # held in memory, then the process "dies"
    (tmp_path / "ns" / ".seg-99-1.arrow.tmp").write_bytes(b"ARROW1 half a file")
    (tmp_path / "ns" / "seg-99-1.arrow").write_bytes(b"not arrow at all")
    after = ResultCache(tmp_path, "ns")
    assert after.lookup(_series(["a", "b", "c"]))[0].tolist() == [0, 1]


def test_many_segments_are_merged_without_losing_an_answer(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "_FLUSH_ROWS", 1)
    monkeypatch.setattr(cache_module, "_MERGE_ABOVE", 3)
    cache = ResultCache(tmp_path, "ns")
    texts = [f"text {i}" for i in range(6)]
    for t in texts:
        cache.add(_series([t]), _answers([t]))
    assert len(list((tmp_path / "ns").glob("seg-*.arrow"))) == 6
    cache.close()
    assert len(list((tmp_path / "ns").glob("seg-*.arrow"))) == 1
    again = ResultCache(tmp_path, "ns")
    hits, answers = again.lookup(_series(texts[::-1]))
    assert hits.tolist() == list(range(6))
    assert answers.column("text").to_pylist() == [f"label of {t}" for t in texts[::-1]]
    assert again.stats()["entries"] == 6


def test_lookups_see_answers_added_in_the_same_run(tmp_path):
    cache = ResultCache(tmp_path, "ns")
    for n in range(5):
        batch = [f"row {n}-{i}" for i in range(100)]
        cache.add(_series(batch), _answers(batch))
    probe = [f"row {n}-{i}" for n in range(5) for i in (0, 99)] + ["row 9-9"]
    assert cache.lookup(_series(probe))[0].tolist() == list(range(10))


def test_an_unwritable_cache_says_how_to_go_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match="--no-cache"):
        ResultCache(blocker / "cache", "ns")


def test_answers_table_round_trip():
    completions = [
        Completion("Tea", -0.1, 10, 2, "stop"),
        Completion("", None, 0, 0, None, error="boom", retries=3),
    ]
    table = answers_table(completions)
    assert table.schema == ANSWER_SCHEMA and table_completions(table) == completions
    assert answers_table([]).num_rows == 0 and isinstance(answers_table([]), pa.Table)
