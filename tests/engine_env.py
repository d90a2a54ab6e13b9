"""Whether the real vLLM engine can run here, and the environment its subprocesses need.

Imported at collection time, before any fixture points LABELMILL_HOME at a temporary folder.
Tests that need the engine are skipped when it is missing, unless LABELMILL_REQUIRE_VLLM=1 (CI sets
it), in which case its absence fails the suite instead of hiding it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from pipeline.models import checkpoint_dir

CHECKPOINT = checkpoint_dir("smollm2-135m")
MODEL_ENV = {**os.environ, "LABELMILL_HOME": str(CHECKPOINT.parents[1])}

_missing = []
if importlib.util.find_spec("vllm") is None:
    _missing.append("vllm is not installed")
if not (CHECKPOINT / "config.json").exists():
    _missing.append("run: labelmill models fetch smollm2-135m")
if _missing and os.environ.get("LABELMILL_REQUIRE_VLLM") == "1":
    raise RuntimeError("LABELMILL_REQUIRE_VLLM=1 but " + "; ".join(_missing))

needs_engine = [pytest.mark.vllm, pytest.mark.skipif(bool(_missing), reason="; ".join(_missing))]

ENGINE = {
    "dtype": "float32",
    "max_model_len": 2048,
    "gpu_memory_utilization": 0.3,
    "enforce_eager": True,
    # one of vLLM's own EngineArgs, passed through: the model runs in the calling process
    "distributed_executor_backend": "uni",
}
"""Engine settings of every real-engine job in the tests: the shared engine is built with them."""
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""vLLM's engine core in the calling process: it starts in seconds instead of ~40 on 2 cores."""
