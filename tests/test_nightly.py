"""Three nights of the documented nightly command on an export that grows, then stays the same."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT

from pipeline.cli import main
from pipeline.config import load_job
from pipeline.errors import JobFileError

NIGHTLY = REPO_ROOT / "jobs" / "keywords-nightly.yaml"


def _export(path: Path, rows: int, new: int = 0) -> None:
    """A keyword export: ``rows`` rows over a third as many keywords, plus ``new`` unseen ones."""
    keywords = [f"buty do biegania {i % (rows // 3)}" for i in range(rows)]
    keywords += [f"nowa fraza {i}" for i in range(new)]
    pq.write_table(pa.table({"id": list(range(len(keywords))), "keyword": keywords}), path)


def _night(tmp_path: Path, date: str, *extra: str):
    # The documented command; --set points the shipped job at this test's export and the fake
    # backend, as a user points it at theirs.
    args = ["run", str(NIGHTLY), "--quiet", "--date", date]
    args += ["--set", f"input={tmp_path / 'export.parquet'}", "--set", "backend=fake", "--set", "model=fake"]
    args += list(extra)
    return CliRunner().invoke(main, args)


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture
def nights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the job's output: is relative, as in the shipped file
    return tmp_path


def test_three_nights_through_the_documented_command(nights):
    export = nights / "export.parquet"
    _export(export, 300)
    first = _night(nights, "2026-12-01")
    assert first.exit_code == 0, first.output
    night1 = nights / "out" / "keywords-nightly" / "2026-12-01"
    assert _summary(night1)["model_calls"] == 100 and _summary(night1)["rows_done"] == 300
    parts1 = sorted(p.read_bytes() for p in (night1 / "parts").iterdir())

    _export(export, 300, new=10)  # the export grew by 10 new keywords
    second = _night(nights, "2026-12-02")
    assert second.exit_code == 0, second.output
    night2 = nights / "out" / "keywords-nightly" / "2026-12-02"
    s2 = _summary(night2)
    assert (s2["rows_done"], s2["model_calls"], s2["cache_hits"]) == (310, 10, 100)

    third = _night(nights, "2026-12-03")  # nothing changed: nothing reaches the model
    assert third.exit_code == 0, third.output
    s3 = _summary(nights / "out" / "keywords-nightly" / "2026-12-03")
    assert (s3["rows_done"], s3["model_calls"], s3["cache_hits"]) == (310, 0, 110)

    # the first night's folder is as it was; a rerun of a night resumes it and does nothing
    assert sorted(p.read_bytes() for p in (night1 / "parts").iterdir()) == parts1
    again = _night(nights, "2026-12-03")
    assert again.exit_code == 0
    assert (
        _summary(nights / "out" / "keywords-nightly" / "2026-12-03")["this_invocation"]["rows_labelled"] == 0
    )


def test_a_fixed_folder_follows_its_on_input_change_policy(nights):
    export = nights / "export.parquet"
    _export(export, 300)
    fixed = ["--set", f"output={nights / 'fixed'}"]
    assert _night(nights, "2026-12-01", *fixed).exit_code == 0
    _export(export, 300, new=10)
    refused = _night(nights, "2026-12-02", *fixed)
    assert refused.exit_code == 3
    assert "input differ" in refused.output and "{date}" in refused.output
    assert "on_input_change: restart" in refused.output
    restarted = _night(nights, "2026-12-02", *fixed, "--set", "on_input_change=restart")
    assert restarted.exit_code == 0, restarted.output
    s = _summary(nights / "fixed")
    assert (s["rows_done"], s["model_calls"], s["cache_hits"]) == (310, 10, 100)
    # any other change is refused whatever the policy
    relabelled = _night(
        nights, "2026-12-02", *fixed, "--set", "on_input_change=restart", "--set", "labels=[a, b]"
    )
    assert relabelled.exit_code == 3 and "labels, prompt differ" in relabelled.output


def test_set_reaches_into_sections_and_reads_yaml(tmp_path):
    job = load_job(
        NIGHTLY,
        sets=["chunk_rows=7", "cache.enabled=false", "engine.max_num_seqs=4", "labels=[x, y]"],
        date="2026-01-02",
    )
    assert job.chunk_rows == 7 and job.cache.enabled is False and job.task_settings.labels == ["x", "y"]
    assert job.output == "out/keywords-nightly/2026-01-02"
    assert job.backend_settings.max_num_seqs == 4
    with pytest.raises(JobFileError, match="key=value"):
        load_job(NIGHTLY, sets=["chunk_rows"])
    with pytest.raises(JobFileError, match="unknown key 'chunk_row'"):
        load_job(NIGHTLY, sets=["chunk_row=5"])
    with pytest.raises(JobFileError, match="YYYY-MM-DD"):
        load_job(NIGHTLY, date="3 Dec")
    with pytest.raises(JobFileError, match=r"unknown placeholder\(s\) \['day'\]"):
        load_job(NIGHTLY, sets=["output=out/{day}"])
    assert load_job(NIGHTLY, sets=["output=~/runs/{job}"]).output == str(
        Path.home() / "runs" / "keywords-nightly"
    )


def test_validate_shows_the_night_s_folder(nights):
    _export(nights / "export.parquet", 30)
    args = ["validate", str(NIGHTLY), "--date", "2026-12-24", "--set", f"input={nights / 'export.parquet'}"]
    result = CliRunner().invoke(main, [*args, "--set", "backend=fake", "--set", "model=fake"])
    assert result.exit_code == 0, result.output
    assert "output  out/keywords-nightly/2026-12-24" in result.output
