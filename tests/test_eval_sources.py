"""``labelmill eval`` per ``source`` of a cascade run (model, cache, duplicate, student, escalated).

Run folders are written directly (parts + run.json), as in test_evaluation; every expected number is
worked out by hand in the comments.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_evaluation import write_run

from pipeline.evaluation import evaluate

LABELS = ["Coffee", "Tea", "Vitamin"]
SECTION = "## By source (cascade)"

# (id, gold, label, status, confidence, source, student_confidence, first_label, first_confidence)
ROWS = [
    (1, "Coffee", "Coffee", "ok", 0.9, "model", None, None, None),
    (2, "Tea", "Tea", "ok", 0.8, "model", None, None, None),
    (3, "Tea", "Coffee", "ok", 0.6, "model", None, None, None),
    # not ok: no label and no confidence, whatever the columns say
    (4, "Vitamin", "Vitamin", "invalid", 0.99, "model", None, None, None),
    (5, "Coffee", "Coffee", "ok", 0.7, "cache", None, None, None),
    (6, "Tea", "Tea", "ok", 0.9, "cache", None, None, None),
    (7, "Tea", "Tea", "ok", 0.8, "duplicate", None, None, None),
    (8, "Coffee", "Coffee", "ok", 0.95, "student", 0.8, None, None),
    (9, "Tea", "Tea", "ok", 0.9, "student", 0.7, None, None),
    (10, "Vitamin", "Vitamin", "ok", 0.85, "student", 0.6, None, None),
    # escalated: the student scored them too low, so a second backend answered
    (11, "Coffee", "Coffee", "ok", 0.9, "escalated", 0.3, "Tea", 0.4),
    (12, "Tea", "Tea", "ok", 0.8, "escalated", 0.2, "Tea", 0.55),
    (13, "Vitamin", "Vitamin", "ok", 0.7, "escalated", 0.1, "Coffee", 0.3),
    (14, "Vitamin", "Coffee", "ok", 0.6, "escalated", 0.4, "Tea", 0.5),
    (15, "Coffee", "Coffee", "ok", 1.0, "rules", None, None, None),
    (16, "Tea", None, "empty_input", None, None, None, None, None),
]
ONLY_RUN = (17, None, "Tea", "ok", 0.9, "student", 0.9, None, None)
GOLD_MISSING = (18, None, "Tea", "ok", 0.9, "cache", None, None, None)
SOURCE_COLUMNS = ("source", "student_confidence", "first_label", "first_confidence")

# model: 2 right of 4 (the invalid row is wrong), confidence over the 3 labelled rows
# escalated: final label right on 3 of 4, first label on 1 of 4 (row 12)
EXPECTED = {
    "model": {"run_rows": 4, "rows": 4, "labelled": 3, "right": 2, "accuracy": 0.5,
              "mean_confidence": (0.9 + 0.8 + 0.6) / 3},
    "cache": {"run_rows": 3, "rows": 2, "labelled": 2, "right": 2, "accuracy": 1.0,
              "mean_confidence": 0.8},
    "duplicate": {"run_rows": 1, "rows": 1, "labelled": 1, "right": 1, "accuracy": 1.0,
                  "mean_confidence": 0.8},
    "student": {"run_rows": 4, "rows": 3, "labelled": 3, "right": 3, "accuracy": 1.0,
                "mean_confidence": 0.9, "mean_student_confidence": 0.7},
    "escalated": {"run_rows": 4, "rows": 4, "labelled": 4, "right": 3, "accuracy": 0.75,
                  "mean_confidence": 0.75, "first_label_accuracy": 0.25,
                  "first_label_mean_confidence": (0.4 + 0.55 + 0.3 + 0.5) / 4},
    "rules": {"run_rows": 1, "rows": 1, "labelled": 1, "right": 1, "accuracy": 1.0,
              "mean_confidence": 1.0},
    "none": {"run_rows": 1, "rows": 1, "labelled": 0, "right": 0, "accuracy": 0.0,
             "mean_confidence": None},
}  # fmt: skip


def cascade_run(root: Path, rows=None, drop: tuple[str, ...] = ()) -> Path:
    """A cascade run's output; written in reverse so the report's order is not the table's."""
    rows = list(reversed(rows if rows is not None else [*ROWS, ONLY_RUN, GOLD_MISSING]))
    columns = {
        "id": pa.array([r[0] for r in rows], pa.int64()),
        "label": pa.array([r[2] for r in rows], pa.string()),
        "confidence": pa.array([r[4] for r in rows], pa.float64()),
        "status": pa.array([r[3] for r in rows], pa.string()),
        "source": pa.array([r[5] for r in rows], pa.string()),
        "student_confidence": pa.array([r[6] for r in rows], pa.float64()),
        "first_label": pa.array([r[7] for r in rows], pa.string()),
        "first_confidence": pa.array([r[8] for r in rows], pa.float64()),
    }
    columns = {k: v for k, v in columns.items() if k not in drop}
    return write_run(root, columns, {"task": "classify", "provenance": {"model": "m", "labels": LABELS}})


def gold_file(tmp_path: Path, rows=None, name: str = "gold.parquet") -> Path:
    rows = rows if rows is not None else [*ROWS, GOLD_MISSING]
    path = tmp_path / name
    pq.write_table(pa.table({"id": [r[0] for r in rows], "category": [r[1] for r in rows]}), path)
    return path


def score(tmp_path: Path, name: str, rows=None, drop: tuple[str, ...] = (), gold=None) -> dict:
    run = cascade_run(tmp_path / name, rows, drop)
    return evaluate(run, gold or gold_file(tmp_path), "id", out_dir=tmp_path / name / "eval", charts=False)


def assert_figures(found: dict, expected: dict) -> None:
    assert list(found) == list(expected)
    for source, figures in expected.items():
        assert found[source] == pytest.approx(figures), source


def test_figures_per_source_by_hand(tmp_path):
    report = score(tmp_path, "run")
    m = report["classification"]
    by = m["by_source"]
    assert_figures(by, EXPECTED)
    # the sources split the scored rows, and their right answers add up to the overall accuracy
    assert sum(s["rows"] for s in by.values()) == report["join"]["scored"] == len(ROWS)
    assert sum(s["right"] for s in by.values()) == pytest.approx(m["accuracy"] * len(ROWS))
    assert json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["classification"][
        "by_source"
    ] == json.loads(json.dumps(by))

    md = (tmp_path / "run" / "eval" / "eval.md").read_text()
    assert SECTION in md
    assert md.index("## Confusion matrix") < md.index(SECTION) < md.index("## Calibration of confidence")
    assert "| student | 4 | 3 | 3 | 1.000 | 0.900 | 0.700 | - |" in md
    assert "| escalated | 4 | 4 | 4 | 0.750 | 0.750 | - | 0.250 |" in md
    assert "| none | 1 | 1 | 0 | 0.000 | - | - | - |" in md
    assert "first backend's label was right for 25.0%, the final label for 75.0% (+50.0 points)" in md


def test_a_wrong_label_lowers_only_its_own_source(tmp_path):
    baseline = score(tmp_path, "base")["classification"]["by_source"]
    for row_id, source in ((9, "student"), (6, "cache")):
        rows = [
            (r[0], r[1], "Vitamin" if r[0] == row_id else r[2], *r[3:])
            for r in [*ROWS, ONLY_RUN, GOLD_MISSING]
        ]
        by = score(tmp_path, f"wrong-{row_id}", rows)["classification"]["by_source"]
        rows_of_source = baseline[source]["rows"]
        assert by[source]["right"] == baseline[source]["right"] - 1
        assert by[source]["accuracy"] == pytest.approx((baseline[source]["right"] - 1) / rows_of_source)
        assert {k: v for k, v in by.items() if k != source} == {
            k: v for k, v in baseline.items() if k != source
        }


def test_escalation_shows_what_the_second_backend_gained(tmp_path):
    # first label right on 13 too: 2 of 4 before, still 3 of 4 after
    rows = [(*r[:7], "Vitamin", r[8]) if r[0] == 13 else r for r in ROWS]
    escalated = score(tmp_path, "run", rows)["classification"]["by_source"]["escalated"]
    assert escalated["first_label_accuracy"] == pytest.approx(0.5)
    assert escalated["accuracy"] == pytest.approx(0.75)
    md = (tmp_path / "run" / "eval" / "eval.md").read_text()
    assert "right for 50.0%, the final label for 75.0% (+25.0 points)" in md


def test_without_first_label_columns_no_first_label_accuracy(tmp_path):
    by = score(tmp_path, "run", drop=("first_label", "first_confidence"))["classification"]["by_source"]
    assert by["escalated"]["first_label_accuracy"] is None
    assert by["escalated"]["first_label_mean_confidence"] is None
    assert by["escalated"]["accuracy"] == pytest.approx(0.75)
    md = (tmp_path / "run" / "eval" / "eval.md").read_text()
    assert SECTION in md and "Escalation:" not in md


def test_gold_label_sets_judge_the_first_label_by_membership(tmp_path):
    rows = [
        (1, ["Coffee", "Tea"], "Tea", "ok", 0.9, "escalated", 0.2, "Coffee", 0.5),  # both in the set
        (2, ["Tea"], "Tea", "ok", 0.8, "escalated", 0.3, "Coffee", 0.4),  # first label not in it
        (3, ["Vitamin"], "Coffee", "ok", 0.7, "model", None, None, None),
        (4, ["Coffee"], "Coffee", "ok", 0.6, "student", 0.9, None, None),
    ]
    gold = tmp_path / "gold-sets.parquet"
    pq.write_table(
        pa.table(
            {"id": [r[0] for r in rows], "category": pa.array([r[1] for r in rows], pa.list_(pa.string()))}
        ),
        gold,
    )
    report = score(tmp_path, "run", rows, gold=gold)
    assert report["kind"] == "classify_sets"
    by = report["classification_sets"]["by_source"]
    assert list(by) == ["model", "student", "escalated"]
    assert by["escalated"]["accuracy"] == 1.0 and by["escalated"]["first_label_accuracy"] == 0.5
    assert by["model"]["accuracy"] == 0.0 and by["student"]["accuracy"] == 1.0
    assert SECTION in (tmp_path / "run" / "eval" / "eval.md").read_text()


def test_output_without_source_reports_as_before(tmp_path):
    with_source = score(tmp_path, "cascade")
    plain = score(tmp_path, "plain", drop=SOURCE_COLUMNS)
    assert "by_source" not in plain["classification"]
    assert "by_source" not in (tmp_path / "plain" / "eval" / "eval.json").read_text()
    plain_md = (tmp_path / "plain" / "eval" / "eval.md").read_text()
    assert SECTION not in plain_md
    # the source columns add the one key and the one section, and change nothing else
    cascade_only = {k: v for k, v in with_source["classification"].items() if k != "by_source"}
    assert cascade_only == plain["classification"]
    cascade_md = (tmp_path / "cascade" / "eval" / "eval.md").read_text()
    start = cascade_md.index(SECTION) - 1
    end = cascade_md.index("\n## Calibration of confidence")
    assert (cascade_md[:start] + cascade_md[end:]).replace("cascade", "plain") == plain_md
