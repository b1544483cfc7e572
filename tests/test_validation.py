"""The Python API's bad-input contract (luasched.validate, docs/api.md "Argument rules").

Every public call, sync and asyncio, refuses None, bools, floats, strings, negatives and
out-of-range integers with ``InvalidArgument`` naming the parameter, before any I/O:

* the table runs on a Scheduler whose client points at a port that is bound but never listens,
  with no retries: any command the call tried to send would raise ConnectionError instead;
* the same table runs on every test server and leaves every key exactly as it was;
* a lease used on another queue (or partition) is refused as such, and a client with
  ``decode_responses=True`` is refused at ``Scheduler(...)`` (sync, asyncio, cluster).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

import luasched.asyncio
from luasched import InvalidArgument, Lease, LockHandle, PermitHandle, Scheduler
from luasched.asyncio.sharded import AsyncShardedQueue
from luasched.retry import NO_RETRY
from luasched.sharded import PartitionLease, ShardedQueue
from support.helpers import snapshot, snapshot_ignoring_ttl
from support.servers import ServerHandle

Client = redis.Redis | redis.cluster.RedisCluster

#: What an integer parameter must refuse (``-1`` only where negatives are out of range).
NOT_INTS: tuple[object, ...] = (None, True, 1.5, "5", 2**70)
#: What a bytes-or-str parameter (ids, names, payloads) must refuse.
NOT_BYTES: tuple[object, ...] = (None, True, 1.5, 5)
#: What a timeout in seconds must refuse.
NOT_TIMEOUTS: tuple[object, ...] = (True, -1, -0.5, math.nan, math.inf, "5")
#: What a flag must refuse.
NOT_FLAGS: tuple[object, ...] = (None, 1, "yes")


@dataclass
class Api:
    """One flavour of the API (sync or asyncio) and the objects the cases call."""

    s: Any
    q: Any
    node: Any
    lock: Any
    sem: Any
    sq: Any
    lease: Lease
    node_lease: Lease
    foreign: Lease  # a lease of another queue
    part_lease: PartitionLease
    handle: LockHandle
    permit: PermitHandle


@dataclass(frozen=True)
class Case:
    """A call with one bad value for ``param``."""

    label: str
    param: str
    call: Callable[[Api], Any]


def _ints(label: str, param: str, make: Callable[[Api, object], Any], *, negative: bool = True,
          none_ok: bool = False) -> list[Case]:  # fmt: skip
    values = [v for v in NOT_INTS if not (none_ok and v is None)] + ([-1] if negative else [])
    return [_case(label, param, make, value) for value in values]


def _bytes(label: str, param: str, make: Callable[[Api, object], Any], *,
           none_ok: bool = False) -> list[Case]:  # fmt: skip
    values = [v for v in NOT_BYTES if not (none_ok and v is None)]
    return [_case(label, param, make, value) for value in values]


def _case(label: str, param: str, make: Callable[[Api, object], Any], value: object) -> Case:
    return Case(f"{label}({param}={value!r})", param, lambda api: make(api, value))


def _cases() -> list[Case]:
    c: list[Case] = []
    # Scheduler and queue options
    c += _bytes("Scheduler", "namespace", lambda a, v: type(a.s)(a.s.client, v))
    c += [_case("Scheduler", "use_functions",
                lambda a, v: type(a.s)(a.s.client, "n", use_functions=v), v)
          for v in (1, "yes")]  # fmt: skip
    c += _bytes("queue", "name", lambda a, v: a.s.queue(v))
    for option in ("max_attempts", "backoff_base_ms", "backoff_max_ms", "request_ttl_ms",
                   "poll_ms"):  # fmt: skip
        c += _ints("queue", option, lambda a, v, o=option: a.s.queue("jobs", **{o: v}))
    # Queue
    q_enq = "q.enqueue"
    c += _bytes(q_enq, "task_id", lambda a, v: a.q.enqueue(v, b"x"))
    c += _bytes(q_enq, "payload", lambda a, v: a.q.enqueue("t", v))
    c += _ints(q_enq, "priority", lambda a, v: a.q.enqueue("t", priority=v), negative=False)
    c += [_case(q_enq, "priority", lambda a, v: a.q.enqueue("t", priority=v), -513)]
    c += _ints(q_enq, "delay_ms", lambda a, v: a.q.enqueue("t", delay_ms=v))
    c += _ints(q_enq, "max_attempts", lambda a, v: a.q.enqueue("t", max_attempts=v), none_ok=True)
    c += _bytes(q_enq, "request_id", lambda a, v: a.q.enqueue("t", request_id=v), none_ok=True)
    c += [_case(q_enq, "request_id", lambda a, v: a.q.enqueue("t", request_id=v), "a:b")]
    for view in ("q", "node"):
        for method in ("dequeue", "dequeue_many"):
            label = f"{view}.{method}"

            def take(a: Api, view: str = view, method: str = method, **kw: Any) -> Any:
                target = getattr(a, view)
                args = ("w", 2, 1000) if method == "dequeue_many" else ("w", 1000)
                if "n" in kw:
                    args = ("w", kw.pop("n"), 1000)
                if "lease_ms" in kw:
                    args = (*args[:-1], kw.pop("lease_ms"))
                if "worker_id" in kw:
                    args = (kw.pop("worker_id"), *args[1:])
                return getattr(target, method)(*args, **kw)

            c += _bytes(label, "worker_id", lambda a, v, t=take: t(a, worker_id=v))
            c += _ints(label, "lease_ms", lambda a, v, t=take: t(a, lease_ms=v))
            c += _ints(label, "block_ms", lambda a, v, t=take: t(a, block_ms=v))
            if method == "dequeue_many":
                c += _ints(label, "n", lambda a, v, t=take: t(a, n=v))
    c += _leases("q.ack", lambda a, v: a.q.ack(v))
    c += _bytes("q.ack", "request_id", lambda a, v: a.q.ack(a.lease, request_id=v), none_ok=True)
    c += _leases("q.nack", lambda a, v: a.q.nack(v))
    c += _ints("q.nack", "delay_ms", lambda a, v: a.q.nack(a.lease, v), none_ok=True)
    c += _bytes("q.nack", "reason", lambda a, v: a.q.nack(a.lease, reason=v))
    c += _leases("q.extend", lambda a, v: a.q.extend(v, 1000))
    c += _ints("q.extend", "lease_ms", lambda a, v: a.q.extend(a.lease, v))
    c += _leases("q.ack_and_dequeue", lambda a, v: a.q.ack_and_dequeue(v, "w", 1000))
    c += _ints("q.ack_and_dequeue", "lease_ms", lambda a, v: a.q.ack_and_dequeue(a.lease, "w", v))
    c += _ints("q.ack_and_dequeue", "block_ms",
               lambda a, v: a.q.ack_and_dequeue(a.lease, "w", 1000, block_ms=v))  # fmt: skip
    c += _bytes("q.requeue_dead", "task_id", lambda a, v: a.q.requeue_dead(v))
    # Dispatch and node queues
    d = "q.dispatch"
    c += _bytes(d, "task_id", lambda a, v: a.q.dispatch(v))
    c += _bytes(d, "payload", lambda a, v: a.q.dispatch("t", v))
    c += [_case(d, "strategy", lambda a, v: a.q.dispatch("t", strategy=v), v)
          for v in (None, True, "random")]  # fmt: skip
    c += _bytes(d, "routing_key", lambda a, v: a.q.dispatch("t", strategy="slot", routing_key=v))
    c += _ints(d, "cost", lambda a, v: a.q.dispatch("t", cost=v))
    c += _ints(d, "priority", lambda a, v: a.q.dispatch("t", priority=v), negative=False)
    c += _ints(d, "delay_ms", lambda a, v: a.q.dispatch("t", delay_ms=v))
    c += _ints(d, "max_attempts", lambda a, v: a.q.dispatch("t", max_attempts=v), none_ok=True)
    c += _bytes("q.redispatch", "node_id", lambda a, v: a.q.redispatch(v))
    c += _ints("q.redispatch", "limit", lambda a, v: a.q.redispatch("n", v))
    c += _bytes("q.requeue_dead_dispatched", "task_id", lambda a, v: a.q.requeue_dead_dispatched(v))
    c += [_case("q.dispatch_stats", "nodes", lambda a, v: a.q.dispatch_stats(v), v)
          for v in (None, "n", [], [None], ["n"] * 101)]  # fmt: skip
    c += _bytes("q.for_node", "node_id", lambda a, v: a.q.for_node(v))
    c += _leases("node.ack", lambda a, v: a.node.ack(v), own="node_lease")
    c += _leases("node.nack", lambda a, v: a.node.nack(v), own="node_lease")
    c += _ints("node.nack", "delay_ms", lambda a, v: a.node.nack(a.node_lease, v), none_ok=True)
    c += _leases("node.extend", lambda a, v: a.node.extend(v, 1000), own="node_lease")
    c += _ints("node.extend", "lease_ms", lambda a, v: a.node.extend(a.node_lease, v))
    # Nodes, picks, slots
    c += _bytes("nodes.register", "node_id", lambda a, v: a.s.nodes.register(v))
    c += _ints("nodes.register", "weight", lambda a, v: a.s.nodes.register("n", v))
    c += _ints("nodes.register", "capacity", lambda a, v: a.s.nodes.register("n", capacity=v),
               none_ok=True)  # fmt: skip
    c += _bytes("nodes.register", "meta", lambda a, v: a.s.nodes.register("n", meta=v),
                none_ok=True)  # fmt: skip
    c += _ints("nodes.register", "ttl_ms", lambda a, v: a.s.nodes.register("n", ttl_ms=v),
               none_ok=True)  # fmt: skip
    c += _bytes("nodes.heartbeat", "node_id", lambda a, v: a.s.nodes.heartbeat(v, 1000))
    c += _ints("nodes.heartbeat", "ttl_ms", lambda a, v: a.s.nodes.heartbeat("n", v))
    for method in ("drain", "undrain", "remove"):
        c += _bytes(f"nodes.{method}", "node_id", lambda a, v, m=method: getattr(a.s.nodes, m)(v))
    c += _ints("nodes.sweep", "limit", lambda a, v: a.s.nodes.sweep(v))
    for method in ("least_loaded", "two_choices"):
        c += _ints(f"pick.{method}", "cost", lambda a, v, m=method: getattr(a.s.pick, m)(v))
    c += _bytes("pick.release", "node_id", lambda a, v: a.s.pick.release(v))
    c += _ints("pick.release", "cost", lambda a, v: a.s.pick.release("n", v))
    c += _bytes("slots.keyslot", "key", lambda a, v: a.s.slots.keyslot(v))
    c += _bytes("slots.owner", "key", lambda a, v: a.s.slots.owner(v))
    for method in ("keyslots", "owners"):
        c += [_case(f"slots.{method}", "keys", lambda a, v, m=method: getattr(a.s.slots, m)(v), v)
              for v in (None, "k", b"k", [], [None], [5])]  # fmt: skip
    c += _ints("slots.owner_of_slot", "slot", lambda a, v: a.s.slots.owner_of_slot(v))
    c += [_case("slots.owner_of_slot", "slot", lambda a, v: a.s.slots.owner_of_slot(v), 16384)]
    # Pipelines queue the same calls: refused when queued, before execute()
    c += _bytes("pipeline.slots.keyslot", "key", lambda a, v: a.s.pipeline().slots.keyslot(v))
    c += _ints("pipeline.queue.enqueue", "priority",
               lambda a, v: a.s.pipeline().queue("jobs").enqueue("t", priority=v),
               negative=False)  # fmt: skip
    c += _ints("pipeline.nodes.heartbeat", "ttl_ms",
               lambda a, v: a.s.pipeline().nodes.heartbeat("n", v))  # fmt: skip
    # Locks and semaphores
    c += _bytes("lock", "name", lambda a, v: a.s.lock(v))
    c += _ints("lock", "ttl_ms", lambda a, v: a.s.lock("l", ttl_ms=v))
    c += [_case("lock", "ttl_ms", lambda a, v: a.s.lock("l", ttl_ms=v), 0)]
    c += _ints("lock", "retry_ms", lambda a, v: a.s.lock("l", retry_ms=v))
    c += _ints("lock", "wait_ttl_ms", lambda a, v: a.s.lock("l", wait_ttl_ms=v), none_ok=True)
    c += [
        _case("lock", "wait_ttl_ms", lambda a, v: a.s.lock("l", retry_ms=100, wait_ttl_ms=v), 100)
    ]
    for option in ("fair", "reentrant", "auto_renew"):
        c += [_case("lock", option, lambda a, v, o=option: a.s.lock("l", **{o: v}), v)
              for v in NOT_FLAGS]  # fmt: skip
    c += [_case("lock", "timeout", lambda a, v: a.s.lock("l", timeout=v), v)
          for v in NOT_TIMEOUTS]  # fmt: skip
    c += [_case("semaphore", "timeout", lambda a, v: a.s.semaphore("m", 2, timeout=v), v)
          for v in NOT_TIMEOUTS]  # fmt: skip
    for label, target in (("lock", "lock"), ("semaphore", "sem")):
        holder = "handle" if target == "lock" else "permit"
        c += [_case(f"{label}.acquire", "timeout",
                    lambda a, v, t=target: getattr(a, t).acquire(timeout=v), v)
              for v in NOT_TIMEOUTS]  # fmt: skip
        c += [_case(f"{label}.acquire", "blocking",
                    lambda a, v, t=target: getattr(a, t).acquire(blocking=v), v)
              for v in NOT_FLAGS]  # fmt: skip
        c += [_case(f"{label}.release", "handle",
                    lambda a, v, t=target: getattr(a, t).release(v), v)
              for v in (None, "token", 5)]  # fmt: skip
        c += [_case(f"{label}.extend", "handle",
                    lambda a, v, t=target: getattr(a, t).extend(v, 1000), v)
              for v in (None, "token")]  # fmt: skip
        c += _ints(f"{label}.extend", "ttl_ms",
                   lambda a, v, t=target, h=holder: getattr(a, t).extend(getattr(a, h), v),
                   none_ok=True)  # fmt: skip
    c += _bytes("semaphore", "name", lambda a, v: a.s.semaphore(v, 2))
    c += _ints("semaphore", "permits", lambda a, v: a.s.semaphore("m", v))
    c += _ints("semaphore", "ttl_ms", lambda a, v: a.s.semaphore("m", 2, ttl_ms=v))
    c += _ints("semaphore", "retry_ms", lambda a, v: a.s.semaphore("m", 2, retry_ms=v))
    # Sharded queues
    c += _bytes("sharded_queue", "name", lambda a, v: a.s.sharded_queue(v, 2))
    c += _ints("sharded_queue", "partitions", lambda a, v: a.s.sharded_queue("sq", v))
    c += _ints("sharded_queue", "block_slice_ms",
               lambda a, v: a.s.sharded_queue("sq", 2, block_slice_ms=v))  # fmt: skip
    c += _ints("sharded_queue", "max_attempts",
               lambda a, v: a.s.sharded_queue("sq", 2, max_attempts=v))  # fmt: skip
    c += _ints("ShardedQueue", "block_slice_ms",
               lambda a, v: type(a.sq)(a.sq.partitions, block_slice_ms=v))  # fmt: skip
    c += _bytes("sq.partition_of", "routing_key", lambda a, v: a.sq.partition_of(v))
    c += _bytes("sq.enqueue", "task_id", lambda a, v: a.sq.enqueue(v))
    c += _bytes("sq.enqueue", "routing_key", lambda a, v: a.sq.enqueue("t", routing_key=v),
                none_ok=True)  # fmt: skip
    c += _ints("sq.enqueue", "priority", lambda a, v: a.sq.enqueue("t", priority=v),
               negative=False)  # fmt: skip
    c += _bytes("sq.dequeue", "worker_id", lambda a, v: a.sq.dequeue(v, 1000))
    c += _ints("sq.dequeue", "lease_ms", lambda a, v: a.sq.dequeue("w", v))
    c += _ints("sq.dequeue", "block_ms", lambda a, v: a.sq.dequeue("w", 1000, block_ms=v))
    c += _ints("sq.dequeue_many", "n", lambda a, v: a.sq.dequeue_many("w", v, 1000))
    for method in ("ack", "nack"):
        c += _leases(f"sq.{method}", lambda a, v, m=method: getattr(a.sq, m)(v), own="part_lease")
    c += _leases("sq.extend", lambda a, v: a.sq.extend(v, 1000), own="part_lease")
    c += _ints("sq.extend", "lease_ms", lambda a, v: a.sq.extend(a.part_lease, v))
    c += _leases("sq.ack_and_dequeue", lambda a, v: a.sq.ack_and_dequeue(v, "w", 1000),
                 own="part_lease")  # fmt: skip
    c += _ints("sq.ack_and_dequeue", "lease_ms",
               lambda a, v: a.sq.ack_and_dequeue(a.part_lease, "w", v))  # fmt: skip
    c += _ints("sq.ack_and_dequeue", "block_ms",
               lambda a, v: a.sq.ack_and_dequeue(a.part_lease, "w", 1000, block_ms=v))  # fmt: skip
    c += _bytes("sq.requeue_dead", "task_id", lambda a, v: a.sq.requeue_dead(v))
    return c


def _leases(label: str, make: Callable[[Api, object], Any], *, own: str = "lease") -> list[Case]:
    """None, a str, and a lease of another queue (or, for a sharded queue, another partition)."""
    cases = [_case(label, "lease", make, value) for value in (None, "lease")]
    other = "foreign lease" if own != "part_lease" else "lease of partition 1 sent as 0"

    def wrong(api: Api) -> Any:
        if own == "part_lease":
            return make(api, PartitionLease.of(api.part_lease, 0))
        return make(api, api.foreign)

    cases.append(Case(f"{label}({other})", "lease", wrong))
    return cases


CASES = _cases()


def _api(s: Any, sharded: type[Any]) -> Api:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the eviction check of a first queue
        q = s.queue("jobs")
        other = s.queue("other")
        partitions = [s.queue("sq"), type(q)(s.runner, type(s.namespace)(b"val~1"), "sq")]
    lock, sem = s.lock("l"), s.semaphore("m", 2)
    lease = Lease(b"t", b"", 1, 7, 0, queue=q.keys.tasks)
    node_lease = Lease(b"t", b"", 1, 7, 0, queue=q.dispatch_keys.tasks)
    foreign = Lease(b"t", b"", 1, 7, 0, queue=other.keys.tasks)
    part_lease = PartitionLease.of(Lease(b"t", b"", 1, 7, 0, queue=partitions[1].keys.tasks), 1)
    handle = LockHandle(b"l", b"tok", 1, 0, 1, 0, _owner=lock)
    permit = PermitHandle(b"m", b"tok", 0, 0, 1, 0, _owner=sem)
    return Api(s, q, q.for_node("n"), lock, sem, sharded(partitions), lease, node_lease, foreign,
               part_lease, handle, permit)  # fmt: skip


def _check(error: InvalidArgument, case: Case) -> None:
    message = str(error)
    assert message.startswith("LUASCHED_ARG "), message
    assert re.search(rf"(?<![\w.]){re.escape(case.param)}\b", message), (case.label, message)


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A loopback port that is bound (so no one else can listen on it) but never listens:
    every connection to it is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _offline(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))


def test_the_table_covers_every_kind_of_bad_value() -> None:
    labels = " ".join(case.label for case in CASES)
    for shown in ("=None", "=True", "=1.5", "='5'", "=-1", f"={2**70}", "foreign lease"):
        assert shown in labels, shown
    assert len({case.label for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.label)
def test_bad_input_is_refused_before_any_io(silent_port: int, case: Case) -> None:
    client = _offline(silent_port)
    try:
        api = _api(Scheduler(client, "val", retry=NO_RETRY), ShardedQueue)
        with pytest.raises(InvalidArgument) as raised:
            case.call(api)
        _check(raised.value, case)
    finally:
        client.close()


def test_bad_input_is_refused_before_any_io_asyncio(silent_port: int) -> None:
    async def scenario() -> list[str]:
        client = redis.asyncio.Redis(
            host="127.0.0.1", port=silent_port, retry=Retry(NoBackoff(), 0)
        )
        failures = []
        try:
            api = _api(luasched.asyncio.Scheduler(client, "val", retry=NO_RETRY), AsyncShardedQueue)
            for case in CASES:
                try:
                    result = case.call(api)
                    if inspect.isawaitable(result):
                        await result
                except InvalidArgument as error:
                    try:
                        _check(error, case)
                    except AssertionError as wrong:
                        failures.append(f"{case.label}: {wrong}")
                except Exception as error:
                    failures.append(f"{case.label}: {type(error).__name__}: {error}")
                else:
                    failures.append(f"{case.label}: accepted")
        finally:
            await client.aclose()
        return failures

    assert asyncio.run(scenario()) == []


def test_bad_input_leaves_every_key_as_it_was(server: ServerHandle, r: Client) -> None:
    s = Scheduler(r, "val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q = s.queue("jobs")
    s.nodes.register("n", ttl_ms=60_000)
    q.enqueue("t", b"x", delay_ms=60_000)
    q.dispatch("d", b"y", strategy="round_robin", delay_ms=60_000)
    assert s.lock("l").acquire(blocking=False) is not None
    namespaces = ("val", "val~1")
    before = [snapshot_ignoring_ttl(r, ns) for ns in namespaces]
    api = _api(s, ShardedQueue)
    for case in CASES:
        with pytest.raises(InvalidArgument) as raised:
            case.call(api)
        _check(raised.value, case)
    assert [snapshot_ignoring_ttl(r, ns) for ns in namespaces] == before


def test_a_lease_is_refused_on_another_queue(server: ServerHandle, r: Client) -> None:
    s = Scheduler(r, "val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        jobs, other = s.queue("jobs"), s.queue("other")
        same_name = Scheduler(r, "val2").queue("jobs")
    s.nodes.register("n", ttl_ms=60_000)
    for queue in (jobs, other, same_name):
        queue.enqueue("t", b"x")
    jobs.dispatch("d", b"y", strategy="round_robin")
    other.dequeue("w", 60_000)  # the other queues hold a lease of the same task id and token
    same_name.dequeue("w", 60_000)
    lease = jobs.dequeue("w", 60_000)
    node_lease = jobs.for_node("n").dequeue("w", 60_000)
    assert lease is not None and node_lease is not None
    assert lease.queue == jobs.keys.tasks and node_lease.queue == jobs.dispatch_keys.tasks
    before = {ns: snapshot_ignoring_ttl(r, ns) for ns in ("val", "val2")}
    wrong = [
        lambda: other.ack(lease),
        lambda: other.nack(lease),
        lambda: other.extend(lease, 1000),
        lambda: other.ack_and_dequeue(lease, "w", 1000),
        lambda: same_name.ack(lease),
        lambda: jobs.ack(node_lease),
        lambda: jobs.for_node("n").ack(lease),
        lambda: jobs.for_node("n").extend(lease, 1000),
    ]
    for call in wrong:
        with pytest.raises(InvalidArgument, match="lease was taken from another queue"):
            call()

    async def twin() -> None:
        client = server.async_client()
        try:
            a_other = luasched.asyncio.Scheduler(client, "val").queue("other")
            with pytest.raises(InvalidArgument, match="lease was taken from another queue"):
                await a_other.ack(lease)
        finally:
            await client.aclose()

    asyncio.run(twin())
    assert {ns: snapshot_ignoring_ttl(r, ns) for ns in ("val", "val2")} == before
    assert jobs.ack(lease) and jobs.for_node("n").ack(node_lease)  # still held where they were


def test_a_decoding_client_is_refused(server: ServerHandle, r: Client) -> None:
    """decode_responses=True used to lease a task and then fail reading it (TypeError), leaving
    it leased to no one; such a client is refused at Scheduler(...) and nothing is written."""
    decoding = server.client(decode_responses=True)
    try:
        with pytest.raises(InvalidArgument, match=r"client must .*decode_responses=False"):
            Scheduler(decoding, "val")
    finally:
        decoding.close()

    async def twin() -> None:
        client = server.async_client(decode_responses=True)
        try:
            with pytest.raises(InvalidArgument, match=r"client must .*decode_responses=False"):
                luasched.asyncio.Scheduler(client, "val")
        finally:
            await client.aclose()

    asyncio.run(twin())
    assert snapshot(r, "val") == {}
    s = Scheduler(r, "val")  # the default client (bytes) is accepted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q = s.queue("jobs")
    q.enqueue("t", b"x")
    lease = q.dequeue("w", 60_000)
    assert lease is not None and lease.task_id == b"t" and q.ack(lease)
