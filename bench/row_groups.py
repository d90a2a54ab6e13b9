"""Row groups: one huge row group against many, the same rows, the same chunks.

    python bench/row_groups.py --rows 2000000 --groups 16 --runs 3

Writes one keyword file twice, as a single row group and as ``--groups`` row groups, and runs
`labelmill run` on each (the fake backend, a fresh result cache per run, chunks of 100,000 rows),
alternating the two so a noisy machine hurts both alike. Each run is a fresh process; the figures
are wall time, rows per second, CPU time and the process's peak resident memory, with the median
over the runs and the ratios one-row-group / many-row-groups (1.0: the file's layout costs
nothing; CPU time is the steadier figure where other work shares the cores). A
chunk that falls inside a row group must not decode the whole group again: this is the check.
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
from _keywords import keywords, write_job


def write_inputs(folder: Path, rows: int, groups: int) -> None:
    """The same rows as ``one.parquet`` (one row group) and ``many.parquet`` (``groups``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(range(rows), pa.int64()), "keyword": keywords(rows, 0.3)})
    pq.write_table(table, folder / "one.parquet", row_group_size=rows)
    pq.write_table(table, folder / "many.parquet", row_group_size=-(-rows // groups))
    for name, want in (("one", 1), ("many", groups)):
        got = pq.ParquetFile(folder / f"{name}.parquet").metadata.num_row_groups
        assert got == want, f"{name}.parquet has {got} row groups, not {want}"


def run_once(tmp: Path, name: str, n: int, rows: int) -> dict:
    job = write_job(
        tmp / f"{name}{n}.yaml", tmp / f"{name}.parquet", tmp / f"run-{name}{n}",
        cache={"path": str(tmp / f"cache-{name}{n}")},
    )  # fmt: skip
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet"],
                             stdout=subprocess.DEVNULL)  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"labelmill run failed with exit code {os.waitstatus_to_exitcode(status)}")
    summary = json.loads((tmp / f"run-{name}{n}" / "summary.json").read_text())
    assert summary["rows_done"] == rows, summary
    return {
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall),
        # CPU seconds, user and system: on a shared machine wall time moves with the neighbours
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # this child's own peak (Linux: KiB)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--write-inputs", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_inputs:
        write_inputs(args.write_inputs, args.rows, args.groups)
        return
    with tempfile.TemporaryDirectory(prefix="labelmill-bench-") as tmp:
        tmp = Path(tmp)
        # written by another process: a child's peak memory counts from its parent's size at
        # fork time, so this one must not hold millions of strings when it starts labelmill
        subprocess.run([sys.executable, __file__, "--write-inputs", str(tmp), "--rows", str(args.rows),
                        "--groups", str(args.groups)], check=True)  # fmt: skip
        runs: dict[str, list[dict]] = {"one": [], "many": []}
        for n in range(args.runs):
            for name in ("one", "many") if n % 2 == 0 else ("many", "one"):
                runs[name].append(run_once(tmp, name, n, args.rows))
                print(f"run {n + 1} {name:>4} row group(s): {runs[name][-1]}", flush=True)
    median = {name: statistics.median(r["wall_s"] for r in results) for name, results in runs.items()}
    cpu = {name: statistics.median(r["cpu_s"] for r in results) for name, results in runs.items()}
    figures = {
        "rows": args.rows,
        "row_groups": {"one": 1, "many": args.groups},
        "runs": runs,
        "median_wall_s": median,
        "median_rows_per_s": {name: round(args.rows / s) for name, s in median.items()},
        "median_cpu_s": cpu,
        "max_peak_rss_mb": {name: max(r["peak_rss_mb"] for r in results) for name, results in runs.items()},
        "wall_ratio_one_to_many": round(median["one"] / median["many"], 3),
        "cpu_ratio_one_to_many": round(cpu["one"] / cpu["many"], 3),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
