"""Text normalisation for matching rows that ask the same question.

Within a chunk, rows whose normalised text is equal are sent to the model once and the answer is
copied to each of them (every row stays in the output). Across chunks and runs the result cache
does the same for texts sent before (keyed by the exact text sent). What counts as equal within a
chunk is the job's ``dedupe`` setting (``enabled: false``: every row is sent):

    nfc                  Unicode NFC, so "é" typed as e + combining accent equals the single "é"
    casefold             case-insensitive, Unicode-aware ("Straße" == "STRASSE")
    collapse_whitespace  runs of spaces, tabs and newlines become one space; ends are trimmed

The first row of a group is the one sent, with its own spelling; the others get its answer.
"""

from __future__ import annotations

import re
import unicodedata

from pipeline.config import DedupeConfig

_SPACE = re.compile(r"\s+")


def normalise(text: str, cfg: DedupeConfig) -> str:
    if cfg.nfc:
        text = unicodedata.normalize("NFC", text)
    if cfg.casefold:
        text = text.casefold()
    if cfg.collapse_whitespace:
        text = _SPACE.sub(" ", text).strip()
    return text
