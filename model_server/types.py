"""Plain data shared by the engines, the generation core and the gRPC layer.

Nothing here imports gRPC or an engine library, so the core stays unit-testable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Finish(enum.Enum):
    """Why a generation ended (mirrors ``llmstream.v1.FinishReason``)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Sampling:
    """Validated sampling parameters (defaults as documented in common.proto)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class PromptInput:
    """Exactly one of the three forms is set (checked by validation)."""

    text: str | None = None
    chat: tuple[ChatTurn, ...] | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(slots=True)
class EngineRequest:
    """One sequence handed to an engine.

    ``request_id`` is unique inside the server (the caller's id plus a counter), so a
    worker that takes over a request may open a new stream while the old one is still being
    torn down.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    continuation_token_ids: list[int] = field(default_factory=list)
    priority: int = 0
    # time.monotonic() when the request was handed to the engine ("arrival").
    arrival: float = 0.0
    # Set by the engine when the sequence gets a decode slot.
    scheduled_at: float | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class EngineStep:
    """New tokens from an engine, possibly several merged when the consumer lagged.

    ``times`` holds the monotonic production time of each token (same length as
    ``token_ids``). ``finish`` is set on the last step of a sequence.
    """

    token_ids: list[int]
    times: list[float]
    logprobs: list[TokenLogprobs] | None = None
    finish: Finish | None = None
    message: str = ""
    # Monotonic time of the finish (for a cancellation without a token).
    finished_at: float | None = None

    def merge(self, later: EngineStep) -> None:
        """Append ``later`` (which must come after this step) in place."""
        self.token_ids.extend(later.token_ids)
        self.times.extend(later.times)
        if later.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(later.logprobs)
        if later.finish is not None:
            self.finish = later.finish
            self.message = later.message
            self.finished_at = later.finished_at


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Per-model limits; enforced by validation and admission before the engine sees a request."""

    max_concurrency: int = 4
    # Admitted requests waiting for a decode slot; beyond it: RESOURCE_EXHAUSTED.
    max_queue: int = 64
    max_context: int = 2048
    # Upper bound for GenerateStart.max_tokens.
    max_tokens: int = 1024
    # Used when GenerateStart.max_tokens is 0.
    default_max_tokens: int = 256
    # Longest wait for a decode slot before the request is refused with RESOURCE_EXHAUSTED.
    queue_timeout_s: float = 30.0
    # Wall-time limit of one generation (finish reason TIMEOUT); 0 disables it.
    request_timeout_s: float = 600.0
    # Prompt limits enforced before tokenization (bytes of text / chat content).
    max_prompt_bytes: int = 1 << 20
    max_stop_strings: int = 8
    max_stop_bytes: int = 256
