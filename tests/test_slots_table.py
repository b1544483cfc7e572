"""The slot table (slots.rebalance and the lookups) on every server: weighted shares within one
slot, minimal movement when nodes join or leave, determinism, and lookups that agree with the
table."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from luasched import InvalidArgument, Scheduler, key_slot
from luasched.keys import SLOT_COUNT
from support.helpers import counts_of, table_owners

Client = Any


def register_all(s: Scheduler, weights: dict[bytes, int]) -> None:
    with s.pipeline() as pipe:
        for node_id, weight in weights.items():
            pipe.nodes.register(node_id, weight=weight)
        pipe.execute()


def assert_proportional(counts: dict[bytes, int], weights: dict[bytes, int]) -> None:
    total = sum(weights.values())
    assert sum(counts.values()) == SLOT_COUNT
    assert set(counts) == set(weights)
    for node_id, weight in weights.items():
        # |count - 16384 w / W| < 1, in integers: |count * W - 16384 w| < W.
        assert abs(counts[node_id] * total - SLOT_COUNT * weight) < total, node_id


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_weights_are_within_one_slot_of_the_exact_share(r: Client, seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler(r, f"prop{seed}")
    for round_number in range(3):
        count = [1, rng.randint(2, 30), 100][round_number]
        weights = {b"n%d-%d" % (round_number, i): rng.randint(1, 1000) for i in range(count)}
        for listed in s.nodes.list():
            s.nodes.remove(listed.node_id)
        register_all(s, weights)
        result = s.slots.rebalance()
        assert_proportional(dict(result.counts), weights)
        assert counts_of(table_owners(r, s)) == dict(result.counts)


def test_extreme_weights(r: Client) -> None:
    s = Scheduler(r, "extreme")
    weights = {b"heavy": 1_000_000, b"light": 1, b"mid": 999_999}
    register_all(s, weights)
    result = s.slots.rebalance()
    assert_proportional(dict(result.counts), weights)
    assert result.counts[b"light"] in (0, 1)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 16, 50, 100])
def test_adding_a_node_moves_only_its_share(r: Client, count: int) -> None:
    s = Scheduler(r, f"add{count}")
    register_all(s, {b"n%d" % i: 1 for i in range(count)})
    s.slots.rebalance()
    before = table_owners(r, s)
    s.nodes.register("newcomer")
    result = s.slots.rebalance()
    after = table_owners(r, s)
    changed = [slot for slot in range(SLOT_COUNT) if before[slot] != after[slot]]
    assert result.moved == len(changed)
    assert result.moved <= math.ceil(SLOT_COUNT / (count + 1)) + count
    assert result.moved == result.counts[b"newcomer"]  # every moved slot went to the newcomer
    assert all(after[slot] == b"newcomer" for slot in changed)
    assert_proportional(dict(result.counts), {n: 1 for n in result.counts})


@pytest.mark.parametrize("count", [2, 3, 5, 16, 100])
def test_removing_a_node_moves_only_its_slots(r: Client, count: int) -> None:
    s = Scheduler(r, f"rm{count}")
    register_all(s, {b"n%d" % i: 1 for i in range(count)})
    s.slots.rebalance()
    before = table_owners(r, s)
    leaving = b"n%d" % (count // 2)
    released = s.nodes.remove(leaving).slots_released
    result = s.slots.rebalance()
    after = table_owners(r, s)
    changed = {slot for slot in range(SLOT_COUNT) if before[slot] != after[slot]}
    assert changed == {slot for slot in range(SLOT_COUNT) if before[slot] == leaving}
    assert result.moved == released == len(changed)
    assert_proportional(dict(result.counts), {n: 1 for n in result.counts})


@pytest.mark.parametrize("seed", [11, 12])
def test_random_changes_keep_every_invariant(r: Client, seed: int) -> None:
    """Joins, leaves, drains and weight changes in random order: after each rebalance the shares
    are within one slot, `moved` is exactly the number of slots that changed owner, a slot only
    moves if its owner left, drained, or held more than its new quota, and a second rebalance
    moves nothing."""
    rng = random.Random(seed)
    s = Scheduler(r, f"walk{seed}")
    weights: dict[bytes, int] = {}
    draining: set[bytes] = set()
    serial = 0
    for _ in range(12):
        action = rng.choice(["join", "join", "leave", "drain", "weight"])
        if action == "join" or len(weights) - len(draining) < 2:
            serial += 1
            node_id = b"node %d {%d}" % (serial, rng.randint(0, 9))
            weights[node_id] = rng.randint(1, 50)
            s.nodes.register(node_id, weight=weights[node_id])
        elif action == "leave":
            node_id = rng.choice(sorted(weights))
            s.nodes.remove(node_id)
            del weights[node_id]
            draining.discard(node_id)
        elif action == "drain":
            node_id = rng.choice(sorted(set(weights) - draining))
            s.nodes.drain(node_id)
            draining.add(node_id)
        else:
            node_id = rng.choice(sorted(weights))
            weights[node_id] = rng.randint(1, 50)
            s.nodes.register(node_id, weight=weights[node_id])
        before = table_owners(r, s)
        result = s.slots.rebalance()
        after = table_owners(r, s)
        eligible = {n: w for n, w in weights.items() if n not in draining}
        assert_proportional(dict(result.counts), eligible)
        assert counts_of(after) == dict(result.counts)
        changed = [slot for slot in range(SLOT_COUNT) if before[slot] != after[slot]]
        assert result.moved == len(changed)
        old_counts = counts_of(before)
        for slot in changed:
            owner = before[slot]
            assert (
                owner is None or owner not in eligible or old_counts[owner] > result.counts[owner]
            )
        # Minimal: moved = orphans + sum of surpluses, nothing more.
        orphans = sum(1 for owner in before if owner is None or owner not in eligible)
        surplus = sum(max(0, old_counts.get(n, 0) - c) for n, c in result.counts.items())
        assert result.moved == orphans + surplus
        assert s.slots.rebalance().moved == 0
        assert table_owners(r, s) == after


def test_rebalance_is_deterministic(r: Client) -> None:
    tables = []
    for name in ("det-a", "det-b"):
        s = Scheduler(r, name)
        register_all(s, {b"x": 3, b"y": 5, b"z": 7, b"w": 1})
        s.slots.rebalance()
        s.nodes.remove("y")
        s.nodes.register("v", weight=2)
        s.slots.rebalance()
        tables.append(r.get(s.namespace.key("slots:owner")))
    assert tables[0] == tables[1]
    assert tables[0] is not None and len(tables[0]) == 2 * SLOT_COUNT


def test_lookups_agree_with_the_table(r: Client) -> None:
    s = Scheduler(r, "lookup")
    register_all(s, {b"a": 1, b"b": 2, b"c": 3})
    s.slots.rebalance()
    owners = table_owners(r, s)
    rng = random.Random(5)
    keys = [rng.randbytes(rng.randint(0, 20)) for _ in range(1000)] + [b"{user}:1", b"user:42"]
    answers = s.slots.owners(keys[:1000]) + s.slots.owners(keys[1000:])
    for key, answer in zip(keys, answers, strict=True):
        assert answer.slot == key_slot(key)
        assert answer.node == owners[answer.slot]
    assert s.slots.owner(b"user:42") == answers[-1]
    for slot in (0, 1, 5460, 5461, 16383):
        assert s.slots.owner_of_slot(slot).node == owners[slot]
        assert s.slots.owner_of_slot(slot).slot == slot


def test_lookup_before_any_rebalance_has_no_owner(r: Client) -> None:
    s = Scheduler(r, "fresh")
    s.nodes.register("a")
    assert s.slots.owner("k").node is None
    assert s.slots.owner_of_slot(0).node is None
    assert [o.node for o in s.slots.owners(["a", "b"])] == [None, None]


def test_owners_batch_is_bounded(r: Client) -> None:
    s = Scheduler(r, "batch")
    s.nodes.register("a")
    s.slots.rebalance()
    assert len(s.slots.owners([b"k%d" % i for i in range(1000)])) == 1000
    with pytest.raises(InvalidArgument, match="expected 1 to 1000 arguments, got 1001"):
        s.slots.owners([b"k%d" % i for i in range(1001)])
    with pytest.raises(InvalidArgument, match="got 0"):
        s.slots.owners([])


def test_weight_change_moves_toward_the_new_share(r: Client) -> None:
    s = Scheduler(r, "reweigh")
    register_all(s, {b"a": 1, b"b": 1})
    s.slots.rebalance()
    s.nodes.register("a", weight=3)
    result = s.slots.rebalance()
    assert dict(result.counts) == {b"a": 12288, b"b": 4096}
    assert result.moved == 4096
