"""`/v1/models`: the model catalog (llmstream/catalog.py) in OpenAI's list shape, with each
model's limits as vLLM reports them (`max_model_len`) plus `max_tokens`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmstream.catalog import ModelEntry

OWNER = "llmstream"


def model_card(entry: ModelEntry) -> dict[str, Any]:
    return {
        "id": entry.name,
        "object": "model",
        # OpenAI's creation time; the catalog knows when the model was last announced.
        "created": entry.announced_at_ms // 1000,
        "owned_by": OWNER,
        "max_model_len": entry.max_context or None,
        "max_tokens": entry.max_tokens or None,
        "version": entry.version,
    }


def model_list(entries: Sequence[ModelEntry]) -> dict[str, Any]:
    """`GET /v1/models`: the models served now (`Catalog.models(now)`)."""
    return {"object": "list", "data": [model_card(e) for e in entries]}
