"""A row's text: taken from one column or a template over several, then made safe to send.

Cleaning keeps the text as the user wrote it except for what a prompt can't carry: invalid UTF-8
becomes U+FFFD, control characters (other than tab and newline) become spaces, invisible format
characters (zero-width space, soft hyphen, byte order mark, word joiner, bidi marks, tag
characters) are dropped, and the ends are trimmed. A row with nothing visible left (only
whitespace, format characters and other default-ignorable code points such as variation selectors
or the Hangul filler) is ``empty_input``; it is never sent to the model.
"""

from __future__ import annotations

import string

import polars as pl
import pyarrow as pa

from pipeline.errors import ConfigError

_CONTROL = r"[\x00-\x08\x0B-\x1F\x7F-\x9F]"
# Format characters (category Cf) that draw nothing and change nothing a reader sees. They are
# dropped from the text sent, not only when deciding a row is empty: inside a word (a soft hyphen
# or zero-width space from a CMS) they split it into odd tokens for the model, they make texts
# that look equal differ for duplicate collapsing and the result cache, and tag characters can
# carry instructions a person reviewing the input cannot see. Kept: ZWNJ and ZWJ, which change how
# Persian and Indic words and emoji sequences are written, Egyptian hieroglyph format controls,
# which arrange their neighbours, and prepended concatenation marks (the Arabic number sign),
# which are drawn.
_INVISIBLE = r"[\p{Cf}--[\x{200C}\x{200D}\x{13430}-\x{1343F}\p{Prepended_Concatenation_Mark}]]"
# What a text needs, besides whitespace, to be worth asking about.
_VISIBLE = r"[^\s\p{Default_Ignorable_Code_Point}\p{Cf}--\p{Prepended_Concatenation_Mark}]"
# Rows holding none of these need no more than trimming; in most inputs that is nearly every row,
# so one scan for them is cheaper than running each replacement over every row.
_UNUSUAL = r"[\x00-\x08\x0B-\x1F\x7F-\x9F\p{Cf}\p{Default_Ignorable_Code_Point}]"


def template_fields(template: str) -> list[str]:
    """Column names a ``text_template`` refers to, in order of first use."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"text_template: {exc} (write {{{{ and }}}} for literal braces)") from None
    fields: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or spec or conversion:
            raise ConfigError(f"text_template: placeholder {{{name}}} must be a plain column name")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise ConfigError("text_template refers to no column; use {column_name} placeholders")
    return fields


def text_columns(text_column: str | None, text_template: str | None) -> list[str]:
    return [text_column] if text_column is not None else template_fields(text_template or "")


def row_texts(table: pa.Table, text_column: str | None, text_template: str | None) -> list[str | None]:
    """The cleaned text of each row, or None where the row has no text."""
    return text_series(table, text_column, text_template).to_list()


def text_series(table: pa.Table, text_column: str | None, text_template: str | None) -> pl.Series:
    """The cleaned text of each row, null where the row has no text, as one column."""
    fields = text_columns(text_column, text_template)
    frame = pl.DataFrame({f: clean_texts(_as_text(table.column(f))) for f in fields})
    empty = pl.all_horizontal([pl.col(f).is_null() | (pl.col(f) == "") for f in fields])
    if text_template is None:
        text = pl.col(fields[0])
    else:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(text_template):
            if literal:
                parts.append(pl.lit(literal))
            if name is not None:
                parts.append(pl.col(name).fill_null(""))
        text = pl.concat_str(parts).str.strip_chars()
    return frame.select(pl.when(empty).then(None).otherwise(text).alias("t"))["t"]


def clean_texts(texts: pl.Series) -> pl.Series:
    """Each text made safe to send (see the module's docstring); "" where nothing visible is left."""
    unusual = texts.str.contains(_UNUSUAL).fill_null(False)
    if unusual.any():
        where = unusual.arg_true()
        fixed = texts.gather(where).str.replace_all(_CONTROL, " ").str.replace_all(_INVISIBLE, "")
        fixed = fixed.zip_with(fixed.str.contains(_VISIBLE), pl.Series([""], dtype=pl.String))
        texts = texts.scatter(where, fixed)
    return texts.str.strip_chars()


def _as_text(column: pa.ChunkedArray) -> pl.Series:
    typ = column.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        try:
            column.validate(full=True)
            return pl.Series(pl.from_arrow(column)).cast(pl.String)
        except pa.ArrowInvalid:  # invalid UTF-8 written by another tool: repair row by row
            column = column.cast(pa.large_binary())
            typ = column.type
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_binary_view(typ):
        values = [None if v is None else v.decode("utf-8", errors="replace") for v in column.to_pylist()]
        return pl.Series(values, dtype=pl.String)
    return pl.Series(pl.from_arrow(column)).cast(pl.String)
