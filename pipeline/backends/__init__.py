"""Backends: where answers come from. ``base.py`` is the interface; each backend is a plugin
(``pipeline/plugins.py``), and its module is imported only when a job names it, so choosing
``fake`` never imports vLLM or torch."""
