"""Leases: what a plain queue and a node queue share (``luasched.queue``, ``luasched.dispatch``).

A lease is a task taken by one worker until a deadline, with a fencing token that only grows per
queue. Both kinds of queue take, ack, nack and extend leases with the same ARGV and the same
replies, and block the same way between two takes; this module holds that once: the results
(``Lease``, ``Nacked``, ``Dequeued``), the argument checks of a take, the call builders of
ack/nack/extend (``queue.ack`` or ``queue.node_ack``...: the script is a parameter), the reply
shapes of a take, and the blocking take itself (a loop of ``luasched.loops`` steps, driven by
the sync and the asyncio queues alike). It holds no decision, only the shape of KEYS/ARGV and
of the replies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from luasched import blocking, contract, validate
from luasched.contract import BoundKeys
from luasched.keys import new_request_id, to_bytes
from luasched.loops import Loop, Run, Send, Wait
from luasched.render import MAX_BATCH_LIMIT
from luasched.scripts import Call

__all__ = [
    "DEFAULT_BACKOFF_BASE_MS",
    "DEFAULT_BACKOFF_MAX_MS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_POLL_MS",
    "DEFAULT_REQUEST_TTL_MS",
    "NACK_DEAD",
    "NACK_FAILED",
    "NACK_GIVE_BACK",
    "BoundQueueKeys",
    "Dequeued",
    "Lease",
    "LeaseKeys",
    "Nacked",
    "TakeCall",
    "Waiting",
    "ack_call",
    "blocking_take",
    "check_take",
    "extend_call",
    "nack_call",
    "pass_on_commands",
    "poll_wait_ms",
    "remaining_ms",
    "take_plan",
    "take_shape",
]

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_REQUEST_TTL_MS = 60_000
DEFAULT_BACKOFF_BASE_MS = 1_000
DEFAULT_BACKOFF_MAX_MS = 3_600_000
#: The modes of ``queue.nack`` / ``queue.node_nack`` (their optional 9th argument): a failed
#: attempt (backoff, then the dead letters after max_attempts), a lease given back uncharged
#: (ready now, the attempt not counted: a worker shutting down), or into the dead letters now.
NACK_FAILED, NACK_GIVE_BACK, NACK_DEAD = 0, 1, 2
#: A blocked dequeue retries the script at least this often, whatever wakes it (or not).
DEFAULT_POLL_MS = 1_000


@dataclass(frozen=True)
class Lease:
    """A leased task: the worker owns it until ``deadline_ms`` (server clock, Unix ms).

    ``token`` is the lease's fencing token: it only grows per queue, so a larger token is a newer
    lease. ``attempt`` counts the leases of this task, this one included (1 = first).

    ``queue`` is the key of the task hash of the queue that leased it
    (``luasched:{ns}:q:tasks:<name>``, ``...:d:tasks:<name>`` for a node queue's lease): ``ack``,
    ``nack``, ``extend`` and ``ack_and_dequeue`` of any other queue refuse the lease with
    ``InvalidArgument`` naming ``lease``, before any I/O. A lease built by hand without it (b"")
    is sent as it is (the script answers StaleLease if the queue does not hold it).
    """

    task_id: bytes
    payload: bytes
    attempt: int
    token: int
    deadline_ms: int
    queue: bytes = b""


@dataclass(frozen=True)
class Nacked:
    """What ``nack`` did: ``state`` ``ready`` (``delay_ms`` 0), ``delayed`` (ready again in
    ``delay_ms``) or ``dead`` (``delay_ms`` -1: it had its max_attempts leases)."""

    state: str
    delay_ms: int


@dataclass(frozen=True)
class Dequeued:
    """The reply of one ``queue.dequeue`` call: the leases taken, best first, and, when none was
    taken and the call said it will wait, ms until the next delayed task is due (None: none)."""

    leases: tuple[Lease, ...]
    next_due_ms: int | None


class BoundQueueKeys:
    """What ``QueueKeys`` and ``DispatchKeys`` share: their KEYS (``bound``, the manifest's
    layout bound to one queue) and the keys every queue that leases tasks has by name."""

    bound: BoundKeys

    def with_request(self, request_id: bytes) -> tuple[bytes, ...]:
        """The KEYS of a call with ``request_id`` (b"": none; the request key is then unused)."""
        return self.bound.with_request(request_id)

    @property
    def tasks(self) -> bytes:
        """The queue's task hash: what a ``Lease`` of this queue records as its ``queue``."""
        return self.bound["tasks"]

    @property
    def wake(self) -> bytes:
        """The list blocked takers BLPOP (the scripts push wake-up signals on it)."""
        return self.bound["wake"]


class LeaseKeys(Protocol):
    """The keys of a queue that leases tasks (``QueueKeys``, ``DispatchKeys``)."""

    @property
    def tasks(self) -> bytes:
        """The queue's task hash: what its leases record as their ``queue``."""
        ...

    def with_request(self, request_id: bytes) -> tuple[bytes, ...]:
        """The KEYS of a call with ``request_id`` (b"": none)."""
        ...


def optional(value: Any) -> int | None:
    """``value`` as an int, None for the scripts' -1 (none)."""
    number = int(value)
    return None if number < 0 else number


def request_of(request_id: str | bytes | None) -> bytes:
    """A call's request id: a fresh one for None, else ``request_id`` checked."""
    return validate.request_id("request_id", request_id, new_request_id)


def held(script: str, lease: object, queue: bytes) -> tuple[bytes, int]:
    """The task id and token of ``lease`` (a Lease of the queue whose task hash is ``queue``)."""
    held = validate.lease("lease", lease, queue)
    task_id = validate.arg(script, "task_id", held.task_id, name="lease.task_id")
    return task_id, validate.arg(script, "token", held.token, name="lease.token")


def max_attempts_arg(script: str, value: object) -> int:
    """``value`` checked as ARGV max_attempts of ``script``."""
    return validate.arg(script, "max_attempts", value)  # type: ignore[no-any-return]


def check_take(worker_id: object, n: object, lease_ms: object, block_ms: object) -> None:
    """Check the arguments of a take (``dequeue``, ``dequeue_many``, ``ack_and_dequeue`` of a
    queue, node queue or sharded queue) before any I/O: ``worker_id``, ``n`` (1..max_batch),
    ``lease_ms`` as the dequeue script takes them, and ``block_ms`` (an int 0..the longest
    lease; a negative one is an error, not "no wait")."""
    script = "queue.dequeue"
    validate.arg(script, "worker_id", worker_id)
    validate.arg(script, "count", n, name="n", hi=MAX_BATCH_LIMIT)
    validate.arg(script, "lease_ms", lease_ms)
    validate.arg(script, "wait_ms", block_ms, name="block_ms")


def text(value: Any) -> str:
    """A reply's status string (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _dequeued(reply: Any, queue: bytes = b"") -> Dequeued:
    leases = tuple(
        Lease(
            task_id=bytes(reply[index]),
            payload=bytes(reply[index + 1]),
            attempt=int(reply[index + 2]),
            token=int(reply[index + 3]),
            deadline_ms=int(reply[index + 4]),
            queue=queue,
        )
        for index in range(1, len(reply), 5)
    )
    return Dequeued(leases, None if leases else optional(reply[0]))


def _first_lease(reply: Any, queue: bytes = b"") -> Lease | None:
    leases = _dequeued(reply, queue).leases
    return leases[0] if leases else None


def _lease_list(reply: Any, queue: bytes = b"") -> list[Lease]:
    return list(_dequeued(reply, queue).leases)


_SHAPES: dict[str, Any] = {"reply": _dequeued, "one": _first_lease, "many": _lease_list}


def take_shape(shape: str, queue: bytes) -> Callable[[Any], Any]:
    """The reply parser of a take: ``shape`` of the reply, leases of the queue ``queue``."""
    parse = _SHAPES[shape]
    return lambda reply: parse(reply, queue)


#: A dequeue script call by (wait_ms, ack, request id, reply shape): what a blocking take repeats.
TakeCall = Callable[[int, Lease | None, str | bytes | None, str], Call[Any]]


def _one(reply: Any) -> bool:
    return bool(int(reply))


def ack_call(
    keys: LeaseKeys,
    lease: Lease,
    *,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
    script: str = "queue.ack",
) -> Call[bool]:
    """The ``queue.ack`` call (``queue.node_ack`` with DispatchKeys: the same ARGV); parses True
    (an ack either succeeds or raises). InvalidArgument for a lease of another queue."""
    task_id, token = held(script, lease, keys.tasks)
    rid = request_of(request_id)
    args = (task_id, token, rid, validate.arg(script, "request_ttl_ms", request_ttl_ms))
    return Call(script, keys.with_request(rid), args, _one)


def _nacked(reply: Any) -> Nacked:
    return Nacked(state=text(reply[0]), delay_ms=int(reply[1]))


def nack_call(
    keys: LeaseKeys,
    lease: Lease,
    *,
    delay_ms: int | None = None,
    reason: str | bytes = b"",
    backoff_base_ms: int = DEFAULT_BACKOFF_BASE_MS,
    backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
    script: str = "queue.nack",
    mode: int = NACK_FAILED,
) -> Call[Nacked]:
    """The ``queue.nack`` call (``queue.node_nack`` with DispatchKeys: the same ARGV; delay_ms
    None: the script's exponential backoff, so a delay is 0 or more). ``mode``:
    ``NACK_FAILED`` (a failed attempt; the 9th argument is then left out), ``NACK_GIVE_BACK``
    (ready now, the attempt not charged) or ``NACK_DEAD`` (into the dead letters now)."""
    task_id, token = held(script, lease, keys.tasks)
    validate.arg(script, "mode", mode)
    delay = -1 if delay_ms is None else validate.arg(script, "delay_ms", delay_ms, lo=0)
    rid = request_of(request_id)
    args = (
        task_id,
        token,
        delay,
        validate.arg(script, "reason", reason),
        validate.arg(script, "backoff_base_ms", backoff_base_ms),
        validate.arg(script, "backoff_max_ms", backoff_max_ms),
        rid,
        validate.arg(script, "request_ttl_ms", request_ttl_ms),
        *((mode,) if mode != NACK_FAILED else ()),
    )
    return Call(script, keys.with_request(rid), args, _nacked)


def extend_call(
    keys: LeaseKeys, lease: Lease, lease_ms: int, *, script: str = "queue.extend"
) -> Call[int]:
    """The ``queue.extend`` call (``queue.node_extend`` with DispatchKeys: the same ARGV); parses
    the new deadline (server ms)."""
    task_id, token = held(script, lease, keys.tasks)
    args = (task_id, token, validate.arg(script, "lease_ms", lease_ms))
    return Call(script, keys.with_request(b""), args, int)


def wake_lists(wake: bytes | Waiting) -> list[bytes]:
    """What a blocked take BLPOPs: the plain queue's wake list, or a node worker's lists."""
    return [wake] if isinstance(wake, bytes) else list(wake.lists)


def pass_on_target(wake: bytes | Waiting, popped: Any) -> bytes | None:
    """Where a blocked take passes on what BLPOP ``popped`` (None: nowhere)."""
    return None if isinstance(wake, bytes) else wake.pass_on(popped)


class Waiting(Protocol):
    """How a blocked take waits when one list is not enough (a node queue's ``NodeWait``):
    BLPOP on ``lists``; a popped signal meant for another waiter is passed on to the list
    ``pass_on`` names."""

    @property
    def lists(self) -> tuple[bytes, ...]:
        """The lists to BLPOP, in order."""
        ...

    def pass_on(self, popped: Any) -> bytes | None:
        """The list to pass ``popped`` (BLPOP's reply) on to, or None."""
        ...


def pass_on_commands(key: bytes, signal: bytes) -> tuple[tuple[Any, ...], ...]:
    """The commands that pass a node's ``signal`` on to its own wake list ``key``, bounded as
    the queue scripts bound their wake lists (``wake_max`` entries, ``wake_ttl_ms``: the limits
    of lua/include/queue_limits.j2, ``contract.limit``)."""
    return blocking.pass_on_commands(
        key, signal, contract.limit("queue", "wake_max"), contract.limit("queue", "wake_ttl_ms")
    )


def poll_wait_ms(remaining_s: float, next_due_ms: int | None, poll_ms: int) -> float:
    """How long a blocked dequeue waits on the wake list before asking the script again, in ms:
    at most ``poll_ms``, until the next delayed task is due, and the caller's time left. The
    ``BLPOP`` timeout sent for it is ``luasched.blocking.block_timeout_s``'s (never below 2 ms,
    never past the client's socket timeout)."""
    wait = min(remaining_s * 1000, poll_ms)
    if next_due_ms is not None:
        wait = min(wait, next_due_ms)
    return wait


def remaining_ms(deadline: float) -> int:
    """Whole ms left until the monotonic ``deadline`` (at least 0)."""
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


def blocking_take(
    call: TakeCall,
    wake: bytes | Waiting,
    block_ms: int,
    ack: Lease | None,
    request_id: str | bytes | None,
    shape: str,
    poll_ms: int,
) -> Loop[Any]:
    """The blocking take (``block_ms`` > 0) of ``call`` (a dequeue script call, by wait_ms, ack,
    request id and shape), as a loop of steps (``luasched.loops``; driven by ``Queue`` and
    ``AsyncQueue``): the script registers the waiter, the wait is on ``wake`` (the plain
    queue's wake list, or a node worker's two lists: then a signal of another node is passed on
    to that node's own list) for at most ``poll_ms`` or until the next delayed task is due, and
    the script decides again, until ``block_ms`` is over. The lease (``"one"``, or
    None) or leases (``"many"``, or [])."""
    rid = request_of(request_id)
    deadline = time.monotonic() + block_ms / 1000
    while True:
        reply: Dequeued = yield Run(call(remaining_ms(deadline), ack, rid, "reply"))
        if reply.leases:
            return reply.leases[0] if shape == "one" else list(reply.leases)
        if ack is not None:  # acked (and recorded under rid): the next tries only take
            ack, rid = None, new_request_id()
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return None if shape == "one" else []
        wait_ms = poll_wait_ms(remaining_s, reply.next_due_ms, poll_ms)
        popped = yield Wait(tuple(wake_lists(wake)), wait_ms)
        target = pass_on_target(wake, popped)
        if target is not None:
            yield Send(pass_on_commands(target, to_bytes(popped[1])))


def take_plan(
    call: TakeCall,
    wake: bytes | Waiting,
    block_ms: int,
    ack: Lease | None,
    request_id: str | bytes | None,
    shape: str,
    poll_ms: int,
    client: Any,
) -> Call[Any] | Loop[Any]:
    """What a take of ``call`` runs: with ``block_ms`` <= 0 one call (also what a pipeline
    queues), else ``blocking_take``'s loop, which needs a client to block on (``client`` None,
    a pipeline: ValueError). The sync and asyncio queues run the one or drive the other."""
    if block_ms <= 0:
        return call(0, ack, request_id, shape)
    if client is None:
        raise ValueError("a blocking dequeue cannot be queued in a pipeline")
    return blocking_take(call, wake, block_ms, ack, request_id, shape, poll_ms)
