"""Topic names and their layout (partitions, retention, what each carries)."""

from __future__ import annotations

from dataclasses import dataclass

from llmstream import config


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    partitions_setting: str  # the LLMSTREAM_* variable that sets `partitions`
    carries: str


def prompts() -> str:
    return config.get("TOPIC_PROMPTS")


def tokens() -> str:
    return config.get("TOPIC_TOKENS")


def dlq() -> str:
    return config.get("TOPIC_DLQ")


def specs() -> list[TopicSpec]:
    """The topics `llmstream infra up` creates, as configured by LLMSTREAM_* variables."""
    result = []
    for name, setting, carries in (
        (prompts(), "PROMPTS_PARTITIONS", "submitted, cancel_requested"),
        (tokens(), "TOKENS_PARTITIONS", "started, token_delta, completed, failed"),
        (dlq(), "DLQ_PARTITIONS", "records no consumer could decode, reason in headers"),
    ):
        partitions = config.get_int(setting)
        if partitions < 1:
            raise config.ConfigError(
                f"{config.PREFIX}{setting}={partitions} is not a partition count (use 1 or more)"
            )
        result.append(TopicSpec(name, partitions, setting, carries))
    return result
