"""Tasks and backends are plugins, found through Python entry points.

    [project.entry-points."labelmill.tasks"]
    classify = "pipeline.tasks.classify:ClassifyTask"

    [project.entry-points."labelmill.backends"]
    vllm = "pipeline.backends.vllm:VllmBackend"

labelmill's own tasks and backends are registered this way too (``pyproject.toml``), so an outside
package adds one exactly as they are added: a class and an entry point, with no file under
``pipeline/`` edited. The name in the job file (``task:``, ``backend:``) is the entry point's name.
A plugin's module is imported only when a job names it, so choosing ``fake`` never imports vLLM.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.backends.base import Backend
    from pipeline.tasks.base import Task

TASKS = "labelmill.tasks"
BACKENDS = "labelmill.backends"


def refresh() -> None:
    """Forget the plugins found so far: the next look-up reads the installed entry points again
    (after installing a plugin into a running process, or putting a distribution on the path)."""
    _scan.cache_clear()
    _load.cache_clear()


def registered(group: str) -> dict[str, EntryPoint]:
    """The plugins of ``group`` by name, read once per process (see :func:`refresh`)."""
    return dict(_scan(group))


@cache
def _scan(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        if ep.name in found and found[ep.name].value != ep.value:
            raise ConfigError(
                f"two plugins claim the {_kind(group)} name '{ep.name}': "
                f"{found[ep.name].value} and {ep.value}",
                hint="uninstall one of the packages that provide them",
            )
        found[ep.name] = ep
    if not found and group in (TASKS, BACKENDS):
        raise ConfigError(
            f"no {_kind(group)}s are registered: labelmill's own entry points are missing",
            hint="install labelmill (pip install -e . in a checkout) instead of running it from a bare copy",
        )
    return found


def task_class(name: str) -> type[Task]:
    from pipeline.tasks.base import Task

    return _load(TASKS, name, Task)


def backend_class(name: str) -> type[Backend]:
    from pipeline.backends.base import Backend

    return _load(BACKENDS, name, Backend)


def names(group: str) -> list[str]:
    return sorted(registered(group))


@cache
def _load(group: str, name: str, base: type):
    plugins = registered(group)
    if name not in plugins:
        raise ConfigError(
            f"unknown {_kind(group)} {name!r}; known: {', '.join(sorted(plugins))}",
            hint=f"a {_kind(group)} from another package needs that package installed",
        )
    try:
        cls = plugins[name].load()
    except Exception as exc:  # a broken plugin must not look like a broken job
        raise ConfigError(
            f"the {_kind(group)} plugin '{name}' ({plugins[name].value}) failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(
            f"the {_kind(group)} plugin '{name}' ({plugins[name].value}) is not a {base.__name__}"
        )
    if getattr(cls, "name", name) != name:
        raise ConfigError(
            f"the {_kind(group)} plugin registered as '{name}' calls itself '{cls.name}'",
            hint="register it under the name its class declares",
        )
    return cls


def _kind(group: str) -> str:
    return {TASKS: "task", BACKENDS: "backend"}.get(group, group)
