"""``labelmill eval`` on labels that are taxonomy paths: accuracy per level and hierarchical P/R/F1."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import default_table

from pipeline.evaluation import evaluate
from pipeline.evaluation.classification import hierarchy_metrics
from pipeline.runner import run_job


def test_levels_and_ancestor_overlap_by_hand():
    gold = ["A > B > C", "A > B > C", "A > D", "E"]
    pred = ["A > B > C", "A > B > X", "A > B", None]
    h = hierarchy_metrics(gold, pred)
    assert [x["rows"] for x in h["levels"]] == [4, 3, 2]
    # level 1: A, A, A right, E missing -> 3/4; level 2: AB, AB right, AD vs AB wrong -> 2/3; level 3: 1/2
    assert [x["accuracy"] for x in h["levels"]] == pytest.approx([0.75, 2 / 3, 0.5])
    # ancestors shared 3 + 2 + 1 + 0 = 6; predicted 3 + 3 + 2 + 0 = 8; gold 3 + 3 + 2 + 1 = 9
    assert h["hierarchical_precision"] == pytest.approx(6 / 8)
    assert h["hierarchical_recall"] == pytest.approx(6 / 9)
    assert h["hierarchical_f1"] == pytest.approx(2 * (6 / 8) * (6 / 9) / (6 / 8 + 6 / 9))


def test_flat_labels_get_no_hierarchy():
    assert hierarchy_metrics(["Tea", "Coffee"], ["Tea", "Tea"]) is None


def test_eval_reports_the_taxonomy_levels(make_job, tmp_path):
    labels = ["Home > Kitchen > Kettles", "Home > Kitchen > Pans", "Home > Garden", "Toys"]
    job = make_job(default_table(40), labels=labels)
    ids = pa.array(range(1000, 1040), pa.int64())
    pq.write_table(
        pa.table({"id": ids, "category": [labels[i % 4] for i in range(40)]}), tmp_path / "g.parquet"
    )
    run_job(job.load())
    report = evaluate(job.output, tmp_path / "g.parquet", "id", charts=False)
    h = report["classification"]["hierarchy"]
    assert [x["level"] for x in h["levels"]] == [1, 2, 3]
    assert h["levels"][0]["accuracy"] >= report["classification"]["accuracy"]  # coarser is never worse
    assert "## Taxonomy paths" in (job.output / "eval" / "eval.md").read_text()
