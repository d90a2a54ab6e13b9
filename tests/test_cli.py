"""The ``labelmill`` command: summaries, exit codes and error messages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import default_table

from pipeline import __version__
from pipeline.cli import main

_HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, sys
    fh = open(sys.argv[1], "a+")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def test_run_prints_summary_and_exits_0(cli: CliRunner, make_job) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    result = cli.invoke(main, ["run", "--quiet", str(job_files.path)])
    assert result.exit_code == 0, result.output
    assert "chunks  3/3" in result.output
    assert "rows    25/25 (ok 25, truncated 0, empty_input 0, invalid 0, error 0)" in result.output
    assert "now     25 rows labelled, 0 chunks resumed" in result.output
    assert f"output  {job_files.output}/parts/*.parquet" in result.output
    assert len(list((job_files.output / "parts").glob("part-*.parquet"))) == 3


def test_run_twice_reports_resume(cli: CliRunner, make_job) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    assert cli.invoke(main, ["run", "--quiet", str(job_files.path)]).exit_code == 0
    result = cli.invoke(main, ["run", "--quiet", str(job_files.path)])
    assert result.exit_code == 0, result.output
    assert "resuming: 3/3 chunks already done" in result.output
    assert "now     0 rows labelled, 3 chunks resumed" in result.output


def test_run_changed_job_exits_3_and_restart_works(cli: CliRunner, make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    assert cli.invoke(main, ["run", "--quiet", str(job_files.path)]).exit_code == 0
    job_files.rewrite(labels=["Kawa", "Herbata"])
    result = cli.invoke(main, ["run", "--quiet", str(job_files.path)])
    assert result.exit_code == 3
    assert "error:" in result.output and "labels" in result.output
    result = cli.invoke(main, ["run", "--quiet", "--restart", str(job_files.path)])
    assert result.exit_code == 0, result.output
    assert "chunks  3/3" in result.output


def test_status_of_finished_run(cli: CliRunner, make_job) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    assert cli.invoke(main, ["run", "--quiet", str(job_files.path)]).exit_code == 0
    result = cli.invoke(main, ["status", str(job_files.output)])
    assert result.exit_code == 0, result.output
    assert f"{job_files.output}: finished" in result.stdout
    assert "chunks  3/3" in result.stdout
    assert "rows    25/25" in result.stdout


def test_status_json(cli: CliRunner, make_job) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    assert cli.invoke(main, ["run", "--quiet", str(job_files.path)]).exit_code == 0
    result = cli.invoke(main, ["status", "--json", str(job_files.output)])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["state"] == "finished"
    assert status["complete"] is True
    assert status["chunks_done"] == status["chunks_total"] == 3
    assert status["rows_done"] == 25
    assert status["status_counts"]["ok"] == 25
    assert status["model"] == "fake"
    assert status["eta_seconds"] == 0


def test_status_of_stopped_run(cli: CliRunner, make_job) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    assert cli.invoke(main, ["run", "--quiet", str(job_files.path)]).exit_code == 0
    (job_files.output / "done" / "chunk-00002.json").unlink()
    result = cli.invoke(main, ["status", "--json", str(job_files.output)])
    status = json.loads(result.stdout)
    assert status["state"] == "stopped"
    assert status["complete"] is False
    assert status["chunks_done"] == 2
    assert status["rows_done"] == 20
    result = cli.invoke(main, ["status", str(job_files.output)])
    assert "stopped" in result.stdout
    assert "chunks  2/3" in result.stdout


def test_status_of_a_locked_run_is_running(cli: CliRunner, make_job) -> None:
    job_files = make_job(default_table(12), chunk_rows=5)
    assert cli.invoke(main, ["run", "--quiet", str(job_files.path)]).exit_code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(job_files.output / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (
            json.loads(cli.invoke(main, ["status", "--json", str(job_files.output)]).stdout)["state"]
            == "running"
        )
        result = cli.invoke(main, ["run", "--quiet", str(job_files.path)])
        assert result.exit_code == 3
        assert "in use by" in result.output
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert (
        json.loads(cli.invoke(main, ["status", "--json", str(job_files.output)]).stdout)["state"]
        == "finished"
    )


def test_run_with_row_errors_exits_6(cli: CliRunner, make_job, register_plugins) -> None:
    register_plugins(backends={"no-label": "doubles:NoLabelBackend"})  # every answer outside the labels
    job_files = make_job(default_table(4), backend="no-label")
    result = cli.invoke(main, ["run", "--quiet", str(job_files.path)])
    assert result.exit_code == 6, result.output
    assert "invalid 4" in result.output


def test_status_on_a_folder_that_is_not_a_run_exits_3(cli: CliRunner, tmp_path: Path) -> None:
    result = cli.invoke(main, ["status", str(tmp_path)])
    assert result.exit_code == 3
    assert "error:" in result.output
    assert "not a labelmill run folder" in result.output
    result = cli.invoke(main, ["status", str(tmp_path / "missing")])
    assert result.exit_code == 3


def test_validate_prints_three_prompts_and_ok(cli: CliRunner, make_job) -> None:
    job_files = make_job(default_table(25), chunk_rows=10)
    result = cli.invoke(main, ["validate", str(job_files.path)])
    assert result.exit_code == 0, result.output
    assert f"job {job_files.path}: ok" in result.output
    for n in (1, 2, 3):
        assert f"--- prompt {n} (" in result.stdout
    assert "--- prompt 4" not in result.stdout
    assert result.stdout.count("--- prompt ") == 3
    assert "product number 0 with a title" in result.stdout
    assert "1 file(s), 25 rows, 3 chunk(s)" in result.output
    assert "labels  4: Coffee, Tea, Vitamin, Shoes" in result.output
    # validate loads no model and writes no run folder
    assert not job_files.output.exists()


def test_validate_rows_option_and_empty_rows_skipped(cli: CliRunner, make_job) -> None:
    titles = [None, "  ", "first real title", "second real title"]
    data = pa.table({"id": pa.array(range(4), pa.int64()), "title": titles})
    job_files = make_job(data)
    result = cli.invoke(main, ["validate", "--rows", "5", str(job_files.path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("--- prompt ") == 2
    assert "first real title" in result.stdout


def test_bad_job_exits_2_naming_the_key(cli: CliRunner, make_job) -> None:
    job_files = make_job(chunk_row=100)
    for command in ("run", "validate"):
        result = cli.invoke(main, [command, str(job_files.path)])
        assert result.exit_code == 2, (command, result.output)
        assert "error:" in result.output
        assert "chunk_row" in result.output
        assert str(job_files.path) in result.output
        assert "Traceback" not in result.output


def test_bad_nested_key_exits_2(cli: CliRunner, make_job) -> None:
    job_files = make_job(engine={"dtyp": "float32"})
    result = cli.invoke(main, ["run", str(job_files.path)])
    assert result.exit_code == 2
    assert "engine.dtyp" in result.output


def test_bad_labels_exit_2(cli: CliRunner, make_job) -> None:
    job_files = make_job(labels=["Coffee", "coffee"])
    result = cli.invoke(main, ["validate", str(job_files.path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "duplicate" in result.output


def test_missing_input_exits_2(cli: CliRunner, make_job, tmp_path: Path) -> None:
    job_files = make_job(input=tmp_path / "nothing-here.parquet")
    result = cli.invoke(main, ["run", "--quiet", str(job_files.path)])
    assert result.exit_code == 2
    assert "no Parquet file" in result.output


def test_models_list(cli: CliRunner, labelmill_home: Path) -> None:
    result = cli.invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    smol = [ln for ln in lines if ln.startswith("smollm2-135m")]
    assert len(smol) == 1
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in smol[0]
    # LABELMILL_HOME is an empty folder here: nothing is fetched yet
    assert "fetchable" in smol[0]
    assert any(ln.startswith("bielik-11b") and "bring your own" in ln for ln in lines)


def test_models_list_shows_a_fetched_checkpoint(cli: CliRunner, labelmill_home: Path) -> None:
    folder = labelmill_home / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    result = cli.invoke(main, ["models", "list"])
    (smol,) = [ln for ln in result.stdout.splitlines() if ln.startswith("smollm2-135m")]
    assert "fetched" in smol and "fetchable" not in smol


def test_version(cli: CliRunner) -> None:
    result = cli.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_models_fetch_without_the_convert_packages_exits_7(
    cli: CliRunner, labelmill_home, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # what an install without the convert extra looks like
    result = cli.invoke(main, ["models", "fetch", "smollm2-135m"])
    assert result.exit_code == 7, result.output
    assert "gguf" in result.output and "labelmill[convert]" in result.output
    assert not (labelmill_home / "models").exists()  # stopped before downloading anything


def test_status_of_a_finished_run_with_error_rows_says_so(cli: CliRunner, make_job) -> None:
    from doubles import RecordingFake

    from pipeline.contracts import Completion
    from pipeline.runner import run_job

    job_files = make_job(default_table(25), chunk_rows=10)
    job = job_files.load()

    def fail_some(conversation, answer, request):  # the provider failed these rows for good
        return (
            Completion.failed("HTTP 503 after 5 retries")
            if conversation[-1]["content"].endswith("7 with a title")
            else answer
        )

    run_job(job, backend=RecordingFake(job, reply=fail_some))
    status = json.loads(cli.invoke(main, ["status", "--json", str(job_files.output)]).stdout)
    assert status["state"] == "finished_with_errors" and status["status_counts"]["error"] == 2
    text = cli.invoke(main, ["status", str(job_files.output)]).stdout
    assert "finished with 2 error row(s): rerun the job to retry them" in text
