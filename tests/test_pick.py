"""Node selection (pick.*) on every server: each strategy's decision, the registry changes it must
follow (register, drain, remove, sweep, heartbeat lapse), concurrency of the charging picks, the
statistics of the random ones, and every error path leaving every key untouched."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.cluster

import luasched.asyncio
from luasched import (
    AllNodesFull,
    NoNode,
    Picked,
    Scheduler,
    TooManyNodes,
    UnknownNode,
)
from luasched.pick import PICK_KEYS
from luasched.render import render_all
from support.helpers import assert_codes_covered, assert_refused, namespace_keys, snapshot

Client = Any  # redis.Redis or RedisCluster

STRATEGIES: dict[str, Callable[[Scheduler], Picked]] = {
    "least_loaded": lambda s: s.pick.least_loaded(),
    "two_choices": lambda s: s.pick.two_choices(),
    "round_robin": lambda s: s.pick.round_robin(),
    "weighted": lambda s: s.pick.weighted(),
    "smooth_weighted": lambda s: s.pick.smooth_weighted(),
    "least_recent": lambda s: s.pick.least_recent(),
}


def direct(r: Client, s: Scheduler) -> Scheduler:
    """A Scheduler on the plain connection of the primary that holds the namespace.

    Cluster batches send EVAL with the script text (no EVALSHA in ClusterPipeline): for the
    100,000-pick tests a namespace's own primary takes EVALSHA pipelines instead.
    """
    if isinstance(r, redis.cluster.RedisCluster):
        node = r.get_node_from_key(s.namespace.prefix)
        client = r.get_redis_connection(node)
        return Scheduler(client, s.namespace.name, rng=random.Random(7))
    return s


def picks(s: Scheduler, strategy: str, count: int) -> list[bytes]:
    return [STRATEGIES[strategy](s).node for _ in range(count)]


def batched(s: Scheduler, queue: Callable[[Any], object], count: int) -> list[Any]:
    results: list[Any] = []
    while len(results) < count:
        with s.pipeline() as pipe:
            for _ in range(min(2000, count - len(results))):
                queue(pipe)
            results.extend(pipe.execute())
    return results


def contents(r: Client, s: Scheduler) -> dict[bytes, Any]:
    """Key -> its value, read by type (for keys too big for a byte-stable DUMP)."""
    found: dict[bytes, Any] = {}
    for key in namespace_keys(r, s.namespace):
        kind = r.type(key)
        if kind == b"hash":
            found[key] = r.hgetall(key)
        elif kind == b"zset":
            found[key] = r.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            found[key] = r.smembers(key)
        else:
            found[key] = r.get(key)
    return found


def loads(r: Client, s: Scheduler) -> dict[bytes, int]:
    ids = {k: v for k, v in r.hgetall(s.namespace.key("nodes:id")).items()}
    raw = r.hgetall(s.namespace.key("pick:load"))
    return {ids[index]: int(value) for index, value in raw.items()}


# --------------------------------------------------------------------------------------------
# Smooth weighted round-robin


def test_smooth_weighted_interleaves_5_1_1(r: Client) -> None:
    s = Scheduler(r, "swrr")
    for node_id, weight in (("a", 5), ("b", 1), ("c", 1)):
        s.nodes.register(node_id, weight=weight)
    assert b"".join(picks(s, "smooth_weighted", 21)) == b"aabacaa" * 3


@pytest.mark.parametrize("seed", [1, 2])
def test_smooth_weighted_every_window_gives_exact_weights(r: Client, seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler(r, "swrr")
    weights = {f"n{i}".encode(): rng.randint(1, 9) for i in range(rng.randint(2, 7))}
    for node_id, weight in weights.items():
        s.nodes.register(node_id, weight=weight)
    total = sum(weights.values())
    sequence = batched(s, lambda pipe: pipe.pick.smooth_weighted(), 3 * total)
    nodes = [picked.node for picked in sequence]
    for start in range(len(nodes) - total + 1):
        assert Counter(nodes[start : start + total]) == weights
    # A weight change resets the state: the new weights hold from the next pick on.
    s.nodes.register(b"n0", weight=weights[b"n0"] + 3)
    weights[b"n0"] += 3
    after = picks(s, "smooth_weighted", sum(weights.values()))
    assert Counter(after) == weights


def test_smooth_weighted_refuses_too_many_nodes(r: Client) -> None:
    s = Scheduler(r, "swrr")
    with s.pipeline() as pipe:
        for index in range(2001):
            pipe.nodes.register(b"n%d" % index)
        pipe.execute()
    # Contents, not DUMP: Valkey's hashtable may rehash on a read (same data, other bytes).
    before = contents(r, s)
    with pytest.raises(TooManyNodes):
        s.pick.smooth_weighted()
    assert contents(r, s) == before
    s.nodes.drain(b"n7")
    assert s.pick.smooth_weighted().node == b"n0"


# --------------------------------------------------------------------------------------------
# Weighted random


# Chi-square critical values at p = 0.001 by degrees of freedom.
CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458}


@pytest.mark.slow
def test_weighted_random_passes_chi_square(r: Client) -> None:
    s = Scheduler(r, "wrand", rng=random.Random(11))
    weights = {b"a": 1, b"b": 2, b"c": 3, b"d": 7, b"e": 17}
    for node_id, weight in weights.items():
        s.nodes.register(node_id, weight=weight)
    # 100,000 picks in raw EVALSHA pipelines on the namespace's primary (the wrapper's per-call
    # Python cost would dominate); the random integers are drawn as the wrapper draws them.
    client = direct(r, s).client
    script = render_all()["pick.weighted"]
    client.script_load(script.text)
    keys = [s.namespace.key(name) for name in PICK_KEYS["pick.weighted"]]
    rng = random.Random(11)
    count = 100_000
    counts: Counter[bytes] = Counter()
    for _ in range(count // 5000):
        pipe = client.pipeline(transaction=False)
        for _ in range(5000):
            pipe.execute_command(
                "EVALSHA", script.sha1, 5, *keys, rng.randrange(1 << 53), rng.randrange(1 << 53)
            )
        counts.update(pipe.execute())
    total = sum(weights.values())
    chi2 = sum(
        (counts[node] - count * weight / total) ** 2 / (count * weight / total)
        for node, weight in weights.items()
    )
    assert set(counts) == set(weights)
    assert chi2 < CHI2_CRITICAL_P001[len(weights) - 1], (chi2, counts)


def test_weighted_follows_weight_changes_and_is_read_only(r: Client) -> None:
    s = Scheduler(r, "wrand", rng=random.Random(3))
    s.nodes.register("a", weight=1)
    s.nodes.register("b", weight=1_000_000)
    assert Counter(picks(s, "weighted", 50))[b"b"] >= 49
    before = snapshot(r, s.namespace)
    picks(s, "weighted", 20)
    assert snapshot(r, s.namespace) == before  # the table is built: picks change nothing
    s.nodes.register("a", weight=1_000_000)
    s.nodes.register("b", weight=1)
    assert Counter(picks(s, "weighted", 50))[b"a"] >= 49


# --------------------------------------------------------------------------------------------
# Least-loaded, two choices, release


def test_least_loaded_charges_the_least_utilized_with_room(r: Client) -> None:
    s = Scheduler(r, "ll", rng=random.Random(5))
    s.nodes.register("small", capacity=2)
    s.nodes.register("big", capacity=10)
    s.nodes.register("zero", capacity=0)
    first = s.pick.least_loaded()
    assert first.node in {b"small", b"big"} and first.load == 1
    taken = [first] + [s.pick.least_loaded() for _ in range(11)]
    assert Counter(p.node for p in taken) == {b"small": 2, b"big": 10}
    assert all(p.capacity is not None and p.load is not None for p in taken)
    assert all(p.load <= p.capacity for p in taken if p.load and p.capacity)
    before = snapshot(r, s.namespace)
    with pytest.raises(AllNodesFull):
        s.pick.least_loaded()
    with pytest.raises(AllNodesFull):
        s.pick.two_choices()
    assert snapshot(r, s.namespace) == before
    assert s.pick.release("big", 3) == 7
    # cost 3 fits only "big" (utilization 0.7), not "small" (full).
    assert s.pick.least_loaded(cost=3) == Picked(b"big", 10, 10)
    assert s.pick.release("small", 100) == 0  # never below zero
    assert s.pick.least_loaded(cost=2) == Picked(b"small", 2, 2)
    with pytest.raises(AllNodesFull):
        s.pick.least_loaded(cost=1)


def test_least_loaded_cost_larger_than_the_least_utilized_can_take(r: Client) -> None:
    s = Scheduler(r, "ll")
    s.nodes.register("tiny", capacity=2)
    s.nodes.register("huge", capacity=100)
    for _ in range(10):
        s.pick.least_loaded()  # the two fill in proportion
    assert s.pick.least_loaded(cost=50).node == b"huge"
    unlimited = Scheduler(r, "ll-unlimited")
    unlimited.nodes.register("u")
    assert unlimited.pick.least_loaded(cost=10**12) == Picked(b"u", 10**12, None)


def test_least_loaded_breaks_ties_at_random(r: Client) -> None:
    s = Scheduler(r, "ties", rng=random.Random(9))
    for index in range(8):
        s.nodes.register(b"n%d" % index, capacity=1000)
    firsts = Counter()
    for _ in range(40):
        first = s.pick.least_loaded()
        firsts[first.node] += 1
        s.pick.release(first.node)
    assert len(firsts) >= 6  # a fixed order would always answer the same node


def _least_loaded_raw(r: Client, s: Scheduler, cost: str, rnd: str) -> object:
    keys = [s.namespace.key(name) for name in PICK_KEYS["pick.least_loaded"]]
    try:
        return r.eval(render_all()["pick.least_loaded"].text, len(keys), *keys, cost, rnd)
    except redis.ResponseError as error:
        return f"error: {error}"


def _values(r: Client, s: Scheduler) -> dict[bytes, bytes]:
    """Every key of the namespace by its name inside it, but nodes:deadline (dead nodes were
    registered a millisecond apart in the two namespaces; no pick writes it)."""
    prefix = s.namespace.prefix
    values = {key[len(prefix) :]: value for key, value in snapshot(r, s.namespace).items()}
    del values[b"nodes:deadline"]
    return values


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_least_loaded_lean_path_decides_as_the_full_script(r: Client, seed: int) -> None:
    """The script's lean path (top of lua/pick/least_loaded.lua.j2) and its full path (main())
    make the same pick: the same calls on two equal namespaces, one with cost "3" (lean path)
    and one with "03" (a leading zero: only main() takes it), answer the same and leave
    byte-identical keys. States mix ties, full nodes, dead and draining nodes, unlimited and
    zero capacities, so both the lean path and its fall-through to main() run."""
    rng = random.Random(seed)
    lean, full = Scheduler(r, f"lean-{seed}"), Scheduler(r, f"full-{seed}")
    nodes = []
    for index in range(12):
        unlimited = seed == 1 and index == 0  # seed 1: one node with unlimited capacity
        capacity = None if unlimited else rng.choice([0, 1, 2, 3, 5, 8, 40])
        ttl_ms = 1 if index % 5 == 4 else 0  # every fifth node is dead by the first pick
        nodes.append(b"n%02d" % index)
        for s in (lean, full):
            s.nodes.register(nodes[-1], capacity=capacity, ttl_ms=ttl_ms)
    for s in (lean, full):
        s.nodes.drain(nodes[3])
    time.sleep(0.01)
    answers = Counter()
    for step in range(300):
        cost, rnd = rng.choice([1, 1, 1, 2, 3, 7]), rng.randrange(1 << 53)
        mine = _least_loaded_raw(r, lean, str(cost), str(rnd))
        theirs = _least_loaded_raw(r, full, "0" + str(cost), str(rnd))
        assert mine == theirs, step
        answers["error" if isinstance(mine, str) else "pick"] += 1
        if step % 7 == 6:
            victim, amount = rng.choice(nodes), rng.choice([1, 2, 100])
            assert lean.pick.release(victim, amount) == full.pick.release(victim, amount)
        assert _values(r, lean) == _values(r, full), step
    assert answers["pick"] > 50
    if seed != 1:
        assert answers["error"] > 5  # every node full at times: the refusals agree too


def test_two_choices_takes_the_less_utilized_of_two(r: Client) -> None:
    s = Scheduler(r, "p2c", rng=random.Random(2))
    s.nodes.register("a", capacity=100)
    s.nodes.register("b", capacity=100)
    for _ in range(50):
        s.pick.two_choices()
    # With two nodes both are always drawn: the load stays balanced within one.
    assert abs(loads(r, s)[b"a"] - loads(r, s)[b"b"]) <= 1
    s.nodes.register("c", capacity=1000)
    counts = Counter(s.pick.two_choices().node for _ in range(100))
    assert counts[b"c"] > 60  # the far less utilized node wins nearly every draw it is in


def test_release_works_on_draining_and_refuses_unknown_nodes(r: Client) -> None:
    s = Scheduler(r, "rel")
    s.nodes.register("a", capacity=5)
    s.pick.least_loaded(cost=4)
    s.nodes.drain("a")
    with pytest.raises(NoNode):
        s.pick.least_loaded()
    assert s.pick.release("a", 1) == 3
    s.nodes.undrain("a")
    assert s.pick.least_loaded(cost=2) == Picked(b"a", 5, 5)
    with pytest.raises(UnknownNode):
        s.pick.release("nobody")
    s.nodes.remove("a")
    with pytest.raises(UnknownNode):
        s.pick.release("a")
    s.nodes.register("a", capacity=5)
    assert s.pick.least_loaded() == Picked(b"a", 1, 5)  # the reused index starts at 0


def test_least_loaded_under_16_concurrent_callers(server: Any, r: Client) -> None:
    capacities = {b"a": 3, b"b": 5, b"c": 8, b"d": 1}
    setup = Scheduler(r, "conc")
    for node_id, capacity in capacities.items():
        setup.nodes.register(node_id, capacity=capacity)
    total = sum(capacities.values())
    errors: list[BaseException] = []
    held: list[list[Picked]] = [[] for _ in range(16)]
    barrier = threading.Barrier(16)

    def worker(number: int) -> None:
        s = Scheduler(server.client(), "conc", rng=random.Random(number))
        try:
            barrier.wait()
            # Phase 1: take until full; together the callers take exactly the total capacity.
            while True:
                try:
                    held[number].append(s.pick.least_loaded())
                except AllNodesFull:
                    break
            barrier.wait()
            for picked in held[number]:
                s.pick.release(picked.node)
            barrier.wait()
            # Phase 2: random take/release, never past capacity.
            mine: list[Picked] = []
            for step in range(60):
                if mine and (step % 3 == 0):
                    s.pick.release(mine.pop().node)
                    continue
                try:
                    picked = (s.pick.least_loaded if step % 2 else s.pick.two_choices)()
                except AllNodesFull:
                    continue
                assert picked.load is not None and picked.capacity is not None
                assert picked.load <= picked.capacity
                mine.append(picked)
            for picked in mine:
                s.pick.release(picked.node)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    first_phase = [picked for mine in held for picked in mine]
    assert len(first_phase) == total
    assert Counter(p.node for p in first_phase) == capacities
    assert all(p.load is not None and p.load <= capacities[p.node] for p in first_phase)
    assert loads(r, setup) == {}  # every load back to zero (zero loads are not stored)
    scores = r.zrange(setup.namespace.key("pick:util"), 0, -1, withscores=True)
    assert [score for _, score in scores] == [0.0] * len(capacities)


# --------------------------------------------------------------------------------------------
# Round-robin and least-recently-used


def test_round_robin_turns_across_joins_and_leaves(r: Client) -> None:
    s = Scheduler(r, "rr")
    for node_id in ("a", "b", "c"):
        s.nodes.register(node_id)
    assert picks(s, "round_robin", 5) == [b"a", b"b", b"c", b"a", b"b"]
    s.nodes.register("d")  # joins after the cursor: gets its turn in this round
    assert picks(s, "round_robin", 3) == [b"c", b"d", b"a"]
    s.nodes.remove("b")  # the next after the cursor leaves: its turn is skipped, nobody twice
    assert picks(s, "round_robin", 3) == [b"c", b"d", b"a"]
    s.nodes.register("e")  # reuses b's index: takes b's place in the order
    assert picks(s, "round_robin", 4) == [b"e", b"c", b"d", b"a"]
    s.nodes.drain("c")
    assert picks(s, "round_robin", 3) == [b"e", b"d", b"a"]
    s.nodes.remove("a")
    s.nodes.remove("d")
    s.nodes.remove("e")
    with pytest.raises(NoNode):
        s.pick.round_robin()  # c is draining, nobody else


def test_least_recent_order(r: Client) -> None:
    s = Scheduler(r, "lru")
    for node_id in ("a", "b", "c"):
        s.nodes.register(node_id)
    first = picks(s, "least_recent", 3)
    assert sorted(first) == [b"a", b"b", b"c"]
    assert picks(s, "least_recent", 6) == first * 2
    s.nodes.register("d")  # never picked: first
    assert picks(s, "least_recent", 1) == [b"d"]
    assert picks(s, "least_recent", 4) == [*first, b"d"]
    s.nodes.drain(first[0])
    assert picks(s, "least_recent", 3) == [first[1], first[2], b"d"]
    s.nodes.undrain(first[0])  # back from draining: counts as never picked
    assert picks(s, "least_recent", 1) == [first[0]]


# --------------------------------------------------------------------------------------------
# Membership changes reach every strategy


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_membership_changes_reach_every_strategy(r: Client, strategy: str) -> None:
    s = Scheduler(r, "members", rng=random.Random(4))
    for node_id in ("a", "b", "c", "d"):
        s.nodes.register(node_id, capacity=1000)
    s.nodes.register("e", capacity=1000, ttl_ms=60_000)
    s.nodes.register("f", capacity=1000, ttl_ms=60_000)
    assert set(picks(s, strategy, 60)) == {b"a", b"b", b"c", b"d", b"e", b"f"}
    s.nodes.drain("a")
    s.nodes.remove("b")
    s.nodes.heartbeat("e", 1)
    s.nodes.heartbeat("f", 1)
    time.sleep(0.01)  # e and f lapse
    s.nodes.heartbeat("f", 60_000)  # f comes back before any sweep
    assert set(picks(s, strategy, 40)) == {b"c", b"d", b"f"}
    s.nodes.sweep()  # removes e
    s.nodes.register("g", capacity=1000)  # reuses an index
    s.nodes.undrain("a")
    assert set(picks(s, strategy, 60)) == {b"a", b"c", b"d", b"f", b"g"}
    for node_id in (b"a", b"c", b"d", b"f", b"g"):
        s.nodes.drain(node_id)
    with pytest.raises(NoNode):
        STRATEGIES[strategy](s)


def test_registry_keeps_the_pick_keys_consistent(r: Client) -> None:
    rng = random.Random(8)
    s = Scheduler(r, "consistent", rng=rng)
    names = [b"n%d" % index for index in range(12)]
    for _ in range(300):
        node_id = rng.choice(names)
        action = rng.randrange(7)
        try:
            if action == 0:
                s.nodes.register(node_id, weight=rng.randint(1, 5), capacity=rng.randint(0, 6))
            elif action == 1:
                s.nodes.drain(node_id)
            elif action == 2:
                s.nodes.undrain(node_id)
            elif action == 3:
                s.nodes.remove(node_id)
            elif action == 4:
                s.pick.release(node_id, rng.randint(1, 3))
            else:
                s.pick.least_loaded(cost=rng.randint(1, 2))
                s.pick.weighted()
        except (UnknownNode, NoNode, AllNodesFull):
            pass
    listing = s.nodes.list()
    ns = s.namespace
    ids = {v: int(k) for k, v in r.hgetall(ns.key("nodes:id")).items()}
    eligible = {ids[n.node_id] for n in listing if not n.draining}
    for key in ("pick:util", "pick:ring", "pick:lru"):
        assert {int(m) for m in r.zrange(ns.key(key), 0, -1)} == eligible, key
    load = {int(k): int(v) for k, v in r.hgetall(ns.key("pick:load")).items()}
    assert set(load) <= set(ids.values())
    for node in listing:
        index = ids[node.node_id]
        assert load.get(index, 0) >= 0
        if node.capacity is not None:
            assert load.get(index, 0) <= max(node.capacity, 0) or node.capacity < load.get(index, 0)
        if index in eligible:
            score = r.zscore(ns.key("pick:util"), index)
            capacity = 2**50 if node.capacity is None else node.capacity
            expected = 1.0 if capacity == 0 else load.get(index, 0) / capacity
            assert score == expected


# --------------------------------------------------------------------------------------------
# Twins, keys


def test_pipeline_and_asyncio_twins(server: Any, r: Client) -> None:
    s = Scheduler(r, "twins", rng=random.Random(1))
    s.nodes.register("a", weight=2, capacity=4)
    with s.pipeline() as pipe:
        pipe.pick.least_loaded(cost=2)
        pipe.pick.two_choices()
        pipe.pick.release("a", 1)
        pipe.pick.round_robin()
        pipe.pick.weighted()
        pipe.pick.smooth_weighted()
        pipe.pick.least_recent()
        results = pipe.execute()
    assert results == [
        Picked(b"a", 2, 4),
        Picked(b"a", 3, 4),
        2,
        Picked(b"a"),
        Picked(b"a"),
        Picked(b"a"),
        Picked(b"a"),
    ]

    async def scenario() -> list[Any]:
        client = server.async_client()
        try:
            a = luasched.asyncio.Scheduler(client, "twins", rng=random.Random(1))
            out: list[Any] = [
                await a.pick.least_loaded(),
                await a.pick.two_choices(),
                await a.pick.release("a", 2),
                await a.pick.round_robin(),
                await a.pick.weighted(),
                await a.pick.smooth_weighted(),
                await a.pick.least_recent(),
            ]
            async with a.pipeline() as pipe:
                await pipe.pick.least_loaded()
                await pipe.pick.release("a")
                out.append(await pipe.execute())
            return out
        finally:
            await client.aclose()

    out = asyncio.run(scenario())
    assert out[:3] == [Picked(b"a", 3, 4), Picked(b"a", 4, 4), 2]
    assert out[3:7] == [Picked(b"a")] * 4
    assert out[7] == [Picked(b"a", 3, 4), 2]


def test_pick_keys_are_the_manifest_patterns() -> None:
    scripts = {name: s for name, s in render_all().items() if name.startswith("pick.")}
    assert set(scripts) == set(PICK_KEYS)
    for name, script in scripts.items():
        patterns = [key.pattern for key in script.spec.keys]
        assert patterns == [f"luasched:{{ns}}:{key}" for key in PICK_KEYS[name]], name


# --------------------------------------------------------------------------------------------
# Error paths: every script, every code; nothing changes


def _populated(r: Client, s: Scheduler) -> None:
    s.nodes.register("a", weight=2, capacity=5)
    s.nodes.register("b", capacity=1)
    s.nodes.register("c", ttl_ms=600_000)
    s.pick.least_loaded()
    s.pick.round_robin()
    s.pick.least_recent()
    s.pick.weighted()
    s.pick.smooth_weighted()
    r.set(s.namespace.key("marker"), b"\x00untouched")


def _empty(r: Client, s: Scheduler) -> None:
    r.set(s.namespace.key("marker"), b"only")


def _draining(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    for node_id in ("a", "b", "c"):
        s.nodes.drain(node_id)


def _full(r: Client, s: Scheduler) -> None:
    s.nodes.register("a", capacity=1)
    s.nodes.register("b", capacity=0)
    s.pick.least_loaded()


def _dead_heads(r: Client, s: Scheduler) -> None:
    """One live node behind 130 dead ones in every candidate order."""
    s.nodes.register("live", capacity=10)
    s.pick.least_loaded()  # utilization 0.1: behind the dead ones at 0
    s.pick.round_robin()  # the cursor at the live node: the dead ones come next
    s.pick.least_recent()  # clock 1: behind the dead ones at 0
    with s.pipeline() as pipe:
        for index in range(130):
            pipe.nodes.register(b"dead%d" % index, capacity=10, ttl_ms=40)
        pipe.execute()
    time.sleep(0.1)


def _corrupt(key: str) -> Callable[[Client, Scheduler], None]:
    def setup(r: Client, s: Scheduler) -> None:
        _populated(r, s)
        r.delete(s.namespace.key(key))
        if key == "pick:smooth":  # a string in the layout: make it a hash
            r.hset(s.namespace.key(key), "wrong", "type")
        else:
            r.set(s.namespace.key(key), b"wrong type")

    return setup


def _bad_load(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    r.hset(s.namespace.key("pick:load"), mapping={"1": "1.5", "2": "1.5", "3": "1.5"})


SETUPS: dict[str, Callable[[Client, Scheduler], None]] = {
    "populated": _populated,
    "empty": _empty,
    "draining": _draining,
    "full": _full,
    "dead_heads": _dead_heads,
    "bad_util": _corrupt("pick:util"),
    "bad_ring": _corrupt("pick:ring"),
    "bad_lru": _corrupt("pick:lru"),
    "bad_weighted": _corrupt("pick:weighted"),
    "bad_state": _corrupt("pick:state"),
    "bad_smooth": _corrupt("pick:smooth"),
    "bad_load": _bad_load,
}

WRONGTYPE = " holds another type than the layout"  # after 'key "<the key>"' (lua/include/read)
SCAN_DETAIL = (
    "the first 128 candidates were dead or had no room for cost 1 (0 live); "
    "sweep dead nodes or lower the cost"
)
NO_NODE = "no live node that is not draining"
BIG = 9007199254740992

# (script, setup, keys: "ok" | "short" | "long", args, code, detail)
ERROR_CASES: list[tuple[str, str, str, tuple[Any, ...], str, str]] = [
    # pick.least_loaded
    ("pick.least_loaded", "populated", "short", (1, 0), "ARG", "expected 5 key(s), got 4"),
    ("pick.least_loaded", "populated", "ok", (1,), "ARG", "expected 2 argument(s), got 1"),
    (
        "pick.least_loaded",
        "populated",
        "ok",
        (0, 0),
        "ARG",
        "cost must be between 1 and 1000000000000, got 0",
    ),
    (
        "pick.least_loaded",
        "populated",
        "ok",
        (1, BIG),
        "ARG",
        f"random must be between 0 and 9007199254740991, got {BIG}",
    ),
    (
        "pick.least_loaded",
        "populated",
        "ok",
        (1, b"0x1"),
        "ARG",
        'random must be an integer, got "0x1"',
    ),
    ("pick.least_loaded", "empty", "ok", (1, 0), "NONODE", NO_NODE),
    ("pick.least_loaded", "draining", "ok", (1, 0), "NONODE", NO_NODE),
    (
        "pick.least_loaded",
        "full",
        "ok",
        (1, 0),
        "ATCAPACITY",
        "every live node is at its capacity for cost 1",
    ),
    (
        "pick.least_loaded",
        "dead_heads",
        "ok",
        (1, 0),
        "SCANLIMIT",
        SCAN_DETAIL,
    ),
    ("pick.least_loaded", "bad_util", "ok", (1, 0), "CORRUPT", WRONGTYPE),
    (
        "pick.least_loaded",
        "bad_load",
        "ok",
        (1, 5),
        "CORRUPT",
        'pick:load holds "1.5", not an integer',
    ),
    # pick.two_choices
    ("pick.two_choices", "populated", "long", (1, 0, 0, 0), "ARG", "expected 5 key(s), got 6"),
    ("pick.two_choices", "populated", "ok", (1, 0, 0), "ARG", "expected 4 argument(s), got 3"),
    (
        "pick.two_choices",
        "populated",
        "ok",
        (1, 0, -1, 0),
        "ARG",
        "random2 must be between 0 and 9007199254740991, got -1",
    ),
    ("pick.two_choices", "empty", "ok", (1, 0, 0, 0), "NONODE", NO_NODE),
    (
        "pick.two_choices",
        "full",
        "ok",
        (2, 0, 0, 0),
        "ATCAPACITY",
        "every live node is at its capacity for cost 2",
    ),
    (
        "pick.two_choices",
        "dead_heads",
        "ok",
        (1, 1, 1, 0),
        "SCANLIMIT",
        SCAN_DETAIL,
    ),
    ("pick.two_choices", "bad_util", "ok", (1, 0, 0, 0), "CORRUPT", WRONGTYPE),
    # pick.release
    ("pick.release", "populated", "short", (b"a", 1), "ARG", "expected 4 key(s), got 3"),
    ("pick.release", "populated", "ok", (b"a",), "ARG", "expected 2 argument(s), got 1"),
    (
        "pick.release",
        "populated",
        "ok",
        (b"", 1),
        "ARG",
        "node_id must be 1 to 1024 bytes long, got 0 bytes",
    ),
    (
        "pick.release",
        "populated",
        "ok",
        (b"a", 0),
        "ARG",
        "cost must be between 1 and 1000000000000, got 0",
    ),
    ("pick.release", "populated", "ok", (b"zz", 1), "NOSUCHNODE", 'node "zz" is not registered'),
    ("pick.release", "bad_util", "ok", (b"a", 1), "CORRUPT", WRONGTYPE),
    (
        "pick.release",
        "bad_load",
        "ok",
        (b"a", 1),
        "CORRUPT",
        'pick:load holds "1.5", not an integer',
    ),
    # pick.round_robin
    ("pick.round_robin", "populated", "long", (), "ARG", "expected 4 key(s), got 5"),
    ("pick.round_robin", "populated", "ok", (b"x",), "ARG", "expected 0 argument(s), got 1"),
    ("pick.round_robin", "empty", "ok", (), "NONODE", NO_NODE),
    ("pick.round_robin", "draining", "ok", (), "NONODE", NO_NODE),
    (
        "pick.round_robin",
        "dead_heads",
        "ok",
        (),
        "SCANLIMIT",
        "the first 128 candidates were all dead; sweep dead nodes",
    ),
    ("pick.round_robin", "bad_ring", "ok", (), "CORRUPT", WRONGTYPE),
    ("pick.round_robin", "bad_state", "ok", (), "CORRUPT", WRONGTYPE),
    # pick.least_recent
    ("pick.least_recent", "populated", "short", (), "ARG", "expected 4 key(s), got 3"),
    ("pick.least_recent", "populated", "ok", (b"x",), "ARG", "expected 0 argument(s), got 1"),
    ("pick.least_recent", "empty", "ok", (), "NONODE", NO_NODE),
    (
        "pick.least_recent",
        "dead_heads",
        "ok",
        (),
        "SCANLIMIT",
        "the first 128 candidates were all dead; sweep dead nodes",
    ),
    ("pick.least_recent", "bad_lru", "ok", (), "CORRUPT", WRONGTYPE),
    # pick.weighted
    ("pick.weighted", "populated", "short", (0, 0), "ARG", "expected 5 key(s), got 4"),
    ("pick.weighted", "populated", "ok", (0,), "ARG", "expected 2 argument(s), got 1"),
    (
        "pick.weighted",
        "populated",
        "ok",
        (0, b"1e3"),
        "ARG",
        'random2 must be an integer, got "1e3"',
    ),
    ("pick.weighted", "empty", "ok", (0, 0), "NONODE", NO_NODE),
    ("pick.weighted", "draining", "ok", (0, 0), "NONODE", NO_NODE),
    ("pick.weighted", "bad_weighted", "ok", (0, 0), "CORRUPT", WRONGTYPE),
    # pick.smooth_weighted
    ("pick.smooth_weighted", "populated", "long", (), "ARG", "expected 5 key(s), got 6"),
    ("pick.smooth_weighted", "populated", "ok", (1,), "ARG", "expected 0 argument(s), got 1"),
    ("pick.smooth_weighted", "empty", "ok", (), "NONODE", NO_NODE),
    ("pick.smooth_weighted", "draining", "ok", (), "NONODE", NO_NODE),
    ("pick.smooth_weighted", "bad_smooth", "ok", (), "CORRUPT", WRONGTYPE),
]


def test_every_pick_script_and_error_code_is_covered() -> None:
    scripts = {name for name in render_all() if name.startswith("pick.")}
    # TOOMANY: test_smooth_weighted_refuses_too_many_nodes
    assert_codes_covered(ERROR_CASES, scripts, elsewhere=[("pick.smooth_weighted", "TOOMANY")])


@pytest.mark.parametrize(
    ("script", "setup", "keys", "args", "code", "detail"),
    ERROR_CASES,
    ids=[f"{case[0]}-{case[4]}-{index}" for index, case in enumerate(ERROR_CASES)],
)
def test_bad_input_is_refused_and_changes_nothing(
    r: Client, script: str, setup: str, keys: str, args: tuple[Any, ...], code: str, detail: str
) -> None:
    s = Scheduler(r, "err", rng=random.Random(0))
    SETUPS[setup](r, s)
    own = [s.namespace.key(name) for name in PICK_KEYS[script]]
    key_list = {"ok": own, "short": own[:-1], "long": [*own, s.namespace.key("extra")]}[keys]
    # A WRONGTYPE detail names the key: 'key "luasched:{err}:..." holds another type ...'
    assert_refused(r, s, script, key_list, args, code, detail, exact=detail != WRONGTYPE)
