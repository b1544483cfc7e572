"""Every script against KEYS that break the key layout, driven by the manifest.

Nothing here names a script's keys: a scenario drives the public API through every script and
records, for each script, its first call that succeeded and the state of the namespace just
before it (DUMP and PTTL of every key). Each case restores that state, breaks it one way, sends
the recorded call raw (EVALSHA on the node that holds the namespace) and checks the guarantee:

- wrong types: for every KEYS entry and every Redis type other than the one its ``--@key`` line
  names (string, list, hash, set, zset, stream), that key holds the other type. The script
  answers ``LUASCHED_CORRUPT <script>: ...`` and no key of the namespace changed; or, when the
  call never reads that key, the key is left exactly as it was put (never written over, never
  deleted) and the call answers as it does on the intact state.
- foreign KEYS: one KEYS entry swapped for the same key of another namespace (whose keys hash
  to the same slot, so the cluster runs the call too), every KEYS entry in a namespace holding
  a ``{`` or ``}``, or one entry swapped for a key of another kind of the same namespace: the
  script answers ``LUASCHED_ARG`` and no key of either namespace changed (and none was created).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.cluster
from redis.exceptions import ResponseError

from helpers import namespace_keys
from luasched.keys import Namespace, key_slot
from luasched.render import manifest, render_all
from luasched.scheduler import Scheduler
from luasched.scripts import Call
from servers import ServerHandle

SCRIPTS: dict[str, dict[str, Any]] = manifest()["scripts"]
NAMESPACE = Namespace("layout")
TYPES = ("string", "list", "hash", "set", "zset", "stream")
HOUR = 3_600_000

Client = redis.Redis | redis.cluster.RedisCluster
#: key -> (DUMP payload, PTTL): a namespace's state, enough to put it back byte for byte.
Saved = dict[bytes, tuple[bytes, int]]


def same_slot_name(base: str, template: Callable[[int], str]) -> str:
    """The first ``template(i)`` whose keys (in a namespace of that name) share NAMESPACE's slot."""
    target = key_slot(NAMESPACE.prefix)
    for i in range(1_000_000):
        name = template(i)
        if key_slot(b"luasched:{" + name.encode() + b"}:") == target and name != base:
            return name
    raise AssertionError("no name in the same slot")


#: Another namespace whose keys live in the same cluster slot as NAMESPACE's.
OTHER = same_slot_name("layout", lambda i: f"other{i}")


def brace_namespaces() -> list[bytes]:
    """Namespace names holding a brace, each with keys in NAMESPACE's slot: ``layout}x`` (the
    hash tag stays ``layout``), ``}layout`` and one with a ``{`` found by search."""
    opening = same_slot_name("", lambda i: f"lay{{out{i}")
    return [b"layout}x", b"layout}", opening.encode()]


@dataclass(frozen=True)
class Recorded:
    """A script's first successful call in the scenario and the state just before it."""

    call: Call[Any]
    before: Saved


def node_client(client: Client) -> redis.Redis:
    """A plain client on the node that holds the namespace (the server itself if standalone)."""
    if isinstance(client, redis.cluster.RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(NAMESPACE.prefix))
    return client


def save(conn: redis.Redis, keys: Sequence[bytes] | None = None) -> Saved:
    keys = namespace_keys(conn, NAMESPACE) if keys is None else keys
    pipe = conn.pipeline(transaction=False)
    for key in keys:
        pipe.dump(key)
        pipe.pttl(key)
    replies = pipe.execute()
    return {
        key: (bytes(replies[2 * i]), int(replies[2 * i + 1]))
        for i, key in enumerate(keys)
        if replies[2 * i] is not None
    }


def restore(conn: redis.Redis, saved: Saved) -> None:
    """Put the namespace back as ``saved`` (every other key of it deleted)."""
    pipe = conn.pipeline(transaction=False)
    for key in namespace_keys(conn, NAMESPACE):
        pipe.delete(key)
    for key, (dumped, ttl) in saved.items():
        pipe.restore(key, max(ttl, 0), dumped, replace=True)
    pipe.execute()


def comparable(saved: Saved) -> dict[bytes, tuple[bytes, bool]]:
    """A state for comparison: DUMP payloads and whether each key has a TTL (not the countdown)."""
    return {key: (dumped, ttl >= 0) for key, (dumped, ttl) in saved.items()}


def record(r: Client) -> dict[str, Recorded]:
    """Drive every script through the API; its first successful call and the state before it."""
    conn = node_client(r)
    s = Scheduler(r, NAMESPACE.name, rng=random.Random(11))
    recorded: dict[str, Recorded] = {}
    inner = s.runner.run

    def run(call: Call[Any]) -> Any:
        before = save(conn) if call.script not in recorded else None
        reply = inner(call)  # a refused call raises and is not recorded
        if before is not None:
            recorded[call.script] = Recorded(call, before)
        return reply

    s.runner.run = run  # type: ignore[method-assign]
    nodes = s.nodes
    nodes.register("node-a", weight=3, capacity=10, meta=b"meta", ttl_ms=HOUR)
    nodes.register("node-b", weight=1, ttl_ms=HOUR)
    nodes.register("node-c", weight=2, capacity=5, ttl_ms=HOUR)
    nodes.register("node-d", ttl_ms=HOUR)
    nodes.remove("node-d")
    nodes.heartbeat("node-a", HOUR)
    nodes.drain("node-c")
    s.slots.rebalance()
    s.slots.owner("user:1")
    s.slots.owners(["user:1", "user:2"])
    s.slots.owner_of_slot(5)
    s.slots.keyslot("user:1")
    nodes.list()
    nodes.sweep()
    pick = s.pick
    picked = pick.least_loaded(cost=2)
    pick.release(picked.node, cost=1)
    pick.two_choices()
    pick.round_robin()
    pick.weighted()
    pick.smooth_weighted()
    pick.least_recent()

    queue = s.queue("jobs", request_ttl_ms=HOUR)
    queue.enqueue("t-dead", b"x", priority=511, max_attempts=1)
    lease = queue.dequeue("worker-1", HOUR)
    assert lease is not None
    queue.nack(lease, reason=b"boom")
    queue.requeue_dead("t-dead")
    queue.enqueue("t-1", b"one", priority=5)
    queue.enqueue("t-2", b"two", delay_ms=HOUR)
    lease = queue.dequeue("worker-2", HOUR)
    assert lease is not None
    queue.extend(lease, HOUR)
    queue.ack(lease)
    queue.stats()

    doomed = queue.dispatch("d-dead", b"x", strategy="round_robin", priority=511, max_attempts=1)
    node_queue = queue.for_node(doomed.node)
    lease = node_queue.dequeue("worker-3", HOUR)
    assert lease is not None
    node_queue.nack(lease, reason=b"boom")
    queue.requeue_dead_dispatched("d-dead")
    held = queue.dispatch("d-held", b"h", strategy="least_loaded", priority=511)
    node_queue = queue.for_node(held.node)
    lease = node_queue.dequeue("worker-3", HOUR)
    assert lease is not None
    node_queue.extend(lease, HOUR)
    node_queue.ack(lease)
    node_queue.stats()
    moved = queue.dispatch("d-moved", b"m", strategy="least_loaded")
    nodes.drain(moved.node)
    queue.redispatch(moved.node)

    lock = s.lock("mutex", ttl_ms=HOUR)
    handle = lock.acquire(blocking=False)
    assert handle is not None
    lock.extend(handle, HOUR)
    lock.release(handle)
    semaphore = s.semaphore("mutex", 2, ttl_ms=HOUR)
    permit = semaphore.acquire(blocking=False)
    assert permit is not None
    semaphore.extend(permit, HOUR)
    semaphore.release(permit)
    return recorded


def runs_on(server: ServerHandle, script: str) -> bool:
    since = tuple(int(part) for part in SCRIPTS[script]["min_server"].split("."))
    return server.version >= since


@pytest.fixture
def scenario(r: Client, server: ServerHandle) -> Iterator[tuple[redis.Redis, dict[str, Recorded]]]:
    recorded = record(r)
    expected = {name for name in SCRIPTS if runs_on(server, name)}
    assert set(recorded) == expected, sorted(expected - set(recorded))
    conn = node_client(r)
    for script in recorded:
        conn.script_load(render_all()[script].text.encode("utf-8"))
    yield conn, recorded


def evalsha(conn: redis.Redis, call: Call[Any], keys: Sequence[bytes]) -> Any:
    """The raw reply of ``call`` with ``keys`` (an error reply is returned, not raised)."""
    try:
        return conn.evalsha(render_all()[call.script].sha1, len(keys), *keys, *call.args)
    except ResponseError as error:
        return error


def put_type(conn: redis.Redis, key: bytes, kind: str) -> None:
    """``key`` holds one small value of Redis type ``kind`` (whatever it held before)."""
    conn.delete(key)
    if kind == "string":
        conn.set(key, b"x")
    elif kind == "list":
        conn.rpush(key, b"x")
    elif kind == "hash":
        conn.hset(key, b"x", b"y")
    elif kind == "set":
        conn.sadd(key, b"x")
    elif kind == "zset":
        conn.zadd(key, {b"x": 1})
    else:
        conn.xadd(key, {b"x": b"y"})


def scripts_with_keys() -> list[str]:
    return sorted(name for name, entry in SCRIPTS.items() if entry["keys"])


@pytest.mark.parametrize("script", scripts_with_keys())
def test_a_key_of_another_type_is_refused_or_left_alone(
    scenario: tuple[redis.Redis, dict[str, Recorded]], script: str
) -> None:
    conn, recorded = scenario
    if script not in recorded:
        pytest.skip(f"{script} needs {SCRIPTS[script]['min_server']}")
    call, before = recorded[script].call, recorded[script].before
    restore(conn, before)
    intact = evalsha(conn, call, call.keys)
    assert not isinstance(intact, ResponseError), f"{script} fails on the recorded state: {intact}"
    refused = 0
    for position, spec in enumerate(SCRIPTS[script]["keys"]):
        key = call.keys[position]
        for kind in TYPES:
            if kind == spec["type"]:
                continue
            restore(conn, before)
            put_type(conn, key, kind)
            broken = comparable(save(conn))
            reply = evalsha(conn, call, call.keys)
            after = comparable(save(conn))
            where = f"{script} KEYS[{position + 1}] ({spec['name']}) as a {kind}"
            if isinstance(reply, ResponseError):
                assert str(reply).startswith(f"LUASCHED_CORRUPT {script}: "), f"{where}: {reply}"
                assert after == broken, f"{where}: refused but changed keys"
                refused += 1
            else:
                # Never read: the call succeeds and the key is exactly as it was put.
                assert after.get(key) == broken[key], f"{where}: answered {reply!r}, key changed"
                assert type(reply) is type(intact), f"{where}: {reply!r} against {intact!r}"
    assert refused > 0, f"{script}: no wrong type was ever refused"


def test_every_script_with_keys_can_answer_corrupt() -> None:
    for name in scripts_with_keys():
        codes = {error["code"] for error in SCRIPTS[name]["errors"]}
        assert "CORRUPT" in codes, name
