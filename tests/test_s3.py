"""Input, output and the result cache in an S3 bucket: a real S3 server (``moto`` in server mode)
on 127.0.0.1, reached through the standard credential chain (environment variables).

Checked: a run with its input, run folder and cache in the bucket equals a local run row for row,
and a second run finds every answer in the bucket's cache; a run killed mid-way resumes from the
chunks it finished; a second run on the same output is refused while the first holds the lease;
the access key is in no object and no file written, nor in what the runs printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, fake_job, read_run_output

pytest.importorskip("boto3", reason="boto3 is not installed (pip install 'labelmill[s3]')")

from pipeline.cli import main
from pipeline.config import load_job
from pipeline.runner import run_job


def _frame(rows: int, first: int = 0) -> pl.DataFrame:
    words = ["coffee", "tea", "green", "shoes", "vitamin", "sun", "cream"]
    # a third of the titles repeat others, so duplicates and the cache have work
    return pl.DataFrame(
        {
            "id": range(first, first + rows),
            "title": [f"{words[i % 7]} item {i % (2 * rows // 3)}" for i in range(rows)],
        }
    )


def _put_inputs(s3, bucket: str, local: Path, rows: int = 600) -> None:
    """The same two Hive partitions in the bucket and in a local folder."""
    client = s3.client()
    for n, country in enumerate(("DE", "PL")):
        folder = local / f"country={country}"
        folder.mkdir(parents=True)
        path = folder / "part-0.parquet"
        _frame(rows // 2, n * rows).write_parquet(path, row_group_size=100)
        client.put_object(Bucket=bucket, Key=f"in/country={country}/part-0.parquet", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="in/_SUCCESS", Body=b"")


def _job(tmp: Path, name: str, input_: str, output: str, cache: str, **extra) -> Path:
    return fake_job(tmp, name, input_, output, cache, keep_columns=["country"], **extra)


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [o["Key"] for o in listed]


def _no_secret_anywhere(s3, buckets: list[str], folders: list[Path], printed: list[str]) -> int:
    """Every object of the buckets, every file below the folders and what was printed, searched
    for the access key id and the secret key; returns how many objects and files were searched."""
    secrets = [s3.env["AWS_ACCESS_KEY_ID"].encode(), s3.env["AWS_SECRET_ACCESS_KEY"].encode()]
    client, searched = s3.client(), 0
    for bucket in buckets:
        for key in _keys(s3, bucket):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert not any(s in body for s in secrets), f"s3://{bucket}/{key} holds a credential"
            searched += 1
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s in data for s in secrets), f"{path} holds a credential"
                searched += 1
    for text in printed:
        assert not any(s.decode() in text for s in secrets), "a credential was printed"
    return searched


def test_input_output_and_cache_in_a_bucket_equal_a_local_run(s3_server, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.bucket("lm-equal")
    _put_inputs(s3_server, bucket, tmp_path / "in")
    url = f"s3://{bucket}"
    local = run_job(
        load_job(_job(tmp_path, "local", str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "c")))
    )
    remote = run_job(load_job(_job(tmp_path, "remote", f"{url}/in/", f"{url}/runs/a", f"{url}/cache")))
    assert remote["complete"] and remote["rows_done"] == local["rows_done"] == 600
    assert remote["model_calls"] == local["model_calls"] > 0
    a, b = read_run_output(tmp_path / "out"), read_run_output(f"{url}/runs/a")
    assert a.equals(b)
    assert set(b["country"]) == {"DE", "PL"}  # the partition folders became a column
    keys = _keys(s3_server, bucket, "runs/a/")
    assert sum(k.startswith("runs/a/parts/part-") for k in keys) == 6
    assert sum(k.startswith("runs/a/done/chunk-") for k in keys) == 6
    assert "runs/a/.lock" not in keys  # released at the end
    assert any(k.startswith("cache/") and k.endswith(".arrows") for k in _keys(s3_server, bucket, "cache/"))
    # the commands that read a run folder take its URI as they take a path
    status = CliRunner().invoke(main, ["status", f"{url}/runs/a", "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["state"] == "finished"
    assert json.loads(status.output)["rows_done"] == 600
    gold = tmp_path / "gold.csv"
    gold.write_text("id,category\n" + "".join(f"{i},{b['label'][i]}\n" for i in range(600)))
    args = [
        "eval",
        f"{url}/runs/a",
        "--gold",
        str(gold),
        "--on",
        "id",
        "--gold-column",
        "category",
        "--no-charts",
    ]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "--out" in refused.output
    scored = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "eval")])
    assert scored.exit_code == 0, scored.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["classification"]["accuracy"] == 1.0 and report["run_folder"] == f"{url}/runs/a"

    # Another machine (an empty LABELMILL_HOME) finds every answer in the bucket's cache.
    monkeypatch.setenv("LABELMILL_HOME", str(tmp_path / "other-machine"))
    again = run_job(load_job(_job(tmp_path, "again", f"{url}/in/", f"{url}/runs/b", f"{url}/cache")))
    assert again["complete"] and again["model_calls"] == 0 and again["cache_hits"] > 0
    assert read_run_output(f"{url}/runs/b").select("id", "label").equals(b.select("id", "label"))
    assert _no_secret_anywhere(s3_server, [bucket], [tmp_path], []) > 20


def _labelmill(job: Path, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(job)], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def _modified(s3, bucket: str, prefix: str) -> dict:
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["LastModified"] for o in listed}


def _markers(s3, bucket: str, run: str) -> int:
    return sum(k.startswith(f"{run}/done/chunk-") for k in _keys(s3, bucket, f"{run}/"))


def test_a_run_killed_in_a_bucket_resumes_and_holds_its_lock_meanwhile(s3_server, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.bucket("lm-killed")
    _put_inputs(s3_server, bucket, tmp_path / "in", rows=1200)
    lease = 3
    env = {**os.environ, **s3_server.env, "LABELMILL_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
           "LABELMILL_LEASE_SECONDS": str(lease)}  # fmt: skip
    url = f"s3://{bucket}"
    job = _job(
        tmp_path, "slow", f"{url}/in/", f"{url}/runs/slow", f"{url}/cache", fake={"seconds_per_row": 0.004}
    )
    first = _labelmill(job, env)
    printed = []
    try:
        deadline = time.monotonic() + 300
        while (
            _markers(s3_server, bucket, "runs/slow") < 2
            and first.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert first.poll() is None, "the run ended before it could be killed"
        # A second run on the same output is refused while the first holds the lease.
        second = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", str(job)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        printed += [second.stdout, second.stderr]
        assert second.returncode != 0
        assert "is in use by" in second.stderr and "process" in second.stderr
        first.send_signal(signal.SIGKILL)
        out, err = first.communicate(timeout=60)
        printed += [out, err]
    finally:
        if first.poll() is None:
            first.kill()
    done = _markers(s3_server, bucket, "runs/slow")
    assert 2 <= done < 12
    finished = _modified(s3_server, bucket, "runs/slow/parts/")
    # The dead run can't release its lease: the rerun takes it over once it has expired.
    time.sleep(lease + 1)
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(job)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    printed += [resumed.stdout, resumed.stderr]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = read_run_output(f"{url}/runs/slow")
    assert out.height == 1200 and out["id"].n_unique() == 1200  # no row lost or doubled
    # the same rows as an uninterrupted local run of the job
    whole = _job(tmp_path, "whole", str(tmp_path / "in"), str(tmp_path / "whole"), str(tmp_path / "c"))
    run_job(load_job(whole))
    assert (
        read_run_output(tmp_path / "whole")
        .select("id", "label", "status")
        .equals(out.select("id", "label", "status"))
    )
    # only the unfinished chunks were labelled again: the finished ones' parts were not rewritten
    now = _modified(s3_server, bucket, "runs/slow/parts/")
    assert len(now) == 12 and all(now[key] == when for key, when in finished.items())
    assert _no_secret_anywhere(s3_server, [bucket], [tmp_path], printed) > 20


def test_the_lease_is_taken_by_exactly_one_and_taken_over_only_once_expired(s3_server, monkeypatch):
    import threading

    from pipeline.errors import RunLockedError
    from pipeline.storage import LeaseLock, ObjectPath, conditional

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.bucket("lm-lease")
    # eight creates at once: the store lets exactly one through
    won = []
    racers = [
        threading.Thread(
            target=lambda: won.append(conditional(ObjectPath(f"s3://{bucket}/race")).create(b"x"))
        )
        for _ in range(8)
    ]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert sum(tag is not None for tag in won) == 1

    path = ObjectPath(f"s3://{bucket}/run/.lock")
    first = LeaseLock(path, lease_seconds=1.0)
    first.acquire()
    first._stop.set()  # the holder freezes (a paused VM, a lost network): it renews no more
    first._thread.join()
    second = LeaseLock(path, lease_seconds=1.0)
    with pytest.raises(RunLockedError, match=r"is in use by .* process"):
        second.acquire()
    assert second.held_by_other()
    time.sleep(1.3)  # the frozen holder's lease expires
    second.acquire()
    # the old holder wakes up: its next renewal finds the lease taken over, and it must stop
    first._stop.clear()
    first.lease = 0.03
    first._renew()
    assert first.lost
    with pytest.raises(RunLockedError, match="lock was lost"):
        first.check()
    first.release()  # gives nothing back: the lease is not its own any more
    assert LeaseLock(path).held_by_other()
    second.release()
    assert not LeaseLock(path).held_by_other() and "run/.lock" not in _keys(s3_server, bucket)
