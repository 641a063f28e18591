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
    # Compacted (cleanup.policy=compact): Kafka keeps the last record per key instead of
    # deleting by age; for state topics (the model catalog), not event history.
    compacted: bool = False


def prompts() -> str:
    return config.get("TOPIC_PROMPTS")


def tokens() -> str:
    return config.get("TOPIC_TOKENS")


def dlq() -> str:
    return config.get("TOPIC_DLQ")


def models() -> str:
    return config.get("TOPIC_MODELS")


def specs() -> list[TopicSpec]:
    """The topics `llmstream infra up` creates, as configured by LLMSTREAM_* variables."""
    result = []
    for name, setting, carries, compacted in (
        (prompts(), "PROMPTS_PARTITIONS", "submitted, cancel_requested", False),
        (tokens(), "TOKENS_PARTITIONS", "started, token_delta, completed, failed", False),
        (dlq(), "DLQ_PARTITIONS", "records no consumer could decode, reason in headers", False),
        (models(), "MODELS_PARTITIONS", "model catalog: ModelAnnounced per model name", True),
    ):
        partitions = config.get_int(setting)
        if partitions < 1:
            raise config.ConfigError(
                f"{config.PREFIX}{setting}={partitions} is not a partition count (use 1 or more)"
            )
        result.append(TopicSpec(name, partitions, setting, carries, compacted))
    return result
