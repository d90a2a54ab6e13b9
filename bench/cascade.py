"""The cascade against its own promise: model calls saved, and agreement kept.

    python bench/cascade.py                     # OA-Mine, WANDS, and an unlearnable teacher; 5 seeds
    python bench/cascade.py --seeds 3 --json    # figures as JSON on stdout

Three cases, each run with and without ``cascade:`` (target agreement 0.95, delta 0.05):

    oa-mine      1,452 product titles, 10 categories. The "LLM" is a real OpenAI-style server on
                 127.0.0.1 that answers each title's gold category (``tests/teacher_server.py``):
                 a strong teacher whose labels a student can learn
    wands        480 search queries, 189 product classes (``--wands``: the full query file; the
                 300 shipped ones otherwise), the same kind of teacher
    unlearnable  the OA-Mine titles labelled by the fake backend, whose label is a hash of the
                 text: nothing a student can learn

For each: the share of rows whose answer cost a model call (the sample included), the agreement of
the final labels with the teacher's own labels over all rows (every row is also labelled by the
teacher alone, to measure it), the student's bound, and model calls and projected dollars per 1M
rows with and without the cascade at an API price of the price table (``--price``), as ratios.
Dollars are the teacher's measured tokens per call times the price; the student's own cost (CPU
seconds to train and to label) is printed beside it, not priced. Medians over ``--seeds`` seeds
(the sample and the held-out split differ by seed). The teacher server and the fake are test
doubles: these figures are about routing, not about any model's quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from teacher_server import TeacherServer  # noqa: E402

from pipeline.config import parse_job  # noqa: E402
from pipeline.costs import api_cost, load_prices  # noqa: E402
from pipeline.runner import run_job  # noqa: E402

OA_MINE = REPO / "sample_data" / "oa_mine_products.parquet"
WANDS = REPO / "sample_data" / "wands_queries.parquet"
WANDS_CLASSES = REPO / "sample_data" / "wands" / "classes.txt"
KEY_ENV = "LABELMILL_BENCH_TEACHER_KEY"


def _cases(wands_file: Path | None) -> dict[str, dict]:
    oa = pl.read_parquet(OA_MINE)
    oa_labels = sorted(oa["category"].unique().to_list())
    if wands_file is not None:
        wands = pl.read_csv(wands_file, separator="\t").select(
            pl.col("query_id").cast(pl.String), "query", "query_class"
        )
        wands = wands.filter(pl.col("query_class").is_not_null())
    else:
        wands = pl.read_parquet(WANDS)
    return {
        "oa-mine": {
            "data": oa.select("id", "title", "category"), "text": "title", "gold": "category",
            "labels": {"labels": oa_labels}, "prompt": "classify_product.en", "teacher": True,
        },
        "wands": {
            "data": wands.rename({"query_id": "id"}), "text": "query", "gold": "query_class",
            "labels": {"labels": sorted(set(WANDS_CLASSES.read_text().split("\n")) - {""}
                                        | set(wands["query_class"].to_list()))},
            "prompt": "classify_keyword.en", "teacher": True,
            "prompt_vars": {"shop": "an online furniture and home goods store"},
        },
        "unlearnable": {
            "data": oa.select("id", "title", "category"), "text": "title", "gold": "category",
            "labels": {"labels": oa_labels}, "prompt": "classify_product.en", "teacher": False,
        },
    }  # fmt: skip


def _job(case: dict, work: Path, name: str, server: TeacherServer | None, cascade: dict | None) -> dict:
    data = work / "input.parquet"
    if not data.exists():
        work.mkdir(parents=True, exist_ok=True)
        case["data"].write_parquet(data)
    spec = {
        "input": str(data), "output": str(work / name), "id_column": "id", "text_column": case["text"],
        "keep_columns": [case["gold"]], "prompt": case["prompt"], "chunk_rows": 500,
        "cache": {"path": str(work / f"cache-{name}")}, "prompt_vars": case.get("prompt_vars", {}),
        **case["labels"],
    }  # fmt: skip
    if server is not None:
        api = {"base_url": server.base_url, "api_key_env": KEY_ENV, "max_concurrency": 16}
        spec |= {"backend": "openai", "model": "teacher", "api": api}
    else:
        spec |= {"backend": "fake", "model": "fake"}
    if cascade is not None:
        spec["cascade"] = cascade
    return spec


def _labels(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((folder / "parts").glob("*.parquet")))


def run_case(name: str, case: dict, seed: int, sample_rows: int, work: Path) -> dict:
    answers = dict(zip(case["data"][case["text"]], case["data"][case["gold"]], strict=True))
    with TeacherServer(answers, key=os.environ[KEY_ENV]) as server:
        srv = server if case["teacher"] else None
        alone = run_job(parse_job(_job(case, work, f"alone-{seed}", srv, None)), restart=True)
        alone_calls = server.requests
        cascade = {"target_agreement": 0.95, "delta": 0.05, "seed": seed, "sample_rows": sample_rows}
        t0 = time.perf_counter()
        routed = run_job(parse_job(_job(case, work, f"cascade-{seed}", srv, cascade)), restart=True)
        seconds = time.perf_counter() - t0
    teacher, final = _labels(work / f"alone-{seed}"), _labels(work / f"cascade-{seed}")
    rows = final.height
    calls = routed["model_calls"] + routed["sample_model_calls"]
    c = routed["cascade"]
    return {
        "case": name,
        "seed": seed,
        "rows": rows,
        "model_calls_without": alone["model_calls"],
        "model_calls_with": calls,
        "teacher_requests_with": (server.requests - alone_calls) if case["teacher"] else None,
        "share_to_model": calls / rows,
        "agreement_with_teacher": float((final["label"] == teacher["label"]).mean()),
        "student_share": c["student_share"],
        "student_agreement_with_teacher": _agreement(final, teacher, final["source"] == "student"),
        "threshold": c["threshold"],
        "agreement_bound": c["agreement_bound"],
        "why_no_threshold": c["why_no_threshold"],
        "run_seconds": round(seconds, 2),
        "tokens_per_call": (
            alone["prompt_tokens"] / max(alone["model_calls"], 1),
            alone["output_tokens"] / max(alone["model_calls"], 1),
        ),
    }


def _agreement(final: pl.DataFrame, teacher: pl.DataFrame, rows: pl.Series) -> float | None:
    if not rows.any():
        return None
    return float((final["label"].filter(rows) == teacher["label"].filter(rows)).mean())


def summarise(results: list[dict], price) -> dict:
    out = {}
    for case in dict.fromkeys(r["case"] for r in results):
        rs = [r for r in results if r["case"] == case]
        med = {k: statistics.median(r[k] for r in rs) for k in
               ("share_to_model", "agreement_with_teacher", "student_share", "run_seconds")}  # fmt: skip
        calls_ratio = statistics.median(r["model_calls_with"] / r["model_calls_without"] for r in rs)
        prompt, output = rs[0]["tokens_per_call"]
        usd_call = api_cost(price, prompt, 0, output) if price else None
        per_m_without = usd_call * statistics.median(r["model_calls_without"] / r["rows"] for r in rs) * 1e6 \
            if price else None  # fmt: skip
        per_m_with = usd_call * statistics.median(r["model_calls_with"] / r["rows"] for r in rs) * 1e6 \
            if price else None  # fmt: skip
        out[case] = {
            "seeds": len(rs),
            "rows": rs[0]["rows"],
            "median_share_to_model": round(med["share_to_model"], 4),
            "shares_to_model": [round(r["share_to_model"], 4) for r in rs],
            "median_agreement_with_teacher": round(med["agreement_with_teacher"], 4),
            "min_agreement_with_teacher": round(min(r["agreement_with_teacher"] for r in rs), 4),
            "median_student_share": round(med["student_share"], 4),
            "model_calls_ratio_with_to_without": round(calls_ratio, 4),
            "usd_per_million_rows_without": round(per_m_without, 2) if price else None,
            "usd_per_million_rows_with": round(per_m_with, 2) if price else None,
            "usd_ratio_with_to_without": round(per_m_with / per_m_without, 4) if price else None,
            "bounds": [r["agreement_bound"] for r in rs],
            "thresholds": [r["threshold"] for r in rs],
            "why_no_threshold": sorted({r["why_no_threshold"] for r in rs if r["why_no_threshold"]}),
            "median_run_seconds_with_cascade": round(med["run_seconds"], 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sample-rows", type=int, default=300)
    parser.add_argument("--cases", default="oa-mine,wands,unlearnable")
    parser.add_argument(
        "--wands", type=Path, default=None, help="WANDS query.csv (tab-separated) for all 480"
    )
    parser.add_argument("--price", default="openai/gpt-4o-mini", help="an api id of prices.yaml, or ''")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault(KEY_ENV, "bench-teacher-key")
    price = load_prices().get(args.price) if args.price else None
    cases = _cases(args.wands)
    results = []
    with tempfile.TemporaryDirectory(prefix="labelmill-cascade-") as tmp:
        os.environ["LABELMILL_HOME"] = str(Path(tmp) / "home")
        for name in args.cases.split(","):
            for seed in range(args.seeds):
                r = run_case(name, cases[name], seed, args.sample_rows, Path(tmp) / name)
                results.append(r)
                print(f"{name} seed {seed}: {r['share_to_model']:.1%} of rows to the model, agreement "
                      f"{r['agreement_with_teacher']:.4f}, threshold {r['threshold']}, bound "
                      f"{r['agreement_bound']}", file=sys.stderr)  # fmt: skip
    table = summarise(results, price)
    if args.json:
        print(json.dumps({"price": args.price, "cases": table, "runs": results}, indent=2))
        return
    for name, s in table.items():
        line = (
            f"{name}: {s['rows']} rows, {s['seeds']} seeds: median {s['median_share_to_model']:.1%} of "
            f"rows to the model (model calls with/without: {s['model_calls_ratio_with_to_without']:.3f}); "
            f"agreement with the teacher over all rows median {s['median_agreement_with_teacher']:.4f}, "
            f"min {s['min_agreement_with_teacher']:.4f}"
        )
        if price:
            line += (
                f"; ${s['usd_per_million_rows_with']:.2f} vs ${s['usd_per_million_rows_without']:.2f} "
                f"per 1M rows at {args.price} (ratio {s['usd_ratio_with_to_without']:.3f})"
            )
        print(line)


if __name__ == "__main__":
    main()
