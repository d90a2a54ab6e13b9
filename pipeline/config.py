"""The job file: a typed model of ``jobs/*.yaml``.

A job file is flat YAML, but three owners validate it:

    the pipeline   input, output, columns, prompt, model, backend, sampling, dedupe, cache, chunking
                   (declared here)
    the task       its own top-level keys: ``labels``/``labels_file``/... for classify,
                   ``attributes`` for extract (declared by the task's ``Settings``)
    the backends   their sections: ``engine:`` (vllm), ``api:`` (openai), ``fake:`` (fake), each
                   declared by the backend's ``Settings``

Every field is documented where it is declared. Unknown keys are rejected with the key's name and
the file, so a typo (``chunk_row:``) never silently falls back to a default. A job may hold the
sections of several backends (a bench profile switches between them); each is checked by its owner,
and only the chosen backend's section is used. Relative paths are resolved against the current
working directory, the way a shell user reads them.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from datetime import date as _date
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from pipeline import plugins
from pipeline.contracts import Options, Sampling
from pipeline.dedupe import DedupeConfig
from pipeline.errors import ConfigError, JobFileError, yaml_position


class CacheConfig(Options):
    """The result cache shared by runs (see ``pipeline/cache.py``)."""

    enabled: bool = True
    """Reuse answers to texts already answered by the same model, prompt, labels and sampling.
    Off, the run keeps its answers in its own folder (``answers/``) until it is complete."""
    path: str | None = None
    """Cache folder. None: ``$LABELMILL_HOME/cache``."""


class CascadeConfig(Options):
    """A student that answers the rows it is sure of in the model's place (``pipeline/cascade.py``).

    The model labels a random sample of the input; a student trains on every answer the model
    gave this job (the result cache); a confidence threshold is chosen on sampled answers it did
    not train on, so that on the rows it accepts it agrees with the model at least
    ``target_agreement`` of the time with probability at least ``1 - delta``. The rest go to the
    model. A student that can't meet the target answers no row."""

    student: Literal["tfidf", "embeddings"] = "tfidf"
    """``tfidf``: character n-grams + logistic regression (no model to load). ``embeddings``:
    sentence vectors (``embedding_model``) + logistic regression."""
    embedding_model: str = "all-minilm-l6-v2"
    """The ``embeddings`` student's sentence-transformers model: an alias, folder or local id."""
    target_agreement: float = Field(default=0.95, gt=0, lt=1)
    """On the rows the student answers, how often it must give the model's label."""
    delta: float = Field(default=0.05, gt=0, lt=1)
    """Allowed chance that the agreement promise fails (the bound's error level)."""
    sample_rows: int = Field(default=300, ge=20)
    """Input rows drawn at random for the model to label before the student trains (their
    distinct texts; answers already in the cache cost nothing)."""
    holdout: float = Field(default=0.5, gt=0, lt=1)
    """Share of the sample's distinct texts kept out of training, to choose the threshold on."""
    retrain_growth: float = Field(default=0.25, ge=0)
    """A later run reuses the stored student until the job's cache holds this share more answers
    than it was trained on (0: train every run); then it samples and trains again."""
    max_training_texts: int = Field(default=200_000, gt=0)
    """Most cached answers the student trains on (a seeded random subset beyond it)."""
    seed: int = 0
    """Seeds the sample, the held-out split and the training subset."""


class EscalateConfig(Options):
    """A second backend asked again for the rows the first answered badly (``escalate:``).

    Written like a job's own backend keys: ``backend``, ``model`` and the backend's section
    (``api:``, ``engine:``, ``fake:``); the rule says which rows go."""

    backend: str
    model: str
    confidence_below: float | None = Field(default=None, gt=0, le=1)
    """Rows whose confidence from the first backend is under this value are asked again."""
    statuses: list[Literal["invalid", "error"]] = Field(default_factory=lambda: ["invalid"])
    """Rows with these statuses from the first backend are asked again (``invalid``: an answer
    outside the labels; ``error``: no answer after retries)."""
    sections: SerializeAsAny[Options] = Field(default_factory=Options)
    """The escalation backend's section, validated by that backend."""

    @model_validator(mode="before")
    @classmethod
    def _split_sections(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or "sections" in raw:
            return raw
        raw = dict(raw)
        owners = _section_owners()
        raw["sections"] = {k: raw.pop(k) for k in list(raw) if k in owners}
        return raw

    @field_validator("backend")
    @classmethod
    def _registered(cls, value: str) -> str:
        return registered(plugins.backend_class, value)

    @field_validator("sections", mode="before")
    @classmethod
    def _sections(cls, value: Any, info: ValidationInfo) -> Any:
        return backend_sections(value, info.data.get("backend"))

    @model_validator(mode="after")
    def _some_rule(self) -> EscalateConfig:
        if self.confidence_below is None and not self.statuses:
            raise ValueError("escalate needs a rule: confidence_below, statuses, or both")
        return self

    @property
    def backend_settings(self) -> Options:
        section = plugins.backend_class(self.backend).section
        found = getattr(self.sections, section, None) if section else None
        return found if found is not None else plugins.backend_class(self.backend).Settings()

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"sections"})
        data.update({k: v for k, v in self.sections.model_dump(mode="json").items() if v is not None})
        return data


class RayConfig(Options):
    """Where and how wide ``executor: ray`` runs (``pipeline/executors/ray.py``)."""

    address: str | None = None
    """The cluster to join: ``auto`` (the one this machine belongs to), ``127.0.0.1:6379``, or
    ``ray://head:10001``. None: start a Ray instance on this machine for the run."""
    engines: int = Field(default=1, ge=1)
    """Engine actors: each loads the backend once and labels the chunks it is given."""
    gpus_per_engine: float = Field(default=0.0, ge=0)
    """GPUs each engine actor reserves (1 for one vLLM engine per GPU; 0 on CPU machines)."""
    cpus_per_engine: float = Field(default=1.0, gt=0)
    """CPUs each engine actor reserves for its host-side work (read, normalise, parse, write)."""
    chunk_attempts: int = Field(default=3, ge=1)
    """Times a chunk is tried when the actor labelling it dies, before the run stops."""


class JobConfig(Options):
    """One labelling job: which rows, which task, which prompt, which model."""

    input: str
    """A Parquet file, a folder of Parquet files, or a glob (``data/*.parquet``)."""
    output: str
    """The run folder: parts, markers, manifest and summary are written there. ``{date}`` stands
    for the run's date (YYYY-MM-DD, local time, or ``--date``) and ``{job}`` for the job file's
    name, so a nightly job gets a folder per night: ``out/keywords/{date}``."""
    on_input_change: Literal["refuse", "restart"] = "refuse"
    """A fixed ``output:`` folder whose run was started on other input files (the export grew):
    ``refuse`` (exit 3, naming the change) or ``restart`` (label it again from the start there;
    the result cache answers every text it has seen, so only new texts reach the model). Any other
    change of the job is refused either way."""
    id_column: str | None = None
    """Input column with a unique id per row. Without it, ids are ``<file name>:<row number>``."""
    text_column: str | None = None
    """Input column holding the text to classify. Give this or ``text_template``."""
    text_template: str | None = None
    """Template over several columns, e.g. ``"{title} (brand: {brand})"``. Null fields render as
    empty text; a row whose fields are all null or blank is ``empty_input``."""
    keep_columns: list[str] = Field(default_factory=list)
    """Input columns copied to the output, types unchanged."""
    task: str = "classify"
    """What to do with each row: a registered task (``classify``: pick labels; ``extract``: fill
    attributes; others from installed plugins). Its own keys sit beside these ones."""
    prompt: str
    """A prompt template: a path to a YAML file, or a built-in template's name
    (``classify_product.en``), written for the job's task."""
    prompt_vars: dict[str, str] = Field(default_factory=dict)
    """Extra values for the template's own variables (e.g. ``shop: "a Polish pharmacy"``)."""
    model: str
    """A local checkpoint folder, a model alias from ``labelmill models list``, or a Hugging Face
    id (served from the local Hugging Face cache; nothing is downloaded by labelmill)."""
    backend: str = "vllm"
    """A registered backend: ``vllm`` (offline engine, settings in ``engine:``), ``openai`` (any
    OpenAI-compatible server, settings in ``api:``) or ``fake`` (deterministic test double, never a
    quality claim; settings in ``fake:``)."""
    sampling: Sampling = Field(default_factory=Sampling)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    executor: Literal["local", "ray"] = "local"
    """Where chunks are labelled: ``local`` (this process) or ``ray`` (engine actors on a Ray
    cluster, settings in ``ray:``). The output is the same either way; it is not part of the job's
    identity, so a run may be resumed on the other."""
    ray: RayConfig = Field(default_factory=RayConfig)
    cascade: CascadeConfig | None = None
    """A student answers the rows it is sure of, the model the rest (classify, one label)."""
    escalate: EscalateConfig | None = None
    """Rows the model answered under a confidence, or invalid, are asked again of a second backend."""
    chunk_rows: int = Field(default=50_000, gt=0)
    """Rows per chunk: the unit of reading, of one engine call, of one output part and of resume."""
    max_input_tokens: int | None = Field(default=None, gt=0)
    """Cap on a row's text length in tokens; longer text is cut and the row marked ``truncated``.
    The context length always applies as well."""
    task_settings: SerializeAsAny[Options] = Field(default_factory=Options)
    """The task's own keys, validated by the task (filled from the flat job file)."""
    sections: SerializeAsAny[Options] = Field(default_factory=Options)
    """The backend sections the file holds (at least the chosen backend's), each validated by
    its backend."""

    @model_validator(mode="before")
    @classmethod
    def _split_owners(cls, raw: Any) -> Any:
        """Hand the task's keys and the backends' sections to their owners."""
        if not isinstance(raw, dict) or "task_settings" in raw or "sections" in raw:
            return raw
        raw = dict(raw)
        try:
            own = set(plugins.task_class(raw.get("task", "classify")).Settings.model_fields)
        except ConfigError:
            # unknown task: its error is reported by the ``task`` field; keys of the known tasks
            # are set aside so they don't add "unknown key" noise
            own = set().union(*(keys for keys in _task_keys().values()))
        raw["task_settings"] = {k: raw.pop(k) for k in list(raw) if k in own}
        sections = _section_owners()
        raw["sections"] = {k: raw.pop(k) for k in list(raw) if k in sections}
        return raw

    @field_validator("task", "backend")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        return registered(plugins.task_class if info.field_name == "task" else plugins.backend_class, value)

    @field_validator("task_settings", mode="before")
    @classmethod
    def _task_settings(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, Options) or "task" not in info.data:
            return value if isinstance(value, Options) else Options()
        return plugins.task_class(info.data["task"]).Settings.model_validate(value)

    @field_validator("sections", mode="before")
    @classmethod
    def _sections(cls, value: Any, info: ValidationInfo) -> Any:
        return backend_sections(value, info.data.get("backend"))

    @model_validator(mode="after")
    def _one_text_source(self) -> JobConfig:
        if (self.text_column is None) == (self.text_template is None):
            raise ValueError("give exactly one of 'text_column' or 'text_template'")
        dupes = sorted({c for c in self.keep_columns if self.keep_columns.count(c) > 1})
        if dupes:
            raise ValueError(f"keep_columns lists {dupes} more than once")
        return self

    @property
    def name(self) -> str:
        return Path(self.output).name

    def section(self, name: str) -> Options | None:
        """A backend section of the file, validated; None if the file has none."""
        return getattr(self.sections, name, None)

    @property
    def backend_settings(self) -> Options:
        """The chosen backend's own settings."""
        section = plugins.backend_class(self.backend).section
        found = self.section(section) if section else None
        return found if found is not None else plugins.backend_class(self.backend).Settings()

    def to_dict(self) -> dict[str, Any]:
        """The job as its flat file form (what ``job.yaml`` in a run folder holds)."""
        data = self.model_dump(mode="json", exclude={"task_settings", "sections", "escalate"})
        if self.escalate is not None:
            data["escalate"] = self.escalate.to_dict()
        for key in ("cascade", "escalate"):
            if data.get(key) is None:
                data.pop(key, None)  # job files written before these keys keep their form
        if self.executor == "local" and self.ray == RayConfig():
            data.pop("executor", None)
            data.pop("ray", None)
        data.update(self.task_settings.model_dump(mode="json"))
        data.update({k: v for k, v in self.sections.model_dump(mode="json").items() if v is not None})
        return data

    def with_changes(self, **changes: Any) -> JobConfig:
        """The same job with some top-level keys of the flat form replaced (validated again)."""
        return JobConfig.model_validate({**self.to_dict(), **changes})


def load_job(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    sets: Sequence[str] = (),
    date: str | None = None,
) -> JobConfig:
    """Read and validate a job file. ``overrides`` replace top-level keys; ``sets`` are
    ``key=value`` strings (``--set``): a dotted key reaches into a section (``api.timeout_s=30``)
    and the value is read as YAML (``false``, ``8``, ``[a, b]``). ``date`` fills ``{date}`` in
    ``output:`` (default: today)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise JobFileError(f"job file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(f"cannot read job file {path}: {type(exc).__name__}") from None
    except yaml.YAMLError as exc:
        raise JobFileError(f"{path} is not valid YAML: {yaml_position(exc) or 'a syntax error'}") from None
    if not isinstance(raw, dict):
        raise JobFileError(f"{path} must hold a mapping of keys (input:, output:, ...)")
    raw.update(overrides or {})
    for item in sets:
        apply_set(raw, item)
    return parse_job(raw, str(path), date=date, job_name=path.stem)


def apply_set(raw: dict[str, Any], item: str) -> None:
    """One ``--set key=value``, applied to the flat job mapping in place."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise JobFileError(f"--set {item!r}: write it as key=value, e.g. --set chunk_rows=1000")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: taken as the string it is
    *parents, last = key.strip().split(".")
    target = raw
    for name in parents:
        inner = target.setdefault(name, {})
        if not isinstance(inner, dict):
            raise JobFileError(f"--set {key}: '{name}' is not a section of keys")
        target = inner
    target[last] = value


OUTPUT_FIELDS = ("date", "job")


def expand_output(output: str, date: str | None = None, job_name: str = "job") -> str:
    """``output:`` with ``{date}`` and ``{job}`` filled in and ``~`` expanded."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(output) if name is not None}
    except ValueError as exc:
        raise JobFileError(f"output: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = sorted(names - set(OUTPUT_FIELDS))
    if unknown:
        raise JobFileError(f"output: unknown placeholder(s) {unknown}; output may use {{date}} and {{job}}")
    if date is not None:
        try:
            _date.fromisoformat(date)
        except ValueError:
            raise JobFileError(f"--date {date!r}: write it as YYYY-MM-DD") from None
    filled = output.format(date=date or _date.today().isoformat(), job=job_name) if names else output
    return os.path.expanduser(filled)


def parse_job(
    raw: dict[str, Any], source: str = "job", *, date: str | None = None, job_name: str | None = None
) -> JobConfig:
    """Validate a job given as a mapping (the flat file form); ``source`` names it in errors.
    ``{date}`` and ``{job}`` in ``output:`` are filled in (see :func:`expand_output`)."""
    if isinstance(raw.get("output"), str):
        name = job_name or (Path(source).stem if source != "job" else "job")
        raw = {**raw, "output": expand_output(raw["output"], date, name)}
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise JobFileError(_explain(exc, source, raw.get("task", "classify"))) from None


def _explain(exc: ValidationError, source: str, task: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s) in the job file"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc[:1] in (["task_settings"], ["sections"]):
            loc = loc[1:]  # the owners' keys are top-level keys of the file
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _other_task(loc[0], task) if len(loc) == 1 else None
            note = (
                f"a key of task '{owner}', and this job's task is '{task}'"
                if owner
                else ("check the spelling; see README for the keys")
            )
            lines.append(f"  - unknown key '{where}' ({note})")
        elif err["type"] == "missing":
            lines.append(f"  - missing required key '{where}'")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def _other_task(key: str, task: str) -> str | None:
    return next((name for name, keys in _task_keys().items() if name != task and key in keys), None)


def _task_keys() -> dict[str, set[str]]:
    """Each loadable task's own keys (a plugin that fails to load is left out here)."""
    found = {}
    for name in plugins.names(plugins.TASKS):
        try:
            found[name] = set(plugins.task_class(name).Settings.model_fields)
        except ConfigError:
            continue
    return found


def _section_owners() -> dict[str, type]:
    """Section name -> the backend class that owns it, over every loadable backend."""
    owners = {}
    for name in plugins.names(plugins.BACKENDS):
        try:
            cls = plugins.backend_class(name)
        except ConfigError:
            continue  # a broken plugin only matters to the jobs that choose it
        if cls.section:
            owners[cls.section] = cls
    return owners


def registered(load, name: str) -> str:
    """``name`` when ``load`` (a plugin registry's lookup) finds it; the registry's reason as a
    validation error when not."""
    try:
        load(name)
    except ConfigError as exc:
        raise ValueError(exc.message) from None
    return name


def backend_sections(value: Any, backend: str | None) -> Options:
    """A mapping of backend sections validated by their owners, with the chosen backend's own
    section filled with its defaults (or its missing keys) where the file has none."""
    if isinstance(value, Options):
        return value
    value = dict(value or {})
    if backend is not None:
        section = plugins.backend_class(backend).section
        if section is not None:
            value.setdefault(section, {})
    return _sections_model().model_validate(value)


def _sections_model() -> type[Options]:
    return _sections_model_for(tuple(sorted((name, cls.Settings) for name, cls in _section_owners().items())))


@cache
def _sections_model_for(owners: tuple[tuple[str, type[Options]], ...]) -> type[Options]:
    # One model with an optional field per section, so pydantic reports a bad key with its full
    # path (``engine.dtyp``) and every problem of the file at once.
    fields: dict[str, Any] = {name: (settings | None, None) for name, settings in owners}
    return create_model("BackendSections", __base__=Options, **fields)
