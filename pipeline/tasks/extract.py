"""Task ``extract``: fill a declared set of attributes from each row's text, in one model call.

The answer is one JSON object with every declared attribute as a key, constrained by a JSON schema
built from the declaration (vLLM structured outputs), so it parses and every enum value is allowed.
It is validated again here all the same: a row whose answer does not fit the declaration gets status
``invalid`` with the reason, never a guess. The raw answer is kept in ``raw_answer`` for audit.

Attribute types and their output columns:

    enum        one of ``values``             string
    string      free text (<= 100 chars)      string (blank -> null)
    number      a number, in ``unit``         float64 (the unit is in the column's metadata)
    list[enum]  any of ``values``             list<string> (empty -> null)

An attribute that is not ``required`` may be null (absent from the text).
"""

from __future__ import annotations

import json
from typing import Literal

import pyarrow as pa
from pydantic import field_validator, model_validator

from pipeline.contracts import Completion, Constraint, Options, Sampling, Status
from pipeline.tasks.base import TRUNCATED_NOTE, RowResult, Task

STRING_MAX_CHARS = 100
# Words of the attribute list shown to the model, in the prompt template's language.
_WORDS = {
    "en": {"enum": "one of", "string": "text", "number": "number", "in": "in", "list": "any of",
           "required": "required", "optional": "null if not stated"},
    "pl": {"enum": "jedna z", "string": "tekst", "number": "liczba", "in": "w", "list": "dowolne z",
           "required": "wymagane", "optional": "null, jeśli nie podano"},
}  # fmt: skip


class AttributeSpec(Options):
    """One attribute of an ``extract`` job; it becomes one typed output column."""

    name: str
    """Column name and the JSON key the model fills: letters (any script, so ``kolor`` or
    ``płeć``), digits and underscores, not starting with a digit."""
    type: Literal["enum", "string", "number", "list[enum]"]
    values: list[str] | None = None
    """Allowed values, for ``enum`` and ``list[enum]`` (required there, refused elsewhere)."""
    unit: str | None = None
    """For ``number``: the unit the model must answer in (e.g. ``count``, ``oz``, ``ml``)."""
    required: bool = False
    """If true, an answer without this attribute is ``invalid``; otherwise it may be null."""
    description: str = ""
    """Shown to the model next to the name: what the attribute means."""

    @field_validator("name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError(f"attribute name {value!r}: use letters, digits and underscores only")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AttributeSpec:
        has_values = self.type in ("enum", "list[enum]")
        if has_values and not self.values:
            raise ValueError(f"attribute '{self.name}' ({self.type}) needs a non-empty 'values' list")
        if not has_values and self.values is not None:
            raise ValueError(f"attribute '{self.name}' ({self.type}) takes no 'values'")
        if self.values is not None and len(set(self.values)) != len(self.values):
            raise ValueError(f"attribute '{self.name}' lists a value more than once")
        if self.unit is not None and self.type != "number":
            raise ValueError(f"attribute '{self.name}': 'unit' applies to numbers only")
        return self


class ExtractSettings(Options):
    """The job keys of ``task: extract``."""

    attributes: list[AttributeSpec]
    """The attributes to fill, each an output column."""

    @field_validator("attributes")
    @classmethod
    def _declared(cls, value: list[AttributeSpec]) -> list[AttributeSpec]:
        if not value:
            raise ValueError("task: extract needs a non-empty 'attributes' list")
        names = [a.name for a in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"attributes {dupes} are declared more than once")
        return value


class ExtractTask(Task):
    name = "extract"
    Settings = ExtractSettings
    fingerprint_part = "attributes"
    evaluation = "extract"

    def __init__(self, settings: ExtractSettings, sampling: Sampling | None = None) -> None:
        super().__init__(settings, sampling or Sampling())
        self.attributes = settings.attributes
        self._max_tokens = self.sampling.max_tokens

    def lines(self) -> list[tuple[str, str]]:
        names = [a.name for a in self.attributes]
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        return [("attrs", f"{len(names)}: {shown}")]

    @property
    def fields(self) -> list[pa.Field]:
        fields = []
        for a in self.attributes:
            if a.type == "number":
                meta = {b"unit": a.unit.encode()} if a.unit else None
                fields.append(pa.field(a.name, pa.float64(), metadata=meta))
            elif a.type == "list[enum]":
                fields.append(pa.field(a.name, pa.list_(pa.string())))
            else:
                fields.append(pa.field(a.name, pa.string()))
        fields.append(pa.field("raw_answer", pa.string()))
        return fields

    def prompt_values(self, language: str = "en") -> dict[str, str]:
        words = _WORDS.get(language, _WORDS["en"])
        return {
            "attributes": "\n".join(_describe(a, words) for a in self.attributes),
            "attribute_names": ", ".join(a.name for a in self.attributes),
        }

    def constraint(self) -> Constraint:
        return Constraint(json_schema=self.schema())

    def schema(self) -> dict:
        properties = {}
        for a in self.attributes:
            if a.type == "enum":
                prop: dict = {"type": "string", "enum": list(a.values)}
            elif a.type == "string":
                prop = {"type": "string", "maxLength": STRING_MAX_CHARS}
            elif a.type == "number":
                prop = {"type": "number"}
            else:
                # maxItems stops a small model from repeating one value until max_tokens
                prop = {"type": "array", "items": {"type": "string", "enum": list(a.values)}}
                prop["maxItems"] = len(a.values)
                if a.required:
                    prop["minItems"] = 1
            if not a.required and a.type != "list[enum]":
                prop = {"anyOf": [prop, {"type": "null"}]}
            properties[a.name] = prop
        return {
            "type": "object",
            "properties": properties,
            "required": [a.name for a in self.attributes],
            "additionalProperties": False,
        }

    def max_tokens(self) -> int:
        """A bound on any valid answer, counting one token per byte (the constraint allows any
        tokenisation): keys, values and JSON punctuation."""
        if self._max_tokens:
            return self._max_tokens
        total = 8
        for a in self.attributes:
            longest = max((len(v.encode("utf-8")) for v in a.values or ()), default=0)
            value = {
                "enum": longest + 2,
                # Not a strict bound (a character can take several byte tokens), but a string
                # that long is cut and the row marked invalid, never silently shortened.
                "string": 2 * STRING_MAX_CHARS + 2,
                "number": 32,
                "list[enum]": len(a.values or ()) * (longest + 4) + 2,
            }[a.type]
            total += len(a.name) + 12 + value  # key, quotes, colon, comma, indentation
        return total

    def describe(self) -> dict:
        return {"attributes": [a.model_dump() for a in self.attributes]}

    def parse(self, completion: Completion, truncated: bool) -> RowResult:
        if completion.error is not None:
            return RowResult.failed(completion)
        result = RowResult.answered(completion)
        result.values["raw_answer"] = completion.text
        try:
            result.values.update(self._validate(completion.text))
        except ValueError as exc:
            result.status = Status.INVALID
            cut = " (cut at max_tokens)" if completion.finish_reason == "length" else ""
            result.error = f"answer does not fit the attributes{cut}: {exc}"
            return result
        if truncated:
            result.status = Status.TRUNCATED
            result.error = TRUNCATED_NOTE
        return result

    def _validate(self, text: str) -> dict:
        try:
            answer = json.loads(text)
        except ValueError:
            raise ValueError(f"not JSON: {text[:120]!r}") from None
        if not isinstance(answer, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(set(answer) - {a.name for a in self.attributes})
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        values = {}
        for a in self.attributes:
            value = _check(a, answer.get(a.name))
            if value is None and a.required:
                raise ValueError(f"'{a.name}' is required but missing")
            values[a.name] = value
        return values


def _check(a: AttributeSpec, value):
    if value is None:
        return None
    if a.type == "enum":
        if value not in a.values:
            raise ValueError(f"'{a.name}': {value!r} is not one of its values")
        return value
    if a.type == "string":
        if not isinstance(value, str):
            raise ValueError(f"'{a.name}': expected text, got {type(value).__name__}")
        return value.strip() or None
    if a.type == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{a.name}': expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, list) or any(v not in a.values for v in value):
        raise ValueError(f"'{a.name}': expected a list of its values, got {value!r}")
    return list(dict.fromkeys(value)) or None


def _describe(a: AttributeSpec, words: dict[str, str]) -> str:
    kind = {
        "enum": f"{words['enum']}: {', '.join(a.values or ())}",
        "string": words["string"],
        "number": words["number"] + (f" {words['in']} {a.unit}" if a.unit else ""),
        "list[enum]": f"{words['list']}: {', '.join(a.values or ())}",
    }[a.type]
    need = words["required"] if a.required else words["optional"]
    about = f": {a.description}" if a.description else ""
    return f"- {a.name} ({kind}; {need}){about}"
