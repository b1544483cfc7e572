"""Dispatch to nodes (queue.dispatch, queue.node_*, queue.redispatch) on every server: each
strategy routes as its pick would, loads are charged on dispatch and given back by ack, dead
letters and expired leases, a dead node's tasks are dispatched again and none is lost, replays
by request id act once, and every error path leaves every key of the namespace untouched."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from typing import Any

import pytest

import luasched.asyncio
from luasched import Scheduler
from luasched.errors import AllNodesFull, CorruptState, NoNode, StaleLease
from luasched.keys import Namespace
from luasched.queue import DispatchKeys, Lease, node_dequeue_call, pass_on_commands
from luasched.render import render_all
from support.helpers import (
    HELD_TOKEN,
    assert_codes_covered,
    assert_refused,
    snapshot,
    snapshot_ignoring_ttl,
    with_held_tokens,
)

Client = Any  # redis.Redis or RedisCluster
HOUR = 3_600_000


def scheduler(r: Client, ns: str, nodes: list[tuple[str, int, int | None]]) -> Scheduler:
    """A scheduler on namespace ``ns`` with ``nodes`` (id, weight, capacity) registered, live
    for an hour, and the slot table rebalanced."""
    s = Scheduler(r, ns, rng=random.Random(7))
    for node, weight, capacity in nodes:
        s.nodes.register(node, weight=weight, capacity=capacity, ttl_ms=HOUR)
    s.slots.rebalance()
    return s


def loads(r: Client, s: Scheduler) -> dict[bytes, int]:
    """Every node's pick:load, read straight from the registry's keys (absent: 0)."""
    ids = r.hgetall(s.namespace.key("nodes:id"))
    raw = r.hgetall(s.namespace.key("pick:load"))
    return {node: int(raw.get(index, 0)) for index, node in ids.items()}


def server_ms(q: Any, node: str = "a") -> int:
    """The server's clock (the node holding the namespace), in ms."""
    return int(q.dispatch_stats([node]).now_ms)


def kill(q: Any, node: str | bytes, task_id: bytes) -> None:
    """Lease and nack ``task_id`` on ``node`` until it is a dead letter (attempts exhausted)."""
    view = q.for_node(node)
    while True:
        lease = view.dequeue("killer", HOUR)
        assert lease is not None and lease.task_id == task_id
        if view.nack(lease, delay_ms=0, reason=b"boom").state == "dead":
            return


def drain_node(q: Any, node: bytes, worker: str = "w") -> list[Lease]:
    """Lease and ack every ready task of ``node``; the leases, in order."""
    done = []
    view = q.for_node(node)
    while lease := view.dequeue(worker, 10_000):
        assert view.ack(lease)
        done.append(lease)
    return done


# --------------------------------------------------------------------------------------------
# Each strategy routes as its pick would


def test_slot_strategy_routes_to_the_owner_of_the_routing_key(r: Client) -> None:
    s = scheduler(r, "dslot", [("a", 1, None), ("b", 2, None), ("c", 3, None)])
    q = s.queue("jobs")
    for number in range(60):
        key = f"user:{number}"
        sent = q.dispatch(f"t{number}", key, strategy="slot", routing_key=key)
        assert sent.created and sent.state == "ready"
        assert sent.node == s.slots.owner(key).node
    # Each node's queue holds exactly the tasks whose key it owns.
    for node in (b"a", b"b", b"c"):
        for lease in drain_node(q, node):
            assert s.slots.owner(lease.payload).node == node
    assert q.dispatch_stats(["a"]).ready == 0


def test_least_loaded_follows_utilization_and_respects_capacity(r: Client) -> None:
    s = scheduler(r, "dleast", [("a", 1, 2), ("b", 1, 6)])
    q = s.queue("jobs")
    capacity = {b"a": 2, b"b": 6}
    for number in range(8):
        before = loads(r, s)
        lowest = min(before[node] / capacity[node] for node in capacity)
        sent = q.dispatch(f"t{number}", b"", strategy="least_loaded")
        assert before[sent.node] / capacity[sent.node] == lowest
    assert loads(r, s) == {b"a": 2, b"b": 6}
    with pytest.raises(AllNodesFull):
        q.dispatch("t-full", b"", strategy="least_loaded")
    assert loads(r, s) == {b"a": 2, b"b": 6}


def test_two_choices_of_two_nodes_takes_the_less_loaded(r: Client) -> None:
    s = scheduler(r, "dtwo", [("a", 1, None), ("b", 1, None)])
    q = s.queue("jobs")
    for number in range(10):
        q.dispatch(f"t{number}", b"", strategy="two_choices", cost=3)
        spread = loads(r, s)
        assert abs(spread[b"a"] - spread[b"b"]) <= 3
    assert loads(r, s) == {b"a": 15, b"b": 15}


def test_weighted_spreads_by_weight(r: Client) -> None:
    s = scheduler(r, "dweight", [("a", 1, None), ("b", 3, None)])
    q = s.queue("jobs")
    total = 2000
    with s.pipeline() as pipe:
        queued = pipe.queue("jobs")
        for number in range(total):
            queued.dispatch(f"t{number}", b"", strategy="weighted")
        replies = pipe.execute()
    counts = Counter(reply.node for reply in replies)
    assert sum(counts.values()) == total
    # weight 3 of 4: expected 1500, sd ~19.4; 5 sd either way
    assert 1400 <= counts[b"b"] <= 1600, counts
    assert loads(r, s) == {b"a": counts[b"a"], b"b": counts[b"b"]}
    assert q.dispatch_stats(["a", "b"]).nodes[b"b"].ready == counts[b"b"]


def test_round_robin_cycles_in_registration_order(r: Client) -> None:
    s = scheduler(r, "drr", [("a", 1, None), ("b", 5, None), ("c", 1, None)])
    q = s.queue("jobs")
    nodes = [q.dispatch(f"t{number}", b"", strategy="round_robin").node for number in range(7)]
    assert nodes == [b"a", b"b", b"c", b"a", b"b", b"c", b"a"]
    # The same cursor as pick.round_robin: the next pick continues the cycle.
    assert s.pick.round_robin().node == b"b"


def test_priorities_and_fifo_within_a_node(r: Client) -> None:
    s = scheduler(r, "dorder", [("only", 1, None)])
    q = s.queue("jobs")
    for task_id, priority in [("a", 0), ("b", 5), ("c", 0), ("d", -512), ("e", 511)]:
        q.dispatch(task_id, b"", strategy="round_robin", priority=priority)
    leases = q.for_node("only").dequeue_many("w", 10, 10_000)
    assert [lease.task_id for lease in leases] == [b"e", b"b", b"a", b"c", b"d"]
    tokens = [lease.token for lease in leases]
    assert tokens == sorted(tokens) and len(set(tokens)) == 5


# --------------------------------------------------------------------------------------------
# Loads: charged on dispatch, given back by ack, dead letters and expired leases


def test_loads_go_back_to_zero_after_ack_dead_and_expiry(r: Client) -> None:
    s = scheduler(r, "dload", [("a", 1, 100), ("b", 1, 100)])
    q = s.queue("jobs")
    for number in range(12):
        q.dispatch(f"t{number}", b"", strategy="round_robin", cost=2, max_attempts=1)
    assert loads(r, s) == {b"a": 12, b"b": 12}
    a, b = q.for_node("a"), q.for_node("b")
    acked = a.dequeue_many("wa", 6, 10_000)
    for lease in acked:
        assert a.ack(lease)
    assert loads(r, s) == {b"a": 0, b"b": 12}
    # b: two nacked into the dead letters (max_attempts 1), the rest left to expire.
    nacked = b.dequeue_many("wb", 2, 10_000)
    for lease in nacked:
        assert b.nack(lease, reason="boom").state == "dead"
    assert loads(r, s)[b"b"] == 8
    expiring = b.dequeue_many("wb", 10, 150)
    assert len(expiring) == 4
    assert loads(r, s)[b"b"] == 8  # leased tasks stay charged
    time.sleep(0.3)
    assert a.dequeue("wa", 1000) is None  # reclaims the expired leases: dead, load back
    stats = q.dispatch_stats(["a", "b"])
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 6)
    assert stats.nodes[b"a"].load == 0 and stats.nodes[b"b"].load == 0
    assert loads(r, s) == {b"a": 0, b"b": 0}
    assert r.hlen(s.namespace.key("pick:load")) == 0
    with pytest.raises(StaleLease):
        b.ack(expiring[0])  # the late ack of an expired lease


def test_expired_lease_with_attempts_left_is_redelivered_to_its_node(r: Client) -> None:
    s = scheduler(r, "dexpire", [("a", 1, None)])
    q = s.queue("jobs")
    q.dispatch("t", b"p", strategy="least_loaded", max_attempts=3)
    view = q.for_node("a")
    first = view.dequeue("w1", 150)
    assert first is not None and first.attempt == 1
    time.sleep(0.3)
    assert view.dequeue("w2", 10_000) is None  # this call reclaims it (taken by the next)
    second = view.dequeue("w2", 10_000)
    assert second is not None and (second.task_id, second.attempt) == (b"t", 2)
    assert second.token > first.token
    with pytest.raises(StaleLease):
        view.ack(first)
    assert loads(r, s) == {b"a": 1}
    assert view.ack(second)
    assert loads(r, s) == {b"a": 0}


def test_delayed_dispatch_waits_for_the_server_clock(r: Client) -> None:
    s = scheduler(r, "ddelay", [("a", 1, None)])
    q = s.queue("jobs")
    assert q.dispatch("later", b"", strategy="weighted", delay_ms=300).state == "delayed"
    view = q.for_node("a")
    assert view.dequeue("w", 1000) is None
    assert view.stats().assigned == 1 and view.stats().load == 1
    time.sleep(0.4)
    assert view.dequeue("w", 1000) is None  # promotes it into a's queue
    lease = view.dequeue("w", 1000)
    assert lease is not None and lease.task_id == b"later"
    retry = view.nack(lease, delay_ms=0)
    assert retry.state == "ready"
    again = view.dequeue("w", 1000)
    assert again is not None and again.attempt == 2
    assert view.ack(again) and loads(r, s) == {b"a": 0}


# --------------------------------------------------------------------------------------------
# Node leases: extend


def test_node_extend_moves_the_deadline_on_the_server_clock(r: Client) -> None:
    s = scheduler(r, "dext", [("a", 1, None)])
    q = s.queue("jobs")
    q.dispatch("t", b"p", strategy="least_loaded", cost=4, max_attempts=3)
    view = q.for_node("a")
    lease = view.dequeue("w", 200)
    assert lease is not None
    before = server_ms(q)
    deadline = view.extend(lease, 60_000)
    after = server_ms(q)
    assert before + 60_000 <= deadline <= after + 60_000
    leased = DispatchKeys.of(s.namespace, b"jobs").fixed[2]
    assert r.zscore(leased, b"t") == deadline
    # Shorter works too: the deadline is now + lease_ms, not the old one + lease_ms.
    shorter = view.extend(lease, 50)
    assert shorter < deadline and shorter >= after + 50
    assert view.extend(lease, 60_000) >= shorter
    time.sleep(0.3)  # past the first deadline (200 ms) and the shorter one
    # Not reclaimed by a dequeue after the old deadline: still held, still on a, still charged.
    assert view.dequeue("w2", 1000) is None
    stats = q.dispatch_stats(["a"])
    assert (stats.ready, stats.leased) == (0, 1)
    assert stats.nodes[b"a"] == type(stats.nodes[b"a"])(ready=0, assigned=1, load=4)
    assert view.ack(lease)
    assert loads(r, s) == {b"a": 0}


def test_node_extend_revives_an_unreclaimed_lapsed_lease(r: Client) -> None:
    s = scheduler(r, "dextlate", [("a", 1, None)])
    q = s.queue("jobs")
    q.dispatch("t", b"p", strategy="round_robin", max_attempts=3)
    view = q.for_node("a")
    lease = view.dequeue("w", 50)
    assert lease is not None
    time.sleep(0.1)
    assert view.extend(lease, HOUR) > lease.deadline_ms  # past its deadline, not reclaimed: held
    assert view.dequeue("w2", 1000) is None
    assert view.dequeue("w2", 1000) is None  # nothing was reclaimed in between either
    assert view.ack(lease)


def test_node_extend_refuses_stale_leases_and_changes_nothing(r: Client) -> None:
    s = scheduler(r, "dextstale", [("a", 1, None)])
    q = s.queue("jobs")
    view = q.for_node("a")
    q.dispatch("acked", b"", strategy="round_robin")
    acked = view.dequeue("w", HOUR)
    assert acked is not None and view.ack(acked)
    q.dispatch("slow", b"", strategy="round_robin", max_attempts=3)
    old = view.dequeue("w", 50)
    assert old is not None
    time.sleep(0.1)
    assert view.dequeue("w2", HOUR) is None  # reclaims the lapsed lease...
    new = view.dequeue("w2", HOUR)  # ...which the next call takes again
    assert new is not None and new.task_id == b"slow" and new.token > old.token
    wrong = Lease(new.task_id, new.payload, new.attempt, new.token + 1, new.deadline_ms)
    before = snapshot_ignoring_ttl(r, s.namespace)
    for stale in (acked, old, wrong):
        with pytest.raises(StaleLease):
            view.extend(stale, HOUR)
    assert snapshot_ignoring_ttl(r, s.namespace) == before
    assert view.extend(new, HOUR) > new.deadline_ms - 60_000


def test_node_extend_and_requeue_dead_in_a_pipeline(r: Client) -> None:
    s = scheduler(r, "dextpipe", [("a", 1, None)])
    q = s.queue("jobs")
    q.dispatch("held", b"", strategy="round_robin")
    lease = q.for_node("a").dequeue("w", 100)
    assert lease is not None
    q.dispatch("doomed", b"", strategy="round_robin", max_attempts=1)
    kill(q, "a", b"doomed")
    with s.pipeline() as pipe:
        queued = pipe.queue("jobs")
        assert queued.for_node("a").extend(lease, HOUR) is None  # queued, not sent
        assert queued.requeue_dead_dispatched("doomed") is None
        assert queued.requeue_dead_dispatched("held") is None
        deadline, requeued, held = pipe.execute()
    assert deadline >= server_ms(q) + HOUR - 5_000
    assert (requeued.state, requeued.node, requeued.requeued) == ("requeued", b"a", True)
    assert (held.state, held.node, held.requeued) == ("leased", None, False)


# --------------------------------------------------------------------------------------------
# Dead letters: dispatched again


def test_requeue_dead_dispatched_redispatches_charges_and_resets_attempts(r: Client) -> None:
    s = scheduler(r, "drequeue", [("a", 1, None), ("b", 1, None)])
    q = s.queue("jobs")
    sent = q.dispatch("t", b"payload", strategy="round_robin", cost=3, priority=7, max_attempts=2)
    assert sent.node == b"a"
    kill(q, "a", b"t")
    tasks = DispatchKeys.of(s.namespace, b"jobs").fixed[4]
    assert r.hget(tasks, b"rt") == b"boom"
    assert loads(r, s) == {b"a": 0, b"b": 0}  # a dead letter gave its cost back
    assert q.dispatch_stats(["a"]).dead == 1

    again = q.requeue_dead_dispatched("t")
    # round_robin, the task's own strategy: the cursor moved on to b (a took the last pick).
    assert (again.state, again.node, again.requeued) == ("requeued", b"b", True)
    assert loads(r, s) == {b"a": 0, b"b": 3}  # charged as dispatch charges
    stats = q.dispatch_stats(["a", "b"])
    assert (stats.ready, stats.leased, stats.dead) == (1, 0, 0)
    assert stats.nodes[b"b"] == type(stats.nodes[b"b"])(ready=1, assigned=0, load=3)
    assert r.hget(tasks, b"rt") is None  # reason cleared
    # Its priority kept: ahead of a lower one dispatched after it to the same node.
    assert q.dispatch("other", b"", strategy="round_robin", priority=9).node == b"a"
    assert q.dispatch("low", b"", strategy="round_robin", priority=0).node == b"b"
    view = q.for_node("b")
    lease = view.dequeue("w", HOUR)
    assert lease is not None
    assert (lease.task_id, lease.payload, lease.attempt) == (b"t", b"payload", 1)
    # max_attempts kept (2): one failed attempt keeps it alive, the second kills it again.
    assert view.nack(lease, delay_ms=0).state == "ready"
    lease = view.dequeue("w", HOUR)
    assert lease is not None and (lease.task_id, lease.attempt) == (b"t", 2)
    assert loads(r, s)[b"b"] == 4
    assert view.ack(lease)
    assert loads(r, s)[b"b"] == 1  # its 3 given back on ack: only "low" is left on b


def test_requeue_dead_dispatched_slot_task_goes_to_the_slot_owner(r: Client) -> None:
    s = scheduler(r, "drequeueslot", [("a", 1, None), ("b", 1, None), ("c", 1, None)])
    q = s.queue("jobs")
    first = q.dispatch("t", b"", strategy="slot", routing_key="user:42", cost=2, max_attempts=1)
    kill(q, first.node, b"t")
    s.nodes.remove(first.node)
    s.slots.rebalance()
    owner = s.slots.owner("user:42").node
    assert owner is not None and owner != first.node
    again = q.requeue_dead_dispatched("t")
    assert (again.state, again.node) == ("requeued", owner)
    assert loads(r, s)[owner] == 2
    lease = q.for_node(owner).dequeue("w", HOUR)
    assert lease is not None and (lease.task_id, lease.attempt) == (b"t", 1)
    assert q.for_node(owner).ack(lease)
    assert sum(loads(r, s).values()) == 0


def test_requeue_dead_dispatched_without_a_live_node_raises_and_changes_nothing(r: Client) -> None:
    s = Scheduler(r, "drequeuenone", rng=random.Random(7))
    s.nodes.register("a", ttl_ms=300)
    s.nodes.register("b", ttl_ms=300)
    q = s.queue("jobs")
    for strategy in ("least_loaded", "weighted", "round_robin", "two_choices"):
        node = q.dispatch(strategy, b"", strategy=strategy, max_attempts=1).node  # type: ignore[arg-type]
        kill(q, node, strategy.encode())
    time.sleep(0.4)  # every node's heartbeat lapsed (not swept)
    before = snapshot_ignoring_ttl(r, s.namespace)
    for strategy in ("least_loaded", "weighted", "round_robin", "two_choices"):
        with pytest.raises(NoNode):
            q.requeue_dead_dispatched(strategy)
    assert snapshot_ignoring_ttl(r, s.namespace) == before
    assert q.dispatch_stats(["a"]).dead == 4


def test_requeue_dead_dispatched_answers_the_state_of_a_task_that_is_not_dead(r: Client) -> None:
    s = scheduler(r, "drequeuestate", [("a", 1, None)])
    q = s.queue("jobs")
    q.dispatch("ready", b"", strategy="round_robin")
    q.dispatch("leased", b"", strategy="round_robin", priority=5)
    assert q.for_node("a").dequeue("w", HOUR) is not None
    q.dispatch("delayed", b"", strategy="round_robin", delay_ms=HOUR)
    before = snapshot_ignoring_ttl(r, s.namespace)
    for task_id in ("ready", "leased", "delayed", "absent"):
        answer = q.requeue_dead_dispatched(task_id)
        assert (answer.state, answer.node, answer.requeued) == (task_id, None, False)
    assert snapshot_ignoring_ttl(r, s.namespace) == before
    # The plain queue's dead letters are not the dispatch queue's.
    plain = s.queue("jobs")
    plain.enqueue("plain", b"", max_attempts=1)
    held = plain.dequeue("w", HOUR)
    assert held is not None and plain.nack(held).state == "dead"
    assert q.requeue_dead_dispatched("plain").state == "absent"


# --------------------------------------------------------------------------------------------
# A node dies: its queued, leased and delayed tasks are dispatched again


def test_dead_node_tasks_are_redispatched_to_live_nodes_and_none_is_lost(r: Client) -> None:
    s = scheduler(r, "ddeath", [("a", 1, None), ("b", 1, None)])
    s.nodes.register("c", weight=1, ttl_ms=1000)
    q = s.queue("jobs")
    total = 30
    for number in range(total):
        q.dispatch(f"t{number}", f"t{number}", strategy="round_robin", max_attempts=5)
    c = q.for_node("c")
    held = c.dequeue_many("wc", 3, HOUR)
    assert len(held) == 3
    q.dispatch("late", b"late", strategy="round_robin", delay_ms=HOUR)
    assert q.dispatch_stats(["c"]).nodes[b"c"].ready == 7
    assert loads(r, s)[b"c"] == 10  # 7 ready + 3 leased (the delayed one went to a)
    assert q.redispatch("c").node_state == "live"  # a live node keeps its tasks
    time.sleep(1.1)

    first = q.redispatch("c", limit=4)
    assert (first.moved, first.more, first.node_state) == (4, True, "dead")
    rest = q.redispatch("c", limit=100)
    assert (rest.moved, rest.more) == (6, False)
    assert q.redispatch("c") == type(rest)(0, False, "dead")
    stats = q.dispatch_stats(["a", "b", "c"])
    assert stats.nodes[b"c"] == type(stats.nodes[b"c"])(ready=0, assigned=0, load=0)
    assert stats.leased == 0  # the dead node's leases were revoked...
    for lease in held:
        with pytest.raises(StaleLease):  # ...so its worker's late acks are refused
            c.ack(lease)
        with pytest.raises(StaleLease):  # ...and so are its extends
            c.extend(lease, HOUR)
    done = drain_node(q, b"a") + drain_node(q, b"b")
    assert sorted(lease.task_id for lease in done) == sorted(
        f"t{number}".encode() for number in range(total)
    )
    assert loads(r, s) == {b"a": 1, b"b": 0, b"c": 0}  # the delayed task, still on a
    assert q.dispatch_stats(["a"]).delayed == 1


def test_removed_node_tasks_move_and_delayed_ones_stay_delayed(r: Client) -> None:
    s = scheduler(r, "dremoved", [("a", 1, None), ("b", 1, None)])
    q = s.queue("jobs")
    q.dispatch("now", b"", strategy="slot", routing_key="k1")
    q.dispatch("later", b"", strategy="slot", routing_key="k1", delay_ms=HOUR)
    owner = s.slots.owner("k1").node
    assert owner is not None
    other = b"a" if owner == b"b" else b"b"
    s.nodes.remove(owner)
    with pytest.raises(NoNode):  # the slot has no owner until a rebalance: nothing moves
        q.redispatch(owner)
    s.slots.rebalance()
    moved = q.redispatch(owner)
    assert (moved.moved, moved.more, moved.node_state) == (2, False, "absent")
    stats = q.dispatch_stats([other])
    assert stats.nodes[other] == type(stats.nodes[other])(ready=1, assigned=1, load=2)
    assert stats.delayed == 1


def test_redispatch_with_an_exhausted_seq_fails_before_any_write(r: Client) -> None:
    s = scheduler(r, "dseqmax", [("a", 1, None), ("b", 1, None)])
    q = s.queue("jobs")
    node = q.dispatch("held", b"", strategy="round_robin").node
    lease = q.for_node(node).dequeue("w", HOUR)
    assert lease is not None
    s.nodes.remove(node)
    r.hset(q.dispatch_keys.fixed[4], "seq", 8796093022207)  # the last sequence number (2^43 - 1)
    before = snapshot_ignoring_ttl(r, s.namespace)
    with pytest.raises(CorruptState, match="sequence"):  # the revoked lease needs a new seq
        q.redispatch(node)
    assert snapshot_ignoring_ttl(r, s.namespace) == before  # the other node was not charged


# --------------------------------------------------------------------------------------------
# Idempotency


def test_dispatch_is_idempotent_by_task_id_and_by_request_id(r: Client) -> None:
    s = scheduler(r, "didem", [("a", 1, None), ("b", 1, None)])
    q = s.queue("jobs")
    first = q.dispatch("t", b"p", strategy="round_robin", request_id="rid-1")
    replay = q.dispatch("t", b"p", strategy="round_robin", request_id="rid-1")
    assert replay == first
    again = q.dispatch("t", b"other", strategy="round_robin")
    assert (again.created, again.state, again.node) == (False, "ready", first.node)
    assert sum(loads(r, s).values()) == 1
    assert s.pick.round_robin().node != first.node  # the cursor moved once

    view = q.for_node(first.node)
    lease = view.dequeue("w", HOUR, request_id="rid-2")
    assert lease is not None
    assert view.dequeue("w", HOUR, request_id="rid-2") == lease
    assert view.ack(lease, request_id="rid-3")
    assert view.ack(lease, request_id="rid-3")  # the replay answers the first reply
    with pytest.raises(StaleLease):
        view.ack(lease)
    assert sum(loads(r, s).values()) == 0
    # A finished id can be dispatched again.
    assert q.dispatch("t", b"p", strategy="round_robin").created


def test_async_twin(r: Client, server: Any) -> None:
    async def run() -> None:
        client = server.async_client()
        try:
            s = luasched.asyncio.Scheduler(client, "dasync", rng=random.Random(3))
            await s.nodes.register("a", weight=1, ttl_ms=HOUR)
            await s.nodes.register("b", weight=1, ttl_ms=HOUR)
            q = s.queue("jobs")
            sent = [await q.dispatch(f"t{n}", b"", strategy="round_robin") for n in range(4)]
            assert [d.node for d in sent] == [b"a", b"b", b"a", b"b"]
            view = q.for_node("a")
            leases = await view.dequeue_many("w", 5, HOUR)
            assert [lease.task_id for lease in leases] == [b"t0", b"t2"]
            assert await view.ack(leases[0])
            assert (await view.nack(leases[1], delay_ms=0)).state == "ready"
            assert (await view.stats()).load == 1
            assert (await q.redispatch("a")).node_state == "live"
            lease = await view.dequeue("w", 100)
            assert lease is not None and lease.task_id == b"t2"
            assert await view.extend(lease, HOUR) > lease.deadline_ms
            assert (await q.requeue_dead_dispatched("t2")).state == "leased"
            assert await view.ack(lease)
            await q.dispatch("dead", b"", strategy="round_robin", max_attempts=1)  # to a
            doomed = await view.dequeue("w", HOUR)
            assert doomed is not None and doomed.task_id == b"dead"
            assert (await view.nack(doomed)).state == "dead"
            again = await q.requeue_dead_dispatched("dead")  # round robin: b is next
            assert (again.state, again.node) == ("requeued", b"b")
            assert (await q.dispatch_stats(["b"])).nodes[b"b"].ready == 3
        finally:
            await client.aclose()

    asyncio.run(run())


# --------------------------------------------------------------------------------------------
# Blocking wait of node queues: each node's own wake list


def _owned_key(s: Scheduler, node: bytes) -> str:
    """A routing key whose slot node ``node`` owns (strategy slot sends it there)."""
    return next(key for n in range(10_000) if s.slots.owner(key := f"k{n}").node == node)


def _blocked_node_take(view: Any, block_ms: int, out: list[Any]) -> None:
    started = time.monotonic()
    lease = view.dequeue("sleeper", 10_000, block_ms=block_ms)
    out.append((lease, time.monotonic() - started))


def _block_in_thread(view: Any, block_ms: int) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    waiter = threading.Thread(target=_blocked_node_take, args=(view, block_ms, out), daemon=True)
    waiter.start()
    time.sleep(0.3)  # registered and in its BLPOP
    return waiter, out


def test_node_worker_wakes_on_dispatch_to_its_node_only(server: Any, r: Client) -> None:
    s = scheduler(server.client(), "dwait", [("a", 1, None), ("b", 1, None)])
    q = s.queue("jobs", poll_ms=5_000)  # a wake-up well under 5 s came from the signal
    producer = scheduler(r, "dwait", []).queue("jobs")
    keys = q.dispatch_keys
    assert (keys.wake, keys.waiters, keys.node_wait(b"a").lists) == (
        b"luasched:{dwait}:d:wake:jobs",
        b"luasched:{dwait}:d:waiters:jobs",
        (b"luasched:{dwait}:d:node-wake:61:jobs", b"luasched:{dwait}:d:wake:jobs"),
    )
    waiter, out = _block_in_thread(q.for_node("a"), 8_000)
    now_ms = server_ms(producer)
    assert now_ms + 7_000 < float(r.zscore(keys.waiters, b"61") or 0) <= now_ms + 8_000
    assert r.zscore(keys.waiters, b"62") is None and 7_000 < r.pttl(keys.waiters) <= 8_000
    # A task for b: no signal (nobody of b waits); a stays blocked.
    assert (
        producer.dispatch("for-b", b"", strategy="slot", routing_key=_owned_key(s, b"b")).node
        == b"b"
    )
    time.sleep(0.6)
    assert waiter.is_alive() and not out
    assert not r.exists(keys.wake)
    # A task for a wakes it at once.
    sent = time.monotonic()
    assert (
        producer.dispatch("for-a", b"x", strategy="slot", routing_key=_owned_key(s, b"a")).node
        == b"a"
    )
    waiter.join(5)
    lease, _ = out[0]
    assert lease is not None and lease.task_id == b"for-a"
    assert time.monotonic() - sent < 3.0  # well before the 5 s poll
    assert r.llen(keys.wake) <= 16
    # Nothing arrives: the wait ends at block_ms with None (b's task stays b's).
    started = time.monotonic()
    assert q.for_node("a").dequeue_many("w", 5, 1000, block_ms=200) == []
    assert 0.19 < time.monotonic() - started < 3.0
    assert [lease.task_id for lease in drain_node(q, b"b")] == [b"for-b"]


def test_a_signal_popped_by_another_nodes_worker_is_passed_on(server: Any, r: Client) -> None:
    """Workers of b and a block (b's first, so BLPOP serves it the queue's next signal); a task
    for a: b's worker pops a's signal, passes it on to a's own list and stays blocked; a's
    worker wakes at once (well before its 5 s poll)."""
    s = scheduler(r, "dpass", [("a", 1, None), ("b", 1, None)])
    first = scheduler(server.client(), "dpass", []).queue("jobs", poll_ms=5_000)
    second = scheduler(server.client(), "dpass", []).queue("jobs", poll_ms=5_000)
    waiter_b, out_b = _block_in_thread(first.for_node("b"), 4_000)
    waiter_a, out_a = _block_in_thread(second.for_node("a"), 8_000)
    sent = time.monotonic()
    q = s.queue("jobs")
    assert q.dispatch("for-a", b"", strategy="slot", routing_key=_owned_key(s, b"a")).node == b"a"
    waiter_a.join(5)
    lease, _ = out_a[0]
    assert lease is not None and lease.task_id == b"for-a"
    assert time.monotonic() - sent < 3.0  # well before the 5 s poll
    assert waiter_b.is_alive() and not out_b
    waiter_b.join(5)
    assert out_b[0][0] is None


def test_pass_on_goes_to_the_named_nodes_own_list_bounded() -> None:
    wait = DispatchKeys.of(Namespace("ns"), b"q").node_wait(b"a")
    shared, own_b = b"luasched:{ns}:d:wake:q", b"luasched:{ns}:d:node-wake:62:q"
    assert wait.pass_on([shared, b"62"]) == own_b
    assert wait.pass_on((shared.decode(), "62")) == own_b
    for popped in (None, [shared, b"61"], [wait.lists[0], b"62"], [shared, b"6"], [shared, b"zz"]):
        assert wait.pass_on(popped) is None, popped
    assert pass_on_commands(own_b, b"62") == (
        ("LPUSH", own_b, b"62"),
        ("LTRIM", own_b, 0, 15),
        ("PEXPIRE", own_b, 2_000),
    )


def test_node_worker_wakes_for_delayed_nack_and_redispatched_tasks(server: Any, r: Client) -> None:
    s = scheduler(server.client(), "dwake", [("a", 1, None), ("b", 1, None)])
    q = s.queue("jobs", poll_ms=5_000)
    producer = scheduler(r, "dwake", []).queue("jobs")
    key_a = _owned_key(s, b"a")
    view = q.for_node("a")
    # Dispatched delayed before the wait: the worker wakes when it is due (promotion).
    producer.dispatch("soon", b"", strategy="slot", routing_key=key_a, delay_ms=400)
    out: list[Any] = []
    _blocked_node_take(view, 5_000, out)
    lease, waited = out[0]
    assert lease is not None and lease.task_id == b"soon"
    assert 0.35 < waited < 3.0  # at the due time, not at the 5 s poll
    # Dispatched delayed while it waits: woken by the dispatch, it waits for the due time.
    waiter, out = _block_in_thread(view, 5_000)
    sent = time.monotonic()
    producer.dispatch("later", b"", strategy="slot", routing_key=key_a, delay_ms=300)
    waiter.join(5)
    assert out[0][0] is not None and out[0][0].task_id == b"later"
    assert 0.25 < time.monotonic() - sent < 3.0  # well before the 5 s poll
    # A nack with no delay wakes another worker of the node.
    waiter, out = _block_in_thread(view, 5_000)
    nacked = time.monotonic()
    assert producer.for_node("a").nack(lease, delay_ms=0).state == "ready"
    waiter.join(5)
    assert out[0][0] is not None and out[0][0].task_id == b"soon" and out[0][0].attempt == 2
    assert time.monotonic() - nacked < 3.0  # well before the 5 s poll
    # Redispatch off a drained node wakes the worker of the node the task moves to.
    assert producer.dispatch("moved", b"", strategy="least_loaded").node == b"b"  # a: load 2
    s.nodes.drain("b")
    waiter, out = _block_in_thread(view, 5_000)
    moved = time.monotonic()
    assert producer.redispatch("b").moved == 1
    waiter.join(5)
    assert out[0][0] is not None and out[0][0].task_id == b"moved"
    assert time.monotonic() - moved < 3.0  # well before the 5 s poll


def test_requeued_dead_letter_wakes_the_chosen_nodes_worker(server: Any, r: Client) -> None:
    s = scheduler(server.client(), "dwakedead", [("a", 1, None)])
    q = s.queue("jobs", poll_ms=5_000)
    producer = scheduler(r, "dwakedead", []).queue("jobs")
    producer.dispatch("dead", b"", strategy="least_loaded", max_attempts=1)
    kill(producer, b"a", b"dead")
    waiter, out = _block_in_thread(q.for_node("a"), 5_000)
    sent = time.monotonic()
    assert producer.requeue_dead_dispatched("dead").node == b"a"
    waiter.join(5)
    assert out[0][0] is not None and out[0][0].task_id == b"dead" and out[0][0].attempt == 1
    assert time.monotonic() - sent < 3.0  # well before the 5 s poll


def test_wait_ms_registers_the_node_in_the_waiters(r: Client) -> None:
    s = scheduler(r, "dreg", [("a", 1, None)])
    q = s.queue("jobs")
    keys = q.dispatch_keys

    def take(node: bytes, wait_ms: int) -> Any:
        return s.runner.run(node_dequeue_call(keys, node, "w", 1, 1000, wait_ms=wait_ms))

    assert len(node_dequeue_call(keys, b"a", "w", 1, 1000).args) == 6  # as before: no wait_ms
    assert take(b"a", 0).next_due_ms is None and not r.exists(keys.waiters)
    now_ms = server_ms(q)
    assert take(b"a", 2_500).next_due_ms is None  # -1: nothing delayed
    deadline = float(r.zscore(keys.waiters, b"61") or 0)
    assert now_ms + 2_500 <= deadline <= server_ms(q) + 2_500
    assert 2_000 < r.pttl(keys.waiters) <= 2_500
    take(b"a", 1_000)  # only ever lengthened
    assert r.zscore(keys.waiters, b"61") == deadline and r.pttl(keys.waiters) > 1_500
    q.dispatch("later", b"", strategy="least_loaded", delay_ms=60_000)
    assert 59_000 < take(b"other", 100).next_due_ms <= 60_000  # the dispatch queue's next due
    assert r.zscore(keys.waiters, b"other".hex()) is not None
    assert r.lrange(keys.wake, 0, -1) == [b"61"]  # the delayed dispatch woke a
    assert 0 < r.pttl(keys.wake) <= 2_000
    # A lapsed waiter is dropped at the next registration.
    time.sleep(0.15)
    take(b"a", 1_000)
    assert r.zscore(keys.waiters, b"other".hex()) is None


def test_blocking_node_dequeue_twins(server: Any, r: Client) -> None:
    s = scheduler(r, "dtwin", [("a", 1, None)])
    with s.pipeline() as pipe, pytest.raises(ValueError, match="pipeline"):
        pipe.queue("jobs").for_node("a").dequeue("w", 1000, block_ms=100)

    async def run() -> tuple[Any, float]:
        client = server.async_client()
        try:
            q = luasched.asyncio.Scheduler(client, "dtwin").queue("jobs", poll_ms=5_000)
            view = q.for_node("a")
            assert await view.dequeue_many("w", 2, 1000, block_ms=100) == []

            async def later() -> None:
                await asyncio.sleep(0.3)
                await q.dispatch("t", b"", strategy="least_loaded")

            started = time.monotonic()
            lease, _ = await asyncio.gather(view.dequeue("w", 1000, block_ms=4_000), later())
            return lease, time.monotonic() - started
        finally:
            await client.aclose()

    lease, waited = asyncio.run(run())
    assert lease is not None and lease.task_id == b"t"
    assert 0.25 < waited < 1.3


# --------------------------------------------------------------------------------------------
# Every error path: refused, and no key of the namespace changed

NS = "derr"
QUEUE = b"jobs"
T = 60_000
R = 12345


def _populated(r: Client, s: Scheduler) -> None:
    # a and b full (capacity 1): t0 ready on a, t1 leased on b (its token: HELD_TOKEN).
    s.nodes.register("a", weight=1, capacity=1, ttl_ms=HOUR)
    s.nodes.register("b", weight=2, capacity=1, ttl_ms=HOUR)
    s.slots.rebalance()
    q = s.queue(QUEUE)
    assert q.dispatch("t0", b"x", strategy="round_robin").node == b"a"
    assert q.dispatch("t1", b"y", strategy="round_robin").node == b"b"
    lease = q.for_node("b").dequeue("w", HOUR)
    assert lease is not None


def _empty_registry(r: Client, s: Scheduler) -> None:
    r.set(s.namespace.key("seed"), b"1")


def _dead_crowd(r: Client, s: Scheduler) -> None:
    # 130 nodes whose heartbeat lapsed (not swept): the walks give up after 128 of them. t0 was
    # dispatched to the first one while it lived; t1 (least_loaded) died there.
    def register_all(ttl_ms: int) -> None:
        with s.pipeline() as pipe:
            for number in range(130):
                pipe.nodes.register(f"n{number:03d}", ttl_ms=ttl_ms)
            pipe.execute()

    register_all(HOUR)
    q = s.queue(QUEUE)
    assert q.dispatch("t0", b"", strategy="round_robin").node == b"n000"
    kill(q, q.dispatch("t1", b"", strategy="least_loaded", max_attempts=1).node, b"t1")
    register_all(1)
    time.sleep(0.02)


def _orphan(strategy: str, capacity: int | None = None) -> Any:
    # t0 (then t1) dispatched with `strategy` to "gone", which was removed since; with
    # `capacity`, node "a" (that capacity) registered afterwards. td (`strategy`, routing key
    # "k") died on "gone" before.
    def setup(r: Client, s: Scheduler) -> None:
        s.nodes.register("gone", ttl_ms=HOUR)
        s.slots.rebalance()
        q = s.queue(QUEUE)
        q.dispatch("td", b"", strategy=strategy, routing_key="k", max_attempts=1)  # type: ignore[arg-type]
        kill(q, "gone", b"td")
        q.dispatch("t0", b"", strategy=strategy, routing_key="k")  # type: ignore[arg-type]
        q.dispatch("t1", b"", strategy="least_loaded")
        s.nodes.remove("gone")
        if capacity is not None:
            s.nodes.register("a", capacity=capacity, ttl_ms=HOUR)

    return setup


def _wrong(kind: int, base: Any = _populated) -> Any:
    def setup(r: Client, s: Scheduler) -> None:
        base(r, s)
        key = DispatchKeys.of(s.namespace, QUEUE).fixed[kind]
        r.delete(key)
        r.set(key, b"not the layout's type")

    return setup


def _bad_route(base: Any, task: bytes = b"t0") -> Any:
    def setup(r: Client, s: Scheduler) -> None:
        base(r, s)
        r.hset(DispatchKeys.of(s.namespace, QUEUE).fixed[4], b"n" + task, b"garbage")

    return setup


def _wrong_wake(drain: bool) -> Any:
    # Workers of a and b wait (in the waiters zset) but the wake list holds a string; t2 is a
    # delayed task of a, due now (a node_dequeue promotes it); with `drain`, a is draining.
    def setup(r: Client, s: Scheduler) -> None:
        _populated(r, s)
        s.queue(QUEUE).dispatch("t2", b"", strategy="round_robin", delay_ms=1)
        keys = DispatchKeys.of(s.namespace, QUEUE)
        r.zadd(keys.waiters, {b"61": 2**50, b"62": 2**50})
        r.set(keys.wake, b"not a list")
        if drain:
            s.nodes.drain("a")
        time.sleep(0.01)

    return setup


def _wrong_waiters(r: Client, s: Scheduler) -> None:
    # The waiters zset is a string; t2 is a delayed task of a, due now.
    _populated(r, s)
    s.queue(QUEUE).dispatch("t2", b"", strategy="round_robin", delay_ms=1)
    r.set(DispatchKeys.of(s.namespace, QUEUE).waiters, b"not a zset")
    time.sleep(0.01)


SETUPS = {
    "populated": _populated,
    "wrong_wake": _wrong_wake(drain=False),
    "drained_wrong_wake": _wrong_wake(drain=True),
    "wrong_waiters": _wrong_waiters,
    "empty": _empty_registry,
    "crowd": _dead_crowd,
    "orphan": _orphan("round_robin"),
    "orphan_full": _orphan("least_loaded", capacity=0),
    "wrong_tasks": _wrong(4),
    "wrong_ready": _wrong(0),
    "bad_route": _bad_route(_populated),
    "orphan_bad_route": _bad_route(_orphan("round_robin")),
    "orphan_slot": _orphan("slot"),
    "dead_wrong_ready": _wrong(0, _orphan("least_loaded", capacity=5)),
    "dead_bad_route": _bad_route(_orphan("least_loaded", capacity=5), b"td"),
}


def _dispatch(task: bytes, strategy: bytes = b"least_loaded", cost: int = 1, **kw: Any) -> tuple:
    args = {"key": b"", "priority": 0, "delay": 0, "attempts": 5, "rid": b""} | kw
    return (
        task,
        b"p",
        strategy,
        args["key"],
        cost,
        args["priority"],
        args["delay"],
        args["attempts"],
        R,
        R,
        R,
        args["rid"],
        T,
    )


ERROR_CASES: list[tuple[Any, ...]] = [
    # queue.dispatch
    ("queue.dispatch", "populated", "short", _dispatch(b"n"), "ARG", "expected 21 key(s), got 20"),
    ("queue.dispatch", "populated", "ok", _dispatch(b"n")[:-1], "ARG", "expected 13 argument"),
    (
        "queue.dispatch",
        "populated",
        "ok",
        _dispatch(b"n", b"random"),
        "ARG",
        "strategy must be one of slot|least_loaded|two_choices|weighted|round_robin",
    ),
    ("queue.dispatch", "populated", "ok", _dispatch(b"n", cost=0), "ARG", "cost must be between"),
    (
        "queue.dispatch",
        "populated",
        "ok",
        _dispatch(b"n", priority=512),
        "ARG",
        "priority must be between -512 and 511, got 512",
    ),
    (
        "queue.dispatch",
        "populated",
        "ok",
        _dispatch(b"n", rid=b"a:b"),
        "ARG",
        'request_id may hold only letters, digits, "_" and "-"',
    ),
    ("queue.dispatch", "empty", "ok", _dispatch(b"n"), "NONODE", "no live node"),
    ("queue.dispatch", "empty", "ok", _dispatch(b"n", b"slot"), "NONODE", "has no live owner"),
    ("queue.dispatch", "populated", "ok", _dispatch(b"n"), "ATCAPACITY", "every live node"),
    ("queue.dispatch", "crowd", "ok", _dispatch(b"n"), "SCANLIMIT", "the first 128 candidates"),
    ("queue.dispatch", "wrong_tasks", "ok", _dispatch(b"n"), "CORRUPT", "holds another type"),
    ("queue.dispatch", "bad_route", "ok", _dispatch(b"t0"), "CORRUPT", "malformed route"),
    # queue.node_dequeue
    ("queue.node_dequeue", "populated", "long", (b"a", b"w", 1, 10, b"", T), "ARG", "got 22"),
    (
        "queue.node_dequeue",
        "populated",
        "ok",
        (b"a", b"w", 0, 10, b"", T),
        "ARG",
        "count must be between 1 and 1000, got 0",
    ),
    (
        "queue.node_dequeue",
        "populated",
        "ok",
        (b"", b"w", 1, 10, b"", T),
        "ARG",
        "node_id must be 1 to 1024 bytes long, got 0 bytes",
    ),
    (
        "queue.node_dequeue",
        "wrong_tasks",
        "ok",
        (b"a", b"w", 1, 10, b"", T),
        "CORRUPT",
        "holds another type",
    ),
    ("queue.node_dequeue", "populated", "ok", (b"a", b"w", 1, 10, b"", T, 0, 0), "ARG", "6 to 7"),
    (
        "queue.node_dequeue",
        "populated",
        "ok",
        (b"a", b"w", 1, 10, b"", T, -1),
        "ARG",
        "wait_ms must be between 0 and 31536000000, got -1",
    ),
    (
        "queue.node_dequeue",
        "wrong_wake",
        "ok",
        (b"c", b"w", 1, 10, b"", T),
        "CORRUPT",
        "d:wake:jobs",
    ),
    ("queue.dispatch", "wrong_wake", "ok", _dispatch(b"n", b"round_robin"), "CORRUPT", "d:wake:jo"),
    (
        "queue.node_nack",
        "wrong_wake",
        "ok",
        (b"t1", HELD_TOKEN, 0, b"", 1, 1, b"", T),
        "CORRUPT",
        "wake:jobs",
    ),
    ("queue.redispatch", "drained_wrong_wake", "ok", (b"a", 1, R), "CORRUPT", "d:wake:jobs"),
    # A waiters zset of another type: registering a wait (the first write, or after moves) and
    # every check for a waiter refuse before any write.
    (
        "queue.node_dequeue",
        "wrong_waiters",
        "ok",
        (b"c", b"w", 1, 10, b"", T, 1000),
        "CORRUPT",
        "d:waiters:jobs",
    ),
    ("queue.dispatch", "wrong_waiters", "ok", _dispatch(b"n", b"slot"), "CORRUPT", "d:waiters:"),
    # queue.node_ack
    ("queue.node_ack", "populated", "short", (b"t1", 1, b"", T), "ARG", "got 20"),
    ("queue.node_ack", "populated", "ok", (b"t1", 0, b"", T), "ARG", "token must be between"),
    ("queue.node_ack", "populated", "ok", (b"t1", 9, b"", T), "STALE", 'task "t1" with token 9'),
    ("queue.node_ack", "populated", "ok", (b"t0", 1, b"", T), "STALE", "is no longer held"),
    ("queue.node_ack", "wrong_tasks", "ok", (b"t1", 1, b"", T), "CORRUPT", "another type"),
    # queue.node_nack
    ("queue.node_nack", "populated", "ok", (b"t1", 1, -2, b"", 1, 1, b"", T), "ARG", "delay_ms"),
    ("queue.node_nack", "populated", "ok", (b"t1", 5, 0, b"", 1, 1, b"", T), "STALE", "token 5"),
    (
        "queue.node_nack",
        "wrong_tasks",
        "ok",
        (b"t1", 1, 0, b"", 1, 1, b"", T),
        "CORRUPT",
        "holds another type",
    ),
    # queue.redispatch
    ("queue.redispatch", "populated", "short", (b"a", 1, R), "ARG", "got 20"),
    ("queue.redispatch", "populated", "ok", (b"a", 101, R), "ARG", "limit must be between 1"),
    ("queue.redispatch", "populated", "ok", (b"a", 1), "ARG", "expected 3 argument(s), got 2"),
    ("queue.redispatch", "orphan", "ok", (b"gone", 1, R), "NONODE", "no live node"),
    ("queue.redispatch", "orphan_full", "ok", (b"gone", 1, R), "ATCAPACITY", "every live node"),
    ("queue.redispatch", "crowd", "ok", (b"n000", 1, R), "SCANLIMIT", "the first 128"),
    ("queue.redispatch", "orphan_bad_route", "ok", (b"gone", 1, R), "CORRUPT", "malformed"),
    # queue.node_extend
    ("queue.node_extend", "populated", "short", (b"t1", 1, 10), "ARG", "got 20"),
    ("queue.node_extend", "populated", "ok", (b"t1", 1), "ARG", "expected 3 argument(s), got 2"),
    ("queue.node_extend", "populated", "ok", (b"t1", 1, 0), "ARG", "lease_ms must be between 1"),
    ("queue.node_extend", "populated", "ok", (b"t1", 2, 10), "STALE", 'task "t1" with token 2'),
    ("queue.node_extend", "populated", "ok", (b"t0", 1, 10), "STALE", "is no longer held"),
    ("queue.node_extend", "populated", "ok", (b"zz", 1, 10), "STALE", "is no longer held"),
    ("queue.node_extend", "wrong_tasks", "ok", (b"t1", 1, 10), "CORRUPT", "another type"),
    # queue.dispatch_requeue_dead
    ("queue.dispatch_requeue_dead", "orphan", "long", (b"td", R), "ARG", "got 22"),
    ("queue.dispatch_requeue_dead", "orphan", "ok", (b"td",), "ARG", "expected 2 argument(s)"),
    ("queue.dispatch_requeue_dead", "orphan", "ok", (b"", R), "ARG", "task_id must be 1 to"),
    ("queue.dispatch_requeue_dead", "orphan", "ok", (b"td", -1), "ARG", "seed must be between"),
    ("queue.dispatch_requeue_dead", "orphan", "ok", (b"td", R), "NONODE", "no live node"),
    ("queue.dispatch_requeue_dead", "orphan_slot", "ok", (b"td", R), "NONODE", "no live owner"),
    ("queue.dispatch_requeue_dead", "orphan_full", "ok", (b"td", R), "ATCAPACITY", "every live"),
    ("queue.dispatch_requeue_dead", "crowd", "ok", (b"t1", R), "SCANLIMIT", "the first 128"),
    ("queue.dispatch_requeue_dead", "dead_bad_route", "ok", (b"td", R), "CORRUPT", "malformed"),
    (
        "queue.dispatch_requeue_dead",
        "dead_wrong_ready",
        "ok",
        (b"td", R),
        "CORRUPT",
        "another type",
    ),
    # queue.node_stats
    ("queue.node_stats", "populated", "short", (b"a",), "ARG", "expected 21 key(s), got 20"),
    ("queue.node_stats", "populated", "ok", (), "ARG", "expected 1 to 100 arguments, got 0"),
    ("queue.node_stats", "populated", "ok", (b"",), "ARG", "node_id must be 1 to 1024 bytes"),
    ("queue.node_stats", "wrong_ready", "ok", (b"a",), "CORRUPT", "holds another type"),
]

DISPATCH_SCRIPTS = {
    name
    for name, script in render_all().items()
    if script.spec.keys and script.spec.keys[0].pattern.startswith("luasched:{ns}:d:")
}


def test_every_dispatch_script_and_error_code_is_covered() -> None:
    assert len(DISPATCH_SCRIPTS) == 8
    assert_codes_covered(ERROR_CASES, DISPATCH_SCRIPTS)


@pytest.mark.parametrize(
    ("script", "setup", "keys", "args", "code", "detail"),
    ERROR_CASES,
    ids=[f"{case[0]}-{case[4]}-{index}" for index, case in enumerate(ERROR_CASES)],
)
def test_bad_input_is_refused_and_changes_nothing(
    r: Client, script: str, setup: str, keys: str, args: tuple[Any, ...], code: str, detail: str
) -> None:
    s = Scheduler(r, NS, rng=random.Random(5))
    SETUPS[setup](r, s)
    # Request records expire; without a TTL their snapshot does not change while the test runs.
    for key in snapshot(r, s.namespace):
        r.persist(key)
    assert snapshot(r, s.namespace)
    base = list(DispatchKeys.of(s.namespace, QUEUE).with_request(b""))
    key_list = {"ok": base, "short": base[:-1], "long": [*base, s.namespace.key("x")]}[keys]
    if HELD_TOKEN in args:
        args = with_held_tokens(r, base[4], args)
    assert_refused(r, s, script, key_list, args, code, detail, exact=False)
