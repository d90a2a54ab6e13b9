"""Task extract (typed attributes) and multi-label classification, on the fake backend."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import REPO_ROOT, default_table
from doubles import RecordingFake, always

from pipeline.config import load_job
from pipeline.errors import JobFileError, PromptError
from pipeline.plan import plan_job
from pipeline.runner import run_job
from pipeline.tasks.extract import AttributeSpec, ExtractSettings, ExtractTask

PROMPT_EXTRACT = str(REPO_ROOT / "prompts" / "extract_product.en.yaml")
PROMPT_MULTI = str(REPO_ROOT / "prompts" / "classify_multilabel.en.yaml")
COLOURS = ["black", "white", "red"]
ATTRIBUTES = [
    {"name": "brand", "type": "string"},
    {"name": "colour", "type": "enum", "values": COLOURS},
    {"name": "volume", "type": "number", "unit": "ml"},
    {"name": "materials", "type": "list[enum]", "values": ["cotton", "wool", "leather"]},
]


def _extract_job(make_job, data=None, **overrides):
    spec = {
        "task": "extract",
        "attributes": ATTRIBUTES,
        "prompt": PROMPT_EXTRACT,
        "labels": None,
        **overrides,
    }
    return make_job(data, **spec)


def _quiet(job_files, reply=None):
    job = load_job(job_files.path)
    return run_job(job, backend=RecordingFake(job, reply) if reply else None)


def test_extract_writes_one_typed_column_per_attribute(make_job, read_parts):
    job_files = _extract_job(make_job, default_table(30))
    summary = _quiet(job_files)
    table = read_parts(job_files.output)
    assert table.num_rows == 30 and summary["status_counts"]["ok"] == 30
    schema = table.schema
    assert schema.field("brand").type == pa.string()
    assert schema.field("colour").type == pa.string()
    assert schema.field("volume").type == pa.float64()
    assert schema.field("volume").metadata == {b"unit": b"ml"}
    assert schema.field("materials").type == pa.list_(pa.string())
    assert schema.field("raw_answer").type == pa.string()
    assert "label" not in schema.names
    rows = table.to_pylist()
    assert {r["colour"] for r in rows} - {None} <= set(COLOURS)
    assert any(r["colour"] is None for r in rows) and any(r["colour"] for r in rows)  # optional: both
    for r in rows:
        assert set(json.loads(r["raw_answer"])) == {"brand", "colour", "volume", "materials"}
        assert r["materials"] is None or set(r["materials"]) <= {"cotton", "wool", "leather"}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("not json at all", "not JSON"),
        ('["a list"]', "not a JSON object"),
        ('{"brand": "Acme", "colour": "purple", "volume": null, "materials": []}', "'purple' is not one of"),
        ('{"brand": "Acme", "colour": null, "volume": "12", "materials": []}', "expected a number"),
        (
            '{"brand": "Acme", "colour": null, "volume": 1, "materials": ["silk"]}',
            "expected a list of its values",
        ),
        (
            '{"brand": "Acme", "colour": null, "volume": 1, "materials": [], "price": 3}',
            "unknown keys ['price']",
        ),
        ('{"brand": 7, "colour": null, "volume": 1, "materials": []}', "expected text"),
    ],
)
def test_answers_that_do_not_fit_are_invalid_never_guessed(make_job, read_parts, answer, reason):
    reply = always(answer)
    job_files = _extract_job(make_job, default_table(3))
    summary = _quiet(job_files, reply)
    rows = read_parts(job_files.output).to_pylist()
    assert summary["status_counts"]["invalid"] == 3
    for r in rows:
        assert r["status"] == "invalid" and reason in r["error"]
        assert r["raw_answer"] == answer  # kept for audit
        assert r["brand"] is None and r["colour"] is None and r["volume"] is None


def test_required_attribute_missing_is_invalid(make_job, read_parts):
    reply = always('{"brand": null, "colour": "red"}')
    attrs = [
        {"name": "brand", "type": "string", "required": True},
        {"name": "colour", "type": "enum", "values": COLOURS},
    ]
    job_files = _extract_job(make_job, default_table(2), attributes=attrs)
    _quiet(job_files, reply)
    rows = read_parts(job_files.output).to_pylist()
    assert all(r["status"] == "invalid" and "'brand' is required" in r["error"] for r in rows)


def test_values_are_normalised_into_their_types(make_job, read_parts):
    answer = '{"brand": "  Acme  ", "colour": "red", "volume": 250, "materials": ["wool", "wool", "cotton"]}'

    reply = always(answer)
    job_files = _extract_job(make_job, default_table(1))
    _quiet(job_files, reply)
    (row,) = read_parts(job_files.output).to_pylist()
    assert (row["brand"], row["colour"], row["volume"], row["materials"]) == (
        "Acme",
        "red",
        250.0,
        ["wool", "cotton"],
    )


def test_schema_built_from_the_declaration():
    attrs = [AttributeSpec(**a) for a in ATTRIBUTES] + [
        AttributeSpec(name="gender", type="enum", values=["f", "m"], required=True),
        AttributeSpec(name="tags", type="list[enum]", values=["x"], required=True),
    ]
    schema = ExtractTask(ExtractSettings(attributes=attrs)).schema()
    props = schema["properties"]
    assert schema["required"] == [a.name for a in attrs] and schema["additionalProperties"] is False
    assert props["colour"] == {"anyOf": [{"type": "string", "enum": COLOURS}, {"type": "null"}]}
    assert props["gender"] == {"type": "string", "enum": ["f", "m"]}
    assert props["volume"] == {"anyOf": [{"type": "number"}, {"type": "null"}]}
    assert props["tags"]["minItems"] == 1 and "minItems" not in props["materials"]
    assert props["brand"]["anyOf"][0]["maxLength"] == 100


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ([{"name": "c", "type": "enum"}], "needs a non-empty 'values'"),
        ([{"name": "c", "type": "string", "values": ["a"]}], "takes no 'values'"),
        ([{"name": "c", "type": "enum", "values": ["a"], "unit": "ml"}], "'unit' applies to numbers only"),
        ([{"name": "c", "type": "enum", "values": ["a", "a"]}], "more than once"),
        ([{"name": "c", "type": "string"}, {"name": "c", "type": "number"}], "declared more than once"),
        ([{"name": "2nd", "type": "string"}], "letters, digits and underscores"),
        ([{"name": "c", "type": "colour"}], "type"),
        ([], "non-empty 'attributes'"),
    ],
)
def test_bad_attribute_declarations_are_refused(make_job, attrs, message):
    job_files = _extract_job(make_job, attributes=attrs)
    with pytest.raises(JobFileError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_job(job_files.path)


def test_polish_attribute_names_are_allowed(make_job, read_parts):
    attrs = [
        {"name": "kolor", "type": "enum", "values": ["czarny", "biały"]},
        {"name": "płeć", "type": "string"},
    ]
    job_files = _extract_job(make_job, default_table(4), attributes=attrs)
    _quiet(job_files)
    assert {"kolor", "płeć"} <= set(read_parts(job_files.output).schema.names)


def test_extract_job_with_labels_or_a_classify_template_is_refused(make_job):
    with pytest.raises(JobFileError, match="a key of task 'classify'"):
        load_job(_extract_job(make_job, labels=["a", "b"]).path)
    wrong_template = _extract_job(make_job, prompt=str(REPO_ROOT / "prompts" / "classify_product.en.yaml"))
    with pytest.raises(PromptError, match="task 'classify'"):
        plan_job(load_job(wrong_template.path))


def test_multilabel_gives_up_to_k_labels(make_job, read_parts):
    job_files = make_job(default_table(30), labels_max=2, prompt=PROMPT_MULTI)
    _quiet(job_files)
    rows = read_parts(job_files.output).to_pylist()
    labels = set(job_files.spec["labels"])
    assert all(r["status"] == "ok" for r in rows)
    assert any(len(r["labels"]) == 2 for r in rows)
    for r in rows:
        assert 1 <= len(r["labels"]) <= 2 and set(r["labels"]) <= labels
        assert r["label"] == r["labels"][0] and r["confidence"] is None


@pytest.mark.parametrize(
    "answer",
    ['{"labels": []}', '{"labels": ["Tea", "Coffee", "Shoes"]}', '{"labels": ["Beer"]}', '{"label": "Tea"}'],
)
def test_multilabel_answers_outside_the_rules_are_invalid(make_job, read_parts, answer):
    def reply(messages, fake_answer, request):
        assert request.constraint.json_schema["properties"]["labels"]["maxItems"] == 2
        return always(answer)(messages, fake_answer, request)

    job_files = make_job(default_table(2), labels_max=2, prompt=PROMPT_MULTI)
    _quiet(job_files, reply)
    assert {r["status"] for r in read_parts(job_files.output).to_pylist()} == {"invalid"}
