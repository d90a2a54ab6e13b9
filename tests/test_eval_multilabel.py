"""``labelmill eval`` against multi-label gold (list or delimited text) and ``--null-values``.

The runs are real run folders written by the fake backend, with the answer of every row chosen by
the test (``RecordingFake``), so each expected number is worked out by hand in the comments and
cross-checked with scikit-learn where it has the same metric.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT
from doubles import RecordingFake
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

from pipeline.cli import main
from pipeline.config import load_job
from pipeline.contracts import Completion
from pipeline.errors import ConfigError, InputFormatError
from pipeline.evaluation import evaluate
from pipeline.runner import run_job

PROMPT_MULTI = str(REPO_ROOT / "prompts" / "classify_multilabel.en.yaml")
PROMPT_EXTRACT = str(REPO_ROOT / "prompts" / "extract_product.en.yaml")


def fake_run(make_job, answers: list[tuple[str, float | None]], **job) -> Path:
    """Run a job on the fake backend whose row ``i`` (id ``i``) is answered ``answers[i]``:
    (answer text, confidence or None)."""
    titles = [f"item-{i:02d}" for i in range(len(answers))]
    data = pa.table({"id": pa.array(range(len(answers)), pa.int64()), "title": titles})
    job_files = make_job(data, **job)
    loaded = load_job(job_files.path)
    by_title = dict(zip(titles, answers, strict=True))

    def reply(conversation, fake_answer, request):
        (title,) = [t for t in titles if t in conversation[-1]["content"]]
        text, confidence = by_title[title]
        logprob = math.log(confidence) if confidence is not None else None
        return Completion(text, logprob, 50, 9, "stop")

    summary = run_job(loaded, backend=RecordingFake(loaded, reply))
    assert summary["complete"]
    return job_files.output


def write_gold(path: Path, values: list, gold_type: pa.DataType | None = None) -> Path:
    column = pa.array(values, gold_type) if gold_type is not None else pa.array(values)
    pq.write_table(pa.table({"id": pa.array(range(len(values)), pa.int64()), "category": column}), path)
    return path


# --- single-label run, gold label sets ------------------------------------------------------------

# (answer, confidence, gold label list)
SINGLE = [
    ("Coffee", 0.9, ["Coffee", "Tea"]),  # right: Coffee is in the set
    ("Tea", 0.8, ["Coffee"]),  # wrong
    ("Vitamin", 0.7, ["Vitamin"]),  # right
    ("Shoes", 0.6, []),  # empty set: gold missing
    ("Coffee", 0.5, ["n/a"]),  # null-like with --null-values n/a, else a wrong row
    ("Beer", 0.99, ["Tea"]),  # not a label: invalid, scored as wrong with no label
    ("Shoes", 0.95, ["Tea", " Shoes "]),  # right: gold items are stripped
    ("Tea", 0.3, None),  # gold missing
]


def single_run(make_job) -> Path:
    return fake_run(make_job, [(a, c) for a, c, _ in SINGLE])


@pytest.mark.parametrize("gold_type", [pa.list_(pa.string()), pa.large_list(pa.string())])
def test_single_label_run_against_list_gold_counts_label_in_set(make_job, tmp_path, gold_type):
    run = single_run(make_job)
    gold = write_gold(tmp_path / "gold.parquet", [g for _, _, g in SINGLE], gold_type)
    report = evaluate(
        run, gold, "id", out_dir=tmp_path / "eval", thresholds=[0.75], null_values=["N/A"], charts=False
    )
    assert report["kind"] == "classify_sets"
    assert report["gold_reading"]["reading"] == "label sets"
    assert report["join"]["gold_missing"] == 2 and report["join"]["gold_null_like"] == 1
    assert report["join"]["scored"] == 5  # rows 0, 1, 2, 5, 6
    m = report["classification_sets"]
    assert m["accuracy_label_in_gold_set"] == pytest.approx(3 / 5)  # rows 0, 2, 6
    assert (m["right"], m["unlabelled"]) == (3, 1)
    assert m["gold_labels_per_row"] == {"mean": pytest.approx(7 / 5), "max": 2, "rows_with_several": 2}

    # Rightness is label-in-set for calibration too: accepted at 0.75 are rows 0, 1, 6 (2 right).
    (accepted,) = m["calibration"]["thresholds"]
    assert (accepted["accepted"], accepted["accuracy"]) == (3, pytest.approx(2 / 3))

    # The prediction as a one-label set, scored as multi-label by scikit-learn.
    scored = [SINGLE[i] for i in (0, 1, 2, 5, 6)]
    y_true = [{g.strip() for g in gold} for _, _, gold in scored]
    y_pred = [{a} if a != "Beer" else set() for a, _, _ in scored]
    mlb = MultiLabelBinarizer().fit(y_true + y_pred)
    t, p = mlb.transform(y_true), mlb.transform(y_pred)
    for avg in ("micro", "macro"):
        prec, rec, f1, _ = precision_recall_fscore_support(t, p, average=avg, zero_division=0)
        assert (m[avg]["precision"], m[avg]["recall"], m[avg]["f1"]) == pytest.approx((prec, rec, f1))
    assert m["micro"]["precision"] == pytest.approx(3 / 4)  # right / rows with a label
    assert m["exact_set_accuracy"] == pytest.approx(accuracy_score(t, p)) == pytest.approx(1 / 5)  # row 2
    assert [row["label"] for row in m["per_label"]] == list(mlb.classes_)

    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| **accuracy (label in gold set)** | **0.600** |" in md
    assert "| in both, gold value null-like, `--null-values` (not scored) | 1 |" in md
    assert "Gold read as label sets: list column." in md
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["classification_sets"]["accuracy_label_in_gold_set"] == pytest.approx(0.6)


def test_list_gold_is_never_compared_as_its_printed_form(make_job, tmp_path):
    """The old failure: str(["Coffee", "Tea"]) == "['Coffee', 'Tea']" matched no label, so a list
    gold column scored 0.000 and eval exited 0. Every gold row here holds the predicted label."""
    run = fake_run(make_job, [("Coffee", 0.9), ("Tea", 0.8), ("Shoes", 0.7)])
    gold = write_gold(
        tmp_path / "gold.parquet", [["Coffee", "Tea"], ["Tea"], ["Vitamin", "Shoes"]], pa.list_(pa.string())
    )
    result = CliRunner().invoke(
        main,
        ["eval", str(run), "--gold", str(gold), "--on", "id", "--no-charts", "--out", str(tmp_path / "e")],
    )
    assert result.exit_code == 0, result.output
    assert "['" not in result.output and "| accuracy | 0.000 |" not in result.output
    assert "**accuracy (label in gold set)** | **1.000**" in result.output
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["kind"] == "classify_sets" and "classification" not in report
    assert report["classification_sets"]["accuracy_label_in_gold_set"] == 1.0
    assert all("[" not in row["label"] for row in report["classification_sets"]["per_label"])


def test_nested_gold_other_than_a_list_of_labels_is_refused(make_job, tmp_path):
    run = fake_run(make_job, [("Coffee", 0.9), ("Tea", 0.8)])
    struct = write_gold(tmp_path / "s.parquet", [{"name": "Coffee"}, {"name": "Tea"}])
    nested = write_gold(tmp_path / "n.parquet", [[["Coffee"]], [["Tea"]]])
    for gold, shown in ((struct, "struct<"), (nested, "list<")):
        result = CliRunner().invoke(
            main, ["eval", str(run), "--gold", str(gold), "--on", "id", "--no-charts"]
        )
        assert result.exit_code == 2, result.output
        assert f"gold column 'category' is {shown}" in result.output
    assert not (run / "eval" / "eval.json").exists()


def test_a_list_printed_into_a_text_column_is_refused(make_job, tmp_path):
    """The same failure through a CSV export: the list arrives as the text "['Coffee', 'Tea']"."""
    run = fake_run(make_job, [("Coffee", 0.9), ("Tea", 0.8)])
    csv = tmp_path / "gold.csv"
    csv.write_text("id,category\n0,\"['Coffee', 'Tea']\"\n1,Tea\n")
    for extra in ([], ["--gold-delimiter", ","]):
        args = ["eval", str(run), "--gold", str(csv), "--on", "id", "--no-charts", *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "1 value(s) look like a printed list, e.g. \"['Coffee', 'Tea']\"" in result.output


def test_single_label_run_against_delimited_text_gold(make_job, tmp_path):
    run = fake_run(make_job, [("Coffee", 0.9), ("Tea", 0.8), ("Shoes", 0.7), ("Tea", 0.6), ("Tea", 0.5)])
    csv = tmp_path / "gold.csv"
    csv.write_text("id,category\n0,Coffee;Tea\n1,Coffee\n2,Vitamin ; Shoes\n3,none\n4,Tea;N/A\n")
    args = ["eval", str(run), "--gold", str(csv), "--on", "id", "--no-charts", "--gold-delimiter", ";"]
    result = CliRunner().invoke(main, [*args, "--null-values", "n/a, NONE,-"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["gold_reading"]["source"] == "text split on ';' (--gold-delimiter)"
    assert report["join"]["gold_null_like"] == 1 and report["join"]["scored"] == 4
    assert report["gold_reading"]["null_items_dropped"] == 1  # "N/A" of row 4, which keeps {Tea}
    assert report["classification_sets"]["accuracy_label_in_gold_set"] == pytest.approx(3 / 4)
    assert "`--null-values` `n/a`, `NONE`, `-`: 1 row(s) whose gold is only such a token" in result.output


def test_text_gold_holding_pipes_is_split_only_when_unambiguous(make_job, tmp_path):
    answers = [("Coffee", 0.9), ("Tea", 0.8), ("Shoes", 0.7)]
    gold = write_gold(tmp_path / "gold.parquet", ["Coffee|Tea", "Tea", "Vitamin|Coffee"])

    # "Coffee|Tea" can't be one of these labels, so it can only be a set.
    report = evaluate(fake_run(make_job, answers), gold, "id", out_dir=tmp_path / "a")
    assert report["kind"] == "classify_sets"
    assert report["files"] == ["eval.md", "eval.json", "reliability.png"]
    assert "![reliability diagram](reliability.png)" in (tmp_path / "a" / "eval.md").read_text()
    assert "values such as 'Coffee|Tea' are not labels of the run" in report["gold_reading"]["source"]
    assert report["classification_sets"]["accuracy_label_in_gold_set"] == pytest.approx(2 / 3)

    # A label holding "|": "Coffee|Tea" may be that label or two; eval asks instead of guessing.
    labels = ["Coffee", "Tea", "Shoes", "Vitamin", "Tea|Herbal"]
    run = fake_run(make_job, answers, labels=labels)
    with pytest.raises(InputFormatError, match="unclear whether they are one label or several") as caught:
        evaluate(run, gold, "id", out_dir=tmp_path / "b", charts=False)
    assert "--gold-delimiter" in caught.value.hint
    assert not (tmp_path / "b").exists()
    # ... and is told: "|" splits, another delimiter reads whole cells.
    split = evaluate(run, gold, "id", out_dir=tmp_path / "b", charts=False, gold_delimiter="|")
    assert split["classification_sets"]["accuracy_label_in_gold_set"] == pytest.approx(2 / 3)
    whole = evaluate(run, gold, "id", out_dir=tmp_path / "c", charts=False, gold_delimiter=";")
    assert whole["classification_sets"]["accuracy_label_in_gold_set"] == pytest.approx(1 / 3)

    # Gold values that are exactly labels of the run stay single labels: plain classification.
    gold_labels = write_gold(tmp_path / "labels.parquet", ["Tea|Herbal", "Tea", "Shoes"])
    report = evaluate(run, gold_labels, "id", out_dir=tmp_path / "d", charts=False)
    assert report["kind"] == "classify" and report["classification"]["accuracy"] == pytest.approx(2 / 3)


def test_empty_delimiter_is_refused(make_job, tmp_path):
    run = fake_run(make_job, [("Coffee", 0.9)])
    with pytest.raises(ConfigError, match="--gold-delimiter is empty"):
        evaluate(run, write_gold(tmp_path / "g.parquet", ["Coffee"]), "id", gold_delimiter="")


# --- multi-label run ---------------------------------------------------------------------------------

# (predicted labels, gold joined by "|")
MULTI = [
    (["Coffee", "Tea"], "Coffee|Tea"),  # exact
    (["Coffee"], "Coffee|Vitamin"),
    (["Tea", "Shoes"], "Tea"),
    (["Vitamin"], "Shoes"),
    (["Coffee"], "n/a"),  # null-like with --null-values, else the one-label set {"n/a"}
    (["Tea"], " Tea | Coffee "),
]


def multi_run(make_job) -> Path:
    answers = [(json.dumps({"labels": labels}), None) for labels, _ in MULTI]
    return fake_run(make_job, answers, labels_max=3, prompt=PROMPT_MULTI)


@pytest.mark.parametrize("delimiter", [None, "|", ";"])
def test_multilabel_run_against_delimited_gold_by_hand(make_job, tmp_path, delimiter):
    run = multi_run(make_job)
    cells = [g.replace("|", delimiter or "|") for _, g in MULTI]
    gold = write_gold(tmp_path / "gold.parquet", cells)
    report = evaluate(
        run, gold, "id", out_dir=tmp_path / "eval", null_values=["n/a"], gold_delimiter=delimiter
    )
    assert report["kind"] == "multilabel" and report["join"]["scored"] == 5
    assert report["join"]["gold_null_like"] == 1
    m = report["multilabel"]
    # Per label (TP, FP, FN) over rows 0-3 and 5:
    #   Coffee (2, 0, 1): rows 0, 1 hit, row 5 missed;  Tea (3, 0, 0): rows 0, 2, 5
    #   Vitamin (0, 1, 1): missed in row 1, wrongly in row 3;  Shoes (0, 1, 1): wrongly in 2, missed in 3
    counts = {row["label"]: (row["tp"], row["fp"], row["fn"]) for row in m["per_label"]}
    assert counts == {"Coffee": (2, 0, 1), "Shoes": (0, 1, 1), "Tea": (3, 0, 0), "Vitamin": (0, 1, 1)}
    # micro: TP 5, FP 2, FN 3
    assert m["micro"]["precision"] == pytest.approx(5 / 7)
    assert m["micro"]["recall"] == pytest.approx(5 / 8)
    assert m["micro"]["f1"] == pytest.approx(2 / 3)  # 2 * 5 / (2 * 5 + 2 + 3)
    # macro: P (1 + 1 + 0 + 0) / 4; R (2/3 + 1 + 0 + 0) / 4; F1 (0.8 + 1 + 0 + 0) / 4
    assert m["macro"]["precision"] == pytest.approx(0.5)
    assert m["macro"]["recall"] == pytest.approx(5 / 12)
    assert m["macro"]["f1"] == pytest.approx(0.45)
    assert m["exact_set_accuracy"] == pytest.approx(1 / 5)
    assert m["samples"]["precision"] == pytest.approx(0.7) and m["samples"]["recall"] == pytest.approx(0.6)

    kept = [MULTI[i] for i in (0, 1, 2, 3, 5)]
    y_true = [{x.strip() for x in g.split("|")} for _, g in kept]
    y_pred = [set(p) for p, _ in kept]
    mlb = MultiLabelBinarizer().fit(y_true + y_pred)
    t, p = mlb.transform(y_true), mlb.transform(y_pred)
    for avg in ("micro", "macro", "samples"):
        prec, rec, f1, _ = precision_recall_fscore_support(t, p, average=avg, zero_division=0)
        assert (m[avg]["precision"], m[avg]["recall"], m[avg]["f1"]) == pytest.approx((prec, rec, f1)), avg

    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| micro | 0.714 | 0.625 | 0.667 |" in md
    assert "| macro | 0.500 | 0.417 | 0.450 |" in md
    assert "| Coffee | 1.000 | 0.667 | 0.800 | 3 | 2 |" in md
    assert "Exact-set match: 0.200." in md


def test_multilabel_run_without_null_values_scores_the_token_as_a_label(make_job, tmp_path):
    run = multi_run(make_job)
    gold = write_gold(tmp_path / "gold.parquet", [g for _, g in MULTI])
    m = evaluate(run, gold, "id", out_dir=tmp_path / "eval", charts=False)["multilabel"]
    assert m["rows"] == 6 and m["gold_labels_not_in_label_set"] == ["n/a"]
    assert {row["label"]: row["support"] for row in m["per_label"]}["n/a"] == 1


def test_multilabel_run_against_list_gold(make_job, tmp_path):
    run = multi_run(make_job)
    sets = [[x.strip() for x in g.split("|")] for _, g in MULTI]
    gold = write_gold(tmp_path / "gold.parquet", sets, pa.list_(pa.string()))
    m = evaluate(run, gold, "id", out_dir=tmp_path / "eval", charts=False, null_values=["n/a"])["multilabel"]
    assert (m["micro"]["tp"], m["micro"]["fp"], m["micro"]["fn"]) == (5, 2, 3)
    assert m["macro"]["f1"] == pytest.approx(0.45)


# --- extraction gold with null tokens ----------------------------------------------------------------

ATTRIBUTES = [
    {"name": "brand", "type": "string"},
    {"name": "colour", "type": "enum", "values": ["black", "white", "red"]},
]
EXTRACT = [
    ({"brand": "Acme", "colour": None}, {"Brand": "Acme", "Colour": "n/a"}),
    ({"brand": None, "colour": "red"}, {"Brand": "N/A", "Colour": "red"}),
    ({"brand": "Zed", "colour": "black"}, {"Brand": {"n/a": 1, "Zed": 1}, "Colour": ["-", "black"]}),
    ({"brand": "Acme", "colour": "red"}, "n/a"),  # the whole cell: the row has no gold
]


def extract_run(make_job) -> Path:
    answers = [(json.dumps(answer), None) for answer, _ in EXTRACT]
    return fake_run(
        make_job, answers, task="extract", attributes=ATTRIBUTES, prompt=PROMPT_EXTRACT, labels=None
    )


def extract_gold(path: Path, rows: list) -> Path:
    cells = [json.dumps(g) if isinstance(g, dict) else g for _, g in rows]
    pq.write_table(pa.table({"id": pa.array(range(len(cells)), pa.int64()), "attributes": cells}), path)
    return path


def counts(report: dict) -> dict:
    return {
        a["attribute"]: (a["exact"]["tp"], a["exact"]["fp"], a["exact"]["fn"])
        for a in report["extraction"]["per_attribute"]
    }


def test_null_values_in_extraction_gold_are_not_values(make_job, tmp_path):
    run = extract_run(make_job)
    gold = extract_gold(tmp_path / "gold.parquet", EXTRACT)
    args = ["eval", str(run), "--gold", str(gold), "--on", "id", "--no-charts", "--null-values", "n/a,-"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["join"]["gold_null_like"] == 1 and report["join"]["scored"] == 3
    # brand: row 0 hit, row 1 gold "N/A" and no prediction: nothing, row 2 hit ("n/a" key dropped)
    # colour: row 0 gold "n/a" and no prediction: nothing, rows 1 and 2 hit ("-" dropped)
    assert counts(report) == {"brand": (2, 0, 0), "colour": (2, 0, 0)}
    per_attribute = {a["attribute"]: a for a in report["extraction"]["per_attribute"]}
    assert (
        per_attribute["brand"]["gold_null_values"] == 2 and per_attribute["colour"]["gold_null_values"] == 2
    )
    assert per_attribute["colour"]["gold_rows"] == 2
    assert "Gold values that were `--null-values` tokens (not counted): brand 2, colour 2." in result.output
    assert "not scored; 4 gold attribute value(s) not counted." in result.output


def test_without_null_values_the_token_is_a_gold_value(make_job, tmp_path):
    run = extract_run(make_job)
    gold = extract_gold(tmp_path / "gold.parquet", EXTRACT[:3])
    report = evaluate(run, gold, "id", out_dir=tmp_path / "eval", charts=False)
    assert counts(report) == {"brand": (2, 0, 1), "colour": (2, 0, 1)}  # "N/A" and "n/a" missed
    with pytest.raises(ConfigError, match="--gold-delimiter applies to classification gold"):
        evaluate(run, gold, "id", out_dir=tmp_path / "eval", charts=False, gold_delimiter="|")
