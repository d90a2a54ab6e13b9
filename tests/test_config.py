"""Job file validation: every mistake is refused with the key's name and the file's path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from pipeline.config import JobConfig, load_job
from pipeline.errors import ConfigError, JobFileError

BASE = {
    "input": "data/in.parquet",
    "output": "out/run",
    "text_column": "title",
    "labels": ["a", "b"],
    "prompt": "prompts/classify_product.en.yaml",
    "model": "fake",
    "backend": "fake",
}


def write(tmp_path: Path, spec: dict | None = None, text: str | None = None) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def job_error(tmp_path: Path, spec: dict | None = None, text: str | None = None) -> str:
    path = write(tmp_path, spec, text)
    with pytest.raises(JobFileError) as info:
        load_job(path)
    message = str(info.value)
    assert str(path) in message, "the error must name the job file"
    return message


def test_valid_job_loads_with_defaults(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, BASE))
    assert isinstance(job, JobConfig)
    assert job.task_settings.labels == ["a", "b"]
    assert job.backend == "fake"
    assert job.chunk_rows == 50_000
    assert job.section("engine") is None  # a fake job holds only the fake backend's section
    assert job.backend_settings.seconds_per_row == 0.0
    assert job.sampling.temperature == 0.0
    assert job.keep_columns == []
    assert job.name == "run"


def test_job_file_error_is_a_config_error_with_exit_code_2() -> None:
    assert issubclass(JobFileError, ConfigError)
    assert JobFileError("x").exit_code == 2


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "chunk_row": 100})
    assert "unknown key 'chunk_row'" in message


def test_unknown_nested_key_is_named_with_its_path(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "engine": {"dtyp": "float32"}})
    assert "unknown key 'engine.dtyp'" in message


def test_unknown_key_in_sampling_and_fake_sections(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "sampling": {"temprature": 0.5}, "fake": {"delay": 1}})
    assert "sampling.temprature" in message
    assert "fake.delay" in message
    assert "2 problem(s)" in message


@pytest.mark.parametrize("key", ["input", "output", "prompt", "model"])
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    spec = {k: v for k, v in BASE.items() if k != key}
    message = job_error(tmp_path, spec)
    assert f"missing required key '{key}'" in message


def test_both_text_column_and_text_template_refused(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "text_template": "{title} {brand}"})
    assert "text_column" in message and "text_template" in message


def test_neither_text_column_nor_text_template_refused(tmp_path: Path) -> None:
    spec = {k: v for k, v in BASE.items() if k != "text_column"}
    message = job_error(tmp_path, spec)
    assert "text_column" in message and "text_template" in message


def test_text_template_alone_is_accepted(tmp_path: Path) -> None:
    spec = {k: v for k, v in BASE.items() if k != "text_column"}
    job = load_job(write(tmp_path, {**spec, "text_template": "{title} ({brand})"}))
    assert job.text_column is None
    assert job.text_template == "{title} ({brand})"


def test_both_labels_and_labels_file_refused(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "labels_file": "labels.txt"})
    assert "'labels'" in message and "'labels_file'" in message


def test_neither_labels_nor_labels_file_refused(tmp_path: Path) -> None:
    spec = {k: v for k, v in BASE.items() if k != "labels"}
    message = job_error(tmp_path, spec)
    assert "'labels'" in message and "'labels_file'" in message


def test_labels_max_depth_without_taxonomy_paths_refused(tmp_path: Path) -> None:
    from pipeline.errors import LabelsError
    from pipeline.tasks.classify import ClassifySettings, ClassifyTask

    with pytest.raises(LabelsError, match="labels_max_depth and assign need taxonomy paths"):
        ClassifyTask(ClassifySettings(labels=["Tea", "Coffee"], labels_max_depth=1))
    paths = ["Food > Tea", "Food > Coffee", "Home", "Home > Mugs"]
    assert ClassifyTask(ClassifySettings(labels=paths, labels_max_depth=1, assign="leaf")).labels == ["Home"]
    assert ClassifyTask(ClassifySettings(labels=paths, assign="leaf")).labels == [
        "Food > Tea", "Food > Coffee", "Home > Mugs"
    ]  # fmt: skip


def test_unknown_backend_is_named_with_the_known_ones(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "backend": "anthropic"})
    assert "backend" in message
    assert "'anthropic'" in message
    assert "fake" in message and "vllm" in message


def test_unknown_task_refused(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "task": "summarise"})
    assert "task" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("chunk_rows", 0), ("max_input_tokens", -1), ("labels_max_depth", 0)],
)
def test_out_of_range_values_refused(tmp_path: Path, key: str, value: int) -> None:
    spec = {**BASE, key: value}
    if key == "labels_max_depth":
        spec = {k: v for k, v in spec.items() if k != "labels"} | {"labels_file": "labels.txt"}
    message = job_error(tmp_path, spec)
    assert key in message


def test_out_of_range_nested_value_refused(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "engine": {"gpu_memory_utilization": 1.5}})
    assert "engine.gpu_memory_utilization" in message


def test_duplicate_keep_columns_refused(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**BASE, "keep_columns": ["title", "brand", "title"]})
    assert "keep_columns" in message and "title" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    message = job_error(tmp_path, text="input: [unclosed\noutput: x\n")
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["- input\n- output\n", "just a string\n", ""])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    message = job_error(tmp_path, text=text)
    assert "mapping" in message


def test_missing_job_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(JobFileError, match="not found") as info:
        load_job(path)
    assert str(path) in str(info.value)


def test_overrides_replace_top_level_keys(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, BASE), overrides={"chunk_rows": 7, "output": "elsewhere"})
    assert job.chunk_rows == 7
    assert job.output == "elsewhere"


def test_job_config_is_frozen(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, BASE))
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on a frozen model
        job.chunk_rows = 5  # type: ignore[misc]
    assert job.chunk_rows == 50_000


def test_shipped_job_files_load() -> None:
    root = Path(__file__).resolve().parents[1]
    jobs = sorted((root / "jobs").glob("**/*.yaml"))
    assert len(jobs) >= 8
    for path in jobs:
        job = load_job(path)
        task = job.task_settings
        assert (
            task.labels or task.labels_file
            if job.task == "classify"
            else job.task == "extract" and task.attributes
        )


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
VLLM = {**BASE, "backend": "vllm"}


@needs_vllm
def test_engine_passes_vllm_engine_args_through(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, {**VLLM, "engine": {"dtype": "float32", "block_size": 16}}))
    kwargs = job.backend_settings.engine_kwargs()
    assert kwargs["block_size"] == 16 and kwargs["dtype"] == "float32"


@needs_vllm
def test_a_key_that_is_no_engine_arg_is_named(tmp_path: Path) -> None:
    message = job_error(tmp_path, {**VLLM, "engine": {"blok_size": 16, "dtype": "float32"}})
    assert "unknown key 'engine.blok_size'" in message and "1 problem(s)" in message


@pytest.mark.parametrize("key", ["model", "logprobs_mode", "hf_token", "tokenizer"])
def test_engine_args_labelmill_sets_itself_are_refused(tmp_path: Path, key: str) -> None:
    message = job_error(tmp_path, {**VLLM, "engine": {key: "x"}})
    assert f"'{key}' can't be set here" in message


def test_passed_through_engine_args_are_part_of_the_identity() -> None:
    from pipeline.backends.vllm import EngineSettings, VllmBackend

    plain = VllmBackend.identity(EngineSettings())
    assert VllmBackend.identity(EngineSettings(gpu_memory_utilization=0.5, max_num_seqs=8)) == plain
    assert VllmBackend.identity(EngineSettings.model_construct(dtype="float16")) != plain
    passed = EngineSettings.model_construct(**EngineSettings().model_dump())
    object.__setattr__(passed, "__pydantic_extra__", {"kv_cache_dtype": "fp8"})
    assert VllmBackend.identity(passed) == {**plain, "kv_cache_dtype": "fp8"}


def test_each_backend_checks_only_its_own_section(tmp_path: Path) -> None:
    job = load_job(
        write(tmp_path, {**BASE, "backend": "openai", "api": {"base_url": "http://127.0.0.1:1/v1"}})
    )
    assert job.backend_settings.base_url == "http://127.0.0.1:1/v1"
    message = job_error(tmp_path, {**BASE, "backend": "openai"})
    assert "missing required key 'api.base_url'" in message
    message = job_error(tmp_path, {**BASE, "api": {"base_url": "x", "timeout": 3}})
    assert "unknown key 'api.timeout'" in message  # checked by its owner even when unused
