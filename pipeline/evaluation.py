"""``labelmill eval``: score a finished run folder against a gold file.

    read the run's parts/part-*.parquet and run.json; read the gold file (Parquet or CSV)
    join on --on; ids on one side only are counted and listed, never dropped silently
    classify:   accuracy, macro/micro F1, per-class table, confusion matrix, coverage,
                calibration of ``confidence`` (reliability diagram, ECE, accuracy at thresholds)
    multi-label (a ``labels`` column and list or "|"-joined gold): sample/micro/macro P, R, F1
    extract:    precision, recall, F1 per attribute and overall, exact and normalised
    write eval.md, eval.json (the same numbers); for classify also confusion.csv/.png, reliability.png;
    for extract attributes.png

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

import csv
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import (
    BackendUnavailableError,
    ConfigError,
    DuplicateIdError,
    InputFormatError,
    InputNotFoundError,
    RunStateError,
)

LABELLED = ("ok", "truncated")
NONE = "(none)"
OTHER = "(other)"
BINS = 10
PRECISION_TARGET = 0.95
PLOT_CLASSES = 25
EXAMPLES = 5

DEFINITIONS = [
    "Scored rows: ids present in both the run and the gold file, with a gold value. Rows with a status "
    "other than ok/truncated are scored as wrong, with no label ('(none)').",
    "Per class: precision = right / predicted, recall = right / gold support, 0/0 = 0 (a class never "
    "predicted has precision 0).",
    "Macro F1 = mean per-class F1 over the gold classes; micro P/R/F1 are pooled over the gold classes "
    "(a '(none)' or non-gold prediction costs recall, not precision).",
    "Coverage = share of scored rows with status ok or truncated.",
    "Calibration: rows with a confidence; 10 equal-width bins; ECE = sum |accuracy - mean confidence| "
    "x bin rows / rows. Accepted at t = confidence >= t; share = accepted / all scored rows.",
    "95%-precision threshold: the lowest distinct confidence value at which accepted rows are >= 95% right.",
    "Multi-label: samples-averaged P/R/F1 (0/0 = 0), micro and macro over the union of gold and "
    "predicted labels, exact-set accuracy.",
    "Extraction: a single-valued attribute's gold values are alternatives (TP if the prediction is one "
    "of them, else FP if predicted and FN if gold has a value); list attributes compare as sets. "
    "Overall = micro over attributes.",
    "Exact match: strings character for character, numbers as numbers, a number never equals a string. "
    "Normalised match: Unicode NFKC, casefold, whitespace collapsed and stripped; decimal-number strings "
    "become numbers, compared as floats.",
]


# ---------------------------------------------------------------- reading


@dataclass
class Run:
    folder: Path
    manifest: dict
    table: pa.Table
    id_column: str
    parts: int

    @property
    def task(self) -> str:
        return self.manifest.get("task", "classify")


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    manifest_path = folder / "run.json"
    if not manifest_path.exists():
        raise RunStateError(
            f"{folder} is not a labelmill run folder (no run.json)",
            hint="give the run's output: folder, e.g. out/products-oa-mine",
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    paths = sorted((folder / "parts").glob("part-*.parquet"))
    if not paths:
        raise RunStateError(
            f"{folder} has no output parts yet", hint="run the job first: labelmill run JOB_FILE"
        )
    try:
        table = pa.concat_tables(pq.read_table(p) for p in paths)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunStateError(f"cannot read the parts of {folder}: {exc}") from None
    return Run(folder, manifest, table, manifest.get("id_column") or "row_id", len(paths))


def load_gold(path: str | Path, on: str, column: str) -> pa.Table:
    """The gold file's ``on`` and ``column`` columns; CSV cells are read as text, never guessed."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"gold file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif suffix in (".csv", ".tsv"):
            # Text, so an id like 007 keeps its zeros and a label like "1" stays a label.
            types = {on: pa.string(), column: pa.string()}
            parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            table = pacsv.read_csv(
                path, parse_options=parse, convert_options=pacsv.ConvertOptions(column_types=types)
            )
        else:
            raise InputFormatError(
                f"gold file {path}: unknown format '{suffix}'", hint="give a .parquet or .csv file"
            )
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputFormatError(f"cannot read gold file {path}: {exc}") from None
    missing = [c for c in (on, column) if c not in table.column_names]
    if missing:
        raise InputFormatError(
            f"gold file {path} has no column {', '.join(repr(m) for m in missing)}",
            hint=f"its columns: {', '.join(table.column_names)}; choose them with --on / --gold-column",
        )
    return table.select([on, column])


@dataclass
class Join:
    """Which run row goes with which gold row, and what was left over on each side."""

    pairs: list[tuple[int, int]]
    run_rows: int
    gold_rows: int
    only_in_run: list = field(default_factory=list)
    only_in_gold: list = field(default_factory=list)
    ids_as_text: bool = False

    def summary(self) -> dict:
        return {
            "run_rows": self.run_rows,
            "gold_rows": self.gold_rows,
            "matched": len(self.pairs),
            "only_in_run": len(self.only_in_run),
            "only_in_run_examples": [str(i) for i in self.only_in_run[:EXAMPLES]],
            "only_in_gold": len(self.only_in_gold),
            "only_in_gold_examples": [str(i) for i in self.only_in_gold[:EXAMPLES]],
            "ids_compared_as_text": self.ids_as_text,
        }


def join(run_ids: list, gold_ids: list, gold_name: str = "gold file") -> Join:
    """Pair rows by id. Gold ids must be unique and non-null: a repeated id has no single answer."""
    _check_unique(gold_ids, gold_name)
    _check_unique(run_ids, "run output")
    as_text = {type(i) for i in run_ids if i is not None} != {type(i) for i in gold_ids if i is not None}
    if as_text and run_ids and gold_ids:  # e.g. int ids in the run, the same ids as CSV text in gold
        run_ids, gold_ids = [str(i) for i in run_ids], [str(i) for i in gold_ids]
    gold_index = {g: n for n, g in enumerate(gold_ids)}
    pairs, only_run = [], []
    for n, rid in enumerate(run_ids):
        if rid in gold_index:
            pairs.append((n, gold_index[rid]))
        else:
            only_run.append(rid)
    in_run = set(run_ids)
    only_gold = [g for g in gold_ids if g not in in_run]
    return Join(
        pairs, len(run_ids), len(gold_ids), only_run, only_gold, as_text and bool(run_ids and gold_ids)
    )


def _check_unique(ids: list, name: str) -> None:
    nulls = sum(i is None for i in ids)
    if nulls:
        raise DuplicateIdError(
            f"{name}: the id column holds {nulls} null(s)", hint="every row needs an id to be joined"
        )
    repeated = [i for i, c in Counter(ids).items() if c > 1]
    if repeated:
        shown = ", ".join(repr(i) for i in repeated[:EXAMPLES])
        raise DuplicateIdError(
            f"{name}: {len(repeated)} id(s) occur more than once, e.g. {shown}",
            hint="each id needs exactly one gold answer; remove the repeats or join on another column (--on)",
        )


def parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = [-1.0]
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(
            f"--thresholds {text!r}: expected comma-separated numbers in [0, 1]", hint="e.g. 0.5,0.7,0.9"
        )
    return sorted(set(values))


# ---------------------------------------------------------------- classification


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def classification_metrics(gold: list[str], predicted: list[str | None]) -> dict:
    """Accuracy, per-class table, macro/micro F1 over gold classes, confusion matrix (rows = gold)."""
    n = len(gold)
    pred = [p if p is not None else NONE for p in predicted]
    gold_classes = sorted(set(gold))
    classes = sorted(set(gold) | {p for p in pred if p != NONE})
    support, predicted_count, right = Counter(gold), Counter(pred), Counter()
    pairs = Counter(zip(gold, pred, strict=True))
    for (g, p), c in pairs.items():
        if g == p:
            right[g] += c
    per_class = []
    for c in classes:
        p, r = _ratio(right[c], predicted_count[c]), _ratio(right[c], support[c])
        per_class.append(
            {
                "label": c,
                "precision": p,
                "recall": r,
                "f1": _f1(p, r),
                "support": support[c],
                "predicted": predicted_count[c],
                "never_predicted": predicted_count[c] == 0,
                "not_in_gold": support[c] == 0,
            }
        )
    tp = sum(right[c] for c in gold_classes)
    micro_p = _ratio(tp, sum(predicted_count[c] for c in gold_classes))
    micro_r = _ratio(tp, sum(support[c] for c in gold_classes))
    f1s = {row["label"]: row["f1"] for row in per_class}
    columns = [*classes, NONE]
    return {
        "rows": n,
        "accuracy": _ratio(sum(right.values()), n),
        "macro_f1": _ratio(sum(f1s[c] for c in gold_classes), len(gold_classes)),
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": _f1(micro_p, micro_r),
        "unlabelled": predicted_count[NONE],
        "per_class": per_class,
        "confusion": {
            "rows": classes,
            "columns": columns,
            "matrix": [[pairs[(g, p)] for p in columns] for g in classes],
        },
    }


def calibration(correct: list[bool], confidence: list[float | None], thresholds: list[float]) -> dict:
    """Reliability bins, ECE, accuracy at thresholds and the lowest 95%-precision threshold.

    ``correct`` and ``confidence`` run over all scored rows; rows without a confidence are left out
    of the bins but stay in the denominator of every "share".
    """
    scored = len(correct)
    rows = [(c, ok) for c, ok in zip(confidence, correct, strict=True) if c is not None and not math.isnan(c)]
    n = len(rows)
    bins = []
    for b in range(BINS):
        members = [(c, ok) for c, ok in rows if _bin(c) == b]
        k = len(members)
        bins.append(
            {
                "lower": b / BINS,
                "upper": (b + 1) / BINS,
                "rows": k,
                "mean_confidence": sum(c for c, _ in members) / k if k else None,
                "accuracy": sum(ok for _, ok in members) / k if k else None,
            }
        )
    ece = (
        sum(abs(b["accuracy"] - b["mean_confidence"]) * b["rows"] for b in bins if b["rows"]) / n
        if n
        else None
    )
    return {
        "rows_with_confidence": n,
        "bins": bins,
        "ece": ece,
        "thresholds": [_accepted(rows, t, scored) for t in thresholds],
        "precision_target": PRECISION_TARGET,
        "lowest_threshold_for_target": lowest_threshold(rows, scored, PRECISION_TARGET),
    }


def _bin(confidence: float) -> int:
    """[0, 0.1) -> 0, ..., [0.9, 1.0] -> 9: the last bin is closed so a confidence of 1 has a home."""
    return max(0, min(int(confidence * BINS), BINS - 1))


def _accepted(rows: list[tuple[float, bool]], t: float, scored: int) -> dict:
    taken = [ok for c, ok in rows if c >= t]
    return {
        "threshold": t,
        "accepted": len(taken),
        "share": _ratio(len(taken), scored),
        "accuracy": sum(taken) / len(taken) if taken else None,
    }


def lowest_threshold(rows: list[tuple[float, bool]], scored: int, target: float) -> dict | None:
    """Accuracy of accepted rows is not monotone in t, so every distinct confidence is tried, lowest first."""
    ordered = sorted(rows, key=lambda r: -r[0])
    best, taken, right = None, 0, 0
    for i, (c, ok) in enumerate(ordered):
        taken, right = taken + 1, right + ok
        last_of_value = i + 1 == len(ordered) or ordered[i + 1][0] < c
        if last_of_value and right >= target * taken - 1e-12:
            best = {
                "threshold": c,
                "accepted": taken,
                "share": _ratio(taken, scored),
                "accuracy": right / taken,
            }
    return best


def multilabel_metrics(gold: list[set[str]], predicted: list[set[str]]) -> dict:
    labels = sorted(set().union(*gold, *predicted))
    n = len(gold)
    samples = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    tp, fp, fn = Counter(), Counter(), Counter()
    for g, p in zip(gold, predicted, strict=True):
        hit = len(g & p)
        samples["precision"] += _ratio(hit, len(p))
        samples["recall"] += _ratio(hit, len(g))
        samples["f1"] += _ratio(2 * hit, len(g) + len(p))
        for label in g & p:
            tp[label] += 1
        for label in p - g:
            fp[label] += 1
        for label in g - p:
            fn[label] += 1
    per_label = []
    for label in labels:
        p, r = _ratio(tp[label], tp[label] + fp[label]), _ratio(tp[label], tp[label] + fn[label])
        per_label.append(
            {"label": label, "precision": p, "recall": r, "f1": _f1(p, r), "support": tp[label] + fn[label]}
        )
    tps, fps, fns = sum(tp.values()), sum(fp.values()), sum(fn.values())
    micro_p, micro_r = _ratio(tps, tps + fps), _ratio(tps, tps + fns)
    return {
        "rows": n,
        "exact_set_accuracy": _ratio(sum(g == p for g, p in zip(gold, predicted, strict=True)), n),
        "samples": {k: _ratio(v, n) for k, v in samples.items()},
        "micro": {"precision": micro_p, "recall": micro_r, "f1": _f1(micro_p, micro_r)},
        "macro": {
            k: _ratio(sum(row[k] for row in per_label), len(per_label)) for k in ("precision", "recall", "f1")
        },
        "per_label": per_label,
    }


def _label_set(value) -> set[str]:
    if value is None:
        return set()
    items = value if isinstance(value, list) else str(value).split("|")
    return {str(v).strip() for v in items if v is not None and str(v).strip()}


# ---------------------------------------------------------------- extraction

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?")


def attribute_key(name: str) -> str:
    """``Model name``, ``model-name`` and ``MODEL_NAME`` all become ``model_name``."""
    return re.sub(r"[\W_]+", "_", name.casefold()).strip("_")


def exact_key(value) -> tuple[str, object]:
    if isinstance(value, bool):
        return ("s", str(value).lower())
    if isinstance(value, (int, float)):
        return ("n", float(value))
    return ("s", str(value))


def normalised_key(value) -> tuple[str, object]:
    if isinstance(value, bool):
        return ("s", str(value).lower())
    if isinstance(value, (int, float)):
        return ("n", float(value))
    text = " ".join(unicodedata.normalize("NFKC", str(value)).casefold().split())
    if _NUMBER.fullmatch(text):
        return ("n", float(text))
    return ("s", text)


def _values(value) -> list:
    """A gold or predicted cell as a list of values: null, blank and NaN are no value."""
    if value is None:
        return []
    if isinstance(value, dict):  # OA-Mine target_scores: {value: score}
        items = [k for k, s in value.items() if not (isinstance(s, (int, float)) and s <= 0)]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    out = []
    for v in items:
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            continue
        out.append(v)
    return out


def gold_attributes(cell, row_id) -> dict[str, object] | None:
    """Parse one gold cell (JSON text or an already-decoded mapping); None when the cell is empty."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return None
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as exc:
            raise InputFormatError(
                f"gold attributes of id {row_id!r} are not JSON: {exc}",
                hint='expected e.g. {"Brand": "Crocs"} or {"Brand": {"Crocs": 1}}',
            ) from None
    if isinstance(cell, list) and all(isinstance(kv, tuple) and len(kv) == 2 for kv in cell):
        cell = dict(cell)  # an Arrow map column
    if not isinstance(cell, dict):
        raise InputFormatError(
            f"gold attributes of id {row_id!r} are {type(cell).__name__}, not an object",
            hint="one JSON object per row, attribute name -> value",
        )
    return cell


def _counts(pred: list, gold: list, key, is_list: bool) -> tuple[int, int, int]:
    p, g = {key(v) for v in pred}, {key(v) for v in gold}
    if is_list:
        return len(p & g), len(p - g), len(g - p)
    hit = bool(p & g)
    return int(hit), int(bool(p) and not hit), int(bool(g) and not hit)


def _prf(tp: int, fp: int, fn: int) -> dict:
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": _f1(p, r)}


def extraction_metrics(attributes: list[dict], predicted: dict[str, list], gold: list[dict]) -> dict:
    """``predicted``: run column -> values of the scored rows; ``gold``: parsed gold cells, same rows."""
    by_key: dict[str, dict] = {}
    for a in attributes:
        k = attribute_key(a["name"])
        if k in by_key:
            raise InputFormatError(
                f"run attributes {by_key[k]['name']!r} and {a['name']!r} both match gold name {k!r}"
            )
        by_key[k] = a
    gold_by_attr: dict[str, list[list]] = {k: [[] for _ in gold] for k in by_key}
    unmatched: Counter = Counter()
    for row, cell in enumerate(gold):
        for name, value in cell.items():
            k = attribute_key(str(name))
            if k in by_key:
                gold_by_attr[k][row] += _values(value)
            else:
                unmatched[str(name)] += 1
    per_attribute, totals = [], {"exact": [0, 0, 0], "normalised": [0, 0, 0]}
    for k, a in by_key.items():
        is_list = a["type"].startswith("list")
        preds = [_values(v) for v in predicted[a["name"]]]
        row = {
            "attribute": a["name"],
            "type": a["type"],
            "gold_rows": sum(bool(g) for g in gold_by_attr[k]),
            "predicted_rows": sum(bool(p) for p in preds),
        }
        for mode, key in (("exact", exact_key), ("normalised", normalised_key)):
            tp = fp = fn = 0
            for p, g in zip(preds, gold_by_attr[k], strict=True):
                a_tp, a_fp, a_fn = _counts(p, g, key, is_list)
                tp, fp, fn = tp + a_tp, fp + a_fp, fn + a_fn
            row[mode] = _prf(tp, fp, fn)
            totals[mode] = [totals[mode][0] + tp, totals[mode][1] + fp, totals[mode][2] + fn]
        per_attribute.append(row)
    return {
        "rows": len(gold),
        "per_attribute": per_attribute,
        "overall": {mode: _prf(*t) for mode, t in totals.items()},
        "attributes_never_in_gold": [r["attribute"] for r in per_attribute if not r["gold_rows"]],
        "unmatched_gold_attributes": dict(sorted(unmatched.items())),
    }


# ---------------------------------------------------------------- the command


def evaluate(
    run_folder: str | Path,
    gold_file: str | Path,
    on: str,
    gold_column: str | None = None,
    out_dir: str | Path | None = None,
    thresholds: list[float] | None = None,
) -> dict:
    run = load_run(run_folder)
    extract = run.task == "extract"
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
            "model": run.manifest.get("provenance", {}).get("model"),
            "rows": run.table.num_rows,
            "status_counts": dict(Counter(status)),
            "parts": run.parts,
            "chunks_total": run.manifest.get("chunks"),
        },
        "join": {**joined.summary(), "gold_missing": len(joined.pairs) - len(pairs), "scored": len(pairs)},
    }
    labelled = [status[r] in LABELLED for r, _ in pairs]
    report["coverage"] = _ratio(sum(labelled), len(pairs))
    out.mkdir(parents=True, exist_ok=True)
    files = ["eval.md", "eval.json"]

    if extract:
        attributes = run.manifest.get("attributes") or []
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
        label_set = run.manifest.get("provenance", {}).get("labels")
        if isinstance(label_set, list):
            metrics["gold_labels_not_in_label_set"] = sorted(set(gold) - set(label_set))
        report["classification"] = metrics
        write_confusion_csv(metrics["confusion"], out / "confusion.csv")
        confusion_png(metrics["confusion"], out / "confusion.png")
        reliability_png(metrics["calibration"], out / "reliability.png")
        files += ["confusion.csv", "confusion.png", "reliability.png"]
    report["definitions"] = DEFINITIONS
    report["files"] = files
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    (out / "eval.md").write_text(markdown(report), encoding="utf-8")
    return report


def _take(table: pa.Table, column: str, rows: list[int]) -> list:
    return table.column(column).take(pa.array(rows, pa.int64())).to_pylist()


def _multivalued(column: pa.ChunkedArray) -> bool:
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return True
    return any(isinstance(v, str) and "|" in v for v in column.to_pylist())


# ---------------------------------------------------------------- reports


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(report: dict) -> str:
    j, run = report["join"], report["run"]
    statuses = ", ".join(f"{k} {v}" for k, v in run["status_counts"].items())
    lines = [
        f"# labelmill eval: {report['run_folder']}",
        "",
        f"Gold: `{report['gold_file']}` column `{report['gold_column']}`, joined on `{report['on']}` "
        f"(run column `{report['run_id_column']}`). Task: {report['kind']}; model: {run['model']}.",
        "",
        "## Rows",
        "",
        "| | rows |",
        "|---|---:|",
        f"| in the run ({statuses}) | {j['run_rows']} |",
        f"| in the gold file | {j['gold_rows']} |",
        f"| in both | {j['matched']} |",
        f"| only in the run (not scored) | {j['only_in_run']} |",
        f"| only in the gold file (not scored) | {j['only_in_gold']} |",
        f"| in both, gold value missing (not scored) | {j['gold_missing']} |",
        f"| **scored** | **{j['scored']}** |",
        "",
        f"Coverage (scored rows with status ok or truncated): {_pct(report['coverage'])}.",
    ]
    if j["only_in_run"]:
        lines.append(f"Only in the run, e.g.: {', '.join(j['only_in_run_examples'])}.")
    if j["only_in_gold"]:
        lines.append(f"Only in the gold file, e.g.: {', '.join(j['only_in_gold_examples'])}.")
    if j["ids_compared_as_text"]:
        lines.append("The id columns have different types; ids were compared as text.")
    if run["chunks_total"] is not None and run["parts"] < run["chunks_total"]:
        lines.append(f"The run is not finished: {run['parts']} of {run['chunks_total']} parts.")
    if report["kind"] == "classify":
        lines += _classification_md(report["classification"])
    elif report["kind"] == "multilabel":
        lines += _multilabel_md(report["multilabel"])
    else:
        lines += _extraction_md(report["extraction"])
    lines += ["", "## Definitions", ""] + [f"- {d}" for d in report["definitions"]]
    return "\n".join(lines) + "\n"


def _classification_md(m: dict) -> list[str]:
    lines = [
        "",
        "## Scores",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| accuracy | {_f(m['accuracy'])} |",
        f"| macro F1 (gold classes) | {_f(m['macro_f1'])} |",
        f"| micro precision / recall / F1 (gold classes) | {_f(m['micro_precision'])} / "
        f"{_f(m['micro_recall'])} / {_f(m['micro_f1'])} |",
        f"| rows without a label | {m['unlabelled']} |",
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support | predicted | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in m["per_class"]:
        note = "; ".join(
            n
            for n, flag in (
                ("never predicted: precision 0", c["never_predicted"]),
                ("not in gold: recall 0", c["not_in_gold"]),
            )
            if flag
        )
        lines.append(
            f"| {c['label']} | {_f(c['precision'])} | {_f(c['recall'])} | {_f(c['f1'])} | {c['support']} | "
            f"{c['predicted']} | {note} |"
        )
    if m.get("gold_labels_not_in_label_set"):
        lines += [
            "",
            f"Gold classes not in the run's label set: {', '.join(m['gold_labels_not_in_label_set'])}.",
        ]
    lines += [
        "",
        "## Confusion matrix",
        "",
        "Rows: gold; columns: predicted. Full table: `confusion.csv`.",
        "",
    ]
    lines += ["![confusion matrix](confusion.png)"]
    cal = m["calibration"]
    lines += ["", "## Calibration of confidence", ""]
    if not cal["rows_with_confidence"]:
        return [*lines, "No scored row has a confidence."]
    lines += [
        f"Rows with a confidence: {cal['rows_with_confidence']}. Expected calibration error (10 bins): "
        f"**{_f(cal['ece'])}**.",
        "",
        "![reliability diagram](reliability.png)",
        "",
        "| bin | rows | mean confidence | accuracy |",
        "|---|---:|---:|---:|",
    ]
    for b in cal["bins"]:
        lines.append(
            f"| [{b['lower']:.1f}, {b['upper']:.1f}{']' if b['upper'] >= 1 else ')'} | {b['rows']} | "
            f"{_f(b['mean_confidence'])} | {_f(b['accuracy'])} |"
        )
    lines += [
        "",
        "| accept if confidence >= | accepted rows | share of scored rows | accuracy |",
        "|---:|---:|---:|---:|",
    ]
    for t in cal["thresholds"]:
        lines.append(f"| {t['threshold']:g} | {t['accepted']} | {_pct(t['share'])} | {_f(t['accuracy'])} |")
    best = cal["lowest_threshold_for_target"]
    target = f"{cal['precision_target']:.0%}"
    if best is None:
        lines += ["", f"No confidence threshold reaches {target} accuracy on the accepted rows."]
    else:
        lines += [
            "",
            f"Lowest threshold with {target} accuracy on the accepted rows: **{best['threshold']:.4g}**, "
            f"accepting {best['accepted']} rows ({_pct(best['share'])} of scored rows, accuracy "
            f"{_f(best['accuracy'])}).",
        ]
    return lines


def _multilabel_md(m: dict) -> list[str]:
    lines = [
        "",
        "## Scores (multi-label)",
        "",
        f"Exact-set accuracy: {_f(m['exact_set_accuracy'])}.",
        "",
        "| average | precision | recall | F1 |",
        "|---|---:|---:|---:|",
    ]
    for name in ("samples", "micro", "macro"):
        s = m[name]
        lines.append(f"| {name} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} |")
    lines += [
        "",
        "## Per label",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in m["per_label"]:
        lines.append(
            f"| {c['label']} | {_f(c['precision'])} | {_f(c['recall'])} | {_f(c['f1'])} | {c['support']} |"
        )
    return lines


def _extraction_md(m: dict) -> list[str]:
    lines = [
        "",
        "## Scores per attribute",
        "",
        "![F1 per attribute](attributes.png)",
        "",
        "Exact: values as given. Normalised: Unicode NFKC, casefold, whitespace collapsed and stripped, "
        "numbers compared as floats.",
        "",
        "| attribute | type | gold rows | predicted rows | exact P | exact R | exact F1 "
        "| norm. P | norm. R | norm. F1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in m["per_attribute"]:
        e, n = a["exact"], a["normalised"]
        lines.append(
            f"| {a['attribute']} | {a['type']} | {a['gold_rows']} | {a['predicted_rows']} "
            f"| {_f(e['precision'])} | {_f(e['recall'])} | {_f(e['f1'])} "
            f"| {_f(n['precision'])} | {_f(n['recall'])} | {_f(n['f1'])} |"
        )
    e, n = m["overall"]["exact"], m["overall"]["normalised"]
    lines.append(
        f"| **overall (micro)** | | | | {_f(e['precision'])} | {_f(e['recall'])} | {_f(e['f1'])} | "
        f"{_f(n['precision'])} | {_f(n['recall'])} | {_f(n['f1'])} |"
    )
    lines += ["", "| counts | TP | FP | FN |", "|---|---:|---:|---:|"]
    lines += [f"| overall, {mode} | {t['tp']} | {t['fp']} | {t['fn']} |" for mode, t in m["overall"].items()]
    if m["attributes_never_in_gold"]:
        lines += [
            "",
            "Never in gold (every prediction counts as a false positive): "
            f"{', '.join(m['attributes_never_in_gold'])}.",
        ]
    if m["unmatched_gold_attributes"]:
        shown = ", ".join(
            f"{k} ({v} row{'s' if v != 1 else ''})" for k, v in m["unmatched_gold_attributes"].items()
        )
        lines += ["", f"Gold attributes the run does not extract (not scored): {shown}."]
    return lines


def write_confusion_csv(confusion: dict, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["gold \\ predicted", *confusion["columns"]])
        for label, row in zip(confusion["rows"], confusion["matrix"], strict=True):
            writer.writerow([label, *row])


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BackendUnavailableError(
            "eval charts need matplotlib", hint="pip install 'labelmill[bench]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fold(confusion: dict, keep: int) -> tuple[list[str], list[str], list[list[int]]]:
    """The ``keep`` busiest classes; the rest summed into "(other)", so the picture stays readable."""
    rows, cols, matrix = confusion["rows"], confusion["columns"], confusion["matrix"]
    if len(rows) <= keep:
        return rows, cols, matrix
    column_of = {c: k for k, c in enumerate(cols)}
    weight = {
        r: sum(line) + sum(m[column_of[r]] for m in matrix) for r, line in zip(rows, matrix, strict=True)
    }
    kept = sorted(sorted(rows, key=lambda r: -weight[r])[:keep])
    new_rows, new_cols = [*kept, OTHER], [*kept, OTHER, NONE]
    place = {c: k for k, c in enumerate(new_cols)}
    folded = [[0] * len(new_cols) for _ in new_rows]
    for r, line in zip(rows, matrix, strict=True):
        target = folded[place.get(r, place[OTHER])]
        for c, v in zip(cols, line, strict=True):
            target[place.get(c, place[OTHER])] += v
    return new_rows, new_cols, folded


def confusion_png(confusion: dict, path: Path) -> None:
    plt = _pyplot()
    rows, cols, matrix = _fold(confusion, PLOT_CLASSES)
    size = 2.5 + 0.45 * len(cols)
    fig, ax = plt.subplots(figsize=(size + 1.5, 2.0 + 0.45 * len(rows)))
    ax.imshow(matrix, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    peak = max((v for line in matrix for v in line), default=0)
    for i, line in enumerate(matrix):
        for k, v in enumerate(line):
            if v:
                ax.text(
                    k,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > peak / 2 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    folded = " (busiest classes; the rest in (other))" if len(rows) < len(confusion["rows"]) else ""
    ax.set_title(f"confusion matrix{folded}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attributes_png(extraction: dict, path: Path) -> None:
    """F1 per attribute, exact next to normalised, so a slide shows where matching is too strict."""
    plt = _pyplot()
    rows = extraction["per_attribute"]
    names = [r["attribute"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(rows)))
    ys = range(len(rows))
    exact = [r["exact"]["f1"] for r in rows]
    norm = [r["normalised"]["f1"] for r in rows]
    ax.barh([y - 0.2 for y in ys], exact, height=0.4, label="exact", color="#9aa5b1")
    ax.barh([y + 0.2 for y in ys], norm, height=0.4, label="normalised", color="#2b7a78")
    for y, e, n in zip(ys, exact, norm, strict=True):
        ax.text(e, y - 0.2, f" {e:.2f}", va="center", fontsize=7)
        ax.text(n, y + 0.2, f" {n:.2f}", va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("F1")
    ax.set_title(f"attribute extraction, {extraction['rows']} rows", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reliability_png(cal: dict, path: Path) -> None:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    centres = [(b["lower"] + b["upper"]) / 2 for b in cal["bins"]]
    width = 1 / BINS
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    filled = [(x, b) for x, b in zip(centres, cal["bins"], strict=True) if b["rows"]]
    accuracy = [b["accuracy"] for _, b in filled]
    top.bar([x for x, _ in filled], accuracy, width=width * 0.9, color="#2b7a78", label="accuracy in bin")
    top.plot(
        [b["mean_confidence"] for _, b in filled],
        accuracy,
        "o",
        color="#c05746",
        label="bin at its mean confidence",
    )
    top.set_ylim(0, 1)
    top.set_xlim(0, 1)
    top.set_ylabel("accuracy")
    ece = "no confidences" if cal["ece"] is None else f"ECE {cal['ece']:.3f}"
    top.set_title(f"reliability ({cal['rows_with_confidence']} rows, {ece})", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b["rows"] for b in cal["bins"]], width=width * 0.9, color="#888888")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
