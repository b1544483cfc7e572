"""What is in a namespace right now (``luasched stats NAMESPACE``): nodes, slots, queues, locks.

Read-only and bounded: the node registry comes from the ``nodes.list`` script and two hash
reads; queues, locks and semaphores are found with ``SCAN`` (``MATCH`` on the namespace's key
prefix, ``COUNT`` ``SCAN_COUNT``) for at most ``max_scan`` keys examined, then each is read
(``queue.stats``, ``HMGET``, ``ZCOUNT``). A namespace with more keys than that is reported as
``truncated`` (the counts cover the keys seen). Every key of a namespace shares one hash tag, so on
a cluster only the primary that owns its slot is scanned.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from luasched.keys import Namespace
from luasched.render import ScriptConfig, render_all

__all__ = [
    "DEFAULT_MAX_SCAN",
    "MAX_GROUPS",
    "GroupLine",
    "LockStat",
    "NamespaceStats",
    "NodeStat",
    "QueueStat",
    "SemaphoreStat",
    "namespace_stats",
]

DEFAULT_MAX_SCAN = 100_000
SCAN_COUNT = 1000
#: The most groups ``luasched stats`` reports per queue (one ``queue.group_stats`` call).
MAX_GROUPS = 100


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


@dataclass(frozen=True)
class NodeStat:
    """A registered node: ``load`` is what picks charged it (``pick:load``); ``slots`` the slots
    it owns in the slot table; ``live``: its heartbeat deadline is after the server's clock."""

    node_id: str
    weight: int
    capacity: int | None
    load: int
    live: bool
    draining: bool
    deadline_ms: int | None
    slots: int


@dataclass(frozen=True)
class GroupLine:
    """One group of a queue with groups (``queue.group_stats``): ready tasks, leases held,
    weight, cap (0: none), paused, rate (``per_second`` 0: none; ``burst``), and ``rate_wait_ms``
    until its rate allows a take."""

    group: str
    ready: int
    active: int
    weight: int
    max_active: int
    paused: bool
    per_second: float
    burst: int
    rate_wait_ms: int


@dataclass(frozen=True)
class QueueStat:
    """A queue's counts (``queue.stats``); ``oldest_ready_age_ms`` None when none is ready.
    A queue with groups: ``ready`` counts its ready tasks with a group too, and ``groups`` holds
    up to ``MAX_GROUPS`` of its groups (those in the ring, then those held back by a rate, then
    those with settings, found with a bounded ``HSCAN``)."""

    name: str
    ready: int
    delayed: int
    leased: int
    dead: int
    oldest_ready_age_ms: int | None
    groups: tuple[GroupLine, ...] = ()


@dataclass(frozen=True)
class LockStat:
    """A held lock: its fencing token, reentrant hold count, ms left, fair waiters queued."""

    name: str
    fence: int
    count: int
    ttl_ms: int
    waiters: int


@dataclass(frozen=True)
class SemaphoreStat:
    """A semaphore with permits out: how many are held (lease not expired)."""

    name: str
    held: int


@dataclass(frozen=True)
class NamespaceStats:
    namespace: str
    prefix: str
    now_ms: int
    nodes: tuple[NodeStat, ...]
    unowned_slots: int
    queues: tuple[QueueStat, ...]
    locks: tuple[LockStat, ...]
    semaphores: tuple[SemaphoreStat, ...]
    keys_seen: int
    truncated: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scan(client: Any, namespace: Namespace, max_scan: int) -> tuple[list[bytes], bool]:
    """The keys of ``namespace``; at most ceil(max_scan / SCAN_COUNT) SCAN calls."""
    pattern = namespace.key_pattern
    found: list[bytes] = []
    cursor = 0
    for _ in range(max(1, math.ceil(max_scan / SCAN_COUNT))):
        cursor, keys = client.scan(cursor=cursor, match=pattern, count=SCAN_COUNT)
        found.extend(bytes(key) for key in keys)
        if int(cursor) == 0:
            return found, False
    return found, True


def _scan_client(client: Any, namespace: Namespace) -> Any:
    """The client to SCAN with: on a cluster, the primary that owns the namespace's slot."""
    get_node = getattr(client, "get_node_from_key", None)
    if get_node is None:
        return client
    return get_node(namespace.prefix).redis_connection


def namespace_stats(
    client: Any,
    namespace: str | bytes,
    max_scan: int = DEFAULT_MAX_SCAN,
    config: ScriptConfig | None = None,
) -> NamespaceStats:
    """Everything in ``namespace`` now, read-only (see the module's docstring).

    ``client``: a redis-py ``Redis`` or ``RedisCluster`` answering bytes.
    """
    # Here, not at the top: the CLI reads DEFAULT_MAX_SCAN for every command, redis not needed.
    from luasched.nodes import list_call
    from luasched.queue import GroupKeys, QueueKeys, stats_call
    from luasched.scripts import ScriptRunner

    space = Namespace(namespace)
    runner = ScriptRunner(client, render_all(config or ScriptConfig()))
    listing = runner.run(list_call(space))
    prefix = space.prefix
    indexes: dict[bytes, bytes] = {
        bytes(key): bytes(value) for key, value in client.hgetall(space.key("nodes:index")).items()
    }
    loads: dict[bytes, int] = {
        bytes(key): int(value) for key, value in client.hgetall(space.key("pick:load")).items()
    }
    nodes = tuple(
        NodeStat(
            node_id=_text(node.node_id),
            weight=node.weight,
            capacity=node.capacity,
            load=loads.get(indexes.get(node.node_id, b""), 0),
            live=node.live,
            draining=node.draining,
            deadline_ms=node.deadline_ms,
            slots=node.slots,
        )
        for node in listing.nodes
    )
    owned = sum(node.slots for node in listing.nodes)
    keys, truncated = _scan(_scan_client(client, space), space, max_scan)
    queue_names: set[bytes] = set()
    lock_names: set[bytes] = set()
    semaphore_names: set[bytes] = set()
    for key in keys:
        rest = key[len(prefix) :]
        for kind in (b"q:ready:", b"q:delayed:", b"q:leased:", b"q:dead:", b"q:tasks:"):
            if rest.startswith(kind):
                queue_names.add(rest[len(kind) :])
                break
        else:
            if rest.startswith(b"lock:"):
                lock_names.add(rest[len(b"lock:") :])
            elif rest.startswith(b"sem:"):
                semaphore_names.add(rest[len(b"sem:") :])
    queues = []
    for name in sorted(queue_names):
        queue_keys = QueueKeys.of(space, name)
        counts = runner.run(stats_call(queue_keys))
        groups: tuple[GroupLine, ...] = ()
        if client.hget(queue_keys.tasks, "G") is not None:
            counts, groups = _groups(client, runner, GroupKeys.of(space, name))
        queues.append(
            QueueStat(
                _text(name),
                counts.ready,
                counts.delayed,
                counts.leased,
                counts.dead,
                counts.oldest_ready_age_ms,
                groups,
            )
        )
    now_ms = listing.now_ms
    locks = []
    for name in sorted(lock_names):
        # One string "<fence> <count> <deadline> <granted> <waited> <owner>" that never expires
        # (lua/include/lock_state.lua.j2): held while count >= 1 and deadline > now.
        raw = client.get(space.key("lock", name))
        if raw is None:
            continue
        fence, count, deadline = (int(part) for part in raw.split(b" ", 5)[:3])
        if count < 1 or deadline <= now_ms:
            continue  # released or lapsed
        waiters = int(client.zcard(space.key("lock-queue", name)))
        locks.append(LockStat(_text(name), fence, count, deadline - now_ms, waiters))
    semaphores = []
    for name in sorted(semaphore_names):
        held = int(client.zcount(space.key("sem", name), f"({now_ms}", "+inf"))
        if held:
            semaphores.append(SemaphoreStat(_text(name), held))
    return NamespaceStats(
        namespace=_text(space.name),
        prefix=_text(prefix),
        now_ms=now_ms,
        nodes=nodes,
        unowned_slots=16384 - owned,
        queues=tuple(queues),
        locks=tuple(locks),
        semaphores=tuple(semaphores),
        keys_seen=len(keys),
        truncated=truncated,
    )


def _groups(client: Any, runner: Any, keys: Any) -> tuple[Any, tuple[GroupLine, ...]]:
    """The counts of a queue with groups (its QueueStats) and up to MAX_GROUPS of its groups."""
    from luasched.queue import group_stats_call

    names: dict[bytes, None] = {}
    for member in client.zrange(keys.bound["gring"], 0, MAX_GROUPS - 1):
        if member:  # "" stands for the tasks without a group
            names[bytes(member)] = None
    for member in client.zrange(keys.bound["gwait"], 0, MAX_GROUPS - 1):
        names[bytes(member)] = None
    if len(names) < MAX_GROUPS:  # groups with settings ("w"..group), a bounded scan
        for field, _ in client.hscan_iter(keys.bound["groups"], match="w*", count=SCAN_COUNT):
            names[bytes(field)[1:]] = None
            if len(names) >= MAX_GROUPS:
                break
    chosen: list[str | bytes] = [*sorted(names)[:MAX_GROUPS]]
    found = runner.run(group_stats_call(keys, chosen))
    lines = tuple(
        GroupLine(
            _text(name),
            stat.ready,
            stat.active,
            stat.weight,
            stat.max_active,
            stat.paused,
            1000 / stat.interval_ms if stat.interval_ms else 0.0,
            stat.burst,
            stat.rate_wait_ms,
        )
        for name, stat in found.groups.items()
    )
    return found.queue, lines


def render_text(stats: NamespaceStats) -> str:
    """The human-readable report of ``luasched stats``."""
    live = sum(1 for node in stats.nodes if node.live)
    lines = [f"namespace {stats.namespace} (keys {stats.prefix}*), server time {stats.now_ms} ms"]
    if stats.truncated:
        lines.append(
            f"  (scan stopped after {stats.keys_seen} keys: queues, locks and semaphores may be "
            "missing; raise --max-scan)"
        )
    lines.append(
        f"nodes: {len(stats.nodes)} ({live} live), slots without owner: {stats.unowned_slots}"
    )
    if stats.nodes:
        rows: list[tuple[str, ...]] = [
            ("node", "weight", "capacity", "load", "live", "draining", "slots", "deadline")
        ]
        for node in stats.nodes:
            deadline = (
                "none" if node.deadline_ms is None else f"{node.deadline_ms - stats.now_ms:+} ms"
            )
            rows.append(
                (
                    node.node_id,
                    str(node.weight),
                    "-" if node.capacity is None else str(node.capacity),
                    str(node.load),
                    "yes" if node.live else "no",
                    "yes" if node.draining else "no",
                    str(node.slots),
                    deadline,
                )
            )
        lines += _table(rows)
    lines.append(f"queues: {len(stats.queues)}")
    if stats.queues:
        queue_rows: list[tuple[str, ...]] = [
            ("queue", "ready", "delayed", "leased", "dead", "oldest ready")
        ]
        for queue in stats.queues:
            age = queue.oldest_ready_age_ms
            queue_rows.append(
                (
                    queue.name,
                    str(queue.ready),
                    str(queue.delayed),
                    str(queue.leased),
                    str(queue.dead),
                    "-" if age is None else f"{age} ms",
                )
            )
        lines += _table(queue_rows)
        for queue in stats.queues:
            if queue.groups:
                lines.append(f"groups of {queue.name}: {len(queue.groups)}")
                group_rows: list[tuple[str, ...]] = [
                    (
                        "group",
                        "ready",
                        "leased",
                        "weight",
                        "cap",
                        "paused",
                        "rate/s",
                        "burst",
                        "wait",
                    )
                ]
                for group in queue.groups:
                    group_rows.append(
                        (
                            group.group,
                            str(group.ready),
                            str(group.active),
                            str(group.weight),
                            str(group.max_active) if group.max_active else "-",
                            "yes" if group.paused else "no",
                            f"{group.per_second:g}" if group.per_second else "-",
                            str(group.burst),
                            f"{group.rate_wait_ms} ms",
                        )
                    )
                lines += _table(group_rows)
    lines.append(f"locks held: {len(stats.locks)}")
    if stats.locks:
        lock_rows: list[tuple[str, ...]] = [("lock", "fence", "holds", "ttl", "waiters")]
        for lock in stats.locks:
            lock_rows.append(
                (
                    lock.name,
                    str(lock.fence),
                    str(lock.count),
                    f"{lock.ttl_ms} ms",
                    str(lock.waiters),
                )
            )
        lines += _table(lock_rows)
    lines.append(f"semaphores with permits out: {len(stats.semaphores)}")
    if stats.semaphores:
        lines += _table([("semaphore", "held"), *((s.name, str(s.held)) for s in stats.semaphores)])
    return "\n".join(lines) + "\n"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
