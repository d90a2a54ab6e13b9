"""The cascade and the escalation, end to end through ``run_job``.

A teacher whose labels can be learned is a real OpenAI-style server on loopback that answers each
OA-Mine title's gold category (``teacher_server.py``); one whose labels can't be learned is the
fake backend (a hash of the text). Checked: the threshold's bound, what the student answers and
what reaches the model, agreement with the model over all rows, the ``source`` column, the stored
student reused by a later run and retrained when the cache has grown, a run interrupted between
chunks routing every row as an uninterrupted one, and escalation reaching the second backend only
for the rows its rule picks.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from conftest import REPO_ROOT
from teacher_server import TeacherServer

from pipeline.errors import ConfigError, JobFileError, RunStateError
from pipeline.plan import plan_job
from pipeline.runner import run_job
from pipeline.students import choose_threshold, clopper_pearson_lower, min_accepted

OA_MINE = REPO_ROOT / "sample_data" / "oa_mine_products.parquet"
LABELS = [
    "Coffee", "Tea", "Vitamin", "Safety Mask", "Toothbrush", "Breakfast Cereal", "Sunscreen",
    "Laundry Detergent", "Shoes", "Conditioner",
]  # fmt: skip
KEY, ENV = "sk-teacher-cascade", "LABELMILL_TEST_CASCADE_KEY"


# --- the bound -------------------------------------------------------------------------------


def test_clopper_pearson_matches_the_closed_form_at_the_ends():
    # all n agree: the lower bound is delta ** (1 / n)
    assert clopper_pearson_lower(59, 59, 0.05) == pytest.approx(0.05 ** (1 / 59))
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert min_accepted(0.95, 0.05) == 59  # 58 perfect texts can't certify 0.95
    assert clopper_pearson_lower(58, 58, 0.05) < 0.95 <= clopper_pearson_lower(59, 59, 0.05)
    assert clopper_pearson_lower(99, 100, 0.05) < clopper_pearson_lower(100, 100, 0.05)


def test_the_threshold_is_the_lowest_before_the_first_failing_test():
    rng = np.random.default_rng(0)
    # 300 held-out texts: a clean top band, a bad middle band, a clean bottom band
    confidence = np.concatenate(
        [rng.uniform(0.9, 1.0, 150), rng.uniform(0.5, 0.6, 50), rng.uniform(0.0, 0.4, 100)]
    )
    agree = np.concatenate([np.ones(150, bool), np.zeros(50, bool), np.ones(100, bool)])
    chosen = choose_threshold(confidence, agree, 0.95, 0.05)
    # the sequence stops in the bad band: the clean bottom band is never reached
    assert chosen.value is not None and 0.6 <= chosen.value <= 0.9
    assert chosen.accepted == 150 and chosen.agreed == 150
    assert chosen.bound == pytest.approx(clopper_pearson_lower(150, 150, 0.05))


def test_no_threshold_for_a_student_no_better_than_chance():
    rng = np.random.default_rng(1)
    chosen = choose_threshold(rng.uniform(size=400), rng.uniform(size=400) < 0.1, 0.95, 0.05)
    assert chosen.value is None
    assert "lower bound" in chosen.why
    assert choose_threshold(np.ones(20), np.ones(20, bool), 0.95, 0.05).value is None  # too few


# --- jobs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oa_mine() -> pl.DataFrame:
    return pl.read_parquet(OA_MINE)


@pytest.fixture
def teacher(monkeypatch, oa_mine):
    monkeypatch.setenv(ENV, KEY)
    answers = dict(zip(oa_mine["title"], oa_mine["category"], strict=True))
    with TeacherServer(answers, key=KEY) as srv:
        yield srv


def _teacher_job(make_job, tmp_path, server, name="job", cache="cache", **overrides):
    spec = {
        "input": str(OA_MINE),
        "keep_columns": ["category"],
        "labels": LABELS,
        "backend": "openai",
        "model": "teacher",
        "api": {"base_url": server.base_url, "api_key_env": ENV, "max_concurrency": 8},
        "cache": {"path": str(tmp_path / cache)},
        "chunk_rows": 300,
        "cascade": {},
        **overrides,
    }
    return make_job(name=name, **spec)


def test_a_learnable_teacher_is_asked_for_a_minority_of_rows(
    make_job, read_parts, tmp_path, teacher, oa_mine
):
    files = _teacher_job(make_job, tmp_path, teacher)
    summary = run_job(files.load())
    out = pl.from_arrow(read_parts(files.output))
    assert out.height == oa_mine.height and (out["status"] == "ok").all()
    cascade = summary["cascade"]
    assert cascade["threshold"] is not None and cascade["agreement_bound"] >= 0.95
    asked = teacher.requests
    assert asked == summary["model_calls"] + summary["sample_model_calls"] and asked < 0.5 * oa_mine.height
    student = out.filter(pl.col("source") == "student")
    assert student.height == summary["student_labels"] == cascade["model_calls_saved"] > 0.4 * oa_mine.height
    assert (student["student_confidence"] >= cascade["threshold"]).all()
    # the model's own rows are exactly the teacher's labels; the student's agree nearly always
    taught = out.filter(pl.col("source") != "student")
    assert (taught["label"] == taught["category"]).all()
    assert (out["label"] == out["category"]).mean() >= 0.95
    assert summary["rows_by_source"] == dict(sorted(out["source"].value_counts().iter_rows()))
    assert cascade["sample"]["model_calls"] > 0 and cascade["chosen"] == "trained"
    # every text reached the teacher at most once
    assert max(teacher.asked.values()) == 1


def test_the_embeddings_student_learns_the_teacher_too(
    make_job, read_parts, tmp_path, teacher, oa_mine, minilm
):
    files = _teacher_job(
        make_job, tmp_path, teacher, cascade={"student": "embeddings", "embedding_model": str(minilm)}
    )
    summary = run_job(files.load())
    cascade = summary["cascade"]
    assert cascade["student_kind"] == "embeddings" and cascade["agreement_bound"] >= 0.95
    out = pl.from_arrow(read_parts(files.output))
    assert summary["student_labels"] > 0.3 * oa_mine.height
    assert (out["label"] == out["category"]).mean() >= 0.95


def test_an_unlearnable_teacher_gets_nearly_every_row(make_job, read_parts, tmp_path):
    spec = {
        "input": str(OA_MINE),
        "labels": LABELS,
        "cache": {"path": str(tmp_path / "c")},
        "chunk_rows": 500,
    }
    plain = make_job(name="plain", **spec)
    run_job(plain.load())
    files = make_job(name="cascade", **{**spec, "cache": {"path": str(tmp_path / "c2")}, "cascade": {}})
    summary = run_job(files.load())
    out, reference = pl.from_arrow(read_parts(files.output)), pl.from_arrow(read_parts(plain.output))
    assert (out["source"] != "student").mean() >= 0.95
    assert (out["label"] == reference["label"]).mean() >= 0.95
    assert summary["cascade"]["why_no_threshold"] or summary["cascade"]["student_share"] <= 0.05


def test_the_next_night_reuses_the_student_until_the_cache_has_grown(make_job, tmp_path, teacher):
    first = run_job(_teacher_job(make_job, tmp_path, teacher, name="night1").load())
    asked = teacher.requests
    second = run_job(_teacher_job(make_job, tmp_path, teacher, name="night2").load())
    # same input: every text the model answered is in the cache, the stored student is reused
    assert teacher.requests == asked
    assert (
        second["cascade"]["chosen"] == "stored"
        and second["cascade"]["student"] == first["cascade"]["student"]
    )
    assert second["model_calls"] == 0 and second["student_labels"] == first["student_labels"]
    # the cache "grows" past retrain_growth (0.25) since the student was trained: the next run
    # samples and trains again
    current = next((tmp_path / "cache").rglob("current.json"))
    record = json.loads(current.read_text())
    current.write_text(json.dumps({**record, "trained_on_answers": int(record["trained_on_answers"] / 1.3)}))
    third = run_job(_teacher_job(make_job, tmp_path, teacher, name="night3").load())
    assert (
        third["cascade"]["chosen"] == "trained" and third["cascade"]["student"] != first["cascade"]["student"]
    )
    assert third["cascade"]["trained_on_answers"] >= first["cascade"]["trained_on_answers"]


def test_a_run_stopped_between_chunks_routes_every_row_as_an_uninterrupted_one(
    make_job, read_parts, tmp_path, teacher
):
    # retrain_growth 0: a new run trains a new student whenever it starts
    train_always = {"retrain_growth": 0}
    whole = _teacher_job(make_job, tmp_path, teacher, name="whole", cache="cache-whole", cascade=train_always)
    run_job(whole.load())
    files = _teacher_job(
        make_job, tmp_path, teacher, name="stopped", cache="cache-stopped", cascade=train_always
    )
    run_job(files.load())
    # the run "stops" after chunk 1: its later chunks' parts and markers are gone, while the cache
    # keeps every answer it got (more than the student trained on: a new student would differ)
    for n in (2, 3, 4):
        (files.output / "parts" / f"part-{n:05d}.parquet").unlink()
        (files.output / "done" / f"chunk-{n:05d}.json").unlink()
    resumed = run_job(files.load())
    assert resumed["complete"] and resumed["cascade"]["resumed"]
    a, b = pl.from_arrow(read_parts(whole.output)), pl.from_arrow(read_parts(files.output))
    for column in ("id", "label", "confidence", "status"):
        assert a[column].to_list() == b[column].to_list(), column
    # the same rows go to the student; a row the model answered before the stop is a cache hit now
    assert (a["source"] == "student").to_list() == (b["source"] == "student").to_list()
    assert (b["source"] == "cache").sum() >= (a["source"] == "cache").sum()
    student = a["source"] == "student"
    assert (
        a.filter(student)["student_confidence"].to_list() == b.filter(student)["student_confidence"].to_list()
    )


def test_a_resumed_run_whose_student_is_gone_is_refused(make_job, tmp_path, teacher):
    files = _teacher_job(make_job, tmp_path, teacher)
    run_job(files.load())
    (files.output / "done" / "chunk-00004.json").unlink()
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(RunStateError, match="--restart"):
        run_job(files.load())
    assert run_job(files.load(), restart=True)["complete"]


# --- escalation ------------------------------------------------------------------------------


def test_escalation_asks_the_second_backend_only_for_the_rows_its_rule_picks(
    make_job, read_parts, tmp_path, monkeypatch
):
    monkeypatch.setenv(ENV, KEY)
    texts = [f"product number {i}" for i in range(40)]
    first_answers = {t: LABELS[i % 3] for i, t in enumerate(texts)}
    confidence = {t: (0.3 if i % 4 == 0 else 0.9) for i, t in enumerate(texts)}
    second_answers = {t: "Shoes" for t in texts}
    data = {"id": list(range(40)), "title": texts}
    with (
        TeacherServer(first_answers, key=KEY, confidence=confidence) as small,
        TeacherServer(second_answers, key=KEY, confidence=0.99) as big,
    ):
        api = {"api_key_env": ENV, "max_concurrency": 4}
        spec = {
            "labels": LABELS, "backend": "openai", "model": "small", "keep_columns": ["title"],
            "api": {**api, "base_url": small.base_url}, "cache": {"path": str(tmp_path / "cache")},
            "escalate": {"backend": "openai", "model": "big", "api": {**api, "base_url": big.base_url},
                         "confidence_below": 0.5},
        }  # fmt: skip
        files = make_job(data, **spec)
        summary = run_job(files.load())
        low = {t for t in texts if confidence[t] < 0.5}
        assert big.asked_texts() == low and small.asked_texts() == set(texts)
        out = pl.from_arrow(read_parts(files.output))
        up = out.filter(pl.col("source") == "escalated")
        assert set(up["title"]) == low and (up["label"] == "Shoes").all()
        assert up["first_label"].to_list() == [first_answers[t] for t in up["title"]]
        assert up["first_confidence"].to_list() == pytest.approx([0.3] * len(low))
        rest = out.filter(pl.col("source") != "escalated")
        assert rest["first_label"].null_count() == rest.height
        assert (rest["label"] == pl.Series([first_answers[t] for t in rest["title"]])).all()
        assert summary["escalations"] == summary["escalation_calls"] == len(low)
        # the escalation keeps its answers: another run of the job asks neither server again
        again = run_job(make_job(data, **{**spec, "output": str(tmp_path / "again")}).load())
        assert big.requests == len(low) and small.requests == len(texts)
        assert again["escalations"] == len(low) and again["escalation_calls"] == 0


def test_escalation_by_status_takes_invalid_answers(make_job, read_parts, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    texts = ["alpha item", "beta item", "gamma item"]
    with (
        TeacherServer(
            {"alpha item": "Tea", "beta item": "Not A Label", "gamma item": "Coffee"}, key=KEY
        ) as small,
        TeacherServer(dict.fromkeys(texts, "Vitamin"), key=KEY) as big,
    ):
        api = {"api_key_env": ENV, "constraint": "none"}
        files = make_job(
            {"id": [1, 2, 3], "title": texts}, labels=LABELS, keep_columns=["title"],
            backend="openai", model="small",
            api={**api, "base_url": small.base_url}, cache={"path": str(tmp_path / "cache")},
            escalate={"backend": "openai", "model": "big", "api": {**api, "base_url": big.base_url}},
        )  # fmt: skip
        run_job(files.load())
        out = pl.from_arrow(read_parts(files.output))
        assert big.asked_texts() == {"beta item"}
        row = out.filter(pl.col("title") == "beta item").row(0, named=True)
        assert row["source"] == "escalated" and row["label"] == "Vitamin" and row["status"] == "ok"
        assert row["first_label"] is None  # the first answer was not a label


# --- refusals --------------------------------------------------------------------------------


def test_a_cascade_needs_one_label_per_row_and_the_cache(make_job):
    with pytest.raises(ConfigError, match="several labels"):
        plan_job(make_job(labels_max=3, cascade={}).load())
    with pytest.raises(ConfigError, match="cache"):
        plan_job(make_job(cascade={}, cache={"enabled": False}).load())
    with pytest.raises(ConfigError, match="batch files"):
        plan_job(make_job(cascade={}).load(), batch_files=True)


@pytest.mark.parametrize(
    ("escalate", "message"),
    [
        ({"backend": "nope", "model": "m"}, "nope"),
        ({"backend": "fake", "model": "m", "statuses": []}, "needs a rule"),
        ({"backend": "fake", "model": "m", "fake": {"speed": 1}}, "escalate.sections.fake.speed|speed"),
        ({"backend": "fake", "model": "m", "confidence_below": 1.5}, "confidence_below"),
    ],
)
def test_escalate_settings_are_checked(make_job, escalate, message):
    with pytest.raises(JobFileError, match=message):
        make_job(escalate=escalate).load()


def test_jobs_without_cascade_keep_their_fingerprint_and_columns(make_job):
    plain = plan_job(make_job(name="a").load())
    routed = plan_job(make_job(name="b", cascade={}).load())
    assert "cascade" not in plain.manifest.components and "source" not in plain.schema.names
    assert routed.manifest.fingerprint != plain.manifest.fingerprint
    assert {"source", "student_confidence"} <= set(routed.schema.names)


def test_only_the_last_students_are_kept(tmp_path):
    from pipeline.cascade import KEEP_STUDENTS, _prune

    for n in range(6):
        (tmp_path / f"2026120{n}T000000-abcdef0{n}").mkdir()
    (tmp_path / ".20261207T000000-partial").mkdir()  # one being written: not ours to remove
    _prune(tmp_path, keep="20261201T000000-abcdef01")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len([p for p in left if not p.startswith(".")]) == KEEP_STUDENTS
    assert "20261201T000000-abcdef01" in left and "20261205T000000-abcdef05" in left
    assert ".20261207T000000-partial" in left


def test_a_cascade_and_an_escalation_together(make_job, read_parts, tmp_path):
    files = make_job(
        input=str(OA_MINE), labels=LABELS, chunk_rows=500, cache={"path": str(tmp_path / "c")},
        cascade={"sample_rows": 100},
        escalate={"backend": "fake", "model": "bigger-fake", "confidence_below": 0.3},
    )  # fmt: skip
    summary = run_job(files.load())
    out = pl.from_arrow(read_parts(files.output))
    assert out.height == 1452 and summary["escalations"] > 0
    up = out.filter(pl.col("source") == "escalated")
    assert up.height == summary["rows_by_source"]["escalated"]
    assert (up["first_confidence"] < 0.3).all() and up["first_label"].null_count() == 0
    # a duplicate of an escalated text shares its answer, first answer included
    rest = out.filter(~pl.col("source").is_in(["escalated", "duplicate"]))
    assert rest["first_label"].null_count() == rest.height
