"""Tasks: what is asked of the model for each row, and what the output columns are. ``base.py`` is
the interface; each task is a plugin (``pipeline/plugins.py``)."""
