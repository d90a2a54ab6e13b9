"""The on-disk answer store on its own: lookups, crash safety, shared hashes, merging."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipeline.cache import ResultCache
from pipeline.contracts import ANSWER_SCHEMA, Completion, answers_table, table_completions


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
    cache.add(_series(texts), _series(texts), _answers(texts))
    hits, answers = cache.lookup(_series(["nowe", "buty do biegania", "zielona herbata"]))
    assert hits.tolist() == [1, 2]
    assert answers.schema == ANSWER_SCHEMA
    got = table_completions(answers)
    assert got[0] == Completion("label of buty do biegania", -0.75, 42, 3, "stop", cached_tokens=2)
    assert got[1].text == "label of zielona herbata" and got[1].error is None


def test_answers_outlive_the_process_and_failed_ones_are_not_kept(tmp_path):
    cache = ResultCache(tmp_path, "ns")
    cache.add(_series(["a", "b", "c"]), _series(["a", "b", "c"]), _answers(["a", "b", "c"], error_at={1}))
    cache.close()
    again = ResultCache(tmp_path, "ns")
    hits, _ = again.lookup(_series(["a", "b", "c"]))
    assert hits.tolist() == [0, 2] and len(again) == 2
    assert ResultCache(tmp_path, "other namespace").lookup(_series(["a"]))[0].tolist() == []


def test_texts_sharing_a_hash_are_told_apart_by_their_text(tmp_path):
    cache = ResultCache(tmp_path, "ns", key_hash=lambda texts: np.zeros(len(texts), dtype=np.uint64))
    cache.add(_series(["a", "b"]), _series(["a", "b"]), _answers(["a", "b"]))
    cache.add(_series(["c"]), _series(["c"]), _answers(["c"]))
    hits, answers = cache.lookup(_series(["c", "x", "a", "b"]))
    assert hits.tolist() == [0, 2, 3]
    assert answers.column("text").to_pylist() == ["label of c", "label of a", "label of b"]


def test_a_crash_keeps_every_added_answer_and_ignores_half_written_batches(tmp_path):
    cache = ResultCache(tmp_path, "ns")
    cache.add(_series(["a", "b"]), _series(["A", "b"]), _answers(["a", "b"]))
    cache.add(_series(["c"]), _series(["c"]), _answers(["c"]))
    # the process dies here, without close(); a crash also cut off a later batch half way
    (path,) = (tmp_path / "ns").glob("seg-*.arrows")
    whole = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(whole[len(whole) // 2 :][:300])
    (tmp_path / "ns" / "seg-99-1.arrows").write_bytes(b"not arrow at all")
    after = ResultCache(tmp_path, "ns")
    hits, answers = after.lookup(_series(["a", "b", "c", "d"]))
    assert hits.tolist() == [0, 1, 2] and len(after) == 3
    assert answers.column("text").to_pylist() == ["label of a", "label of b", "label of c"]


def test_files_are_closed_and_mapped_as_they_fill(tmp_path):
    cache = ResultCache(tmp_path, "ns", file_rows=2)
    for batch in (["a", "b"], ["c"], ["d", "e"]):
        cache.add(_series(batch), _series(batch), _answers(batch))
    assert len(list((tmp_path / "ns").glob("seg-*.arrows"))) == 2  # [a b] and [c][d e]
    assert all(m is not None for m in cache._mappings)  # read from the files, not held in memory
    hits, answers = cache.lookup(_series(["e", "a", "c"]))
    assert hits.tolist() == [0, 1, 2]
    assert answers.column("text").to_pylist() == ["label of e", "label of a", "label of c"]
    assert len(ResultCache(tmp_path, "ns")) == 5


def test_a_merge_leaves_a_file_that_is_being_written_alone(tmp_path):
    writer = ResultCache(tmp_path, "ns", file_rows=100, merge_above=2)
    writer.add(_series(["still open"]), _series(["still open"]), _answers(["still open"]))  # holds its file
    other = ResultCache(tmp_path, "ns", file_rows=1, merge_above=2)
    for t in ("x", "y", "z"):
        other.add(_series([t]), _series([t]), _answers([t]))
    other.close()
    files = list((tmp_path / "ns").glob("seg-*.arrows"))
    assert len(files) == 2 and sum("merged" in f.name for f in files) == 1
    writer.add(_series(["later"]), _series(["later"]), _answers(["later"]))
    writer.close()
    assert ResultCache(tmp_path, "ns").lookup(_series(["x", "y", "z", "still open", "later"]))[
        0
    ].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_many_files_are_merged_without_losing_an_answer(tmp_path):
    cache = ResultCache(tmp_path, "ns", file_rows=1, merge_above=3)
    texts = [f"text {i}" for i in range(6)]
    for t in texts:
        cache.add(_series([t]), _series([t]), _answers([t]))
    assert len(list((tmp_path / "ns").glob("seg-*.arrows"))) == 6
    cache.close()
    assert len(list((tmp_path / "ns").glob("seg-*.arrows"))) == 1
    again = ResultCache(tmp_path, "ns")
    hits, answers = again.lookup(_series(texts[::-1]))
    assert hits.tolist() == list(range(6))
    assert answers.column("text").to_pylist() == [f"label of {t}" for t in texts[::-1]]
    assert again.stats()["entries"] == 6


def test_lookups_see_answers_added_in_the_same_run(tmp_path):
    cache = ResultCache(tmp_path, "ns")
    for n in range(5):
        batch = [f"row {n}-{i}" for i in range(100)]
        cache.add(_series(batch), _series(batch), _answers(batch))
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


def test_a_store_that_keeps_answers_for_later_runs_only(tmp_path):
    ResultCache(tmp_path, "ns").add(_series(["old"]), _series(["old"]), _answers(["old"]))
    store = ResultCache(tmp_path, "ns", within_run=False)
    store.add(_series(["new"]), _series(["new"]), _answers(["new"]))
    assert store.lookup(_series(["old", "new"]))[0].tolist() == [0]  # this run's answers: not offered
    store.close()
    assert ResultCache(tmp_path, "ns").lookup(_series(["old", "new"]))[0].tolist() == [0, 1]
