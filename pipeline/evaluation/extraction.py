"""Attribute extraction: gold names matched to run columns, exact and normalised P, R, F1."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable

from pipeline.errors import InputFormatError
from pipeline.evaluation.scores import _f1, _ratio

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?")


def attribute_key(name: str) -> str:
    """``Model name``, ``model-name`` and ``MODEL_NAME`` all become ``model_name``."""
    return re.sub(r"[\W_]+", "_", name.casefold()).strip("_")


def exact_key(value) -> tuple[str, object]:
    """What EXACT compares: numbers as floats, everything else as the text it is."""
    if isinstance(value, bool):
        return ("s", str(value).lower())
    if isinstance(value, (int, float)):
        return ("n", float(value))
    return ("s", str(value))


def normalised_key(value) -> tuple[str, object]:
    """What NORMALISED compares: NFKC, casefold, collapsed whitespace; decimal strings as numbers."""
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


def extraction_metrics(
    attributes: list[dict],
    predicted: dict[str, list],
    gold: list[dict],
    null_like: Callable[[object], bool] | None = None,
) -> dict:
    """``predicted``: run column -> values of the scored rows; ``gold``: parsed gold cells, same rows.

    Gold values for which ``null_like`` holds (``--null-values`` tokens) are no value: removed before
    scoring and counted per attribute.
    """
    by_key: dict[str, dict] = {}
    for a in attributes:
        k = attribute_key(a["name"])
        if k in by_key:
            raise InputFormatError(
                f"run attributes {by_key[k]['name']!r} and {a['name']!r} both match gold name {k!r}"
            )
        by_key[k] = a
    null_like = null_like or (lambda v: False)
    gold_by_attr: dict[str, list[list]] = {k: [[] for _ in gold] for k in by_key}
    nulls_dropped: Counter = Counter()
    unmatched: Counter = Counter()
    for row, cell in enumerate(gold):
        for name, value in cell.items():
            k = attribute_key(str(name))
            if k in by_key:
                values = _values(value)
                kept = [v for v in values if not null_like(v)]
                nulls_dropped[k] += len(values) - len(kept)
                gold_by_attr[k][row] += kept
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
            "gold_null_values": nulls_dropped[k],
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
        "gold_null_values": sum(nulls_dropped.values()),
        "unmatched_gold_attributes": dict(sorted(unmatched.items())),
    }
