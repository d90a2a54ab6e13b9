"""OpenAI batch JSONL: ``labelmill export`` writes a job's requests, ``labelmill import`` reads the
answers back into the normal run folder.

This is how a job gets a provider's batch discount (OpenAI's Batch API halves the price) or runs
through ``vllm run-batch``. Each request line is
``{"custom_id": "c<chunk>-r<row>", "method": "POST", "url": "/v1/chat/completions", "body": ...}``
with the same body the ``openai`` backend would send. ``custom_id`` names the chunk and the row's
position in it, so answers map back to input rows whatever their order in the result files.

Import writes parts and markers exactly like ``labelmill run`` (same fingerprint, same output
columns). A request with no answer, or an answer that failed, becomes a row with status ``error``:
a later ``labelmill run`` of the same job sends just those rows through the live API.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.backends.base import Completion, answers_table
from pipeline.backends.openai import parse_completion, request_body, wraps_label
from pipeline.config import JobConfig
from pipeline.errors import ConfigError, InputFormatError
from pipeline.io import read_chunk, write_text_atomic
from pipeline.runner import (
    ChunkStats,
    chunk_marker,
    make_backend,
    open_run,
    plan_job,
    prepare_chunk,
    summarise,
    text_budget,
)
from pipeline.state import RunFolder

MAX_REQUESTS = 50_000
"""OpenAI's limit of requests per batch file."""
MAX_BYTES = 200 * 1024 * 1024
"""OpenAI's limit of bytes per batch file."""
URL = "/v1/chat/completions"
_CUSTOM_ID = re.compile(r"^c(\d+)-r(\d+)$")


def _require_api(job: JobConfig) -> None:
    if job.backend != "openai" or job.api is None:
        raise ConfigError(
            "export and import need a job with backend: openai and an api: section",
            hint="the api section decides the request body (model name, constraint, extra_body)",
        )


def export(
    job: JobConfig, out_dir: str | Path, max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES
) -> dict:
    """Write every row that needs the model as batch request lines; returns counts and file names."""
    _require_api(job)
    plan = plan_job(job)
    backend = make_backend(plan)
    budget = text_budget(plan, backend)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    lines: list[bytes] = []
    size = 0
    total = 0

    def flush() -> None:
        nonlocal lines, size
        if lines:
            path = out / f"batch-{len(files):05d}.jsonl"
            write_text_atomic(b"".join(lines).decode("utf-8"), path)
            files.append(path.name)
        lines, size = [], 0

    for chunk in plan.chunks:
        table = read_chunk(plan.files[chunk.file_index], chunk, plan.read_columns)
        pending = prepare_chunk(plan, backend, table, chunk, budget)
        for i, messages in zip(pending.todo, pending.conversations(plan), strict=True):
            body = request_body(job, plan.model, messages, plan.task.constraint(), plan.max_tokens)
            request = {"custom_id": f"c{chunk.index}-r{i}", "method": "POST", "url": URL, "body": body}
            line = json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n"
            if lines and (len(lines) >= max_requests or size + len(line) > max_bytes):
                flush()
            lines.append(line)
            size += len(line)
            total += 1
    flush()
    return {"requests": total, "files": files, "rows": plan.rows, "folder": str(out)}


def read_results(paths: Iterable[str | Path], wrapped_label: bool) -> dict[str, Completion]:
    """Batch output lines -> Completion by custom_id. A failed line becomes an error Completion."""
    answers: dict[str, Completion] = {}
    for path in paths:
        path = Path(path)
        try:
            handle = path.open(encoding="utf-8")
        except OSError as exc:
            raise InputFormatError(f"cannot read batch results {path}: {exc}") from None
        with handle:
            for n, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                    custom_id = line["custom_id"]
                except (ValueError, KeyError, TypeError):
                    raise InputFormatError(
                        f"{path}, line {n}: not a batch result line (JSON with custom_id)",
                        hint="pass the output files of the batch, not its input files",
                    ) from None
                answers[custom_id] = _completion(line, wrapped_label)
    return answers


def _completion(line: dict, wrapped_label: bool) -> Completion:
    response = line.get("response") or {}
    status = response.get("status_code")
    if line.get("error") or status != 200:
        reason = line.get("error") or (response.get("body") or {}).get("error")
        where = f"HTTP {status}" if status is not None else "no response"
        reason = json.dumps(reason)[:300]
        return Completion("", None, 0, 0, None, error=f"batch request failed ({where}): {reason}")
    completion = parse_completion(response.get("body") or {}, wrapped_label)
    if completion is None:
        return Completion("", None, 0, 0, None, error="batch result has no chat completion body")
    return completion


def import_results(job: JobConfig, result_files: list[str], restart: bool = False) -> dict:
    """Turn batch result files into the job's run folder (parts, markers, summary)."""
    _require_api(job)
    started = time.perf_counter()
    plan = plan_job(job)
    answers = read_results(result_files, wraps_label(job.api.constraint, plan.task.constraint()))
    unknown = [c for c in answers if not _CUSTOM_ID.match(c)]
    if unknown:
        raise InputFormatError(f"batch results hold custom_ids labelmill did not write, e.g. {unknown[:3]}")
    backend = make_backend(plan)
    budget = text_budget(plan, backend)
    folder = RunFolder(job.output)
    missing = 0
    with folder.lock():
        open_run(folder, plan, restart)
        for chunk in plan.chunks:
            table = read_chunk(plan.files[chunk.file_index], chunk, plan.read_columns)
            pending = prepare_chunk(plan, backend, table, chunk, budget)
            completions = []
            for i in pending.todo:
                answer = answers.get(f"c{chunk.index}-r{i}")
                if answer is None:
                    missing += 1
                    answer = Completion("", None, 0, 0, None, error="no answer in the batch result files")
                completions.append(answer)
            table = answers_table(completions)
            out = pending.finish(plan, table)
            stats = ChunkStats(model_calls=len(completions))
            stats.count(table)
            folder.commit(chunk.index, out, chunk_marker(plan, chunk, out, 0.0, stats, None))
        summary = summarise(folder, plan.manifest)
        summary["import"] = {
            "imported_answers": len(answers),
            "rows_without_answer": missing,
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        folder.write_summary(summary)
    return summary
