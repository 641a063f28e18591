"""Topic names and their layout (partitions, retention, what each carries)."""

from __future__ import annotations

from dataclasses import dataclass

from llmstream import config


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int
    carries: str


def prompts() -> str:
    return config.get("TOPIC_PROMPTS")


def tokens() -> str:
    return config.get("TOPIC_TOKENS")


def dlq() -> str:
    return config.get("TOPIC_DLQ")


def specs() -> list[TopicSpec]:
    """The topics `llmstream infra up` creates, as configured by LLMSTREAM_* variables."""
    retention = config.get_int("TOPIC_RETENTION_MS")
    return [
        TopicSpec(
            prompts(),
            config.get_int("PROMPTS_PARTITIONS"),
            retention,
            "submitted, cancel_requested",
        ),
        TopicSpec(
            tokens(),
            config.get_int("TOKENS_PARTITIONS"),
            retention,
            "started, token_delta, completed, failed",
        ),
        TopicSpec(dlq(), 3, retention, "records no consumer could decode, reason in headers"),
    ]
