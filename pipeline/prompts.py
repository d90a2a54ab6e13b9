"""Prompt templates, rendered strictly.

A job's ``prompt:`` is a path to a template file, or the name of a built-in template
(``classify_product.en``: a file of ``prompts/`` in the repository, shipped with labelmill; see
``pipeline/resources.py``). A path that exists wins, so a local file can shadow a built-in name.

A template has a ``system`` message and a ``user`` message, written with ``{name}`` placeholders
(``{{`` and ``}}`` for literal braces). ``{text}`` (the row) must appear exactly once, in ``user``;
everything before it is the same for every row, so vLLM's prefix cache computes it once per batch.

Variables: ``text``, the task's own (classify: ``labels`` one ``- label`` per line,
``labels_inline`` comma separated, ``labels_max``; extract: ``attributes`` one line per attribute
with its type and allowed values, ``attribute_names``), and the job's ``prompt_vars``. A placeholder
with no value, or a ``prompt_vars`` key the template never uses, is an error naming it.

``{choices}``: the row's options, one ``- option`` per line, in the user message before ``{text}``.
Where rows each choose from a set of their own (classify with ``strategy: shortlist`` or
``hierarchical``) it is filled row by row, after the shared instructions; where all rows share the
label set (``strategy: flat``) it lists every label, the same for every row, so one template serves
every strategy.
"""

from __future__ import annotations

import difflib
import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import resources
from pipeline.errors import PromptError, yaml_position


class PromptTemplate(BaseModel):
    """The file format of ``prompts/*.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    language: str = "en"
    """ISO 639-1 code of the prompt's language (en, pl, ...)."""
    task: str = "classify"
    """The task the template is written for (its variables are that task's)."""
    system: str
    """Instructions and the label list: the shared prefix."""
    user: str
    """The per-row message; holds ``{text}``."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A template with everything but the row filled in."""

    system: str
    user_prefix: str
    user_suffix: str
    source: str
    choices_prefix: str | None = None
    """Templates with ``{choices}``: the user message before it (``user_prefix`` then follows the
    choices, up to the text)."""

    def messages(self, text: str, choices: Sequence[str] | None = None) -> list[dict[str, str]]:
        user = self.user_prefix + text + self.user_suffix
        if self.choices_prefix is not None:
            if choices is None:
                raise ValueError(f"{self.source} lists each row's choices: give them")
            user = self.choices_prefix + format_choices(choices) + user
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    @property
    def row_choices(self) -> bool:
        """Each row comes with its own choices (``{choices}`` in the user message)."""
        return self.choices_prefix is not None

    def user_messages(self, texts: pl.Series) -> pl.Series:
        """The user message of each text, as one column (what ``messages`` puts last)."""
        return pl.select(
            pl.concat_str([pl.lit(self.user_prefix), pl.lit(texts), pl.lit(self.user_suffix)])
        ).to_series()

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        parts = (self.system, self.user_prefix, self.user_suffix)
        for part in parts + ((self.choices_prefix,) if self.choices_prefix is not None else ()):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]


def locate(prompt: str | Path) -> Path:
    """The template file a job's ``prompt:`` names: the path itself when it exists, else the built-in
    template of that name."""
    path = Path(prompt)
    try:
        exists = path.exists()
    except OSError:  # e.g. a name too long for the file system: the read names the reason
        exists = True
    if exists:
        return path
    builtin = resources.builtin_prompt(str(prompt))
    if builtin is not None:
        return builtin
    raise PromptError(
        f"prompt template {prompt} not found: no such file, and no built-in template has that name",
        hint=_builtin_hint(),
    )


def _builtin_hint() -> str:
    return f"built-in templates (name them without a path): {', '.join(resources.prompt_names())}"


def load_template(path: str | Path) -> PromptTemplate:
    """Read and check a template file (or a built-in template by name). Errors name the file and a
    line, never the file's text: a job whose ``prompt:`` points at the wrong file (a key file,
    ``/etc/passwd``) must not copy it into a log."""
    path = locate(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptError(f"prompt template {path} not found", hint=_builtin_hint()) from None
    except OSError as exc:
        raise PromptError(
            f"prompt template {path} can't be read ({exc.strerror or type(exc).__name__})"
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PromptError(f"prompt template {path} is not UTF-8 text: line {line} ({exc.reason})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        where = yaml_position(exc)
        raise PromptError(
            f"prompt template {path} is not valid YAML{': ' + where if where else ''}"
        ) from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise PromptError(
            f"prompt template {path}: line {line}: expected keys (system:, user:, ...), found no mapping",
            hint=f"the built-in templates in {resources.data_root() / 'prompts'} show the format",
        )
    lines = {
        str(key.value): key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)
    }
    try:
        return PromptTemplate.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_template_problem(e, lines) for e in exc.errors())
        raise PromptError(f"prompt template {path}: {problems}") from None


def _template_problem(error: dict, lines: dict[str, int]) -> str:
    key = str(error["loc"][0]) if error["loc"] else ""
    at = f"line {lines[key]}: " if key in lines else ""
    if error["type"] == "missing":
        return f"missing key '{key}'"
    if error["type"] != "extra_forbidden":
        return f"{at}{key}: {error['msg']}"
    # An unknown key is named only when it is a misspelt known one: any other name is the file's
    # text, which may be anything.
    known = difflib.get_close_matches(key, PromptTemplate.model_fields, n=1, cutoff=0.8)
    if known:
        return f"{at}unknown key '{key}' (did you mean '{known[0]}'?)"
    return f"{at}unknown key (the keys are {', '.join(PromptTemplate.model_fields)})"


def format_choices(choices: Sequence[str]) -> str:
    """A row's options as ``{choices}`` shows them: one ``- option`` per line."""
    return "\n".join(f"- {choice}" for choice in choices)


def render(path: str | Path, task, prompt_vars: dict[str, str]) -> RenderedPrompt:
    """Fill a template's shared part with the task's variables; the row goes in through ``messages``.
    ``path`` is a template file or a built-in template's name. ``task.row_choices`` (where a task
    has it) says its rows each choose among options of their own: the template must then show
    them with ``{choices}``, and can't list a label set shared by all rows."""
    path = locate(path)
    template = load_template(path)
    if template.task != task.name:
        raise PromptError(
            f"{path} is a template for task '{template.task}', but the job's task is '{task.name}'",
            hint=f"pick a template written for this task; {_builtin_hint()}",
        )
    builtins = task.prompt_values(template.language)
    values = {**builtins, **prompt_vars}
    clash = sorted(set(prompt_vars) & (set(builtins) | {"text", "choices"}))
    if clash:
        raise PromptError(f"prompt_vars may not redefine built-in variables: {clash}")
    system_fields = _fields(template.system, path, "system")
    user_fields = _fields(template.user, path, "user")
    if "text" in system_fields:
        raise PromptError(
            f"{path}: {{text}} is in the system message",
            hint="put the row text in the user message, after the shared instructions",
        )
    if user_fields.count("text") != 1:
        raise PromptError(f"{path}: the user message must contain {{text}} exactly once")
    row_choices = getattr(task, "row_choices", False)
    _check_choices(path, task, row_choices, system_fields, user_fields)
    if not row_choices and "labels" in builtins:
        values["choices"] = builtins["labels"]
    used = set(system_fields) | set(user_fields)
    missing = sorted(used - set(values) - {"text"} - ({"choices"} if row_choices else set()))
    if missing:
        raise PromptError(
            f"{path}: template variable(s) {missing} have no value",
            hint="add them under prompt_vars: in the job file, or fix the placeholder's spelling",
        )
    unused = sorted(set(prompt_vars) - used)
    if unused:
        raise PromptError(f"prompt_vars {unused} are not used by {path}")
    # Split the user message at the {text} placeholder itself, not at a literal "{{text}}".
    head: list[str] = []
    before: list[str] = []
    after: list[str] = []
    side = before
    for literal, name, _, _ in string.Formatter().parse(template.user):
        side.append(literal)
        if name == "text":
            side = after
        elif name == "choices" and row_choices:
            head, side = before, []
            before = side
        elif name is not None:
            side.append(values[name])
    choices_prefix = "".join(head).lstrip() if row_choices else None
    return RenderedPrompt(
        system=template.system.format_map(values).strip(),
        user_prefix="".join(before) if choices_prefix is not None else "".join(before).lstrip(),
        user_suffix="".join(after).rstrip(),
        source=str(path),
        choices_prefix=choices_prefix,
    )


def _check_choices(path, task, row_choices: bool, system_fields: list[str], user_fields: list[str]) -> None:
    """``{choices}`` where, and only where, each row has its own options."""
    why = getattr(task, "row_choices_why", "each row has its own options")
    if "choices" in system_fields:
        raise PromptError(
            f"{path}: {{choices}} is in the system message",
            hint="each row's options go in the user message, before {text}",
        )
    if not row_choices:  # every row has the same options: {choices} lists them all (``labels``)
        return
    shared = sorted({"labels", "labels_inline"} & set(system_fields + user_fields))
    if shared:
        raise PromptError(
            f"{path} lists the whole label set ({{{shared[0]}}}), but {why}",
            hint="use a template that shows each row's options with {choices} in the user message, "
            "before {text} (built-in: classify_product_choices.en, classify_product_choices.pl, "
            "classify_keyword_choices.en)",
        )
    if user_fields.count("choices") != 1 or user_fields.index("choices") > user_fields.index("text"):
        raise PromptError(
            f"{path}: {why}, so the user message must show them with {{choices}} once, before {{text}}",
            hint="built-in templates that do: classify_product_choices.en, classify_product_choices.pl, "
            "classify_keyword_choices.en",
        )


def _fields(text: str, path: str | Path, part: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise PromptError(f"{path}: {part} message: {exc} (write {{{{ and }}}} for literal braces)") from None
    fields = []
    line = 1
    for literal, name, spec, conversion in parsed:
        line += literal.count("\n")
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            # Named by its position: what sits between the braces may be anything.
            raise PromptError(
                f"{path}: {part} message, line {line} of the message: a placeholder must be a plain "
                f"name like {{labels}} (no index, format spec or conversion)"
            )
        fields.append(name)
    return fields
