"""The label set: from the job file or a labels file, checked before any model work.

Errors about a labels file name the file and line numbers, never the lines themselves: a job that
points ``labels_file`` at the wrong file (a key file, ``/etc/passwd``) must not copy it into a log.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from pipeline.errors import LabelsError

# Shopify taxonomy line: "gid://shopify/TaxonomyCategory/aa-1   : Apparel & Accessories > Clothing"
_TAXONOMY_LINE = re.compile(r"^gid://\S+\s+:\s+(?P<path>.+)$")
_TAXONOMY_SEP = " > "
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Control characters, and the line and paragraph separators, which would split a prompt line.
_UNPRINTABLE = {"Cc", "Zl", "Zp"}


def load_labels(labels: list[str] | None, labels_file: str | None, max_depth: int | None = None) -> list[str]:
    """Return the validated label list, in the order given."""
    if labels_file is not None:
        labels, line_numbers = _read_labels_file(Path(labels_file), max_depth)
        return validate_labels(labels, f"labels file {labels_file}", line_numbers)
    return validate_labels(list(labels or []), "labels")


def validate_labels(labels: list[str], where: str, line_numbers: list[int] | None = None) -> list[str]:
    """The labels, NFC-normalised, or a LabelsError naming the first problem. ``line_numbers``
    (labels read from a file): errors name a label by its line, not by its text."""

    def name(i: int) -> str:
        return f"line {line_numbers[i]}" if line_numbers is not None else repr(labels[i])

    if not labels:
        raise LabelsError(f"{where}: the label list is empty", hint="give at least two labels")
    cleaned = []
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            shown = f"line {line_numbers[i]}" if line_numbers is not None else f"#{i + 1}"
            detail = "" if line_numbers is not None else f": {label!r}"
            raise LabelsError(f"{where}: label {shown} is blank or not text{detail}")
        if label != label.strip():
            raise LabelsError(
                f"{where}: label {name(i)} has leading or trailing spaces",
                hint="write it without them; labels must match the model's answers exactly",
            )
        if any(unicodedata.category(ch) in _UNPRINTABLE for ch in label):
            raise LabelsError(f"{where}: label {name(i)} contains a control character or line break")
        cleaned.append(unicodedata.normalize("NFC", label))
    seen: dict[str, int] = {}
    dupes = []
    for i, label in enumerate(cleaned):
        key = label.casefold()
        if key in seen:
            first = seen[key]
            dupes.append(f"{name(first)} / {name(i)}" if cleaned[first] != label else name(i))
        seen[key] = i
    if dupes:
        raise LabelsError(
            f"{where}: duplicate labels (case-insensitive): {', '.join(dupes[:10])}",
            hint="each label must appear once",
        )
    if len(cleaned) < 2:
        raise LabelsError(f"{where}: only one label ({name(0)}); a choice needs two or more")
    return cleaned


def _read_labels_file(path: Path, max_depth: int | None) -> tuple[list[str], list[int]]:
    """The file's labels and the line number of each."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LabelsError(f"labels file {path} not found") from None
    except OSError as exc:
        raise LabelsError(
            f"labels file {path} can't be read ({exc.strerror or type(exc).__name__})"
        ) from None
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte order mark
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LabelsError(f"labels file {path} is not UTF-8 text: line {line} ({exc.reason})") from None
    numbered = [(n, ln.strip()) for n, ln in enumerate(_LINE_BREAK.split(text), 1)]
    numbered = [(n, ln) for n, ln in numbered if ln and not ln.startswith("#")]
    taxonomy = [_TAXONOMY_LINE.match(ln) for _, ln in numbered]
    if numbered and all(taxonomy):
        paths = [(n, m.group("path").strip()) for (n, _), m in zip(numbered, taxonomy, strict=True)]
        if max_depth is not None:
            paths = [(n, p) for n, p in paths if p.count(_TAXONOMY_SEP) < max_depth]
        return [p for _, p in paths], [n for n, _ in paths]
    if any(taxonomy):
        bad = next(n for (n, _), m in zip(numbered, taxonomy, strict=True) if not m)
        raise LabelsError(
            f"labels file {path}: mixes taxonomy lines (gid://...) with plain lines, first at line {bad}",
            hint="a labels file holds either taxonomy lines or plain labels, one per line",
        )
    if max_depth is not None:
        raise LabelsError(f"labels file {path}: labels_max_depth needs a taxonomy file")
    return [ln for _, ln in numbered], [n for n, _ in numbered]
