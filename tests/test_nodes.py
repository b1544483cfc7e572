"""The node registry (nodes.*) on every server: registration, liveness, drain, remove, sweep,
ids made of any bytes, and every error path of every registry and slot-table script, each
leaving every key of the namespace byte-for-byte untouched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

import luasched.asyncio
from luasched import (
    InvalidArgument,
    NoNode,
    Scheduler,
    UnknownNode,
    key_slot,
)
from luasched.keys import REGISTRY_KEYS, SLOT_COUNT
from luasched.render import render_all
from support.helpers import assert_codes_covered, assert_refused, counts_of, snapshot, table_owners

Client = Any  # redis.Redis or RedisCluster

# Ids that would break anything that builds key names or splits on separators.
AWKWARD_IDS = [
    b"plain",
    b"with space",
    b"{braces}",
    b"{",
    b"}{",
    b"'single' \"double\"",
    b"line\nbreak\r\n",
    b"nul\x00inside",
    b"\x00",
    "unicod\u00e9 \u6f22\u5b57 \U0001f680".encode(),
    b"\xff\xfe not utf-8",
    b"1",  # looks like an index
    b"2",
    b"luasched:{ns}:nodes:index",  # looks like a key of the layout
    b"*?[glob]",
    b"x" * 1024,  # the longest id
]


# --------------------------------------------------------------------------------------------
# Registration and listing


def test_register_list_and_update(r: Client) -> None:
    s = Scheduler(r, "reg")
    assert s.nodes.register("a", weight=3, capacity=10, meta=b"zone=eu\x00") is True
    assert s.nodes.register(b"b") is True
    listing = s.nodes.list()
    assert [n.node_id for n in listing] == [b"a", b"b"]
    a, b = listing.nodes
    assert (a.weight, a.capacity, a.meta, a.draining, a.live, a.deadline_ms, a.slots) == (
        3,
        10,
        b"zone=eu\x00",
        False,
        True,
        None,
        0,
    )
    assert (b.weight, b.capacity, b.meta) == (1, None, b"")
    assert listing.now_ms > 1_600_000_000_000

    s.slots.rebalance()
    s.nodes.drain("a")
    # Re-registering replaces weight/capacity/meta/deadline, keeps slots and the drain flag.
    assert s.nodes.register("a", weight=5, ttl_ms=60_000) is False
    a = s.nodes.list().nodes[0]
    assert (a.weight, a.capacity, a.meta, a.draining, a.slots) == (5, None, b"", True, 12288)
    assert a.deadline_ms is not None
    assert 59_000 <= a.deadline_ms - s.nodes.list().now_ms <= 60_000
    assert len(s.nodes.list()) == 2


def test_any_bytes_as_node_ids(r: Client) -> None:
    s = Scheduler(r, "ids")
    for node_id in AWKWARD_IDS:
        assert s.nodes.register(node_id, meta=node_id) is True
    assert [n.node_id for n in s.nodes.list()] == AWKWARD_IDS
    assert [n.meta for n in s.nodes.list()] == AWKWARD_IDS
    result = s.slots.rebalance()
    assert set(result.counts) == set(AWKWARD_IDS)
    owners = table_owners(r, s)
    assert counts_of(owners) == dict(result.counts)
    for slot in (0, 1, 8191, 16383):
        assert s.slots.owner_of_slot(slot).node == owners[slot]
    keys = [b"user:%d" % i for i in range(200)]
    assert [o.node for o in s.slots.owners(keys)] == [owners[key_slot(k)] for k in keys]
    for node_id in AWKWARD_IDS:
        assert s.nodes.heartbeat(node_id, 60_000) > 0
        assert s.nodes.drain(node_id) is True
        assert s.nodes.undrain(node_id) is True
    # No key name was built from an id: the namespace holds exactly the layout's keys.
    expected = {s.namespace.key(name) for name in REGISTRY_KEYS} - {
        s.namespace.key("nodes:capacity"),
        s.namespace.key("nodes:draining"),
        s.namespace.key("nodes:free"),
        s.namespace.key("pick:load"),  # written by the first pick only
        s.namespace.key("pick:weighted"),  # built by the first weighted pick only
    }
    assert set(snapshot(r, s.namespace)) == expected
    for node_id in AWKWARD_IDS:
        assert s.nodes.remove(node_id).removed is True
    assert len(s.nodes.list()) == 0


def test_str_ids_are_utf8(r: Client) -> None:
    s = Scheduler(r, "utf8")
    s.nodes.register("n\u00e9")
    assert s.nodes.list().nodes[0].node_id == "n\u00e9".encode()
    assert s.nodes.remove("n\u00e9".encode()).removed is True


# --------------------------------------------------------------------------------------------
# Liveness


def test_heartbeat_sets_a_server_time_deadline(r: Client) -> None:
    s = Scheduler(r, "hb")
    s.nodes.register("a", ttl_ms=1_000)
    deadline = s.nodes.heartbeat("a", 5_000)
    listing = s.nodes.list()
    assert listing.nodes[0].deadline_ms == deadline
    assert 4_000 < deadline - listing.now_ms <= 5_000
    with pytest.raises(UnknownNode) as error:
        s.nodes.heartbeat("ghost", 1_000)
    assert (error.value.code, error.value.script) == ("NOSUCHNODE", "nodes.heartbeat")


def test_a_dead_owner_is_never_answered_and_a_heartbeat_revives_it(r: Client) -> None:
    s = Scheduler(r, "dead")
    s.nodes.register("stays")
    s.nodes.register("lapses", ttl_ms=60_000)
    s.slots.rebalance()
    owners = table_owners(r, s)
    lapsing_slot = owners.index(b"lapses")
    staying_slot = owners.index(b"stays")
    assert s.slots.owner_of_slot(lapsing_slot).node == b"lapses"
    s.nodes.heartbeat("lapses", 1)  # then it lapses (1 ms to live; never before the check above)
    time.sleep(0.05)
    # Dead before any sweep: the lookup says "no live owner" and does not fall through.
    assert s.slots.owner_of_slot(lapsing_slot).node is None
    assert s.slots.owner_of_slot(staying_slot).node == b"stays"
    info = {n.node_id: n for n in s.nodes.list()}
    assert (info[b"lapses"].live, info[b"lapses"].slots) == (False, 8192)
    s.nodes.heartbeat("lapses", 60_000)
    assert s.slots.owner_of_slot(lapsing_slot).node == b"lapses"


def test_missed_heartbeat_loses_its_slots_on_sweep(r: Client) -> None:
    s = Scheduler(r, "sweep")
    for name in ("a", "b", "c"):
        s.nodes.register(name, ttl_ms=60_000)
    s.nodes.register("late", ttl_ms=60_000)
    s.slots.rebalance()
    before = table_owners(r, s)
    assert counts_of(before)[b"late"] == 4096
    assert s.nodes.sweep().removed == ()  # nothing dead yet: no change
    assert table_owners(r, s) == before
    s.nodes.heartbeat("late", 1)  # its last heartbeat: 1 ms to live (a long TTL above, so a
    time.sleep(0.05)  # slow machine cannot let it lapse before the no-change check)
    for name in ("a", "b", "c"):
        s.nodes.heartbeat(name, 60_000)
    result = s.nodes.sweep(limit=10)
    assert (result.removed, result.more, result.moved) == ((b"late",), False, 4096)
    after = table_owners(r, s)
    assert b"late" not in after
    assert None not in after
    # Only the dead node's slots moved.
    assert all(old == new for old, new in zip(before, after, strict=True) if old != b"late")
    assert sorted(counts_of(after).values()) == [5461, 5461, 5462]
    with pytest.raises(UnknownNode):
        s.nodes.heartbeat("late", 1_000)  # swept: must register again


def test_sweep_is_bounded_and_says_more(r: Client) -> None:
    s = Scheduler(r, "bounded")
    s.nodes.register("alive")
    for i in range(5):
        s.nodes.register(f"dead{i}", ttl_ms=30 + i)  # earliest deadline first
    s.slots.rebalance()
    time.sleep(0.15)
    first = s.nodes.sweep(limit=2)
    assert (first.removed, first.more) == ((b"dead0", b"dead1"), True)
    second = s.nodes.sweep(limit=3)
    assert (second.removed, second.more) == ((b"dead2", b"dead3", b"dead4"), False)
    assert s.nodes.sweep(limit=3) == type(second)(removed=(), more=False, moved=0)
    assert counts_of(table_owners(r, s)) == {b"alive": SLOT_COUNT}


def test_sweep_without_eligible_node_leaves_orphans(r: Client) -> None:
    s = Scheduler(r, "orphans")
    s.nodes.register("drained")
    s.nodes.register("dying", ttl_ms=60_000)
    s.slots.rebalance()
    s.nodes.drain("drained")
    s.nodes.heartbeat("dying", 1)  # lapses only after the rebalance gave it its slots
    time.sleep(0.05)
    result = s.nodes.sweep()
    assert (result.removed, result.moved) == ((b"dying",), 8192)
    owners = table_owners(r, s)
    assert counts_of(owners) == {b"drained": 8192}
    assert owners.count(None) == 8192
    # Lookups: the drained node still answers for its own slots; the orphans have no owner.
    assert s.slots.owner_of_slot(owners.index(None)).node is None
    assert s.slots.owner_of_slot(owners.index(b"drained")).node == b"drained"


# --------------------------------------------------------------------------------------------
# Drain and remove


def test_drained_node_gets_no_slots_on_rebalance(r: Client) -> None:
    s = Scheduler(r, "drain")
    for name in ("a", "b", "c", "d"):
        s.nodes.register(name)
    s.slots.rebalance()
    assert s.nodes.drain("b") is True
    assert s.nodes.drain("b") is False
    slot_of_b = table_owners(r, s).index(b"b")
    assert s.slots.owner_of_slot(slot_of_b).node == b"b"  # keeps its slots until rebalance
    result = s.slots.rebalance()
    assert b"b" not in result.counts
    assert result.moved == 4096
    assert sorted(counts_of(table_owners(r, s)).values()) == [5461, 5461, 5462]
    assert b"b" not in table_owners(r, s)
    assert s.nodes.undrain("b") is True
    assert s.nodes.undrain("b") is False
    assert s.slots.rebalance().counts[b"b"] == 4096


def test_remove_orphans_only_its_slots_and_reused_index_inherits_nothing(r: Client) -> None:
    s = Scheduler(r, "remove")
    for name in ("a", "b", "c"):
        s.nodes.register(name)
    s.slots.rebalance()
    before = table_owners(r, s)
    removal = s.nodes.remove("b")
    assert (removal.removed, removal.slots_released) == (True, before.count(b"b"))
    after = table_owners(r, s)
    assert [old if old != b"b" else None for old in before] == after
    assert s.slots.owner_of_slot(before.index(b"b")).node is None
    assert s.nodes.remove("b") == type(removal)(removed=False, slots_released=0)
    # The new node takes b's index but none of its (cleared) slots.
    assert s.nodes.register("newcomer") is True
    assert counts_of(table_owners(r, s)).get(b"newcomer", 0) == 0
    assert s.nodes.drain("a") is True
    s.nodes.remove("a")
    assert s.nodes.register("a") is True
    assert s.nodes.list().nodes[0].draining is False  # the drain flag left with the node


def test_pipeline_and_asyncio_twins(server: Any, r: Client) -> None:
    s = Scheduler(r, "twins")
    with s.pipeline() as pipe:
        pipe.nodes.register("p1", weight=1)
        pipe.nodes.register("p2", weight=3)
        pipe.slots.rebalance()
        pipe.slots.owner_of_slot(0)
        pipe.nodes.list()
        created1, created2, rebalanced, owner, listing = pipe.execute()
    assert (created1, created2) == (True, True)
    assert rebalanced.counts == {b"p1": 4096, b"p2": 12288}
    assert owner.node == b"p1"
    assert [n.slots for n in listing] == [4096, 12288]

    async def scenario() -> list[Any]:
        client = server.async_client()
        try:
            a = luasched.asyncio.Scheduler(client, "twins")
            results: list[Any] = [
                await a.nodes.register("p3", weight=4),
                await a.slots.rebalance(),
                await a.slots.owner("k"),
                await a.slots.owners(["k", "l"]),
                await a.nodes.heartbeat("p3", 10_000),
                await a.nodes.drain("p3"),
                await a.nodes.undrain("p3"),
                await a.nodes.sweep(),
                await a.nodes.remove("p3"),
                await a.nodes.list(),
            ]
            async with a.pipeline() as pipe:
                await pipe.nodes.register("p4")
                await pipe.slots.owner_of_slot(1)
                results.append(await pipe.execute())
            return results
        finally:
            await client.aclose()

    results = asyncio.run(scenario())
    assert results[0] is True
    assert results[1].counts == {b"p1": 2048, b"p2": 6144, b"p3": 8192}
    assert results[2].slot == key_slot("k")
    assert results[2].node in {b"p1", b"p2", b"p3"}
    assert results[3][0] == results[2]
    assert results[8].slots_released == 8192
    assert [n.node_id for n in results[9]] == [b"p1", b"p2"]
    assert results[10][0] is True
    assert results[10][1].node == b"p1"


# --------------------------------------------------------------------------------------------
# Error paths: every script, every code; nothing changes


def _populated(r: Client, s: Scheduler) -> None:
    s.nodes.register("a", weight=2, capacity=5, meta=b"m")
    s.nodes.register("b")
    s.nodes.register("c", ttl_ms=600_000)
    s.slots.rebalance()
    s.nodes.drain("b")
    s.nodes.register("d")
    s.nodes.remove("d")  # leaves a free index
    r.set(s.namespace.key("marker"), b"\x00untouched")


def _draining_only(r: Client, s: Scheduler) -> None:
    s.nodes.register("d")
    s.slots.rebalance()
    s.nodes.drain("d")


def _dead_only(r: Client, s: Scheduler) -> None:
    s.nodes.register("e", ttl_ms=60_000)
    s.slots.rebalance()
    s.nodes.heartbeat("e", 1)  # lapses only after the rebalance gave it its slots
    time.sleep(0.05)


def _empty(r: Client, s: Scheduler) -> None:
    r.set(s.namespace.key("marker"), b"only")


def _full(r: Client, s: Scheduler) -> None:
    ids = {str(index): b"n%d" % index for index in range(1, 65536)}
    r.hset(s.namespace.key("nodes:id"), mapping=ids)  # type: ignore[arg-type]


def _wrong_type(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    r.set(s.namespace.key("nodes:free"), b"not a zset")


def _wrong_index(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    r.delete(s.namespace.key("nodes:index"))
    r.set(s.namespace.key("nodes:index"), b"not a hash")


def _wrong_id(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    r.delete(s.namespace.key("nodes:id"))
    r.xadd(s.namespace.key("nodes:id"), {b"not": b"a hash"})


def _short_table(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    r.set(s.namespace.key("slots:owner"), b"\x00\x01" * 100)


SETUPS: dict[str, Callable[[Client, Scheduler], None]] = {
    "populated": _populated,
    "draining_only": _draining_only,
    "dead_only": _dead_only,
    "empty": _empty,
    "full": _full,
    "wrong_type": _wrong_type,
    "wrong_index": _wrong_index,
    "wrong_id": _wrong_id,
    "short_table": _short_table,
}

LONG_KEY = b"k" * 4097

# (script, setup, keys: "ok" | "short" | "long", args, code, detail)
ERROR_CASES: list[tuple[str, str, str, tuple[Any, ...], str, str]] = [
    # nodes.register
    (
        "nodes.register",
        "populated",
        "short",
        (b"x", 1, -1, 0, b""),
        "ARG",
        "expected 14 key(s), got 13",
    ),
    (
        "nodes.register",
        "populated",
        "long",
        (b"x", 1, -1, 0, b""),
        "ARG",
        "expected 14 key(s), got 15",
    ),
    ("nodes.register", "populated", "ok", (b"x", 1, -1, 0), "ARG", "expected 5 argument(s), got 4"),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"", 1, -1, 0, b""),
        "ARG",
        "node_id must be 1 to 1024 bytes long, got 0 bytes",
    ),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"x" * 1025, 1, -1, 0, b""),
        "ARG",
        "node_id must be 1 to 1024 bytes long, got 1025 bytes",
    ),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"a", 0, -1, 0, b""),
        "ARG",
        "weight must be between 1 and 1000000, got 0",
    ),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"a", 1000001, -1, 0, b""),
        "ARG",
        "weight must be between 1 and 1000000, got 1000001",
    ),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"a", b"1.5", -1, 0, b""),
        "ARG",
        'weight must be an integer, got "1.5"',
    ),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"a", 1, -2, 0, b""),
        "ARG",
        "capacity must be between -1 and 1000000000000, got -2",
    ),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"a", 1, -1, -1, b""),
        "ARG",
        "ttl_ms must be between 0 and 31536000000, got -1",
    ),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"a", 1, -1, b"0x10", b""),
        "ARG",
        'ttl_ms must be an integer, got "0x10"',
    ),
    (
        "nodes.register",
        "populated",
        "ok",
        (b"a", 1, -1, 0, b"m" * 65537),
        "ARG",
        "meta must be 0 to 65536 bytes long, got 65537 bytes",
    ),
    (
        "nodes.register",
        "full",
        "ok",
        (b"new", 1, -1, 0, b""),
        "FULL",
        "already 65535 nodes; remove some first",
    ),
    (
        "nodes.register",
        "wrong_type",
        "ok",
        (b"a", 1, -1, 0, b""),
        "CORRUPT",
        "KEYS[8] holds a string, expected a zset",
    ),
    (
        "nodes.register",
        "short_table",
        "ok",
        (b"new", 1, -1, 0, b""),
        "CORRUPT",
        "the slot table is 200 bytes, expected 32768",
    ),
    # nodes.heartbeat
    ("nodes.heartbeat", "populated", "short", (b"a", 1000), "ARG", "expected 14 key(s), got 13"),
    ("nodes.heartbeat", "populated", "ok", (b"a",), "ARG", "expected 2 argument(s), got 1"),
    (
        "nodes.heartbeat",
        "populated",
        "ok",
        (b"a", 0),
        "ARG",
        "ttl_ms must be between 1 and 31536000000, got 0",
    ),
    (
        "nodes.heartbeat",
        "populated",
        "ok",
        (b"a", b" 5"),
        "ARG",
        'ttl_ms must be an integer, got " 5"',
    ),
    (
        "nodes.heartbeat",
        "populated",
        "ok",
        (b"", 10),
        "ARG",
        "node_id must be 1 to 1024 bytes long, got 0 bytes",
    ),
    (
        "nodes.heartbeat",
        "populated",
        "ok",
        (b"d", 1000),
        "NOSUCHNODE",
        'node "d" is not registered',
    ),
    (
        "nodes.heartbeat",
        "populated",
        "ok",
        (b"\x00\n", 1000),
        "NOSUCHNODE",
        'node "??" is not registered',
    ),
    (
        "nodes.heartbeat",
        "wrong_index",
        "ok",
        (b"a", 1000),
        "CORRUPT",
        'key "luasched:{err}:nodes:index" holds another type than the layout',
    ),
    # nodes.drain
    ("nodes.drain", "populated", "long", (b"a", b"on"), "ARG", "expected 14 key(s), got 15"),
    ("nodes.drain", "populated", "ok", (b"a", b"on", b"x"), "ARG", "expected 2 argument(s), got 3"),
    (
        "nodes.drain",
        "populated",
        "ok",
        (b"a", b"maybe"),
        "ARG",
        'mode must be one of on|off, got "maybe"',
    ),
    ("nodes.drain", "populated", "ok", (b"zz", b"on"), "NOSUCHNODE", 'node "zz" is not registered'),
    (
        "nodes.drain",
        "populated",
        "ok",
        (b"zz", b"off"),
        "NOSUCHNODE",
        'node "zz" is not registered',
    ),
    (
        "nodes.drain",
        "wrong_type",
        "ok",
        (b"a", b"on"),
        "CORRUPT",
        "KEYS[8] holds a string, expected a zset",
    ),
    # nodes.remove
    ("nodes.remove", "populated", "short", (b"a",), "ARG", "expected 14 key(s), got 13"),
    ("nodes.remove", "populated", "ok", (), "ARG", "expected 1 argument(s), got 0"),
    (
        "nodes.remove",
        "populated",
        "ok",
        (b"",),
        "ARG",
        "node_id must be 1 to 1024 bytes long, got 0 bytes",
    ),
    (
        "nodes.remove",
        "wrong_type",
        "ok",
        (b"a",),
        "CORRUPT",
        "KEYS[8] holds a string, expected a zset",
    ),
    (
        "nodes.remove",
        "short_table",
        "ok",
        (b"a",),
        "CORRUPT",
        "the slot table is 200 bytes, expected 32768",
    ),
    # nodes.list
    ("nodes.list", "populated", "short", (), "ARG", "expected 14 key(s), got 13"),
    ("nodes.list", "populated", "ok", (b"x",), "ARG", "expected 0 argument(s), got 1"),
    (
        "nodes.list",
        "short_table",
        "ok",
        (),
        "CORRUPT",
        "the slot table is 200 bytes, expected 32768",
    ),
    # nodes.sweep
    ("nodes.sweep", "populated", "short", (1,), "ARG", "expected 14 key(s), got 13"),
    ("nodes.sweep", "populated", "ok", (), "ARG", "expected 1 argument(s), got 0"),
    ("nodes.sweep", "populated", "ok", (0,), "ARG", "limit must be between 1 and 1000, got 0"),
    (
        "nodes.sweep",
        "populated",
        "ok",
        (1001,),
        "ARG",
        "limit must be between 1 and 1000, got 1001",
    ),
    (
        "nodes.sweep",
        "wrong_type",
        "ok",
        (10,),
        "CORRUPT",
        "KEYS[8] holds a string, expected a zset",
    ),
    (
        "nodes.sweep",
        "short_table",
        "ok",
        (10,),
        "CORRUPT",
        "the slot table is 200 bytes, expected 32768",
    ),
    # slots.rebalance
    ("slots.rebalance", "populated", "long", (), "ARG", "expected 14 key(s), got 15"),
    ("slots.rebalance", "populated", "ok", (b"x",), "ARG", "expected 0 argument(s), got 1"),
    ("slots.rebalance", "empty", "ok", (), "NONODE", "no live node that is not draining"),
    ("slots.rebalance", "draining_only", "ok", (), "NONODE", "no live node that is not draining"),
    ("slots.rebalance", "dead_only", "ok", (), "NONODE", "no live node that is not draining"),
    (
        "slots.rebalance",
        "short_table",
        "ok",
        (),
        "CORRUPT",
        "the slot table is 200 bytes, expected 32768",
    ),
    # slots.owner
    ("slots.owner", "populated", "short", (b"k",), "ARG", "expected 14 key(s), got 13"),
    ("slots.owner", "populated", "ok", (), "ARG", "expected 1 argument(s), got 0"),
    ("slots.owner", "populated", "ok", (b"k", b"l"), "ARG", "expected 1 argument(s), got 2"),
    (
        "slots.owner",
        "populated",
        "ok",
        (LONG_KEY,),
        "ARG",
        "key must be 0 to 4096 bytes long, got 4097 bytes",
    ),
    ("slots.owner", "empty", "ok", (b"k",), "NONODE", "no live node is registered"),
    ("slots.owner", "dead_only", "ok", (b"k",), "NONODE", "no live node is registered"),
    (
        "slots.owner",
        "wrong_id",
        "ok",
        (b"k",),
        "CORRUPT",
        'key "luasched:{err}:nodes:id" holds another type than the layout',
    ),
    # slots.owners
    ("slots.owners", "populated", "long", (b"k",), "ARG", "expected 14 key(s), got 15"),
    ("slots.owners", "populated", "ok", (), "ARG", "expected 1 to 1000 arguments, got 0"),
    (
        "slots.owners",
        "populated",
        "ok",
        (b"k",) * 1001,
        "ARG",
        "expected 1 to 1000 arguments, got 1001",
    ),
    (
        "slots.owners",
        "populated",
        "ok",
        (b"k", LONG_KEY),
        "ARG",
        "key #2 must be 0 to 4096 bytes long, got 4097 bytes",
    ),
    ("slots.owners", "empty", "ok", (b"k", b"l"), "NONODE", "no live node is registered"),
    ("slots.owners", "dead_only", "ok", (b"k",), "NONODE", "no live node is registered"),
    (
        "slots.owners",
        "wrong_id",
        "ok",
        (b"k", b"l"),
        "CORRUPT",
        'key "luasched:{err}:nodes:id" holds another type than the layout',
    ),
    # slots.owner_of_slot
    ("slots.owner_of_slot", "populated", "short", (0,), "ARG", "expected 14 key(s), got 13"),
    ("slots.owner_of_slot", "populated", "ok", (), "ARG", "expected 1 argument(s), got 0"),
    (
        "slots.owner_of_slot",
        "populated",
        "ok",
        (-1,),
        "ARG",
        "slot must be between 0 and 16383, got -1",
    ),
    (
        "slots.owner_of_slot",
        "populated",
        "ok",
        (16384,),
        "ARG",
        "slot must be between 0 and 16383, got 16384",
    ),
    (
        "slots.owner_of_slot",
        "populated",
        "ok",
        (b"1e3",),
        "ARG",
        'slot must be an integer, got "1e3"',
    ),
    ("slots.owner_of_slot", "empty", "ok", (5,), "NONODE", "no live node is registered"),
    ("slots.owner_of_slot", "dead_only", "ok", (5,), "NONODE", "no live node is registered"),
    (
        "slots.owner_of_slot",
        "wrong_id",
        "ok",
        (5,),
        "CORRUPT",
        'key "luasched:{err}:nodes:id" holds another type than the layout',
    ),
]


def test_every_new_script_and_error_code_is_covered() -> None:
    scripts = {name for name in render_all() if name.startswith(("nodes.", "slots."))}
    assert_codes_covered(ERROR_CASES, scripts - {"slots.keyslot"})


@pytest.mark.parametrize(
    ("script", "setup", "keys", "args", "code", "detail"),
    ERROR_CASES,
    ids=[f"{case[0]}-{case[4]}-{index}" for index, case in enumerate(ERROR_CASES)],
)
def test_bad_input_is_refused_and_changes_nothing(
    r: Client, script: str, setup: str, keys: str, args: tuple[Any, ...], code: str, detail: str
) -> None:
    s = Scheduler(r, "err")
    SETUPS[setup](r, s)
    registry = list(s.namespace.registry_keys)
    key_list = {
        "ok": registry,
        "short": registry[:-1],
        "long": [*registry, s.namespace.key("extra")],
    }[keys]
    assert_refused(r, s, script, key_list, args, code, detail)


def _call(script: str, keys: list[bytes], args: tuple[Any, ...]) -> Any:
    from luasched.scripts import Call

    return Call(script, tuple(keys), args, lambda reply: reply)


def test_wrapper_errors_are_typed(r: Client) -> None:
    s = Scheduler(r, "typed")
    with pytest.raises(NoNode):
        s.slots.rebalance()
    with pytest.raises(NoNode):
        s.slots.owner("k")
    with pytest.raises(UnknownNode):
        s.nodes.drain("nobody")
    with pytest.raises(InvalidArgument):
        s.nodes.register("x", weight=0)
    with pytest.raises(InvalidArgument):
        s.nodes.sweep(limit=0)
    with pytest.raises(InvalidArgument, match="keys"):
        s.slots.owners(b"one key")  # type: ignore[arg-type]
    assert snapshot(r, s.namespace) == {}
