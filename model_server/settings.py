"""The models config file (YAML) -> ``ModelSpec``s.

Format (docs/model_server.md)::

    defaults:              # optional: limits applied to every model
      max_queue: 64
    models:
      - name: smollm2
        engine: llamacpp
        version: q4_1      # optional label; default derived from the weights
        limits: {max_concurrency: 2, max_context: 2048, max_tokens: 512}
        options: {instances: 2, n_threads: 1}
      - name: synthetic
        engine: synthetic
        options: {ttft_ms: 20, itl_ms: 10}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from model_server.engines import ENGINES
from model_server.registry import ModelSpec
from model_server.types import ModelLimits

LIMIT_FIELDS = {f.name: f.type for f in dataclasses.fields(ModelLimits)}


class ModelsConfigError(ValueError):
    """The models config is unusable; the message names the entry and key."""


def limits_from(data: Mapping[str, Any], base: ModelLimits, where: str) -> ModelLimits:
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in LIMIT_FIELDS:
            raise ModelsConfigError(
                f"{where}: unknown limit {key!r}; known: {sorted(LIMIT_FIELDS)}"
            )
        kind = float if LIMIT_FIELDS[key] == "float" else int
        try:
            changes[key] = kind(value)
        except (TypeError, ValueError):
            raise ModelsConfigError(f"{where}.{key}: {value!r} is not a number") from None
        if changes[key] < 0:
            raise ModelsConfigError(f"{where}.{key}: must not be negative")
    limits = dataclasses.replace(base, **changes)
    if limits.max_concurrency < 1:
        raise ModelsConfigError(f"{where}.max_concurrency: must be >= 1")
    if limits.default_max_tokens > limits.max_tokens:
        limits = dataclasses.replace(limits, default_max_tokens=limits.max_tokens)
    return limits


def parse_models(data: Any, base: ModelLimits) -> list[ModelSpec]:
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), list):
        raise ModelsConfigError("expected a mapping with a `models:` list")
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise ModelsConfigError(f"unknown top-level keys: {sorted(unknown)}")
    defaults = limits_from(data.get("defaults") or {}, base, "defaults")
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(data["models"]):
        where = f"models[{i}]"
        if not isinstance(entry, Mapping):
            raise ModelsConfigError(f"{where}: expected a mapping")
        unknown = set(entry) - {"name", "engine", "version", "limits", "options"}
        if unknown:
            raise ModelsConfigError(f"{where}: unknown keys {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ModelsConfigError(f"{where}.name: required")
        if name in seen:
            raise ModelsConfigError(f"{where}.name: {name!r} appears twice")
        seen.add(name)
        engine = entry.get("engine")
        if engine not in ENGINES:
            raise ModelsConfigError(f"{where}.engine: must be one of {sorted(ENGINES)}")
        options = entry.get("options") or {}
        if not isinstance(options, Mapping):
            raise ModelsConfigError(f"{where}.options: expected a mapping")
        version = entry.get("version")
        specs.append(
            ModelSpec(
                name=name,
                engine=engine,
                version=str(version) if version is not None else None,
                limits=limits_from(entry.get("limits") or {}, defaults, f"{where}.limits"),
                options=dict(options),
            )
        )
    if not specs:
        raise ModelsConfigError("`models:` is empty")
    return specs


def load_models_file(path: str | Path, base: ModelLimits) -> list[ModelSpec]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ModelsConfigError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ModelsConfigError(f"{path}: invalid YAML: {exc}") from None
    try:
        return parse_models(data, base)
    except ModelsConfigError as exc:
        raise ModelsConfigError(f"{path}: {exc}") from None
