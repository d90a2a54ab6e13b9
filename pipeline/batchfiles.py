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

Import never replaces an answer with an error. A row that held an answer (status ``ok``,
``truncated`` or ``invalid``) before the import keeps it when the result files have no line for its
text, or a failed one: rows of finished chunks are not asked again, and with ``--restart`` the
parts are kept aside (hard links under ``earlier-answers/``) and their answers put back into the
rows the files left without one, provided the folder held the same job on the same input (only
where answers are shared may differ). Only a row that had no answer becomes status ``error``; a
later ``labelmill run`` of the same job sends just those through the live backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import logs, storage
from pipeline.backends.base import Backend
from pipeline.config import JobConfig
from pipeline.contracts import STATUSES, Completion, Request, Status, answers_table
from pipeline.errors import ConfigError, InputFormatError, RunStateError
from pipeline.flow import ChunkPipeline, Questions
from pipeline.io import write_text_atomic
from pipeline.labeller import labelled_chunks, open_store, pending_work
from pipeline.plan import Plan, make_backend, now, plan_job, text_budget
from pipeline.runfolder import ChunkMarker, Manifest, RunFolder
from pipeline.runner import run_plan

log = logs.get("batch")

MAX_REQUESTS = 50_000
"""OpenAI's limit of requests per batch file."""
MAX_BYTES = 200 * 1024 * 1024
"""OpenAI's limit of bytes per batch file."""
_CUSTOM_ID = re.compile(r"^(lm-[0-9a-f]{32}|c\d+-r\d+)$")
NO_ANSWER = "no result in the result files given"
FAILED = "batch request failed"
NOT_FOUND = f"{FAILED} (HTTP 404)"
ANSWERED = (Status.OK.value, Status.TRUNCATED.value, Status.INVALID.value)
"""Statuses of rows that hold an answer: an import never turns one of them into an error."""
EARLIER = "earlier-answers"
"""The run folder's subfolder where import keeps its parts aside while ``--restart`` discards them."""


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
        self.model: str | None = None
        """The ``model`` the request bodies name: a server answers them only under that name."""
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
            self.model = self.model or body.get("model")
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
    plan = plan_job(job, batch_files=True)
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
        "model": writer.model,
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
    def not_found(self) -> int:
        """Result lines used whose request failed with HTTP 404: the server serves no model under
        the name the requests give."""
        errors = self._answers.column("error").to_numpy(zero_copy_only=False)
        return sum(bool(e) and e.startswith(NOT_FOUND) for e in errors[self._used])

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
        return Completion.failed(f"{FAILED} ({where}): {json.dumps(reason)[:300]}")
    completion = backend.read_response(response.get("body") or {}, request)
    if completion is None:
        return Completion.failed("batch result has no chat completion body")
    return completion


def import_job(job: JobConfig, result_files: list[str], restart: bool = False) -> dict:
    """Turn batch result files into the job's run folder (parts, markers, summary). No row that
    held an answer before loses it (see the module docstring)."""
    if storage.is_remote(job.output):
        raise ConfigError(
            f"batch import writes a local run folder; output: is {job.output}",
            hint="import into a local output: folder (--set output=out/NAME), then copy it to the store",
        )
    started = time.perf_counter()
    plan = plan_job(job, batch_files=True)
    folder = RunFolder(job.output, len(plan.chunks))
    earlier = EarlierAnswers(folder, plan)
    with _batch_backend(plan) as backend:
        reader = BatchReader(backend, result_files, plan.namespace, job.dedupe.enabled, plan.request)
        held = 0
        if restart:  # only once the result files were read: a file refused changes nothing
            earlier.keep()
        else:
            held = _answered_rows(folder, plan)
        summary = run_plan(plan, backend=backend, source=reader, restart=restart)
    restored = earlier.restore()
    if restored:
        summary = {**summary, **folder.summarise(plan.manifest)}
    summary["import"] = {
        "imported_answers": reader.lines,
        "answers_used": reader.used,
        "answers_not_needed": reader.lines - reader.used,
        "requests_without_answer": reader.missing,
        "failed_answers": reader.failed,
        "rows_kept_earlier_answer": held + restored,
        "rows_without_answer": summary["status_counts"].get(Status.ERROR.value, 0),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    folder.write_summary(summary)
    counts = summary["import"]
    log.info(
        "import: %d answers read, %d used; %d request(s) had none, %d failed; %d row(s) kept an "
        "earlier answer, %d row(s) have none",
        reader.lines, reader.used, reader.missing, reader.failed, counts["rows_kept_earlier_answer"],
        counts["rows_without_answer"],
        extra=logs.fields("import", **counts),
    )  # fmt: skip
    if restored:
        log.warning(
            "%d row(s) kept the answer they held before --restart: the result files had no result "
            "for their texts, or a failed one", restored,
            extra=logs.fields("import_kept_earlier", rows=restored),
        )  # fmt: skip
    if counts["rows_without_answer"]:
        log.warning(
            "%d row(s) have no answer (status error): the result files hold no result for their "
            "texts, or a failed one; labelmill run asks for them, or the next export writes them",
            counts["rows_without_answer"],
            extra=logs.fields("import_rows_without_answer", rows=counts["rows_without_answer"]),
        )  # fmt: skip
    if reader.not_found:
        log.warning(
            "%d result(s) failed with HTTP 404: the batch runner served no model under the name the "
            "requests give (export.json's model); vLLM's run_batch needs --served-model-name set to it",
            reader.not_found, extra=logs.fields("import_model_not_found", answers=reader.not_found),
        )  # fmt: skip
    if reader.lines and not reader.used and reader.missing:
        log.warning(
            "none of the %d answers in the result files belongs to this job's texts: were they exported "
            "from another job (other prompt, labels, model or settings)?", reader.lines,
        )  # fmt: skip
    return summary


def _answered_rows(folder: RunFolder, plan: Plan) -> int:
    """Rows holding an answer in the finished chunks of this run of the job: a run does not ask
    them again, so they keep it. From the markers alone (the run checks the parts, and labels a
    chunk whose part fails again, saying so)."""
    try:
        manifest = folder.manifest()
    except RunStateError:
        return 0
    fingerprint = plan.manifest.fingerprint
    if manifest is None or manifest.fingerprint != fingerprint:
        return 0  # another job's parts (refused), or input the job restarts on
    rows = {c.index: c.rows for c in plan.chunks}
    markers = folder.finished().values()
    ours = [m for m in markers if m.fingerprint in (None, fingerprint) and rows.get(m.chunk) == m.rows]
    return sum(m.count(s) for m in ours for s in ANSWERED)


def same_rows_and_answers(old: Manifest, new: Manifest) -> bool:
    """Whether a run folder started as ``old`` labelled the rows of ``new`` (same input, row
    columns and chunks) for the same answers (model, prompt, task, sampling, backend settings):
    only where answers are shared (cache on or off, its path, duplicate collapsing) may differ, so
    a row's answer there is this job's answer to that row."""
    free = {"answer_reuse"}
    return {k: v for k, v in old.components.items() if k not in free} == {
        k: v for k, v in new.components.items() if k not in free
    }


class EarlierAnswers:
    """A run folder's parts kept aside while ``import --restart`` labels it again, and their answers
    put back into the rows the result files left without one.

    The parts are hard links (copies where the file system has none) under ``earlier-answers/`` in
    the run folder, with their markers and ``run.json``, so they are checked as the run folder's
    own are. The folder stays until its answers are put back: an import stopped in between leaves
    it, and the next import of the job puts them back."""

    def __init__(self, folder: RunFolder, plan: Plan) -> None:
        self.folder, self.plan = folder, plan
        self.store = RunFolder(folder.root / EARLIER, len(plan.chunks))
        self._rows = {c.index: c.rows for c in plan.chunks}

    def _manifest(self, folder: RunFolder) -> Manifest | None:
        try:
            manifest = folder.manifest()
        except RunStateError:
            return None
        return manifest if manifest and same_rows_and_answers(manifest, self.plan.manifest) else None

    def keep(self) -> None:
        """Link the run folder's finished parts of this job aside, before a restart removes them.
        Chunks an earlier, stopped import kept aside stay as they are: they hold the answers it
        did not put back."""
        aside = self._manifest(self.store) if self.store.root.exists() else None
        if self.store.root.exists() and aside is None:
            shutil.rmtree(self.store.root)  # another job's, or damaged: no answers of this job
        manifest = self._manifest(self.folder)
        if manifest is None:
            return
        finished, _problems = self.folder.verify(manifest.fingerprint, self._rows, clean=False)
        kept = self.store.verify(aside.fingerprint, self._rows, clean=False)[0] if aside else {}
        chosen = [m for i, m in finished.items() if i not in kept and any(m.count(s) for s in ANSWERED)]
        if not chosen:
            return
        # one fingerprint vouches for everything kept aside: the first import's that kept any
        target = aside or manifest
        for path in (self.store.parts, self.store.markers):
            path.mkdir(parents=True, exist_ok=True)
        for marker in chosen:
            _link(self.folder.part_path(marker.chunk), self.store.part_path(marker.chunk))
            marker = marker.model_copy(update={"fingerprint": target.fingerprint})
            write_text_atomic(marker.model_dump_json(), self.store.marker_path(marker.chunk))
        if aside is None:
            write_text_atomic(manifest.model_dump_json(indent=2), self.store.manifest_path)

    def restore(self) -> int:
        """Put the kept answers back into rows with status error; returns how many rows got one."""
        manifest = self._manifest(self.store) if self.store.root.exists() else None
        if manifest is None:
            shutil.rmtree(self.store.root, ignore_errors=True)
            return 0
        restored = 0
        with self.folder.lock():
            earlier, _ = self.store.verify(manifest.fingerprint, self._rows, clean=False)
            current, _ = self.folder.verify(self.plan.manifest.fingerprint, self._rows, clean=False)
            for index, marker in current.items():
                if index in earlier and marker.count(Status.ERROR):
                    restored += self._restore_chunk(marker, self.store.part_path(index))
        shutil.rmtree(self.store.root, ignore_errors=True)
        return restored

    def _restore_chunk(self, marker: ChunkMarker, earlier_part: Path) -> int:
        now_part = self.folder.part_path(marker.chunk)
        try:
            table, before = pq.read_table(now_part), pq.read_table(earlier_part)
        except (OSError, pa.ArrowException) as exc:
            raise RunStateError(
                f"cannot read chunk {marker.chunk}'s part to put its earlier answers back: {exc}",
                hint=f"rerun the same import: the answers kept aside in {self.store.root} are put back then",
            ) from None
        ids = self.plan.id_column
        if before.num_rows != table.num_rows or not before.column(ids).equals(table.column(ids)):
            return 0  # not the same rows in the same order: no answer can be matched to its row
        if any(name not in before.column_names for name in table.column_names):
            return 0
        back = pc.and_(
            pc.equal(table.column("status"), Status.ERROR.value),
            pc.is_in(before.column("status"), pa.array(ANSWERED)),
        )
        count = pc.sum(back).as_py() or 0
        if not count:
            return 0
        columns = [
            pc.if_else(back, before.column(f.name).cast(f.type), table.column(f.name)) for f in table.schema
        ]
        table = pa.Table.from_arrays(columns, schema=table.schema)
        statuses = {c["values"].as_py(): c["counts"].as_py() for c in pc.value_counts(table.column("status"))}
        counts = {s: statuses.get(s, 0) for s in STATUSES}
        self.folder.commit(table, marker.model_copy(update={"status_counts": counts, "finished_at": now()}))
        return count


def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links: a copy keeps the answers as well
        shutil.copyfile(source, target)
