"""The label set: from the job file or a labels file, checked before any model work."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from pipeline.errors import LabelsError

# Shopify taxonomy line: "gid://shopify/TaxonomyCategory/aa-1   : Apparel & Accessories > Clothing"
_TAXONOMY_LINE = re.compile(r"^gid://\S+\s+:\s+(?P<path>.+)$")
_TAXONOMY_SEP = " > "


def load_labels(labels: list[str] | None, labels_file: str | None, max_depth: int | None = None) -> list[str]:
    """Return the validated label list, in the order given."""
    if labels_file is not None:
        where = labels_file
        labels = _read_labels_file(Path(labels_file), max_depth)
    else:
        where = "labels"
    return validate_labels(list(labels or []), where)


def validate_labels(labels: list[str], where: str) -> list[str]:
    if not labels:
        raise LabelsError(f"{where}: the label list is empty", hint="give at least two labels")
    cleaned = []
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise LabelsError(f"{where}: label #{i + 1} is blank or not text: {label!r}")
        if label != label.strip():
            raise LabelsError(
                f"{where}: label {label!r} has leading or trailing spaces",
                hint="write it without them; labels must match the model's answers exactly",
            )
        if any(unicodedata.category(ch) == "Cc" for ch in label):
            raise LabelsError(f"{where}: label {label!r} contains a control character")
        cleaned.append(unicodedata.normalize("NFC", label))
    seen: dict[str, str] = {}
    dupes = []
    for label in cleaned:
        key = label.casefold()
        if key in seen:
            dupes.append(f"{seen[key]!r} / {label!r}" if seen[key] != label else repr(label))
        seen[key] = label
    if dupes:
        raise LabelsError(
            f"{where}: duplicate labels (case-insensitive): {', '.join(dupes[:10])}",
            hint="each label must appear once",
        )
    if len(cleaned) < 2:
        raise LabelsError(f"{where}: only one label ({cleaned[0]!r}); a choice needs two or more")
    return cleaned


def _read_labels_file(path: Path, max_depth: int | None) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte order mark
    except FileNotFoundError:
        raise LabelsError(f"labels file {path} not found") from None
    except UnicodeDecodeError as exc:
        raise LabelsError(f"labels file {path} is not UTF-8 text ({exc.reason})") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    taxonomy = [_TAXONOMY_LINE.match(ln) for ln in lines]
    if lines and all(taxonomy):
        paths = [m.group("path").strip() for m in taxonomy]
        if max_depth is not None:
            paths = [p for p in paths if p.count(_TAXONOMY_SEP) < max_depth]
        return paths
    if any(taxonomy):
        bad = next(i for i, m in enumerate(taxonomy) if not m)
        raise LabelsError(
            f"labels file {path}: mixes taxonomy lines (gid://...) with plain lines, e.g. {lines[bad]!r}"
        )
    if max_depth is not None:
        raise LabelsError(f"labels file {path}: labels_max_depth needs a taxonomy file")
    return lines
