"""The admin RPC's pure parts: the LoadModel allow-list, bearer parsing, token files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from model_server.admin import (
    AdminTokenError,
    AdminTokens,
    bearer_token,
    parse_tokens,
    token_matches,
)
from model_server.admin_options import (
    AdminPolicy,
    check_limits,
    check_options,
    known_models,
    model_dirs,
)
from model_server.errors import InvalidArgument
from model_server.registry import ModelSpec
from model_server.types import ModelLimits


def refusal(engine: str, options: dict[str, Any], policy: AdminPolicy) -> str:
    with pytest.raises(InvalidArgument) as err:
        check_options(engine, options, policy)
    return str(err.value)


def test_vllm_engine_args_only_the_documented_keys(tmp_path: Path) -> None:
    policy = AdminPolicy(model_dirs=(tmp_path,))
    ok = check_options(
        "vllm",
        {
            "model": str(tmp_path),
            "engine_args": {"enable_prefix_caching": True, "block_size": 16.0},
        },
        policy,
    )
    assert ok["engine_args"] == {"enable_prefix_caching": True, "block_size": 16}
    message = refusal(
        "vllm", {"model": str(tmp_path), "engine_args": {"trust_remote_code": True}}, policy
    )
    assert message.startswith(
        "options.engine_args.trust_remote_code: not allowed over the admin RPC"
    )
    assert "enable_prefix_caching" in message  # says what is allowed
    assert refusal("vllm", {"model": str(tmp_path), "download_dir": "/"}, policy).startswith(
        "options.download_dir: not allowed"
    )
    assert refusal("vllm", {"model": "org/some-model"}, policy).startswith(
        "options.model: 'org/some-model'"
    )
    assert refusal("vllm", {"model": str(tmp_path), "gpu_memory_utilization": 1.5}, policy) == (
        "options.gpu_memory_utilization: must be in [0.01, 0.95], got 1.5"
    )


def test_model_path_inside_the_directories_only(tmp_path: Path) -> None:
    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "m.gguf").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"x")
    (allowed / "link.gguf").symlink_to(tmp_path / "secret")
    policy = AdminPolicy(model_dirs=(allowed,), known_models=frozenset({"/opt/boot.gguf"}))
    assert check_options("llamacpp", {"model_path": str(allowed / "m.gguf")}, policy)
    assert check_options("llamacpp", {"model_path": "/opt/boot.gguf"}, policy)  # started with it
    for path in (allowed / "link.gguf", allowed / ".." / "secret", Path("/etc/passwd")):
        assert refusal("llamacpp", {"model_path": str(path)}, policy).startswith(
            f"options.model_path: {str(path)!r} is neither"
        )
    assert refusal("llamacpp", {"model_path": 7}, policy) == (
        "options.model_path: must be a non-empty string"
    )


def test_numbers_are_typed_and_bounded() -> None:
    policy = AdminPolicy(max_instances=4)
    assert check_options("llamacpp", {"instances": 4.0, "n_batch": 64}, policy) == {
        "instances": 4,
        "n_batch": 64,
    }
    assert refusal("llamacpp", {"instances": 10000}, policy) == (
        "options.instances: must be in [1, 4], got 10000"
    )
    assert refusal("llamacpp", {"instances": 2.5}, policy) == (
        "options.instances: must be a whole number, got 2.5"
    )
    assert refusal("llamacpp", {"instances": True}, policy).startswith(
        "options.instances: must be a number"
    )
    assert refusal("synthetic", {"itl_ms": float("nan")}, policy).startswith(
        "options.itl_ms: must be in"
    )
    assert refusal("synthetic", {"fail_after": 1}, policy).startswith(
        "options.fail_after: not allowed"
    )
    assert refusal("llamacpp", {"continuation_replay": "fast"}, policy) == (
        "options.continuation_replay: must be one of ['exact', 'batched'], got 'fast'"
    )


def test_limits_bounded_and_llamacpp_instances_from_concurrency() -> None:
    policy = AdminPolicy(max_instances=4, max_concurrency=100)
    check_limits("llamacpp", ModelLimits(max_concurrency=4), {}, policy)
    check_limits("synthetic", ModelLimits(max_concurrency=100), {}, policy)
    with pytest.raises(InvalidArgument, match=r"^limits.max_concurrency: sizes the llama.cpp"):
        check_limits("llamacpp", ModelLimits(max_concurrency=5), {}, policy)
    check_limits("llamacpp", ModelLimits(max_concurrency=5), {"instances": 2}, policy)
    with pytest.raises(InvalidArgument, match=r"^limits.max_concurrency: must be at most 100"):
        check_limits("synthetic", ModelLimits(max_concurrency=101), {}, policy)
    with pytest.raises(InvalidArgument, match=r"^limits.request_timeout_s: must be at most 86400"):
        check_limits("synthetic", ModelLimits(request_timeout_s=1e9), {}, policy)


def test_model_dirs_and_known_models(tmp_path: Path) -> None:
    assert model_dirs("", tmp_path / "models") == ((tmp_path / "models").resolve(),)
    assert model_dirs(f" {tmp_path}/a , {tmp_path}/b", tmp_path) == (tmp_path / "a", tmp_path / "b")
    specs = [
        ModelSpec("a", "llamacpp", options={"model_path": "/w/a.gguf", "instances": 2}),
        ModelSpec("b", "vllm", options={"model": "org/b", "tokenizer": "org/tok"}),
        ModelSpec("c", "synthetic"),
    ]
    assert known_models(specs) == {"/w/a.gguf", "org/b", "org/tok"}


def test_bearer_parsing() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == b"abc"
    assert bearer_token((("authorization", "bearer  abc "),)) == b"abc"
    assert bearer_token((("authorization", "abc"),)) is None
    assert bearer_token((("authorization", "Bearer "),)) is None
    assert bearer_token((("x-other", "Bearer abc"),)) is None
    assert bearer_token(None) is None


def test_tokens_compare_and_files(tmp_path: Path) -> None:
    tokens = parse_tokens("  first-token-0123456789 \n\nsecond-token-0123456789\n", "where")
    assert tokens == (b"first-token-0123456789", b"second-token-0123456789")
    assert token_matches(b"second-token-0123456789", tokens)
    assert not token_matches(b"second-token-012345678", tokens)
    with pytest.raises(AdminTokenError, match=r"^where: no admin token$"):
        parse_tokens(" \n", "where")
    with pytest.raises(AdminTokenError, match="shorter than 16 characters"):
        parse_tokens("short", "where")
    path = tmp_path / "tokens"
    with pytest.raises(AdminTokenError, match=r"ADMIN_TOKEN_FILE .*: No such file"):
        AdminTokens(file=str(path)).load()
    path.write_text("first-token-0123456789\n")
    source = AdminTokens(file=str(path))
    assert source.load() == (b"first-token-0123456789",)
    path.write_text("rotated-token-0123456789\n")
    assert source.load() == (b"rotated-token-0123456789",)
    assert AdminTokens(value="value-token-0123456789").load() == (b"value-token-0123456789",)
