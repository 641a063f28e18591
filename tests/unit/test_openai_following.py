"""One HTTP request following one generation (gateway/openai/following.py), in memory: a slow
reader is cut off at the send buffer; who is left to the grace period when the client goes
(foreground), who is not (background, draining, a snapshot that never followed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import pytest

from gateway.admission import Admitted
from gateway.auth import Principal
from gateway.metrics import GatewayMetrics
from gateway.openai.api_router import OpenAIRoutes
from gateway.openai.following import Following, Render
from gateway.openai.protocol import GenerationRequest
from gateway.openai.serving_chat import ChatCompletionStream
from gateway.quota import Limits
from gateway.router import Watch
from gateway.server import Parts
from gateway.settings import Settings

PRINCIPAL = Principal("t1", "k1", Limits("standard", 60, 10_000, 100_000, 4, 100, 8))
REQ = GenerationRequest(model="m", max_tokens=8, messages=(), stream=True)


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


@dataclass
class FakeFeed:
    followed: list[Watch] = field(default_factory=list)
    unfollowed: list[Watch] = field(default_factory=list)

    def follow(self, watch: Watch) -> None:
        self.followed.append(watch)

    def unfollow(self, watch: Watch) -> None:
        self.unfollowed.append(watch)


@dataclass
class FakeFollowers:
    detached: list[tuple[str, str, str, bool]] = field(default_factory=list)

    def detach(self, request_id: str, watcher: str, tenant_id: str, *, grace: bool) -> None:
        self.detached.append((request_id, watcher, tenant_id, grace))


@dataclass
class FakeParts:
    settings: Settings = field(default_factory=lambda: Settings(gateway_id="gw", send_buffer=3))
    metrics: GatewayMetrics = field(
        default_factory=lambda: GatewayMetrics("test-following", lambda: 0, lambda: 0)
    )
    feed: FakeFeed = field(default_factory=FakeFeed)
    followers: FakeFollowers = field(default_factory=FakeFollowers)
    is_draining: bool = False

    def draining(self) -> bool:
        return self.is_draining


def submitted(
    parts: FakeParts, render: Render | None = ChatCompletionStream, background: bool = False
) -> Following:
    """A following as the admission leaves it: context recorded, watch registered."""
    f = Following(OpenAIRoutes(cast(Parts, parts)), PRINCIPAL, render, background)
    admitted = Admitted("req_1", 8, submitted_ms=1_700_000_000_000)
    f.describe(REQ)(admitted)
    f.follow(admitted)
    return f


def test_the_stream_opens_at_once_and_a_slow_reader_is_cut_off() -> None:
    parts = FakeParts()
    f = submitted(parts)
    assert f.watcher.startswith("gw/") and parts.feed.followed == [f.watch]
    role = f.outbox.frames[0]  # the role chunk: an SSE event, never a token batch
    assert len(f.outbox) == 1 and isinstance(role, str) and role.startswith("id: req_1:0\n")
    transport = FakeTransport()
    f._transport = transport  # type: ignore[assignment]  # what stream() sets
    for _ in range(3):
        f.outbox.put("event\n\n")
    assert f.outbox.overflowed and transport.aborted
    assert parts.metrics.send_buffer_overflows == 1


@pytest.mark.parametrize(
    ("background", "draining", "grace"),
    [(False, False, True), (True, False, False), (False, True, False)],
)
def test_who_is_left_to_the_grace_period(background: bool, draining: bool, grace: bool) -> None:
    parts = FakeParts(is_draining=draining)
    f = submitted(parts, background=background)
    f.close()
    f.close()  # once only
    assert parts.followers.detached == [("req_1", f.member, "t1", grace)]
    assert parts.feed.unfollowed == [f.watch] and f.outbox.closed


def test_a_finished_request_or_one_never_followed_is_not_detached() -> None:
    parts = FakeParts()
    f = submitted(parts, render=None)
    assert f.watch is not None and f.watch.keep_text and not f.outbox.frames
    f.watch.finished = True
    f.close()
    assert not parts.followers.detached
    g = submitted(parts)
    g.attached = False  # a snapshot (`resume(..., attach=False)`) never joined the watchers
    g.close()
    assert not parts.followers.detached
