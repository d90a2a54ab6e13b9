"""The GPU benchmark script runs end to end on the CPU in its reduced form, so it cannot rot.

Its figures here mean nothing (a 2-layer toy with random weights on a CPU); on a GPU the same
script measures Llama-3.1-8B's shape. Needs vLLM and the SmolLM2 tokenizer (see ``engine_env``).
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


def test_reduced_gpu_script_measures_both_paths(tmp_path):
    out = tmp_path / "figures.json"
    script = str(REPO_ROOT / "bench" / "gpu_dummy_llama.py")
    done = subprocess.run(
        [sys.executable, script, "--reduced", "--items", "16", "--out", str(out)],
        cwd=REPO_ROOT, env={**MODEL_ENV, **IN_PROCESS}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["labelmill"]["items"] == figures["bare_vllm"]["items"] == 16
    assert figures["labelmill"]["ok"] == 16 and figures["bare_vllm"]["ok"] == 16
    assert figures["ratio_labelmill_to_bare"] > 0
    scored = figures["labelmill_score"]
    assert scored["decoding"] == "score" and scored["items"] == scored["ok"] == 16
    assert scored["output_tokens_per_item"] == 1.0  # ten labels, one decode step each row
    assert figures["labelmill"]["output_tokens_per_item"] > 1.0  # the constrained run spells them out
    assert figures["ratio_score_to_constrained"] > 0
