"""Compact JSON answers: the same extraction job with and without whitespace in the JSON, decode
tokens per row and the values each gives.

    python bench/compact_json.py --rows 50 --out compact-json.json     # the figure
    python bench/compact_json.py --rows 4 --out /tmp/c.json            # smoke test

SmolLM2-135M (alias ``smollm2-135m``: ``labelmill models fetch smollm2-135m``) on vLLM's CPU build,
with the attributes, prompt and engine settings of ``jobs/products-oa-mine-attributes.yaml`` (the
engine in the labelmill process, and ``--memory`` of the RAM for its KV cache: speed only); the
workload is ``--rows`` OA-Mine titles spread evenly over ``sample_data/oa_mine_products.parquet``
(every n-th row, so every category is in). Each mode is one ``labelmill run`` in its own process
(vLLM 0.32 sets the whitespace rule for the whole engine, at start), one chunk, result cache and
dedupe off, so every row goes to the model: ``engine.compact_json: false`` (whitespace allowed,
vLLM's default: the model indents as it likes) and ``true`` (labelmill's default).

Reported per mode: mean output (decode) tokens per row answered by the model, statuses, rows
whose raw answer has whitespace outside JSON strings, and F1 against the gold attributes
(``labelmill eval``). Then the ratio of the two means; the pretty answers' own values written
compactly and tokenised by the model's tokenizer (what the whitespace alone costs, values held
equal); and, row by row, whether the parsed values are equal. Greedy decoding can still give other
values in the two modes, since the model continues a different text (``{"brand":"`` is not
``{\n  "brand": "``); those rows are listed with both answers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCE = REPO / "sample_data" / "oa_mine_products.parquet"
JOB = REPO / "jobs" / "products-oa-mine-attributes.yaml"
MODES = {"pretty": False, "compact": True}
# The engine core and the model in the labelmill process: starts in seconds on a small CPU, and
# changes nothing about the answers.
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def whitespace_outside_strings(raw: str) -> bool:
    return bool(re.search(r"\s", _STRING.sub('""', raw)))


def write_job(work: Path, rows: int, mode: str, memory: float) -> Path:
    if not (work / "items.parquet").exists():
        table = pq.read_table(SOURCE, columns=["id", "title"])
        step = max(len(table) // rows, 1)
        pq.write_table(table.take(list(range(0, step * rows, step))[:rows]), work / "items.parquet")
    shipped = yaml.safe_load(JOB.read_text())
    job = {
        "input": str(work / "items.parquet"), "output": str(work / f"run-{mode}"), "id_column": "id",
        "text_column": "title", "task": "extract", "attributes": shipped["attributes"],
        "prompt": str(REPO / shipped["prompt"]), "model": "smollm2-135m", "backend": "vllm",
        "engine": {**shipped["engine"], "distributed_executor_backend": "uni",
                   "gpu_memory_utilization": memory, "compact_json": MODES[mode]},
        "chunk_rows": max(rows, 1), "cache": {"enabled": False}, "dedupe": {"enabled": False},
    }  # fmt: skip
    path = work / f"job-{mode}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False, allow_unicode=True))
    return path


def run_mode(work: Path, rows: int, mode: str, memory: float) -> dict:
    job_file = write_job(work, rows, mode, memory)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet"],
        cwd=REPO, env={**os.environ, **IN_PROCESS},
    )  # fmt: skip
    if done.returncode not in (0, 6):  # 6: finished, some rows invalid (counted below)
        sys.exit(f"labelmill run ({mode}) failed with exit code {done.returncode}")
    names = [a["name"] for a in yaml.safe_load(JOB.read_text())["attributes"]]
    run = work / f"run-{mode}"
    out = pq.read_table(run / "parts").to_pylist()
    scored = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "eval", str(run), "--gold", str(SOURCE), "--on", "id",
         "--gold-column", "attributes", "--no-charts"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if scored.returncode == 0:
        overall = json.loads((run / "eval" / "eval.json").read_text())["extraction"]["overall"]
        f1 = {kind: round(overall[kind]["f1"], 4) for kind in ("exact", "normalised")}
    else:  # the token figures stand without it
        f1 = {"error": (scored.stderr or scored.stdout).strip().splitlines()[-1:]}
    answered = [r for r in out if r["raw_answer"] is not None]
    statuses: dict[str, int] = {}
    for r in out:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    tokens = [r["output_tokens"] for r in answered]
    return {
        "rows": len(out),
        "answered": len(answered),
        "status_counts": statuses,
        "output_tokens_total": sum(tokens),
        "output_tokens_mean": round(sum(tokens) / len(tokens), 2) if tokens else None,
        "answers_with_whitespace_outside_strings": sum(
            whitespace_outside_strings(r["raw_answer"]) for r in answered
        ),
        "f1_vs_gold": f1,
        "example_raw_answer": answered[0]["raw_answer"] if answered else None,
        "_rows": {
            r["id"]: {"status": r["status"], "raw": r["raw_answer"], **{n: r[n] for n in names}} for r in out
        },
        "_names": names,
    }


def token_anatomy(pretty: dict, compact: dict) -> dict:
    """Answers tokenised again by the model's tokenizer. In the pretty answers, the tokens that are
    whitespace only (newline and indentation): what compact JSON saves with the values held
    equal, since the model spells the rest the same way in both modes (``":`` then `` "`` or
    ``"``). And the compact answers' decoded tokens against their canonical tokenisation: the
    model spells ``":"`` as ``":`` + ``"`` (its habit from ``": "``), so compact text is not
    decoded in its fewest tokens."""
    from transformers import AutoTokenizer

    from pipeline.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"), local_files_only=True)

    def pieces(raw: str) -> list[str]:
        ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
        return [tokenizer.decode([i]) for i in ids]

    pretty_raw = [r["raw"] for r in pretty["_rows"].values() if r["raw"] is not None]
    compact_raw = [r["raw"] for r in compact["_rows"].values() if r["raw"] is not None]
    blank = [sum(not p.strip() for p in pieces(raw)) for raw in pretty_raw]
    canonical = [len(pieces(raw)) for raw in compact_raw]
    mean = lambda xs: round(sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    decoded = pretty["output_tokens_mean"]
    return {
        "pretty_whitespace_only_tokens_mean": mean(blank),
        "share_of_pretty_output_tokens": round(mean(blank) / decoded, 4) if blank and decoded else None,
        "same_values_compact_output_tokens_mean": round(decoded - mean(blank), 2) if blank else None,
        "same_values_ratio": round((decoded - mean(blank)) / decoded, 4) if blank and decoded else None,
        "compact_canonical_tokens_mean": mean(canonical),
        "compact_output_tokens_mean": compact["output_tokens_mean"],
    }


def compare(pretty: dict, compact: dict) -> dict:
    names = pretty["_names"]
    same, differ = 0, []
    per_attribute = dict.fromkeys(names, 0)
    for key, a in pretty["_rows"].items():
        b = compact["_rows"][key]
        for n in names:
            per_attribute[n] += a[n] == b[n]
        if all(a[n] == b[n] for n in names) and a["status"] == b["status"]:
            same += 1
        else:
            changed = [n for n in names if a[n] != b[n]]
            differ.append({"id": key, "pretty": a, "compact": b, "attributes_differing": changed})
    return {
        "rows_with_equal_values": same,
        "rows_with_different_values": len(differ),
        "equal_per_attribute": per_attribute,
        "differences": differ,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument(
        "--memory", type=float, default=0.1, help="share of RAM for the KV cache (speed only, not answers)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--work", type=Path, help="keep the runs here; running again with the same --rows reuses them"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="labelmill-compact-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {mode: run_mode(work, args.rows, mode, args.memory) for mode in MODES}
    pretty, compact = results["pretty"], results["compact"]
    ratio = (
        round(compact["output_tokens_mean"] / pretty["output_tokens_mean"], 4)
        if pretty["output_tokens_mean"] and compact["output_tokens_mean"]
        else None
    )
    report = {
        "workload": f"{args.rows} OA-Mine titles, jobs/products-oa-mine-attributes.yaml, SmolLM2-135M, "
        "vLLM CPU, greedy",
        **{mode: {k: v for k, v in r.items() if not k.startswith("_")} for mode, r in results.items()},
        "output_tokens_ratio_compact_to_pretty": ratio,
        "tokens": token_anatomy(pretty, compact),
        "values": compare(pretty, compact),
    }
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    for mode in MODES:
        r = report[mode]
        print(
            f"{mode:8} mean output tokens/row {r['output_tokens_mean']} (total {r['output_tokens_total']}, "
            f"{r['answered']} answered), statuses {r['status_counts']}, "
            f"whitespace outside strings in {r['answers_with_whitespace_outside_strings']}"
        )
        print(f"{'':8} F1 against gold {r['f1_vs_gold']}")
    equal = report["values"]["rows_with_equal_values"]
    tokens = report["tokens"]
    print(f"ratio compact/pretty {ratio}; rows with equal values {equal}/{args.rows}")
    print(
        f"pretty answers: {tokens['pretty_whitespace_only_tokens_mean']} whitespace-only tokens per row "
        f"({tokens['share_of_pretty_output_tokens']:.1%} of output tokens): with the values held equal, "
        f"compact takes {tokens['same_values_compact_output_tokens_mean']} "
        f"(ratio {tokens['same_values_ratio']})"
    )
    print(
        f"compact answers: decoded in {tokens['compact_output_tokens_mean']} tokens, "
        f"{tokens['compact_canonical_tokens_mean']} when tokenised again; report in {args.out}"
    )


if __name__ == "__main__":
    main()
