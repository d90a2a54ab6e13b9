"""The cascade: which student a run routes with, and how it came to be.

    a run folder that already routes with a student (a resumed run) -> that student, whatever the
        cache holds now, so every row is routed as in an uninterrupted run
    else the job's stored student, while the cache has not grown by ``retrain_growth`` since it
        was trained -> that student
    else: sample ``sample_rows`` input rows at random -> the model labels them through the normal
        chunk pipeline (so their answers land in the cache; those already there cost nothing)
        -> their distinct texts split by a seeded hash: ``holdout`` of them are kept out
        -> the student trains on every answer the cache holds for this job, held-out texts excepted
        -> the threshold is chosen on the held-out texts (``pipeline/students.py``)
        -> the student is stored with the cache, and becomes the job's

Layout, beside the answers it learned from::

    <cache>/<namespace>/students/<settings digest>/
        current.json                    the job's student: its id and the answers it trained on
        <id>/student.joblib             the scikit-learn estimator
        <id>/student.json               its kind, labels, training and threshold (the bound)
    <run folder>/cascade.json           the student this run routes with

Routing itself (student in front of the model) is ``pipeline/routing.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import logs
from pipeline.cache import ResultCache
from pipeline.contracts import LABELLED, Source, Status
from pipeline.dedupe import normalise_texts
from pipeline.errors import RunStateError
from pipeline.flow import ChunkPipeline
from pipeline.io import Chunk, ChunkReader, write_text_atomic
from pipeline.models import resolve_model
from pipeline.plan import Plan, cache_root, digest, now
from pipeline.routing import Router
from pipeline.runfolder import ChunkStats, RunFolder
from pipeline.students import Student, Threshold, choose_threshold

log = logs.get("cascade")
_FORMAT = 1
"""Bumped when what a stored student means changes: students of another format are trained again."""


def students_folder(plan: Plan, store: ResultCache | None = None) -> Path:
    """Where this job's students live: its cache namespace, one folder per cascade settings."""
    settings = plan.job.cascade.model_dump(mode="json", exclude={"retrain_growth"})
    namespace = store.folder if store is not None else cache_root(plan.job) / plan.namespace
    return namespace / "students" / digest([_FORMAT, settings])


def describe(plan: Plan) -> str:
    """One line for ``labelmill validate``: the settings, and the student a run would start from."""
    cfg = plan.job.cascade
    line = (
        f"student {cfg.student}: agreement with the model >= {cfg.target_agreement} on the rows it "
        f"answers, at delta {cfg.delta}; sample {cfg.sample_rows} rows, {cfg.holdout:.0%} held out"
    )
    current = _read_json(students_folder(plan) / "current.json")
    if current is None:
        return line + "; no stored student yet (the first run trains one)"
    about = _read_json(students_folder(plan) / current["student"] / "student.json") or {}
    threshold = (about.get("threshold") or {}).get("value")
    return line + (
        f"; stored student {current['student']} (trained on {current.get('trained_on_answers')} answers, "
        + (f"threshold {threshold})" if threshold is not None else "answers no row)")
    )


def choose_router(
    plan: Plan, pipeline: ChunkPipeline, store: ResultCache, folder: RunFolder
) -> tuple[Router, dict]:
    """The router this run uses, and what to report of it (``summary.json``'s ``cascade``)."""
    home = students_folder(plan, store)
    record = run_record(plan, folder)
    if record is not None and record["student"] is None:  # a resumed run that had no student
        return Router(None, None, None), record["about"] | {"resumed": True}
    if record is not None:  # a resumed run: the student it started with
        loaded = Student.load(home / record["student"])
        if loaded is None:
            raise RunStateError(
                f"this run routes rows with the cascade student {record['student']}, and "
                f"{home / record['student']} is gone or unreadable (the cache was cleared or moved)",
                hint="rerun with --restart: a new student is trained and every row routed with it",
            )
        # what the run chose when it started (and its sample, if it trained one), resumed now
        return _router(loaded[0], loaded[1], record["student"]), record["about"] | {
            "student_id": record["student"],
            "resumed": True,
        }
    current = _read_json(home / "current.json")
    if current is not None:
        loaded = Student.load(home / current["student"])
        grown = _grown(len(store), current.get("trained_on_answers", 0), plan.job.cascade.retrain_growth)
        if loaded is not None and not grown:
            student, about = loaded
            _write_record(plan, folder, current["student"], about | {"chosen": "stored"})
            log.info(
                "cascade: the stored student %s (trained on %d answers, threshold %s)",
                current["student"], about["trained_on_answers"], about["threshold"]["value"],
                extra=logs.fields("cascade_student", student=current["student"], chosen="stored"),
            )  # fmt: skip
            return _router(student, about, current["student"]), about | {
                "student_id": current["student"],
                "chosen": "stored",
            }
    student_id, student, about = train(plan, pipeline, store, home)
    _write_record(plan, folder, student_id, about | {"chosen": "trained"})
    return _router(student, about, student_id), about | {
        "student_id": student_id,
        "chosen": "trained",
    }


def train(
    plan: Plan, pipeline: ChunkPipeline, store: ResultCache, home: Path
) -> tuple[str | None, Student | None, dict]:
    """Sample, have the model label the sample, train, choose the threshold, store the student
    (none when the cache holds nothing to train on besides the held-out texts)."""
    cfg = plan.job.cascade
    started = time.perf_counter()
    sample, sampled = _labelled_sample(plan, pipeline)
    held = _held_out(sample, cfg.holdout, cfg.seed)
    texts, labels = _training_answers(plan, store, set(held["key"].to_list()))
    about: dict = {
        "student_kind": cfg.student,
        "sample": {
            "rows": sample.height,
            "distinct_texts": sample["key"].n_unique(),
            "model_calls": sampled.model_calls,
            "held_out": held.height,
            "prompt_tokens": sampled.prompt_tokens,
            "output_tokens": sampled.output_tokens,
            "cached_tokens": sampled.cached_tokens,
            "seconds": round(time.perf_counter() - started, 3),
        },
        "trained_on_answers": len(store),
        "training_texts": len(texts),
        "trained_at": now(),
    }
    if not texts:
        threshold = Threshold(None, cfg.target_agreement, cfg.delta, held.height)
        threshold.why = "the cache holds no answer outside the held-out texts to train on"
        about["threshold"] = threshold.to_dict()
        log.warning(
            "cascade: no student (%s); every row goes to the model", threshold.why,
            extra=logs.fields("cascade_no_student", why=threshold.why),
        )  # fmt: skip
        return None, None, about
    embedding = resolve_model(cfg.embedding_model) if cfg.student == "embeddings" else None
    student = Student.train(cfg.student, texts, labels, embedding_model=embedding, seed=cfg.seed)
    predicted, confidence = student.predict(held["sent"].to_list())
    agree = held["label"].to_numpy().astype(object) == predicted
    threshold = choose_threshold(confidence, agree, cfg.target_agreement, cfg.delta)
    about["threshold"] = threshold.to_dict()
    about["training_seconds"] = round(time.perf_counter() - started, 2)
    student_id = (
        f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{digest([about, plan.manifest.fingerprint])[:8]}"
    )
    student.save(home / student_id, about)
    _prune(home, keep=student_id)
    write_text_atomic(
        json.dumps({"student": student_id, "trained_on_answers": about["trained_on_answers"]}, indent=2),
        home / "current.json",
    )
    if threshold.value is None:
        log.warning(
            "cascade: the student can't meet agreement %s at delta %s (%s); every row goes to the model",
            cfg.target_agreement, cfg.delta, threshold.why,
            extra=logs.fields("cascade_no_threshold", student=student_id, why=threshold.why),
        )  # fmt: skip
    else:
        log.info(
            "cascade: student %s trained on %d answers; threshold %.3f accepts %d/%d held-out texts, "
            "%d agree (lower bound %.3f at delta %s)",
            student_id, len(texts), threshold.value, threshold.accepted, threshold.held_out,
            threshold.agreed, threshold.bound, cfg.delta,
            extra=logs.fields("cascade_trained", student=student_id, threshold=threshold.to_dict()),
        )  # fmt: skip
    return student_id, student, about


def _labelled_sample(plan: Plan, pipeline: ChunkPipeline) -> tuple[pl.DataFrame, ChunkStats]:
    """``sample_rows`` input rows drawn at random (seeded by the settings and the input's content,
    so a resumed or repeated run draws the same), labelled by the model through the pipeline without
    routing. Returns one row per distinct sampled text (its key, the text sent, the model's label,
    null where its answer was invalid) and what labelling the sample cost."""
    cfg = plan.job.cascade
    # seeded by the input's content, not where it lies: the same export drawn from another folder
    # (or a clone of the repository) gives the same sample
    content = digest([{k: v for k, v in f.identity.items() if k != "path"} for f in plan.files])
    rng = np.random.default_rng([cfg.seed, int(content, 16) % (1 << 32)])
    picked = np.sort(rng.choice(plan.rows, size=min(cfg.sample_rows, plan.rows), replace=False))
    table = _read_rows(plan, picked)
    chunk = Chunk(index=-1, file_index=0, start=0, rows=table.num_rows)
    router, escalation = pipeline.router, pipeline.escalation
    pipeline.router = pipeline.escalation = None  # the student learns the model's own answers
    try:
        pending = pipeline.prepare(table, chunk)
        out, stats = pipeline.label_prepared(pending)
    finally:
        pipeline.router, pipeline.escalation = router, escalation
    dedupe = plan.job.dedupe
    keys = normalise_texts(pending.texts, dedupe) if dedupe.enabled else pending.texts
    status = pl.Series(out.column("status"))
    frame = pl.DataFrame(
        {"key": keys, "sent": pending.texts, "label": pl.Series(out.column("label")), "status": status}
    )
    # an invalid answer is a label the student can't agree with; an error is no answer at all
    frame = frame.filter(
        pl.col("key").is_not_null() & pl.col("status").is_in([*LABELLED, Status.INVALID.value])
    )
    return frame.unique("key", keep="first", maintain_order=True), stats


def _read_rows(plan: Plan, rows: np.ndarray) -> pa.Table:
    """Input rows by their number across the job's files, in that order."""
    reader = ChunkReader(plan.read_columns)  # keeps the last row group: sorted rows decode each once
    starts = np.cumsum([0] + [f.rows for f in plan.files])
    pieces = []
    for row in rows:
        fi = int(np.searchsorted(starts, row, side="right") - 1)
        pieces.append(reader.read(plan.files[fi], Chunk(-1, fi, int(row - starts[fi]), 1)))
    return pa.concat_tables(pieces, promote_options="permissive") if pieces else pa.table({})


def _held_out(sample: pl.DataFrame, share: float, seed: int) -> pl.DataFrame:
    """The sampled texts kept out of training: a seeded hash of the key, so a text is held out or
    not whatever else was drawn."""
    buckets = sample["key"].hash(seed=seed + 1) % 1_000_000
    return sample.filter(buckets < int(share * 1_000_000))


def _training_answers(plan: Plan, store: ResultCache, held_out: set[str]) -> tuple[list[str], list[str]]:
    """Every cached answer of this job that is one of the labels, held-out texts excepted: the
    texts as sent and the labels (a seeded subset beyond ``max_training_texts``)."""
    cfg = plan.job.cascade
    answers = pl.from_arrow(store.answers(["key", "sent", "text"]))
    frame = answers.with_columns(label=pl.col("text").str.strip_chars()).filter(
        pl.col("label").is_in(plan.task.labels) & ~pl.col("key").is_in(list(held_out))
    )
    if frame.height > cfg.max_training_texts:
        frame = frame.sample(cfg.max_training_texts, seed=cfg.seed)
    return frame["sent"].to_list(), frame["label"].to_list()


KEEP_STUDENTS = 3
"""Students kept per job and settings: the current one and the last few before it, which runs
started before it was trained may still be routing with."""


def _prune(home: Path, keep: str) -> None:
    import shutil

    older = sorted((p for p in home.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
    for folder in [p for p in older if p.name != keep][KEEP_STUDENTS - 1 :]:
        shutil.rmtree(folder, ignore_errors=True)


def _grown(entries: int, trained_on: int, share: float) -> bool:
    return share == 0 or entries > trained_on * (1 + share)


def _router(student: Student | None, about: dict, student_id: str | None) -> Router:
    return Router(student, about["threshold"]["value"], student_id)


def run_record(plan: Plan, folder: RunFolder) -> dict | None:
    """The student this run folder routes with (``cascade.json``), if it was chosen for this job."""
    try:
        record = json.loads(folder.read_text("cascade.json") or "null")
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("fingerprint") != plan.manifest.fingerprint:
        return None
    return record


def _write_record(plan: Plan, folder: RunFolder, student_id: str | None, about: dict) -> None:
    record = {
        "student": student_id,
        "fingerprint": plan.manifest.fingerprint,
        "chosen_at": now(),
        "about": about,
    }
    folder.write_text("cascade.json", json.dumps(record, indent=2, ensure_ascii=False))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cascade_summary(about: dict, summary: dict, sources: dict[str, int]) -> dict:
    """What the run's summary says of the cascade: rows per source, the student's bound, the
    model calls it saved, and the least agreement of all rows' labels with the model's that the
    bound implies (rows the model answered agree with it by definition)."""
    threshold = about["threshold"]
    rows = sum(sources.values())
    student_rows = sources.get(Source.STUDENT.value, 0)
    bound = threshold.get("bound") if threshold.get("value") is not None else None
    estimate = threshold["agreed"] / threshold["accepted"] if threshold.get("accepted") else None
    return {
        "student": about.get("student_id"),
        "chosen": about.get("chosen"),
        "resumed": bool(about.get("resumed")),
        "student_kind": about.get("student_kind"),
        "threshold": threshold.get("value"),
        "target_agreement": threshold.get("target"),
        "delta": threshold.get("delta"),
        "held_out_texts": threshold.get("held_out"),
        "held_out_accepted": threshold.get("accepted"),
        "agreement_estimate": round(estimate, 4) if estimate is not None and bound is not None else None,
        "agreement_bound": round(bound, 4) if bound is not None else None,
        "why_no_threshold": threshold.get("why") or None,
        "sample": about.get("sample"),
        "trained_on_answers": about.get("trained_on_answers"),
        "rows_by_source": sources,
        "student_share": round(student_rows / rows, 4) if rows else 0.0,
        "model_calls_saved": summary.get("student_labels", 0),
        "overall_agreement_bound": round(1 - (1 - bound) * student_rows / rows, 4)
        if bound is not None and rows
        else None,
    }
