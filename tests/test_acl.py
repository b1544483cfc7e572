"""Tenants and privilege (issue 9, item 4).

An ACL user is allowed only what luasched needs and only the keys of its own namespace:

- commands: ``EVALSHA``, ``EVAL``, ``SCRIPT LOAD``/``SCRIPT EXISTS``, ``PING``, ``INFO``,
  ``BLPOP`` (blocking dequeue/acquire), plus (7.0+) ``EVALSHA_RO``/``EVAL_RO``, ``FCALL``,
  ``FCALL_RO``, ``FUNCTION LIST``; on the cluster what redis-py needs to learn the topology
  (``CLUSTER SLOTS``/``CLUSTER SHARDS``/``CLUSTER NODES``, ``COMMAND``); and the data commands the
  scripts themselves call (scripts run as the calling user), read from the rendered scripts:
  every quoted upper-case word that the server knows as a command. ``CONFIG`` is not granted
  (the queue's eviction-policy check is skipped silently when refused);
- keys: ``~luasched:{tenant-a}:*`` (the namespace's prefix with glob characters escaped). That
  is all 6.2's ACLs can say; 7.0+ grants the same pattern (``%RW~`` is ``~``), so the rules are
  the same on every server of the matrix;
- channels: none (``resetchannels``).

On the cluster the user is created on every primary. The user is deleted after each test (which
also disconnects its clients).

The same user can run every operation of the wrapper in namespace ``tenant-a`` and is refused
(``NOPERM``) every one in ``tenant-b``, whose keys stay unchanged. Hostile ids, names and
payloads (Lua code, quotes, braces, newlines, NUL bytes) round-trip verbatim and never change
which script runs: the server's script cache holds exactly the manifest's SHA1s before and after.
"""

from __future__ import annotations

import re
import secrets
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster
from redis.exceptions import NoPermissionError

from helpers import _glob_escape, namespace_keys, snapshot_ignoring_ttl
from luasched.keys import Namespace
from luasched.queue import Lease
from luasched.render import render_all
from luasched.scheduler import Scheduler
from servers import ServerHandle

TENANT_A = "tenant-a"
TENANT_B = "tenant-b"
USER = "luasched-tenant-a"
HOUR = 3_600_000

#: Ids, names and payloads that try to break out of a script, a key or a reply.
HOSTILE: list[bytes] = [
    b"]] return redis.call('FLUSHALL') --",
    b"'); redis.call('FLUSHALL'); --",
    b'" .. redis.call("FLUSHALL") .. "',
    b"]==] redis.call('FLUSHALL') --[==[",
    b"{tenant-b}",
    b"}{",
    b"luasched:{tenant-b}:nodes:index",
    b"line 1\nline 2\r\n",
    b"\x00",
    b"a\x00b\x00",
    b"\xff\xfe not utf-8 \xc3\x28",
    b"%s%d%n %% \\0 \\n",
    b"*?[]\\ glob",
    "ünïcödé ✓ \u202e".encode(),
]

_COMMAND_WORD = re.compile(r"'([A-Z][A-Z_]+)'")


def script_commands(known: set[str]) -> set[str]:
    """The Redis commands the rendered scripts call (quoted upper-case words the server knows)."""
    words = {
        word.lower()
        for script in render_all().values()
        for word in _COMMAND_WORD.findall(script.text)
    }
    return words & known


def known_commands(conn: redis.Redis) -> set[str]:
    """Every command name the server knows (lower case)."""
    return {
        (name.decode() if isinstance(name, bytes) else str(name)).lower() for name in conn.command()
    }


def acl_rules(
    server: ServerHandle, conn: redis.Redis, namespace: Namespace, password: str
) -> list[str]:
    """The ACL SETUSER rules of a least-privileged user of ``namespace`` on ``server``."""
    commands = {"evalsha", "eval", "script|load", "script|exists", "ping", "info", "blpop"}
    if server.version >= (7, 0):
        commands |= {"evalsha_ro", "eval_ro", "fcall", "fcall_ro", "function|list"}
    if server.is_cluster:
        commands |= {"cluster|slots", "cluster|shards", "cluster|nodes", "command"}
    commands |= script_commands(known_commands(conn))
    pattern = (_glob_escape(namespace.prefix) + b"*").decode()
    return [
        "reset",
        "on",
        f">{password}",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in sorted(commands)),
        f"~{pattern}",
    ]


@pytest.fixture
def tenant(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle
) -> Iterator[redis.Redis | redis.cluster.RedisCluster]:
    """A client logged in as the least-privileged user of namespace tenant-a."""
    password = secrets.token_hex(16)
    primaries = server.primaries()
    try:
        for conn in primaries:
            conn.execute_command(
                "ACL", "SETUSER", USER, *acl_rules(server, conn, Namespace(TENANT_A), password)
            )
        client = server.client(username=USER, password=password)
        try:
            yield client
        finally:
            client.close()
    finally:
        for conn in primaries:
            conn.execute_command("ACL", "DELUSER", USER)
            conn.close()


def seed(client: redis.Redis | redis.cluster.RedisCluster, namespace: str) -> None:
    """Nodes, slots, picks, a queue with tasks, a held lock and a permit in ``namespace``."""
    scheduler = Scheduler(client, namespace)
    scheduler.nodes.register("node-1", weight=2, capacity=10, ttl_ms=HOUR)
    scheduler.nodes.register("node-2", ttl_ms=HOUR)
    scheduler.slots.rebalance()
    scheduler.pick.least_loaded()
    scheduler.pick.round_robin()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        queue = scheduler.queue("jobs")
    queue.enqueue("task-1", b"payload")
    queue.enqueue("task-2", b"payload")
    assert queue.dequeue("worker", HOUR) is not None
    assert scheduler.lock("mutex", ttl_ms=HOUR).acquire(blocking=False)
    assert scheduler.semaphore("sem", 2, ttl_ms=HOUR).acquire(blocking=False)


def every_operation(scheduler: Scheduler, tag: bytes = b"") -> list[str]:
    """Run every operation of the wrapper once in ``scheduler``'s namespace; their names."""
    done: list[str] = []

    def step(name: str) -> None:
        done.append(name)

    nodes, slots, pick = scheduler.nodes, scheduler.slots, scheduler.pick
    node_a, node_b = b"node-a" + tag, b"node-b" + tag
    assert nodes.register(node_a, weight=3, capacity=100, meta=b"m" + tag, ttl_ms=HOUR)
    step("nodes.register")
    nodes.register(node_b, ttl_ms=HOUR)
    assert nodes.heartbeat(node_a, HOUR) > 0
    step("nodes.heartbeat")
    slots.rebalance()
    step("slots.rebalance")
    assert slots.owner(b"user:1").node in (node_a, node_b)
    step("slots.owner")
    assert len(slots.owners([b"a", b"b"])) == 2
    step("slots.owners")
    assert slots.owner_of_slot(7).node in (node_a, node_b)
    step("slots.owner_of_slot")
    assert slots.keyslot(b"{user1000}.following") == 3443
    step("slots.keyslot")
    assert {info.node_id for info in nodes.list()} >= {node_a, node_b}
    step("nodes.list")
    for name in (
        "least_loaded",
        "two_choices",
        "round_robin",
        "weighted",
        "smooth_weighted",
        "least_recent",
    ):
        picked = getattr(pick, name)()
        assert picked.node in (node_a, node_b), (name, picked)
        step(f"pick.{name}")
    pick.release(node_a)
    step("pick.release")
    assert nodes.drain(node_b)
    step("nodes.drain")
    nodes.undrain(node_b)
    step("nodes.undrain")
    nodes.sweep()
    step("nodes.sweep")

    queue = scheduler.queue(b"q" + tag)
    task = b"task" + tag
    assert queue.enqueue(task, b"payload" + tag).created
    step("queue.enqueue")
    lease = queue.dequeue(b"worker", HOUR)
    assert lease is not None and lease.task_id == task and lease.payload == b"payload" + tag
    step("queue.dequeue")
    assert queue.extend(lease, HOUR) > 0
    step("queue.extend")
    assert queue.nack(lease, delay_ms=0).state == "ready"
    step("queue.nack")
    lease = queue.dequeue(b"worker", HOUR)
    assert lease is not None
    assert queue.ack(lease)
    step("queue.ack")
    queue.enqueue(task + b"-2", b"", max_attempts=1)
    lease = queue.dequeue(b"worker", HOUR)
    assert lease is not None
    assert queue.nack(lease, reason=b"dead").state == "dead"
    assert queue.requeue_dead(task + b"-2")
    step("queue.requeue_dead")
    lease = queue.dequeue_many(b"worker", 5, HOUR)[0]
    assert queue.ack_and_dequeue(lease, b"worker", HOUR, block_ms=30) is None  # BLPOP waits
    step("queue.ack_and_dequeue (blocking)")
    assert queue.stats().ready == 0
    step("queue.stats")
    dispatched = queue.dispatch(task + b"-d", b"payload", strategy="slot", routing_key=b"user:1")
    step("queue.dispatch")
    mine = queue.for_node(dispatched.node)
    lease = mine.dequeue(b"worker", HOUR)
    assert lease is not None
    step("queue.node_dequeue")
    assert mine.extend(lease, HOUR) > 0
    step("queue.node_extend")
    assert mine.nack(lease, delay_ms=0).state == "ready"
    step("queue.node_nack")
    lease = mine.dequeue(b"worker", HOUR)
    assert lease is not None and mine.ack(lease)
    step("queue.node_ack")
    doomed = queue.dispatch(
        task + b"-x", b"", strategy="slot", routing_key=b"user:1", max_attempts=1
    )
    lease = mine.dequeue(b"worker", HOUR)
    assert lease is not None and mine.nack(lease).state == "dead"
    assert queue.requeue_dead_dispatched(task + b"-x").node == doomed.node
    step("queue.dispatch_requeue_dead")
    lease = mine.dequeue(b"worker", HOUR)
    assert lease is not None and mine.ack(lease)
    assert queue.redispatch(dispatched.node).node_state == "live"
    step("queue.redispatch")
    assert mine.stats().ready == 0
    step("queue.node_stats")

    lock = scheduler.lock(b"mutex" + tag, ttl_ms=HOUR)
    handle = lock.acquire(blocking=False)
    assert handle is not None and handle.name == b"mutex" + tag
    step("lock.acquire")
    assert lock.acquire(blocking=True, timeout=0.05) is None  # waits on the wake list (BLPOP)
    assert lock.extend(handle).extended
    step("lock.extend")
    assert lock.release(handle).released
    step("lock.release")
    semaphore = scheduler.semaphore(b"sem" + tag, 1, ttl_ms=HOUR)
    permit = semaphore.acquire(blocking=False)
    assert permit is not None
    step("lock.semaphore_acquire")
    assert semaphore.extend(permit).extended
    step("lock.semaphore_extend")
    assert semaphore.release(permit).released
    step("lock.semaphore_release")
    assert nodes.remove(node_b).removed
    step("nodes.remove")
    return done


def test_rules_cover_what_the_scripts_call(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle
) -> None:
    conn = server.primaries()[0]
    with conn:
        used = script_commands(known_commands(conn))
    assert {"time", "hget", "zadd"} <= used, used
    assert not used & {"flushall", "flushdb", "config", "keys", "scan", "acl", "eval", "script"}


def test_tenant_runs_every_operation_in_its_namespace(
    r: redis.Redis | redis.cluster.RedisCluster, tenant: redis.Redis | redis.cluster.RedisCluster
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # CONFIG refused: no warning, no failure
        done = every_operation(Scheduler(tenant, TENANT_A))
    missing = set(render_all()) - {name.split(" ")[0] for name in done}
    assert not missing, f"operations not exercised: {sorted(missing)}"
    assert namespace_keys(r, TENANT_A)
    with pytest.raises(NoPermissionError):
        tenant.get("outside-the-namespace")
    with pytest.raises(NoPermissionError):
        tenant.execute_command("FLUSHALL")
    with pytest.raises(NoPermissionError):
        tenant.execute_command("CONFIG", "GET", "maxmemory-policy")


def _refused(action: Any) -> None:
    with pytest.raises(NoPermissionError):
        action()


def test_tenant_is_refused_in_another_namespace(
    r: redis.Redis | redis.cluster.RedisCluster, tenant: redis.Redis | redis.cluster.RedisCluster
) -> None:
    seed(r, TENANT_B)
    before = snapshot_ignoring_ttl(r, TENANT_B)
    assert before
    other = Scheduler(tenant, TENANT_B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        queue = other.queue("jobs")
    lease = Lease(b"task-1", b"", 1, 1, 0)
    lock = other.lock("mutex", ttl_ms=HOUR)
    semaphore = other.semaphore("sem", 2, ttl_ms=HOUR)
    actions = {
        "nodes.register": lambda: other.nodes.register("intruder", ttl_ms=HOUR),
        "nodes.heartbeat": lambda: other.nodes.heartbeat("node-1", 1),
        "nodes.drain": lambda: other.nodes.drain("node-1"),
        "nodes.remove": lambda: other.nodes.remove("node-1"),
        "nodes.sweep": lambda: other.nodes.sweep(),
        "nodes.list": lambda: other.nodes.list(),
        "slots.rebalance": lambda: other.slots.rebalance(),
        "slots.owner": lambda: other.slots.owner("k"),
        "slots.owners": lambda: other.slots.owners(["k", "j"]),
        "slots.owner_of_slot": lambda: other.slots.owner_of_slot(1),
        "pick.least_loaded": lambda: other.pick.least_loaded(),
        "pick.two_choices": lambda: other.pick.two_choices(),
        "pick.round_robin": lambda: other.pick.round_robin(),
        "pick.weighted": lambda: other.pick.weighted(),
        "pick.smooth_weighted": lambda: other.pick.smooth_weighted(),
        "pick.least_recent": lambda: other.pick.least_recent(),
        "pick.release": lambda: other.pick.release("node-1"),
        "queue.enqueue": lambda: queue.enqueue("intruder", b"x"),
        "queue.dequeue": lambda: queue.dequeue("intruder", HOUR),
        "queue.dequeue (blocking)": lambda: queue.dequeue("intruder", HOUR, block_ms=20),
        "queue.ack": lambda: queue.ack(lease),
        "queue.nack": lambda: queue.nack(lease),
        "queue.extend": lambda: queue.extend(lease, HOUR),
        "queue.requeue_dead": lambda: queue.requeue_dead("task-1"),
        "queue.stats": lambda: queue.stats(),
        "lock.acquire": lambda: lock.acquire(blocking=False),
        "lock.semaphore_acquire": lambda: semaphore.acquire(blocking=False),
        "blpop": lambda: tenant.blpop([lock.wake_key], 0.01),
    }
    for name, action in actions.items():
        try:
            _refused(action)
        except BaseException as error:
            raise AssertionError(f"{name} was not refused in {TENANT_B}") from error
    assert snapshot_ignoring_ttl(r, TENANT_B) == before
    assert not namespace_keys(r, TENANT_A)  # nothing leaked into the tenant's own namespace


def _cached_scripts(server: ServerHandle) -> list[int | None]:
    counts: list[int | None] = []
    for conn in server.primaries():
        with conn:
            memory = conn.info("memory")
            counts.append(memory.get("number_of_cached_scripts"))
    return counts


def _all_exist(server: ServerHandle) -> bool:
    shas = [script.sha1 for script in render_all().values()]
    result = True
    for conn in server.primaries():
        with conn:
            result = result and all(conn.script_exists(*shas))
    return result


def test_hostile_values_round_trip_and_never_change_the_script(
    r: redis.Redis | redis.cluster.RedisCluster,
    server: ServerHandle,
    tenant: redis.Redis | redis.cluster.RedisCluster,
) -> None:
    seed(r, TENANT_B)
    other_before = snapshot_ignoring_ttl(r, TENANT_B)
    scheduler = Scheduler(tenant, TENANT_A)
    scheduler.load_scripts()
    assert _all_exist(server)
    cached_before = _cached_scripts(server)
    if all(count is not None for count in cached_before):
        assert cached_before == [len(render_all())] * len(cached_before)

    nodes, queue = scheduler.nodes, scheduler.queue("jobs")
    for value in HOSTILE:
        assert nodes.register(value, meta=value, ttl_ms=HOUR)
    scheduler.slots.rebalance()
    listed = {info.node_id: info.meta for info in nodes.list()}
    assert listed == {value: value for value in HOSTILE}
    owners = {owner.node for owner in scheduler.slots.owners(HOSTILE)}
    assert owners <= set(HOSTILE)
    for _ in HOSTILE:
        picked = scheduler.pick.least_loaded()
        assert picked.node in HOSTILE
        scheduler.pick.release(picked.node)
        assert scheduler.pick.round_robin().node in HOSTILE
    seen: dict[bytes, bytes] = {}
    for value in HOSTILE:  # one task at a time, through every state
        assert queue.enqueue(value, value, max_attempts=1).created
        lease = queue.dequeue(value, HOUR)  # the worker id is hostile too
        assert lease is not None
        seen[lease.task_id] = lease.payload
        assert queue.nack(lease, reason=value).state == "dead"
        assert queue.requeue_dead(value)
        lease = queue.dequeue(value, HOUR)
        assert lease is not None and lease.task_id == value and lease.payload == value
        assert queue.ack(lease)
    assert seen == {value: value for value in HOSTILE}
    for value in HOSTILE:
        lock = scheduler.lock(value, ttl_ms=HOUR)
        handle = lock.acquire(blocking=False)
        assert handle is not None and handle.name == value
        assert lock.acquire(blocking=False) is None  # held: the name maps to one lock
        assert lock.release(handle).released
        semaphore = scheduler.semaphore(value, 1, ttl_ms=HOUR)
        permit = semaphore.acquire(blocking=False)
        assert permit is not None and permit.name == value
        assert semaphore.release(permit).released
    for value in HOSTILE:
        assert nodes.remove(value).removed

    assert _all_exist(server)
    assert _cached_scripts(server) == cached_before
    assert snapshot_ignoring_ttl(r, TENANT_B) == other_before
    prefixes = (Namespace(TENANT_A).prefix, Namespace(TENANT_B).prefix)
    if isinstance(r, redis.cluster.RedisCluster):
        every_key = list(r.scan_iter(count=1000, target_nodes=redis.cluster.RedisCluster.ALL_NODES))
    else:
        every_key = list(r.scan_iter(count=1000))
    assert every_key and all(bytes(key).startswith(prefixes) for key in every_key)
