"""The benchmark scripts in bench/ run end to end at a tiny size, so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT


def _script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / name), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_host_throughput_script(tmp_path):
    _script("host_throughput.py", "--rows", "3000", "--runs", "1", "--out", str(tmp_path / "f.json"))
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["rows"] == 3000 and figures["median_rows_per_s"] > 0 and figures["max_peak_rss_mb"] > 0


def test_nightly_rerun_script():
    out = _script("nightly_rerun.py", "--rows", "3000", "--new", "0.02")
    figures = json.loads(out[out.index("{") :])
    assert figures["model_calls_night2"] == figures["new_distinct_texts"] == 60
    assert figures["output_equals_uncached_run"] is True


def test_retrieval_script(tmp_path):
    _script("retrieval.py", "--rows", "500", "--repeats", "1", "--out", str(tmp_path / "r.json"))
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["labels"] > 10_000 and figures["rows"] == 500 and figures["median_rows_per_second"] > 0
    recall = figures["wands_recall_at_k"]
    assert 0 < recall["1"] <= recall["5"] <= recall["10"] <= recall["20"] <= 1


def test_cascade_script():
    out = _script("cascade.py", "--seeds", "1", "--cases", "oa-mine,unlearnable", "--json")
    cases = json.loads(out)["cases"]
    learnable, unlearnable = cases["oa-mine"], cases["unlearnable"]
    assert learnable["median_share_to_model"] < 0.5 <= unlearnable["median_share_to_model"]
    assert learnable["usd_ratio_with_to_without"] < 0.5
    assert min(learnable["min_agreement_with_teacher"], unlearnable["min_agreement_with_teacher"]) >= 0.95
