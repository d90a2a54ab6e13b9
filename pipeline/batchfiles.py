"""Batch files: ``labelmill export`` writes a job's requests, ``labelmill import`` reads the answers.

This is how a job gets a provider's batch discount (OpenAI's Batch API halves the price) or runs
through ``vllm run-batch``. Both commands run the job through the same chunk pipeline as ``labelmill
run`` (``pipeline/flow.py``), with another answer source:

    export   the source writes request lines instead of asking the backend: one request per
             distinct text the answer store does not hold (duplicates collapsed as in a run,
             texts answered by the cache or already finished in the run folder left out)
    import   the source reads answers from result files; the run folder, the answer store,
             duplicates and cache hits are filled exactly as a run fills them

Each request line is ``{"custom_id": ..., "method": "POST", "url": ..., "body": ...}`` with the
body the backend itself would send (any backend that can describe its request body). The
``custom_id`` of a text is ``lm-`` and a digest of the job's answer identity and the text's
normalised form, so an answer finds its text whatever the order of the result files, and results of
an earlier export of the same job still fit after the input grew. With duplicate collapsing off,
every row is its own request and the id names its place: ``c<chunk>-r<row>``.

A text whose answer is missing from the result files, or failed there, becomes rows with status
``error``: a later ``labelmill run`` of the same job sends just those through the live backend.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import logs
from pipeline.backends.base import Backend
from pipeline.config import JobConfig
from pipeline.contracts import Completion, Request, answers_table
from pipeline.errors import ConfigError, InputFormatError
from pipeline.flow import ChunkPipeline, Questions
from pipeline.io import write_text_atomic
from pipeline.plan import Plan, make_backend, now, plan_job, text_budget
from pipeline.runfolder import RunFolder
from pipeline.runner import labelled_chunks, open_store, pending_work, run_plan

log = logs.get("batch")

MAX_REQUESTS = 50_000
"""OpenAI's limit of requests per batch file."""
MAX_BYTES = 200 * 1024 * 1024
"""OpenAI's limit of bytes per batch file."""
_CUSTOM_ID = re.compile(r"^(lm-[0-9a-f]{32}|c\d+-r\d+)$")
NO_ANSWER = "no answer in the batch result files"


def custom_ids(questions: Questions, namespace: str, by_key: bool) -> list[str]:
    """The request id of each question (see the module docstring)."""
    if not by_key:
        return [f"c{questions.chunk.index}-r{row}" for row in questions.rows]
    prefix = namespace.encode() + b"\x1f"
    return ["lm-" + hashlib.sha256(prefix + key.encode()).hexdigest()[:32] for key in questions.keys]


def _batch_backend(plan: Plan) -> Backend:
    backend = make_backend(plan)
    if backend.batch_url is None:
        raise ConfigError(
            f"backend '{plan.job.backend}' cannot describe its requests for batch files",
            hint="export and import need a backend that speaks an HTTP API, e.g. backend: openai",
        )
    return backend


class BatchWriter:
    """An answer source that answers later: it writes each question as a request line, in files
    of at most ``max_requests`` lines and ``max_bytes`` bytes."""

    def __init__(
        self, backend: Backend, out_dir: Path, namespace: str, by_key: bool, max_requests: int, max_bytes: int
    ) -> None:
        self.backend, self.out, self.namespace, self.by_key = backend, out_dir, namespace, by_key
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.files: list[str] = []
        self.requests = 0
        self.repeated = 0
        """Questions of a later chunk whose request an earlier chunk already wrote."""
        self._lines: list[bytes] = []
        self._size = 0
        # 64-bit prefixes of the ids written so far, sorted: 8 bytes a request. Two texts sharing a
        # prefix (about one in 10^12 pairs) would lose one request; its rows then come back as
        # status error from import, and the next run asks for them.
        self._seen = np.empty(0, dtype=np.uint64)

    def answer(self, questions: Questions) -> None:
        ids = custom_ids(questions, self.namespace, self.by_key)
        keep = np.ones(len(ids), dtype=bool)
        if self.by_key:
            prefixes = np.array([int(i[3:19], 16) for i in ids], dtype=np.uint64)
            at = np.searchsorted(self._seen, prefixes)
            found = at < len(self._seen)
            found[found] = self._seen[at[found]] == prefixes[found]
            keep = ~found
            self.repeated += int(found.sum())
            # two sorted runs: a stable sort merges them in one pass (as the cache's index does)
            seen = np.concatenate([self._seen, np.sort(prefixes[keep])])
            seen.sort(kind="stable")
            self._seen = seen
        chosen = np.flatnonzero(keep)
        for n, text in zip(chosen, questions.texts.gather(chosen), strict=True):
            body = self.backend.request_body(questions.prompt.messages(text), questions.request)
            line = {"custom_id": ids[n], "method": "POST", "url": self.backend.batch_url, "body": body}
            self._add(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
        return None

    def _add(self, line: bytes) -> None:
        if self._lines and (len(self._lines) >= self.max_requests or self._size + len(line) > self.max_bytes):
            self.flush()
        self._lines.append(line)
        self._size += len(line)
        self.requests += 1

    def flush(self) -> None:
        if self._lines:
            path = self.out / f"batch-{len(self.files):05d}.jsonl"
            write_text_atomic(b"".join(self._lines).decode("utf-8"), path)
            self.files.append(path.name)
        self._lines, self._size = [], 0


def export_job(
    job: JobConfig, out_dir: str | Path, max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES
) -> dict:
    """Write the requests the job still needs as batch files; returns what was written and why
    the other rows need none."""
    started = time.perf_counter()
    plan = plan_job(job)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(job.output)
    work, finished = pending_work(plan, folder)
    with _batch_backend(plan) as backend:
        writer = BatchWriter(backend, out, plan.namespace, job.dedupe.enabled, max_requests, max_bytes)
        store = open_store(plan, folder) if job.cache.enabled else None
        pipeline = ChunkPipeline(plan, backend, text_budget(plan, backend), store, writer)
        totals = {"cache_hits": 0, "duplicates": 0}
        try:
            for _item, _deferred, stats, _seconds in labelled_chunks(pipeline, folder, work):
                totals["cache_hits"] += stats.cache_hits
                totals["duplicates"] += stats.duplicates
        finally:
            if store is not None:
                store.close()
        writer.flush()
    redone = {w.chunk.index for w in work}
    stale = [p for p in sorted(out.glob("batch-*.jsonl")) if p.name not in writer.files]
    for path in stale:  # an earlier export's files: sending them too would pay twice
        path.unlink()
    result = {
        "requests": writer.requests,
        "files": writer.files,
        "rows": plan.rows,
        "folder": str(out),
        "rows_in_finished_chunks": sum(m.rows for i, m in finished.items() if i not in redone),
        "texts_answered_by_cache": totals["cache_hits"],
        "rows_sharing_a_duplicate": totals["duplicates"],
        "texts_already_requested": writer.repeated,
        "stale_files_removed": [p.name for p in stale],
        "job_fingerprint": plan.manifest.fingerprint,
        "written_at": now(),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    write_text_atomic(json.dumps(result, indent=2, ensure_ascii=False), out / "export.json")
    log.info(
        "export: %d requests for %d rows in %d file(s) under %s",
        writer.requests, plan.rows, len(writer.files), out,
        extra=logs.fields("export", **{k: v for k, v in result.items() if k != "files"}),
    )  # fmt: skip
    return result


class BatchReader:
    """An answer source that reads answers from batch result files (OpenAI's batch output format)."""

    def __init__(
        self, backend: Backend, paths: Iterable[str | Path], namespace: str, by_key: bool, request: Request
    ):
        self.namespace, self.by_key = namespace, by_key
        ids, completions = read_results(paths, backend, request)
        self.lines = len(ids)
        self._index = pl.DataFrame({"custom_id": pl.Series(ids, dtype=pl.String), "row": np.arange(len(ids))})
        self._answers = answers_table(completions)
        self._used = np.zeros(len(ids), dtype=bool)
        """Per result line: it answered a question. A failed answer is not stored, so its text is
        asked again in a later chunk; a mark per line counts it once."""
        self._missing: set[str] = set()

    @property
    def used(self) -> int:
        """Result lines that answered a question of this job."""
        return int(self._used.sum())

    @property
    def failed(self) -> int:
        """Result lines used whose request had failed (each becomes rows with status error)."""
        return int(
            (self._used & self._answers.column("error").is_valid().to_numpy(zero_copy_only=False)).sum()
        )

    @property
    def missing(self) -> int:
        """Requests asked for that no result line answers (a text met again in a later chunk counts once)."""
        return len(self._missing)

    def answer(self, questions: Questions) -> pa.Table:
        ids = pl.DataFrame({"custom_id": custom_ids(questions, self.namespace, self.by_key)})
        rows = ids.join(self._index, on="custom_id", how="left", maintain_order="left")["row"]
        found = rows.is_not_null().to_numpy()
        lines = rows.drop_nulls().to_numpy()
        got = self._answers.take(pa.array(lines))
        missing = len(found) - got.num_rows
        self._used[lines] = True
        self._missing.update(ids["custom_id"].filter(~pl.Series(found)).to_list())
        if not missing:
            return got
        none = answers_table([Completion.failed(NO_ANSWER)] * missing)
        order = np.empty(len(found), dtype=np.int64)
        order[found] = np.arange(got.num_rows)
        order[~found] = got.num_rows + np.arange(missing)
        return pa.concat_tables([got, none]).take(pa.array(order))


def read_results(
    paths: Iterable[str | Path], backend: Backend, request: Request
) -> tuple[list[str], list[Completion]]:
    """Batch output lines -> (custom ids, Completions). A failed line becomes an error Completion;
    an id seen twice keeps its successful answer (a batch sent again after a partial failure)."""
    ids: list[str] = []
    completions: list[Completion] = []
    where: dict[str, int] = {}
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
                if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                    raise InputFormatError(
                        f"{path}, line {n}: custom_id {custom_id!r} is not one labelmill writes",
                        hint="pass the results of a labelmill export",
                    )
                completion = _completion(line, backend, request)
                if custom_id in where:
                    if completion.error is None:
                        completions[where[custom_id]] = completion
                    continue
                where[custom_id] = len(ids)
                ids.append(custom_id)
                completions.append(completion)
    return ids, completions


def _completion(line: dict, backend: Backend, request: Request) -> Completion:
    response = line.get("response") or {}
    status = response.get("status_code")
    if line.get("error") or status != 200:
        reason = line.get("error") or (response.get("body") or {}).get("error")
        where = f"HTTP {status}" if status is not None else "no response"
        return Completion.failed(f"batch request failed ({where}): {json.dumps(reason)[:300]}")
    completion = backend.read_response(response.get("body") or {}, request)
    if completion is None:
        return Completion.failed("batch result has no chat completion body")
    return completion


def import_job(job: JobConfig, result_files: list[str], restart: bool = False) -> dict:
    """Turn batch result files into the job's run folder (parts, markers, summary)."""
    started = time.perf_counter()
    plan = plan_job(job)
    with _batch_backend(plan) as backend:
        reader = BatchReader(backend, result_files, plan.namespace, job.dedupe.enabled, plan.request)
        summary = run_plan(plan, backend=backend, source=reader, restart=restart)
    summary["import"] = {
        "imported_answers": reader.lines,
        "answers_used": reader.used,
        "answers_not_needed": reader.lines - reader.used,
        "requests_without_answer": reader.missing,
        "failed_answers": reader.failed,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    RunFolder(job.output).write_summary(summary)
    log.info(
        "import: %d answers read, %d used; %d request(s) had none, %d failed",
        reader.lines, reader.used, reader.missing, reader.failed,
        extra=logs.fields("import", **summary["import"]),
    )  # fmt: skip
    if reader.lines and not reader.used and reader.missing:
        log.warning(
            "none of the %d answers in the result files belongs to this job's texts: were they exported "
            "from another job (other prompt, labels, model or settings)?", reader.lines,
        )  # fmt: skip
    return summary
