"""Damage a finished run folder or a result cache in seeded ways, run the job again, and say for
each trial whether the run recovered to the undamaged output, stopped with a named error, or did
something else (wrong output, a traceback). Run as a script, so that a crash by signal shows as
the process's exit status instead of taking the test runner down:

    python tests/corruption.py WORKDIR {cache,parts} [--trials N] [--seed S]

One JSON line per trial on stdout, then a summary line. Exits 0 when every trial either
recovered or stopped with a named error.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import logs
from pipeline.cache import verify_store
from pipeline.config import load_job
from pipeline.errors import LabelmillError
from pipeline.runner import run_job

PROMPT = Path(__file__).resolve().parents[1] / "prompts" / "classify_product.en.yaml"
LABELS = ["Coffee", "Tea", "Vitamin", "Shoes", "Garden", "Toys"]
COMPARED = ["id", "label", "confidence", "status", "error"]


def write_job(base: Path, rows: int, cache: bool, labels=LABELS) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    data = base / "input.parquet"
    if not data.exists():
        texts = [f"product {i % (rows // 3)} of the shop" if i % 17 else "" for i in range(rows)]
        pq.write_table(pa.table({"id": list(range(rows)), "title": texts}), data, row_group_size=64)
    spec = {
        "input": str(data),
        "output": str(base / "run"),
        "id_column": "id",
        "text_column": "title",
        "labels": list(labels),
        "prompt": str(PROMPT),
        "model": "fake",
        "backend": "fake",
        "chunk_rows": 50,
        "cache": {"enabled": cache, "path": str(base / "cache")},
    }
    path = base / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def output(run_folder: Path) -> list[dict]:
    parts = sorted((run_folder / "parts").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p, columns=COMPARED) for p in parts])
    return sorted(table.to_pylist(), key=lambda r: r["id"])


def attempt(job_path: Path, reference: list[dict]) -> dict:
    """Run the job; classify what happened against the reference output."""
    try:
        run_job(load_job(job_path))
    except LabelmillError as exc:
        return {"outcome": "named_error", "detail": exc.message[:300], "exit_code": exc.exit_code}
    except Exception:
        return {"outcome": "traceback", "detail": traceback.format_exc()[-600:]}
    try:
        got = output(Path(load_job(job_path).output))
    except Exception as exc:  # exit 0 with unreadable output is the worst case
        return {"outcome": "wrong", "detail": f"output unreadable after exit 0: {exc}"}
    if got != reference:
        differ = sum(a != b for a, b in zip(got, reference, strict=False)) + abs(len(got) - len(reference))
        return {"outcome": "wrong", "detail": f"{differ} row(s) differ ({len(got)} vs {len(reference)})"}
    return {"outcome": "equal"}


def flip(path: Path, position: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def finished_job(work: Path, name: str, cache: bool, kept: str) -> tuple[Path, Path, list[dict], Path]:
    """A job run to the end: its folder, job file, output, and an undamaged copy of ``kept``."""
    base = work / name
    job = write_job(base, rows=600, cache=cache)
    run_job(load_job(job))
    pristine = work / f"{name}-pristine"
    shutil.copytree(base / kept, pristine)
    return base, job, output(base / "run"), pristine


def cache_trials(work: Path, trials: int, rng: random.Random):
    base, job, reference, pristine = finished_job(work, "cache-job", True, "cache")
    files = sorted(pristine.rglob("seg-*.arrows"))
    assert files, "the job wrote no cache file"
    size = files[0].stat().st_size
    # the start (schema, first batch's header) gets its share; the rest is spread over the file
    positions = [rng.randrange(0, min(size, 400)) for _ in range(trials // 5)]
    positions += [rng.randrange(0, size) for _ in range(trials - len(positions))]
    for n, position in enumerate(positions):
        shutil.rmtree(base / "cache")
        shutil.copytree(pristine, base / "cache")
        target = sorted((base / "cache").rglob("seg-*.arrows"))[0]
        bit = rng.randrange(8)
        flip(target, position, bit)
        detected = any(r.get("problems") for r in verify_store(base / "cache"))
        results = []
        for _ in range(2 if n % 6 == 0 else 1):  # a later run must not be worse off than the first
            shutil.rmtree(base / "run", ignore_errors=True)
            results.append(attempt(job, reference))
        worst = next((r for r in results if r["outcome"] != "equal"), results[0])
        yield {
            "trial": n,
            "damage": f"cache byte {position}/{size} bit {bit}",
            "detected_by_verify": detected,
            **worst,
        }


def _parts(run: Path) -> list[Path]:
    return sorted((run / "parts").glob("part-*.parquet"))


def _markers(run: Path) -> list[Path]:
    return sorted((run / "done").glob("chunk-*.json"))


def part_damages(rng: random.Random, flips: int):
    """(description, function of the run folder, whether a named error is the right outcome)."""

    def flip_part(run: Path) -> None:
        part = rng.choice(_parts(run))
        flip(part, rng.randrange(part.stat().st_size), rng.randrange(8))

    def truncate(fraction):
        def damage(run: Path) -> None:
            part = rng.choice(_parts(run))
            data = part.read_bytes()
            part.write_bytes(data[: int(len(data) * fraction)])

        return damage

    def zero_fill(run: Path) -> None:
        part = rng.choice(_parts(run))
        data = bytearray(part.read_bytes())
        start = rng.randrange(len(data) // 2)
        data[start : start + len(data) // 4] = bytes(len(data) // 4)
        part.write_bytes(bytes(data))

    def copy_part(run: Path) -> None:
        a, b = rng.sample(_parts(run), 2)
        shutil.copyfile(a, b)

    def copy_part_and_marker(run: Path) -> None:
        i, j = rng.sample(range(len(_parts(run))), 2)
        shutil.copyfile(_parts(run)[i], _parts(run)[j])
        shutil.copyfile(_markers(run)[i], _markers(run)[j])

    def delete_marker(run: Path) -> None:
        rng.choice(_markers(run)).unlink()

    def delete_part(run: Path) -> None:
        rng.choice(_parts(run)).unlink()

    def garbage_marker(run: Path) -> None:
        rng.choice(_markers(run)).write_bytes(bytes(rng.randrange(256) for _ in range(40)))

    def truncated_marker(run: Path) -> None:
        marker = rng.choice(_markers(run))
        marker.write_bytes(marker.read_bytes()[:25])

    def flip_marker(run: Path) -> None:
        marker = rng.choice(_markers(run))
        flip(marker, rng.randrange(marker.stat().st_size), rng.randrange(7))

    def delete_manifest(run: Path) -> None:
        (run / "run.json").unlink()

    def garbage_manifest(run: Path) -> None:
        (run / "run.json").write_text('{"fingerprint": ')

    def flip_manifest(run: Path) -> None:
        path = run / "run.json"
        flip(path, rng.randrange(path.stat().st_size), rng.randrange(7))

    damages = [(f"bit flip in a part #{i}", flip_part, False) for i in range(flips)]
    damages += [
        ("part truncated to half", truncate(0.5), False),
        ("part truncated to 0 bytes", truncate(0.0), False),
        ("part truncated by 1 byte", truncate(0.999), False),
        ("part zero-filled in the middle", zero_fill, False),
        ("part copied over another", copy_part, False),
        ("part and marker copied over another", copy_part_and_marker, False),
        ("marker deleted", delete_marker, False),
        ("part deleted", delete_part, False),
        ("marker replaced by garbage", garbage_marker, False),
        ("marker cut short", truncated_marker, False),
        ("bit flip in a marker", flip_marker, False),
        ("run.json deleted", delete_manifest, False),
        ("run.json cut short", garbage_manifest, False),
        ("bit flip in run.json", flip_manifest, None),
    ]
    return damages


def parts_trials(work: Path, flips: int, rng: random.Random):
    base, job, reference, pristine = finished_job(work, "parts-job", False, "run")
    n = 0
    for description, damage, error_expected in part_damages(rng, flips):
        shutil.rmtree(base / "run")
        shutil.copytree(pristine, base / "run")
        damage(base / "run")
        result = attempt(job, reference)
        # exit 0 must mean the right output; a named error is acceptable where the right answer
        # can't be known (a flipped bit that turns run.json into another job's manifest)
        if error_expected is False and result["outcome"] == "named_error":
            result = {**result, "outcome": "refused_needlessly"}
        yield {"trial": n, "damage": description, **result}
        n += 1
    # run.json lost and the job changed meanwhile: the old parts must not pass for the new job's
    shutil.rmtree(base / "run")
    shutil.copytree(pristine, base / "run")
    (base / "run" / "run.json").unlink()
    changed = write_job(base, rows=600, cache=False, labels=[*LABELS[:-1], "Books"])
    result = attempt(changed, reference)
    ok = result["outcome"] == "named_error"
    yield {
        "trial": n,
        "damage": "run.json deleted and the labels changed",
        **result,
        "outcome": "named_error" if ok else "wrong",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("kind", choices=["cache", "parts"])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logs.setup("text", 40)  # only errors: the trials' own lines are the output
    rng = random.Random(args.seed)
    trials = (
        cache_trials(args.workdir, args.trials, rng)
        if args.kind == "cache"
        else parts_trials(args.workdir, args.trials, rng)
    )
    counts: dict[str, int] = {}
    for result in trials:
        print(json.dumps(result), flush=True)
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    bad = sum(v for k, v in counts.items() if k not in ("equal", "named_error"))
    print(json.dumps({"summary": counts, "failures": bad}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
