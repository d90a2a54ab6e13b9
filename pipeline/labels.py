"""The label set: from the job file or a labels file, checked before any model work.

Errors about a labels file name the file and line numbers, never the lines themselves: a job that
points ``labels_file`` at the wrong file (a key file, ``/etc/passwd``) must not copy it into a log.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from pipeline.contracts import PATH_SEP as _TAXONOMY_SEP
from pipeline.errors import LabelsError

# Taxonomy lines, with the category's id: Shopify's
# "gid://shopify/TaxonomyCategory/aa-1   : Apparel & Accessories > Clothing", and Google's
# "166 - Apparel & Accessories > Clothing" (taxonomy-with-ids.*.txt)
_TAXONOMY_LINE = re.compile(r"^(?:(?P<gid>gid://\S+)\s+:\s+|(?P<number>\d+) - )(?P<path>.+)$")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Control characters, and the line and paragraph separators, which would split a prompt line.
_UNPRINTABLE = {"Cc", "Zl", "Zp"}


def load_labels(
    labels: list[str] | None, labels_file: str | None, max_depth: int | None = None, assign: str = "any"
) -> list[str]:
    """Return the validated label list, in the order given. For a taxonomy file: every category
    (``assign="any"``) or only those with no category below them (``"leaf"``), at most
    ``max_depth`` deep."""
    return load_label_ids(labels, labels_file, max_depth, assign)[0]


def load_label_ids(
    labels: list[str] | None, labels_file: str | None, max_depth: int | None = None, assign: str = "any"
) -> tuple[list[str], dict[str, str]]:
    """``load_labels``, and each label's id where the file is a taxonomy with ids (Shopify's
    ``gid://...``, Google's number; the first one of a path listed twice)."""
    if labels_file is None:
        cleaned = validate_labels(list(labels or []), "labels")
        if max_depth is None and assign == "any":
            return cleaned, {}
        if not any(_TAXONOMY_SEP in label for label in cleaned):
            raise LabelsError("labels: labels_max_depth and assign need taxonomy paths ('A > B')")
        return _cut(cleaned, max_depth, assign), {}
    raw, line_numbers, ids = _read_labels_file(Path(labels_file), max_depth, assign)
    cleaned = validate_labels(raw, f"labels file {labels_file}", line_numbers)
    return cleaned, {label: i for label, i in zip(cleaned, ids, strict=True) if i is not None}


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


def _read_labels_file(
    path: Path, max_depth: int | None, assign: str = "any"
) -> tuple[list[str], list[int], list[str | None]]:
    """The file's labels, the line number of each, and each one's id (None without one)."""
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
        paths = [
            (n, m.group("path"), m.group("gid") or m.group("number"))
            for (n, _), m in zip(numbered, taxonomy, strict=True)
        ]
    elif any(taxonomy):
        bad = next(n for (n, _), m in zip(numbered, taxonomy, strict=True) if not m)
        raise LabelsError(
            f"labels file {path}: mixes taxonomy lines (gid://... or 'ID - ...') with plain lines, "
            f"first at line {bad}",
            hint="a labels file holds either taxonomy lines or plain labels, one per line",
        )
    elif any(_TAXONOMY_SEP in ln for _, ln in numbered):
        paths = [(n, ln, None) for n, ln in numbered]  # lines holding paths ("A > B"): no ids
    else:
        if max_depth is not None or assign != "any":
            raise LabelsError(f"labels file {path}: labels_max_depth and assign need a taxonomy file")
        return [ln for _, ln in numbered], [n for n, _ in numbered], [None] * len(numbered)
    return _taxonomy_labels(path, paths, max_depth, assign)


def _taxonomy_labels(
    path: Path, paths: list[tuple[int, str, str | None]], max_depth: int | None, assign: str
) -> tuple[list[str], list[int], list[str | None]]:
    """A taxonomy's categories as labels (the full path each) with their line numbers and ids,
    exact repeats merged with a warning."""
    from pipeline import logs

    first: dict[str, tuple[int, str | None]] = {}
    repeats = []
    for n, text, category_id in paths:
        label = _TAXONOMY_SEP.join(part.strip() for part in text.strip().split(_TAXONOMY_SEP))
        if label in first:
            repeats.append(f"line {n} (= line {first[label][0]})")
        else:
            first[label] = (n, category_id)
    if repeats:  # the same category listed twice is one category, not an ambiguous label set
        logs.get("labels").warning(
            "labels file %s: %d category path(s) listed more than once, merged: %s",
            path,
            len(repeats),
            ", ".join(repeats[:5]),
        )
    kept = set(_cut(list(first), max_depth, assign))
    first = {label: v for label, v in first.items() if label in kept}
    return list(first), [n for n, _ in first.values()], [i for _, i in first.values()]


def _cut(labels: list[str], max_depth: int | None, assign: str) -> list[str]:
    """Taxonomy paths at most ``max_depth`` deep; with ``assign="leaf"`` only the leaves of the
    tree as cut there. Order kept."""
    if max_depth is not None:
        labels = [label for label in labels if label.count(_TAXONOMY_SEP) < max_depth]
    if assign == "leaf":
        parts = [label.split(_TAXONOMY_SEP) for label in labels]
        inner = {_TAXONOMY_SEP.join(p[:i]) for p in parts for i in range(1, len(p))}
        labels = [label for label in labels if label not in inner]
    return labels


class Taxonomy:
    """A label set of paths as a tree, for walking it top-down (``strategy: hierarchical``).

    Inner nodes a file does not list (a file of leaf paths only, or ``assign: leaf``) are made from
    the paths' prefixes: they can be walked through, never answered. ``options(node)`` is what a
    row standing at ``node`` chooses among: its children, and the node itself where it may be the
    answer (``assign: any``), which ends the walk there.
    """

    def __init__(self, labels: list[str], leaves_only: bool = False) -> None:
        self.labels = set(labels)
        self.leaves_only = leaves_only
        self.children: dict[str | None, list[str]] = {}
        seen: set[str] = set()
        for label in labels:
            parts = label.split(_TAXONOMY_SEP)
            for depth in range(1, len(parts) + 1):
                node = _TAXONOMY_SEP.join(parts[:depth])
                if node in seen:
                    continue
                seen.add(node)
                parent = _TAXONOMY_SEP.join(parts[: depth - 1]) if depth > 1 else None
                self.children.setdefault(parent, []).append(node)
        self.depth = max(label.count(_TAXONOMY_SEP) + 1 for label in labels)

    def options(self, node: str | None) -> list[str]:
        """What a row at ``node`` (None: the root) chooses among next."""
        below = self.children.get(node, [])
        if node is not None and below and not self.leaves_only and node in self.labels:
            return [node, *below]
        return below

    def final(self, node: str) -> bool:
        """The walk ends at ``node``: nothing below it, or chosen over its children."""
        return node not in self.children

    def widest_options(self) -> list[str]:
        """The options of the node whose options are longest in all (the prompt's worst case)."""
        nodes = [None, *self.children]
        return max((self.options(n) for n in nodes), key=lambda o: sum(len(x.encode()) for x in o))
