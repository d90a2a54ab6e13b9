"""State labelmill can trust: damaged run folders and caches, changed settings, a cache cleared or
merged under a run. Never exit 0 with other output than an undamaged run's; never a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, default_table
from fault_server import FaultServer

from pipeline.cache import ResultCache, merge, read_file, repair, verify_store
from pipeline.cli import main
from pipeline.contracts import ALTERNATIVES_TYPE, ANSWER_SCHEMA
from pipeline.errors import JobChangedError, RunStateError, StoreBusyError
from pipeline.plan import plan_job
from pipeline.runfolder import RunFolder
from pipeline.runner import run_job

DRIVER = Path(__file__).with_name("corruption.py")


def _trials(tmp_path: Path, kind: str, trials: int) -> list[dict]:
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(tmp_path / kind), kind, "--trials", str(trials), "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    # a negative return code is a signal (a crash in native code): the last line names the trial
    assert done.returncode == 0, (done.returncode, lines[-3:], done.stderr[-2000:])
    assert lines[-1]["failures"] == 0
    return lines[:-1]


def test_bit_flips_in_the_cache_never_change_the_output(tmp_path):
    results = _trials(tmp_path, "cache", 60)
    assert len(results) == 60
    assert {r["outcome"] for r in results} == {"equal"}
    # the checks really run: nearly every flip is seen (the rest land in padding, where they
    # change nothing a reader uses)
    assert sum(r["detected_by_verify"] for r in results) >= 50


def test_damaged_parts_markers_and_manifests_are_redone_or_refused(tmp_path):
    results = _trials(tmp_path, "parts", 10)
    by_damage = {r["damage"]: r["outcome"] for r in results}
    assert by_damage["run.json deleted and the labels changed"] == "named_error"
    for damage in (
        "part copied over another",
        "part truncated to 0 bytes",
        "marker cut short",
        "run.json deleted",
    ):
        assert by_damage[damage] == "equal"


def _answers(texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.table(
        {
            "text": texts,
            "logprob": [-0.1] * n,
            "prompt_tokens": [10] * n,
            "output_tokens": [1] * n,
            "finish_reason": ["stop"] * n,
            "cached_tokens": pa.nulls(n, pa.int32()),
            "error": pa.nulls(n, pa.string()),
            "retries": [0] * n,
            "alternatives": pa.nulls(n, ALTERNATIVES_TYPE),
            "choices": pa.nulls(n, pa.list_(pa.string())),
            "levels": pa.nulls(n, ALTERNATIVES_TYPE),
        },
        schema=ANSWER_SCHEMA,
    )


def _add(store: ResultCache, texts: list[str]) -> None:
    series = pl.Series(texts)
    store.add(series, series, _answers([t.upper() for t in texts]))


def test_verify_names_a_damaged_batch_and_repair_removes_it(tmp_path):
    store = ResultCache(tmp_path, "ns")
    for n in range(4):
        _add(store, [f"text {n} {i}" for i in range(50)])
    store.close()
    (path,) = (tmp_path / "ns").glob("seg-*.arrows")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the second or third batch's buffers
    path.write_bytes(bytes(data))

    result = CliRunner().invoke(main, ["cache", "verify", "--path", str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert "checksum mismatch" in result.output and "cache repair" in result.output
    reopened = ResultCache(tmp_path, "ns")
    assert len(reopened) == 150 and reopened.problems  # the damaged batch is skipped, and said
    hits, answers = reopened.lookup(pl.Series([f"text {n} 3" for n in range(4)]))
    assert answers.column("text").to_pylist() == [f"TEXT {n} 3" for n in hits]  # never a wrong one
    reopened.close()

    result = CliRunner().invoke(main, ["cache", "repair", "--path", str(tmp_path)])
    assert result.exit_code == 0 and "1 damaged batch(es)" in result.output, result.output
    assert CliRunner().invoke(main, ["cache", "verify", "--path", str(tmp_path)]).exit_code == 0
    assert len(ResultCache(tmp_path, "ns")) == 150


def test_merges_keep_one_answer_per_text(tmp_path):
    for _ in range(3):  # three runs answered the same texts
        store = ResultCache(tmp_path, "ns", merge_above=100)
        _add(store, ["a", "b", "c"])
        store.close()
    files = sorted((tmp_path / "ns").glob("seg-*.arrows"))
    assert len(files) == 3
    assert verify_store(tmp_path)[-1]["duplicate_entries"] == 6
    done = merge(tmp_path / "ns", files, 1000)
    assert done["duplicates_dropped"] == 6 and done["entries_kept"] == 3
    assert len(ResultCache(tmp_path, "ns")) == 3


def test_a_merge_killed_midway_leaves_nothing_behind(tmp_path):
    for n in range(6):
        store = ResultCache(tmp_path, "ns", merge_above=100)
        _add(store, [f"text {n} {i} " + "x" * 200 for i in range(20_000)])
        store.close()
    before = len(ResultCache(tmp_path, "ns"))
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        import pipeline.cache as cache
        folder = Path({str(tmp_path / "ns")!r})
        real = cache._write_sealed
        def slow(writer, batch):  # a merge that takes long enough to be killed in the middle
            real(writer, batch)
            print("writing", flush=True)
            time.sleep(30)
        cache._write_sealed = slow
        cache.merge(folder, sorted(folder.glob("seg-*.arrows")), 5000)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert proc.stdout.readline().strip() == "writing"
    hidden = [p for p in (tmp_path / "ns").iterdir() if p.name.startswith(".seg-")]
    assert hidden  # the merge's file, half written
    proc.kill()
    proc.wait()
    after = ResultCache(tmp_path, "ns")  # the next process to open the store cleans up
    assert len(after) == before
    assert not [p for p in (tmp_path / "ns").iterdir() if ".tmp-" in p.name]
    assert not verify_store(tmp_path)[-1]["leftover_files"]


def test_a_file_being_created_is_never_merged_away(tmp_path):
    writer = ResultCache(tmp_path, "ns", merge_above=1)
    _add(writer, ["kept"])  # its file is open: created hidden, locked, then named
    for _ in range(2):
        other = ResultCache(tmp_path, "ns", merge_above=1)
        _add(other, ["x"])
        other.close()  # merges everything nobody holds
    _add(writer, ["kept too"])
    writer.close()
    hits, _ = ResultCache(tmp_path, "ns").lookup(pl.Series(["kept", "kept too", "x"]))
    assert hits.tolist() == [0, 1, 2]


def test_cache_clear_is_refused_while_a_run_has_the_answers_open(make_job, tmp_path):
    job_files = make_job(default_table(10))
    plan = plan_job(job_files.load())
    from pipeline.plan import cache_root

    store = ResultCache(cache_root(plan.job), plan.namespace)  # what a running job holds
    result = CliRunner().invoke(main, ["cache", "clear", str(job_files.path)])
    assert result.exit_code == StoreBusyError.exit_code, result.output
    assert "in use by a running job" in result.output
    store.close()
    result = CliRunner().invoke(main, ["cache", "clear", str(job_files.path)])
    assert result.exit_code == 0 and "removed" in result.output


def test_a_cache_cleared_between_two_invocations_is_refused(make_job):
    job_files = make_job(default_table(30), chunk_rows=10)
    job = job_files.load()
    run_job(job)
    folder = RunFolder(job_files.output)
    folder.marker_path(2).unlink()  # one chunk still to do
    assert CliRunner().invoke(main, ["cache", "clear", str(job_files.path)]).exit_code == 0
    with pytest.raises(RunStateError, match="cleared or replaced") as info:
        run_job(job)
    assert "--restart" in info.value.hint
    assert run_job(job, restart=True)["complete"]


@pytest.mark.parametrize(
    "change, named",
    [
        ({"cache": {"enabled": False}}, "answer_reuse"),
        ({"dedupe": {"enabled": False}}, "answer_reuse"),
        ({"dedupe": {"casefold": False}}, "answer_reuse"),
        ({"cache": {"path": "elsewhere"}}, "answer_reuse"),
    ],
)
def test_resuming_with_another_cache_or_dedupe_setting_is_refused(make_job, change, named, tmp_path):
    if change.get("cache", {}).get("path"):
        change = {"cache": {"path": str(tmp_path / "elsewhere")}}
    job_files = make_job(default_table(30), chunk_rows=10)
    run_job(job_files.load())
    RunFolder(job_files.output).marker_path(2).unlink()
    job_files.rewrite(**change)
    with pytest.raises(JobChangedError, match=named):
        run_job(job_files.load())


@pytest.fixture
def server():
    with FaultServer("k") as srv:
        srv.down = False
        yield srv


@pytest.mark.parametrize(
    "change",
    [
        {"constraint": "json_schema"},
        {"constraint": "none"},
        {"logprobs": False},
        {"extra_body": {"top_k": 5}},
        {"max_model_len": 4096},
        {"base_url": "other"},
    ],
)
def test_resuming_with_another_api_setting_is_refused(make_job, server, monkeypatch, change):
    monkeypatch.setenv("LM_TEST_KEY", "k")
    api = {"base_url": f"http://127.0.0.1:{server.server_port}/v1", "api_key_env": "LM_TEST_KEY"}
    job_files = make_job(default_table(20), chunk_rows=10, backend="openai", model="m", api=api)
    run_job(job_files.load())
    RunFolder(job_files.output).marker_path(1).unlink()
    if change.get("base_url"):
        change = {"base_url": f"http://localhost:{server.server_port}/v1"}
    job_files.rewrite(api={**api, **change})
    with pytest.raises(JobChangedError, match="api differ"):
        run_job(job_files.load())
    # settings that can't change an answer are no change
    job_files.rewrite(api={**api, "max_concurrency": 3, "timeout_s": 9})
    assert run_job(job_files.load())["complete"]


def test_an_answer_cached_under_one_api_setting_is_not_served_under_another(make_job, server, monkeypatch):
    monkeypatch.setenv("LM_TEST_KEY", "k")
    api = {"base_url": f"http://127.0.0.1:{server.server_port}/v1", "api_key_env": "LM_TEST_KEY"}
    first = make_job(default_table(6), backend="openai", model="m", api=api)
    run_job(first.load())
    second = make_job(default_table(6), backend="openai", model="m", api={**api, "constraint": "none"})
    summary = run_job(second.load())
    assert summary["cache_hits"] == 0 and summary["model_calls"] == 6


def test_stale_parts_of_another_plan_are_removed(make_job, read_parts):
    job_files = make_job(default_table(40), chunk_rows=10)
    run_job(job_files.load())
    job_files.rewrite(input=str(job_files.input.with_name("small.parquet")))
    pq.write_table(default_table(15), job_files.input.with_name("small.parquet"))
    run_job(job_files.load(), restart=True)
    assert len(read_parts(job_files.output)) == 15
    # a part left without a marker by a crash, and one from a longer plan, are not output
    folder = RunFolder(job_files.output)
    (folder.parts / "part-00007.parquet").write_bytes(folder.part_path(0).read_bytes())
    folder.marker_path(1).unlink()
    run_job(job_files.load())
    assert sorted(p.name for p in folder.parts.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(read_parts(job_files.output)) == 15


def test_part_names_sort_in_chunk_order_past_99999_chunks(tmp_path):
    small, large = RunFolder(tmp_path, chunks=12), RunFolder(tmp_path, chunks=150_000)
    assert small.part_path(3).name == "part-00003.parquet"
    names = [large.part_path(i).name for i in (9, 10_000, 99_999, 100_000, 149_999)]
    assert names == sorted(names) and names[-1] == "part-149999.parquet"


def test_a_killed_run_does_not_keep_its_lock_through_forked_children(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from pipeline.runfolder import RunFolder
        from pipeline.cache import ResultCache
        folder = RunFolder({str(tmp_path / "run")!r})
        with folder.lock():
            store = ResultCache({str(tmp_path / "cache")!r}, "ns")
            if os.fork() == 0:  # an engine worker started by fork, as vLLM does on GPU hosts
                time.sleep(60)
                os._exit(0)
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        folder = RunFolder(tmp_path / "run")
        assert folder.is_locked()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.2)
        assert not folder.is_locked()  # the child still lives, and holds nothing
        from pipeline import locks

        assert not locks.held_by_other(tmp_path / "cache" / "ns" / ".in-use")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_a_store_opened_while_a_clear_holds_it_waits_and_starts_empty(tmp_path):
    store = ResultCache(tmp_path, "ns")
    _add(store, ["a"])
    store.close()
    from pipeline.cache import clear

    assert clear(tmp_path, "ns")
    again = ResultCache(tmp_path, "ns")
    assert len(again) == 0 and again.store_id != store.store_id


def test_batches_written_before_checksums_are_still_read(tmp_path):
    folder = tmp_path / "ns"
    folder.mkdir()
    from pipeline.cache import ENTRY_SCHEMA

    table = pa.table(
        {"key": ["old"], "sent": ["old"], **{n: _answers(["OLD"]).column(n) for n in ENTRY_SCHEMA.names[2:]}},
        schema=ENTRY_SCHEMA,
    )
    with pa.ipc.new_stream(folder / "seg-00000000000000000001-1.arrows", ENTRY_SCHEMA) as writer:
        writer.write_table(table)
    contents = read_file(folder / "seg-00000000000000000001-1.arrows")
    assert contents.unsealed == 1 and contents.entries == 1
    assert repair(tmp_path)[0]["files_merged"] == 1  # sealed by a rewrite
    (path,) = folder.glob("seg-*.arrows")
    assert read_file(path).unsealed == 0
    assert ResultCache(tmp_path, "ns").lookup(pl.Series(["old"]))[1].column("text").to_pylist() == ["OLD"]
    assert np.array_equal(ResultCache(tmp_path, "ns").lookup(pl.Series(["old"]))[0], [0])


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=REPO_ROOT, **kwargs
    )


def _disk_full_after(limit: int):
    """A process whose files can't grow past ``limit`` bytes: writes fail as on a full disk."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_stops_with_a_message_and_the_rerun_finishes(make_job, read_parts):
    job_files = make_job(default_table(300), chunk_rows=20)
    done = _cli(["run", str(job_files.path)], preexec_fn=_disk_full_after(8000))
    assert done.returncode == 5, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "error:" in done.stderr
    assert "File too large" in done.stderr  # the system's own words, and the file
    again = _cli(["run", str(job_files.path)])
    assert again.returncode == 0, again.stderr[-2000:]
    reference = make_job(default_table(300), chunk_rows=20, cache={"enabled": False})
    run_job(reference.load())
    key = ["id", "label", "confidence", "status"]
    assert read_parts(job_files.output).select(key) == read_parts(reference.output).select(key)


def test_a_read_only_run_folder_is_a_message_not_a_traceback(make_job):
    job_files = make_job(default_table(30), chunk_rows=10)
    run_job(job_files.load())
    folder = RunFolder(job_files.output)
    folder.marker_path(1).unlink()
    if subprocess.run(["chattr", "+i", str(folder.parts)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needed to make a folder read-only for root)")
    try:
        done = _cli(["run", str(job_files.path)])
        status = _cli(["status", str(job_files.output)])
    finally:
        subprocess.run(["chattr", "-i", str(folder.parts)])
    assert done.returncode == 5 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "parts" in done.stderr
    assert status.returncode == 0 and "stopped" in status.stdout
