"""Tasks and backends from outside ``pipeline/``: registered through entry points, exactly as a plugin
package registers them, and run end to end through the ``labelmill`` command on the fake backend.

The task here is written in this file and nothing under ``pipeline/`` knows it: it owns its job
keys, its constraint, its parsing, its output columns, its fingerprint part and what ``labelmill
validate`` prints; it declares no evaluation.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from pydantic import Field

from pipeline.cli import main
from pipeline.config import load_job
from pipeline.contracts import Completion, Constraint, Options, Status
from pipeline.errors import JobChangedError, JobFileError
from pipeline.runner import run_job
from pipeline.tasks.base import TRUNCATED_NOTE, RowResult, Task


class RateSettings(Options):
    question: str
    """What each row is rated on."""
    scale: int = Field(default=5, ge=2, le=9)
    """Ratings run from 1 to this."""


class RateTask(Task):
    """Rate each row from 1 to ``scale`` on a question: one small integer column."""

    name = "rate"
    Settings = RateSettings
    fingerprint_part = "rating"

    @property
    def fields(self) -> list[pa.Field]:
        return [pa.field("rating", pa.int8())]

    def prompt_values(self, language: str = "en") -> dict[str, str]:
        return {"question": self.settings.question, "scale": str(self.settings.scale)}

    def constraint(self) -> Constraint:
        return Constraint(choice=tuple(str(n) for n in range(1, self.settings.scale + 1)))

    def max_tokens(self) -> int:
        return 2

    def parse(self, completion: Completion, truncated: bool) -> RowResult:
        if completion.error is not None:
            return RowResult.failed(completion)
        result = RowResult.answered(completion)
        answer = completion.text.strip()
        if answer not in self.constraint().choice:
            result.status, result.error = Status.INVALID, f"not a rating: {answer!r}"
        else:
            result.values["rating"] = int(answer)
            if truncated:
                result.status, result.error = Status.TRUNCATED, TRUNCATED_NOTE
        return result

    def describe(self) -> dict:
        return {"question": self.settings.question, "scale": self.settings.scale}

    def lines(self) -> list[tuple[str, str]]:
        return [("rating", f"1 to {self.settings.scale}: {self.settings.question}")]


TEMPLATE = {
    "task": "rate",
    "system": "Rate each product from 1 to {scale}: {question}\nAnswer with the number only.",
    "user": "Product: {text}",
}


@pytest.fixture
def rate_job(make_job, register_plugins, tmp_path):
    register_plugins(tasks={"rate": "test_plugins:RateTask"})
    (tmp_path / "rate.en.yaml").write_text(yaml.safe_dump(TEMPLATE))
    titles = ["Green tea 20 bags", None, "Running shoes", "Green tea 20 bags", "Vitamin C 1000 mg"]
    data = pa.table({"id": pa.array(range(len(titles)), pa.int64()), "title": titles})
    return make_job(
        data,
        task="rate",
        labels=None,
        question="how likely is a shopper to buy it again within a month?",
        prompt=str(tmp_path / "rate.en.yaml"),
    )


def test_a_task_from_outside_pipeline_runs_end_to_end(rate_job):
    cli = CliRunner()
    checked = cli.invoke(main, ["validate", str(rate_job.path)])
    assert checked.exit_code == 0, checked.output
    assert "rating  1 to 5: how likely is a shopper" in checked.output  # the task's own lines
    assert "Rate each product from 1 to 5" in checked.stdout  # its prompt variables

    result = cli.invoke(main, ["run", "--quiet", str(rate_job.path)])
    assert result.exit_code == 0, result.output
    out = pq.read_table(sorted((rate_job.output / "parts").glob("*.parquet")))
    assert out.schema.field("rating").type == pa.int8()
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == list(range(5))  # rows in == rows out
    assert [r["status"] for r in rows] == ["ok", "empty_input", "ok", "ok", "ok"]
    assert all(1 <= r["rating"] <= 5 for r in rows if r["status"] == "ok")
    assert rows[0]["rating"] == rows[3]["rating"]  # duplicates share one answer, as for any task
    manifest = json.loads((rate_job.output / "run.json").read_text())
    assert manifest["task"] == "rate" and manifest["evaluation"] is None
    assert "rating" in manifest["components"]
    assert manifest["provenance"]["question"].startswith("how likely")


def test_the_task_owns_its_keys_and_its_fingerprint(rate_job):
    job = load_job(rate_job.path)
    assert job.task_settings.scale == 5
    run_job(job)
    rate_job.rewrite(question="is it a gift?")
    with pytest.raises(JobChangedError, match="rating"):
        run_job(rate_job.load())
    rate_job.rewrite(scale=12)
    with pytest.raises(JobFileError, match="scale"):
        rate_job.load()
    rate_job.rewrite(scale=None, labels=["a", "b"])
    with pytest.raises(JobFileError, match=r"'labels' .*a key of task 'classify'"):
        rate_job.load()


def test_a_task_without_an_evaluation_is_refused_by_eval(rate_job, tmp_path):
    run_job(rate_job.load())
    gold = tmp_path / "gold.csv"
    gold.write_text("id,category\n0,x\n")
    result = CliRunner().invoke(main, ["eval", str(rate_job.output), "--gold", str(gold), "--on", "id"])
    assert result.exit_code == 3 and "task 'rate' has no evaluation" in result.output


def test_an_unknown_or_broken_plugin_is_named(make_job, register_plugins):
    register_plugins(tasks={"broken": "no_such_module:Task"}, backends={"odd": "test_plugins:RateSettings"})
    with pytest.raises(JobFileError, match=r"'broken'.*failed to load"):
        make_job(task="broken", labels=None).load()
    with pytest.raises(JobFileError, match=r"'odd'.*is not a Backend"):
        make_job(backend="odd").load()
    with pytest.raises(JobFileError, match=r"unknown task 'summarise'; known: .*classify"):
        make_job(task="summarise").load()
