"""bench/kill_trials.py: it runs end to end at a tiny size, and its checks catch a wrong output."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import polars as pl
import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "kill_trials.py"


@pytest.fixture(scope="module")
def kill_trials():
    spec = importlib.util.spec_from_file_location("kill_trials", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_trials"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("kill_trials", None)


def test_kill_trials_script_resumes_every_killed_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--trials", "3", "--rows", "2000", "--seed", "3",
         "--seconds-per-row", "0.001", "--json", "--keep", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kill trials: 3, failures: 0" in done.stderr
    assert sum(line.startswith("trial ") for line in done.stderr.splitlines()) == 3
    figures = json.loads(done.stdout)
    assert figures["trials"] == 3 and figures["failures"] == 0 and figures["failed"] == []
    assert figures["kills"] >= 3 and figures["rows"] == 2000 and figures["chunks"] == 40
    # every trial ran to completion in its own folder, the shared cache was used by trial 2
    for n in (1, 2, 3):
        assert (tmp_path / f"trial-{n:03d}" / "out" / "summary.json").exists()
    assert any((tmp_path / "shared-cache").rglob("seg-*.arrows"))


def _reference() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [10, 20, 30, 40],
            "label": ["Tea", "Coffee", None, "Tea"],
            "confidence": [0.5, 0.25, None, 0.75],
            "status": ["ok", "ok", "empty_input", "ok"],
            "error": [None, None, "empty text", None],
        }
    )


def test_compare_accepts_the_reference_itself(kill_trials):
    reference = _reference()
    assert (
        kill_trials.compare(reference, reference.sample(fraction=1.0, shuffle=True, seed=1), reference["id"])
        == []
    )


def _set(column: str, row_id: int, value):
    return lambda df: df.with_columns(
        pl.when(pl.col("id") == row_id).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)
    )


@pytest.mark.parametrize(
    ("alter", "expected"),
    [
        (_set("label", 20, "Tea"), "another label, e.g. id 20: 'Coffee' expected, 'Tea' found"),
        (_set("status", 30, "ok"), "another status"),
        (_set("label", 30, "Tea"), "another label, e.g. id 30: None expected"),
        (lambda df: df.with_columns(confidence=pl.col("confidence") * 1.01), "another confidence"),
        (lambda df: df.filter(pl.col("id") != 40), "1 id(s) missing, e.g. [40]"),
        (lambda df: pl.concat([df, df.filter(pl.col("id") == 10)]), "1 id(s) doubled, e.g. [10]"),
        (lambda df: df.with_columns(id=pl.col("id").replace(40, 41)), "not in the input"),
        (lambda df: df.drop("error"), "column(s) missing: error"),
    ],
    ids=["label", "status", "null-label", "confidence", "missing", "doubled", "unknown-id", "column"],
)
def test_compare_reports_an_altered_output(kill_trials, alter, expected):
    reference = _reference()
    problems = kill_trials.compare(reference, alter(reference), reference["id"])
    assert problems and any(expected in p for p in problems), problems


def test_leftover_tmp_finds_temporary_files_only(kill_trials, tmp_path):
    run, cache = tmp_path / "out", tmp_path / "cache"
    (run / "parts").mkdir(parents=True)
    (cache / "ns").mkdir(parents=True)
    for keep in (run / ".lock", run / "parts" / "part-00000.parquet", cache / "ns" / ".merge.lock"):
        keep.write_text("")
    assert kill_trials.leftover_tmp(run, cache, tmp_path / "absent") == []
    left = [run / "parts" / ".part-00001.parquet.tmp-4242", cache / "ns" / ".seg-1-2-merged.arrows.tmp"]
    for path in left:
        path.write_text("")
    assert kill_trials.leftover_tmp(run, cache) == sorted(str(p) for p in left)


def test_a_failed_trial_makes_the_script_fail(kill_trials, monkeypatch, capsys):
    reference = _reference()
    timing = kill_trials.Timing(first_chunk_s=0.5, total_s=1.0, chunks=4)
    monkeypatch.setattr(kill_trials, "make_input", lambda path, rows, seed: reference)
    monkeypatch.setattr(kill_trials, "measure_reference", lambda tmp, args: (reference, timing, timing, []))

    def trial(number, *args):
        problems = ["1 id(s) missing, e.g. [40]"] if number == 2 else []
        return kill_trials.Trial(number, "fresh", ["SIGKILL process random"], problems, seconds=float(number))

    monkeypatch.setattr(kill_trials, "run_trial", trial)
    assert kill_trials.main(["--trials", "3", "--rows", "4", "--json"]) == 1
    out = capsys.readouterr()
    assert "kill trials: 3, failures: 1, median 2.00 s per trial" in out.err
    assert "trial   2 [fresh cache] SIGKILL process random -> FAIL: 1 id(s) missing" in out.err
    figures = json.loads(out.out)
    assert figures["failures"] == 1 and [f["trial"] for f in figures["failed"]] == [2]
