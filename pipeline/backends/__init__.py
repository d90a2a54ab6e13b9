"""Backend registry: a name in the job file -> the class that serves it.

Classes are imported lazily, so choosing ``fake`` never imports vLLM or torch.
"""

from __future__ import annotations

import importlib

from pipeline.backends.base import Backend, Completion, Messages

BACKENDS: dict[str, str] = {
    "vllm": "pipeline.backends.vllm:VllmBackend",
    "openai": "pipeline.backends.openai:OpenAIBackend",
    "fake": "pipeline.backends.fake:FakeBackend",
}


def backend_class(name: str) -> type[Backend]:
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["BACKENDS", "Backend", "Completion", "Messages", "backend_class"]
