"""Input, output and the result cache in a GCS bucket: a local GCS server (``gcp-storage-emulator``)
on 127.0.0.1, reached as Google's clients reach one (``STORAGE_EMULATOR_HOST``).

Checked: a run with its input, run folder and cache in the bucket equals a local run row for row,
its lease is taken and given back, and a run on another machine finds every answer in the
bucket's cache. The emulator ignores generation preconditions, so what a lease refuses is tested
against the S3 server (``tests/test_s3.py``), through the same lease code.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import fake_job, read_run_output

pytest.importorskip("google.cloud.storage", reason="pip install 'labelmill[gcs]'")

from pipeline.config import load_job
from pipeline.runner import run_job


def _job(tmp: Path, name: str, input_: str, output: str, cache: str, **extra) -> Path:
    return fake_job(tmp, name, input_, output, cache, keep_columns=["shop"], **extra)


def test_input_output_and_cache_in_a_gcs_bucket_equal_a_local_run(gcs_server, tmp_path, monkeypatch):
    from google.cloud import storage as gcs

    for key, value in gcs_server.items():
        monkeypatch.setenv(key, value)
    bucket = gcs.Client().create_bucket("lm-gcs")
    for n, shop in enumerate(("a", "b")):
        folder = tmp_path / "in" / f"shop={shop}"
        folder.mkdir(parents=True)
        titles = [f"tea item {i % 150}" if i % 2 else f"coffee {i % 90}" for i in range(250)]
        pl.DataFrame({"id": range(n * 250, n * 250 + 250), "title": titles}).write_parquet(
            folder / "x.parquet"
        )
        bucket.blob(f"in/shop={shop}/x.parquet").upload_from_filename(str(folder / "x.parquet"))
    local = run_job(
        load_job(_job(tmp_path, "local", str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "c")))
    )
    url = "gs://lm-gcs"
    remote = run_job(load_job(_job(tmp_path, "remote", f"{url}/in", f"{url}/runs/a", f"{url}/cache")))
    assert remote["complete"] and remote["rows_done"] == local["rows_done"] == 500
    assert remote["model_calls"] == local["model_calls"] > 0
    assert read_run_output(tmp_path / "out").equals(read_run_output(f"{url}/runs/a"))
    names = [b.name for b in bucket.list_blobs(prefix="runs/a/")]
    assert (
        sum(n.startswith("runs/a/parts/") for n in names)
        == sum(n.startswith("runs/a/done/") for n in names)
        == 6  # chunks end at file ends: 100 + 100 + 50 rows a file
    )
    assert "runs/a/.lock" not in names and "runs/a/run.json" in names

    monkeypatch.setenv("LABELMILL_HOME", str(tmp_path / "other-machine"))
    again = run_job(load_job(_job(tmp_path, "again", f"{url}/in", f"{url}/runs/b", f"{url}/cache")))
    assert again["complete"] and again["model_calls"] == 0 and again["cache_hits"] > 0
