"""Sharded queues: one logical queue over k partitions, each a namespace (a hash tag) of its own.

A namespace is one hash tag, so one cluster slot, so one primary: a plain ``Queue`` can never use
more than one Redis core. ``s.sharded_queue(name, partitions=k)`` spreads one queue over k
partition namespaces ``<ns>~<j>`` whose slots land on different primaries of a cluster. Each
partition is a plain ``Queue`` (same scripts, same keys under its own tag), so dequeue-and-lock,
fencing tokens, ack, nack, extend, delays, priorities and dead letters keep their guarantees
inside a partition; nothing is ever moved between partitions.

Choosing a partition is routing, like a cluster client's slot routing, not a scheduling decision:
which task is served, who holds it and when it comes back is still decided by the ``queue.*``
scripts, inside one partition. The client only decides which partition a call goes to:

* **Placement** (once per queue): partition i is meant for the i-th primary (``i mod n``), the
  primaries ordered by the lowest slot they serve in ``CLUSTER SLOTS``; it takes the smallest
  candidate j (``<ns>~0``, ``<ns>~1``...) whose slot that primary serves. The same layout gives
  the same choice. Standalone: j = 0..k-1. The choice is recorded in the base namespace
  (``luasched:{<ns>}:sq:<name>``, ``SET NX``) and read back by every later client, so producers
  and consumers agree even after slots moved (resharding) or a primary failed over.
* **Producers** route a task by its routing key, ``crc32(key) mod k`` (the task id unless
  ``routing_key`` is given): the same key always goes to the same partition, so ``enqueue`` stays
  idempotent by task id and tasks of one key keep their order; many keys spread evenly.
* **Consumers** rotate: each worker id has a cursor (starting at ``crc32(worker_id) mod k``);
  a dequeue asks the partition under the cursor first, then the next ones until it has its
  tasks, and the cursor moves past the partition that served it. So every non-empty partition
  is served in turn by every worker and none starves, whatever the others hold. A blocking
  dequeue that found nothing waits on one partition at a time for at most ``block_slice_ms``.
* A ``PartitionLease`` (a ``Lease`` with its ``partition``) sends ``ack``/``nack``/``extend`` to
  the partition that leased it. Ordering holds within a partition only (priorities too).
"""

from __future__ import annotations

import binascii
import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from luasched import validate
from luasched.errors import InvalidArgument
from luasched.keys import Namespace, to_bytes
from luasched.leases import Lease, Nacked, check_take, remaining_ms
from luasched.loops import Do, Loop, drive, no_calls
from luasched.queue import (
    MAX_QUEUE_NAME_BYTES,
    Enqueued,
    Queue,
    QueueCalls,
    QueueStats,
    check_queue_options,
    refuse_group,
)
from luasched.retry import RetryPolicy

__all__ = [
    "DEFAULT_BLOCK_SLICE_MS",
    "MAX_PARTITIONS",
    "PartitionLease",
    "Rotation",
    "ShardedBase",
    "ShardedQueue",
    "ShardedStats",
    "check_sharded",
    "checked_layout",
    "decode_layout",
    "encode_layout",
    "layout_key",
    "layout_loop",
    "partition_for",
    "partition_namespace",
    "plan_layout",
    "route",
    "routed",
    "slice_ms",
    "slot_groups",
]

MAX_PARTITIONS = 1024
#: A blocking sharded dequeue waits on one partition at a time for at most this long.
DEFAULT_BLOCK_SLICE_MS = 200
#: How many candidate tags placement tries before giving up (a primary with 1 slot of 16384
#: needs ~16384 tries on average: placement asks for no less than that).
_CANDIDATE_LIMIT = 1_000_000
_LAYOUT_MAGIC = b"luasched-sharded-v1 "


@dataclass(frozen=True)
class PartitionLease(Lease):
    """A ``Lease`` taken from partition ``partition`` of a sharded queue."""

    partition: int = 0

    @classmethod
    def of(cls, lease: Lease, partition: int) -> PartitionLease:
        return cls(
            task_id=lease.task_id,
            payload=lease.payload,
            attempt=lease.attempt,
            token=lease.token,
            deadline_ms=lease.deadline_ms,
            queue=lease.queue,
            partition=partition,
        )


@dataclass(frozen=True)
class ShardedStats:
    """``QueueStats`` of every partition, in partition order, and their sums."""

    partitions: tuple[QueueStats, ...]

    @property
    def ready(self) -> int:
        return sum(stats.ready for stats in self.partitions)

    @property
    def delayed(self) -> int:
        return sum(stats.delayed for stats in self.partitions)

    @property
    def leased(self) -> int:
        return sum(stats.leased for stats in self.partitions)

    @property
    def dead(self) -> int:
        return sum(stats.dead for stats in self.partitions)


def partition_namespace(base: Namespace, candidate: int) -> Namespace:
    """The namespace of candidate ``candidate`` of ``base``: ``<base>~<candidate>``."""
    return Namespace(base.name + b"~" + str(candidate).encode())


def layout_key(base: Namespace, name: bytes) -> bytes:
    """Where the chosen partitions of sharded queue ``name`` are recorded."""
    return base.key("sq", name)


def encode_layout(candidates: Sequence[int]) -> bytes:
    return _LAYOUT_MAGIC + b",".join(str(j).encode() for j in candidates)


def decode_layout(value: bytes) -> tuple[int, ...]:
    """The candidates of a recorded layout; ValueError if it is not one."""
    if not value.startswith(_LAYOUT_MAGIC):
        raise ValueError(f"not a sharded queue layout: {value[:60]!r}")
    return tuple(int(part) for part in value[len(_LAYOUT_MAGIC) :].split(b","))


def slot_groups(reply: Any) -> list[list[tuple[int, int]]]:
    """The slot ranges of each primary from a ``CLUSTER SLOTS`` reply (redis-py's parsed dict
    or the raw list), primaries ordered by the lowest slot they serve."""
    by_primary: dict[Any, list[tuple[int, int]]] = {}
    if isinstance(reply, dict):
        for (start, end), entry in reply.items():
            primary = entry["primary"] if isinstance(entry, dict) else entry
            by_primary.setdefault(tuple(primary), []).append((int(start), int(end)))
    else:
        for entry in reply:
            primary = (entry[2][0], int(entry[2][1]))
            by_primary.setdefault(primary, []).append((int(entry[0]), int(entry[1])))
    groups = [sorted(ranges) for ranges in by_primary.values()]
    return sorted(groups, key=lambda ranges: ranges[0][0])


def plan_layout(
    base: Namespace, partitions: int, groups: Sequence[Sequence[tuple[int, int]]] | None
) -> tuple[int, ...]:
    """The candidate of each partition: partition i on primary ``i mod n`` of ``groups``
    (None: standalone, candidates 0..k-1). Deterministic for the same groups."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be 1..{MAX_PARTITIONS}, got {partitions}")
    if not groups:
        return tuple(range(partitions))
    owner = [0] * 16384
    for index, ranges in enumerate(groups):
        for start, end in ranges:
            owner[start : end + 1] = [index] * (end - start + 1)
    chosen: list[int] = []
    candidate_of_group = [0] * len(groups)
    for partition in range(partitions):
        target = partition % len(groups)
        candidate = candidate_of_group[target]
        while owner[partition_namespace(base, candidate).slot] != target or candidate in chosen:
            candidate += 1
            if candidate > _CANDIDATE_LIMIT:
                raise RuntimeError(f"no partition tag found for primary #{target}")
        chosen.append(candidate)
        candidate_of_group[target] = candidate + 1
    return tuple(chosen)


def route(key: str | bytes, partitions: int) -> int:
    """The partition of routing key ``key``: ``crc32(key) mod partitions`` (stable anywhere)."""
    return binascii.crc32(to_bytes(key)) % partitions


class Rotation:
    """Each worker id's cursor over the partitions (thread-safe; no I/O)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._cursor: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def order(self, worker_id: str | bytes) -> list[int]:
        """The partitions in the order this worker's next dequeue asks them."""
        wid = to_bytes(worker_id)
        with self._lock:
            start = self._cursor.get(wid)
            if start is None:
                start = self._cursor[wid] = route(wid, self.partitions)
        return [(start + step) % self.partitions for step in range(self.partitions)]

    def served(self, worker_id: str | bytes, partition: int | None) -> None:
        """Move the cursor past ``partition`` (None: nothing was served; one step on)."""
        wid = to_bytes(worker_id)
        with self._lock:
            current = self._cursor.get(wid, 0)
            after = current if partition is None else partition
            self._cursor[wid] = (after + 1) % self.partitions


def checked_layout(value: bytes | None, partitions: int, name: bytes) -> tuple[int, ...]:
    """The candidates of the layout record ``value`` read back after ``SET NX``."""
    if value is None:
        raise RuntimeError(f"sharded queue {name!r}: its layout record vanished")
    candidates = decode_layout(bytes(value))
    if len(candidates) != partitions:
        raise ValueError(
            f"sharded queue {name!r} has {len(candidates)} partitions, not {partitions}"
        )
    return candidates


def _check_lease(lease: object, partitions: int) -> PartitionLease:
    """``lease`` if it is a PartitionLease of one of ``partitions`` partitions (its partition
    then checks that the lease is its own); InvalidArgument naming ``lease`` otherwise."""
    if not isinstance(lease, PartitionLease) or not 0 <= lease.partition < partitions:
        raise InvalidArgument(
            f"lease must be a PartitionLease this sharded queue handed out, got {lease!r}"
        )
    return lease


def check_sharded(
    name: object, partitions: object, block_slice_ms: object, options: dict[str, Any]
) -> bytes:
    """Check ``sharded_queue``'s arguments (its queue ``options`` too) before it reads or writes
    the layout; the name as bytes. InvalidArgument naming the first bad one."""
    raw = validate.key_bytes("name", name, 1, MAX_QUEUE_NAME_BYTES)
    validate.integer("partitions", partitions, 1, MAX_PARTITIONS)
    slice_ms(block_slice_ms)
    check_queue_options(**options)
    return raw


def slice_ms(block_slice_ms: object) -> int:
    """``block_slice_ms`` if it is an int 1..the longest wait; InvalidArgument naming it."""
    return validate.arg("queue.dequeue", "wait_ms", block_slice_ms, name="block_slice_ms", lo=1)  # type: ignore[no-any-return]


def routed(routing_key: object, partitions: int) -> int:
    """``route`` of a routing key given by the caller: InvalidArgument naming ``routing_key``
    when it is not bytes or str."""
    return route(validate.key_bytes("routing_key", routing_key, 0, None), partitions)


def partition_for(task_id: object, routing_key: object, partitions: int) -> int:
    """The partition of a task: of ``routing_key``, or of ``task_id`` when it is None (checked
    first: InvalidArgument naming the one that is not bytes or str)."""
    if routing_key is None:
        return route(validate.arg("queue.enqueue", "task_id", task_id), partitions)
    return routed(routing_key, partitions)


#: A partition: a plain queue, sync or asyncio.
P = TypeVar("P", bound="QueueCalls[Any]")


class ShardedBase(Generic[P]):
    """What ``ShardedQueue`` and ``AsyncShardedQueue`` share: the partitions (plain queues,
    sync or asyncio), their namespaces, the block slice and the rotation of a dequeue, and the
    routing of a task to its partition. ValueError without partitions; InvalidArgument for a
    ``block_slice_ms`` out of range."""

    def __init__(
        self, queues: Sequence[P], *, block_slice_ms: int = DEFAULT_BLOCK_SLICE_MS
    ) -> None:
        if not queues:
            raise ValueError("a sharded queue needs at least one partition")
        self.partitions = tuple(queues)
        self.namespaces = tuple(queue.keys.namespace for queue in queues)
        self.name = queues[0].name
        self.block_slice_ms = slice_ms(block_slice_ms)
        self.rotation = Rotation(len(queues))

    def _enqueue_partition(
        self, task_id: str | bytes, routing_key: str | bytes | None, group: str | bytes | None
    ) -> P:
        """The partition queue an enqueue of ``task_id`` goes to. A sharded queue has no groups
        (yet): a ``group`` is refused (InvalidArgument, before any I/O)."""
        refuse_group(group, "sharded queues")
        return self.partitions[partition_for(task_id, routing_key, len(self.partitions))]

    def partition_of(self, routing_key: str | bytes) -> int:
        """The partition a task with this routing key goes to."""
        return routed(routing_key, len(self.partitions))

    # The loops of ``dequeue_many`` and ``ack_and_dequeue`` (``luasched.loops``: their ``Do``
    # steps call the partitions' own methods, which each wrapper runs, or awaits).

    def _sweep(
        self, worker_id: str | bytes, count: int, lease_ms: int
    ) -> Loop[list[PartitionLease]]:
        """Ask the partitions in this worker's rotation order (no wait) until ``count`` are
        taken; the cursor moves past the last partition that served."""
        taken: list[PartitionLease] = []
        last: int | None = None
        for partition in self.rotation.order(worker_id):
            queue: Any = self.partitions[partition]
            take = functools.partial(queue.dequeue_many, worker_id, count - len(taken), lease_ms)
            leases = yield Do(take)
            if leases:
                last = partition
                taken += [PartitionLease.of(lease, partition) for lease in leases]
                if len(taken) >= count:
                    break
        self.rotation.served(worker_id, last)
        return taken

    def _take(
        self, worker_id: str | bytes, n: int, lease_ms: int, block_ms: int
    ) -> Loop[list[PartitionLease]]:
        """``dequeue_many``: a sweep; while it took nothing and ``block_ms`` is not over, a
        blocking take of at most ``block_slice_ms`` on the partition under the cursor, and
        again. Arguments are checked before the first call."""
        check_take(worker_id, n, lease_ms, block_ms)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            taken = yield from self._sweep(worker_id, n, lease_ms)
            wait_ms = remaining_ms(deadline)
            if taken or wait_ms <= 0:
                return taken
            partition = self.rotation.order(worker_id)[0]
            queue: Any = self.partitions[partition]
            slice_ms = min(wait_ms, self.block_slice_ms)
            leases = yield Do(
                functools.partial(queue.dequeue_many, worker_id, n, lease_ms, block_ms=slice_ms)
            )
            self.rotation.served(worker_id, partition if leases else None)
            if leases:
                return [PartitionLease.of(lease, partition) for lease in leases]

    def _ack_and_take(
        self, lease: Lease, worker_id: str | bytes, lease_ms: int, block_ms: int
    ) -> Loop[PartitionLease | None]:
        """``ack_and_dequeue``: one call when the rotation is at the lease's partition, else an
        ack and a take. Arguments are checked before the first call."""
        held = _check_lease(lease, len(self.partitions))
        check_take(worker_id, 1, lease_ms, block_ms)
        queue: Any = self.partitions[held.partition]
        if self.rotation.order(worker_id)[0] == held.partition:
            following = yield Do(
                functools.partial(queue.ack_and_dequeue, held, worker_id, lease_ms)
            )
            if following is not None:
                self.rotation.served(worker_id, held.partition)
                return PartitionLease.of(following, held.partition)
        else:
            yield Do(functools.partial(queue.ack, held))
        taken = yield from self._take(worker_id, 1, lease_ms, block_ms)
        return taken[0] if taken else None


class ShardedQueue(ShardedBase[Queue]):
    """One logical queue over k partition queues (``s.sharded_queue(name, partitions=k)``).

    Methods have the meaning of ``Queue``'s; a call touches one partition (``dequeue`` may ask
    several in turn, see the module doc). ``partitions`` are the plain ``Queue`` objects,
    ``namespaces`` their namespaces.
    """

    def enqueue(
        self,
        task_id: str | bytes,
        payload: str | bytes = b"",
        *,
        routing_key: str | bytes | None = None,
        priority: int = 0,
        delay_ms: int = 0,
        max_attempts: int | None = None,
        request_id: str | bytes | None = None,
        group: str | bytes | None = None,
    ) -> Enqueued:
        """``Queue.enqueue`` on the partition of ``routing_key`` (default: the task id); a
        ``group`` is refused (InvalidArgument: sharded queues have no groups)."""
        return self._enqueue_partition(task_id, routing_key, group).enqueue(
            task_id,
            payload,
            priority=priority,
            delay_ms=delay_ms,
            max_attempts=max_attempts,
            request_id=request_id,
        )

    def dequeue_many(
        self, worker_id: str | bytes, n: int, lease_ms: int, *, block_ms: int = 0
    ) -> list[PartitionLease]:
        """Take up to ``n`` tasks, the partitions asked in this worker's rotation order."""
        return drive(self._take(worker_id, n, lease_ms, block_ms), no_calls, None)

    def dequeue(
        self, worker_id: str | bytes, lease_ms: int, *, block_ms: int = 0
    ) -> PartitionLease | None:
        """Take the next task of the rotation (None: nothing ready, after ``block_ms``)."""
        taken = self.dequeue_many(worker_id, 1, lease_ms, block_ms=block_ms)
        return taken[0] if taken else None

    def ack_and_dequeue(
        self, lease: Lease, worker_id: str | bytes, lease_ms: int, *, block_ms: int = 0
    ) -> PartitionLease | None:
        """Ack ``lease`` and take the next task: one call when the rotation is at the lease's
        partition, else an ack and a dequeue (so chaining does not pin a worker to one
        partition). Raises StaleLease (and takes nothing) when ``lease`` is no longer held."""
        return drive(self._ack_and_take(lease, worker_id, lease_ms, block_ms), no_calls, None)

    def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """``Queue.ack`` on the lease's partition."""
        held = _check_lease(lease, len(self.partitions))
        return self.partitions[held.partition].ack(held, request_id=request_id)

    def nack(
        self,
        lease: Lease,
        delay_ms: int | None = None,
        reason: str | bytes = b"",
        *,
        request_id: str | bytes | None = None,
    ) -> Nacked:
        """``Queue.nack`` on the lease's partition."""
        held = _check_lease(lease, len(self.partitions))
        return self.partitions[held.partition].nack(held, delay_ms, reason, request_id=request_id)

    def extend(self, lease: Lease, lease_ms: int) -> int:
        """``Queue.extend`` on the lease's partition."""
        held = _check_lease(lease, len(self.partitions))
        return self.partitions[held.partition].extend(held, lease_ms)

    def requeue_dead(self, task_id: str | bytes, *, routing_key: str | bytes | None = None) -> bool:
        """``Queue.requeue_dead`` on the partition of ``routing_key`` (default: the task id)."""
        partition = partition_for(task_id, routing_key, len(self.partitions))
        return self.partitions[partition].requeue_dead(task_id)

    def stats(self) -> ShardedStats:
        """Every partition's ``stats()`` (one call each)."""
        return ShardedStats(tuple(queue.stats() for queue in self.partitions))


def layout_loop(
    client: Any, base: Namespace, name: bytes, partitions: int, retry: RetryPolicy
) -> Loop[tuple[int, ...]]:
    """``sharded_layout`` as a loop (``luasched.loops``; each read and write sent through
    ``retry``), for the sync and the asyncio client alike."""
    from luasched.scripts import is_cluster

    key = layout_key(base, name)
    value = yield Do(functools.partial(client.get, key), retry)
    if value is None:
        groups = None
        if is_cluster(client):
            groups = slot_groups((yield Do(client.cluster_slots, retry)))
        planned = encode_layout(plan_layout(base, partitions, groups))
        # SET NX: of two first clients, one records its plan and both read the same back.
        yield Do(functools.partial(client.set, key, planned, nx=True), retry)
        value = yield Do(functools.partial(client.get, key), retry)
    return checked_layout(value, partitions, name)


def sharded_layout(
    client: Any, base: Namespace, name: bytes, partitions: int, retry: RetryPolicy
) -> tuple[int, ...]:
    """Read (or plan and record) the partition candidates of sharded queue ``name``."""
    return drive(layout_loop(client, base, name, partitions, retry), no_calls, client)
