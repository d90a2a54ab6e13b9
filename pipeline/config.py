"""The job file: a typed model of ``jobs/*.yaml``.

Every field is documented where it is declared. Unknown keys are rejected with the key's name and
the file, so a typo (``chunk_row:``) never silently falls back to a default. Relative paths are
resolved against the current working directory, the way a shell user reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import JobFileError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Strict):
    """vLLM engine settings (``vllm.LLM(...)`` keyword arguments). Ignored by the fake backend."""

    dtype: str = "auto"
    """Weights and activations dtype: auto, bfloat16, float16, float32. On CPUs without native
    bf16 instructions float32 is faster."""
    max_model_len: int | None = Field(default=None, gt=0)
    """Context length in tokens (prompt + answer). None = the model's own limit. Row text is
    truncated to fit, and the row marked ``truncated``."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of accelerator memory vLLM may take; on the CPU backend, the fraction of RAM of one
    NUMA node for the KV cache (0.3 is a safe value there)."""
    enforce_eager: bool = False
    """Skip torch.compile and CUDA graphs: faster start-up, slower decoding."""
    max_num_seqs: int | None = Field(default=None, gt=0)
    """Most sequences the engine schedules at once. None = vLLM's default."""
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    """Token budget of one engine step. None = vLLM's default."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of the shared prompt prefix (instructions + labels) across rows."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """Number of GPUs one model is split over."""
    quantization: str | None = None
    """vLLM quantization method (awq, gptq, fp8, ...), None = as the checkpoint says."""
    seed: int = 0
    """Engine random seed (only matters when sampling is not greedy)."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from its checkpoint to run."""
    load_format: str | None = None
    """vLLM weight loading (``auto``, ``safetensors``, ...). ``dummy`` gives random weights of the
    checkpoint's shape: for throughput benchmarks only, never for labels."""

    # Settings that can change what the model answers; the others only change speed or memory.
    OUTPUT_FIELDS: ClassVar[tuple[str, ...]] = (
        "dtype",
        "max_model_len",
        "quantization",
        "seed",
        "load_format",
    )


class SamplingConfig(_Strict):
    """How the answer is decoded. Greedy by default, so a rerun gives the same labels."""

    temperature: float = Field(default=0.0, ge=0)
    """0 = greedy (argmax at each step); above 0 samples from the label-constrained distribution."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    """Answer length cap. None = computed from the longest tokenised label, so no label is cut."""
    seed: int | None = None
    """Per-request seed for sampling (temperature > 0)."""


class ApiConfig(_Strict):
    """An OpenAI-compatible chat completions server (backend ``openai``)."""

    base_url: str
    """Up to and including ``/v1``, e.g. ``http://127.0.0.1:8000/v1`` or ``https://openrouter.ai/api/v1``."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the API key (never the key itself). None: no key."""
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    """Requests in flight at once."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Seconds to wait for one answer before it counts as a failed attempt."""
    max_retries: int = Field(default=5, ge=0, le=50)
    """Retries of a request after 429, 5xx, timeouts, dropped connections or garbled answers."""
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    """Client-side rate limits (estimated prompt tokens + answer budget per request)."""
    constraint: Literal["choice", "json_schema", "none"] = "choice"
    """How answers are held to the label set: ``choice`` (vLLM server's structured outputs),
    ``json_schema`` (OpenAI-style ``response_format`` with an enum; no confidence), ``none``
    (prompt only). Answers are validated against the labels in every case."""
    logprobs: bool = True
    """Ask for token logprobs, for the confidence column (servers that don't return them give null)."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Provider-specific fields merged into every request body."""

    @field_validator("extra_body")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if any(word in key.lower() for word in ("key", "token", "secret", "authorization")):
                raise ValueError(f"'{key}' looks like a credential; put it in an environment variable")
        return value


class DedupeConfig(_Strict):
    """Which rows count as asking the same question (see ``pipeline/dedupe.py``)."""

    enabled: bool = True
    """Send each distinct (normalised) text of a chunk to the model once."""
    nfc: bool = True
    casefold: bool = True
    collapse_whitespace: bool = True


class CacheConfig(_Strict):
    """The result cache shared by runs (see ``pipeline/cache.py``)."""

    enabled: bool = True
    """Reuse answers to texts already answered by the same model, prompt, labels and sampling.
    Off, the run keeps its answers in its own folder (``answers/``) until it is complete."""
    path: str | None = None
    """Cache folder. None: ``$LABELMILL_HOME/cache``."""


class FakeConfig(_Strict):
    """Settings of the ``fake`` test-double backend."""

    seconds_per_row: float = Field(default=0.0, ge=0)
    """Sleep this long per row, to make progress and crash tests observable."""


class AttributeSpec(_Strict):
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


class JobConfig(_Strict):
    """One labelling job: which rows, which labels, which prompt, which model."""

    input: str
    """A Parquet file, a folder of Parquet files, or a glob (``data/*.parquet``)."""
    output: str
    """The run folder: parts, markers, manifest and summary are written there."""
    id_column: str | None = None
    """Input column with a unique id per row. Without it, ids are ``<file name>:<row number>``."""
    text_column: str | None = None
    """Input column holding the text to classify. Give this or ``text_template``."""
    text_template: str | None = None
    """Template over several columns, e.g. ``"{title} (brand: {brand})"``. Null fields render as
    empty text; a row whose fields are all null or blank is ``empty_input``."""
    keep_columns: list[str] = Field(default_factory=list)
    """Input columns copied to the output, types unchanged."""
    task: Literal["classify", "extract"] = "classify"
    """What to do with each row. ``classify``: pick a label from ``labels``; ``extract``: fill the
    declared ``attributes``."""
    labels: list[str] | None = None
    """The label set. Give this or ``labels_file``."""
    labels_file: str | None = None
    """Labels from a file: one per line (``#`` comments allowed), or a Shopify taxonomy
    ``categories.txt`` (``gid://... : A > B > C``), where each label is the full path."""
    labels_max_depth: int | None = Field(default=None, ge=1)
    """For taxonomy files: keep categories at most this deep (1 = top level only)."""
    labels_max: int | None = Field(default=None, ge=2)
    """Multi-label classification: up to this many labels per row (output column ``labels``)."""
    attributes: list[AttributeSpec] | None = None
    """For ``task: extract``: the attributes to fill, each an output column."""
    prompt: str
    """Path to a prompt template (YAML) under ``prompts/``."""
    prompt_vars: dict[str, str] = Field(default_factory=dict)
    """Extra values for the template's own variables (e.g. ``shop: "a Polish pharmacy"``)."""
    model: str
    """A local checkpoint folder, a model alias from ``labelmill models list``, or a Hugging Face
    id (served from the local Hugging Face cache; nothing is downloaded by labelmill)."""
    backend: str = "vllm"
    """``vllm`` (offline engine), ``openai`` (any OpenAI-compatible server, see ``api``) or ``fake``
    (deterministic test double, never a quality claim)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    fake: FakeConfig = Field(default_factory=FakeConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    api: ApiConfig | None = None
    """Server settings for ``backend: openai``."""
    chunk_rows: int = Field(default=50_000, gt=0)
    """Rows per chunk: the unit of reading, of one engine call, of one output part and of resume."""
    max_input_tokens: int | None = Field(default=None, gt=0)
    """Cap on a row's text length in tokens; longer text is cut and the row marked ``truncated``.
    The context length always applies as well."""

    @field_validator("keep_columns")
    @classmethod
    def _unique_keep(cls, value: list[str]) -> list[str]:
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"lists {dupes} more than once")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from pipeline.backends import BACKENDS

        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; known: {', '.join(sorted(BACKENDS))}")
        return value

    @model_validator(mode="after")
    def _one_of_each(self) -> JobConfig:
        if (self.text_column is None) == (self.text_template is None):
            raise ValueError("give exactly one of 'text_column' or 'text_template'")
        if self.task == "classify":
            if (self.labels is None) == (self.labels_file is None):
                raise ValueError("give exactly one of 'labels' or 'labels_file'")
            if self.attributes is not None:
                raise ValueError("'attributes' belong to task: extract")
        else:
            if not self.attributes:
                raise ValueError("task: extract needs a non-empty 'attributes' list")
            if self.labels is not None or self.labels_file is not None or self.labels_max is not None:
                raise ValueError("task: extract takes 'attributes', not labels")
            names = [a.name for a in self.attributes]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"attributes {dupes} are declared more than once")
        if self.backend == "openai" and self.api is None:
            raise ValueError("backend 'openai' needs an 'api:' section with at least base_url")
        if self.labels_max_depth is not None and self.labels_file is None:
            raise ValueError("'labels_max_depth' applies to 'labels_file' only")
        return self

    @property
    def name(self) -> str:
        return Path(self.output).name


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read and validate a job file; ``overrides`` replace top-level keys (from the CLI)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise JobFileError(f"job file {path} not found") from None
    except yaml.YAMLError as exc:
        raise JobFileError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise JobFileError(f"{path} must hold a mapping of keys (input:, output:, ...)")
    raw.update(overrides or {})
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise JobFileError(_explain(exc, path)) from None


def _explain(exc: ValidationError, path: Path) -> str:
    lines = [f"{path}: {exc.error_count()} problem(s) in the job file"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{where}' (check the spelling; see README for the keys)")
        elif err["type"] == "missing":
            lines.append(f"  - missing required key '{where}'")
        else:
            lines.append(f"  - {where}: {err['msg']}")
    return "\n".join(lines)
