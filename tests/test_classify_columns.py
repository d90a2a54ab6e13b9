"""Single-label answers are parsed on whole columns; the result must equal ``parse``, row by row."""

from __future__ import annotations

import math

import pyarrow as pa

from pipeline.contracts import Completion, answers_table
from pipeline.tasks.base import Task
from pipeline.tasks.classify import ClassifySettings, ClassifyTask

LABELS = ["Tea", "Coffee", "Zielona herbata", "Shoes"]
ANSWERS = [
    Completion("Tea", -0.2, 30, 2, "stop"),
    Completion("  Coffee\n", -0.01, 31, 3, "stop", cached_tokens=16),  # spaces around: still a label
    Completion("Zielona herbata", 0.5, 30, 4, "stop"),  # a logprob above 0 is clipped to 1
    Completion("Shoes", float("nan"), 30, 2, "stop"),  # no usable logprob: no confidence
    Completion("Shoes", None, 30, 2, "stop"),
    Completion("Sho", -0.3, 30, 2, "length"),  # cut short by max_tokens
    Completion("Beer", -0.3, 30, 2, "stop"),  # not a label
    Completion("tea", -0.3, 30, 2, "stop"),  # labels are case-sensitive
    Completion("", None, 0, 0, None, error="HTTP 500 after 3 retries", retries=3),
    Completion("Coffee", -1.5, 29, 2, "stop"),
]
TRUNCATED = [False, False, False, False, False, False, False, False, False, True]


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def test_column_parse_equals_row_parse():
    task = ClassifyTask(ClassifySettings(labels=LABELS))
    answers = answers_table(ANSWERS)
    columns = task.parse_answers(answers, pa.array(TRUNCATED)).to_pylist()
    rows = Task.parse_answers(task, answers, pa.array(TRUNCATED)).to_pylist()
    assert len(columns) == len(rows) == len(ANSWERS)
    for got, want in zip(columns, rows, strict=True):
        assert got.keys() == want.keys()
        assert all(_same(got[k], want[k]) for k in got), (got, want)
    statuses = [r["status"] for r in columns]
    assert statuses == ["ok"] * 5 + ["invalid", "invalid", "invalid", "error", "truncated"]
    assert columns[2]["confidence"] == 1.0 and columns[3]["confidence"] is None
    assert "cut at max_tokens" in columns[5]["error"] and "not one of the labels" in columns[6]["error"]


def test_column_parse_of_no_answers():
    task = ClassifyTask(ClassifySettings(labels=LABELS))
    out = task.parse_answers(answers_table([]), pa.array([], pa.bool_()))
    assert out.num_rows == 0 and out.schema.names == [f.name for f in task.result_fields]
