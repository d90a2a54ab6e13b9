"""Reading the gold column: one label per row or a set of labels, and which cells mean "no value".

A gold answer may be a set of labels (any of them is right for a single-label run; the whole set is
the target of a multi-label run). Sets come as a list column, or as text joined by a delimiter.
Text is only split when that reading is certain (``--gold-delimiter`` given, a multi-label run, or a
value that cannot be one of the run's labels); when it is not, eval refuses and asks, since either
wrong guess would score every row of the gold file wrongly without a sign.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.errors import InputFormatError

DEFAULT_DELIMITER = "|"
EXAMPLES = 3


class _NullLike:
    """The parsed form of a gold cell that only holds ``--null-values`` tokens."""

    def __repr__(self) -> str:
        return "NULL_LIKE"


NULL_LIKE = _NullLike()


def _text_key(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class NullValues:
    """``--null-values``: text tokens (``n/a``, ``none``, ``-``) that mark an absent gold value.

    Compared after Unicode NFKC, casefolding and whitespace collapsing, so ``N/A `` is ``n/a``.
    Only text matches: a number in the gold file is a value, whatever the tokens are.
    """

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self.tokens = [t.strip() for t in tokens if t and t.strip()]
        self._keys = frozenset(_text_key(t) for t in self.tokens)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __call__(self, value: object) -> bool:
        return bool(self._keys) and isinstance(value, str) and _text_key(value) in self._keys


def parse_null_values(text: str | None) -> list[str]:
    """``--null-values n/a,none,-``: comma-separated tokens, blanks dropped."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@dataclass
class GoldLabels:
    """The gold cells of the scored rows, parsed: ``str`` (one label), ``frozenset`` (label set),
    None (missing: null, blank, an empty set) or NULL_LIKE (only ``--null-values`` tokens)."""

    sets: bool
    source: str
    """How the column was read, in words, for the report."""
    delimiter: str | None
    values: list = field(default_factory=list)
    null_items_dropped: int = 0
    """Null-like items removed from sets that kept other labels (e.g. ``Tea|n/a``)."""

    def describe(self, nulls: NullValues) -> dict:
        return {
            "reading": "label sets" if self.sets else "one label per row",
            "source": self.source,
            "delimiter": self.delimiter,
            "null_values": nulls.tokens,
            "null_items_dropped": self.null_items_dropped,
        }


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_nested(t: pa.DataType) -> bool:
    return pa.types.is_nested(t) or (pa.types.is_dictionary(t) and pa.types.is_nested(t.value_type))


def read_label_gold(
    column: pa.ChunkedArray,
    rows: list[int],
    *,
    name: str,
    multi_label_run: bool,
    labels: list[str] | None,
    delimiter: str | None,
    nulls: NullValues,
) -> GoldLabels:
    """Parse the gold cells ``rows`` of ``column`` for a classification run.

    ``labels`` is the run's label set when run.json records it; it decides whether text holding
    "|" can be a single label.
    """
    kind = column.type
    cells = column.take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    if _is_list(kind):
        if _is_nested(kind.value_type):
            raise InputFormatError(
                f"gold column {name!r} is {kind}: a list of labels must hold text",
                hint="give a list<string> column, or text joined by a delimiter (--gold-delimiter)",
            )
        source = "list column" + (" (--gold-delimiter not used)" if delimiter is not None else "")
        gold = GoldLabels(True, source, None)
    elif _is_nested(kind):
        # A struct or map printed as text would never equal a label: refuse rather than score 0.
        raise InputFormatError(
            f"gold column {name!r} is {kind}: expected labels (text) or a list of labels",
            hint="choose the column holding the labels with --gold-column",
        )
    else:
        text = cells if _is_text(kind) else []
        _refuse_printed_lists(text, name, labels)
        if delimiter is not None:
            gold = GoldLabels(True, f"text split on {delimiter!r} (--gold-delimiter)", delimiter)
        else:
            gold = _auto_text(text, name, multi_label_run, labels, nulls)
    for cell in cells:
        gold.values.append(_parse(cell, gold, nulls))
    return gold


def _refuse_printed_lists(cells: list, name: str, labels: list[str] | None) -> None:
    """Text such as ``['Tea', 'Coffee']`` is a list written out by a CSV export: compared as text it
    matches no label, and split on a delimiter it yields labels with brackets and quotes."""
    printed = [
        c
        for c in cells
        if isinstance(c, str)
        and c.strip().startswith("[")
        and c.strip().endswith("]")
        and (labels is None or c not in labels)
    ]
    if printed:
        raise InputFormatError(
            f"gold column {name!r}: {len(printed)} value(s) look like a printed list, e.g. {printed[0]!r}",
            hint="write the gold as a list<string> column (Parquet), or as labels joined by a delimiter "
            "given with --gold-delimiter (e.g. Tea|Coffee)",
        )


def _auto_text(
    cells: list, name: str, multi_label_run: bool, labels: list[str] | None, nulls: NullValues
) -> GoldLabels:
    """No delimiter given: decide between one label per cell and "|"-joined sets, or refuse.

    ``cells`` are the text cells of the scored rows (none for a column of another type)."""
    d = DEFAULT_DELIMITER
    joined = sorted({c for c in cells if isinstance(c, str) and d in c and c.strip() and not nulls(c)})
    label_has_d = labels is not None and any(d in label for label in labels)
    ambiguous = InputFormatError(
        f"gold column {name!r}: {len(joined)} value(s) contain {d!r} "
        f"(e.g. {', '.join(repr(v) for v in joined[:EXAMPLES])}); "
        + (
            f"some of the run's labels contain {d!r} too, so"
            if label_has_d
            else "the run records no label set, so"
        )
        + " it is unclear whether they are one label or several",
        hint=f"--gold-delimiter '{d}' reads them as label sets; --gold-delimiter with a text they "
        "don't contain (e.g. ';') reads each cell as one label",
    )
    if multi_label_run:
        if joined and label_has_d:
            raise ambiguous
        return GoldLabels(True, f"text split on {d!r} (the default for a multi-label run)", d)
    if not joined or (labels is not None and all(v in labels for v in joined)):
        return GoldLabels(False, "one label per cell", None)
    if labels is None or label_has_d:
        raise ambiguous
    return GoldLabels(
        True, f"text split on {d!r} (values such as {joined[0]!r} are not labels of the run)", d
    )


def _parse(cell, gold: GoldLabels, nulls: NullValues):
    if cell is None:
        return None
    if not gold.sets:
        text = str(cell)
        if not text.strip():
            return None
        return NULL_LIKE if nulls(text) else text
    if isinstance(cell, (list, tuple)):
        items = list(cell)
    else:
        if nulls(str(cell)):  # before splitting: a token may contain the delimiter ("n|a")
            return NULL_LIKE
        items = str(cell).split(gold.delimiter or DEFAULT_DELIMITER)
    items = [str(i).strip() for i in items if i is not None and str(i).strip()]
    kept = [i for i in items if not nulls(i)]
    if not kept:
        return NULL_LIKE if items else None
    gold.null_items_dropped += len(items) - len(kept)
    return frozenset(kept)
