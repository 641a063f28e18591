"""Prefix-affinity routing (worker.routing): keys, stickiness, bounded load, failover."""

from __future__ import annotations

from collections import Counter

from llmstream.v1 import common_pb2
from worker.routing import PREFIX_CHARS, Router, prefix_key

SYSTEM = "You are a careful assistant for the ACME support desk. " * 20


def chat(system: str | None, user: str) -> common_pb2.Prompt:
    messages = [common_pb2.ChatMessage(role="user", content=user)]
    if system is not None:
        messages.insert(0, common_pb2.ChatMessage(role="system", content=system))
    return common_pb2.Prompt(chat=common_pb2.ChatPrompt(messages=messages))


def test_chat_key_is_the_system_prompt() -> None:
    a = prefix_key("m", chat(SYSTEM, "where is my parcel?"))
    b = prefix_key("m", chat(SYSTEM, "cancel my order"))
    assert a == b
    assert a != prefix_key("m", chat("You are a pirate.", "where is my parcel?"))
    assert a != prefix_key("other-model", chat(SYSTEM, "where is my parcel?"))


def test_chat_without_system_prompt_keys_on_the_first_user_turn() -> None:
    first = chat(None, "summarise this contract: ...")
    later = common_pb2.Prompt(
        chat=common_pb2.ChatPrompt(
            messages=[
                common_pb2.ChatMessage(role="user", content="summarise this contract: ..."),
                common_pb2.ChatMessage(role="assistant", content="It says ..."),
                common_pb2.ChatMessage(role="user", content="and clause 4?"),
            ]
        )
    )
    assert prefix_key("m", first) == prefix_key("m", later)
    assert prefix_key("m", first) != prefix_key("m", chat(None, "another question"))


def test_text_and_token_keys_use_the_head_only() -> None:
    head = "x" * PREFIX_CHARS
    assert prefix_key("m", common_pb2.Prompt(text=head + "one")) == prefix_key(
        "m", common_pb2.Prompt(text=head + "two")
    )
    assert prefix_key("m", common_pb2.Prompt(text="a" + head)) != prefix_key(
        "m", common_pb2.Prompt(text="b" + head)
    )
    ids = list(range(200))
    t1 = common_pb2.Prompt(tokens=common_pb2.PromptTokens(ids=[*ids, 1]))
    t2 = common_pb2.Prompt(tokens=common_pb2.PromptTokens(ids=[*ids, 2]))
    assert prefix_key("m", t1) == prefix_key("m", t2)


def test_same_key_same_replica_while_load_allows() -> None:
    r = Router(["a:1", "b:1", "c:1"])
    key = prefix_key("m", chat(SYSTEM, "q"))
    picks = {r.pick(0.0, key=key) for _ in range(10)}  # nothing acquired: load stays 0
    assert len(picks) == 1


def test_keys_spread_over_replicas() -> None:
    r = Router(["a:1", "b:1", "c:1"])
    owners = Counter(r.pick(0.0, key=f"m\x00text\x00prompt {i}") for i in range(3000))
    assert set(owners) == {"a:1", "b:1", "c:1"}
    assert min(owners.values()) > 600  # 64 ring points each: no replica starved of keys


def test_hot_key_spills_at_the_load_cap() -> None:
    r = Router(["a:1", "b:1"])
    key = prefix_key("m", chat(SYSTEM, "q"))
    placed = []
    for _ in range(20):
        replica = r.pick(0.0, key=key)
        r.acquire(replica)
        placed.append(replica)
    counts = Counter(placed)
    owner = placed[0]
    # The owner takes up to 1.25 x the average: 20 requests over 2 replicas -> at most
    # ceil(1.25 * 20 / 2) = 13, the rest spill to the other replica.
    assert counts[owner] == 13 and sum(counts.values()) == 20
    assert placed[:2] == [owner, owner]


def test_failover_skips_a_failed_or_excluded_owner() -> None:
    r = Router(["a:1", "b:1"], cooldown_s=2.0)
    key = prefix_key("m", chat(SYSTEM, "q"))
    owner = r.pick(0.0, key=key)
    other = "b:1" if owner == "a:1" else "a:1"
    assert r.pick(0.0, exclude={owner}, key=key) == other
    r.failed(owner, now=10.0)
    assert r.pick(11.0, key=key) == other
    assert r.pick(12.5, key=key) == owner  # cooled down: the affinity returns
