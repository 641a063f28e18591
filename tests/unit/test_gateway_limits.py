"""Rate limits of cancel/resume frames (token buckets per socket and per tenant) and the
per-tenant share of the resume slots (no I/O)."""

from __future__ import annotations

from gateway.limits import FrameLimits, ResumeSlots, TokenBucket


def test_a_bucket_allows_its_burst_then_its_rate_and_says_how_long_to_wait() -> None:
    b = TokenBucket(rate=10.0, burst=3)
    assert [b.take(0.0) for _ in range(3)] == [0, 0, 0]
    assert b.take(0.0) == 100  # one token per 100 ms
    assert b.take(0.05) == 50
    assert b.take(0.1) == 0
    assert b.take(10.0) == 0 and b.tokens == 2.0  # refilled to the burst, never above


def test_socket_and_tenant_buckets_both_bind_and_a_refusal_costs_the_other_nothing() -> None:
    now = [0.0]
    limits = FrameLimits(lambda: now[0], tenant_rate=1.0, tenant_burst=4)
    a, b = TokenBucket(1.0, 2), TokenBucket(1.0, 10)
    assert [limits.take("t1", a) for _ in range(3)] == [0, 0, 1000]  # a's own limit
    # a's refused frame took nothing from the tenant: b still gets the tenant's other two.
    assert [limits.take("t1", b) for _ in range(3)] == [0, 0, 1000]
    assert b.tokens == 8.0  # the tenant's refusal gave b's token back
    assert limits.take("t2", b) == 0  # another tenant has its own bucket
    now[0] = 1.0
    assert limits.take("t1") == 0  # HTTP requests count against the tenant only


def test_the_tenant_buckets_are_bounded() -> None:
    limits = FrameLimits(lambda: 0.0, max_tenants=2)
    for t in ("t1", "t2", "t3"):
        limits.take(t)
    assert list(limits._tenants) == ["t2", "t3"]


def test_one_tenant_cannot_take_the_resume_slots_another_needs() -> None:
    slots = ResumeSlots(256)
    assert slots.per_tenant == 64
    held = [slots.take("greedy") for _ in range(300)]
    granted = [s for s in held if s is not None]
    assert len(granted) == 64 and slots.in_use == 64
    other = slots.take("other")
    assert other is not None and slots.held == {"greedy": 64, "other": 1}
    for s in granted:
        s.release()
        s.release()  # idempotent
    other.release()
    assert slots.in_use == 0 and slots.held == {}
    # All slots taken by many tenants: refused for everyone.
    few = ResumeSlots(2, share=0.5)
    assert few.take("a") and few.take("b") and few.take("c") is None
