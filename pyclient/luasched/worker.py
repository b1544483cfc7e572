"""The worker runtime: lease tasks, run a handler on each, ack, renew, nack, drain on shutdown.

``Worker(queue, handler)`` serves a ``Queue``, a node queue (``q.for_node(node)``) or a
``ShardedQueue`` with ``concurrency`` threads; ``luasched.asyncio.Worker`` does the same with
coroutines on the asyncio twins of those queues. Both are drivers of ONE loop, ``worker_loop``:
a generator that yields steps (take leases, send a batch of script calls, start a handler, wait
for finished handlers, cancel one) and gets each step's answer back. The loop decides nothing
about tasks (the scripts do); it only says when to lease, ack, nack, extend and give back.

What the runtime guarantees (docs/worker.md has the details):

* A handler's return acks its lease; an exception nacks it: ``Retry(delay_ms)`` ready again
  after that delay, ``Fail`` into the dead letters now, any other exception the queue's backoff
  (after ``max_attempts`` leases, the dead letters, as ``nack`` always does).
* Leases are taken in batches (``dequeue_many``) and acked in pipelines (one per batch of
  finished tasks); the take of the next batch rides in that pipeline after the acks, so a busy
  worker makes one round trip per batch (the hand-written loop makes two). A ridden take whose
  reply was lost is asked again under its request id: its leases run here (or are given back
  by a stop), never left to lapse.
* A running task's lease is extended every ``lease_ms / 3`` for as long as its handler runs. An
  extend refused (the lease lapsed and another worker took the task) marks the job lost
  (``job.lost``; under asyncio the handler's task is cancelled) and the runtime never acks or
  nacks it: the task belongs to the newer lease.
* ``stop()`` (SIGTERM / SIGINT under ``run(signals=True)``) stops leasing, lets in-flight
  handlers finish for up to ``drain_timeout_s``, then gives the unfinished leases back at once:
  ready now, the attempt not charged (``queue.nack`` mode 1), instead of letting them lapse. A
  second stop (or signal) gives them back now.
* A node queue's worker joins its node (heartbeat, else register; undrain), heartbeats it every
  ``node_ttl_ms / 3`` and, on shutdown, drains it (``nodes.drain``) and moves its queued tasks
  to live nodes (``redispatch``).

A handler runs at least once per task, never concurrently with itself on the same lease; it
runs again only when a lease lapsed (a worker died or hung past its lease without an extend) or
its attempt failed. Use ``job.token`` to fence its writes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue as queue_module
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from luasched import validate
from luasched.errors import GroupedQueue, InvalidArgument, StaleLease, UnknownNode
from luasched.keys import new_request_id
from luasched.nodes import drain_call, heartbeat_call, register_call
from luasched.queue import (
    NACK_DEAD,
    NACK_FAILED,
    NACK_GIVE_BACK,
    Lease,
    ack_call,
    check_take,
    extend_call,
    nack_call,
    redispatch_call,
)
from luasched.scripts import Call

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DRAIN_TIMEOUT_S",
    "DEFAULT_LEASE_MS",
    "DEFAULT_NODE_TTL_MS",
    "Fail",
    "Job",
    "Retry",
    "Worker",
    "WorkerBase",
    "WorkerOptions",
    "WorkerStats",
    "withdraw",
    "worker_loop",
]

log = logging.getLogger("luasched.worker")

DEFAULT_LEASE_MS = 30_000
DEFAULT_BATCH = 16
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_NODE_TTL_MS = 10_000
#: How long an idle worker (nothing in flight) blocks on the queue's wake list per take, in ms:
#: also the longest a stop waits for an idle worker to notice it.
IDLE_BLOCK_MS = 250
#: How often a worker with free slots but handlers still running asks for more tasks, in s.
BUSY_POLL_S = 0.05
#: How long a worker waits before asking again after a take failed (the server unreachable).
TAKE_RETRY_S = 0.5
#: Longest reason kept with a nacked task (the scripts' max_reason_bytes).
MAX_REASON_BYTES = 4096
#: At most this many redispatch calls when a node worker shuts down (100 tasks each).
MAX_REDISPATCH_CALLS = 100


class Retry(Exception):
    """Raised by a handler: give the task back as a failed attempt, ready again in ``delay_ms``
    (None: the queue's backoff). After ``max_attempts`` leases it goes to the dead letters."""

    def __init__(self, delay_ms: int | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry")
        if delay_ms is not None:
            validate.arg("queue.nack", "delay_ms", delay_ms, lo=0)
        self.delay_ms = delay_ms
        self.reason = reason


class Fail(Exception):
    """Raised by a handler: the task goes to the dead letters now, with ``reason``, whatever
    attempts it has left (``requeue_dead`` brings it back)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "failed")
        self.reason = reason


class Job:
    """One leased task as a handler sees it.

    ``task_id``, ``payload``, ``attempt`` (1 = first lease), ``token`` (the lease's fencing
    token: only grows per queue; fence writes with it) and ``deadline_ms`` (the lease's server
    deadline, moved by each extend) come from the ``Lease`` (``lease``). ``lost`` turns True
    when the runtime learned that the lease is gone (an extend was refused: it lapsed and the
    task was leased again, or the worker gave it back at the end of a drain): the handler should
    stop, and its outcome is ignored (never acked, never nacked).
    """

    __slots__ = ("_event", "_lost", "deadline_ms", "lease", "next_extend", "started")

    def __init__(self, lease: Lease, next_extend: float) -> None:
        self.lease = lease
        self.deadline_ms = lease.deadline_ms
        self.next_extend = next_extend
        self._lost = False
        self._event: threading.Event | None = None  # made by the first wait_lost
        #: Set by the driver when a handler takes the job (a prefetched one waits until then).
        self.started = False

    @property
    def task_id(self) -> bytes:
        return self.lease.task_id

    @property
    def payload(self) -> bytes:
        return self.lease.payload

    @property
    def attempt(self) -> int:
        return self.lease.attempt

    @property
    def token(self) -> int:
        return self.lease.token

    @property
    def lost(self) -> bool:
        """Whether the lease is gone (see the class doc)."""
        return self._lost

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the lease is lost or ``timeout`` s passed; whether it is lost. (Call it
        from the handler: one waiter per job.)"""
        if self._event is None:
            self._event = threading.Event()
        # _mark_lost sets _lost before it reads _event: one of the two sees the other.
        return self._lost or self._event.wait(timeout) or self._lost

    def _mark_lost(self) -> None:
        self._lost = True
        event = self._event
        if event is not None:
            event.set()

    def __repr__(self) -> str:
        return f"Job(task_id={self.task_id!r}, attempt={self.attempt}, token={self.token})"


@dataclass
class WorkerStats:
    """Counters of one worker since it started (read them from any thread; a Prometheus
    exporter or any metrics library can export them).

    ``processed``: handlers that returned and were acked. ``failed``: handlers that raised
    (``retried`` of them are back in the queue, ``dead`` went to the dead letters). ``lost``:
    leases found gone (extend or ack refused; never acked). ``given_back``: leases given back
    uncharged at shutdown. ``in_flight``: handlers running now.
    """

    started: float = field(default_factory=time.monotonic)
    processed: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    given_back: int = 0
    in_flight: int = 0

    def rate(self) -> float:
        """Processed tasks per second since the start."""
        elapsed = time.monotonic() - self.started
        return self.processed / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The one-line status: processed, failed, retried, dead, in flight, tasks/s."""
        return (
            f"processed={self.processed} failed={self.failed} retried={self.retried} "
            f"dead={self.dead} lost={self.lost} in_flight={self.in_flight} "
            f"rate={self.rate():.1f}/s"
        )


Hook = Callable[..., Any]


@dataclass(frozen=True)
class WorkerOptions:
    """The options of a worker, checked once (InvalidArgument naming the bad one)."""

    worker_id: bytes
    concurrency: int
    batch: int
    lease_ms: int
    drain_timeout_s: float
    burst: bool
    node_ttl_ms: int
    on_success: Hook | None = None
    on_failure: Hook | None = None
    on_dead: Hook | None = None
    status: Callable[[WorkerStats], Any] | None = None
    status_interval_s: float = 5.0

    @classmethod
    def of(
        cls,
        *,
        worker_id: str | bytes | None,
        concurrency: int,
        batch: int,
        lease_ms: int,
        drain_timeout_s: float,
        burst: bool,
        node_ttl_ms: int,
        **hooks: Any,
    ) -> WorkerOptions:
        wid = worker_id if worker_id is not None else f"{socket.gethostname()}-{os.getpid()}"
        check_take(wid, batch, lease_ms, 0)
        validate.integer("concurrency", concurrency, 1, 100_000)
        if validate.timeout_s("drain_timeout_s", drain_timeout_s) is None:
            raise InvalidArgument("drain_timeout_s must be a number of seconds >= 0, got None")
        validate.flag("burst", burst)
        validate.arg("nodes.heartbeat", "ttl_ms", node_ttl_ms, name="node_ttl_ms")
        if lease_ms < 30:
            raise InvalidArgument(f"lease_ms must be at least 30 for a worker, got {lease_ms}")
        validate.timeout_s("status_interval_s", hooks.get("status_interval_s", 5.0))
        for name, hook in hooks.items():
            if name != "status_interval_s" and hook is not None and not callable(hook):
                raise InvalidArgument(f"{name} must be callable or None, got {hook!r}")
        wid_bytes = wid.encode() if isinstance(wid, str) else wid
        return cls(
            wid_bytes, concurrency, batch, lease_ms, drain_timeout_s, burst, node_ttl_ms, **hooks
        )


# -------------------------------------------------------------------------------- the queue
# What the loop calls, for each kind of queue (plain, node, sharded; sync or asyncio twin):
# every ack, nack, extend and node call is a script ``Call`` on a runner, so a batch of them is
# one pipeline per runner.


def _plain(queue: Any, lease: Lease) -> Any:
    """The plain queue (``Queue``/``AsyncQueue``) whose scripts finish ``lease``."""
    partitions = getattr(queue, "partitions", None)
    if partitions is not None:
        return partitions[getattr(lease, "partition", 0)]
    return getattr(queue, "queue", queue)


def _is_node(queue: Any) -> bool:
    return hasattr(queue, "node") and hasattr(queue, "queue")


def ack_of(queue: Any, lease: Lease) -> tuple[Any, Call[Any]]:
    """The runner and ``queue.ack`` (``queue.node_ack``) call that finish ``lease``."""
    plain = _plain(queue, lease)
    if _is_node(queue):
        return plain._runner, ack_call(plain.dispatch_keys, lease, script="queue.node_ack")
    return plain._runner, plain._ack_call(lease, None)


def nack_of(
    queue: Any, lease: Lease, mode: int, delay_ms: int | None, reason: bytes
) -> tuple[Any, Call[Any]]:
    """The runner and ``queue.nack`` (``queue.node_nack``) call of ``lease`` in ``mode``."""
    plain = _plain(queue, lease)
    node = _is_node(queue)
    script = "queue.node_nack" if node else plain._lease_script("queue.nack")
    return plain._runner, nack_call(
        plain._lease_keys(script),
        lease,
        delay_ms=delay_ms,
        reason=reason,
        backoff_base_ms=plain.backoff_base_ms,
        backoff_max_ms=plain.backoff_max_ms,
        request_ttl_ms=plain.request_ttl_ms,
        script=script,
        mode=mode,
    )


def extend_of(queue: Any, lease: Lease, lease_ms: int) -> tuple[Any, Call[Any]]:
    """The runner and ``queue.extend`` (``queue.node_extend``) call of ``lease``."""
    plain = _plain(queue, lease)
    if _is_node(queue):
        return plain._runner, extend_call(
            plain.dispatch_keys, lease, lease_ms, script="queue.node_extend"
        )
    return plain._runner, extend_call(plain.keys, lease, lease_ms)


def take_of(queue: Any, options: WorkerOptions, request_id: bytes) -> tuple[Any, Call[Any]] | None:
    """The runner and the non-blocking ``dequeue_many`` call (``queue.dequeue`` or
    ``queue.node_dequeue``, a whole batch, under ``request_id``) that can ride in the pipeline
    of a batch's outcomes; None for a sharded queue, whose take asks its partitions in turn."""
    if getattr(queue, "partitions", None) is not None:
        return None
    args = (options.worker_id, options.batch, options.lease_ms, 0)
    if _is_node(queue):
        return queue.queue._runner, queue._take_plan(*args, request_id, "many")
    return queue._runner, queue._take_plan(*args, None, request_id, "many")


def _to_groups(queue: Any) -> bool:
    """After a take answered GROUPED: switch a plain queue (sync or asyncio) to the
    ``queue.group_*`` scripts (``QueueCalls._to_groups``); False for any other queue, or one
    that called them already."""
    to_groups = getattr(queue, "_to_groups", None)
    return to_groups is not None and bool(to_groups())


def _take_again(
    queue: Any, options: WorkerOptions, request_id: bytes | None
) -> Generator[WorkerStep, Any, Any]:
    """The take of ``take_of`` under ``request_id`` on its own; its leases or its exception."""
    take = take_of(queue, options, request_id or new_request_id())
    if take is None:
        return None
    (result,) = yield Calls((take,))
    return result


def remaining(stats: Any) -> int:
    """Tasks a ``stats()`` reply says are ready, delayed or leased (a node: ready or assigned)."""
    if hasattr(stats, "assigned"):
        return int(stats.ready + stats.assigned)
    return int(stats.ready + stats.delayed + stats.leased)


def withdraw(jobs: tuple[Job, ...]) -> list[Job]:
    """Mark lost the ``jobs`` no handler took (the driver makes it atomic); those jobs."""
    waiting = [job for job in jobs if not job.started]
    for job in waiting:
        job._mark_lost()
    return waiting


def _reason(error: BaseException) -> bytes:
    reason = getattr(error, "reason", "") or f"{type(error).__name__}: {error}"
    return reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]


# -------------------------------------------------------------------------------- the steps


@dataclass(frozen=True)
class Take:
    """Lease up to ``n`` tasks, blocking up to ``block_ms``; the answer is a list of Lease.
    ``request_id``: the take's request id (None: a fresh one); the loop passes the id of a take
    whose reply it did not get, so that a replay answers the leases that take made."""

    n: int
    block_ms: int
    request_id: bytes | None = None

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the driver's ``dequeue_many`` call."""
        if self.request_id is None:
            return {"block_ms": self.block_ms}
        return {"block_ms": self.block_ms, "request_id": self.request_id}


@dataclass(frozen=True)
class Calls:
    """Send these (runner, call) pairs, one pipeline per runner; the answer is a list of each
    call's result or exception, in order."""

    calls: tuple[tuple[Any, Call[Any]], ...]


@dataclass(frozen=True)
class Start:
    """Start the handler on ``job``; the answer is None."""

    job: Job


@dataclass(frozen=True)
class Collect:
    """Wait up to ``timeout_s`` for finished handlers (or a stop); the answer is a list of
    (job, None or the handler's exception)."""

    timeout_s: float


@dataclass(frozen=True)
class Cancel:
    """The lease of ``job`` is gone: cancel its handler if the driver can (asyncio)."""

    job: Job


@dataclass(frozen=True)
class Withdraw:
    """Of ``jobs``, mark lost those no handler took yet, atomically with respect to the handlers
    that take jobs (so a withdrawn job never runs); the answer is the list of them."""

    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Remaining:
    """Count the tasks still ready, delayed or leased in the queue (``--burst``)."""


@dataclass(frozen=True)
class Control:
    """What a stop asked for, shared by the loop and whoever stops it (a signal handler, another
    thread): ``stop`` drains, ``now`` gives leases back at once."""

    stop: threading.Event = field(default_factory=threading.Event)
    now: threading.Event = field(default_factory=threading.Event)


WorkerStep = Take | Calls | Start | Collect | Cancel | Withdraw | Remaining
WorkerLoop = Generator[WorkerStep, Any, bool]


def _call_hook(hook: Hook | None, *args: Any) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("worker hook %r failed", hook)


def worker_loop(
    queue: Any, options: WorkerOptions, control: Control, stats: WorkerStats
) -> WorkerLoop:
    """The worker's loop (both drivers run it): returns True after a clean drain (every
    leased task finished), False when leases had to be given back.

    Round trips: while a handler is free after a batch of outcomes, the next batch's take rides
    in the outcomes' pipeline (``take_of``; a sharded queue takes on its own), so a busy worker
    makes one round trip per batch; a take that did not ride, or whose reply was lost, is a
    ``Take`` (a lost one replayed under its request id)."""
    node = getattr(queue, "node", None) if _is_node(queue) else None
    lease_ms = options.lease_ms
    extend_every = lease_ms / 3000
    running: dict[int, Job] = {}
    heartbeat_every = options.node_ttl_ms / 3000
    next_heartbeat = 0.0
    next_status = time.monotonic() + options.status_interval_s
    drain_deadline: float | None = None
    #: The request id of a pipelined take whose reply was lost: the next take replays it.
    replay: bytes | None = None
    #: A take rode in the last outcomes' pipeline: no other take until the next Collect.
    took = False
    if node is not None:
        yield from _join(queue, node, options.node_ttl_ms)
        next_heartbeat = time.monotonic() + heartbeat_every
    name = getattr(queue, "name", None) or queue.queue.name
    log.info("worker %s started on queue %r", options.worker_id.decode(errors="replace"), name)
    while True:
        now = time.monotonic()
        if control.stop.is_set() and drain_deadline is None:
            drain_deadline = now + options.drain_timeout_s
            # Prefetched leases no handler took: given back now, never run here.
            waiting: list[Job] = yield Withdraw(tuple(running.values()))
            if replay is not None:  # the leases a lost reply may have made: given back too
                for lease in (yield Take(options.batch, 0, replay)):
                    waiting.append(Job(lease, now))
            if waiting:
                yield from _give_back(queue, {id(job): job for job in waiting}, stats)
                for job in waiting:
                    running.pop(id(job), None)
                stats.in_flight = len(running)
            replay = None
            log.info("stopping: no more leases; draining %d in flight", len(running))
        if drain_deadline is not None and (
            not running or now >= drain_deadline or control.now.is_set()
        ):
            break
        if node is not None and now >= next_heartbeat:
            yield from _heartbeat(queue, node, options.node_ttl_ms)
            next_heartbeat = now + heartbeat_every
        if options.status is not None and now >= next_status:
            _call_hook(options.status, stats)
            next_status = now + options.status_interval_s
        free = options.concurrency - len(running)
        # Right after a take that rode with the outcomes, the next one waits for a Collect.
        just_took, took = took and bool(running), False
        if drain_deadline is None and free > 0 and not just_took:
            # A whole batch whenever a handler is free: up to batch - 1 leases wait (leased,
            # extended) for a handler, as a prefetch.
            leases: list[Lease] = yield Take(options.batch, 0 if running else IDLE_BLOCK_MS, replay)
            replay = None
            yield from _start(leases, running, stats, extend_every)
            if not running:
                if options.burst and not leases and (yield Remaining()) == 0:
                    log.info("burst: the queue holds nothing ready, delayed or leased")
                    control.stop.set()
                continue
        wake_at = min(job.next_extend for job in running.values())
        if drain_deadline is not None:
            wake_at = min(wake_at, drain_deadline)
        elif free > 0:
            wake_at = min(wake_at, time.monotonic() + BUSY_POLL_S)
        if node is not None:
            wake_at = min(wake_at, next_heartbeat)
        done = yield Collect(max(0.0, wake_at - time.monotonic()))
        if done:
            taking = drain_deadline is None and not control.stop.is_set() and replay is None
            rid = new_request_id() if taking else None
            taken = yield from _finish(queue, options, running, done, stats, rid)
            if isinstance(taken, GroupedQueue) and _to_groups(queue):
                # The queue gained groups: that take changed nothing; ask the group scripts.
                log.info("queue %r has groups: takes go to queue.group_dequeue", name)
                taken = yield from _take_again(queue, options, rid)
            if isinstance(taken, BaseException):
                log.error("take failed: %s (asked again)", taken)
                replay = rid
            elif taken is not None:
                took = True
                yield from _start(taken, running, stats, extend_every)
        due = [job for job in running.values() if job.next_extend <= time.monotonic()]
        if due:
            yield from _extend(queue, lease_ms, extend_every, running, due, stats)
    clean = not running
    if running:
        yield from _give_back(queue, running, stats)
    if node is not None:
        yield from _leave(queue, node)
    return clean


def _start(
    leases: list[Lease], running: dict[int, Job], stats: WorkerStats, extend_every: float
) -> Generator[WorkerStep, Any, None]:
    """Start a handler on each of ``leases`` (those no handler is free for wait: a prefetch)."""
    for lease in leases:
        job = Job(lease, time.monotonic() + extend_every)
        running[id(job)] = job
        stats.in_flight = len(running)
        yield Start(job)


def _finish(
    queue: Any,
    options: WorkerOptions,
    running: dict[int, Job],
    done: list[tuple[Job, BaseException | None]],
    stats: WorkerStats,
    take_request: bytes | None = None,
) -> Generator[WorkerStep, Any, list[Lease] | BaseException | None]:
    """Ack the jobs whose handler returned and nack those that raised, in one batch.

    With ``take_request`` (a request id), if a handler is free once these jobs are done, the
    next batch's take (``take_of``) rides in the same pipeline, sent after every outcome; the
    answer is its leases, or its exception (the reply was lost: replay the request id), or None
    when no take rode."""
    calls: list[tuple[Any, Call[Any]]] = []
    finished: list[tuple[Job, BaseException | None]] = []
    for job, error in done:
        if running.pop(id(job), None) is None:
            continue  # given back or lost already
        if job.lost:
            stats.lost += 1
            continue
        if error is None:
            calls.append(ack_of(queue, job.lease))
        elif isinstance(error, Fail):
            calls.append(nack_of(queue, job.lease, NACK_DEAD, None, _reason(error)))
        else:
            delay = error.delay_ms if isinstance(error, Retry) else None
            calls.append(nack_of(queue, job.lease, NACK_FAILED, delay, _reason(error)))
        finished.append((job, error))
    stats.in_flight = len(running)
    if not calls:
        return None
    take = None
    if take_request is not None and options.concurrency > len(running):
        take = take_of(queue, options, take_request)
    results = yield Calls(tuple(calls) if take is None else (*calls, take))
    for (job, error), result in zip(finished, results[: len(finished)], strict=True):
        if isinstance(result, StaleLease):
            stats.lost += 1
            log.warning("lease of task %r was gone before its outcome was sent", job.task_id)
        elif isinstance(result, BaseException):
            log.error("outcome of task %r not sent: %s", job.task_id, result)
        elif error is None:
            stats.processed += 1
            _call_hook(options.on_success, job)
        else:
            stats.failed += 1
            if result.state == "dead":
                stats.dead += 1
                _call_hook(options.on_dead, job, error)
            else:
                stats.retried += 1
                _call_hook(options.on_failure, job, error)
    return None if take is None else results[-1]


def _extend(
    queue: Any,
    lease_ms: int,
    extend_every: float,
    running: dict[int, Job],
    due: list[Job],
    stats: WorkerStats,
) -> Generator[WorkerStep, Any, None]:
    """Extend the leases of ``due`` jobs; a refused one is lost (and its handler cancelled)."""
    results = yield Calls(tuple(extend_of(queue, job.lease, lease_ms) for job in due))
    for job, result in zip(due, results, strict=True):
        if isinstance(result, StaleLease):
            log.warning("lease of task %r lost (extend refused): it is not acked", job.task_id)
            job._mark_lost()
            yield Cancel(job)
        elif isinstance(result, BaseException):
            log.error("extend of task %r failed: %s (retried)", job.task_id, result)
            job.next_extend = time.monotonic() + min(extend_every, 0.1)
        else:
            job.deadline_ms = int(result)
            job.next_extend = time.monotonic() + extend_every


def _give_back(
    queue: Any, running: dict[int, Job], stats: WorkerStats
) -> Generator[WorkerStep, Any, None]:
    """Give every unfinished lease back now: ready, its attempt not charged."""
    jobs = list(running.values())
    running.clear()
    for job in jobs:
        job._mark_lost()
        yield Cancel(job)
    results = yield Calls(tuple(nack_of(queue, job.lease, NACK_GIVE_BACK, 0, b"") for job in jobs))
    stats.in_flight -= len(jobs)
    given = sum(1 for result in results if not isinstance(result, BaseException))
    stats.given_back += given
    log.info("gave back %d unfinished lease(s) of %d", given, len(jobs))


def _node_target(queue: Any) -> tuple[Any, Any]:
    plain = queue.queue
    return plain._runner, plain.keys.namespace


def _join(queue: Any, node: bytes, ttl_ms: int) -> Generator[WorkerStep, Any, None]:
    """Join ``node``: heartbeat it, or register it when it is unknown; then undrain it."""
    runner, namespace = _node_target(queue)
    (beat,) = yield Calls(((runner, heartbeat_call(namespace, node, ttl_ms)),))
    if isinstance(beat, UnknownNode):
        (beat,) = yield Calls(((runner, register_call(namespace, node, ttl_ms=ttl_ms)),))
    if isinstance(beat, BaseException):
        raise beat
    (undrained,) = yield Calls(((runner, drain_call(namespace, node, False)),))
    if isinstance(undrained, BaseException):
        raise undrained
    log.info("joined node %r", node)


def _heartbeat(queue: Any, node: bytes, ttl_ms: int) -> Generator[WorkerStep, Any, None]:
    runner, namespace = _node_target(queue)
    (beat,) = yield Calls(((runner, heartbeat_call(namespace, node, ttl_ms)),))
    if isinstance(beat, UnknownNode):  # swept while we were away: register again
        (beat,) = yield Calls(((runner, register_call(namespace, node, ttl_ms=ttl_ms)),))
    if isinstance(beat, BaseException):
        log.error("heartbeat of node %r failed: %s", node, beat)


def _leave(queue: Any, node: bytes) -> Generator[WorkerStep, Any, None]:
    """Drain ``node`` and move its queued tasks to live nodes (bounded)."""
    runner, namespace = _node_target(queue)
    (drained,) = yield Calls(((runner, drain_call(namespace, node, True)),))
    if isinstance(drained, BaseException):
        log.error("drain of node %r failed: %s", node, drained)
        return
    plain = queue.queue
    moved = 0
    for _ in range(MAX_REDISPATCH_CALLS):
        (result,) = yield Calls(((runner, redispatch_call(plain.dispatch_keys, node, plain._rng)),))
        if isinstance(result, BaseException):
            log.error("redispatch off node %r stopped: %s", node, result)
            return
        moved += result.moved
        if not result.more:
            break
    log.info("node %r drained; %d task(s) moved to live nodes", node, moved)


# ------------------------------------------------------------------------- the sync driver


def runner_groups(calls: tuple[tuple[Any, Call[Any]], ...]) -> list[list[int]]:
    """Indexes of ``calls`` by runner (one pipeline each), in first-seen order."""
    groups: dict[int, list[int]] = {}
    for index, (runner, _call) in enumerate(calls):
        groups.setdefault(id(runner), []).append(index)
    return list(groups.values())


def send_calls(calls: tuple[tuple[Any, Call[Any]], ...]) -> list[Any]:
    """Run ``calls`` (sync runners): one pipeline per runner; each result or exception."""
    results: list[Any] = [None] * len(calls)
    for indexes in runner_groups(calls):
        batch = calls[indexes[0]][0].batch()
        for index in indexes:
            batch.run(calls[index][1])
        try:
            replies = batch.execute(raise_on_error=False)
        except Exception as error:  # the whole pipeline failed (connection lost...)
            replies = [error] * len(indexes)
        for index, reply in zip(indexes, replies, strict=True):
            results[index] = reply
    return results


class Steps:
    """The steps of a worker loop, for a driver's ``for`` loop (the sync and the asyncio driver
    alike): set ``answer`` to a step's answer before the next step is taken (it is sent into
    the loop, then reset to None); once the loop has ended, ``result`` is what it returned."""

    def __init__(self, loop: WorkerLoop) -> None:
        self._loop = loop
        self.answer: Any = None
        self.result = False

    def __iter__(self) -> Steps:
        return self

    def __next__(self) -> WorkerStep:
        answer, self.answer = self.answer, None
        try:
            return self._loop.send(answer)
        except StopIteration as done:
            self.result = bool(done.value)
            raise StopIteration from None


def take_failed(error: BaseException) -> float:
    """Log a take that failed after the runner's own retries; the seconds to wait before the
    loop goes on (it is answered no lease and tries again soon)."""
    log.error("take failed: %s", error)
    return TAKE_RETRY_S


class WorkerBase:
    """What the sync and asyncio workers share: options, counters, stop (the drivers differ)."""

    def __init__(
        self,
        queue: Any,
        handler: Callable[[Job], Any],
        *,
        concurrency: int = 1,
        batch: int = DEFAULT_BATCH,
        lease_ms: int = DEFAULT_LEASE_MS,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        burst: bool = False,
        worker_id: str | bytes | None = None,
        node_ttl_ms: int = DEFAULT_NODE_TTL_MS,
        on_success: Callable[[Job], Any] | None = None,
        on_failure: Callable[[Job, BaseException], Any] | None = None,
        on_dead: Callable[[Job, BaseException], Any] | None = None,
        status: Callable[[WorkerStats], Any] | None = None,
        status_interval_s: float = 5.0,
    ) -> None:
        if not callable(handler):
            raise InvalidArgument(f"handler must be callable, got {handler!r}")
        self.queue = queue
        self.handler = handler
        self.options = WorkerOptions.of(
            worker_id=worker_id,
            concurrency=concurrency,
            batch=batch,
            lease_ms=lease_ms,
            drain_timeout_s=drain_timeout_s,
            burst=burst,
            node_ttl_ms=node_ttl_ms,
            on_success=on_success,
            on_failure=on_failure,
            on_dead=on_dead,
            status=status,
            status_interval_s=status_interval_s,
        )
        self.control = Control()
        self._stats = WorkerStats()

    def stats(self) -> WorkerStats:
        """The worker's counters (live: read, do not write)."""
        return self._stats

    def stop(self, now: bool = False) -> None:
        """Stop leasing and drain (idempotent; from a signal handler or another thread too); a
        second stop, or ``now``, gives the unfinished leases back at once."""
        if self.control.stop.is_set() or now:
            self.control.now.set()
        self.control.stop.set()
        self._wake()

    def _wake(self) -> None:
        """Wake the driver's Collect step."""
        raise NotImplementedError

    def _loop(self) -> WorkerLoop:
        return worker_loop(self.queue, self.options, self.control, self._stats)

    def _take(self, step: Take) -> Any:
        """The queue's ``dequeue_many`` for ``step`` (its answer; awaitable on asyncio)."""
        options = self.options
        return self.queue.dequeue_many(
            options.worker_id, step.n, options.lease_ms, **step.options()
        )


@dataclass
class Inline:
    """The state a one-thread ``Worker`` shares between the thread that runs its loop with the
    handlers inline and ``run()``'s thread, which watches it (read and written under the
    worker's claim lock, but ``pending`` and ``alarm``). A fresh one for each ``run()``."""

    #: Started jobs whose handler has not run yet, in order: the loop thread's own, but while
    #: a handler runs (``running`` set), when the watcher may take the loop over and them.
    pending: collections.deque[Job] = field(default_factory=collections.deque)
    #: The job whose handler runs now, inline; None between handlers.
    running: Job | None = None
    #: When the loop is due again (monotonic s): past it, the watcher takes the loop over.
    deadline: float = 0.0
    #: The outcomes of this Collect so far (the watcher's answer to it when it takes over).
    finished: list[tuple[Job, BaseException | None]] = field(default_factory=list)
    #: Set once the watcher drives the loop.
    handed_over: bool = False
    #: Set once the loop ended in the loop thread (``error``: what it raised).
    ended: bool = False
    error: BaseException | None = None
    #: Wakes the watcher: the loop ended, or a stop (a SimpleQueue: ``put`` is safe in a signal
    #: handler that interrupted the watcher's own wait).
    alarm: queue_module.SimpleQueue[None] = field(default_factory=queue_module.SimpleQueue)


class Worker(WorkerBase):
    """Serve ``queue`` (a ``Queue``, a node queue ``q.for_node(node)`` or a ``ShardedQueue``)
    with ``handler(job)`` on ``concurrency`` threads.

    ``handler`` gets a ``Job`` (task_id, payload, attempt, token, lost). Returning acks the
    task; raising ``Retry(delay_ms)`` / ``Fail(reason)`` / anything else nacks it (see the
    module doc). Leases are taken ``batch`` at a time for ``lease_ms`` and extended every
    ``lease_ms / 3`` while their handler runs. ``run()`` serves until ``stop()`` (or SIGTERM /
    SIGINT with ``signals=True``), drains for up to ``drain_timeout_s`` and returns True after
    a clean drain. ``burst``: stop once the queue holds nothing ready, delayed or leased.

    With ``concurrency=1`` (the default) the loop and the handler share one thread (no handoff
    of each batch between threads): the ``luasched-worker-0`` thread leases, runs the handlers
    of a batch one after the other and acks them, while ``run()``'s thread watches it. A handler
    still running when the loop is due (an extend, a heartbeat) or when a stop comes is left to
    that thread, and ``run()``'s thread goes on with the loop: from then on the two work as
    with more threads (one runs handlers, one the loop), so extends, drains and give-backs keep
    their times whatever a handler does.

    ``on_success(job)``, ``on_failure(job, error)`` (retried), ``on_dead(job, error)`` run in
    the worker's loop thread; keep them short. ``stats()`` gives the counters.
    Handler threads are daemon threads: a handler still running after the drain is left to
    finish on its own (its lease was given back and ``job.lost`` is True).
    """

    def __init__(self, queue: Any, handler: Callable[[Job], Any], **options: Any) -> None:
        super().__init__(queue, handler, **options)
        self._done: queue_module.SimpleQueue[tuple[Job, BaseException | None] | None] = (
            queue_module.SimpleQueue()
        )
        self._jobs: queue_module.SimpleQueue[Job | None] = queue_module.SimpleQueue()
        # A handler taking a job vs a Withdraw; with one thread, also the handover of the loop.
        self._claim = threading.Lock()
        self._inline = Inline()

    def _wake(self) -> None:
        self._done.put(None)
        self._inline.alarm.put(None)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._claim:
                take = not job.lost
                job.started = take
            if not take:  # given back (or lost) while it waited for a handler
                self._done.put((job, None))
                continue
            self._done.put((job, self._handle(job)))

    def _handle(self, job: Job) -> BaseException | None:
        """Run the handler on ``job``; its outcome (None: it returned)."""
        try:
            self.handler(job)
        except BaseException as error:  # the outcome, whatever it is
            return error
        return None

    def _collect(self, timeout_s: float) -> list[tuple[Job, BaseException | None]]:
        finished: list[tuple[Job, BaseException | None]] = []
        try:
            first = self._done.get(timeout=timeout_s)
        except queue_module.Empty:
            return finished
        pending: list[Any] = [first]
        while True:
            with contextlib.suppress(queue_module.Empty):
                pending.append(self._done.get_nowait())
                continue
            break
        return [entry for entry in pending if entry is not None]

    def run(self, *, signals: bool = False) -> bool:
        """Serve until stopped; True after a clean drain (False: leases were given back).

        ``signals``: SIGTERM and SIGINT stop the worker (the second one: now) while it runs
        (main thread only); the previous handlers are restored at the end. An exception raised
        in ``run()``'s thread (KeyboardInterrupt without ``signals``) is raised by ``run()``;
        while a one-thread worker's loop runs in its own thread, that loop is also stopped now
        (it gives its unfinished leases back)."""
        previous: dict[signal.Signals, Any] = {}
        if signals:
            for number in (signal.SIGTERM, signal.SIGINT):
                previous[number] = signal.signal(number, lambda *_: self.stop())
        steps = Steps(self._loop())
        inline = self.options.concurrency == 1
        self._inline = Inline()
        target: Callable[[], Any] = (lambda: self._run_inline(steps)) if inline else self._serve
        threads = [
            threading.Thread(target=target, name=f"luasched-worker-{n}", daemon=True)
            for n in range(self.options.concurrency)
        ]
        for thread in threads:
            thread.start()
        try:
            if inline:
                return self._watch(steps)
            self._drive(steps)
            return steps.result
        finally:
            for _ in threads:
                self._jobs.put(None)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            log.info("worker stopped: %s", self._stats.line())

    def _drive(self, steps: Steps, inline: bool = False) -> bool:
        """Drive the loop; True once it ended. ``inline`` (one handler, in this thread):
        False as soon as the watcher took the loop over (see ``_run_pending``)."""
        for step in steps:
            if isinstance(step, Take):
                try:
                    steps.answer = self._take(step)
                except Exception as error:  # after the runner's own retries: try again soon
                    time.sleep(take_failed(error))
                    steps.answer = []
            elif isinstance(step, Calls):
                steps.answer = send_calls(step.calls)
            elif isinstance(step, Start):
                if inline:
                    self._inline.pending.append(step.job)
                else:
                    self._jobs.put(step.job)
            elif isinstance(step, Collect):
                if not inline or not self._inline.pending:
                    steps.answer = self._collect(step.timeout_s)
                elif (answer := self._run_pending(step.timeout_s)) is None:
                    return False
                else:
                    steps.answer = answer
            elif isinstance(step, Withdraw):
                with self._claim:
                    steps.answer = withdraw(step.jobs)
            elif isinstance(step, Remaining):
                steps.answer = remaining(self.queue.stats())
            # Cancel: a thread cannot be cancelled; the handler reads job.lost.
        return True

    # One handler thread: the loop runs handlers inline, run()'s thread watches.

    def _run_inline(self, steps: Steps) -> None:
        """The ``luasched-worker-0`` thread of a one-thread worker: drive the loop with the
        handlers inline until it ends, or, once the watcher took it over, serve as the handler
        thread."""
        state = self._inline
        try:
            if not self._drive(steps, inline=True):
                self._serve()
                return
        except BaseException as error:  # raised by run() in its thread
            state.error = error
        with self._claim:
            state.ended = True
        state.alarm.put(None)

    def _run_pending(self, timeout_s: float) -> list[tuple[Job, BaseException | None]] | None:
        """Collect, inline: run the handlers of the started jobs one after the other, in this
        thread, until none is left, ``timeout_s`` passed (the loop is due) or a stop came; their
        outcomes. None: a handler ran past that, the watcher took the loop over with the
        outcomes before it, and this one's outcome went to it (``_done``)."""
        state = self._inline
        finished: list[tuple[Job, BaseException | None]] = []
        deadline = time.monotonic() + timeout_s
        stop = self.control.stop
        while state.pending and not stop.is_set() and time.monotonic() < deadline:
            job = state.pending.popleft()
            with self._claim:
                take = not job.lost
                job.started = take
                if take:
                    state.running, state.deadline, state.finished = job, deadline, finished
            if not take:  # given back (or lost) before its turn
                finished.append((job, None))
                continue
            error = self._handle(job)
            with self._claim:
                state.running = None
                if state.handed_over:
                    self._done.put((job, error))
                    return None
                finished.append((job, error))
        return finished

    def _watch(self, steps: Steps) -> bool:
        """``run()``'s thread while the loop runs handlers inline: wait for its end; take the
        loop over when a handler runs past the loop's next due time or a stop comes (the jobs
        still waiting go to the handler thread, which that handler's thread becomes)."""
        state = self._inline
        options = self.options
        every = options.lease_ms / 6000
        if _is_node(self.queue):
            every = min(every, options.node_ttl_ms / 6000)
        try:
            while True:
                with self._claim:
                    if state.ended:
                        break
                    job, deadline = state.running, state.deadline
                    now = time.monotonic()
                    if job is not None and (now >= deadline or self.control.stop.is_set()):
                        state.handed_over = True
                        steps.answer = list(state.finished)
                        for waiting in state.pending:
                            self._jobs.put(waiting)
                        state.pending.clear()
                        break
                with contextlib.suppress(queue_module.Empty):
                    state.alarm.get(timeout=every if job is None else max(0.0, deadline - now))
        except BaseException:
            self.stop(now=True)
            raise
        if not state.handed_over:
            if state.error is not None:
                raise state.error
            return steps.result
        log.debug("a handler ran past the loop's due time: the loop goes on in run()'s thread")
        self._drive(steps)
        return steps.result
