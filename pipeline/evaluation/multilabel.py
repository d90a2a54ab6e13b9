"""Multi-label classification: label sets per row, samples/micro/macro P, R, F1."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from pipeline.evaluation.scores import _f1, _ratio


def multilabel_metrics(gold: list[set[str]], predicted: list[set[str]]) -> dict:
    """Samples-averaged, micro and macro P/R/F1 over the union of labels, and exact-set accuracy."""
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


def _multivalued(column: pa.ChunkedArray) -> bool:
    """A list column, or text holding "|": the gold answers are label sets."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return True
    return any(isinstance(v, str) and "|" in v for v in column.to_pylist())
