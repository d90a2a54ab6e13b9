"""The files labelmill ships beside its code: prompt templates, the price table, backend profiles.

In the repository they sit at the top level, where people read and edit them::

    prompts/*.yaml    built-in prompt templates, named by file name without ``.yaml``
                      (``prompt: classify_product.en`` in a job file)
    prices.yaml       the default price table (``pipeline/costs.py``)
    backends.yaml     the default backend profiles of ``labelmill bench``

``pyproject.toml`` maps that top level onto ``pipeline/_builtin/`` in the wheel (setuptools
``package-dir``), so an installed labelmill reads its own copies, found through
:mod:`importlib.resources`. A checkout has no ``_builtin`` folder, and setuptools' editable
install does not map one in (its finder can't place a folder from outside ``pipeline/`` inside
it), so a checkout reads its own top level, and an edit there takes effect without reinstalling.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from pipeline.errors import ConfigError

PROMPT_SUFFIX = ".yaml"


@cache
def data_root() -> Path:
    """The folder holding ``prompts/``, ``prices.yaml`` and ``backends.yaml``."""
    shipped = files("pipeline").joinpath("_builtin")
    # Real files, not just readable resources: errors and run.json name the file a job used.
    if isinstance(shipped, Path) and shipped.is_dir():
        return shipped
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "prompts").is_dir():
        return checkout
    raise ConfigError(
        "labelmill's built-in files (prompt templates, prices.yaml, backends.yaml) are missing",
        hint="reinstall labelmill from its wheel, or run it from a complete checkout",
    )


def prompt_names() -> list[str]:
    """The names of the built-in prompt templates, sorted."""
    return sorted(p.name.removesuffix(PROMPT_SUFFIX) for p in (data_root() / "prompts").glob("*.yaml"))


def builtin_prompt(name: str) -> Path | None:
    """The built-in template called ``name``, or None when there is none by that name."""
    # Looked up among the names rather than joined onto the folder, so "../x" names nothing.
    if name not in prompt_names():
        return None
    return data_root() / "prompts" / f"{name}{PROMPT_SUFFIX}"


def price_table() -> Path:
    """The price table ``labelmill bench`` uses when none is given."""
    return data_root() / "prices.yaml"


def backend_profiles() -> Path:
    """The backend profiles ``labelmill bench`` uses when none are given."""
    return data_root() / "backends.yaml"
