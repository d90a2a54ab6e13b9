"""Tasks: what is asked of the model for each row, and what the output columns are."""

from __future__ import annotations

from pipeline.config import JobConfig
from pipeline.labels import load_labels
from pipeline.tasks.base import STATUSES, Task


def make_task(job: JobConfig) -> Task:
    """The job's task, with its label set or attributes loaded and checked."""
    if job.task == "extract":
        from pipeline.tasks.extract import ExtractTask

        return ExtractTask(job.attributes or [], job.sampling.max_tokens)
    from pipeline.tasks.classify import ClassifyTask

    labels = load_labels(job.labels, job.labels_file, job.labels_max_depth)
    return ClassifyTask(labels, job.labels_max, job.sampling.max_tokens)


__all__ = ["STATUSES", "Task", "make_task"]
