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
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster
import redis.connection
from redis.exceptions import NoPermissionError

from helpers import _glob_escape, namespace_keys, snapshot_ignoring_ttl
from luasched.keys import Namespace
from luasched.queue import Lease, node_dequeue_call
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


# --------------------------------------------------------------------------------------------
# Every key any script touches is one of its KEYS: each call runs as a user allowed exactly the
# keys of that call (Redis checks the keys of every command a script calls against the calling
# user, on every server of the matrix, 6.2 included).


class PerCallUser:
    """One ACL user whose keys are set, before every command its client sends, to exactly the
    keys of that command (``COMMAND GETKEYS``: a script call's KEYS, a BLPOP's lists; for a
    pipeline the keys of its commands), every command allowed. Commands with no key run with no
    key allowed. Created on every primary; ``delete()`` removes it."""

    def __init__(self, server: ServerHandle) -> None:
        self.name = "luasched-call-" + secrets.token_hex(6)
        self.server = server
        self.admins = server.primaries()
        self.admins[0].set_response_callback("COMMAND", lambda reply, **_: reply)  # raw keys
        self.sent: list[tuple[bytes, ...]] = []  # the key sets the user was limited to
        self.limit([])

    def limit(self, commands: list[tuple[Any, ...]]) -> None:
        keys: list[bytes] = []
        for command in commands:
            keys += [key for key in self._keys_of(command) if key not in keys]
        self.sent.append(tuple(keys))
        patterns = [b"~" + _glob_escape(key) for key in keys]
        for admin in self.admins:
            admin.execute_command("ACL", "SETUSER", self.name, "reset", "on", "nopass",
                                  "+@all", *patterns)  # fmt: skip

    def _keys_of(self, command: tuple[Any, ...]) -> list[bytes]:
        try:
            found = self.admins[0].execute_command("COMMAND", "GETKEYS", *command)
        except redis.ResponseError:  # a command without key arguments
            return []
        return [bytes(key) for key in found]

    def client(self) -> redis.Redis | redis.cluster.RedisCluster:
        """A client logged in as this user, each of its commands limited to its own keys."""
        user = self

        class Limited(redis.connection.Connection):
            def send_command(self, *args: Any, **kwargs: Any) -> None:
                user.limit([args])
                super().send_command(*args, **kwargs)

            def pack_commands(self, commands: Any) -> Any:
                user.limit([tuple(command) for command in commands])
                return super().pack_commands(commands)

        login = {"username": self.name, "password": "x", "connection_class": Limited}
        if self.server.is_cluster:  # from_url: the nodes' pools get the connection class
            url = f"redis://{self.server.host}:{self.server.port}"
            return redis.cluster.RedisCluster.from_url(url, **login)
        pool = redis.ConnectionPool(host=self.server.host, port=self.server.port, **login)
        return redis.Redis(connection_pool=pool)

    def refusals(self) -> list[Any]:
        """The ACL LOG entries of this user on every primary."""
        entries = []
        for admin in self.admins:
            for entry in admin.execute_command("ACL", "LOG", "128"):
                if not isinstance(entry, dict):  # RESP2: a flat list of names and values
                    entry = dict(zip(entry[::2], entry[1::2], strict=True))
                fields = entry
                if fields.get(b"username") == self.name.encode():
                    entries.append(fields)
        return entries

    def delete(self) -> None:
        for admin in self.admins:
            admin.execute_command("ACL", "DELUSER", self.name)
            admin.close()


@pytest.fixture
def per_call_users(server: ServerHandle) -> Iterator[Any]:
    """A factory of ``PerCallUser`` (each with its own client); all deleted after the test, and
    no ACL LOG entry of any of them allowed."""
    made: list[tuple[PerCallUser, redis.Redis | redis.cluster.RedisCluster]] = []

    def make() -> tuple[PerCallUser, redis.Redis | redis.cluster.RedisCluster]:
        user = PerCallUser(server)
        made.append((user, user.client()))
        return made[-1]

    try:
        yield make
        for user, _ in made:
            assert not user.refusals(), user.refusals()
    finally:
        for user, client in made:
            client.close()
            user.delete()


def test_a_per_call_user_is_refused_a_key_outside_its_call(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle
) -> None:
    """The harness below catches what it is for: a script touching a key it was not passed is
    refused, and the ACL LOG names that key."""
    user = PerCallUser(server)
    client = user.client()
    try:
        declared = b"luasched:{percall}:declared"
        assert client.eval("return redis.call('SET', KEYS[1], 'x')", 1, declared) == b"OK"
        with pytest.raises(redis.ResponseError):
            client.eval("return redis.call('GET', KEYS[1] .. ':built')", 1, declared)
        assert user.sent[-1] == (declared,)
        assert [entry[b"object"] for entry in user.refusals()] == [declared + b":built"]
    finally:
        client.close()
        user.delete()


def _node_worker(view: Any, block_ms: int, out: list[Any]) -> None:
    try:
        out.append(view.dequeue(b"sleeper", HOUR, block_ms=block_ms))
    except BaseException as error:  # surfaced by the test's assertion on `out`
        out.append(error)


def test_every_call_runs_as_a_user_allowed_exactly_its_keys(
    r: redis.Redis | redis.cluster.RedisCluster, per_call_users: Any
) -> None:
    """Every operation of every script, and the dispatch scripts on their wake-up paths (each
    strategy, delayed, promotion and reclaim, nack ready / delayed / dead, requeue of a dead
    letter, redispatch, a blocking node dequeue woken by a dispatch, a wake-up signal passed on
    by a worker of another node), each command as a user allowed exactly that command's keys:
    no NOPERM (every operation answers as it should) and no ACL LOG entry."""
    _, client = per_call_users()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the eviction-policy check
        done = every_operation(Scheduler(client, TENANT_A))
    assert not set(render_all()) - {name.split(" ")[0] for name in done}

    s = Scheduler(client, "percall")
    s.nodes.register("a", capacity=1000, ttl_ms=HOUR)
    s.nodes.register("b", capacity=1000, ttl_ms=HOUR)
    s.slots.rebalance()
    q = s.queue("jobs")
    keys = q.dispatch_keys

    def register_waiters() -> None:  # a worker of a and one of b wait (no block here)
        for node in (b"a", b"b"):
            wait = node_dequeue_call(keys, node, b"w", 1, HOUR, wait_ms=60_000)
            assert s.runner.run(wait).leases == ()

    register_waiters()
    for strategy in ("slot", "least_loaded", "two_choices", "weighted", "round_robin"):
        assert q.dispatch(strategy, b"", strategy=strategy, routing_key=b"k").created
        later = strategy + "-later"
        assert q.dispatch(later, b"", strategy=strategy, routing_key=b"k", delay_ms=1).created
    time.sleep(0.01)

    def take_all(lease_ms: int) -> list[tuple[bytes, Lease]]:
        taken: list[tuple[bytes, Lease]] = []
        for node in (b"a", b"b"):
            taken += [(node, lease) for lease in q.for_node(node).dequeue_many(b"w", 20, lease_ms)]
        return taken

    # Promotion (waking the nodes of the due delayed tasks), 1 ms leases, then their reclaim
    # (waking their nodes again) and every task leased for good.
    assert take_all(1)
    time.sleep(0.01)
    leases: list[tuple[bytes, Lease]] = []
    while taken := take_all(HOUR):
        leases += taken
    assert sorted(lease.task_id for _, lease in leases) == sorted(
        name.encode() + tail
        for name in ("slot", "least_loaded", "two_choices", "weighted", "round_robin")
        for tail in (b"", b"-later")
    )
    assert max(lease.attempt for _, lease in leases) >= 2  # a 1 ms lease was reclaimed
    (first_node, first), (second_node, second), (third_node, third) = leases[:3]
    assert q.for_node(first_node).extend(first, HOUR) > 0
    assert q.for_node(first_node).nack(first, delay_ms=0).state == "ready"
    assert q.for_node(second_node).nack(second, delay_ms=5).state == "delayed"
    assert q.for_node(third_node).ack(third)
    short_node = q.dispatch("short", b"", strategy="round_robin", max_attempts=1).node
    time.sleep(0.01)  # the delayed nack is due
    retaken: list[tuple[bytes, Lease]] = []
    while taken := take_all(HOUR):
        retaken += taken
    assert sorted(lease.task_id for _, lease in retaken) == sorted(
        [first.task_id, second.task_id, b"short"]
    )
    short = next(lease for _, lease in retaken if lease.task_id == b"short")
    assert q.for_node(short_node).nack(short).state == "dead"
    assert q.requeue_dead_dispatched("short").state == "requeued"
    s.nodes.drain("b")
    assert q.redispatch("b").node_state == "draining"
    assert q.dispatch_stats(["a", "b"]).nodes[b"b"].ready == 0
    s.nodes.undrain("b")
    time.sleep(0.01)
    while take_all(HOUR):  # nothing left to take but the next dispatch
        pass

    # A blocked worker of a is woken by a dispatch to a; a worker of b blocked before it gets
    # a's signal first and passes it on. Each worker on its own per-call user.
    r.delete(keys.wake, keys.waiters)  # no signal left from above
    out_b: list[Any] = []
    out_a: list[Any] = []
    _, worker_b_client = per_call_users()
    _, worker_a_client = per_call_users()
    worker_b = Scheduler(worker_b_client, "percall").queue("jobs", poll_ms=5_000)
    worker_a = Scheduler(worker_a_client, "percall").queue("jobs", poll_ms=5_000)
    blocked_b = threading.Thread(target=_node_worker, args=(worker_b.for_node("b"), 1_500, out_b))
    blocked_b.start()
    time.sleep(0.3)
    blocked_a = threading.Thread(target=_node_worker, args=(worker_a.for_node("a"), 8_000, out_a))
    blocked_a.start()
    time.sleep(0.3)
    owned_by_a = next(k for n in range(10_000) if s.slots.owner(k := f"k{n}").node == b"a")
    assert q.dispatch("wake-a", b"", strategy="slot", routing_key=owned_by_a).node == b"a"
    blocked_a.join(10)
    blocked_b.join(10)
    assert len(out_a) == 1 and isinstance(out_a[0], Lease) and out_a[0].task_id == b"wake-a"
    assert out_b == [None]
