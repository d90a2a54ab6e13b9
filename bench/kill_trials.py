"""Crash safety: a run killed at random moments, then resumed, gives an uninterrupted run's output.

    python bench/kill_trials.py --trials 30 --rows 20000 --seed 1

One Parquet input (unique ids, texts that repeat under other casing and spacing, a few empty
ones) and one job on the ``fake`` backend, slowed so a run takes a couple of seconds over many
chunks. An uninterrupted run gives the reference output. Each trial then starts ``labelmill run``
in a fresh run folder, with a fresh result cache or one shared by the trials (alternately), and
kills it one to three times in a row: SIGKILL of the process or of its whole process group, now
and then SIGTERM or SIGINT; during start-up, at a random time, right as a chunk finishes, or
after most chunks are done. It then runs the job to completion and checks the exit code, that
every input id comes out exactly once, that every row's label, confidence, status and error equal
the reference's, that no temporary file is left in the run folder or the cache, and that
``labelmill status`` reads the folder. A kill that lands after the run has finished is fine: the
resume then has nothing to do.

Prints one line per trial and ``kill trials: N, failures: F`` with the median seconds per trial;
``--json`` prints the same as JSON on stdout (the lines go to stderr). Exits 1 if a trial failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Coffee", "Tea", "Vitamin", "Shoes", "Sunscreen", "Toothbrush"]
COMPARED = ["label", "confidence", "status", "error"]
_WORDS = [
    "organic", "green", "tea", "arabica", "coffee", "beans", "vitamin", "c", "tablets", "running",
    "shoes", "mineral", "sunscreen", "bamboo", "toothbrush", "decaf", "espresso", "herbal",
    "chamomile", "zinc", "trail", "leather", "spf", "50", "kids", "soft", "medium",
]  # fmt: skip

# How long a finished run may take, and how long a SIGTERM or SIGINT may take to stop one: far
# beyond what the job needs, so only a hang trips them.
RUN_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60


# --- the input and the job ------------------------------------------------------------------------


def make_input(path: Path, rows: int, seed: int) -> pl.DataFrame:
    """``rows`` rows: ids unique but shuffled, about one distinct text per five rows, each row one
    spelling of its text (as is, upper case, title case or with doubled spaces), about 1% empty."""
    rng = random.Random(seed)
    distinct = [" ".join(rng.sample(_WORDS, rng.randint(2, 5))) + f" {i}" for i in range(max(1, rows // 5))]
    texts: list[str | None] = []
    for _ in range(rows):
        roll = rng.random()
        if roll < 0.01:
            texts.append(rng.choice([None, "", "   "]))
            continue
        text = rng.choice(distinct)
        texts.append(rng.choice([text, text, text.upper(), text.title(), text.replace(" ", "  ")]))
    ids = list(range(1_000, 1_000 + 7 * rows, 7))
    rng.shuffle(ids)
    table = pl.DataFrame({"id": ids, "title": texts}, schema={"id": pl.Int64, "title": pl.String})
    table.write_parquet(path, row_group_size=max(1, rows // 8))
    return table


def write_job(path: Path, input_path: Path, output: Path, cache: Path, chunk_rows: int, spr: float) -> Path:
    job = {
        "input": str(input_path),
        "output": str(output),
        "id_column": "id",
        "text_column": "title",
        "labels": LABELS,
        "prompt": str(REPO / "prompts" / "classify_product.en.yaml"),
        "model": "fake",
        "backend": "fake",
        "fake": {"seconds_per_row": spr},
        "chunk_rows": chunk_rows,
        "cache": {"path": str(cache)},
    }
    path.write_text(yaml.safe_dump(job))
    return path


def _command(job: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet"]


def run_to_end(job: Path, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("ab") as sink:
        try:
            rc = subprocess.run(
                _command(job), stdout=sink, stderr=sink, timeout=RUN_TIMEOUT_S, cwd=REPO
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    return rc, time.perf_counter() - t0


def read_output(folder: Path) -> pl.DataFrame:
    parts = sorted((folder / "parts").glob("*.parquet"))
    if not parts:
        return pl.DataFrame(schema={"id": pl.Int64, **{c: pl.String for c in COMPARED}})
    return pl.concat([pl.read_parquet(p) for p in parts], how="vertical_relaxed").sort("id")


# --- the checks -----------------------------------------------------------------------------------


def compare(reference: pl.DataFrame, output: pl.DataFrame, ids: pl.Series) -> list[str]:
    """What is wrong with ``output``: rows missing, doubled or unknown, or different from the
    reference in any compared column. Empty when it equals the reference row for row."""
    problems = []
    if output.height != ids.len():
        problems.append(f"rows out {output.height} != rows in {ids.len()}")
    counts = output.group_by("id").len()
    doubled = counts.filter(pl.col("len") > 1)["id"]
    if doubled.len():
        problems.append(f"{doubled.len()} id(s) doubled, e.g. {doubled.sort().head(3).to_list()}")
    missing = ids.filter(~ids.is_in(output["id"].implode()))
    if missing.len():
        problems.append(f"{missing.len()} id(s) missing, e.g. {missing.sort().head(3).to_list()}")
    unknown = output["id"].filter(~output["id"].is_in(ids.implode()))
    if unknown.len():
        problems.append(f"{unknown.len()} id(s) not in the input, e.g. {unknown.sort().head(3).to_list()}")
    absent = [c for c in COMPARED if c not in output.columns]
    if absent:
        return [*problems, f"column(s) missing: {', '.join(absent)}"]
    joined = reference.select("id", *COMPARED).join(
        output.unique("id", keep="first").select("id", *COMPARED), on="id", how="inner", suffix="_out"
    )
    for column in COMPARED:
        differs = joined.filter(~pl.col(column).eq_missing(pl.col(f"{column}_out")))
        if differs.height:
            first = differs.row(0, named=True)
            problems.append(
                f"{differs.height} row(s) with another {column}, e.g. id {first['id']}: "
                f"{first[column]!r} expected, {first[column + '_out']!r} found"
            )
    return problems


def leftover_tmp(*folders: Path) -> list[str]:
    """Temporary files (``.name.tmp...``) under ``folders``: a crash left them, nothing removed them."""
    return sorted(
        str(p) for folder in folders if folder.exists() for p in folder.rglob(".*") if ".tmp" in p.name
    )


def check_status(folder: Path, rows: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", str(folder), "--json"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO,
    )  # fmt: skip
    if done.returncode != 0:
        return [f"labelmill status exited {done.returncode}: {done.stderr.strip()[-300:]}"]
    try:
        status = json.loads(done.stdout)
    except json.JSONDecodeError:
        return [f"labelmill status --json printed no JSON: {done.stdout[:200]!r}"]
    problems = []
    if status.get("state") != "finished":
        problems.append(f"labelmill status says {status.get('state')!r}, not 'finished'")
    if status.get("rows_done") != rows or status.get("chunks_done") != status.get("chunks_total"):
        problems.append(
            f"labelmill status counts {status.get('rows_done')} rows and {status.get('chunks_done')}/"
            f"{status.get('chunks_total')} chunks, not {rows} rows and all chunks"
        )
    return problems


# --- killing --------------------------------------------------------------------------------------


@dataclass
class Timing:
    """What the reference runs measured: when the first chunk was done and when the run ended."""

    first_chunk_s: float
    total_s: float
    chunks: int


@dataclass
class Kill:
    moment: str  # startup | random | chunk-done | late
    how: str  # process | group
    signal: signal.Signals
    wait_chunks: int = 0  # for chunk-done and late: kill once this many chunks are done ...
    delay_s: float = 0.0  # ... plus this long (for startup and random: after the start)

    def describe(self) -> str:
        when = f"{self.delay_s:.2f}s after start"
        if self.moment in ("chunk-done", "late"):
            when = f"{self.delay_s * 1000:.0f}ms after chunk {self.wait_chunks} done"
        return f"{self.signal.name} {self.how} {self.moment} ({when})"


def plan_kill(rng: random.Random, timing: Timing, done_before: int) -> Kill:
    roll = rng.random()
    how = "group" if rng.random() < 0.4 else "process"
    sig = signal.SIGKILL
    if rng.random() < 0.15:
        sig = rng.choice([signal.SIGTERM, signal.SIGINT])
    chunk_s = max(0.0, (timing.total_s - timing.first_chunk_s) / max(1, timing.chunks - 1))
    if roll < 0.15:  # while Python starts, the job is read and the run folder is set up
        return Kill("startup", how, sig, delay_s=rng.uniform(0.0, timing.first_chunk_s))
    if roll < 0.55 or done_before >= timing.chunks:  # within what is left of the run, or just after
        left_s = timing.first_chunk_s + (timing.chunks - done_before) * chunk_s
        return Kill("random", how, sig, delay_s=rng.uniform(0.0, left_s * 1.1))
    if roll < 0.8:  # right as a marker appears: the next chunk's part and cache writes are near
        wait = rng.randint(done_before + 1, timing.chunks)
        return Kill("chunk-done", how, sig, wait_chunks=wait, delay_s=rng.uniform(0.0, chunk_s))
    low = max(done_before + 1, int(timing.chunks * 0.75))
    wait = rng.randint(min(low, timing.chunks), timing.chunks)
    return Kill("late", how, sig, wait_chunks=wait, delay_s=rng.uniform(0.0, chunk_s))


def _done_chunks(folder: Path) -> int:
    markers = folder / "done"
    return sum(1 for p in markers.glob("chunk-*.json")) if markers.exists() else 0


def run_and_kill(job: Path, folder: Path, kill: Kill, chunks: int, log: Path) -> tuple[str, list[str]]:
    """Start the run, kill it as ``kill`` says; what happened, and any problem with stopping it."""
    with log.open("ab") as sink:
        proc = subprocess.Popen(_command(job), stdout=sink, stderr=sink, cwd=REPO, start_new_session=True)
    t0 = time.perf_counter()
    if kill.moment in ("chunk-done", "late"):
        while _done_chunks(folder) < kill.wait_chunks and proc.poll() is None:
            time.sleep(0.002)
        deadline = time.perf_counter() + kill.delay_s
    else:
        deadline = t0 + kill.delay_s
    while proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(min(0.002, max(0.0, deadline - time.perf_counter())))
    at = time.perf_counter() - t0
    if proc.poll() is not None:
        ended = f"ended before the kill (exit {proc.returncode}, {at:.2f}s)"
        return ended, [] if proc.returncode == 0 else [f"a run {ended}: see {log}"]
    try:
        if kill.how == "group":
            os.killpg(proc.pid, kill.signal)
        else:
            os.kill(proc.pid, kill.signal)
    except ProcessLookupError:
        pass
    problems = []
    try:
        rc = proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        problems.append(f"{kill.signal.name} did not stop the run within {STOP_TIMEOUT_S}s")
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    try:  # the run's own process group must be gone with it, or it may still hold the lock
        os.killpg(proc.pid, 0)
        problems.append("processes of the killed run's group survived it")
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return f"killed at {at:.2f}s with {_done_chunks(folder)}/{chunks} chunks done (exit {rc})", problems


# --- trials ---------------------------------------------------------------------------------------


@dataclass
class Trial:
    number: int
    cache: str
    kills: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        verdict = "ok" if not self.problems else "FAIL: " + "; ".join(self.problems)
        kills = " | ".join(self.kills)
        return f"trial {self.number:3d} [{self.cache} cache] {kills} -> {verdict} ({self.seconds:.1f}s)"


def run_trial(
    number: int,
    rng: random.Random,
    tmp: Path,
    args,
    reference: pl.DataFrame,
    ids: pl.Series,
    cold: Timing,
    warm: Timing,
) -> Trial:
    shared = number % 2 == 0
    trial = Trial(number, "shared" if shared else "fresh")
    here = tmp / f"trial-{number:03d}"
    here.mkdir()
    cache = tmp / "shared-cache" if shared else here / "cache"
    folder = here / "out"
    job = write_job(
        here / "job.yaml", tmp / "input.parquet", folder, cache, args.chunk_rows, args.seconds_per_row
    )
    log = here / "labelmill.log"
    inherited = set(leftover_tmp(cache))  # an earlier trial's leftovers were counted there
    # a cache that answers most texts makes the run much shorter: place the kills in that run
    timing = warm if any(cache.glob("*/seg-*.arrows")) else cold
    t0 = time.perf_counter()
    kills = rng.choices([1, 2, 3], weights=[5, 3, 2])[0]
    for _ in range(kills):
        kill = plan_kill(rng, timing, _done_chunks(folder))
        what, problems = run_and_kill(job, folder, kill, timing.chunks, log)
        trial.kills.append(f"{kill.describe()}: {what}")
        trial.problems += problems
    rc, _ = run_to_end(job, log)
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        trial.problems.append(f"the final run exited {rc}: {' / '.join(tail)}")
    trial.problems += compare(reference, read_output(folder), ids)
    left = [p for p in leftover_tmp(folder, cache) if p not in inherited]
    if left:
        names = ", ".join(str(Path(p).relative_to(tmp)) for p in left)
        trial.problems.append(f"temporary files left: {names}")
    trial.problems += check_status(folder, ids.len())
    trial.seconds = time.perf_counter() - t0
    return trial


def timed_run(job: Path, folder: Path, log: Path) -> tuple[int, Timing]:
    """An uninterrupted run: its exit code, when its first chunk was done and when it ended."""
    t0 = time.perf_counter()
    first = None
    with log.open("ab") as sink:
        proc = subprocess.Popen(_command(job), stdout=sink, stderr=sink, cwd=REPO)
        while proc.poll() is None:
            if first is None and _done_chunks(folder):
                first = time.perf_counter() - t0
            time.sleep(0.002)
    total = time.perf_counter() - t0
    return proc.returncode, Timing(first if first is not None else total, total, _done_chunks(folder))


def measure_reference(tmp: Path, args) -> tuple[pl.DataFrame, Timing, Timing, list[str]]:
    """The uninterrupted run on an empty cache (the reference output), and a second one on its
    warm cache, which must give the same output; both timed, to place the kills."""
    timings, problems = [], []
    for name in ("reference", "warm"):
        job = write_job(
            tmp / f"{name}.yaml", tmp / "input.parquet", tmp / name, tmp / "reference-cache",
            args.chunk_rows, args.seconds_per_row,
        )  # fmt: skip
        rc, timing = timed_run(job, tmp / name, tmp / f"{name}.log")
        if rc != 0:
            sys.exit(f"the {name} run failed (exit {rc}): see {tmp / f'{name}.log'}")
        timings.append(timing)
    reference = read_output(tmp / "reference")
    problems += [
        f"warm-cache run: {p}" for p in compare(reference, read_output(tmp / "warm"), reference["id"])
    ]
    return reference, timings[0], timings[1], problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk-rows", type=int, default=None, help="default: rows / 40, so 40 chunks")
    ap.add_argument(
        "--seconds-per-row", type=float, default=None,
        help="the fake engine's pace; default: about 2 s of answering per run",
    )  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args(argv)
    args.chunk_rows = args.chunk_rows or max(1, args.rows // 40)
    # each distinct text is answered once per run (about rows / 5 of them)
    if args.seconds_per_row is None:
        args.seconds_per_row = 2.0 / max(1, args.rows / 5)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))

    with tempfile.TemporaryDirectory(prefix="labelmill-kill-") as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ids = make_input(tmp / "input.parquet", args.rows, args.seed)["id"]
        reference, cold, warm, problems = measure_reference(tmp, args)
        if reference.height != args.rows:
            problems.append(f"the reference run has {reference.height} rows, not {args.rows}")
        say(
            f"reference: {args.rows} rows, {cold.chunks} chunks, first chunk done at "
            f"{cold.first_chunk_s:.2f}s, finished at {cold.total_s:.2f}s "
            f"({warm.total_s:.2f}s on a warm cache)"
        )
        for p in problems:
            say(f"reference FAIL: {p}")
        rng = random.Random(args.seed)
        trials = []
        for n in range(1, args.trials + 1):
            trial = run_trial(n, rng, tmp, args, reference, ids, cold, warm)
            trials.append(trial)
            say(trial.line())
        total = time.perf_counter() - t0
    failures = sum(1 for t in trials if t.problems) + (1 if problems else 0)
    median = statistics.median(t.seconds for t in trials) if trials else 0.0
    say(
        f"kill trials: {len(trials)}, failures: {failures}, "
        f"median {median:.2f} s per trial, total {total:.1f} s"
    )
    if args.json:
        figures = {
            "trials": len(trials),
            "failures": failures,
            "median_s_per_trial": round(median, 2),
            "total_s": round(total, 1),
            "rows": args.rows,
            "chunks": cold.chunks,
            "reference_s": round(cold.total_s, 2),
            "warm_cache_run_s": round(warm.total_s, 2),
            "kills": sum(len(t.kills) for t in trials),
            "reference_problems": problems,
            "failed": [
                {"trial": t.number, "cache": t.cache, "kills": t.kills, "problems": t.problems}
                for t in trials
                if t.problems
            ],
        }
        print(json.dumps(figures, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
