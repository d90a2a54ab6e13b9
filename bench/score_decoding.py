"""Scored labels against constrained decoding: the same job, rows and engine, both ways.

    python bench/score_decoding.py jobs/products-oa-mine.yaml --gold-column category --rows 150
    python bench/score_decoding.py jobs/queries-wands.yaml --gold-column query_class --rows 300
    python bench/score_decoding.py JOB --rows 8 --repeats 1 --out /tmp/s.json      # smoke test

``--rows`` rows of the job's input (seeded sample, in input order) are labelled by ``labelmill run``
(``pipeline.runner.run_job``, the path a user's run takes) with ``decoding: constrained``, with
``decoding: score`` and with ``score`` without calibration (``score_calibration: none``),
``--repeats`` times each, alternating the order; cache and dedupe off,
so every row reaches the model. One engine serves every run (the mode is the task's, not the
engine's), and its prefix cache is emptied before each run, so no run finds the rows' prompts
cached by the one before; the shared prompt prefix is cached within each run, as in production.

Printed (and written to ``--out`` as JSON): rows/s of each run (labelling time, engine start-up
left out), the median per mode and the ratio of the medians; decode steps per row (constrained:
generated tokens, end included; score: scoring requests) and, for score, the share of rows that
needed more than one step; label agreement between the modes; with ``--gold-column``: accuracy
and expected calibration error (ECE, ``labelmill eval``'s) of each mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = {
    "constrained": {"decoding": "constrained"},
    "score": {"decoding": "score"},
    "score_uncalibrated": {"decoding": "score", "score_calibration": "none"},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("job")
    parser.add_argument("--rows", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gold-column", default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE, as labelmill run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import polars as pl

    from pipeline.config import load_job
    from pipeline.evaluation import evaluate
    from pipeline.plan import make_backend, plan_job
    from pipeline.runner import run_job

    job = load_job(args.job, sets=args.sets)
    work = Path(tempfile.mkdtemp(prefix="score-decoding-"))
    frame = pl.read_parquet(job.input)
    rows = min(args.rows, frame.height)
    picked = frame.with_row_index("_n").sample(rows, seed=args.seed).sort("_n").drop("_n")
    sample = work / "sample.parquet"
    picked.write_parquet(sample)
    base = job.with_changes(
        input=str(sample), cache={"enabled": False}, dedupe={"enabled": False}, chunk_rows=max(rows, 1)
    )
    jobs = {mode: base.with_changes(**keys) for mode, keys in MODES.items()}
    plans = {mode: plan_job(jobs[mode]) for mode in MODES}
    backend = make_backend(plans["score"])
    # warm-up, untimed: the engine's first passes (and each mode's first request) are slower
    warm = picked[job.text_column].head(4).cast(pl.String)
    for mode in MODES:  # (calibration reads its content-free prompts here, once per label set)
        backend.answer(plans[mode].prompt, warm, plans[mode].request)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    outputs: dict[str, pl.DataFrame] = {}
    try:
        for r in range(args.repeats):
            for mode in list(MODES) if r % 2 == 0 else list(MODES)[::-1]:
                if backend._llm is not None:
                    backend._llm.reset_prefix_cache()
                folder = work / f"{mode}-{r}"
                summary = run_job(jobs[mode].with_changes(output=str(folder)), backend=backend)
                runs[mode].append({"rows_per_second": summary["rows_per_second"], "folder": str(folder)})
                print(f"run {r + 1} {mode:11}: {summary['rows_per_second']} rows/s", file=sys.stderr)
                outputs[mode] = pl.read_parquet(folder / "parts" / "*.parquet")
    finally:
        backend.close()

    report: dict = {"job": args.job, "rows": rows, "repeats": args.repeats, "modes": {}}
    for mode in MODES:
        out = outputs[mode]
        answered = out.filter(pl.col("status") == "ok")
        steps = answered["output_tokens"]
        entry = {
            "rows_per_second": [run["rows_per_second"] for run in runs[mode]],
            "median_rows_per_second": statistics.median(run["rows_per_second"] for run in runs[mode]),
            "statuses": dict(out["status"].value_counts().iter_rows()),
            "mean_decode_steps": round(steps.mean(), 3) if len(steps) else None,
            "rows_over_one_step": round((steps > 1).mean(), 4) if len(steps) else None,
        }
        if args.gold_column:
            metrics = evaluate(
                runs[mode][-1]["folder"], sample, on=job.id_column, gold_column=args.gold_column, charts=False
            )
            scored = metrics.get("classification") or metrics.get("classification_sets") or {}
            entry["accuracy"] = scored.get("accuracy")
            entry["ece"] = (scored.get("calibration") or {}).get("ece")
        report["modes"][mode] = entry
    c, s = report["modes"]["constrained"], report["modes"]["score"]
    report["speed_ratio_score_over_constrained"] = round(
        s["median_rows_per_second"] / c["median_rows_per_second"], 3
    )
    joined = outputs["score"].join(outputs["constrained"], on=job.id_column, suffix="_c")
    report["label_agreement"] = round((joined["label"] == joined["label_c"]).fill_null(False).mean(), 4)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
