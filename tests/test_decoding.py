"""``decoding:`` of single-label classification through the whole pipeline, on the ``fake`` test
double (which scores a label set from hashes): the ``label_probs`` column, the cache keeping the
probabilities, which mode ``auto`` picks and why, the job keys that can't go together, and answer
files written before scored answers existed.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import default_table

from pipeline.cache import _EARLIER_SCHEMAS, ResultCache
from pipeline.cli import main
from pipeline.contracts import GENERATE, SCORE
from pipeline.errors import ConfigError, JobFileError
from pipeline.plan import digest, plan_job
from pipeline.runner import run_job


def test_scored_labels_carry_their_probabilities(make_job, read_parts):
    job = make_job(label_probs=3)
    summary = run_job(job.load())
    assert summary["complete"]
    out = read_parts(job.output).to_pylist()
    assert out and all(r["status"] == "ok" for r in out)
    for row in out:
        probs = row["label_probs"]
        assert len(probs) == 3 and probs[0]["label"] == row["label"]
        assert probs[0]["prob"] == pytest.approx(row["confidence"])
        assert [p["prob"] for p in probs] == sorted((p["prob"] for p in probs), reverse=True)
        assert row["output_tokens"] == 1


def test_every_label_asked_for_sums_to_one(make_job, read_parts):
    job = make_job()
    labels = job.spec["labels"]
    job.rewrite(label_probs=len(labels))
    run_job(job.load())
    for row in read_parts(job.output).to_pylist():
        assert {p["label"] for p in row["label_probs"]} == set(labels)
        assert math.fsum(p["prob"] for p in row["label_probs"]) == pytest.approx(1.0, abs=1e-9)


def test_cached_answers_keep_their_probabilities(make_job, read_parts):
    job = make_job(label_probs=2)
    run_job(job.load())
    first = read_parts(job.output).select(["id", "label", "confidence", "label_probs"])
    again = run_job(job.load(), restart=True)
    assert again["model_calls"] == 0 and again["cache_hits"] > 0
    assert read_parts(job.output).select(["id", "label", "confidence", "label_probs"]).equals(first)


def test_validate_says_which_decoding_and_why(make_job):
    scored = CliRunner().invoke(main, ["validate", str(make_job().path), "--rows", "0"])
    assert scored.exit_code == 0, scored.output
    assert "decoding score" in scored.output
    hot = make_job(sampling={"temperature": 0.7})
    sampled = CliRunner().invoke(main, ["validate", str(hot.path), "--rows", "0"])
    assert sampled.exit_code == 0, sampled.output
    assert "decoding constrained" in sampled.output and "temperature > 0" in sampled.output


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"decoding": "constrained", "label_probs": 3}, "label_probs' needs decoding: score"),
        ({"decoding": "score", "labels_max": 2}, "multi-label"),
        ({"labels_max": 2, "label_probs": 2}, "single-label"),
        ({"label_probs": -1}, "label_probs"),
        ({"decoding": "beam"}, "decoding"),
    ],
)
def test_keys_that_cannot_go_together_are_refused(make_job, keys, message):
    with pytest.raises(JobFileError, match=message):
        make_job(**keys).load()


def test_explicit_score_is_refused_where_it_cannot_work(make_job):
    with pytest.raises(ConfigError, match="temperature > 0"):
        plan_job(make_job(decoding="score", sampling={"temperature": 0.5}).load())
    with pytest.raises(ConfigError, match="batch files"):
        plan_job(make_job(decoding="score").load(), batch_files=True)
    with pytest.raises(ConfigError, match="label_probs needs scored labels"):
        plan_job(make_job(label_probs=2).load(), batch_files=True)


def test_auto_picks_score_where_it_can_and_constrained_elsewhere(make_job):
    job = make_job().load()
    assert plan_job(job).request.decoding == SCORE
    assert plan_job(job, batch_files=True).request.decoding == GENERATE  # export / import
    multi = make_job(labels_max=2).load()
    assert plan_job(multi).request.decoding == GENERATE


def test_a_constrained_job_keeps_the_fingerprint_it_had_before_scoring(make_job):
    job = make_job(decoding="constrained").load()
    plan = plan_job(job)
    labels = list(job.task_settings.labels)
    assert plan.manifest.components["labels"] == digest({"labels": labels, "labels_max": None})
    scored = plan_job(make_job().load())
    assert scored.manifest.components["labels"] != plan.manifest.components["labels"]
    assert scored.namespace != plan.namespace  # and the two never share cached answers


@pytest.mark.parametrize(
    "schema", _EARLIER_SCHEMAS, ids=["before-scoring", "before-shortlists", "before-levels"]
)
def test_answer_files_from_earlier_versions_are_still_read(tmp_path, schema):
    folder = tmp_path / "ns"
    folder.mkdir()
    n = 3
    columns = {
        "key": ["a", "b", "c"],
        "sent": ["A", "B", "C"],
        "text": ["Tea", "Coffee", "Tea"],
        "logprob": [-0.1, -0.2, -0.3],
        "prompt_tokens": [10] * n,
        "output_tokens": [2] * n,
        "finish_reason": ["stop"] * n,
        "cached_tokens": [None] * n,
        "retries": [0] * n,
    }
    for name in schema.names[len(columns) :]:
        columns[name] = [None] * n
    table = pa.Table.from_pydict(columns, schema=schema)
    with (
        pa.OSFile(str(folder / "seg-0-1.arrows"), "wb") as sink,
        pyarrow.ipc.new_stream(sink, schema) as writer,
    ):
        writer.write_table(table)
    cache = ResultCache(tmp_path, "ns")
    hits, answers = cache.lookup(pl.Series(["c", "x", "a"]))
    assert hits.tolist() == [0, 2]
    assert answers.column("text").to_pylist() == ["Tea", "Tea"]
    for name in ("alternatives", "choices", "levels"):
        assert answers.column(name).null_count == 2
    assert np.allclose(answers.column("logprob").to_numpy(), [-0.3, -0.1])
    cache.close()


def test_eval_reads_the_label_probabilities(make_job, tmp_path):
    from pipeline.evaluation import evaluate

    job = make_job(default_table(60), label_probs=3)
    labels = job.spec["labels"]
    gold = pa.table(
        {"id": pa.array(range(1000, 1060), pa.int64()), "category": [labels[i % 3] for i in range(60)]}
    )
    pq.write_table(gold, tmp_path / "gold.parquet")
    run_job(job.load())
    report = evaluate(
        job.output, tmp_path / "gold.parquet", on="id", charts=False, thresholds=[0.0, 0.1, 0.5]
    )
    scored = report["classification"]
    lp = scored["label_probs"]
    assert lp["k"] == 3 and lp["rows_with_label_probs"] == 60
    top = [t["accuracy"] for t in lp["top_k_accuracy"]]
    assert top[0] == pytest.approx(scored["accuracy"])  # the first label is the label
    assert top == sorted(top) and top[-1] > top[0]  # a longer shortlist holds the gold more often
    accepted = [t["accepted"] for t in lp["margin_thresholds"]]
    assert accepted[0] == 60 and accepted == sorted(accepted, reverse=True)
    assert 0 < lp["mean_margin"] < 1 and lp["mean_entropy"] > 0
    assert "## Label probabilities (`label_probs`, top 3)" in (job.output / "eval" / "eval.md").read_text()
