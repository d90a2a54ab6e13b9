"""``labelmill eval``: score a finished run folder against a gold file.

    read the run's parts/part-*.parquet and run.json; read the gold file (Parquet or CSV)
    join on --on; ids on one side only are counted and listed, never dropped silently
    run.json's ``evaluation`` ("classify" or "extract") says which scores apply; runs written before it
    existed are scored as extract if their task is ``extract``, else as classify
    classify, gold one label per row:  accuracy, macro/micro F1, per-class table, confusion matrix,
                coverage, calibration of ``confidence`` (reliability diagram, ECE, accuracy at thresholds)
    classify, gold label sets (single-label run): accuracy (label in gold set), micro/macro P, R, F1
                of the label as a one-label set, per-label table, calibration
    single-label run with a ``source`` column (a cascade): the same accuracy, rows and mean confidence
                per source; for student rows the mean ``student_confidence``, for escalated rows the
                accuracy of ``first_label`` (the answer before escalation)
    multi-label run (a ``labels`` column): samples/micro/macro P, R, F1, exact-set match, per label
    extract:    precision, recall, F1 per attribute and overall, exact and normalised
    write eval.md, eval.json (the same numbers); for classify also confusion.csv/.png, reliability.png;
    for extract attributes.png
    the pictures need matplotlib; without charts (--no-charts) no .png is written and eval.md shows none

The definitions, where a choice had to be made (``DEFINITIONS`` repeats them in every report):

Rows. Only ids present in both files are scored. A row whose gold value is null, blank or an empty
list is counted as "gold missing" and not scored; one that holds only ``--null-values`` tokens
(``n/a``, ``none``, ..., matched after NFKC, casefolding and whitespace collapsing) is counted as
"gold null-like" and not scored. A row whose status is not ``ok`` or ``truncated`` is scored as a
prediction with no label ("(none)"): it is wrong, it never counts as a prediction of any class.

Gold label sets. A list column is a set of labels per row. Text is split into sets on
``--gold-delimiter``; without it, on "|" for a multi-label run, and for a single-label run only when
some value holds "|" and none of those values is one of the run's labels (then they can only be
sets); when the run's label set is unknown or has labels with "|" in them, eval refuses and asks for
``--gold-delimiter``. Set items are stripped of surrounding whitespace; blank items and null-like
items are dropped. One-label gold cells are compared exactly as given. A gold column that could only
be scored as its printed form is refused: a nested column other than a list of labels, and text that
looks like a printed list (``['A', 'B']``, as a CSV export writes a list) and is not a label.

Classification. Accuracy = right / scored. Per class: precision = right / predicted as the class,
recall = right / gold support, F1 their harmonic mean; any 0/0 is 0 (a class never predicted has
precision 0, and is flagged). Macro F1 = the unweighted mean of per-class F1 over the classes that
occur in gold; micro P/R/F1 are pooled over the same gold classes, so a "(none)" or a predicted class
absent from gold costs recall but adds no false positive to any gold class (scikit-learn's
``labels=<gold classes>``). Predicted classes absent from gold are still listed per class.
Coverage = share of scored rows with status ok or truncated.

Single-label run, gold label sets. A row is right when its label is in the row's gold set: accuracy
(label in gold set) = right / scored, and calibration uses that rightness. Micro/macro P/R/F1 and the
per-label table treat the prediction as a one-label set, as for multi-label below.

Calibration. Over scored rows with a confidence. Ten equal-width bins [0, 0.1), ..., [0.9, 1.0];
ECE = sum over bins of |accuracy - mean confidence| x rows in bin / rows with a confidence. At a
threshold t the rows with confidence >= t are accepted; "share" = accepted / all scored rows (rows
without a confidence can never be accepted). The 95%-precision threshold is the lowest confidence
value t (tried: every distinct confidence) at which the accepted rows are at least 95% right.

Multi-label. Label sets compared per row; samples-averaged P/R/F1 (per-row, 0/0 = 0, then the mean),
micro (TP, FP, FN pooled over labels) and macro (mean of per-label P, R, F1) over the union of gold
and predicted labels, and exact-set accuracy (scikit-learn's ``MultiLabelBinarizer`` fitted on both).

Extraction. Gold per attribute: a value, a list of values, or ``{value: score}`` (OA-Mine
``target_scores``; keys with a score <= 0 are ignored). Gold names match run columns after casefolding
and turning runs of non-alphanumerics into "_" (``Model name`` == ``model_name``). Blank strings,
empty lists and ``--null-values`` tokens are no value (the tokens are counted per attribute). A
single-valued attribute's gold values are alternatives: TP = 1 if the prediction equals any gold
value; else FP = 1 if something was predicted, FN = 1 if gold has a value. A ``list[enum]`` attribute
is compared as sets: TP = |P & G|, FP = |P - G|, FN = |G - P|. Overall = micro (TP, FP, FN summed
over attributes). EXACT: strings equal character for character, numbers equal as numbers (a number
never equals a string: 12.0 vs "12" is a miss). NORMALISED: Unicode NFKC, then casefold, whitespace
runs collapsed to one space, stripped; a string that is then a plain decimal number (``-1.5``, ``12``,
``3e2``; no thousands separators) becomes that number, and numbers compare as floats
(12.0 == "12" == "１２").
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa

from pipeline.errors import ConfigError, RunStateError
from pipeline.evaluation.charts import (
    _fold,
    attributes_png,
    confusion_png,
    reliability_png,
    require_matplotlib,
)
from pipeline.evaluation.classification import (
    NONE,
    calibration,
    classification_metrics,
    hierarchy_metrics,
    label_probs_metrics,
    shortlist_metrics,
    source_metrics,
)
from pipeline.evaluation.extraction import extraction_metrics, gold_attributes
from pipeline.evaluation.gold import NULL_LIKE, NullValues, parse_null_values, read_label_gold
from pipeline.evaluation.multilabel import _label_set, label_in_set_metrics, multilabel_metrics
from pipeline.evaluation.report import DEFINITIONS, markdown, write_confusion_csv
from pipeline.evaluation.runs import join, load_gold, load_run
from pipeline.evaluation.scores import _ratio
from pipeline.runfolder import RunFolder

__all__ = [
    "NONE",
    "_fold",
    "calibration",
    "classification_metrics",
    "evaluate",
    "parse_null_values",
    "parse_thresholds",
]

LABELLED = ("ok", "truncated")


def evaluate(
    run_folder: str | Path,
    gold_file: str | Path,
    on: str,
    gold_column: str | None = None,
    out_dir: str | Path | None = None,
    thresholds: list[float] | None = None,
    *,
    charts: bool = True,
    gold_delimiter: str | None = None,
    null_values: list[str] | None = None,
) -> dict:
    """Score a run folder against a gold file; write the report files into ``out_dir`` and return it.

    With ``charts`` off no picture is drawn, so matplotlib is not needed. ``gold_delimiter`` splits
    text gold cells into label sets; ``null_values`` are text tokens that mean "no gold value".
    """
    if charts:
        # Before any work, so a missing matplotlib costs nothing and leaves no half-written report.
        require_matplotlib()
    if gold_delimiter == "":
        raise ConfigError("--gold-delimiter is empty", hint="give the text that joins the labels, e.g. '|'")
    nulls = NullValues(null_values or [])
    run = load_run(run_folder)
    extract = run.evaluation() == "extract"
    if extract and gold_delimiter is not None:
        raise ConfigError(
            "--gold-delimiter applies to classification gold; this run extracts attributes",
            hint="leave it out: attribute gold is JSON, one object per row",
        )
    gold_column = gold_column or ("attributes" if extract else "category")
    out = Path(out_dir) if out_dir is not None else run.folder / "eval"
    thresholds = thresholds if thresholds is not None else [0.5, 0.7, 0.9]
    gold_table = load_gold(gold_file, on, gold_column)

    multi_label_run = not extract and "labels" in run.table.column_names
    needed = ["status"] + ([] if extract else ["label"])
    absent = [c for c in needed if c not in run.table.column_names]
    if absent:
        raise RunStateError(f"the parts of {run.folder} have no column {', '.join(absent)}")
    run_key = on if on in run.table.column_names else run.id_column
    if run_key not in run.table.column_names:
        raise RunStateError(f"the run output has neither column {on!r} nor its id column {run.id_column!r}")
    joined = join(run.table.column(run_key).to_pylist(), gold_table.column(on).to_pylist(), str(gold_file))
    status = run.table.column("status").to_pylist()
    gold_rows = [g for _, g in joined.pairs]
    label_set = run.manifest.provenance.get("labels")
    label_set = label_set if isinstance(label_set, list) else None

    if extract:
        values = gold_table.column(gold_column).to_pylist()
        ids = gold_table.column(on).to_pylist()
        cells = [_gold_attributes(values[g], ids[g], nulls) for g in gold_rows]
        reading = {"reading": "attributes", "null_values": nulls.tokens}
    else:
        gold_labels = read_label_gold(
            gold_table.column(gold_column),
            gold_rows,
            name=gold_column,
            multi_label_run=multi_label_run,
            labels=label_set,
            delimiter=gold_delimiter,
            nulls=nulls,
        )
        cells = gold_labels.values
        reading = gold_labels.describe(nulls)
    scored = [i for i, c in enumerate(cells) if c is not None and c is not NULL_LIKE]
    pairs = [joined.pairs[i] for i in scored]
    gold = [cells[i] for i in scored]
    rows = [r for r, _ in pairs]
    report: dict = {
        "run_folder": str(run.folder),
        "gold_file": str(gold_file),
        "on": on,
        "run_id_column": run_key,
        "gold_column": gold_column,
        "gold_reading": reading,
        "run": {
            "task": run.task,
            "model": run.manifest.provenance.get("model"),
            "rows": run.table.num_rows,
            "status_counts": dict(Counter(status)),
            "parts": run.parts,
            "chunks_total": run.manifest.chunks,
            **_strategy(run),
            **_speed(run),
        },
        "join": {
            **joined.summary(),
            "gold_missing": sum(c is None for c in cells),
            "gold_null_like": sum(c is NULL_LIKE for c in cells),
            "scored": len(pairs),
        },
    }
    labelled = [status[r] in LABELLED for r in rows]
    report["coverage"] = _ratio(sum(labelled), len(pairs))
    out.mkdir(parents=True, exist_ok=True)
    files = ["eval.md", "eval.json"]

    if extract:
        # older run folders kept the attributes beside the provenance
        attributes = run.manifest.provenance.get("attributes") or run.manifest.attributes or []
        missing = [a["name"] for a in attributes if a["name"] not in run.table.column_names]
        if not attributes or missing:
            raise RunStateError(
                f"extract run {run.folder}: attribute columns missing from the parts: {missing}"
            )
        report["kind"] = "extract"
        predicted = {
            a["name"]: [
                v if ok else None for v, ok in zip(_take(run.table, a["name"], rows), labelled, strict=True)
            ]
            for a in attributes
        }
        report["extraction"] = extraction_metrics(attributes, predicted, gold, nulls)
        if charts:
            attributes_png(report["extraction"], out / "attributes.png")
            files.append("attributes.png")
    elif multi_label_run:
        report["kind"] = "multilabel"
        preds = _take(run.table, "labels", rows)
        predicted_sets = [_label_set(p) if ok else set() for p, ok in zip(preds, labelled, strict=True)]
        metrics = multilabel_metrics(gold, predicted_sets)
        _labels_outside(metrics, set().union(*gold), label_set)
        report["multilabel"] = metrics
    else:
        preds = [p if ok else None for p, ok in zip(_take(run.table, "label", rows), labelled, strict=True)]
        conf = (
            _take(run.table, "confidence", rows)
            if "confidence" in run.table.column_names
            else [None] * len(rows)
        )
        conf = [c if ok else None for c, ok in zip(conf, labelled, strict=True)]
        if gold_labels.sets:
            report["kind"] = "classify_sets"
            metrics = label_in_set_metrics(gold, preds)
            correct = [p is not None and p in g for p, g in zip(preds, gold, strict=True)]
            _labels_outside(metrics, set().union(*gold), label_set)
            report["classification_sets"] = metrics
        else:
            report["kind"] = "classify"
            metrics = classification_metrics(gold, preds)
            hierarchy = hierarchy_metrics(gold, preds)
            if hierarchy is not None:
                metrics["hierarchy"] = hierarchy
            correct = [p == g for p, g in zip(preds, gold, strict=True)]
            _labels_outside(metrics, set(gold), label_set)
            report["classification"] = metrics
            write_confusion_csv(metrics["confusion"], out / "confusion.csv")
            files.append("confusion.csv")
            if charts:
                confusion_png(metrics["confusion"], out / "confusion.png")
                files.append("confusion.png")
        metrics["calibration"] = calibration(correct, conf, thresholds)
        if "candidates" in run.table.column_names and not gold_labels.sets:
            metrics["shortlist"] = shortlist_metrics(gold, _take(run.table, "candidates", rows), preds)
        if "source" in run.table.column_names:
            metrics["by_source"] = _by_source(run, rows, gold, correct, labelled, conf, sets=gold_labels.sets)
        if "label_probs" in run.table.column_names:
            gold_sets = gold if gold_labels.sets else [{g} for g in gold]
            probs = [
                p if ok else None
                for p, ok in zip(_take(run.table, "label_probs", rows), labelled, strict=True)
            ]
            metrics["label_probs"] = label_probs_metrics(gold_sets, probs, thresholds)
        if charts:
            reliability_png(metrics["calibration"], out / "reliability.png")
            files.append("reliability.png")
    report["definitions"] = DEFINITIONS
    report["files"] = files
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    (out / "eval.md").write_text(markdown(report), encoding="utf-8")
    return report


def _strategy(run) -> dict:
    """Which strategy made the run, and for a shortlist its retrievers and k."""
    provenance = run.manifest.provenance
    if run.evaluation() != "classify":
        return {}
    found = {"strategy": provenance.get("strategy", "flat")}
    shortlist = provenance.get("shortlist")
    if isinstance(shortlist, dict):
        found |= {"retrievers": shortlist.get("retrievers"), "k": shortlist.get("k")}
    return found


def _speed(run) -> dict:
    """Prompt tokens per answered row and the run's labelling speed (its ``summary.json``)."""
    found: dict = {}
    if "prompt_tokens" in run.table.column_names:
        tokens = [t for t in run.table.column("prompt_tokens").to_pylist() if t]
        found["prompt_tokens_per_row"] = sum(tokens) / len(tokens) if tokens else None
    summary = RunFolder(run.folder).read_text("summary.json")
    if summary is not None:
        with contextlib.suppress(ValueError):
            found["rows_per_second"] = json.loads(summary).get("rows_per_second")
    return found


def _by_source(
    run, rows: list[int], gold: list, correct: list[bool], labelled: list[bool], conf: list, *, sets: bool
) -> dict:
    """Scores per cascade ``source``; ``first_label`` is judged by the rule ``correct`` was, whatever
    the row's final status, since it is the first backend's answer."""
    table = run.table

    def optional(column: str) -> list | None:
        return _take(table, column, rows) if column in table.column_names else None

    first = optional("first_label")
    first_correct = (
        None
        if first is None
        else [f is not None and (f in g if sets else f == g) for f, g in zip(first, gold, strict=True)]
    )
    return source_metrics(
        _take(table, "source", rows),
        correct,
        labelled,
        conf,
        table.column("source").to_pylist(),
        student_confidence=optional("student_confidence"),
        first_correct=first_correct,
        first_confidence=optional("first_confidence"),
    )


def _gold_attributes(cell, row_id, nulls: NullValues):
    """A gold attributes cell: a mapping, None (missing) or NULL_LIKE (the whole cell is a token)."""
    if nulls(cell):
        return NULL_LIKE
    return gold_attributes(cell, row_id)


def _labels_outside(metrics: dict, gold_labels: set[str], label_set: list[str] | None) -> None:
    """Gold labels the run could never answer: a sign of a gold file for another label set."""
    if label_set is not None:
        metrics["gold_labels_not_in_label_set"] = sorted(gold_labels - set(label_set))


def _take(table: pa.Table, column: str, rows: list[int]) -> list:
    return table.column(column).take(pa.array(rows, pa.int64())).to_pylist()


def parse_thresholds(text: str) -> list[float]:
    """``--thresholds``: comma-separated numbers in [0, 1], sorted, repeats dropped."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = [-1.0]
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(
            f"--thresholds {text!r}: expected comma-separated numbers in [0, 1]", hint="e.g. 0.5,0.7,0.9"
        )
    return sorted(set(values))
