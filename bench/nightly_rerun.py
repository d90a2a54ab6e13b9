"""The nightly case: tomorrow's export is today's plus 1% new rows.

    python bench/nightly_rerun.py --rows 500000 --new 0.01 --engine-rows-per-s 3000

Night 1 runs the export into a fresh result cache; night 2 runs the export with 1% new rows added
into a new run folder, sharing the cache. The fake backend stands in for the engine and takes
1/``--engine-rows-per-s`` seconds per text it answers (a GPU's pace), so wall time means something.
Printed: night 2's model calls and wall time as fractions of night 1's, whether its model calls
equal the number of new distinct texts, and whether its output equals an uncached run of the
same input row by row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _keywords import keywords, write_input, write_job

from pipeline.dedupe import DedupeConfig, normalise_texts


def _run(job: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet"], check=True, capture_output=True
    )
    wall = time.perf_counter() - t0
    return json.loads(
        (Path(__import__("yaml").safe_load(job.read_text())["output"]) / "summary.json").read_text()
    ), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--new", type=float, default=0.01)
    ap.add_argument("--engine-rows-per-s", type=float, default=3000.0)
    args = ap.parse_args()
    engine = {"fake": {"seconds_per_row": 1 / args.engine_rows_per_s}}
    with tempfile.TemporaryDirectory(prefix="labelmill-nightly-") as tmp:
        tmp = Path(tmp)
        cache = {"path": str(tmp / "cache")}
        today = keywords(args.rows, 0.3)
        tomorrow = today + keywords(int(args.rows * args.new), 0.0, seed=1, start=10**9)
        night1, wall1 = _run(
            write_job(
                tmp / "n1.yaml", write_input(tmp / "d1.parquet", today), tmp / "run1", cache=cache, **engine
            )
        )
        d2 = write_input(tmp / "d2.parquet", tomorrow)
        night2, wall2 = _run(write_job(tmp / "n2.yaml", d2, tmp / "run2", cache=cache, **engine))
        _run(write_job(tmp / "n3.yaml", d2, tmp / "run3", cache={"enabled": False}))
        cols = ["id", "label", "confidence", "status"]
        same = (
            pl.read_parquet(tmp / "run2" / "parts")
            .select(cols)
            .equals(pl.read_parquet(tmp / "run3" / "parts").select(cols))
        )

        # texts never asked before (as the job's normalisation sees them): what night 2 must ask,
        # and all it may ask
        def keys(texts):
            return set(normalise_texts(pl.Series(texts, dtype=pl.String), DedupeConfig()).to_list())

        new_distinct = len(keys(tomorrow[len(today) :]) - keys(today))
    figures = {
        "engine_rows_per_s": args.engine_rows_per_s,
        "rows_night1": len(today),
        "rows_night2": len(tomorrow),
        "model_calls_night1": night1["model_calls"],
        "model_calls_night2": night2["model_calls"],
        "new_distinct_texts": new_distinct,
        "model_calls_equal_new_texts": night2["model_calls"] == new_distinct,
        "model_calls_ratio": round(night2["model_calls"] / night1["model_calls"], 4),
        "wall_s_night1": round(wall1, 1),
        "wall_s_night2": round(wall2, 1),
        "wall_ratio": round(wall2 / wall1, 3),
        "cache_hits_night2": night2["cache_hits"],
        "output_equals_uncached_run": same,
        "cache_mb": round(night2["cache"]["bytes"] / 1e6, 1),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
