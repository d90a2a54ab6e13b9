"""A job's plan: everything that can be checked and decided before a model loads.

    inputs (files, row counts, footer hashes) -> columns and their types -> ids unique
    task (its settings, labels or attributes) -> prompt rendered with the task's variables
    model resolved (a local folder for backends that load weights) -> output schema
    chunk plan -> fingerprint of everything that decides the output -> the run manifest

``labelmill validate``, ``run``, ``export``, ``import`` and ``bench`` all start here, so a bad job
fails the same way in each, before any model work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from pipeline import __version__, plugins, storage
from pipeline.backends.base import Backend
from pipeline.cache import mirror_root
from pipeline.config import JobConfig
from pipeline.contracts import COMMON_FIELDS, Request, route_fields
from pipeline.errors import ConfigError, InputFormatError
from pipeline.io import (
    Chunk,
    InputFile,
    check_columns,
    check_ids,
    open_inputs,
    plan_chunks,
    with_types,
)
from pipeline.models import labelmill_home, model_fingerprint, resolve_model
from pipeline.prompts import RenderedPrompt, render
from pipeline.runfolder import Manifest
from pipeline.storage import ObjectPath
from pipeline.tasks.base import Task
from pipeline.text import text_columns

GENERATED_ID = "row_id"
# Tokens kept free between the prompt and the context limit: a cut text can re-tokenise a little
# longer where it joins the template.
_TOKEN_MARGIN = 8


@dataclass
class EscalationPlan:
    """The second backend of ``escalate:``: its class, its model, the task as that backend asks
    it (a backend that can't score labels generates them), and its answer store's key."""

    backend_class: type[Backend]
    task: Task
    model: str
    settings: object
    namespace: str

    @property
    def request(self) -> Request:
        return self.task.request()


@dataclass
class Plan:
    job: JobConfig
    task: Task
    backend_class: type[Backend]
    prompt: RenderedPrompt
    model: str
    """What the backend loads or names: a local folder for backends that load weights."""
    files: list[InputFile]
    chunks: list[Chunk]
    id_column: str
    read_columns: list[str]
    schema: pa.Schema
    manifest: Manifest = field(repr=False)
    escalation: EscalationPlan | None = None

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def request(self) -> Request:
        return self.task.request()

    @property
    def namespace(self) -> str:
        """The answer stores' key for this job: everything besides the text that decides an
        answer (model, prompt, sampling, backend settings, the task's own, normalisation)."""
        c = self.manifest.components
        parts = [c[k] for k in ("model", "prompt", "sampling", self.backend_class.section) if k in c]
        parts += [c[self.task.fingerprint_part], self.job.task, self.job.dedupe.model_dump()]
        return digest(parts)


def plan_job(job: JobConfig, check_id_values: bool = True, batch_files: bool = False) -> Plan:
    """Everything that can be checked without a model; raises a LabelmillError on the first problem.
    ``batch_files``: the answers go through batch request files (``export``/``import``), which
    carry generated answers only."""
    files = open_inputs(job.input, labelmill_home() / "inputs")
    task = plugins.task_class(job.task)(job.task_settings, job.sampling)
    backend_class = plugins.backend_class(job.backend)
    if batch_files and getattr(task, "row_choices", False):
        raise ConfigError(
            f"batch files carry one label set for all rows, and {task.row_choices_why}",
            hint="run the job with labelmill run, or use strategy: flat",
        )
    task.use_backend(
        "batch files carry generated answers"
        if batch_files
        else backend_class.cannot_score(job.backend_settings)
    )
    prompt = render(job.prompt, task, job.prompt_vars)
    model = resolve_model(job.model) if backend_class.loads_weights else job.model
    text_cols = text_columns(job.text_column, job.text_template)
    id_cols = [job.id_column] if job.id_column else []
    read_columns = list(dict.fromkeys(id_cols + job.keep_columns + text_cols))
    types = check_columns(files, read_columns)
    files = with_types(files, types)
    for col in text_cols:
        if pa.types.is_nested(types[col]):
            raise InputFormatError(
                f"text column '{col}' is {types[col]}: a list, struct or map can't be read as text",
                hint="point text_column / text_template at a string column",
            )
    _check_cascade(job, task, batch_files)
    escalation = _escalation(job, prompt) if job.escalate is not None else None
    id_column = job.id_column or GENERATED_ID
    output_fields = (
        task.fields + COMMON_FIELDS + route_fields(job.cascade is not None, escalation is not None)
    )
    clash = {f.name for f in output_fields} | ({GENERATED_ID} if not job.id_column else set())
    bad = sorted(clash & set(job.keep_columns + id_cols))
    if bad:
        raise ConfigError(
            f"column(s) {bad} would clash with labelmill's output columns",
            hint="rename them in the input, or leave them out of keep_columns",
        )
    if job.id_column and check_id_values:
        check_ids(files, job.id_column)
    out_fields = [pa.field(id_column, types[job.id_column] if job.id_column else pa.string())]
    out_fields += [pa.field(c, types[c]) for c in job.keep_columns if c != job.id_column]
    schema = pa.schema(out_fields + output_fields)
    chunks = plan_chunks(files, job.chunk_rows)
    manifest = _manifest(
        job, task, backend_class, prompt, model, files, chunks, text_cols, id_column, escalation
    )
    return Plan(
        job, task, backend_class, prompt, model, files, chunks, id_column, read_columns, schema, manifest,
        escalation,
    )  # fmt: skip


def _check_cascade(job: JobConfig, task: Task, batch_files: bool) -> None:
    """A cascade and an escalation route single answers of a live backend."""
    for key in ("cascade", "escalate"):
        if getattr(job, key) is None:
            continue
        if not getattr(task, "single_label", False):
            raise ConfigError(
                f"{key}: routes rows by one label and its confidence, and task {job.task} "
                + ("gives several labels per row" if job.task == "classify" else "gives no single label"),
                hint=f"leave {key}: out, or label one label per row",
            )
        if batch_files:
            raise ConfigError(
                f"{key}: needs answers while the run goes, and batch files answer later",
                hint=f"run the job with labelmill run, or leave {key}: out",
            )
    if job.cascade is not None and not job.cache.enabled:
        raise ConfigError(
            "cascade: trains its student on the model's answers in the result cache, and cache.enabled "
            "is false",
            hint="turn the cache on (cache.enabled: true), or leave cascade: out",
        )


def _escalation(job: JobConfig, prompt: RenderedPrompt) -> EscalationPlan:
    esc = job.escalate
    backend_class = plugins.backend_class(esc.backend)
    settings = esc.backend_settings
    task = plugins.task_class(job.task)(job.task_settings, job.sampling)
    try:
        task.use_backend(backend_class.cannot_score(settings))
    except ConfigError as exc:
        raise ConfigError(f"escalate: {exc.message}", hint=exc.hint) from None
    model = resolve_model(esc.model) if backend_class.loads_weights else esc.model
    identity = backend_class.identity(settings, task.request())
    namespace = digest(
        [esc.backend, esc.model, model_fingerprint(model), identity, prompt.fingerprint, task.describe(),
         job.sampling.model_dump(), job.task, job.dedupe.model_dump()]
    )  # fmt: skip
    return EscalationPlan(backend_class, task, model, settings, namespace)


def _manifest(
    job, task, backend_class, prompt, model, files, chunks, text_cols, id_column, escalation=None
) -> Manifest:
    weights = model_fingerprint(model)
    answers_spec = task.describe()
    settings = job.backend_settings
    identity = backend_class.identity(settings, task.request())
    components = {
        "input": digest([f.identity for f in files]),
        "rows": digest([text_cols, job.text_template, job.id_column, job.keep_columns]),
        # Where answers are shared decides which answer a text gets when it has several (a cached
        # one, or a fresh one): switching mid-run would give one text two labels in one output.
        "answer_reuse": digest(
            {
                "cache": job.cache.enabled,
                "cache_path": _cache_place(job) if job.cache.enabled else None,
                "dedupe": job.dedupe.model_dump(),
            }
        ),
        task.fingerprint_part: digest(answers_spec),
        "prompt": prompt.fingerprint,
        "model": digest([job.backend, job.model, weights]),
        "sampling": digest(job.sampling.model_dump()),
        "chunking": digest([job.chunk_rows, job.max_input_tokens, job.task]),
    }
    if identity is not None:
        components[backend_class.section or job.backend] = digest(identity)
    # routing decides labels: a job with a cascade or an escalation is another job (a job without
    # them keeps the fingerprint it had before they existed)
    if job.cascade is not None:
        components["cascade"] = digest(job.cascade.model_dump(mode="json"))
    if escalation is not None:
        components["escalate"] = digest([escalation.namespace, job.escalate.model_dump(mode="json")])
    provenance = {
        "backend": job.backend,
        "model": job.model,
        "model_path": model,
        "model_fingerprint": weights,
        "prompt_file": job.prompt,
        "prompt_fingerprint": prompt.fingerprint,
        **answers_spec,
        "sampling": job.sampling.model_dump(),
    }
    if backend_class.section:
        provenance[backend_class.section] = backend_class.describe_settings(settings)
    return Manifest(
        labelmill_version=__version__,
        created_at=now(),
        fingerprint=digest(components),
        components=components,
        task=job.task,
        evaluation=task.evaluation,
        provenance=provenance,
        inputs=[f.identity for f in files],
        rows=sum(f.rows for f in files),
        chunks=len(chunks),
        chunk_rows=job.chunk_rows,
        id_column=id_column,
    )


def make_backend(plan: Plan) -> Backend:
    """The job's backend, not started: it starts on its first uncached text."""
    return plan.backend_class(plan.job.backend_settings, plan.model)


def make_escalation_backend(plan: Plan) -> Backend:
    """The ``escalate:`` backend, not started: it starts on the first row that goes to it."""
    esc = plan.escalation
    return esc.backend_class(esc.settings, esc.model)


def check_backend(plan: Plan, backend: Backend) -> None:
    """A backend handed in from outside (``run_job(..., backend=...)``) must be the job's: the
    same kind, model and settings, or the run folder would vouch for answers it did not get."""
    if backend.name != plan.job.backend or backend.model != plan.model:
        raise ConfigError(
            f"the backend given is {backend.name} with model {backend.model!r}, but the job asks for "
            f"{plan.job.backend} with {plan.model!r}",
            hint="build the backend from the job (pipeline.plan.make_backend), or change the job",
        )
    if backend.settings != plan.job.backend_settings:
        raise ConfigError(
            f"the {backend.name} backend given was built with other settings than the job's "
            f"{plan.backend_class.section or 'backend'} section",
            hint="give the job the settings the backend was built with",
        )


def text_budget(plan: Plan, backend: Backend) -> int | None:
    """Most tokens a row's text may have, or None for no limit.

    Raises ConfigError when the prompt and the longest answer alone don't fit the context. The
    vLLM backend knows its context before the engine starts (the model's ``config.json``), so
    ``labelmill validate`` and the plan of ``run`` refuse such a job without loading weights.
    """
    budgets = []
    if plan.job.max_input_tokens:
        budgets.append(plan.job.max_input_tokens)
    limit = backend.max_model_len
    if limit:
        overhead = prompt_overhead(plan, backend)
        answer = plan.request.max_tokens
        room = limit - overhead - answer - _TOKEN_MARGIN
        if room <= 0:
            source = getattr(backend, "max_model_len_source", None)
            hint = getattr(plan.task, "too_long_hint", None)
            raise ConfigError(
                f"the prompt alone takes {overhead} tokens and the answer up to {answer}, "
                f"which leaves no room for row text in the context of {limit} tokens"
                + (f" ({source})" if source else ""),
                hint=(hint() if hint else None)
                or "shorten the prompt (prompt_vars), the label list or the attributes, or raise "
                "max_model_len up to the model's own context (or pick a model with a longer one)",
            )
        budgets.append(room)
    return min(budgets) if budgets else None


def prompt_overhead(plan: Plan, backend: Backend) -> int:
    """Tokens of the prompt without the row's text: where rows show options of their own, with
    the longest options any row can be shown."""
    widest = getattr(plan.task, "widest_choices", None)
    if plan.prompt.row_choices and widest is not None:
        return backend.prompt_tokens(plan.prompt.messages("", widest()))
    return backend.prompt_tokens(plan.prompt.messages(""))


def cache_root(job: JobConfig) -> Path:
    """The result cache's local folder; for a cache in an object store, this machine's mirror of it
    (see ``pipeline.cache.MirroredCache``)."""
    remote = cache_remote(job)
    if remote is not None:
        return mirror_root(remote)
    return Path(job.cache.path) if job.cache.path else labelmill_home() / "cache"


def _cache_place(job: JobConfig) -> str:
    return str(cache_remote(job) or cache_root(job).resolve())


def cache_remote(job: JobConfig) -> ObjectPath | None:
    """The result cache's bucket prefix, when ``cache.path`` is an ``s3://`` or ``gs://`` URI."""
    path = job.cache.path
    return ObjectPath.parse(path) if path and storage.is_remote(path) else None


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
