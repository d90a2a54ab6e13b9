"""Single-label classification: accuracy, per-class table, macro/micro F1, confusion, calibration."""

from __future__ import annotations

import math
from collections import Counter

from pipeline.contracts import PATH_SEP
from pipeline.evaluation.scores import _f1, _ratio

NONE = "(none)"
BINS = 10
PRECISION_TARGET = 0.95


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


def label_probs_metrics(
    gold: list[set[str]], probs: list[list[dict] | None], thresholds: list[float]
) -> dict:
    """What a run's ``label_probs`` (the K most probable labels of each row) say beyond its label:
    how often the gold label is among the first k (k = 1..K: a shortlist's recall), the margin
    between the first two probabilities and the entropy of the reported distribution (the mass
    beyond the K as one outcome), and how accuracy rises when only rows with a margin of at least
    t are accepted. ``gold`` holds each scored row's right labels; ``probs`` is None for a row
    without label probabilities (not labelled), which counts as wrong everywhere."""
    scored = len(gold)
    k = max((len(p) for p in probs if p), default=0)
    top = []
    for n in range(1, k + 1):
        hits = sum(bool(p) and any(x["label"] in g for x in p[:n]) for p, g in zip(probs, gold, strict=True))
        top.append({"k": n, "accuracy": _ratio(hits, scored)})
    rows, entropies = [], []
    for p, g in zip(probs, gold, strict=True):
        if not p:
            continue
        values = [x["prob"] for x in p]
        margin = values[0] - (values[1] if len(values) > 1 else max(0.0, 1.0 - values[0]))
        rows.append((margin, p[0]["label"] in g))
        rest = max(0.0, 1.0 - sum(values))
        entropies.append(-sum(v * math.log(v) for v in [*values, rest] if v > 0))
    return {
        "k": k,
        "rows_with_label_probs": len(rows),
        "top_k_accuracy": top,
        "mean_margin": sum(m for m, _ in rows) / len(rows) if rows else None,
        "mean_entropy": sum(entropies) / len(entropies) if entropies else None,
        "margin_thresholds": [_accepted(rows, t, scored) for t in thresholds],
        "lowest_margin_for_target": lowest_threshold(rows, scored, PRECISION_TARGET),
    }


def hierarchy_metrics(gold: list[str], predicted: list[str | None]) -> dict | None:
    """For labels that are taxonomy paths (``A > B > C``): accuracy at each level (the first d
    parts of the path equal; rows whose gold is shallower than d are not counted at level d) and
    hierarchical precision, recall and F1 over ancestor sets (Kiritchenko et al., 2005: a path
    stands for itself and every ancestor, so a near miss earns part of the credit). A row without a
    label predicts nothing: it costs recall. None when no gold label is a path."""
    if not any(PATH_SEP in g for g in gold):
        return None
    split_gold = [g.split(PATH_SEP) for g in gold]
    split_pred = [p.split(PATH_SEP) if p else [] for p in predicted]
    depth = max(len(g) for g in split_gold)
    levels = []
    for d in range(1, depth + 1):
        rows = [(g, p) for g, p in zip(split_gold, split_pred, strict=True) if len(g) >= d]
        right = sum(p[:d] == g[:d] for g, p in rows)
        levels.append({"level": d, "rows": len(rows), "accuracy": _ratio(right, len(rows))})
    shared = claimed = true = 0
    for g, p in zip(split_gold, split_pred, strict=True):
        ancestors_g = {tuple(g[:i]) for i in range(1, len(g) + 1)}
        ancestors_p = {tuple(p[:i]) for i in range(1, len(p) + 1)}
        shared += len(ancestors_g & ancestors_p)
        claimed += len(ancestors_p)
        true += len(ancestors_g)
    precision, recall = _ratio(shared, claimed), _ratio(shared, true)
    return {
        "levels": levels,
        "hierarchical_precision": precision,
        "hierarchical_recall": recall,
        "hierarchical_f1": _f1(precision, recall),
    }


def shortlist_metrics(
    gold: list[str], candidates: list[list[str] | None], predicted: list[str | None]
) -> dict:
    """How often the right label was even offered (recall@k of the candidate lists, merged order),
    and how often the model picked it when it was: accuracy = recall x choice accuracy. Rows
    without candidates (no answer came) count as not offered."""
    n = len(gold)
    sizes = [len(c) for c in candidates if c]
    largest = max(sizes, default=0)
    ks = sorted({k for k in (1, 3, 5, 10, 20) if k < largest} | {largest}) if largest else []
    rank = [c.index(g) + 1 if c and g in c else None for g, c in zip(gold, candidates, strict=True)]
    offered = [i for i, r in enumerate(rank) if r is not None]
    return {
        "rows": n,
        "mean_candidates": sum(sizes) / len(sizes) if sizes else None,
        "recall_at": [{"k": k, "recall": _ratio(sum(r is not None and r <= k for r in rank), n)} for k in ks],
        "recall": _ratio(len(offered), n),
        "accuracy_when_offered": _ratio(sum(predicted[i] == gold[i] for i in offered), len(offered)),
    }


SOURCES = ("model", "cache", "duplicate", "student", "escalated")


def source_metrics(
    sources: list[str | None],
    correct: list[bool],
    labelled: list[bool],
    confidence: list[float | None],
    run_sources: list[str | None],
    *,
    student_confidence: list[float | None] | None = None,
    first_correct: list[bool] | None = None,
    first_confidence: list[float | None] | None = None,
) -> dict:
    """Scores per ``source`` (where a cascade run took each row's final label), keyed model, cache,
    duplicate, student, escalated, any other value, then "none" for rows never answered.

    The lists run over the scored rows; ``run_sources`` over every row of the run, so a source the
    gold file never meets is still listed. Accuracy counts like the overall accuracy (a row without a
    label is wrong), so the per-source ``right`` add up to the overall; it is None for a source with
    no scored row. ``first_correct`` is whether each row's ``first_label`` (the answer before
    escalation) was right."""
    run_rows = Counter(run_sources)
    others = sorted(s for s in run_rows if s is not None and s not in SOURCES)
    order = [s for s in SOURCES if s in run_rows] + others + ([None] if None in run_rows else [])
    found = {}
    for source in order:
        rows = [i for i, s in enumerate(sources) if s == source]
        right = sum(correct[i] for i in rows)
        entry = {
            "run_rows": run_rows[source],
            "rows": len(rows),
            "labelled": sum(labelled[i] for i in rows),
            "right": right,
            "accuracy": right / len(rows) if rows else None,
            "mean_confidence": _mean([confidence[i] for i in rows]),
        }
        if source == "student":
            entry["mean_student_confidence"] = (
                _mean([student_confidence[i] for i in rows]) if student_confidence is not None else None
            )
        if source == "escalated":
            entry["first_label_accuracy"] = (
                sum(first_correct[i] for i in rows) / len(rows)
                if first_correct is not None and rows
                else None
            )
            entry["first_label_mean_confidence"] = (
                _mean([first_confidence[i] for i in rows]) if first_confidence is not None else None
            )
        found["none" if source is None else source] = entry
    return found


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None
