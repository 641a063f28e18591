"""What the admin RPC may ask for: the engine options and limits a `LoadModel` call may set.

The models file and the command line are the operator's and are trusted as they are; a
`LoadModel` call comes over the network, so its options are checked against an allow-list per
engine (docs/model_server.md, "Admin RPC"): unknown keys, wrong types and out-of-range values
are refused with INVALID_ARGUMENT naming the option, weights must come from an allowed
directory (or be a model the server was started with), and vLLM's `engine_args` takes only a
documented handful of keys (never `trust_remote_code`). Pure: no gRPC, only `realpath`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_server.errors import InvalidArgument
from model_server.types import ModelLimits

Check = Callable[[Any, "AdminPolicy", str], Any]


@dataclass(frozen=True)
class AdminPolicy:
    """Bounds of what `LoadModel` may load."""

    # Weights (llama.cpp `model_path`, vLLM `model`/`tokenizer`) must resolve inside one of
    # these directories (symlinks followed), or be one of `known_models`.
    model_dirs: tuple[Path, ...] = ()
    # Models the server was started with (paths or vLLM model names): always allowed again,
    # so a hot swap of a configured model needs no directory.
    known_models: frozenset[str] = field(default_factory=frozenset)
    # llama.cpp instances (one KV cache and one decoding thread each).
    max_instances: int = 16
    # Sequences at once and waiting requests of one model (all engines).
    max_concurrency: int = 1024
    max_queue: int = 65536


def _number(kind: type[int] | type[float], low: float, high: float) -> Check:
    def check(value: Any, policy: AdminPolicy, where: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(where, f"must be a number, got {value!r}")
        if kind is int and value != int(value):
            raise InvalidArgument(where, f"must be a whole number, got {value!r}")
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidArgument(where, f"must be in [{low:g}, {high:g}], got {value!r}")
        return kind(value)

    return check


def _bounded_by(attribute: str) -> Check:
    """A whole number from 1 to the policy's `attribute`."""

    def check(value: Any, policy: AdminPolicy, where: str) -> Any:
        return _number(int, 1, getattr(policy, attribute))(value, policy, where)

    return check


def _boolean(value: Any, policy: AdminPolicy, where: str) -> Any:
    if not isinstance(value, bool):
        raise InvalidArgument(where, f"must be true or false, got {value!r}")
    return value


def _choice(*allowed: Any) -> Check:
    def check(value: Any, policy: AdminPolicy, where: str) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # a Struct carries every number as a double
        if value not in allowed:
            raise InvalidArgument(where, f"must be one of {list(allowed)}, got {value!r}")
        return value

    return check


def _label(value: Any, policy: AdminPolicy, where: str) -> Any:
    if not isinstance(value, str) or not 0 < len(value) <= 128 or not value.isprintable():
        raise InvalidArgument(where, "must be a printable string of 1 to 128 characters")
    return value


def allowed_weights(value: str, policy: AdminPolicy) -> bool:
    """A configured model, or a path that resolves inside an allowed directory."""
    if value in policy.known_models:
        return True
    resolved = Path(os.path.realpath(value))
    return any(resolved.is_relative_to(d) for d in policy.model_dirs)


def _weights(value: Any, policy: AdminPolicy, where: str) -> Any:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(where, "must be a non-empty string")
    if not allowed_weights(value, policy):
        dirs = ", ".join(str(d) for d in policy.model_dirs) or "(none configured)"
        raise InvalidArgument(
            where,
            f"{value!r} is neither a model this server was started with nor inside an allowed "
            f"directory ({dirs}; LLMSTREAM_MODEL_SERVER_ADMIN_MODEL_DIRS)",
        )
    return value


# vLLM `engine_args` a LoadModel call may set (everything else, `trust_remote_code` first of
# all, stays the operator's: the models file).
VLLM_ENGINE_ARGS: dict[str, Check] = {
    "enable_prefix_caching": _boolean,
    "enable_chunked_prefill": _boolean,
    "max_num_batched_tokens": _number(int, 1, 1 << 20),
    "block_size": _choice(8, 16, 32, 64, 128),
    "swap_space": _number(float, 0, 64),
}


def _engine_args(value: Any, policy: AdminPolicy, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise InvalidArgument(where, "must be a mapping")
    return _checked(value, VLLM_ENGINE_ARGS, policy, where)


OPTIONS: dict[str, dict[str, Check]] = {
    "synthetic": {
        "ttft_ms": _number(float, 0, 60_000),
        "itl_ms": _number(float, 0, 60_000),
        "prefill_us_per_token": _number(float, 0, 1_000_000),
        "max_step_tokens": _number(int, 1, 4096),
        "slots": _bounded_by("max_concurrency"),
        "version": _label,
    },
    "llamacpp": {
        "model_path": _weights,
        "instances": _bounded_by("max_instances"),
        "n_threads": _number(int, 1, 64),
        "n_batch": _number(int, 1, 4096),
        "continuation_replay": _choice("exact", "batched"),
    },
    "vllm": {
        "model": _weights,
        "tokenizer": _weights,
        "revision": _label,
        "dtype": _choice("auto", "float32", "float16", "bfloat16"),
        "enforce_eager": _boolean,
        "seed": _number(int, 0, 2**31 - 1),
        "tensor_parallel_size": _number(int, 1, 64),
        "gpu_memory_utilization": _number(float, 0.01, 0.95),
        "kv_cache_memory_bytes": _number(int, 1 << 20, 1 << 40),
        "max_model_len": _number(int, 1, 1 << 20),
        "max_num_seqs": _bounded_by("max_concurrency"),
        "engine_args": _engine_args,
    },
}


def _checked(
    options: Mapping[str, Any], allowed: Mapping[str, Check], policy: AdminPolicy, where: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        check = allowed.get(key)
        if check is None:
            raise InvalidArgument(
                f"{where}.{key}",
                f"not allowed over the admin RPC; allowed: {', '.join(sorted(allowed))}",
            )
        out[key] = check(value, policy, f"{where}.{key}")
    return out


def check_options(engine: str, options: Mapping[str, Any], policy: AdminPolicy) -> dict[str, Any]:
    """The options of a `LoadModel` call, checked (numbers of the right kind), or
    InvalidArgument naming the first refused one (`options.engine_args.trust_remote_code`)."""
    return _checked(options, OPTIONS[engine], policy, "options")


LIMIT_BOUNDS: dict[str, tuple[str, float]] = {
    "max_concurrency": ("max_concurrency", 0),
    "max_queue": ("max_queue", 0),
    "max_context": ("", 1 << 20),
    "max_tokens": ("", 1 << 20),
    "default_max_tokens": ("", 1 << 20),
    "queue_timeout_s": ("", 3600.0),
    "request_timeout_s": ("", 86_400.0),
}


def check_limits(
    engine: str, limits: ModelLimits, options: Mapping[str, Any], policy: AdminPolicy
) -> None:
    """Limits within the policy. Where an engine sizes itself from `max_concurrency` (llama.cpp
    `instances`, synthetic `slots`, vLLM `max_num_seqs` when not given), that bound applies."""
    for name, (attribute, fixed) in LIMIT_BOUNDS.items():
        bound = getattr(policy, attribute) if attribute else fixed
        value = getattr(limits, name)
        if value > bound:
            raise InvalidArgument(f"limits.{name}", f"must be at most {bound:g}, got {value:g}")
    sizes_instances = engine == "llamacpp" and "instances" not in options
    if sizes_instances and limits.max_concurrency > policy.max_instances:
        raise InvalidArgument(
            "limits.max_concurrency",
            f"sizes the llama.cpp instances: must be at most {policy.max_instances}, "
            f"got {limits.max_concurrency}",
        )


def model_dirs(raw: str, default: Path) -> tuple[Path, ...]:
    """`LLMSTREAM_MODEL_SERVER_ADMIN_MODEL_DIRS` (comma-separated; empty: `default`), resolved."""
    parts = [p.strip() for p in raw.split(",") if p.strip()] or [str(default)]
    return tuple(Path(os.path.realpath(p)) for p in parts)


def known_models(specs: Iterable[Any]) -> frozenset[str]:
    """The weights of the models a server was started with (`ModelSpec`s)."""
    out: set[str] = set()
    for spec in specs:
        for key in ("model_path", "model", "tokenizer"):
            value = spec.options.get(key)
            if isinstance(value, str) and value:
                out.add(value)
    return frozenset(out)
