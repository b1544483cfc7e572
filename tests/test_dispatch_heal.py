"""Node queues that heal themselves: queue.node_dequeue, called by a live node's worker, moves the
ready tasks of dead nodes (heartbeat lapsed, still registered) and re-routes the expired leases
and due delayed tasks of nodes that are not live, to live nodes, with no redispatch or sweep
call; at most HEAL_NODES dead nodes examined and HEAL_LIMIT tasks moved per call; every task
finishes exactly once. Nodes lapse by a 1 ms heartbeat, not by a short TTL raced by a sleep."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from luasched.errors import CorruptState, StaleLease
from luasched.queue import Lease, NodeCounts
from support.helpers import snapshot_ignoring_ttl
from test_queue_dispatch import HOUR, drain_node, loads, scheduler

Client = Any  # redis.Redis or RedisCluster
# lua/include/queue_limits.j2: heal_nodes (dead nodes examined per call), heal_limit (tasks moved).
HEAL_NODES, HEAL_LIMIT = 4, 32
EMPTY = NodeCounts(ready=0, assigned=0, load=0)


def lapse(s: Any, *nodes: str) -> None:
    """Make ``nodes`` dead: a last heartbeat of 1 ms each, 2 ms apart (so their deadlines are in
    this order, never tied), then 10 ms."""
    for node in nodes:
        s.nodes.heartbeat(node, 1)
        time.sleep(0.002)
    time.sleep(0.01)


def ready_of(q: Any, *nodes: str) -> list[int]:
    """The ready counts of ``nodes`` in dispatch queue ``q``."""
    stats = q.dispatch_stats(list(nodes))
    return [stats.nodes[node.encode()].ready for node in nodes]


def acked_ids(leases: list[Lease]) -> list[bytes]:
    return sorted(lease.task_id for lease in leases)


def test_a_dead_nodes_ready_tasks_move_on_another_nodes_dequeue(r: Client) -> None:
    s = scheduler(r, "hready", [("a", 1, None), ("b", 1, None), ("c", 1, None)])
    q = s.queue("jobs")
    for number in range(12):
        q.dispatch(f"t{number}", f"p{number}", strategy="round_robin")
    assert ready_of(q, "a", "b", "c") == [4, 4, 4]
    lapse(s, "c")

    first = q.for_node("a").dequeue("wa", HOUR)  # takes one of a's, moves c's four
    assert first is not None
    stats = q.dispatch_stats(["a", "b", "c"])
    assert stats.nodes[b"c"] == EMPTY  # its load given back (c is still registered)
    assert (stats.ready, stats.leased) == (11, 1)
    assert loads(r, s) == {b"a": 6, b"b": 6, b"c": 0}  # round robin over the live a and b
    # Healing moves tasks only: c stays registered for the other queues of the namespace.
    assert r.hexists(s.namespace.key("nodes:index"), "c")
    assert q.for_node("a").ack(first)
    done = [first, *drain_node(q, b"a"), *drain_node(q, b"b")]
    assert acked_ids(done) == sorted(f"t{number}".encode() for number in range(12))
    assert all(lease.payload == b"p" + lease.task_id[1:] for lease in done)
    assert loads(r, s) == {b"a": 0, b"b": 0, b"c": 0}


def test_one_call_moves_at_most_m_tasks_and_examines_at_most_k_dead_nodes(r: Client) -> None:
    s = scheduler(r, "hbounds", [("d0", 1, None)])
    q = s.queue("jobs")
    for number in range(40):
        q.dispatch(f"big{number}", b"", strategy="round_robin")
    dead = [f"d{number}" for number in range(6)]
    for node in dead[1:]:
        s.nodes.register(node, ttl_ms=HOUR)
    s.nodes.drain("d0")
    for number in range(1, 6):
        assert q.dispatch(f"one{number}", b"", strategy="round_robin").node == f"d{number}".encode()
    s.nodes.register("a", ttl_ms=HOUR)
    lapse(s, *dead)  # deadline order d0, d1, ..., d5
    a = q.for_node("a")

    assert a.dequeue("wa", HOUR) is None  # a had nothing; the moved tasks wait for the next call
    assert ready_of(q, *dead) == [40 - HEAL_LIMIT, 1, 1, 1, 1, 1]  # m tasks, all of the first node
    assert ready_of(q, "a") == [HEAL_LIMIT]
    assert a.dequeue("wa", HOUR) is not None
    # d0's last 8 and the next three of the first k dead nodes; d4, d5 wait (budget left).
    assert ready_of(q, *dead) == [0, 0, 0, 0, 1, 1]
    assert a.dequeue("wa", HOUR) is not None
    assert ready_of(q, *dead) == [0] * 6  # the next k: d4, d5
    stats = q.dispatch_stats(["a"])
    assert (stats.ready, stats.leased, stats.nodes[b"a"].ready) == (43, 2, 43)
    assert loads(r, s)[b"a"] == 45


def test_the_heal_cursor_passes_dead_nodes_without_tasks(r: Client) -> None:
    # Five dead nodes, only the last (in deadline order) holds a task: more than k ahead of it.
    s = scheduler(r, "hcursor", [(f"e{number}", 1, None) for number in range(5)])
    q = s.queue("jobs")
    assert q.dispatch("t", b"", strategy="slot", routing_key="k").node is not None
    owner = s.slots.owner("k").node
    assert owner is not None
    empty = [f"e{number}" for number in range(5) if f"e{number}".encode() != owner]
    s.nodes.register("a", ttl_ms=HOUR)
    s.slots.rebalance()  # the slot of "k" stays with its owner while it lives
    lapse(s, *empty, owner.decode())
    s.slots.rebalance()  # now "k" belongs to a, the only live node
    a = q.for_node("a")
    assert a.dequeue("wa", HOUR) is None  # examines the k empty ones
    assert ready_of(q, owner.decode()) == [1]
    assert a.dequeue("wa", HOUR) is None  # the next lap position: the owner, moved to a
    assert ready_of(q, owner.decode(), "a") == [0, 1]
    lease = a.dequeue("wa", HOUR)
    assert lease is not None and lease.task_id == b"t"


def test_a_dead_nodes_expired_lease_and_due_delayed_task_go_to_a_live_node(r: Client) -> None:
    s = scheduler(r, "hlease", [("a", 1, None), ("c", 1, None)])
    q = s.queue("jobs")
    assert q.dispatch("a1", b"", strategy="round_robin").node == b"a"
    assert q.dispatch("held", b"h", strategy="round_robin").node == b"c"
    assert q.dispatch("a2", b"", strategy="round_robin").node == b"a"
    assert q.dispatch("later", b"l", strategy="round_robin", delay_ms=200).node == b"c"
    c = q.for_node("c")
    held = c.dequeue("wc", 100)
    assert held is not None and held.task_id == b"held"
    lapse(s, "c")
    time.sleep(0.35)  # the lease and the delay are over on the server's clock

    a = q.for_node("a")
    first = a.dequeue("wa", HOUR)  # reclaims and promotes both: to a, the only live node
    assert first is not None and first.task_id == b"a1"
    assert q.dispatch_stats(["c"]).nodes[b"c"] == EMPTY
    with pytest.raises(StaleLease):
        c.ack(held)
    assert a.ack(first)
    done = drain_node(q, b"a")
    assert acked_ids(done) == [b"a2", b"held", b"later"]
    assert [lease.attempt for lease in done if lease.task_id == b"held"] == [2]
    assert loads(r, s) == {b"a": 0, b"c": 0}


def test_healing_one_queue_leaves_another_queues_tasks_findable(r: Client) -> None:
    s = scheduler(r, "hqueues", [("a", 1, None), ("c", 1, None)])
    one, two = s.queue("one"), s.queue("two")
    for q in (one, two):
        for number in range(4):
            q.dispatch(f"t{number}", b"", strategy="round_robin")
    lapse(s, "c")
    assert one.for_node("a").dequeue("wa", HOUR) is not None
    assert ready_of(one, "c") == [0]
    assert ready_of(two, "c") == [2]  # untouched until a worker of two calls
    assert two.for_node("a").dequeue("wa", HOUR) is not None
    assert ready_of(two, "c", "a") == [0, 3]


def test_a_corrupt_heal_cursor_is_refused_and_changes_nothing(r: Client) -> None:
    s = scheduler(r, "hcorrupt", [("a", 1, None), ("c", 1, None)])
    q = s.queue("jobs")
    for number in range(4):
        q.dispatch(f"t{number}", b"", strategy="round_robin")
    lapse(s, "c")
    r.hset(q.dispatch_keys.fixed[4], "heal", b"x")
    before = snapshot_ignoring_ttl(r, s.namespace)
    with pytest.raises(CorruptState, match="heal"):
        q.for_node("a").dequeue("wa", HOUR)
    assert snapshot_ignoring_ttl(r, s.namespace) == before


def test_four_node_workers_one_stops_every_task_finishes_exactly_once(r: Client) -> None:
    nodes = [f"n{number}" for number in range(4)]
    s = scheduler(r, "hfleet", [(node, 1, None) for node in nodes])
    q = s.queue("jobs")
    total = 120
    for number in range(total):
        q.dispatch(f"t{number}", b"", strategy="round_robin")
    acked: Counter[bytes] = Counter()
    errors: list[BaseException] = []
    guard = threading.Lock()
    deadline = time.monotonic() + 60

    def live_worker(node: str) -> None:
        view = q.for_node(node)
        try:
            while time.monotonic() < deadline:
                with guard:
                    if len(acked) == total:
                        return
                lease = view.dequeue(f"w-{node}", HOUR)
                if lease is None:
                    time.sleep(0.005)
                    continue
                assert view.ack(lease)
                with guard:
                    acked[lease.task_id] += 1
        except BaseException as problem:  # reported by the main thread
            errors.append(problem)

    stopped: list[Lease] = []

    def stopping_worker(node: str) -> None:
        # Acks four tasks, then stops holding a fifth lease (200 ms) and its node's ready ones.
        view = q.for_node(node)
        while len(stopped) < 5:
            lease = view.dequeue(f"w-{node}", 200)
            assert lease is not None
            if len(stopped) < 4:
                assert view.ack(lease)
                with guard:
                    acked[lease.task_id] += 1
            stopped.append(lease)

    stopper = threading.Thread(target=stopping_worker, args=(nodes[3],))
    stopper.start()
    stopper.join(timeout=30)
    assert not stopper.is_alive() and len(stopped) == 5
    lapse(s, nodes[3])  # its heartbeats stop: no redispatch, no sweep from here on
    workers = [threading.Thread(target=live_worker, args=(node,)) for node in nodes[:3]]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=90)
    assert not any(worker.is_alive() for worker in workers)
    assert errors == []
    assert set(acked) == {f"t{number}".encode() for number in range(total)}
    assert set(acked.values()) == {1}
    stats = q.dispatch_stats(nodes)
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)
    assert stats.nodes[nodes[3].encode()] == EMPTY
    with pytest.raises(StaleLease):
        q.for_node(nodes[3]).ack(stopped[4])


def test_a_heal_with_no_live_node_to_take_the_tasks_moves_nothing_and_answers(r: Client) -> None:
    s = scheduler(r, "hnolive", [("c", 1, None)])
    q = s.queue("jobs")
    for number in range(2):
        q.dispatch(f"t{number}", b"", strategy="least_loaded")
    lapse(s, "c")
    # A caller with no live node to move to: the pick fails inside the heal, the call answers.
    assert q.for_node("x").dequeue("wx", HOUR) is None
    assert ready_of(q, "c") == [2] and loads(r, s) == {b"c": 2}
    s.nodes.register("a", ttl_ms=HOUR)
    assert q.for_node("a").dequeue("wa", HOUR) is None  # the next lap finds c again
    assert ready_of(q, "c", "a") == [0, 2]
    assert acked_ids(drain_node(q, b"a")) == [b"t0", b"t1"]


def test_a_slot_task_of_a_dead_owner_stays_and_the_tasks_behind_it_move(r: Client) -> None:
    """A slot-routed task whose slot the dead node still owns cannot move (NoNode until a
    rebalance); the dead node's other ready tasks, queued behind it, move anyway."""
    s = scheduler(r, "hslot", [("a", 1, None), ("c", 1, None)])
    q = s.queue("jobs")
    key = next(f"k{n}" for n in range(1000) if s.slots.owner(f"k{n}").node == b"c")
    assert q.dispatch("slot", b"", strategy="slot", routing_key=key).node == b"c"
    for number in range(6):  # round robin: three on a, three on c, all behind the slot task
        q.dispatch(f"t{number}", b"", strategy="round_robin")
    assert ready_of(q, "a", "c") == [3, 4]
    lapse(s, "c")

    a = q.for_node("a")
    first = a.dequeue("wa", HOUR)  # one of a's own; heals c
    assert first is not None
    assert ready_of(q, "a", "c") == [2 + 3, 1]  # only the slot task is left on c
    s.slots.rebalance()  # the slot goes to a; c stays registered
    taken = [a.dequeue("wa", HOUR) for _ in range(7)]
    assert ready_of(q, "a", "c") == [0, 0]
    every = [first.task_id] + [lease.task_id for lease in taken if lease is not None]
    assert sorted(every) == sorted([b"slot"] + [f"t{number}".encode() for number in range(6)])
