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
from helpers import assert_codes_covered, assert_refused, snapshot
from luasched import Scheduler
from luasched.errors import AllNodesFull, NoNode, StaleLease
from luasched.queue import DispatchKeys, Lease, node_dequeue_call
from luasched.render import render_all

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
            assert (await q.dispatch_stats(["b"])).nodes[b"b"].ready == 2
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
    wake_a, waiting_a = q.dispatch_keys.node_wait(b"a")
    wake_b, waiting_b = q.dispatch_keys.node_wait(b"b")
    assert (wake_a, waiting_b) == (b"luasched:{dwait}:d:wake:61:jobs",
                                   b"luasched:{dwait}:d:waiting:62:jobs")  # fmt: skip
    waiter, out = _block_in_thread(q.for_node("a"), 8_000)
    assert 7_000 < r.pttl(waiting_a) <= 8_000 and not r.exists(waiting_b)
    # A task for b: no signal for a (nor for b, where nobody waits); a stays blocked.
    assert (
        producer.dispatch("for-b", b"", strategy="slot", routing_key=_owned_key(s, b"b")).node
        == b"b"
    )
    time.sleep(0.6)
    assert waiter.is_alive() and not out
    assert not r.exists(wake_a) and not r.exists(wake_b)
    # A task for a wakes it at once.
    sent = time.monotonic()
    assert (
        producer.dispatch("for-a", b"x", strategy="slot", routing_key=_owned_key(s, b"a")).node
        == b"a"
    )
    waiter.join(5)
    lease, _ = out[0]
    assert lease is not None and lease.task_id == b"for-a"
    assert time.monotonic() - sent < 1.0
    assert r.llen(wake_a) <= 16
    # Nothing arrives: the wait ends at block_ms with None (b's task stays b's).
    started = time.monotonic()
    assert q.for_node("a").dequeue_many("w", 5, 1000, block_ms=200) == []
    assert 0.19 < time.monotonic() - started < 1.5
    assert [lease.task_id for lease in drain_node(q, b"b")] == [b"for-b"]


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
    assert 0.35 < waited < 1.0
    # Dispatched delayed while it waits: woken by the dispatch, it waits for the due time.
    waiter, out = _block_in_thread(view, 5_000)
    sent = time.monotonic()
    producer.dispatch("later", b"", strategy="slot", routing_key=key_a, delay_ms=300)
    waiter.join(5)
    assert out[0][0] is not None and out[0][0].task_id == b"later"
    assert 0.25 < time.monotonic() - sent < 1.0
    # A nack with no delay wakes another worker of the node.
    waiter, out = _block_in_thread(view, 5_000)
    nacked = time.monotonic()
    assert producer.for_node("a").nack(lease, delay_ms=0).state == "ready"
    waiter.join(5)
    assert out[0][0] is not None and out[0][0].task_id == b"soon" and out[0][0].attempt == 2
    assert time.monotonic() - nacked < 1.0
    # Redispatch off a drained node wakes the worker of the node the task moves to.
    assert producer.dispatch("moved", b"", strategy="least_loaded").node == b"b"  # a: load 2
    s.nodes.drain("b")
    waiter, out = _block_in_thread(view, 5_000)
    moved = time.monotonic()
    assert producer.redispatch("b").moved == 1
    waiter.join(5)
    assert out[0][0] is not None and out[0][0].task_id == b"moved"
    assert time.monotonic() - moved < 1.0


def test_wait_ms_registers_the_node_waiting_key(r: Client) -> None:
    s = scheduler(r, "dreg", [("a", 1, None)])
    q = s.queue("jobs")
    keys = q.dispatch_keys
    wake, waiting = keys.node_wait(b"a")

    def take(node: bytes, wait_ms: int) -> Any:
        return s.runner.run(node_dequeue_call(keys, node, "w", 1, 1000, wait_ms=wait_ms))

    assert len(node_dequeue_call(keys, b"a", "w", 1, 1000).args) == 6  # as before: no wait_ms
    assert take(b"a", 0).next_due_ms is None and not r.exists(waiting)
    assert take(b"a", 2_500).next_due_ms is None  # -1: nothing delayed
    assert 2_000 < r.pttl(waiting) <= 2_500 and r.get(waiting) == b"1"
    take(b"a", 1_000)  # only ever lengthened
    assert r.pttl(waiting) > 1_500
    q.dispatch("later", b"", strategy="least_loaded", delay_ms=60_000)
    assert 59_000 < take(b"other", 100).next_due_ms <= 60_000  # the dispatch queue's next due
    assert 0 < r.pttl(keys.node_wait(b"other")[1]) <= 100
    assert r.llen(wake) == 1 and 0 < r.pttl(wake) <= 2_000  # the delayed dispatch woke a


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
    # a and b full (capacity 1): t0 ready on a, t1 leased on b with token 1.
    s.nodes.register("a", weight=1, capacity=1, ttl_ms=HOUR)
    s.nodes.register("b", weight=2, capacity=1, ttl_ms=HOUR)
    s.slots.rebalance()
    q = s.queue(QUEUE)
    assert q.dispatch("t0", b"x", strategy="round_robin").node == b"a"
    assert q.dispatch("t1", b"y", strategy="round_robin").node == b"b"
    lease = q.for_node("b").dequeue("w", HOUR)
    assert lease is not None and lease.token == 1


def _empty_registry(r: Client, s: Scheduler) -> None:
    r.set(s.namespace.key("seed"), b"1")


def _dead_crowd(r: Client, s: Scheduler) -> None:
    # 130 nodes whose heartbeat lapsed (not swept): the walks give up after 128 of them. t0 was
    # dispatched to the first one while it lived.
    def register_all(ttl_ms: int) -> None:
        with s.pipeline() as pipe:
            for number in range(130):
                pipe.nodes.register(f"n{number:03d}", ttl_ms=ttl_ms)
            pipe.execute()

    register_all(HOUR)
    assert s.queue(QUEUE).dispatch("t0", b"", strategy="round_robin").node == b"n000"
    register_all(1)
    time.sleep(0.02)


def _orphan(strategy: str, capacity: int | None = None) -> Any:
    # t0 (then t1) dispatched with `strategy` to "gone", which was removed since; with
    # `capacity`, node "a" (that capacity) registered afterwards.
    def setup(r: Client, s: Scheduler) -> None:
        s.nodes.register("gone", ttl_ms=HOUR)
        q = s.queue(QUEUE)
        q.dispatch("t0", b"", strategy=strategy)  # type: ignore[arg-type]
        q.dispatch("t1", b"", strategy="least_loaded")
        s.nodes.remove("gone")
        if capacity is not None:
            s.nodes.register("a", capacity=capacity, ttl_ms=HOUR)

    return setup


def _wrong(kind: int) -> Any:
    def setup(r: Client, s: Scheduler) -> None:
        _populated(r, s)
        key = DispatchKeys.of(s.namespace, QUEUE).fixed[kind]
        r.delete(key)
        r.set(key, b"not the layout's type")

    return setup


def _bad_route(base: Any) -> Any:
    def setup(r: Client, s: Scheduler) -> None:
        base(r, s)
        r.hset(DispatchKeys.of(s.namespace, QUEUE).fixed[4], b"nt0", b"garbage")

    return setup


def _wrong_wake(drain: bool) -> Any:
    # Workers of a and b wait (waiting markers set) but their wake lists hold strings; t2 is a
    # delayed task of a, due now (a node_dequeue promotes it); with `drain`, a is draining.
    def setup(r: Client, s: Scheduler) -> None:
        _populated(r, s)
        s.queue(QUEUE).dispatch("t2", b"", strategy="round_robin", delay_ms=1)
        for node in (b"a", b"b"):
            wake, waiting = DispatchKeys.of(s.namespace, QUEUE).node_wait(node)
            r.set(waiting, b"1")
            r.set(wake, b"not a list")
        if drain:
            s.nodes.drain("a")
        time.sleep(0.01)

    return setup


SETUPS = {
    "populated": _populated,
    "wrong_wake": _wrong_wake(drain=False),
    "drained_wrong_wake": _wrong_wake(drain=True),
    "empty": _empty_registry,
    "crowd": _dead_crowd,
    "orphan": _orphan("round_robin"),
    "orphan_full": _orphan("least_loaded", capacity=0),
    "wrong_tasks": _wrong(4),
    "wrong_ready": _wrong(0),
    "bad_route": _bad_route(_populated),
    "orphan_bad_route": _bad_route(_orphan("round_robin")),
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
    ("queue.dispatch", "populated", "short", _dispatch(b"n"), "ARG", "expected 19 key(s), got 18"),
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
    ("queue.node_dequeue", "populated", "long", (b"a", b"w", 1, 10, b"", T), "ARG", "got 20"),
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
    ("queue.node_dequeue", "wrong_wake", "ok", (b"c", b"w", 1, 10, b"", T), "CORRUPT", "d:wake:61"),
    ("queue.dispatch", "wrong_wake", "ok", _dispatch(b"n", b"round_robin"), "CORRUPT", "d:wake:"),
    ("queue.node_nack", "wrong_wake", "ok", (b"t1", 1, 0, b"", 1, 1, b"", T), "CORRUPT", "wake:62"),
    ("queue.redispatch", "drained_wrong_wake", "ok", (b"a", 1, R), "CORRUPT", "d:wake:62"),
    # queue.node_ack
    ("queue.node_ack", "populated", "short", (b"t1", 1, b"", T), "ARG", "got 18"),
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
    ("queue.redispatch", "populated", "short", (b"a", 1, R), "ARG", "got 18"),
    ("queue.redispatch", "populated", "ok", (b"a", 101, R), "ARG", "limit must be between 1"),
    ("queue.redispatch", "populated", "ok", (b"a", 1), "ARG", "expected 3 argument(s), got 2"),
    ("queue.redispatch", "orphan", "ok", (b"gone", 1, R), "NONODE", "no live node"),
    ("queue.redispatch", "orphan_full", "ok", (b"gone", 1, R), "ATCAPACITY", "every live node"),
    ("queue.redispatch", "crowd", "ok", (b"n000", 1, R), "SCANLIMIT", "the first 128"),
    ("queue.redispatch", "orphan_bad_route", "ok", (b"gone", 1, R), "CORRUPT", "malformed"),
    # queue.node_stats
    ("queue.node_stats", "populated", "short", (b"a",), "ARG", "expected 19 key(s), got 18"),
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
    assert len(DISPATCH_SCRIPTS) == 6
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
    assert_refused(r, s, script, key_list, args, code, detail, exact=False)
