"""``labelmill eval``: score a finished run folder against a gold file.

    read the run's parts/part-*.parquet and run.json; read the gold file (Parquet or CSV)
    join on --on; ids on one side only are counted and listed, never dropped silently
    run.json's ``evaluation`` ("classify" or "extract") says which scores apply; runs written before it
    existed are scored as extract if their task is ``extract``, else as classify
    classify:   accuracy, macro/micro F1, per-class table, confusion matrix, coverage,
                calibration of ``confidence`` (reliability diagram, ECE, accuracy at thresholds)
    multi-label (a ``labels`` column and list or "|"-joined gold): sample/micro/macro P, R, F1
    extract:    precision, recall, F1 per attribute and overall, exact and normalised
    write eval.md, eval.json (the same numbers); for classify also confusion.csv/.png, reliability.png;
    for extract attributes.png
    the pictures need matplotlib; without charts (--no-charts) no .png is written and eval.md shows none

The definitions, where a choice had to be made (``DEFINITIONS`` repeats them in every report):

Rows. Only ids present in both files are scored. A row whose gold value is null or blank is counted
as "gold missing" and not scored. A row whose status is not ``ok`` or ``truncated`` is scored as a
prediction with no label ("(none)"): it is wrong, it never counts as a prediction of any class.

Classification. Accuracy = right / scored. Per class: precision = right / predicted as the class,
recall = right / gold support, F1 their harmonic mean; any 0/0 is 0 (a class never predicted has
precision 0, and is flagged). Macro F1 = the unweighted mean of per-class F1 over the classes that
occur in gold; micro P/R/F1 are pooled over the same gold classes, so a "(none)" or a predicted class
absent from gold costs recall but adds no false positive to any gold class (scikit-learn's
``labels=<gold classes>``). Predicted classes absent from gold are still listed per class.
Coverage = share of scored rows with status ok or truncated.

Calibration. Over scored rows with a confidence. Ten equal-width bins [0, 0.1), ..., [0.9, 1.0];
ECE = sum over bins of |accuracy - mean confidence| x rows in bin / rows with a confidence. At a
threshold t the rows with confidence >= t are accepted; "share" = accepted / all scored rows (rows
without a confidence can never be accepted). The 95%-precision threshold is the lowest confidence
value t (tried: every distinct confidence) at which the accepted rows are at least 95% right.

Multi-label. Label sets compared per row; samples-averaged P/R/F1 (per-row, 0/0 = 0, then the mean),
micro (pooled) and macro (mean per label) over the union of gold and predicted labels, and
exact-set accuracy.

Extraction. Gold per attribute: a value, a list of values, or ``{value: score}`` (OA-Mine
``target_scores``; keys with a score <= 0 are ignored). Gold names match run columns after casefolding
and turning runs of non-alphanumerics into "_" (``Model name`` == ``model_name``). Blank strings and
empty lists are no value. A single-valued attribute's gold values are alternatives: TP = 1 if the
prediction equals any gold value; else FP = 1 if something was predicted, FN = 1 if gold has a value.
A ``list[enum]`` attribute is compared as sets: TP = |P & G|, FP = |P - G|, FN = |G - P|.
Overall = micro (TP, FP, FN summed over attributes). EXACT: strings equal character for character,
numbers equal as numbers (a number never equals a string: 12.0 vs "12" is a miss). NORMALISED:
Unicode NFKC, then casefold, whitespace runs collapsed to one space, stripped; a string that is then a
plain decimal number (``-1.5``, ``12``, ``3e2``; no thousands separators) becomes that number, and
numbers compare as floats (12.0 == "12" == "１２").
"""

from __future__ import annotations

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
from pipeline.evaluation.classification import NONE, calibration, classification_metrics
from pipeline.evaluation.extraction import extraction_metrics, gold_attributes
from pipeline.evaluation.multilabel import _label_set, _multivalued, multilabel_metrics
from pipeline.evaluation.report import DEFINITIONS, markdown, write_confusion_csv
from pipeline.evaluation.runs import join, load_gold, load_run
from pipeline.evaluation.scores import _ratio

__all__ = ["NONE", "_fold", "calibration", "classification_metrics", "evaluate", "parse_thresholds"]

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
) -> dict:
    """Score a run folder against a gold file; write the report files into ``out_dir`` and return it.

    With ``charts`` off no picture is drawn, so matplotlib is not needed.
    """
    if charts:
        # Before any work, so a missing matplotlib costs nothing and leaves no half-written report.
        require_matplotlib()
    run = load_run(run_folder)
    extract = run.evaluation() == "extract"
    gold_column = gold_column or ("attributes" if extract else "category")
    out = Path(out_dir) if out_dir is not None else run.folder / "eval"
    thresholds = thresholds if thresholds is not None else [0.5, 0.7, 0.9]
    gold_table = load_gold(gold_file, on, gold_column)

    needed = ["status"] + ([] if extract else ["label"])
    absent = [c for c in needed if c not in run.table.column_names]
    if absent:
        raise RunStateError(f"the parts of {run.folder} have no column {', '.join(absent)}")
    run_key = on if on in run.table.column_names else run.id_column
    if run_key not in run.table.column_names:
        raise RunStateError(f"the run output has neither column {on!r} nor its id column {run.id_column!r}")
    joined = join(run.table.column(run_key).to_pylist(), gold_table.column(on).to_pylist(), str(gold_file))
    status = run.table.column("status").to_pylist()
    gold_values = gold_table.column(gold_column).to_pylist()
    gold_ids = gold_table.column(on).to_pylist()

    def gold_present(v) -> bool:
        return v is not None and not (isinstance(v, str) and not v.strip())

    pairs = [(r, g) for r, g in joined.pairs if gold_present(gold_values[g])]
    report: dict = {
        "run_folder": str(run.folder),
        "gold_file": str(gold_file),
        "on": on,
        "run_id_column": run_key,
        "gold_column": gold_column,
        "run": {
            "task": run.task,
            "model": run.manifest.provenance.get("model"),
            "rows": run.table.num_rows,
            "status_counts": dict(Counter(status)),
            "parts": run.parts,
            "chunks_total": run.manifest.chunks,
        },
        "join": {**joined.summary(), "gold_missing": len(joined.pairs) - len(pairs), "scored": len(pairs)},
    }
    labelled = [status[r] in LABELLED for r, _ in pairs]
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
                v if ok else None
                for v, ok in zip(_take(run.table, a["name"], [r for r, _ in pairs]), labelled, strict=True)
            ]
            for a in attributes
        }
        gold = [gold_attributes(gold_values[g], gold_ids[g]) or {} for _, g in pairs]
        report["extraction"] = extraction_metrics(attributes, predicted, gold)
        if charts:
            attributes_png(report["extraction"], out / "attributes.png")
            files.append("attributes.png")
    elif "labels" in run.table.column_names and _multivalued(gold_table.column(gold_column)):
        report["kind"] = "multilabel"
        preds = _take(run.table, "labels", [r for r, _ in pairs])
        predicted_sets = [_label_set(p) if ok else set() for p, ok in zip(preds, labelled, strict=True)]
        report["multilabel"] = multilabel_metrics(
            [_label_set(gold_values[g]) for _, g in pairs], predicted_sets
        )
    else:
        report["kind"] = "classify"
        rows = [r for r, _ in pairs]
        preds = [p if ok else None for p, ok in zip(_take(run.table, "label", rows), labelled, strict=True)]
        gold = [str(gold_values[g]) for _, g in pairs]
        metrics = classification_metrics(gold, preds)
        conf = (
            _take(run.table, "confidence", rows)
            if "confidence" in run.table.column_names
            else [None] * len(rows)
        )
        conf = [c if ok else None for c, ok in zip(conf, labelled, strict=True)]
        correct = [p == g for p, g in zip(preds, gold, strict=True)]
        metrics["calibration"] = calibration(correct, conf, thresholds)
        label_set = run.manifest.provenance.get("labels")
        if isinstance(label_set, list):
            metrics["gold_labels_not_in_label_set"] = sorted(set(gold) - set(label_set))
        report["classification"] = metrics
        write_confusion_csv(metrics["confusion"], out / "confusion.csv")
        files.append("confusion.csv")
        if charts:
            confusion_png(metrics["confusion"], out / "confusion.png")
            reliability_png(metrics["calibration"], out / "reliability.png")
            files += ["confusion.png", "reliability.png"]
    report["definitions"] = DEFINITIONS
    report["files"] = files
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    (out / "eval.md").write_text(markdown(report), encoding="utf-8")
    return report


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
