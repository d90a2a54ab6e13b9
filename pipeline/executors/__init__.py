"""Where a run's chunks are labelled: in the runner's own process (``local``, the default), or on
engine actors of a Ray cluster (``ray``, ``pipeline/executors/ray.py``)."""
