"""Label sets: a multi-label run against gold sets, and a single-label run against gold sets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Set

from pipeline.evaluation.scores import _f1, _ratio


def multilabel_metrics(gold: list[Set[str]], predicted: list[Set[str]]) -> dict:
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
            {
                "label": label,
                "precision": p,
                "recall": r,
                "f1": _f1(p, r),
                "support": tp[label] + fn[label],
                "predicted": tp[label] + fp[label],
                "tp": tp[label],
                "fp": fp[label],
                "fn": fn[label],
            }
        )
    tps, fps, fns = sum(tp.values()), sum(fp.values()), sum(fn.values())
    micro_p, micro_r = _ratio(tps, tps + fps), _ratio(tps, tps + fns)
    return {
        "rows": n,
        "exact_set_accuracy": _ratio(sum(g == p for g, p in zip(gold, predicted, strict=True)), n),
        "samples": {k: _ratio(v, n) for k, v in samples.items()},
        "micro": {
            "precision": micro_p,
            "recall": micro_r,
            "f1": _f1(micro_p, micro_r),
            "tp": tps,
            "fp": fps,
            "fn": fns,
        },
        "macro": {
            k: _ratio(sum(row[k] for row in per_label), len(per_label)) for k in ("precision", "recall", "f1")
        },
        "per_label": per_label,
        "gold_labels_per_row": _set_sizes(gold),
    }


def label_in_set_metrics(gold: list[Set[str]], predicted: list[str | None]) -> dict:
    """A single-label run against gold label sets: a row is right when its label is in the row's set.

    The label-set scores treat each prediction as a one-label set, so micro precision is the share of
    labelled rows that are right, and recall can reach 1 only where gold sets hold one label.
    """
    n = len(gold)
    right = sum(p is not None and p in g for p, g in zip(predicted, gold, strict=True))
    sets = multilabel_metrics(gold, [{p} if p is not None else set() for p in predicted])
    return {
        "rows": n,
        "accuracy_label_in_gold_set": _ratio(right, n),
        "right": right,
        "unlabelled": sum(p is None for p in predicted),
        "exact_set_accuracy": sets["exact_set_accuracy"],
        "micro": sets["micro"],
        "macro": sets["macro"],
        "per_label": sets["per_label"],
        "gold_labels_per_row": sets["gold_labels_per_row"],
    }


def _set_sizes(gold: list[Set[str]]) -> dict:
    sizes = [len(g) for g in gold]
    return {
        "mean": _ratio(sum(sizes), len(sizes)),
        "max": max(sizes, default=0),
        "rows_with_several": sum(s > 1 for s in sizes),
    }


def _label_set(value) -> set[str]:
    """A predicted ``labels`` cell as a set; items compared stripped, as the gold items are."""
    if value is None:
        return set()
    items = value if isinstance(value, list) else [value]
    return {str(v).strip() for v in items if v is not None and str(v).strip()}
