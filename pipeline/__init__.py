"""labelmill: batch classification of Parquet rows with small open models on vLLM.

The Python API, for notebooks and schedulers::

    from pipeline import load_job, run_job

    job = load_job("jobs/products-oa-mine.yaml")
    summary = run_job(job)                    # runs or resumes; the summary is also in summary.json

``run_job`` takes a ``backend=`` (built for the job by ``pipeline.plan.make_backend``, e.g. one
engine shared by several jobs) and a ``store=`` (``pipeline.cache.ResultCache``). Nothing heavy is
imported until one of these names is used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_job", "parse_job", "run_job"]
_LAZY = {"load_job": "pipeline.config", "parse_job": "pipeline.config", "run_job": "pipeline.runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
