"""Text normalisation for matching rows that ask the same question, and grouping rows by it.

Within a chunk, rows whose normalised text is equal are sent to the model once and the answer is
copied to each of them (every row stays in the output). Across chunks and runs the answer store
does the same, keyed by the normalised text (``pipeline/cache.py``). What counts as equal is the
job's ``dedupe`` setting (``enabled: false``: none are; every row of a run is sent):

    nfc                  Unicode NFC, so "é" typed as e + combining accent equals the single "é"
    casefold             case-insensitive, Unicode-aware ("Straße" == "STRASSE")
    collapse_whitespace  runs of spaces, tabs and newlines become one space; ends are trimmed

The first row of a group is the one sent, with its own spelling; the others get its answer.

Everything runs on whole columns (polars). Two steps need care to stay both exact and fast:
NFC is applied only to texts holding a character that NFC can change (a combining mark, a
character that composes with the one before it, or one NFC replaces); a text without one is
already in NFC. Case folding is lowercasing, except for texts holding one of the few hundred
characters whose full case folding differs from their lowercase (ß, ﬁ, final sigma, ...): those
few go through Python's ``str.casefold``.
"""

from __future__ import annotations

import unicodedata
from functools import cache

import numpy as np
import polars as pl

from pipeline.contracts import Options


class DedupeConfig(Options):
    """Which rows count as asking the same question: the job's ``dedupe:`` section."""

    enabled: bool = True
    """Send each distinct (normalised) text of a run to the model once."""
    nfc: bool = True
    casefold: bool = True
    collapse_whitespace: bool = True


# Code points below this hold every character with a canonical decomposition or a case folding.
_SCAN_LIMIT = 0x30000
# Hangul vowel and trailing jamo compose with the syllable before them algorithmically, so the
# decomposition table does not list them.
_HANGUL_COMBINING = [(0x1161, 0x1175), (0x11A8, 0x11C2)]


def normalise(text: str, cfg: DedupeConfig) -> str:
    """The matching key of one text (see :func:`normalise_texts`)."""
    return normalise_texts(pl.Series([text], dtype=pl.String), cfg)[0]


def normalise_texts(texts: pl.Series, cfg: DedupeConfig) -> pl.Series:
    """The matching key of each text, as configured; nulls stay null."""
    if cfg.nfc:
        needs = texts.str.contains(_nfc_pattern())
        if needs.any():
            texts = texts.zip_with(~needs, texts.str.normalize("NFC"))
    if cfg.casefold:
        lower = texts.str.to_lowercase()
        special = lower.str.contains(_casefold_pattern())
        if special.any():
            rows = np.flatnonzero(special.fill_null(False).to_numpy())
            folded = [t.casefold() for t in texts.gather(rows).to_list()]
            lower = lower.scatter(rows, folded)
        texts = lower
    if cfg.collapse_whitespace:
        texts = texts.str.replace_all(r"\s+", " ").str.strip_chars()
    return texts


def group_rows(keys: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Rows with equal keys form a group; groups are numbered in order of first appearance.

    Returns ``(first, group)``: the row index of each group's first row, and each row's group.
    """
    frame = pl.DataFrame({"key": keys}).with_row_index("row")
    groups = frame.group_by("key", maintain_order=True).agg(pl.col("row").first()).with_row_index("group")
    group = frame.join(groups.select("key", "group"), on="key", how="left", maintain_order="left")
    return groups["row"].to_numpy().astype(np.int64), group["group"].to_numpy().astype(np.int64)


def _char_class(code_points: set[int]) -> str:
    """A regex character class matching any of ``code_points``."""
    ranges: list[tuple[int, int]] = []
    for cp in sorted(code_points):
        if ranges and cp == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return "[" + "".join(f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b > a else "") for a, b in ranges) + "]"


@cache
def _nfc_pattern() -> str:
    """Characters that can make a text change under NFC (its "No" and "Maybe" quick-check values)."""
    found: set[int] = set()
    for cp in range(_SCAN_LIMIT):
        c = chr(cp)
        if unicodedata.combining(c) or unicodedata.normalize("NFC", c) != c:
            found.add(cp)
        decomposition = unicodedata.decomposition(c).split()
        if len(decomposition) == 2 and not decomposition[0].startswith("<"):
            found.add(int(decomposition[1], 16))  # composes with the character before it
    for a, b in _HANGUL_COMBINING:
        found.update(range(a, b + 1))
    return _char_class(found)


@cache
def _casefold_pattern() -> str:
    """Characters, as lowercasing leaves them, whose case folding is not their lowercase."""
    # Each such character lowercases to one of the set too (ß stays ß, ẞ becomes ß), so a text
    # that needs folding still shows it after lowercasing.
    return _char_class({cp for cp in range(_SCAN_LIMIT) if chr(cp).casefold() != chr(cp).lower()})
