"""Tenants and privilege: the rule ``luasched acl`` prints, on every server of the matrix.

The user is created from the printed ``ACL SETUSER`` line itself, pasted into redis-cli with a
password appended (on every primary of the cluster, with ``--cluster``; with ``--functions`` on
7.0+ where the Functions library is installed). The rule is generated (``luasched.acl``): the
data commands the rendered scripts issue, read from their text, plus the wrapper's own commands;
the key pattern ``~luasched:{ten*}:*`` with the namespace's ``*`` escaped; no channel. 6.2 has
no selectors and the rule needs none. ``CONFIG`` is not granted (the queue's eviction-policy
check is skipped silently when refused). The user is deleted after each test (which also
disconnects its clients).

The same user can run every operation of the wrapper (single calls, a batch after SCRIPT FLUSH,
blocking waits, asyncio) in namespace ``ten*`` and is refused (``NOPERM``) every one in
``tenant-b`` -- which the unescaped pattern would match -- whose keys stay unchanged. That the
scanned command list is complete is checked two ways: against every quoted word of the scripts
that the server knows as a command, and against ``INFO commandstats`` while every operation runs.
Hostile ids, names and payloads (Lua code, quotes, braces, newlines, NUL bytes) round-trip
verbatim and never change which script runs: the server's script cache holds exactly the
manifest's SHA1s before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import re
import secrets
import subprocess
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

import luasched.asyncio
from luasched.acl import acl_commands, acl_rule, reasons_markdown, script_commands
from luasched.cli import main
from luasched.dispatch import STRATEGIES, node_dequeue_call
from luasched.keys import Namespace, glob_escape
from luasched.lock import acquire_call, new_token, release_call
from luasched.queue import Lease, QueueKeys
from luasched.render import render_all
from luasched.scheduler import Scheduler
from support.helpers import CONTENTS_SCRIPT, namespace_keys, snapshot_ignoring_ttl
from support.servers import ROOT, ServerHandle, find_redis_cli

TENANT_A = "ten*"  # a glob character: its rule must not reach tenant-b
TENANT_B = "tenant-b"
USER = "luasched-ten*"
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


def printed_rule(*options: str) -> str:
    """What ``luasched acl ten* [options]`` prints (one line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["acl", TENANT_A, *options]) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ACL SETUSER {USER} reset "), lines
    return lines[0]


def known_commands(conn: redis.Redis) -> set[str]:
    """Every command name the server knows (lower case)."""
    return {
        (name.decode() if isinstance(name, bytes) else str(name)).lower() for name in conn.command()
    }


def paste(server: ServerHandle, line: str) -> list[str]:
    """What redis-cli answers, on every primary, to ``line`` typed into it."""
    answers = []
    for port in server.ports:
        pasted = subprocess.run(
            [find_redis_cli(), "-h", server.host, "-p", str(port)],
            input=line + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        answers.append(pasted.stdout.strip())
    return answers


def delete_user(server: ServerHandle) -> None:
    for conn in server.primaries():
        with conn:
            conn.execute_command("ACL", "DELUSER", USER)


@contextlib.contextmanager
def tenant_user(server: ServerHandle, *, functions: bool = False) -> Iterator[dict[str, str]]:
    """The credentials (client keyword arguments) of the user the printed rule creates, pasted
    into redis-cli on every primary with a password appended; the user is deleted afterwards."""
    password = secrets.token_hex(16)
    options = ["--cluster"] * server.is_cluster + ["--functions"] * functions
    try:
        answers = paste(server, f"{printed_rule(*options)} >{password}")
        assert answers == ["OK"] * len(server.ports), answers
        yield {"username": USER, "password": password}
    finally:
        delete_user(server)


@pytest.fixture
def tenant(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle
) -> Iterator[redis.Redis | redis.cluster.RedisCluster]:
    """A client logged in as the least-privileged user of namespace ``ten*``."""
    with tenant_user(server) as credentials:
        client = server.client(**credentials)
        try:
            yield client
        finally:
            client.close()


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
    grouped = scheduler.queue(b"g" + tag)
    assert grouped.enqueue(task, b"payload" + tag, group=b"A" + tag).created
    step("queue.group_enqueue")
    assert grouped.set_group(b"A" + tag, weight=2, max_active=5).weight == 2
    step("queue.set_group")
    assert grouped.set_limits(max_active=50).max_active == 50
    step("queue.set_limits")
    assert grouped.set_rate(1000, burst=10).burst == 10
    step("queue.set_rate")
    lease = grouped.dequeue(b"worker", HOUR)
    assert lease is not None and lease.task_id == task
    step("queue.group_dequeue")
    assert grouped.nack(lease, delay_ms=0).state == "ready"
    step("queue.group_nack")
    lease = grouped.dequeue(b"worker", HOUR)
    assert lease is not None and grouped.ack(lease)
    step("queue.group_ack")
    grouped.enqueue(task + b"-2", b"", max_attempts=1, group=b"A" + tag)
    lease = grouped.dequeue(b"worker", HOUR)
    assert lease is not None and grouped.nack(lease).state == "dead"
    assert grouped.requeue_dead(task + b"-2")
    step("queue.group_requeue_dead")
    assert grouped.group_stats([b"A" + tag]).groups[b"A" + tag].ready == 1
    step("queue.group_stats")
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
    # A fair lock: a waiter's place is live when the holder releases, so the release pushes the
    # head's token on the lock's wake list; the waiter then BLPOPs its own list and that one.
    fair = scheduler.lock(b"fair" + tag, ttl_ms=HOUR, fair=True)
    held = fair.acquire(blocking=False)
    assert held is not None
    head = new_token()
    place = acquire_call(
        scheduler.namespace, b"fair" + tag, head, HOUR, fair=True, wait_ttl_ms=HOUR
    )
    assert scheduler.runner.run(place).status == "held"
    assert fair.release(held).released
    step("lock.release (fair, wakes the head)")
    waiter = scheduler.lock(b"fair" + tag, ttl_ms=HOUR, fair=True, retry_ms=10)
    assert waiter.acquire(timeout=0.05) is None  # behind the head: waits on both lists (BLPOP)
    assert scheduler.runner.run(release_call(scheduler.namespace, b"fair" + tag, head)).status
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


def flush_scripts(server: ServerHandle) -> None:
    """SCRIPT FLUSH on every primary (as the admin): the next call meets NOSCRIPT."""
    for conn in server.primaries():
        with conn:
            conn.script_flush()


def batch_after_flush(server: ServerHandle, scheduler: Scheduler) -> None:
    """A batch whose scripts the server lacks: EVALSHA meets NOSCRIPT, SCRIPT LOAD, again
    (standalone), or EVAL with the text (cluster)."""
    flush_scripts(server)
    with scheduler.pipeline() as pipe:
        pipe.slots.keyslot(b"{user1000}.following")
        pipe.queue(b"batched").enqueue(b"t", b"p")
        slot, enqueued = pipe.execute()
    assert slot == 3443 and enqueued.created


async def async_operations(server: ServerHandle, credentials: dict[str, str]) -> None:
    """The asyncio wrapper's paths: single calls after NOSCRIPT, blocking waits (BLPOP) of a
    queue and a lock, and a batch."""
    flush_scripts(server)
    client = server.async_client(**credentials)
    try:
        scheduler = luasched.asyncio.Scheduler(client, TENANT_A)
        queue = scheduler.queue(b"async")
        assert (await queue.enqueue(b"t", b"p")).created
        lease = await queue.dequeue(b"worker", HOUR)
        assert lease is not None and lease.task_id == b"t"
        assert await queue.ack(lease)
        assert await queue.dequeue(b"worker", HOUR, block_ms=30) is None  # waits with BLPOP
        lock = scheduler.lock(b"async-lock", ttl_ms=HOUR)
        handle = await lock.acquire(blocking=False)
        assert handle is not None
        assert await lock.acquire(blocking=True, timeout=0.05) is None  # BLPOP on the wake list
        assert (await lock.release(handle)).released
        flush_scripts(server)
        async with scheduler.pipeline() as pipe:
            await pipe.slots.keyslot(b"foo")
            await pipe.queue(b"async").enqueue(b"t2", b"p")
            slot, enqueued = await pipe.execute()
        assert slot == 12182 and enqueued.created
    finally:
        await client.aclose()


def every_path(
    server: ServerHandle, client: redis.Redis | redis.cluster.RedisCluster, functions: bool
) -> None:
    """Every operation (sync, through FCALL when ``functions``, else EVALSHA), a batch after
    SCRIPT FLUSH, and the asyncio paths, in namespace ``ten*``."""
    scheduler = Scheduler(client, TENANT_A)
    assert scheduler.runner.uses_functions() is functions
    done = every_operation(scheduler)
    missing = set(render_all()) - {name.split(" ")[0] for name in done}
    assert not missing, f"operations not exercised: {sorted(missing)}"
    batch_after_flush(server, scheduler)


def test_docs_explain_every_command() -> None:
    """docs/acl.md's table is ``reasons_markdown()``: every command the rule can grant, and why."""
    text = (ROOT / "docs" / "acl.md").read_text()
    table = text.split("tests/test_acl.py checks it -->\n", 1)[1].split("<!-- end generated", 1)[0]
    assert table == reasons_markdown(), "docs/acl.md's table is stale: `make snapshots` writes it"
    rows = re.findall(r"^\| `([a-z_\\|]+)` \|", table, re.M)
    assert [row.replace("\\", "") for row in rows] == acl_commands(functions=True, cluster=True)


def test_a_narrower_rule_leaves_partial_writes(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle
) -> None:
    """What docs/acl.md warns of: with HSET refused, enqueue aborts after its first write (no
    rollback): the task sits in ``ready`` with no meta."""
    rules = acl_rule(Namespace(TENANT_A), cluster=server.is_cluster)
    narrower = [rule for rule in rules if rule != b"+hset"]
    assert len(narrower) == len(rules) - 1
    password = secrets.token_hex(16)
    try:
        for conn in server.primaries():
            with conn:
                conn.execute_command("ACL", "SETUSER", USER, *narrower, f">{password}")
        client = server.client(username=USER, password=password)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                queue = Scheduler(client, TENANT_A).queue("jobs")
            with pytest.raises(
                redis.ResponseError, match=r"can't run this command|no permissions to run"
            ):
                queue.enqueue("t1", b"payload")
        finally:
            client.close()
    finally:
        delete_user(server)
    keys = QueueKeys.of(Namespace(TENANT_A), "jobs").fixed
    ready, tasks = keys[0], keys[4]
    assert r.zrange(ready, 0, -1) == [b"t1"]
    assert r.hget(tasks, b"mt1") is None and r.hget(tasks, b"pt1") is None


#: A quoted upper-case word in a script: every command the templates name is spelled so.
_QUOTED_WORD = re.compile(r"""['"]([A-Z][A-Z_]*)['"]""")


def test_scanned_commands_are_the_commands_the_scripts_name(server: ServerHandle) -> None:
    """The scan (a quoted word opening a call or a table) finds exactly the quoted words of
    the scripts that this server knows as commands: no command spelled another way is missed,
    no option word (LIMIT, WITHSCORES, PX) or error code is granted."""
    conn = server.primaries()[0]
    with conn:
        known = known_commands(conn)
    named = {
        word.lower()
        for script in render_all().values()
        for word in _QUOTED_WORD.findall(script.text)
    }
    assert set(script_commands()) == named & known
    # reached only on some paths (a wedged wake list, a queued lock waiter), granted all the same
    assert {"llen", "zrank", "type", "time", "hset", "zadd"} <= set(script_commands())
    assert not set(acl_commands(functions=True, cluster=True)) & {
        "flushall",
        "flushdb",
        "config",
        "config|get",
        "keys",
        "scan",
        "acl",
        "script",
        "info",
    }


def _issued_commands(server: ServerHandle) -> set[str]:
    """The commands with calls > 0 in INFO commandstats, summed over the primaries."""
    issued: set[str] = set()
    for conn in server.primaries():
        with conn:
            for name, fields in conn.info("commandstats").items():
                if int(fields["calls"]) > 0:
                    issued.add(name.removeprefix("cmdstat_"))
    return issued


#: What the server counts that the rule need not grant: the test's own INFO, CONFIG RESETSTAT
#: and SCRIPT FLUSH, the queue's eviction-policy check (CONFIG GET: refused to the tenant, and
#: then skipped), redis-py's CLIENT SETINFO on connect (a refusal is ignored), and the asyncio
#: client's HELLO (allowed to every user, like AUTH).
_NOT_NEEDED = {"info", "config|resetstat", "script|flush", "config|get", "client|setinfo", "hello"}
#: Without --functions: the wrapper's probe of the Functions library (refused: EVALSHA then).
_PROBE = "fcall_ro"


def assert_functions_rule_refused(server: ServerHandle) -> None:
    """6.2 has no FCALL: it refuses the ``--functions`` rule (docs/acl.md says 7.0+)."""
    try:
        answers = paste(server, printed_rule("--functions"))
    finally:
        delete_user(server)
    assert all("fcall" in answer.lower() and "ERR" in answer for answer in answers), answers


@pytest.mark.parametrize("functions", [False, True], ids=["evalsha", "functions"])
def test_every_command_issued_is_in_the_rule(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle, functions: bool
) -> None:
    """As the admin, every path runs while INFO commandstats counts what reaches the server,
    the scripts' own commands included: nothing outside the generated rule (and the few
    commands it leaves out on purpose)."""
    if functions and server.version < (7, 0):
        assert_functions_rule_refused(server)
        return
    if functions:
        Scheduler(r, TENANT_A).install_functions()
    for conn in server.primaries():
        with conn:
            conn.config_resetstat()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        every_path(server, r, functions)
        asyncio.run(async_operations(server, {}))
    issued = _issued_commands(server)
    allowed = set(acl_commands(functions=functions, cluster=server.is_cluster)) | _NOT_NEEDED
    if not functions:
        allowed.add(_PROBE)
    if server.version < (7, 0):  # 6.2 counts a subcommand under its command
        allowed = {command.split("|")[0] for command in allowed}
    # a granted command covers its subcommands (+command: COMMAND GETKEYS)
    assert {
        command for command in issued if command.split("|")[0] not in allowed
    } - allowed == set()
    assert {"evalsha", "blpop", "time", "hset", "zadd"} <= issued  # the run did reach it
    assert ("fcall" in issued) is functions


@pytest.mark.parametrize("functions", [False, True], ids=["evalsha", "functions"])
def test_printed_rule_suffices_for_every_operation_on_every_path(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle, functions: bool
) -> None:
    if functions and server.version < (7, 0):
        assert_functions_rule_refused(server)
        return
    if functions:
        Scheduler(r, TENANT_A).install_functions()
    with tenant_user(server, functions=functions) as credentials:
        tenant = server.client(**credentials)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # CONFIG refused: no warning
                every_path(server, tenant, functions)
                asyncio.run(async_operations(server, credentials))
            with pytest.raises(NoPermissionError):
                tenant.get("outside-the-namespace")
            with pytest.raises(NoPermissionError):
                tenant.execute_command("FLUSHALL")
            with pytest.raises(NoPermissionError):
                tenant.execute_command("CONFIG", "GET", "maxmemory-policy")
            with pytest.raises(NoPermissionError):
                tenant.publish("channel", "message")
        finally:
            tenant.close()
    assert namespace_keys(r, TENANT_A)
    assert not namespace_keys(r, TENANT_B)


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
    node_queue = queue.for_node("node-1")

    def batch() -> None:
        with other.pipeline() as pipe:
            pipe.queue("jobs").enqueue("intruder", b"x")
            pipe.execute()

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
        "queue.dispatch": lambda: queue.dispatch("intruder", b"x", strategy="least_loaded"),
        "queue.node_dequeue": lambda: node_queue.dequeue("intruder", HOUR),
        "queue.node_dequeue (blocking)": lambda: node_queue.dequeue("w", HOUR, block_ms=20),
        "queue.node_ack": lambda: node_queue.ack(lease),
        "queue.node_nack": lambda: node_queue.nack(lease),
        "queue.node_extend": lambda: node_queue.extend(lease, HOUR),
        "queue.node_stats": lambda: node_queue.stats(),
        "queue.redispatch": lambda: queue.redispatch("node-1"),
        "queue.dispatch_requeue_dead": lambda: queue.requeue_dead_dispatched("task-1"),
        "blpop": lambda: tenant.blpop([lock.wake_key], 0.01),
        "a batch": lambda: batch(),
    }
    for name, action in actions.items():
        try:
            _refused(action)
        except BaseException as error:
            raise AssertionError(f"{name} was not refused in {TENANT_B}") from error
    assert snapshot_ignoring_ttl(r, TENANT_B) == before
    assert not namespace_keys(r, TENANT_A)  # nothing leaked into the tenant's own namespace


def _cached_scripts(server: ServerHandle) -> list[int | None]:
    """Per primary, the scripts its cache holds besides the tests' own CONTENTS_SCRIPT (which
    ``snapshot`` sends with EVAL); None where INFO does not say."""
    contents_sha1 = hashlib.sha1(CONTENTS_SCRIPT.encode()).hexdigest()
    counts: list[int | None] = []
    for conn in server.primaries():
        with conn:
            count = conn.info("memory").get("number_of_cached_scripts")
            tests_own = int(conn.script_exists(contents_sha1)[0])
            counts.append(None if count is None else count - tests_own)
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
        patterns = [b"~" + glob_escape(key) for key in keys]
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
    for strategy in STRATEGIES:
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
        name.encode() + tail for name in STRATEGIES for tail in (b"", b"-later")
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
