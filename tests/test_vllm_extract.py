"""Attribute extraction on real OA-Mine titles with SmolLM2 on vLLM (CPU, the shared engine), then
``labelmill eval``.

Skipped when vLLM or the checkpoint is missing (see ``engine_env``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from click.testing import CliRunner
from engine_env import CHECKPOINT, ENGINE, needs_engine

from pipeline.cli import main
from pipeline.config import load_job
from pipeline.runner import run_job

pytestmark = needs_engine

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "oa_mine_products.parquet"


def test_extraction_rows_fit_the_schema_and_eval_reports(tmp_path, engine):
    job = yaml.safe_load((REPO / "jobs" / "products-oa-mine-attributes.yaml").read_text())
    real = pq.read_table(SAMPLE).to_pylist()[3::181]  # 8 titles across the categories
    rows = [{"id": r["id"], "title": r["title"], "attributes": r["attributes"]} for r in real]
    rows.append({"id": "empty", "title": "  ", "attributes": "{}"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input.parquet")
    job.update(
        input=str(tmp_path / "input.parquet"),
        output=str(tmp_path / "run"),
        prompt=str(REPO / "prompts" / "extract_product.en.yaml"),
        chunk_rows=5,
        cache={"enabled": False},
        model=str(CHECKPOINT),
        engine=ENGINE,
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, allow_unicode=True))
    summary = run_job(load_job(tmp_path / "job.yaml"), backend=engine)
    assert summary["complete"] and not summary["status_counts"]["error"]  # some may be invalid, all kept

    out = pq.read_table(sorted((tmp_path / "run" / "parts").glob("*.parquet")))
    assert out.column("id").to_pylist() == [r["id"] for r in rows]  # rows in == rows out, in order
    attrs = {a["name"]: a for a in job["attributes"]}
    assert out.schema.field("specialty").type == pa.list_(pa.string())
    statuses = out.column("status").to_pylist()
    assert statuses[-1] == "empty_input"
    assert statuses.count("ok") >= 4, statuses  # the schema constraint makes most answers valid
    for row in out.to_pylist():
        if row["status"] == "ok":
            assert set(json.loads(row["raw_answer"])) == set(attrs)
            assert row["gender"] is None or row["gender"] in attrs["gender"]["values"]
            assert row["specialty"] is None or set(row["specialty"]) <= set(attrs["specialty"]["values"])
            for name in ("brand", "item_form", "net_content", "pack_size", "color"):
                assert row[name] is None or (isinstance(row[name], str) and row[name].strip())
        elif row["status"] == "invalid":
            assert row["raw_answer"] and row["error"]
        else:
            assert row["status"] == "empty_input"

    result = CliRunner().invoke(
        main,
        ["eval", str(tmp_path / "run"), "--gold", str(SAMPLE), "--on", "id", "--gold-column", "attributes"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert report["kind"] == "extract"
    assert {a["attribute"] for a in report["extraction"]["per_attribute"]} == set(attrs)
    assert (tmp_path / "run" / "eval" / "attributes.png").read_bytes()[:4] == b"\x89PNG"
    assert "exact" in (tmp_path / "run" / "eval" / "eval.md").read_text()
