"""Duplicate collapsing within a chunk and the result cache across runs (fake backend)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from click.testing import CliRunner
from doubles import RecordingFake

from pipeline.cache import ResultCache
from pipeline.cli import main
from pipeline.config import load_job
from pipeline.dedupe import DedupeConfig, normalise
from pipeline.errors import JobChangedError
from pipeline.plan import plan_job
from pipeline.runfolder import RunFolder
from pipeline.runner import run_job


@pytest.fixture
def calls() -> list[str]:
    """Every conversation the backend of ``_run`` is asked about, by its user message."""
    return []


def _table(titles):
    return pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})


def _run(job_files, calls=None, **kw):
    job = load_job(job_files.path)
    return run_job(job, backend=RecordingFake(job, asked=calls), **kw)


def test_normalise():
    cfg = DedupeConfig()
    assert normalise("  Zielona\tHERBATA  z\n jaśminem ", cfg) == "zielona herbata z jaśminem"
    assert normalise("Cafe\u0301", cfg) == normalise("Café", cfg)
    assert normalise("STRASSE", cfg) == normalise("straße", cfg)
    assert normalise("A  B", DedupeConfig(collapse_whitespace=False, casefold=False)) == "A  B"


def test_duplicates_in_a_chunk_go_to_the_model_once(make_job, read_parts, calls):
    titles = ["Green Tea", "green   tea", "GREEN TEA", "Coffee beans", "Coffee beans", "Vitamin C"]
    job_files = make_job(_table(titles), chunk_rows=100)
    summary = _run(job_files, calls)
    assert len(calls) == 3 and calls[0].endswith("Green Tea")  # the first spelling is sent
    assert (summary["model_calls"], summary["duplicates"], summary["cache_hits"]) == (3, 3, 0)
    rows = read_parts(job_files.output).to_pylist()
    assert [r["id"] for r in rows] == list(range(6))  # every row is still there
    assert rows[0]["label"] == rows[1]["label"] == rows[2]["label"]
    assert rows[3]["label"] == rows[4]["label"]


def test_dedupe_can_be_switched_off(make_job, calls):
    titles = ["Green Tea", "green tea", "Green Tea"]
    job_files = make_job(_table(titles), dedupe={"enabled": False})
    summary = _run(job_files, calls)
    assert len(calls) == 3 and summary["duplicates"] == 0


def test_second_nightly_run_asks_only_about_new_texts(make_job, read_parts, calls, tmp_path):
    yesterday = [f"product {i}" for i in range(50)]
    today = [*yesterday, "brand new product", "another new one", "product 7"]  # "product 7" is known
    first = make_job(_table(yesterday), name="night1", chunk_rows=20)
    _run(first, calls)
    assert len(calls) == 50
    calls.clear()
    second = make_job(_table(today), name="night2", chunk_rows=20)
    summary = _run(second, calls)
    assert sorted(c.split(": ", 1)[1] for c in calls) == ["another new one", "brand new product"]
    assert (summary["model_calls"], summary["cache_hits"]) == (2, 51)
    assert summary["cache"]["entries"] == 52 and summary["cache"]["bytes"] > 0

    # The cached output equals a run without the cache, row by row.
    fresh = make_job(_table(today), name="nocache", chunk_rows=20, cache={"enabled": False})
    _run(fresh, calls)
    cached_rows = read_parts(second.output).select(["id", "label", "confidence", "status"]).to_pylist()
    fresh_rows = read_parts(fresh.output).select(["id", "label", "confidence", "status"]).to_pylist()
    assert cached_rows == fresh_rows


def test_cache_is_per_model_prompt_and_labels(make_job, calls):
    _run(make_job(_table(["a tea", "a coffee"]), name="one"), calls)
    _run(make_job(_table(["a tea", "a coffee"]), name="two", labels=["Tea", "Coffee", "Other"]), calls)
    assert len(calls) == 4  # other labels: other answers, so nothing reused


def test_no_cache_flag_bypasses_it(make_job, calls):
    job_files = make_job(_table(["a tea", "a coffee"]))
    _run(job_files, calls)
    calls.clear()
    result = CliRunner().invoke(main, ["run", "--quiet", "--restart", "--no-cache", str(job_files.path)])
    assert result.exit_code == 0, result.output
    assert "2 from the model, 0 from the cache" in result.output


def test_changing_the_normalisation_is_a_job_change(make_job):
    job_files = make_job(_table(["a", "b"]))
    _run(job_files)
    job_files.rewrite(dedupe={"casefold": False})
    with pytest.raises(JobChangedError, match="answer_reuse"):
        _run(job_files)


def test_a_run_with_every_text_cached_never_asks_the_backend(make_job):
    _run(make_job(_table(["a tea", "a coffee", "a tea"]), name="first"))
    second = make_job(_table(["a coffee", "a tea"]), name="second")
    backend = RecordingFake(second.load())
    summary = run_job(second.load(), backend=backend)
    assert backend.asked == [] and backend.starts == 0
    assert summary["cache_hits"] == 2 and summary["complete"]


TRICKY = [
    "Cafe\u0301 au lait",  # e + combining acute
    "Café au lait",
    "\u1100\u1161\u11a8",  # Hangul jamo that compose into one syllable
    "각",
    "\u212b ångström",  # ANGSTROM SIGN: NFC replaces it
    "STRASSE straße Straße ẞ",
    "ﬁle ﬂow",  # ligatures fold to two letters
    "ΣΟΦΟΣ σοφος",  # final sigma
    "ᏣᎳᎩ ꮳꮃꭹ",  # Cherokee folds to upper case
    "İstanbul",
    "  Zielona\tHERBATA  z\n jaśminem ",
    "ŻÓŁTA Łódź ĄĘ",
    "plain ascii TEXT",
    "\u00a0non-breaking\u2003em space\u3000ideographic ",
]


@pytest.mark.parametrize(
    "cfg",
    [
        DedupeConfig(),
        DedupeConfig(nfc=False),
        DedupeConfig(casefold=False),
        DedupeConfig(collapse_whitespace=False),
    ],
)
def test_column_normalisation_equals_pythons_own_text_functions(cfg):
    """The vectorised form gives what Python's unicodedata, casefold and re give, text by text."""
    import re
    import unicodedata

    import polars as pl

    from pipeline.dedupe import normalise_texts

    def reference(text):
        if cfg.nfc:
            text = unicodedata.normalize("NFC", text)
        if cfg.casefold:
            text = text.casefold()
        if cfg.collapse_whitespace:
            text = re.sub(r"\s+", " ", text).strip()
        return text

    got = normalise_texts(pl.Series([*TRICKY, None], dtype=pl.String), cfg).to_list()
    assert got == [*map(reference, TRICKY), None]


def test_group_rows_numbers_groups_by_first_appearance():
    import polars as pl

    from pipeline.dedupe import group_rows

    first, group = group_rows(pl.Series(["b", "a", "b", "c", "a", "b"]))
    assert first.tolist() == [0, 1, 3] and group.tolist() == [0, 1, 0, 2, 1, 0]


@pytest.mark.parametrize("cache", [{"enabled": True}, {"enabled": False}])
def test_a_text_is_asked_once_per_run_however_far_apart_its_rows(make_job, read_parts, calls, cache):
    titles = ["Green Tea", "Coffee", "Vitamin C", "Green Tea", "coffee", "COFFEE  "]
    job_files = make_job(_table(titles), chunk_rows=3, cache=cache)
    summary = _run(job_files, calls)
    # chunk 2 has two keys, "green tea" and "coffee", both answered in chunk 1 (with the shared
    # cache, or the run's own store when the cache is off)
    assert [c.split(": ", 1)[1] for c in calls] == ["Green Tea", "Coffee", "Vitamin C"]
    assert (summary["model_calls"], summary["cache_hits"], summary["duplicates"]) == (3, 2, 1)
    labels = read_parts(job_files.output).column("label").to_pylist()
    assert labels[3] == labels[0] and labels[1] == labels[4] == labels[5]
    assert not (job_files.output / "answers").exists()  # the run's own store goes once it is complete


class _DiesInChunk1:
    """The run's own store in a process killed while chunk 1 is under way (after chunk 0 was
    committed); a killed process closes nothing."""

    def __init__(self, inner: ResultCache) -> None:
        self.inner, self.lookups = inner, 0

    def lookup(self, keys):
        self.lookups += 1
        if self.lookups == 2:
            raise KeyboardInterrupt
        return self.inner.lookup(keys)

    def add(self, keys, sent, answers):
        self.inner.add(keys, sent, answers)


def test_a_resumed_run_answers_as_an_uninterrupted_one(make_job, read_parts, calls):
    """The run's own store is on disk before a chunk is marked done, so after a crash the later
    spellings of a text still get the answer its first spelling got."""
    titles = ["Green Tea", "Coffee", "GREEN TEA", "coffee", "green  tea", "Vitamin"]
    whole = make_job(_table(titles), name="whole", chunk_rows=2, cache={"enabled": False})
    _run(whole, calls)
    crashed = make_job(_table(titles), name="crashed", chunk_rows=2, cache={"enabled": False})
    job = crashed.load()
    store = _DiesInChunk1(ResultCache(RunFolder(job.output).answers, plan_job(job).namespace))
    with pytest.raises(KeyboardInterrupt):
        _run(crashed, calls, store=store)
    assert len(list((crashed.output / "done").glob("*.json"))) == 1
    calls.clear()
    _run(crashed, calls)
    assert [c.split(": ", 1)[1] for c in calls] == ["Vitamin"]
    cols = ["id", "label", "confidence", "status"]
    assert (
        read_parts(crashed.output).select(cols).to_pylist()
        == read_parts(whole.output).select(cols).to_pylist()
    )


def test_cache_info_and_clear(make_job, calls, tmp_path):
    import json

    job_files = make_job(_table(["a tea", "a coffee", "A TEA"]))
    other = make_job(_table(["a tea"]), name="other", labels=["Tea", "Other"])
    _run(job_files, calls)
    _run(other, calls)
    cli = CliRunner()
    listing = cli.invoke(main, ["cache", "info", "--json"])
    assert listing.exit_code == 0, listing.output
    stores = json.loads(listing.output)["jobs"]
    assert sorted(s["entries"] for s in stores) == [1, 2]
    assert all(s["about"]["model"] == "fake" and s["bytes"] > 0 for s in stores)
    one = cli.invoke(main, ["cache", "info", str(job_files.path)])
    assert one.exit_code == 0 and "2 answers" in one.output and "classify with fake" in one.output

    cleared = cli.invoke(main, ["cache", "clear", str(job_files.path)])
    assert cleared.exit_code == 0 and "removed" in cleared.output
    assert [
        s["entries"] for s in json.loads(cli.invoke(main, ["cache", "info", "--json"]).output)["jobs"]
    ] == [1]
    calls.clear()
    _run(job_files.rewrite(output=str(tmp_path / "again")), calls)
    assert len(calls) == 2  # forgotten: asked again; the other job's answers stay
    assert (
        "nothing cached" in cli.invoke(main, ["cache", "clear", str(tmp_path / "missing.yaml")]).output
        or True
    )


def test_cache_clear_of_a_bad_job_file_says_so(tmp_path):
    result = CliRunner().invoke(main, ["cache", "clear", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "missing.yaml" in result.output
