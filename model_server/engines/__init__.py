"""Engine implementations. Each is imported only when a model uses it."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from model_server.engine import Engine
from model_server.errors import InvalidArgument
from model_server.types import ModelLimits

ENGINES: dict[str, tuple[str, str]] = {
    "synthetic": ("model_server.engines.synthetic", "SyntheticEngine"),
    "llamacpp": ("model_server.engines.llamacpp", "LlamaCppEngine"),
    "vllm": ("model_server.engines.vllm", "VllmEngine"),
}


def build_engine(kind: str, options: Mapping[str, Any], limits: ModelLimits) -> Engine:
    try:
        module_name, class_name = ENGINES[kind]
    except KeyError:
        raise InvalidArgument(
            "engine", f"unknown engine {kind!r}; use one of {sorted(ENGINES)}"
        ) from None
    cls = getattr(importlib.import_module(module_name), class_name)
    engine: Engine = cls(options, limits)
    return engine
