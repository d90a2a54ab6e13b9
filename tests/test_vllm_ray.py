"""``executor: ray`` with the real vLLM engine (CPU build, SmolLM2-135M) on the loopback Ray
cluster (``ray_cluster`` in conftest): the engine actor's labels equal the local run's row for
row, and an engine that can't get the memory it needs stops the run with vLLM's reason instead of
hanging.

Skipped when vLLM or the checkpoint is missing (see ``engine_env``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml
from engine_env import CHECKPOINT, ENGINE, IN_PROCESS, needs_engine

from pipeline.config import load_job
from pipeline.errors import LabelmillError
from pipeline.runner import run_job

pytestmark = needs_engine

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "oa_mine_products_100.parquet"
LABELS = ["Coffee", "Tea", "Vitamin", "Safety Mask", "Toothbrush", "Breakfast Cereal", "Sunscreen",
          "Laundry Detergent", "Shoes", "Conditioner"]  # fmt: skip


def _job(tmp: Path, name: str, ray: dict | None, engine: dict | None = None) -> Path:
    spec = {
        "input": str(SAMPLE), "output": str(tmp / name), "id_column": "id", "text_column": "title",
        "labels": LABELS, "prompt": "classify_product.en", "model": str(CHECKPOINT), "backend": "vllm",
        "engine": engine or ENGINE, "chunk_rows": 25, "cache": {"enabled": False},
        **({"executor": "ray", "ray": ray} if ray else {}),
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_smollm2_on_an_engine_actor_equals_the_local_run(ray_cluster, engine, tmp_path, monkeypatch):
    # the actor's engine core in its own process, as the shared test engine's is in this one
    for key, value in IN_PROCESS.items():
        monkeypatch.setenv(key, value)
    local = run_job(load_job(_job(tmp_path, "local", None)), backend=engine)
    remote = run_job(
        load_job(_job(tmp_path, "ray", {"address": ray_cluster, "engines": 1, "cpus_per_engine": 2}))
    )
    assert local["complete"] and remote["complete"]
    a = pl.read_parquet(sorted((tmp_path / "local" / "parts").glob("*.parquet")))
    b = pl.read_parquet(sorted((tmp_path / "ray" / "parts").glob("*.parquet")))
    assert a.height == b.height == 100
    assert a["label"].to_list() == b["label"].to_list()
    assert a["status"].to_list() == b["status"].to_list()
    assert b["confidence"].to_list() == pytest.approx(a["confidence"].to_list(), abs=1e-3)


def test_an_engine_that_cannot_get_its_memory_stops_the_run_with_the_reason(
    ray_cluster, tmp_path, monkeypatch
):
    for key, value in IN_PROCESS.items():
        monkeypatch.setenv(key, value)
    # a KV cache too small for one sequence of max_model_len: vLLM refuses to start
    starved = {**ENGINE, "gpu_memory_utilization": 0.0001}
    job = _job(tmp_path, "starved", {"address": ray_cluster, "engines": 1, "cpus_per_engine": 2}, starved)
    with pytest.raises(LabelmillError) as caught:
        run_job(load_job(job))
    assert "memory" in str(caught.value).lower() or "kv cache" in str(caught.value).lower()
