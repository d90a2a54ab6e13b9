"""Every picture of the report (matplotlib, imported only when a picture is drawn)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import MissingDependencyError
from pipeline.evaluation.classification import BINS, NONE

OTHER = "(other)"
PLOT_CLASSES = 25


def require_matplotlib():
    """matplotlib, or MissingDependencyError saying how to install it or do without the pictures."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "the eval charts need matplotlib",
            hint="pip install 'labelmill[charts]', or pass --no-charts for the report without pictures",
        ) from None
    return matplotlib


def _pyplot():
    matplotlib = require_matplotlib()
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
    """The confusion matrix as a heat map, rows gold and columns predicted."""
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
    """Accuracy per confidence bin against the diagonal, with the rows per bin underneath."""
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
