"""A cascade in the run summary and in the bench: the lines ``labelmill run`` prints for it, and the
projected dollars with the cascade, without it, and what it saves, checked by hand."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import bench as bench_module
from pipeline.bench import _row, _sample, bench, cascade_saving, load_profiles, markdown
from pipeline.cli.jobs import print_summary
from pipeline.config import load_job
from pipeline.costs import ApiPrice, GpuPrice, PriceTable, Sample, project

API = ApiPrice(
    id="test/api-model",
    provider="test",
    model="api-model",
    input_per_mtok=1.0,
    cached_input_per_mtok=0.5,
    output_per_mtok=4.0,
    batch_discount=0.5,
    as_of=dt.date(2026, 11, 1),
    source="https://example.com/pricing",
)
GPU = GpuPrice(
    id="test-gpu",
    name="Test GPU",
    usd_per_hour=3.6,
    as_of=dt.date(2026, 11, 1),
    source="https://example.com/gpu",
    note="on-demand",
)
NO_GPU = {"host": "test-host", "cpu": "x86_64", "cores": 2, "gpu": None}

# 100 sampled rows: 20 texts asked of the model (100 input tokens and 2 output tokens each, 1.8 s
# each), 70 answered by the student, 10 rows repeating a text already answered.
MEASURED = {
    "rows": 100,
    "input_tokens": 2000,
    "cached_tokens": 0,
    "output_tokens": 40,
    "labelling_seconds": 36.0,
    "model_calls": 20,
    "cache_hits": 0,
    "student_labels": 70,
    "duplicates": 10,
    "rows_needing_answer": 100,
}


def _summary(**extra) -> dict:
    return {
        "chunks_done": 10,
        "chunks_total": 10,
        "rows_done": 1452,
        "rows_total": 1452,
        "status_counts": {"ok": 1452},
        "prompt_tokens": 50_000,
        "cached_tokens": 0,
        "output_tokens": 1000,
        "model_calls": 480,
        "cache_hits": 0,
        "duplicates": 21,
        "retries": 0,
        "rows_per_second": 100.0,
        "labelling_seconds": 14.5,
        "complete": True,
        "run_folder": "/runs/job",
        **extra,
    }


CASCADE = {
    "student": "tfidf-3f2a",
    "chosen": "trained",
    "student_kind": "tfidf",
    "threshold": 0.33512,
    "target_agreement": 0.95,
    "delta": 0.05,
    "held_out_texts": 400,
    "held_out_accepted": 220,
    "agreement_estimate": 0.9909,
    "agreement_bound": 0.96,
    "why_no_threshold": None,
    "sample": {"rows": 500, "distinct_texts": 480, "model_calls": 480, "held_out": 400},
    "trained_on_answers": 2000,
    "rows_by_source": {"model": 480, "student": 951, "duplicate": 21},
    "student_share": 0.655,
    "model_calls_saved": 951,
    "overall_agreement_bound": 0.9738,
}


def test_a_summary_without_routing_prints_the_lines_it_always_did(capsys):
    print_summary(_summary())
    err = capsys.readouterr().err
    assert (
        "answers 480 from the model, 0 from the cache, 21 rows shared a duplicate's answer; 0 retries" in err
    )
    assert "sources" not in err and "cascade" not in err and "escalated" not in err


def test_a_cascade_summary_prints_its_sources_student_and_bound(capsys):
    summary = _summary(
        student_labels=951,
        escalations=12,
        escalation_calls=9,
        rows_by_source={"cache": 0, "duplicate": 21, "escalated": 12, "model": 468, "student": 951},
        cascade=CASCADE,
    )
    print_summary(summary)
    lines = capsys.readouterr().err.splitlines()
    assert "answers 480 from the model, 951 from the student, 0 from the cache, 21 rows shared" in lines[3]
    assert "sources  model 468, student 951, duplicate 21, escalated 12" in lines
    assert (
        "cascade  student tfidf (trained): threshold 0.335, answered 951 rows (65.5%); held-out "
        "agreement 0.991, lower bound 0.960 at delta 0.05 (target 0.95); 951 model calls saved"
    ) in lines
    assert "escalated  12 texts to the second backend (9 asked now, rest from its cache)" in lines


def test_a_cascade_without_a_threshold_says_why_every_row_went_to_the_model(capsys):
    cascade = CASCADE | {
        "threshold": None,
        "agreement_estimate": None,
        "agreement_bound": None,
        "why_no_threshold": "no threshold keeps the bound above the target",
        "rows_by_source": {"model": 1431, "duplicate": 21},
        "student_share": 0.0,
        "model_calls_saved": 0,
    }
    summary = _summary(student_labels=0, rows_by_source=cascade["rows_by_source"], cascade=cascade)
    print_summary(summary, to_err=False)
    lines = capsys.readouterr().out.splitlines()
    assert "sources  model 1431, duplicate 21" in lines
    assert (
        "cascade  the student could not meet agreement 0.95 (no threshold keeps the bound above the "
        "target): every row went to the model"
    ) in lines
    assert not any(line.startswith("escalated") for line in lines)


def test_the_measured_sample_counts_student_labels_as_rows_needing_an_answer():
    sample = _sample(MEASURED)
    assert (sample.model_calls, sample.rows_needing_answer) == (20, 100)


def test_the_saving_is_the_student_labels_priced_as_model_calls():
    p = project(_sample(MEASURED), API, 1_000_000)
    # per call: 100 in x $1 + 2 out x $4 per 1M tokens = $108 per 1M calls; with the cascade 20
    # calls per 100 rows -> $21.60 per 1M rows, without it 20 + 70 calls -> $97.20
    assert p.usd_per_million_items == pytest.approx(21.6)
    saving = cascade_saving(p, 70)
    assert saving["usd_per_million_items_without_cascade"] == pytest.approx(97.2)
    assert saving["cascade_saving_usd_per_million_items"] == pytest.approx(75.6)
    assert saving["cascade_cost_ratio"] == pytest.approx(21.6 / 97.2)

    # self-hosted: 1.8 s a call at $3.60/h -> $0.0018 a call; 0.2 vs 0.9 calls per row
    gpu = cascade_saving(project(_sample(MEASURED), GPU, 1_000_000), 70)
    assert gpu["usd_per_million_items_without_cascade"] == pytest.approx(1620.0)
    assert gpu["cascade_saving_usd_per_million_items"] == pytest.approx(1260.0)


def test_without_a_model_call_the_saving_is_unknown():
    sample = Sample(100, 0, 0, 0, 1.0, model_calls=0, rows_needing_answer=100)
    saving = cascade_saving(project(sample, API, 1_000_000), 100)
    assert set(saving.values()) == {None}


def test_a_row_without_student_labels_is_the_projection_alone():
    p = project(_sample(MEASURED), API, 1_000_000)
    assert _row("api", p, estimate=False) == _row("api", p, estimate=False, student_labels=0)
    assert "usd_per_million_items_without_cascade" not in _row("api", p, estimate=False)
    assert _row("api", p, False, 70)["usd_per_million_items_without_cascade"] == pytest.approx(97.2)


@pytest.fixture
def fake_runs(make_job, tmp_path, monkeypatch):
    """``bench`` on a 100-row job whose runs are replaced by MEASURED's summary (with the student's
    labels as given), so that its report is checked against numbers worked out by hand."""
    data = pa.table({"id": pa.array(range(100), pa.int64()), "title": [f"Green tea {i}" for i in range(100)]})
    job = load_job(make_job(data).path)
    (tmp_path / "profiles.yaml").write_text(
        yaml.safe_dump({"cascade": {"job": {}, "price": {"api": API.id, "gpu": GPU.id}}})
    )
    prices = PriceTable(api=[API], gpu=[GPU])

    def run(student_labels: int | None, out: str, **kwargs) -> tuple[dict, str]:
        def run_job(profile_job, restart):
            parts = Path(profile_job.output) / "parts"
            parts.mkdir(parents=True)
            pq.write_table(
                pa.table({"label": ["Tea"] * 100, "status": ["ok"] * 100}), parts / "part-0.parquet"
            )
            summary = {
                "rows_done": 100,
                "status_counts": {"ok": 100},
                "prompt_tokens": MEASURED["input_tokens"],
                "cached_tokens": 0,
                "output_tokens": MEASURED["output_tokens"],
                "model_calls": 20,
                "cache_hits": 0,
                "duplicates": 10 if student_labels else 80,
                "labelling_seconds": 36.0,
                "this_invocation": {"wall_seconds": 37.0},
                "retries": 0,
            }
            if student_labels is not None:
                summary["student_labels"] = student_labels
            return summary

        monkeypatch.setattr(bench_module, "run_job", run_job)
        report = bench(
            job,
            ["cascade"],
            load_profiles(tmp_path / "profiles.yaml"),
            prices,
            tmp_path / out,
            sample_rows=100,
            target_rows=1_000_000,
            charts=False,
            machine=NO_GPU,
            **kwargs,
        )
        return report, (tmp_path / out / "bench.md").read_text()

    return run


def test_the_bench_reports_the_cost_with_and_without_the_cascade(fake_runs):
    report, md = fake_runs(70, "with")
    measured = report["backends"]["cascade"]
    assert (measured["student_labels"], measured["rows_needing_answer"]) == (70, 100)
    by_name = {p["name"]: p for p in report["projections"]}
    api, gpu = by_name["cascade"], by_name["cascade (time x test-gpu $/h)"]
    assert api["usd_per_million_items"] == pytest.approx(21.6)
    assert api["usd_per_million_items_without_cascade"] == pytest.approx(97.2)
    assert api["cascade_saving_usd_per_million_items"] == pytest.approx(75.6)
    assert api["cascade_cost_ratio"] == pytest.approx(0.2222, abs=1e-4)
    assert gpu["usd_per_million_items_without_cascade"] == pytest.approx(1620.0)
    assert "| $ per 1M items | $ per 1M without cascade | cascade saving | projected $ |" in md
    assert "| cascade | api | 20.0% | 21.60 | 97.20 | 75.60 (0.22x) | 22 |" in md
    assert "cascade: a cascade's student answered 70 of the sampled texts in the model's place" in md


def test_with_no_dedupe_savings_the_student_rows_are_priced_and_nothing_is_saved(fake_runs):
    report, md = fake_runs(70, "raw", dedupe_savings=False)
    api = next(p for p in report["projections"] if p["name"] == "cascade")
    assert api["model_share"] == 1.0 and api["usd_per_million_items"] == pytest.approx(108.0)
    assert "usd_per_million_items_without_cascade" not in api
    assert "without cascade |" not in md and "take no cascade saving" in md


def test_a_bench_without_a_cascade_reports_as_before(fake_runs):
    old, old_md = fake_runs(None, "old")
    zero, zero_md = fake_runs(0, "zero")
    # compared whole: a summary with no student labels adds no key and no column
    assert json.dumps(old, default=str) == json.dumps(zero, default=str)
    assert old_md == zero_md
    assert "student_labels" not in old["backends"]["cascade"]
    assert not any("cascade" in key for p in old["projections"] for key in p)
    assert "| $ per 1M items | projected $ |" in old_md and "without cascade" not in old_md
    assert markdown(old) == old_md
