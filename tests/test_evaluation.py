"""``labelmill eval`` against an independent computation (scikit-learn) and hand-worked numbers.

Run folders are written directly (parts + run.json), so no backend runs here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.preprocessing import MultiLabelBinarizer

from pipeline.cli import main
from pipeline.errors import ConfigError, DuplicateIdError, MissingDependencyError, RunStateError
from pipeline.evaluation import (
    NONE,
    _fold,
    calibration,
    classification_metrics,
    evaluate,
    parse_null_values,
    parse_thresholds,
)
from pipeline.evaluation.charts import confusion_png
from pipeline.evaluation.gold import NullValues

PNG = b"\x89PNG\r\n\x1a\n"

# (id, gold, predicted label, status, confidence)
ROWS = [
    (1, "Coffee", "Coffee", "ok", 0.9),
    (2, "Coffee", "Coffee", "ok", 0.8),
    (3, "Coffee", "Tea", "ok", 0.6),
    (4, "Coffee", "Shoes", "ok", 0.55),  # Shoes: predicted, never in gold
    (5, "Tea", "Tea", "truncated", 0.95),
    (6, "Tea", "Tea", "ok", 0.7),
    (7, "Tea", "Coffee", "ok", 0.4),
    (8, "Tea", "Tea", "invalid", 0.99),  # not ok: wrong with no label, whatever the columns say
    (9, "Vitamin", "Coffee", "ok", 0.3),  # Vitamin: in gold, never predicted
    (10, "Vitamin", "Tea", "ok", 0.65),
    (11, "Vitamin", None, "error", None),
    (12, "Vitamin", None, "empty_input", None),
    (13, "Coffee", "Coffee", "ok", 1.0),
    (14, "Tea", "Shoes", "ok", 0.2),
]
GOLD_MISSING = (15, None, "Tea", "ok", 0.5)
ONLY_RUN = [(100, None, "Tea", "ok", 0.5), (101, None, "Coffee", "ok", 0.5)]
ONLY_GOLD = [(200, "Tea"), (201, "Coffee"), (202, "Vitamin")]


def write_run(root: Path, columns: dict[str, pa.Array], manifest: dict, parts: int = 2) -> Path:
    """A run folder as labelmill writes it: parts/part-*.parquet and run.json."""
    table = pa.table(columns)
    (root / "parts").mkdir(parents=True)
    step = math.ceil(table.num_rows / parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), root / "parts" / f"part-{i:05d}.parquet")
    written = {"labelmill_version": "0", "created_at": "2026-01-01T00:00:00+00:00", "fingerprint": "f",
               "components": {}, "inputs": [], "rows": table.num_rows, "chunk_rows": step,
               "chunks": parts, "id_column": "id", "provenance": {}, **manifest}  # fmt: skip
    (root / "run.json").write_text(json.dumps(written))
    return root


def classify_run(tmp_path: Path, rows=None) -> Path:
    rows = rows if rows is not None else [*ROWS, GOLD_MISSING, *ONLY_RUN]
    return write_run(
        tmp_path / "run",
        {
            "id": pa.array([r[0] for r in rows], pa.int64()),
            "label": pa.array([r[2] for r in rows], pa.string()),
            "confidence": pa.array([r[4] for r in rows], pa.float64()),
            "status": pa.array([r[3] for r in rows], pa.string()),
            "error": pa.array([None if r[3] == "ok" else "x" for r in rows], pa.string()),
        },
        {"task": "classify", "provenance": {"model": "m", "labels": ["Coffee", "Tea", "Vitamin", "Shoes"]}},
    )


def classify_gold(tmp_path: Path, rows=None, extra=ONLY_GOLD) -> Path:
    rows = rows if rows is not None else [*ROWS, GOLD_MISSING]
    path = tmp_path / "gold.parquet"
    pairs = [(r[0], r[1]) for r in rows] + list(extra)
    pq.write_table(pa.table({"id": [p[0] for p in pairs], "category": [p[1] for p in pairs]}), path)
    return path


def sklearn_view(rows):
    y_true = [r[1] for r in rows]
    y_pred = [r[2] if r[3] in ("ok", "truncated") else NONE for r in rows]
    return y_true, y_pred


def test_classification_matches_sklearn(tmp_path):
    report = evaluate(classify_run(tmp_path), classify_gold(tmp_path), "id", out_dir=tmp_path / "eval")
    m = report["classification"]
    y_true, y_pred = sklearn_view(ROWS)
    gold_classes = sorted(set(y_true))
    classes = sorted(set(y_true) | set(y_pred) - {NONE})
    assert classes == ["Coffee", "Shoes", "Tea", "Vitamin"]

    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    macro = f1_score(y_true, y_pred, labels=gold_classes, average="macro", zero_division=0)
    micro = f1_score(y_true, y_pred, labels=gold_classes, average="micro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(macro)
    assert m["micro_f1"] == pytest.approx(micro)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    by_label = {c["label"]: c for c in m["per_class"]}
    assert [c["label"] for c in m["per_class"]] == classes
    for i, c in enumerate(classes):
        assert by_label[c]["precision"] == pytest.approx(p[i])
        assert by_label[c]["recall"] == pytest.approx(r[i])
        assert by_label[c]["f1"] == pytest.approx(f[i])
        assert by_label[c]["support"] == s[i]
    assert by_label["Vitamin"]["never_predicted"] and by_label["Vitamin"]["precision"] == 0
    assert by_label["Shoes"]["not_in_gold"] and by_label["Shoes"]["support"] == 0

    cm = confusion_matrix(y_true, y_pred, labels=[*classes, NONE])
    assert m["confusion"]["columns"] == [*classes, NONE]
    assert m["confusion"]["matrix"] == cm[: len(classes)].tolist()
    assert m["unlabelled"] == 3  # invalid, error, empty_input

    assert report["join"] == {
        "run_rows": len(ROWS) + 3,
        "gold_rows": len(ROWS) + 1 + len(ONLY_GOLD),
        "matched": len(ROWS) + 1,
        "only_in_run": 2,
        "only_in_run_examples": ["100", "101"],
        "only_in_gold": 3,
        "only_in_gold_examples": ["200", "201", "202"],
        "ids_compared_as_text": False,
        "gold_missing": 1,
        "gold_null_like": 0,
        "scored": len(ROWS),
    }
    assert report["coverage"] == pytest.approx(11 / 14)
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| only in the gold file (not scored) | 3 |" in md
    assert "never predicted: precision 0" in md
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["classification"]["macro_f1"] == pytest.approx(macro)
    lines = (tmp_path / "eval" / "confusion.csv").read_text().splitlines()
    assert lines[0] == "gold \\ predicted,Coffee,Shoes,Tea,Vitamin,(none)"
    assert lines[1] == "Coffee," + ",".join(str(v) for v in cm[0])


def test_all_rows_wrong_matches_sklearn():
    gold = ["A", "B", "A", "C"]
    pred = ["B", "A", None, "B"]
    m = classification_metrics(gold, pred)
    y_pred = [p or NONE for p in pred]
    assert m["accuracy"] == accuracy_score(gold, y_pred) == 0
    for avg in ("macro", "micro"):
        expected = f1_score(gold, y_pred, labels=["A", "B", "C"], average=avg, zero_division=0)
        assert m[f"{avg}_f1"] == pytest.approx(expected) == 0
    assert all(c["f1"] == 0 for c in m["per_class"])


def test_ece_and_thresholds_by_hand():
    correct = [True, False, True, False, True, False]
    conf = [0.95, 0.92, 0.55, 0.15, 1.0, None]  # the last row (no confidence) is outside the bins
    cal = calibration(correct, conf, [0.5, 0.9])
    top = (0.95 + 0.92 + 1.0) / 3  # bin [0.9, 1.0]: 2 of 3 right
    expected = (3 * abs(2 / 3 - top) + 1 * abs(1 - 0.55) + 1 * abs(0 - 0.15)) / 5
    assert cal["ece"] == pytest.approx(expected)
    assert cal["rows_with_confidence"] == 5
    assert [b["rows"] for b in cal["bins"]] == [0, 1, 0, 0, 0, 1, 0, 0, 0, 3]
    assert cal["thresholds"][0] == {"threshold": 0.5, "accepted": 4, "share": 4 / 6, "accuracy": 3 / 4}
    assert cal["thresholds"][1] == {"threshold": 0.9, "accepted": 3, "share": 3 / 6, "accuracy": 2 / 3}


def test_lowest_threshold_for_95_percent():
    # 20 rows at 0.80..0.99, one wrong (0.81): at t = 0.80, 19/20 = 95%. Just below, 0.79 is wrong
    # (19/21) and the rows under it are half wrong, so no lower threshold gets back to 95%.
    rows = [(round(0.80 + 0.01 * i, 2), i != 1) for i in range(20)]
    rows += [(0.79, False)] + [(round(0.50 + 0.01 * i, 2), i % 2 == 0) for i in range(10)]
    conf = [c for c, _ in rows] + [None] * 4
    correct = [ok for _, ok in rows] + [False] * 4
    best = calibration(correct, conf, [0.5])["lowest_threshold_for_target"]
    assert best == {"threshold": 0.80, "accepted": 20, "share": 20 / 35, "accuracy": 0.95}


def test_threshold_ties_and_never_reached():
    tied = calibration([True] * 19 + [False], [0.7] * 20, [])["lowest_threshold_for_target"]
    assert tied == {"threshold": 0.7, "accepted": 20, "share": 1.0, "accuracy": 0.95}
    assert calibration([True] * 18 + [False] * 2, [0.7] * 20, [])["lowest_threshold_for_target"] is None
    assert calibration([True], [None], [0.5])["ece"] is None


def test_duplicate_gold_ids_are_refused(tmp_path):
    gold = classify_gold(tmp_path, extra=[(1, "Tea")])
    with pytest.raises(DuplicateIdError, match=r"more than once, e\.g\. 1"):
        evaluate(classify_run(tmp_path), gold, "id")


def test_thresholds_option_is_checked():
    assert parse_thresholds("0.9, 0.5") == [0.5, 0.9]
    for bad in ("1.5", "x", ""):
        with pytest.raises(ConfigError):
            parse_thresholds(bad)


def test_confusion_picture_folds_rare_classes():
    gold = [f"c{i:02d}" for i in range(40) for _ in range(i + 1)]
    pred = [g if int(g[1:]) % 3 else "c05" for g in gold]
    m = classification_metrics(gold, [*pred[:-1], None])
    rows, cols, matrix = _fold(m["confusion"], 25)
    assert len(rows) == 26 and rows[-1] == "(other)" and cols[-2:] == ["(other)", NONE]
    assert sum(map(sum, matrix)) == len(gold)


EXTRACT_ATTRIBUTES = [
    {"name": "color", "type": "string"},
    {"name": "brand", "type": "enum", "values": ["ABC", "XYZ"]},
    {"name": "size", "type": "number", "unit": "oz"},
    {"name": "model_name", "type": "string"},
    {"name": "features", "type": "list[enum]", "values": ["waterproof", "light", "heavy"]},
]


def test_extraction_exact_and_normalised(tmp_path):
    gold_rows = {
        "a": {
            "Color": "red",
            "Brand": {"ＡＢＣ": 1},  # fullwidth: NFKC makes it ABC
            "Size": "12",
            "Model name": "X 1",
            "Features": ["waterproof", "light"],
            "Flavor": "mint",  # the run has no such attribute
        },
        "b": {"Color": {"Blue": 1}, "Size": 12},
        "c": {"Color": "green"},
        "only-gold": {"Color": "red"},
    }
    run = write_run(
        tmp_path / "run",
        {
            "id": ["a", "b", "c", "only-run"],
            "color": ["Red ", "Blue", "green", "red"],
            "brand": ["ABC", "ABC", None, None],
            "size": pa.array([12.0, 12.0, None, None], pa.float64()),
            "model_name": ["x  1", None, None, None],
            "features": pa.array([["waterproof", "heavy"], None, None, None], pa.list_(pa.string())),
            "raw_answer": ["{}"] * 4,
            "status": ["ok", "ok", "invalid", "ok"],
            "error": [None, None, "bad", None],
        },
        {"task": "extract", "attributes": EXTRACT_ATTRIBUTES},
    )
    gold = tmp_path / "gold.parquet"
    pq.write_table(
        pa.table({"id": list(gold_rows), "attributes": [json.dumps(v) for v in gold_rows.values()]}), gold
    )
    report = evaluate(run, gold, "id", gold_column="attributes", out_dir=tmp_path / "eval")
    x = report["extraction"]
    got = {a["attribute"]: (a["exact"], a["normalised"]) for a in x["per_attribute"]}
    counts = {name: tuple((m["tp"], m["fp"], m["fn"]) for m in pair) for name, pair in got.items()}
    assert counts == {
        # "Red " vs "red": exact miss, normalised hit; "Blue" hits; row c is invalid -> no prediction
        "color": ((1, 1, 2), (2, 0, 1)),
        # "ABC" vs "ＡＢＣ": NFKC; row b predicts a brand that gold doesn't have: FP either way
        "brand": ((0, 2, 1), (1, 1, 0)),
        # 12.0 vs "12": exact miss, normalised hit; 12.0 vs JSON 12: a hit in both
        "size": ((1, 1, 1), (2, 0, 0)),
        "model_name": ((0, 1, 1), (1, 0, 0)),  # "x  1" vs "X 1", matched to gold name "Model name"
        "features": ((1, 1, 1), (1, 1, 1)),  # sets {waterproof, heavy} vs {waterproof, light}
    }
    overall = x["overall"]
    assert (overall["exact"]["tp"], overall["exact"]["fp"], overall["exact"]["fn"]) == (3, 6, 6)
    assert (overall["normalised"]["tp"], overall["normalised"]["fp"], overall["normalised"]["fn"]) == (
        7,
        2,
        2,
    )
    assert overall["normalised"]["precision"] == pytest.approx(7 / 9)
    assert overall["exact"]["f1"] == pytest.approx(2 * (3 / 9) * (3 / 9) / (6 / 9))
    assert x["unmatched_gold_attributes"] == {"Flavor": 1}
    assert report["join"]["only_in_run"] == 1 and report["join"]["only_in_gold"] == 1
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["attributes.png", "eval.json", "eval.md"]
    assert (tmp_path / "eval" / "attributes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "NFKC" in (tmp_path / "eval" / "eval.md").read_text()


def test_multilabel_matches_sklearn(tmp_path):
    gold = ["A|B", "B", "A|C", "C", "A|B|C", "B"]
    pred = [["A", "B"], ["B", "D"], ["A"], ["A"], ["A", "B", "C"], ["B"]]
    status = ["ok", "ok", "ok", "ok", "ok", "error"]  # the error row counts as an empty prediction
    run = write_run(
        tmp_path / "run",
        {
            "id": pa.array(range(6), pa.int64()),
            "label": [p[0] for p in pred],
            "labels": pa.array(pred, pa.list_(pa.string())),
            "confidence": pa.array([0.9] * 6, pa.float64()),
            "status": status,
            "error": [None] * 5 + ["boom"],
        },
        {"task": "classify"},
    )
    gold_path = tmp_path / "gold.parquet"
    pq.write_table(pa.table({"id": pa.array(range(6), pa.int64()), "category": gold}), gold_path)
    m = evaluate(run, gold_path, "id", out_dir=tmp_path / "eval")["multilabel"]

    y_true = [set(g.split("|")) for g in gold]
    y_pred = [set(p) if s == "ok" else set() for p, s in zip(pred, status, strict=True)]
    mlb = MultiLabelBinarizer().fit(y_true + y_pred)
    t, p = mlb.transform(y_true), mlb.transform(y_pred)
    for avg in ("samples", "micro", "macro"):
        prec, rec, f1, _ = precision_recall_fscore_support(t, p, average=avg, zero_division=0)
        assert (m[avg]["precision"], m[avg]["recall"], m[avg]["f1"]) == pytest.approx((prec, rec, f1)), avg
    assert m["exact_set_accuracy"] == pytest.approx(accuracy_score(t, p))
    assert [row["label"] for row in m["per_label"]] == list(mlb.classes_)


def test_cli_eval_with_csv_gold(tmp_path):
    run = classify_run(tmp_path)
    gold = tmp_path / "gold.csv"
    lines = ["id,category"] + [f"{r[0]},{r[1] or ''}" for r in [*ROWS, GOLD_MISSING]] + ["200,Tea"]
    gold.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        main, ["eval", str(run), "--gold", str(gold), "--on", "id", "--thresholds", "0.6"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# labelmill eval")
    out = run / "eval"
    report = json.loads((out / "eval.json").read_text())
    assert report["join"]["ids_compared_as_text"]  # int64 ids in the run, text in the CSV
    assert report["join"]["scored"] == len(ROWS) and report["join"]["only_in_gold"] == 1
    y_true, y_pred = sklearn_view(ROWS)
    assert report["classification"]["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert [t["threshold"] for t in report["classification"]["calibration"]["thresholds"]] == [0.6]
    for name in ("confusion.png", "reliability.png"):
        assert (out / name).read_bytes().startswith(PNG)
    assert (out / "confusion.csv").exists()

    gold.write_text("id,category\n1,Tea\n1,Coffee\n")
    result = CliRunner().invoke(main, ["eval", str(run), "--gold", str(gold), "--on", "id"])
    assert result.exit_code == 2
    assert "more than once" in result.output


def test_no_charts_writes_no_pictures(tmp_path):
    out = tmp_path / "eval"
    report = evaluate(classify_run(tmp_path), classify_gold(tmp_path), "id", out_dir=out, charts=False)
    assert report["files"] == ["eval.md", "eval.json", "confusion.csv"]
    assert sorted(p.name for p in out.iterdir()) == sorted(report["files"])
    md = (out / "eval.md").read_text()
    assert ".png" not in md and "![" not in md
    assert "## Confusion matrix" in md and "`confusion.csv`" in md
    assert json.loads((out / "eval.json").read_text())["files"] == report["files"]


def test_missing_matplotlib_stops_before_any_work(tmp_path, monkeypatch):
    run, gold, out = classify_run(tmp_path), classify_gold(tmp_path), tmp_path / "eval"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingDependencyError, match="need matplotlib") as caught:
        evaluate(run, gold, "id", out_dir=out)
    assert caught.value.exit_code == 7
    assert "--no-charts" in caught.value.hint
    assert not out.exists()
    with pytest.raises(MissingDependencyError):
        confusion_png({"rows": [], "columns": [NONE], "matrix": []}, tmp_path / "c.png")
    assert evaluate(run, gold, "id", out_dir=out, charts=False)["kind"] == "classify"


@pytest.mark.parametrize("kind", [None, "rank"])
def test_run_without_a_known_evaluation_is_refused(tmp_path, kind):
    run = classify_run(tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**manifest, "task": "summarise", "evaluation": kind}))
    with pytest.raises(RunStateError, match="task 'summarise' has no evaluation labelmill eval knows"):
        evaluate(run, classify_gold(tmp_path), "id", out_dir=tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_evaluation_key_decides_over_task_name(tmp_path):
    attributes = [{"name": "color", "type": "string"}]
    run = write_run(
        tmp_path / "run",
        {"id": ["a", "b"], "color": ["red", "blue"], "status": ["ok", "ok"]},
        {"task": "describe_products", "evaluation": "extract", "attributes": attributes},
    )
    gold = tmp_path / "gold.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b"], "attributes": ['{"Color": "Red"}', '{"Color": "green"}']}), gold
    )
    report = evaluate(run, gold, "id", out_dir=tmp_path / "eval")  # gold column defaults to attributes
    assert report["kind"] == "extract" and report["gold_column"] == "attributes"
    assert report["run"]["task"] == "describe_products"
    color = report["extraction"]["per_attribute"][0]
    assert (color["normalised"]["tp"], color["normalised"]["fp"], color["normalised"]["fn"]) == (1, 1, 1)
    assert report["files"] == ["eval.md", "eval.json", "attributes.png"]


def test_null_values_option_and_matching():
    assert parse_null_values(" n/a, none ,,-") == ["n/a", "none", "-"]
    assert parse_null_values("") == []
    nulls = NullValues(parse_null_values("n/a,none,-"))
    for token in ("n/a", "N/A", " n/a ", "ＮＯＮＥ", "-"):
        assert nulls(token), token
    for value in ("na", "n/a x", "--", 0, None, ["n/a"]):
        assert not nulls(value), value  # only a whole text cell or item is a token
    assert not NullValues([])("n/a")


def test_multilabel_run_with_one_label_per_gold_row_is_scored_as_sets(tmp_path):
    """A multi-label run is scored on its label sets even when no gold row holds several labels:
    scoring its first label alone would ignore the rest of every answer."""
    run = write_run(
        tmp_path / "run",
        {
            "id": pa.array(range(3), pa.int64()),
            "label": ["A", "B", "C"],
            "labels": pa.array([["A", "B"], ["B"], ["C"]], pa.list_(pa.string())),
            "status": ["ok"] * 3,
        },
        {"task": "classify", "provenance": {"labels": ["A", "B", "C"], "labels_max": 2}},
    )
    gold = tmp_path / "gold.parquet"
    pq.write_table(pa.table({"id": pa.array(range(3), pa.int64()), "category": ["A", "A", "C"]}), gold)
    report = evaluate(run, gold, "id", out_dir=tmp_path / "eval", charts=False)
    m = report["multilabel"]
    assert report["kind"] == "multilabel"
    assert (m["micro"]["tp"], m["micro"]["fp"], m["micro"]["fn"]) == (2, 2, 1)
    assert m["exact_set_accuracy"] == pytest.approx(1 / 3)
