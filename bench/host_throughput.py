"""Host throughput: everything around the model, with the fake backend standing in for it.

    python bench/host_throughput.py --rows 2000000 --repeated 0.3 --runs 3
    python bench/host_throughput.py --rows 10000000 --runs 3 --out host.json    # the 10M-row figure

Each run is a fresh `labelmill run` process (start-up included) on the same input, with a result
cache of its own that starts empty (a first night); the figure is the median of the runs' rows
per second of wall time, with each run's peak resident memory. The fake backend answers whole
columns at once, so this measures reading, cleaning, duplicate collapsing, the cache lookups and
writes, prompt building, parsing and writing: the work that must never hold a GPU back. Not a
timed test: these machines are noisy, so read the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _keywords import write_job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeated", type=float, default=0.3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="labelmill-bench-") as tmp:
        tmp = Path(tmp)
        # Made by another process: a child's peak memory counts from its parent's size at fork
        # time, so this one must not hold millions of strings when it starts labelmill.
        data = tmp / "input.parquet"
        subprocess.run([sys.executable, str(Path(__file__).parent / "_keywords.py"), str(data),
                        str(args.rows), str(args.repeated)], check=True)  # fmt: skip
        results = []
        for n in range(args.runs):
            # a cold cache of its own: every distinct text is looked up, answered and stored
            cache = {"path": str(tmp / f"cache{n}")}
            job = write_job(tmp / f"job{n}.yaml", data, tmp / f"run{n}", cache=cache)
            t0 = time.perf_counter()
            command = [sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet"]
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - t0
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"labelmill run failed with exit code {os.waitstatus_to_exitcode(status)}")
            peak_mb = usage.ru_maxrss / 1024  # this run's process alone (Linux reports KiB)
            summary = json.loads((tmp / f"run{n}" / "summary.json").read_text())
            assert summary["rows_done"] == args.rows, summary
            results.append(
                {
                    "wall_s": round(wall, 2),
                    "rows_per_s": round(args.rows / wall),
                    "peak_rss_mb": round(peak_mb),
                }
            )
            print(f"run {n + 1}: {results[-1]}", flush=True)
    figures = {
        "rows": args.rows,
        "repeated": args.repeated,
        "runs": results,
        "median_rows_per_s": statistics.median(r["rows_per_s"] for r in results),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "model_calls_per_row": round(summary["model_calls"] / args.rows, 4),
        "cache_hits_per_row": round(summary["cache_hits"] / args.rows, 4),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
