"""A cascade on the real vLLM engine (CPU build, SmolLM2-135M): killed with SIGKILL mid-run and
resumed, it routes every row as an uninterrupted run does and gives the same labels.

The student learns SmolLM2's own labels, which are noisy, so the label set is small and the
target low here (three labels, agreement 0.5 at delta 0.3): what is checked is that routing
survives a kill, not the model.

Skipped when vLLM or the checkpoint is missing (see ``engine_env``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import wait_for_chunks
from engine_env import CHECKPOINT, ENGINE, IN_PROCESS, MODEL_ENV, needs_engine

from pipeline.config import load_job
from pipeline.runner import run_job

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "oa_mine_products.parquet"
LABELS = ["Coffee", "Tea", "Shoes"]
ROWS, CHUNK_ROWS = 180, 20

pytestmark = needs_engine


def _job(tmp: Path, name: str, data: Path) -> Path:
    job = {
        "input": str(data), "output": str(tmp / name), "id_column": "id", "text_column": "title",
        "keep_columns": ["category"], "labels": LABELS, "prompt": "classify_product.en",
        "model": str(CHECKPOINT), "backend": "vllm", "engine": ENGINE, "chunk_rows": CHUNK_ROWS,
        "cache": {"path": str(tmp / f"cache-{name}")},
        "cascade": {
            "target_agreement": 0.5, "delta": 0.3, "sample_rows": 80, "holdout": 0.5, "retrain_growth": 0
        },
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _read(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((folder / "parts").glob("part-*.parquet")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("vllm-cascade")
    pl.read_parquet(SAMPLE).gather_every(8).head(ROWS).select("id", "title", "category").write_parquet(
        tmp / "input.parquet"
    )
    return tmp


def test_a_killed_cascade_run_resumes_with_the_same_routing_and_labels(workdir, engine):
    whole = run_job(load_job(_job(workdir, "whole", workdir / "input.parquet")), backend=engine)
    assert whole["complete"] and whole["cascade"]["chosen"] == "trained"
    reference = _read(workdir / "whole")
    assert reference.height == ROWS and (reference["source"] == "student").sum() > 0  # routing is exercised

    job = _job(workdir, "killed", workdir / "input.parquet")
    done = workdir / "killed" / "done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet"], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**MODEL_ENV, **IN_PROCESS},
    )  # fmt: skip
    wait_for_chunks(done, 2, proc)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    finished = len(list(done.glob("chunk-*.json")))
    assert 2 <= finished < ROWS // CHUNK_ROWS
    record = json.loads((workdir / "killed" / "cascade.json").read_text())

    # retrain_growth 0 would train a new student on the grown cache: the run keeps its own
    resumed = run_job(load_job(job), backend=engine)
    assert resumed["complete"] and resumed["cascade"]["resumed"]
    assert resumed["cascade"]["student"] == record["student"]
    out = _read(workdir / "killed")
    assert out["id"].to_list() == reference["id"].to_list()
    assert out["label"].to_list() == reference["label"].to_list()
    assert out["status"].to_list() == reference["status"].to_list()
    assert (out["source"] == "student").to_list() == (reference["source"] == "student").to_list()
    student = reference["source"] == "student"
    assert out.filter(student)["student_confidence"].to_list() == pytest.approx(
        reference.filter(student)["student_confidence"].to_list()
    )
