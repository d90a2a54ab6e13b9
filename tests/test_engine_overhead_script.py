"""The CPU engine-overhead benchmark runs end to end at a tiny size, so it cannot rot.

Its figures here mean nothing (8 items, dominated by the first request's one-time costs); the
point is that both paths label every item, agree row by row, and the script writes its figures.
Needs vLLM and the SmolLM2 checkpoint (see ``engine_env``).
Both paths run vLLM's engine core inside their process, not in a child of it (``IN_PROCESS``): it starts in
seconds instead of ~40 on 2 cores; the script's full-size runs keep vLLM's defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT
from engine_env import IN_PROCESS, MODEL_ENV, needs_engine

pytestmark = needs_engine


def test_engine_overhead_script_measures_both_paths(tmp_path):
    out = tmp_path / "figures.json"
    script = str(REPO_ROOT / "bench" / "engine_overhead.py")
    done = subprocess.run(
        [sys.executable, script, "--items", "8", "--out", str(out)],
        cwd=REPO_ROOT, env={**MODEL_ENV, **IN_PROCESS}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    (run,) = figures["per_run"]
    assert run["labelmill"]["items"] == run["bare_vllm"]["items"] == 8
    assert run["labelmill"]["ok"] == 8 and run["bare_vllm"]["ok"] == 8
    assert run["rows_compared"] == run["labels_agree"] == run["prompt_tokens_agree"] == 8
    assert run["ratio"] > 0 and figures["ratio_of_medians"] > 0
