"""``executor: ray``: 1 engine vs 4 on a Ray cluster on 127.0.0.1, and the driver's memory.

    python bench/ray_scaling.py                          # 200,000 rows, then the 10M-row driver run
    python bench/ray_scaling.py --rows 100000 --big-rows 0 --json

A head and a worker node are started with ``ray start`` on 127.0.0.1 (each offering 4 CPUs to Ray
on this machine, however many it has: the engines here sleep, they do not compute). The fake
backend stands in for a GPU engine: it answers whole chunks at once and sleeps 1/``--engine-rows-per-s``
seconds per text, so an engine's pace is a GPU's, not this CPU's. The same input is labelled with
``ray.engines`` 1 and 4 (fresh run folder and cache each time; the order alternates over
``--repeats``), and the rows/s of each run are its rows over the wall time of the run; printed: the
median 4/1 throughput ratio. Then a ``--big-rows`` input (10 million distinct texts, no id column)
is run with 4 engines by ``labelmill run --executor ray`` in a process of its own, and that
driver's peak resident memory is read from the kernel (``ru_maxrss`` of the finished child); with
``--big-ids`` the input has an id column too, whose uniqueness the driver checks (at most 8
million hashes at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(temp: Path) -> tuple[str, dict]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port = _port()
    common = ["--num-cpus", "4", "--num-gpus", "0", "--disable-usage-stats"]
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--include-dashboard", "false", "--temp-dir", str(temp), *common],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    subprocess.run(
        [RAY, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    return address, env


def write_input(path: Path, rows: int, ids: bool) -> None:
    """``rows`` distinct short texts, written in row groups of 500,000 without holding them all."""
    writer = None
    for start in range(0, rows, 500_000):
        n = min(500_000, rows - start)
        numbers = np.arange(start, start + n)
        columns = {"title": pa.array([f"product {i} pack" for i in numbers], pa.string())}
        if ids:
            columns = {"id": pa.array(numbers, pa.int64()), **columns}
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def job(work: Path, name: str, data: Path, address: str, engines: int, chunk_rows: int, pace: float,
        ids: bool) -> Path:  # fmt: skip
    spec = {
        "input": str(data), "output": str(work / name), "text_column": "title",
        "labels": ["Coffee", "Tea", "Vitamin", "Shoes", "Sunscreen"], "prompt": "classify_product.en",
        "model": "fake", "backend": "fake", "fake": {"seconds_per_row": pace}, "chunk_rows": chunk_rows,
        "cache": {"path": str(work / f"{name}-cache")}, "executor": "ray",
        "ray": {"address": address, "engines": engines, "cpus_per_engine": 1},
        **({"id_column": "id"} if ids else {}),
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(path: Path, env: dict) -> tuple[dict, float, int]:
    """``labelmill run`` in its own process: its summary, wall seconds and peak RSS in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(path), "--quiet"], cwd=REPO, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    output = yaml.safe_load(path.read_text())["output"]
    summary = json.loads((Path(output) / "summary.json").read_text())
    # ru_maxrss of children is the largest any child reached: only a new maximum is this run's
    return summary, wall, (peak if peak > before else 0) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--engine-rows-per-s", type=float, default=3000.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-rows", type=int, default=10_000_000)
    parser.add_argument("--big-ids", action="store_true", help="give the big input an id column")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pace = 1.0 / args.engine_rows_per_s
    figures: dict = {
        "rows": args.rows,
        "chunk_rows": args.chunk_rows,
        "engine_rows_per_s": args.engine_rows_per_s,
    }
    with tempfile.TemporaryDirectory(prefix="labelmill-ray-") as tmp:
        work = Path(tmp)
        address, env = start_cluster(work / "ray")
        try:
            data = work / "rows.parquet"
            write_input(data, args.rows, ids=True)
            rates: dict[int, list[float]] = {1: [], 4: []}
            for repeat in range(args.repeats):
                for engines in (1, 4) if repeat % 2 == 0 else (4, 1):
                    name = f"e{engines}-{repeat}"
                    summary, wall, _ = run(
                        job(work, name, data, address, engines, args.chunk_rows, pace, True), env
                    )
                    assert summary["complete"] and summary["rows_done"] == args.rows
                    rates[engines].append(args.rows / summary["this_invocation"]["labelling_seconds"])
                    print(f"{engines} engine(s), run {repeat + 1}: {rates[engines][-1]:,.0f} rows/s "
                          f"({wall:.1f} s wall with start-up)", file=sys.stderr)  # fmt: skip
            figures["rows_per_s_1_engine"] = [round(r) for r in rates[1]]
            figures["rows_per_s_4_engines"] = [round(r) for r in rates[4]]
            figures["median_ratio_4_to_1"] = round(
                statistics.median(rates[4]) / statistics.median(rates[1]), 2
            )
            if args.big_rows:
                big = work / "big.parquet"
                write_input(big, args.big_rows, ids=args.big_ids)
                summary, wall, peak_mb = run(
                    job(work, "big", big, address, 4, 500_000, 0.0, args.big_ids), env
                )
                assert summary["complete"] and summary["rows_done"] == args.big_rows
                figures |= {"big_rows": args.big_rows, "big_ids": args.big_ids, "big_wall_s": round(wall, 1),
                            "driver_peak_rss_mb": peak_mb}  # fmt: skip
                print(f"{args.big_rows:,} rows with 4 engines: {wall:.0f} s, driver peak RSS {peak_mb} MB",
                      file=sys.stderr)  # fmt: skip
        finally:
            subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        ratio = figures["median_ratio_4_to_1"]
        line = f"4 engines / 1 engine: {ratio:.2f}x rows/s (medians of {args.repeats})"
        if args.big_rows:
            line += f"; driver peak RSS on {args.big_rows:,} rows: {figures['driver_peak_rss_mb']} MB"
        print(line)


if __name__ == "__main__":
    main()
