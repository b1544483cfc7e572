"""Every script against KEYS that break the key layout, driven by the manifest.

Nothing here names a script's keys: a scenario drives the public API through every script and
records, for each script, its first call that succeeded and the state of the namespace just
before it (DUMP and PTTL of every key, to put it back; the checks compare every key's value,
digested by support.helpers.DIGEST_SCRIPT). Each case restores that state, breaks it one way, sends
the recorded call raw (EVALSHA on the node that holds the namespace) and checks the guarantee:

- wrong types: for every KEYS entry and every Redis type other than the one its ``--@key`` line
  names (string, list, hash, set, zset, stream), that key holds the other type. The script
  answers ``LUASCHED_CORRUPT <script>: ...`` and no key of the namespace changed; or, when the
  call never reads that key, the key is left exactly as it was put (never written over, never
  deleted) and the call answers as it does on the intact state.
- foreign KEYS: one KEYS entry swapped for the same key of another namespace (whose keys hash
  to the same slot, so the cluster runs the call too), every KEYS entry in a namespace holding
  a ``{`` or ``}``, one entry swapped for a key of another kind of the same namespace, or (for
  a ``kind<queue>``/``kind<name>`` pattern) for the same kind of another queue or lock: the
  script answers ``LUASCHED_ARG`` and no key changed (none was created either).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.cluster
from redis.exceptions import ResponseError

from luasched.keys import Namespace, key_slot
from luasched.render import manifest, render_all
from luasched.scheduler import Scheduler
from luasched.scripts import Call
from support.helpers import digest_command, digests, namespace_keys
from support.servers import ServerHandle

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
    grouped = s.queue("tenants", request_ttl_ms=HOUR)
    grouped.enqueue("g-dead", b"x", priority=511, max_attempts=1, group="A")
    grouped.set_group("A", weight=2, max_active=3)
    grouped.set_limits(max_active=100)
    grouped.set_rate(1000, burst=10, group="A")
    lease = grouped.dequeue("worker-1", HOUR)
    assert lease is not None
    grouped.nack(lease, reason=b"boom")
    grouped.requeue_dead("g-dead")
    lease = grouped.dequeue("worker-1", HOUR)
    assert lease is not None
    grouped.ack(lease)
    grouped.group_stats(["A"])
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


#: Server name -> its recording: made once per server and test process. A recording is data
#: (calls, DUMPs and TTLs an hour long), and each Case starts from FLUSHDB and puts its state
#: back, so one recording serves every test of a server.
_RECORDINGS: dict[str, dict[str, Recorded]] = {}


@pytest.fixture
def scenario(r: Client, server: ServerHandle) -> Iterator[tuple[redis.Redis, dict[str, Recorded]]]:
    recorded = _RECORDINGS.get(server.name)
    if recorded is None:
        recorded = _RECORDINGS[server.name] = record(r)
    expected = {name for name in SCRIPTS if runs_on(server, name)}
    assert set(recorded) == expected, sorted(expected - set(recorded))
    yield node_client(r), recorded


def type_commands(key: bytes, kind: str) -> list[tuple[Any, ...]]:
    """The commands that make ``key`` hold one small value of Redis type ``kind``."""
    value: dict[str, tuple[Any, ...]] = {
        "string": ("SET", key, b"x"),
        "list": ("RPUSH", key, b"x"),
        "hash": ("HSET", key, b"x", b"y"),
        "set": ("SADD", key, b"x"),
        "zset": ("ZADD", key, 1, b"x"),
        "stream": ("XADD", key, "*", b"x", b"y"),
    }
    return [("DEL", key), value[kind]]


#: Each key's digest (type, content, whether it has a TTL) and DBSIZE.
State = tuple[dict[bytes, bytes], int]


class Case:
    """One round trip: empty the database and put the namespace back as recorded (plus
    ``setup``), read its state, send the call, read the state again. ``keys`` are all the keys
    the checks look at; DBSIZE shows any other key created."""

    def __init__(self, conn: redis.Redis, recorded: Recorded) -> None:
        self.conn, self.call, self.before = conn, recorded.call, recorded.before
        self.keys = sorted(set(self.before) | set(self.call.keys))
        self.sha1 = render_all()[self.call.script].sha1

    def _state_commands(self) -> list[tuple[Any, ...]]:
        return [digest_command(self.keys)]

    def _state(self, replies: Sequence[Any]) -> State:
        return digests(self.keys, replies[0])

    def run(
        self, keys: Sequence[bytes], setup: Sequence[tuple[Any, ...]] = ()
    ) -> tuple[Any, State, State]:
        """(the call's reply, an error reply as a ResponseError; state before; state after)."""
        # FLUSHDB, not a DEL of these keys: a key the recording made after this call (a lock or
        # a marker with a short TTL) would otherwise lapse during a slow run and move DBSIZE.
        commands: list[tuple[Any, ...]] = [("FLUSHDB",)]
        commands += [
            # a TTL at least a minute long: a key must not lapse between the reads around the call
            # on a slow machine (the checks compare whether a key has a TTL, not its value)
            ("RESTORE", key, 0 if ttl <= 0 else max(ttl, 60_000), dumped)
            for key, (dumped, ttl) in self.before.items()
        ]
        commands += setup
        prepared = len(commands)
        commands += self._state_commands()
        commands.append(("EVALSHA", self.sha1, len(keys), *keys, *self.call.args))
        commands += self._state_commands()
        pipe = self.conn.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies = pipe.execute(raise_on_error=False)
        for reply in replies[:prepared]:
            assert not isinstance(reply, Exception), reply
        return (
            replies[prepared + 1],
            self._state(replies[prepared : prepared + 1]),
            self._state(replies[prepared + 2 :]),
        )


def scripts_with_keys() -> list[str]:
    return sorted(name for name, entry in SCRIPTS.items() if entry["keys"])


def case_of(scenario: tuple[redis.Redis, dict[str, Recorded]], script: str) -> Case:
    """The recorded call of ``script`` as a Case (skipped where the server is too old for it)."""
    conn, recorded = scenario
    if script not in recorded:
        pytest.skip(f"{script} needs {SCRIPTS[script]['min_server']}")
    conn.script_load(render_all()[script].text.encode("utf-8"))  # the Case's EVALSHA
    return Case(conn, recorded[script])


@pytest.mark.slow
@pytest.mark.parametrize("script", scripts_with_keys())
def test_a_key_of_another_type_is_refused_or_left_alone(
    scenario: tuple[redis.Redis, dict[str, Recorded]], script: str
) -> None:
    case = case_of(scenario, script)
    call = case.call
    intact, _, _ = case.run(call.keys)
    assert not isinstance(intact, ResponseError), f"{script} fails on the recorded state: {intact}"
    refused = 0
    for position, spec in enumerate(SCRIPTS[script]["keys"]):
        key = call.keys[position]
        for kind in TYPES:
            if kind == spec["type"]:
                continue
            reply, broken, after = case.run(call.keys, type_commands(key, kind))
            where = f"{script} KEYS[{position + 1}] ({spec['name']}) as a {kind}"
            if isinstance(reply, ResponseError):
                assert str(reply).startswith(f"LUASCHED_CORRUPT {script}: "), f"{where}: {reply}"
                assert after == broken, f"{where}: refused but changed keys"
                refused += 1
            else:
                # Never read: the call succeeds and the key is exactly as it was put.
                assert after[0][key] == broken[0][key], f"{where}: answered {reply!r}, key changed"
                assert type(reply) is type(intact), f"{where}: {reply!r} against {intact!r}"
    assert refused > 0, f"{script}: no wrong type was ever refused"


def test_every_script_with_keys_can_answer_corrupt() -> None:
    for name in scripts_with_keys():
        codes = {error["code"] for error in SCRIPTS[name]["errors"]}
        assert "CORRUPT" in codes, name


def in_namespace(key: bytes, name: bytes) -> bytes:
    """``key`` of NAMESPACE as the same key of the namespace called ``name``."""
    assert key.startswith(NAMESPACE.prefix), key
    return b"luasched:{" + name + b"}:" + key[len(NAMESPACE.prefix) :]


def foreign_keys(script: str, keys: Sequence[bytes]) -> Iterator[tuple[str, list[bytes]]]:
    """KEYS that break the one-namespace rule, each with what was broken."""
    # A key's kind: its pattern after the namespace, up to the first <placeholder>.
    patterns = [key["pattern"] for key in SCRIPTS[script]["keys"]]
    kinds = [pattern.split("}:", 1)[1].split("<")[0] for pattern in patterns]
    for position in range(len(keys)):
        swapped = list(keys)
        swapped[position] = in_namespace(keys[position], OTHER.encode())
        yield f"KEYS[{position + 1}] of namespace {OTHER}", swapped
        other = next(
            (
                j
                for j in range(1, len(keys))
                if kinds[(position + j) % len(keys)] != kinds[position]
            ),
            None,
        )
        assert other is not None, f"{script}: every key of one kind"
        swapped = list(keys)
        swapped[position] = keys[(position + other) % len(keys)]
        yield f"KEYS[{position + 1}] of another kind", swapped
        if re.fullmatch(r"luasched:\{ns\}:[a-z:_-]+<[a-z_]+>", patterns[position]):
            # kind<queue> / kind<name>: the same kind of another queue or lock of the namespace.
            swapped = list(keys)
            swapped[position] = keys[position] + b"2"
            yield f"KEYS[{position + 1}] of another {patterns[position].split('<')[1]}", swapped
    # "layout}:<kind of KEYS[1]>x": KEYS[1] reads as namespace "layout"'s (the alias of the
    # issue); the other entries do not.
    for name in [*brace_namespaces(), b"layout}:" + kinds[0].encode() + b"x"]:
        yield f"namespace {name!r}", [in_namespace(key, name) for key in keys]


@pytest.mark.slow
@pytest.mark.parametrize("script", scripts_with_keys())
def test_keys_outside_one_namespace_are_refused(
    scenario: tuple[redis.Redis, dict[str, Recorded]], script: str
) -> None:
    case = case_of(scenario, script)
    call = case.call
    cases = list(foreign_keys(script, call.keys))
    assert len(cases) >= 2 * len(call.keys) + 4
    for what, keys in cases:
        assert all(key_slot(key) == NAMESPACE.slot for key in keys), what
        reply, before, after = case.run(keys)
        assert isinstance(reply, ResponseError), f"{script} {what}: answered {reply!r}"
        assert str(reply).startswith(f"LUASCHED_ARG {script}: "), f"{script} {what}: {reply}"
        assert after == before, f"{script} {what}: changed or created keys"
    # The recorded call itself is accepted on the same state (the cases broke only the KEYS).
    reply, _, _ = case.run(call.keys)
    assert not isinstance(reply, ResponseError), f"{script}: {reply}"
