"""Fast takeover, the pure parts: whom a worker evicts (`worker.liveness.Evictions`) and whom a
model server tells that a watcher died (`model_server.worker_watch.Roster`)."""

from __future__ import annotations

from llmstream.v1 import model_service_pb2
from model_server.worker_watch import OUTBOX_LIMIT, Roster, Watcher
from worker.liveness import RECENT_EVICTIONS, Evictions


def presence(member: str, group: str = "g", worker: str = "w") -> model_service_pb2.WorkerPresence:
    return model_service_pb2.WorkerPresence(
        worker_id=worker, group=group, member_id=member, generation=3
    )


def test_evicts_each_lost_member_of_its_group_once() -> None:
    ev = Evictions("g")
    assert ev.wanted(presence("m-1"), own_member_id="m-self")
    assert not ev.wanted(presence("m-1"), own_member_id="m-self")  # a second replica's notice
    assert ev.wanted(presence("m-2"), own_member_id="m-self")


def test_never_evicts_itself_another_group_or_nobody() -> None:
    ev = Evictions("g")
    assert not ev.wanted(presence("m-self"), own_member_id="m-self")
    assert not ev.wanted(presence("m-1", group="other"), own_member_id="m-self")
    assert not ev.wanted(presence(""), own_member_id="m-self")


def test_eviction_memory_is_bounded() -> None:
    ev = Evictions("g")
    for i in range(RECENT_EVICTIONS + 1):
        assert ev.wanted(presence(f"m-{i}"), own_member_id="")
    assert ev.wanted(presence("m-0"), own_member_id="")  # the oldest was forgotten
    assert not ev.wanted(presence(f"m-{RECENT_EVICTIONS}"), own_member_id="")


def notices(watcher: Watcher) -> list[model_service_pb2.WorkerPresence]:
    out = []
    while not watcher.outbox.empty():
        out.append(watcher.outbox.get_nowait().lost)
    return out


def test_a_lost_watcher_is_told_to_the_others_of_its_group_only() -> None:
    roster = Roster()
    dead, peer, stranger, anonymous = (roster.attach() for _ in range(4))
    dead.presence.CopyFrom(presence("m-dead", worker="w0"))
    peer.presence.CopyFrom(presence("m-peer", worker="w1"))
    stranger.presence.CopyFrom(presence("m-x", group="other"))
    assert roster.lost(dead) == 1  # the peer only
    assert notices(peer) == [presence("m-dead", worker="w0")]
    assert notices(stranger) == []
    assert notices(anonymous) == []  # has not said who it is: its group is not this one
    assert len(roster) == 3


def test_a_goodbye_or_a_watcher_without_membership_tells_nobody() -> None:
    roster = Roster()
    leaving, peer, unknown = roster.attach(), roster.attach(), roster.attach()
    leaving.presence.CopyFrom(presence("m-1"))
    peer.presence.CopyFrom(presence("m-2"))
    unknown.presence.CopyFrom(presence(""))  # not a member yet: nothing to evict
    roster.left(leaving)
    assert roster.lost(unknown) == 0
    assert notices(peer) == []
    assert len(roster) == 1


def test_the_same_member_watching_twice_is_not_told_about_itself() -> None:
    roster = Roster()
    old, new = roster.attach(), roster.attach()
    old.presence.CopyFrom(presence("m-1"))
    new.presence.CopyFrom(presence("m-1"))  # reconnected before the old stream broke
    assert roster.lost(old) == 0
    assert notices(new) == []


def test_a_full_outbox_drops_its_oldest_notice() -> None:
    roster = Roster()
    peer = roster.attach()
    peer.presence.CopyFrom(presence("m-peer"))
    for i in range(OUTBOX_LIMIT + 1):
        dead = roster.attach()
        dead.presence.CopyFrom(presence(f"m-{i}"))
        roster.lost(dead)
    got = notices(peer)
    assert len(got) == OUTBOX_LIMIT and peer.dropped == 1
    assert got[0].member_id == "m-1" and got[-1].member_id == f"m-{OUTBOX_LIMIT}"
