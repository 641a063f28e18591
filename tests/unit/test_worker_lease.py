"""The worker's lease on producing (worker/lease.py): a standstill of half the session timeout
suspends it — noticed by the check before a produce even when the watchdog has not run since —
until the group confirms the worker; a refused commit suspends it until a new assignment."""

from __future__ import annotations

from worker.lease import Lease


def test_a_standstill_is_noticed_before_the_first_produce_after_it() -> None:
    lease = Lease(suspect_after_s=5.0, now=100.0)
    for t in (100.1, 100.2, 104.0):  # the watchdog beats, the worker produces meanwhile
        assert not lease.tick(t)
        assert lease.valid(t + 0.05)
    # SIGSTOP at 104.0, SIGCONT at 114.0: the first produce comes before the next beat.
    assert not lease.valid(114.0)
    assert not lease.tick(114.01)  # already suspended: reported once
    assert not lease.valid(114.02)
    lease.confirm(114.5)  # a commit with the worker's generation went through
    assert lease.valid(114.6) and not lease.tick(114.6)


def test_the_watchdog_reports_a_standstill_once() -> None:
    lease = Lease(suspect_after_s=5.0, now=0.0)
    assert lease.tick(6.0)
    assert not lease.tick(6.1) and not lease.valid(6.2)


def test_short_pauses_keep_the_lease() -> None:
    lease = Lease(suspect_after_s=5.0, now=0.0)
    assert lease.valid(4.9) and not lease.tick(4.9) and lease.valid(9.8)


def test_a_refused_commit_suspends_until_confirmed() -> None:
    lease = Lease(suspect_after_s=5.0, now=0.0)
    lease.lose()
    assert not lease.valid(0.1) and not lease.tick(0.2)
    lease.confirm(0.3)
    assert lease.valid(0.4)
