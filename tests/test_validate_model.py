"""``labelmill validate`` refuses what ``run`` would die on, with the model's own context and
tokenizer and without an engine; JSON answers of the vLLM backend are compact.

The validate tests read the SmolLM2 checkpoint's config and tokenizer only (no vLLM): its
config.json says ``max_position_embeddings: 8192`` and its tokenizer a placeholder limit of 1e30.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO_ROOT, default_table
from engine_env import CHECKPOINT, ENGINE, needs_engine

from pipeline.cli import main
from pipeline.config import load_job
from pipeline.errors import ConfigError, ModelNotFoundError
from pipeline.models import MODELS

needs_checkpoint = pytest.mark.skipif(
    not (CHECKPOINT / "config.json").exists(), reason="run: labelmill models fetch smollm2-135m"
)
SAMPLE = REPO_ROOT / "sample_data" / "oa_mine_products.parquet"
CONTEXT = "8192 tokens (max_position_embeddings=8192 in config.json)"


@pytest.fixture
def vllm_job(make_job, tmp_path: Path):
    """A classify job for the vLLM backend on the checkpoint, without ``max_model_len``; the
    prompt has a ``{notes}`` placeholder filled from ``prompt_vars``."""
    template = yaml.safe_load((REPO_ROOT / "prompts" / "classify_product.en.yaml").read_text())
    template["system"] += "\nShop notes: {notes}\n"
    prompt = tmp_path / "notes.en.yaml"
    prompt.write_text(yaml.safe_dump(template, allow_unicode=True))

    def make(notes: str = "none", **overrides):
        spec = {"backend": "vllm", "model": str(CHECKPOINT), "engine": {"dtype": "float32"}}
        spec |= {"prompt": str(prompt), "prompt_vars": {"notes": notes}} | overrides
        return make_job(default_table(5), **spec)

    return make


def validate(job_files) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["validate", str(job_files.path)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@needs_checkpoint
def test_validate_takes_the_context_from_the_models_config(vllm_job) -> None:
    code, output = validate(vllm_job())
    assert code == 0, output
    assert "ok" in output
    assert f"context {CONTEXT}" in output  # not the tokenizer's placeholder, not "unlimited"
    budget = int(re.search(r"row text up to (\d+) tokens", output).group(1))
    assert 7000 < budget < 8192
    assert "--- prompt 1 (" in output


@needs_checkpoint
def test_validate_refuses_a_prompt_longer_than_the_models_context(vllm_job) -> None:
    notes = "Organic fair trade coffee beans from small farms. " * 2200  # ~22,000 tokens
    code, output = validate(vllm_job(notes))
    assert code == ConfigError.exit_code == 2, output
    assert ": ok" not in output and "--- prompt" not in output
    found = re.search(r"the prompt alone takes (\d+) tokens and the answer up to (\d+)", output)
    assert found, output
    assert int(found.group(1)) > 8192
    assert CONTEXT in output


@needs_checkpoint
def test_validate_refuses_a_label_list_longer_than_the_models_context(vllm_job) -> None:
    labels = [f"Category number {i} of the very long shop taxonomy" for i in range(1200)]
    code, output = validate(vllm_job(labels=labels))
    assert code == 2, output
    assert "leaves no room for row text" in output and CONTEXT in output


@needs_checkpoint
def test_validate_refuses_max_model_len_beyond_the_models_context(vllm_job) -> None:
    code, output = validate(vllm_job(engine={"dtype": "float32", "max_model_len": 16384}))
    assert code == 2, output
    assert "engine.max_model_len=16384" in output and "8192 tokens" in output
    code, output = validate(vllm_job(engine={"dtype": "float32", "max_model_len": 4096}))
    assert code == 0, output
    assert "context 4096 tokens (engine.max_model_len)" in output


def test_validate_refuses_a_mistyped_alias_naming_the_known_ones(vllm_job) -> None:
    code, output = validate(vllm_job(model="smollm2-135"))
    assert code == ConfigError.exit_code == 2, output
    assert "'smollm2-135' is not a known alias" in output
    for alias in MODELS:
        assert alias in output
    assert ": ok" not in output


def test_validate_refuses_a_missing_local_folder_naming_it(vllm_job, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "smollm2-135m"
    code, output = validate(vllm_job(model=str(missing)))
    assert code == ModelNotFoundError.exit_code == 4, output
    assert f"model folder {missing} does not exist" in output
    code, output = validate(vllm_job(model="./no-such-folder/model"))
    assert code == 4, output
    assert str(Path.cwd() / "no-such-folder" / "model") in output


@needs_checkpoint
def test_validate_refuses_a_hub_id_that_is_not_in_the_local_cache(vllm_job, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output = validate(vllm_job(model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert code == 4, output
    assert "not found locally" in output and ": ok" not in output


@needs_checkpoint
def test_validate_accepts_the_alias_once_fetched(vllm_job, tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home-with-model"
    (home / "models").mkdir(parents=True)
    (home / "models" / "smollm2-135m").symlink_to(CHECKPOINT, target_is_directory=True)
    monkeypatch.setenv("LABELMILL_HOME", str(home))
    code, output = validate(vllm_job(model="smollm2-135m"))
    assert code == 0, output
    assert f"model   smollm2-135m -> {home / 'models' / 'smollm2-135m'}" in output
    assert f"context {CONTEXT}" in output


def test_validate_of_a_model_not_fetched_names_the_fetch_command(vllm_job, labelmill_home) -> None:
    code, output = validate(vllm_job(model="smollm2-135m"))
    assert code == 4, output
    assert "labelmill models fetch smollm2-135m" in output


# --- compact JSON --------------------------------------------------------------------------------


def test_compact_json_is_an_engine_setting_and_part_of_the_identity() -> None:
    from pipeline.backends.vllm import EngineSettings, VllmBackend

    compact, pretty = EngineSettings(), EngineSettings(compact_json=False)
    assert compact.engine_kwargs()["structured_outputs_config"] == {
        "backend": "xgrammar",
        "disable_any_whitespace": True,
    }
    assert "structured_outputs_config" not in pretty.engine_kwargs()
    assert "compact_json" not in compact.engine_kwargs()  # labelmill's key, not vLLM's
    assert VllmBackend.identity(compact) != VllmBackend.identity(pretty)
    # whitespace allowed: the identity jobs had before the setting existed
    assert VllmBackend.identity(pretty) == {k: getattr(pretty, k) for k in EngineSettings.OUTPUT_FIELDS}


@needs_checkpoint
def test_compact_json_changes_the_job_fingerprint(make_job) -> None:
    from pipeline.plan import plan_job

    def plan(**engine):
        job = make_job(
            default_table(3),
            task="extract",
            labels=None,
            attributes=[{"name": "brand", "type": "string"}],
            prompt=str(REPO_ROOT / "prompts" / "extract_product.en.yaml"),
            backend="vllm",
            model=str(CHECKPOINT),
            engine={"dtype": "float32", **engine},
        )
        return plan_job(load_job(job.path)).manifest

    compact, pretty = plan(), plan(compact_json=False)
    assert compact.components["engine"] != pretty.components["engine"]
    assert compact.fingerprint != pretty.fingerprint
    assert compact.provenance["engine"]["compact_json"] is True
    assert plan(compact_json=True).components["engine"] == compact.components["engine"]


@needs_checkpoint
def test_compact_json_leaves_a_single_label_job_as_it_was(make_job) -> None:
    from pipeline.plan import plan_job

    def plan(**engine):
        job = make_job(
            default_table(3), backend="vllm", model=str(CHECKPOINT), engine={"dtype": "float32", **engine}
        )
        return plan_job(load_job(job.path)).manifest

    # a label is no JSON: the setting changes nothing a single-label job gets back
    assert plan().components["engine"] == plan(compact_json=False).components["engine"]


def test_a_structured_outputs_backend_that_cant_be_compact_is_refused(make_job) -> None:
    job = make_job(
        backend="vllm", model=str(CHECKPOINT), engine={"structured_outputs_config": {"backend": "outlines"}}
    )
    with pytest.raises(ConfigError, match=r"can't forbid whitespace.*compact_json: false"):
        load_job(job.path)
    job = make_job(
        backend="vllm",
        model=str(CHECKPOINT),
        engine={"compact_json": False, "structured_outputs_config": {"backend": "outlines"}},
    )
    assert load_job(job.path).backend_settings.engine_kwargs()["structured_outputs_config"] == {
        "backend": "outlines"
    }
    job = make_job(
        backend="vllm",
        model=str(CHECKPOINT),
        engine={"structured_outputs_config": {"backend": "guidance"}},
    )
    assert load_job(job.path).backend_settings.engine_kwargs()["structured_outputs_config"] == {
        "backend": "guidance",
        "disable_any_whitespace": True,
    }
    job = make_job(
        backend="vllm",
        model=str(CHECKPOINT),
        engine={"structured_outputs_config": {"disable_any_whitespace": False}},
    )
    with pytest.raises(ConfigError, match=r"engine\.compact_json instead"):
        load_job(job.path)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _outside_strings(raw: str) -> str:
    return _STRING.sub('""', raw)


def test_outside_strings_helper() -> None:
    assert _outside_strings('{"a": "x y", "b":["c d"]}') == '{"": "", "":[""]}'
    assert not re.search(r"\s", _outside_strings('{"a":"x \\" y","b":null}'))


@needs_engine[0]
@needs_engine[1]
def test_json_answers_have_no_whitespace_outside_strings(tmp_path: Path, engine) -> None:
    """Extraction and multi-label answers of the real engine, as it returns them: compact JSON
    that parses."""
    from pipeline.plan import plan_job

    titles = pq.read_table(SAMPLE, columns=["id", "title"]).to_pylist()[5::300][:4]
    pq.write_table(pa.Table.from_pylist(titles), tmp_path / "input.parquet")
    shipped = yaml.safe_load((REPO_ROOT / "jobs" / "products-oa-mine-attributes.yaml").read_text())
    common = {
        "input": str(tmp_path / "input.parquet"),
        "output": str(tmp_path / "run"),
        "id_column": "id",
        "text_column": "title",
        "model": str(CHECKPOINT),
        "backend": "vllm",
        "engine": ENGINE,
    }
    jobs = {
        "extract": {
            "task": "extract",
            "attributes": shipped["attributes"],
            "prompt": str(REPO_ROOT / "prompts" / "extract_product.en.yaml"),
        },
        "multilabel": {
            "labels": ["Coffee", "Tea", "Vitamins", "Shoes", "Snacks"],
            "labels_max": 3,
            "prompt": str(REPO_ROOT / "prompts" / "classify_multilabel.en.yaml"),
        },
    }
    assert engine.engine.compact_json  # the session engine was started with the default
    for name, spec in jobs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**common, **spec}, allow_unicode=True))
        plan = plan_job(load_job(tmp_path / f"{name}.yaml"))
        assert plan.request.constraint.json_schema is not None
        answers = engine.complete([plan.prompt.messages(t["title"]) for t in titles], plan.request)
        parsed = 0
        for answer in answers:
            raw = answer.text
            assert raw.startswith("{"), raw
            assert not re.search(r"\s", _outside_strings(raw)), (name, raw)  # no "\n", ": " or ", "
            if answer.finish_reason == "stop":
                json.loads(raw)
                parsed += 1
        assert parsed >= 2, (name, [a.text for a in answers])
