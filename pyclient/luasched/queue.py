"""Task queues: ``queue.*`` scripts (lua/queue/) and their wrapper ``Queue`` (``s.queue(name)``).

A queue holds tasks (an id and a payload, both any bytes) that workers lease one at a time or in
batches. Taking a task and locking it is one script call (``dequeue``): a task is never leased to
two workers at once, and a lease that its worker lets lapse (it died, it hung) puts the task back
(an expired lease is a failed attempt). Every lease carries a fencing token that only grows per
queue: ``ack``, ``nack`` and ``extend`` with a token that is no longer current are refused with
``StaleLease``, and storage a worker writes to can refuse a smaller token than one it has seen.

Guarantees (docs/queue.md has the details, the key layout and the score's bit budget):

* Priorities -512..511, higher first; FIFO within a priority. Delays and lease deadlines are the
  server's clock; callers pass relative durations.
* ``enqueue`` is idempotent by task id; ``enqueue``, ``dequeue``, ``ack`` and ``nack`` take a
  request id (drawn here with ``secrets``), so a client retry after a lost reply acts once.
* Finished tasks are removed on ack; failed ones are retried with exponential backoff, then moved
  to the dead letters (``requeue_dead`` brings one back).

The call builders below are shared by the sync, asyncio and pipeline wrappers; they hold no
decision, only the shape of KEYS/ARGV and of the reply.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from luasched import blocking, validate
from luasched.errors import InvalidArgument
from luasched.keys import Namespace, to_bytes
from luasched.loops import Loop, Run, Send, Wait, drive
from luasched.pick import RANDOM_LIMIT, RandomSource, default_rng
from luasched.render import MAX_BATCH_LIMIT, MAX_KEY_BYTES_LIMIT
from luasched.scripts import Call
from luasched.slots import Runner

__all__ = [
    "DEFAULT_BACKOFF_BASE_MS",
    "DEFAULT_BACKOFF_MAX_MS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_POLL_MS",
    "DEFAULT_REQUEST_TTL_MS",
    "DISPATCH_KEY_KINDS",
    "DISPATCH_REGISTRY_KEYS",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "NACK_DEAD",
    "NACK_FAILED",
    "NACK_GIVE_BACK",
    "QUEUE_KEY_KINDS",
    "STRATEGIES",
    "Dequeued",
    "DispatchKeys",
    "DispatchStats",
    "Dispatched",
    "Enqueued",
    "Lease",
    "Nacked",
    "NodeCounts",
    "NodeQueue",
    "Queue",
    "QueueKeys",
    "QueueStats",
    "Redispatched",
    "RequeuedDispatched",
    "ack_call",
    "check_eviction_policy",
    "check_queue_options",
    "check_take",
    "dequeue_call",
    "dispatch_call",
    "dispatch_requeue_dead_call",
    "dispatch_stats_call",
    "enqueue_call",
    "extend_call",
    "nack_call",
    "new_request_id",
    "node_ack_call",
    "node_dequeue_call",
    "node_extend_call",
    "node_nack_call",
    "node_take",
    "redispatch_call",
    "requeue_dead_call",
    "stats_call",
]

MIN_PRIORITY = -512
MAX_PRIORITY = 511
#: A queue name is 1..MAX_QUEUE_NAME_BYTES bytes (the tail of its key names).
MAX_QUEUE_NAME_BYTES = 1024
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

#: The KEYS of every ``queue.*`` script, in order: ``luasched:{ns}:q:<kind>:<queue>``, then the
#: request key ``luasched:{ns}:q:req:<request_id>:<queue>`` (lua/include/queue.lua.j2).
QUEUE_KEY_KINDS: tuple[str, ...] = (
    "ready",  # ZSET task ids by (511 - priority) * 2^43 + seq
    "delayed",  # ZSET task ids by due time (server ms)
    "leased",  # ZSET task ids by lease deadline (server ms)
    "dead",  # ZSET dead letters by time of death (server ms)
    "tasks",  # HASH "p"+id payload, "m"+id meta, "r"+id reason, "seq", "fence"
    "wake",  # LIST wake-up signals for blocked dequeuers
    "waiting",  # STRING present while a dequeuer blocks
)


def new_request_id() -> bytes:
    """A fresh random request id (32 hex digits)."""
    return secrets.token_hex(16).encode()


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one queue of a namespace (built once per ``Queue``)."""

    namespace: Namespace
    queue: bytes
    fixed: tuple[bytes, ...]

    @classmethod
    def of(cls, namespace: Namespace, queue: str | bytes) -> QueueKeys:
        """The keys of ``queue`` (1..1024 bytes, any bytes) in ``namespace``; InvalidArgument
        naming ``name`` for anything else."""
        name = validate.key_bytes("name", queue, 1, MAX_QUEUE_NAME_BYTES)
        fixed = tuple(
            namespace.prefix + b"q:" + kind.encode() + b":" + name for kind in QUEUE_KEY_KINDS
        )
        return cls(namespace, name, fixed)

    def with_request(self, request_id: bytes) -> tuple[bytes, ...]:
        """The 8 KEYS of a call with ``request_id`` (b"": none; the key is then unused)."""
        return (*self.fixed, self.namespace.prefix + b"q:req:" + request_id + b":" + self.queue)

    @property
    def wake(self) -> bytes:
        """The list blocked dequeuers BLPOP."""
        return self.fixed[5]

    @property
    def tasks(self) -> bytes:
        """The queue's task hash: what a ``Lease`` of this queue records as its ``queue``."""
        return self.fixed[4]


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
class Enqueued:
    """What ``enqueue`` did: ``created`` False means the id existed and nothing changed; ``state``
    is then its state (``ready``, ``delayed``, ``leased``, ``dead``), else ``ready``/``delayed``."""

    created: bool
    state: str


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


@dataclass(frozen=True)
class QueueStats:
    """Counts of a queue at ``now_ms`` (server clock).

    ``oldest_ready_age_ms``: how long the longest-waiting ready task has been ready (None: none
    ready). ``next_due_ms``: ms until the next delayed task is due (0: due now; None: none).
    Expired leases count as leased, and due delayed tasks as delayed, until a dequeue moves them.
    """

    now_ms: int
    ready: int
    delayed: int
    leased: int
    dead: int
    oldest_ready_age_ms: int | None
    next_due_ms: int | None


def _optional(value: Any) -> int | None:
    number = int(value)
    return None if number < 0 else number


def _request(request_id: str | bytes | None) -> bytes:
    return validate.request_id("request_id", request_id, new_request_id)


def _held(script: str, lease: object, queue: bytes) -> tuple[bytes, int]:
    """The task id and token of ``lease`` (a Lease of the queue whose task hash is ``queue``)."""
    held = validate.lease("lease", lease, queue)
    task_id = validate.arg(script, "task_id", held.task_id, name="lease.task_id")
    return task_id, validate.arg(script, "token", held.token, name="lease.token")


def _max_attempts(script: str, value: object) -> int:
    return validate.arg(script, "max_attempts", value)  # type: ignore[no-any-return]


def check_queue_options(
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff_base_ms: int = DEFAULT_BACKOFF_BASE_MS,
    backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
    poll_ms: int = DEFAULT_POLL_MS,
    **others: Any,
) -> None:
    """Check a queue's options (``Queue``, ``AsyncQueue``, ``sharded_queue``) before any I/O;
    InvalidArgument naming the first bad one. ``others`` (rng, client...) are not checked."""
    _max_attempts("queue.enqueue", max_attempts)
    validate.arg("queue.nack", "backoff_base_ms", backoff_base_ms)
    validate.arg("queue.nack", "backoff_max_ms", backoff_max_ms)
    validate.arg("queue.enqueue", "request_ttl_ms", request_ttl_ms)
    validate.arg("queue.dequeue", "lease_ms", poll_ms, name="poll_ms")


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


def _enqueued(reply: Any) -> Enqueued:
    return Enqueued(created=bool(int(reply[0])), state=_text(reply[1]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def enqueue_call(
    keys: QueueKeys,
    task_id: str | bytes,
    payload: str | bytes,
    *,
    priority: int = 0,
    delay_ms: int = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
) -> Call[Enqueued]:
    """The ``queue.enqueue`` call (request_id None: a fresh random one; b"": none).
    InvalidArgument for any argument out of the script's range (``luasched.validate``)."""
    script = "queue.enqueue"
    rid = _request(request_id)
    args = (
        validate.arg(script, "task_id", task_id),
        validate.arg(script, "payload", payload),
        validate.arg(script, "priority", priority),
        validate.arg(script, "delay_ms", delay_ms),
        _max_attempts(script, max_attempts),
        rid,
        validate.arg(script, "request_ttl_ms", request_ttl_ms),
    )
    return Call("queue.enqueue", keys.with_request(rid), args, _enqueued)


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
    return Dequeued(leases, None if leases else _optional(reply[0]))


def _first_lease(reply: Any, queue: bytes = b"") -> Lease | None:
    leases = _dequeued(reply, queue).leases
    return leases[0] if leases else None


def _lease_list(reply: Any, queue: bytes = b"") -> list[Lease]:
    return list(_dequeued(reply, queue).leases)


_SHAPES: dict[str, Any] = {"reply": _dequeued, "one": _first_lease, "many": _lease_list}


def _shape(shape: str, queue: bytes) -> Callable[[Any], Any]:
    """The reply parser of a take: ``shape`` of the reply, leases of the queue ``queue``."""
    parse = _SHAPES[shape]
    return lambda reply: parse(reply, queue)


def dequeue_call(
    keys: QueueKeys,
    worker_id: str | bytes,
    count: int,
    lease_ms: int,
    *,
    wait_ms: int = 0,
    ack: Lease | None = None,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
    shape: str = "reply",
) -> Call[Any]:
    """The ``queue.dequeue`` call: take up to ``count``, acking ``ack`` first if given.

    ``shape`` says how the reply is parsed: ``reply`` (a Dequeued), ``one`` (Lease or None),
    ``many`` (a list of Lease).
    """
    script = "queue.dequeue"
    ack_task_id, ack_token = (b"", 0) if ack is None else _held("queue.ack", ack, keys.tasks)
    rid = _request(request_id)
    args = (
        validate.arg(script, "worker_id", worker_id),
        validate.arg(script, "count", count, hi=MAX_BATCH_LIMIT),
        validate.arg(script, "lease_ms", lease_ms),
        validate.arg(script, "wait_ms", wait_ms),
        ack_task_id,
        ack_token,
        rid,
        validate.arg(script, "request_ttl_ms", request_ttl_ms),
    )
    return Call(script, keys.with_request(rid), args, _shape(shape, keys.tasks))


#: A dequeue script call by (wait_ms, ack, request id, reply shape): what a blocking take repeats.
TakeCall = Callable[[int, Lease | None, str | bytes | None, str], Call[Any]]


def _one(reply: Any) -> bool:
    return bool(int(reply))


def ack_call(
    keys: QueueKeys | DispatchKeys,
    lease: Lease,
    *,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
    script: str = "queue.ack",
) -> Call[bool]:
    """The ``queue.ack`` call (``queue.node_ack`` with DispatchKeys: the same ARGV); parses True
    (an ack either succeeds or raises). InvalidArgument for a lease of another queue."""
    task_id, token = _held(script, lease, keys.tasks)
    rid = _request(request_id)
    args = (task_id, token, rid, validate.arg(script, "request_ttl_ms", request_ttl_ms))
    return Call(script, keys.with_request(rid), args, _one)


def _nacked(reply: Any) -> Nacked:
    return Nacked(state=_text(reply[0]), delay_ms=int(reply[1]))


def nack_call(
    keys: QueueKeys | DispatchKeys,
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
    task_id, token = _held(script, lease, keys.tasks)
    validate.arg(script, "mode", mode)
    delay = -1 if delay_ms is None else validate.arg(script, "delay_ms", delay_ms, lo=0)
    rid = _request(request_id)
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
    keys: QueueKeys | DispatchKeys, lease: Lease, lease_ms: int, *, script: str = "queue.extend"
) -> Call[int]:
    """The ``queue.extend`` call (``queue.node_extend`` with DispatchKeys: the same ARGV); parses
    the new deadline (server ms)."""
    task_id, token = _held(script, lease, keys.tasks)
    args = (task_id, token, validate.arg(script, "lease_ms", lease_ms))
    return Call(script, keys.with_request(b""), args, int)


def _requeued(reply: Any) -> str:
    return _text(reply)


def requeue_dead_call(keys: QueueKeys, task_id: str | bytes) -> Call[str]:
    """The ``queue.requeue_dead`` call; parses ``requeued`` or where the task is."""
    script = "queue.requeue_dead"
    args = (validate.arg(script, "task_id", task_id),)
    return Call(script, keys.with_request(b""), args, _requeued)


def _stats(reply: Any) -> QueueStats:
    now_ms, ready, delayed, leased, dead, oldest, next_due = (int(value) for value in reply)
    return QueueStats(now_ms, ready, delayed, leased, dead, _optional(oldest), _optional(next_due))


def stats_call(keys: QueueKeys) -> Call[QueueStats]:
    """The ``queue.stats`` call."""
    return Call("queue.stats", keys.with_request(b""), (), _stats)


# --------------------------------------------------------------------------------------------
# Dispatch to nodes (queue.dispatch, queue.node_*, queue.redispatch; docs/queue.md "Dispatch to
# nodes"). A queue's dispatched tasks live in their own keys (``luasched:{ns}:d:<kind>:<queue>``),
# beside the registry and pick keys the scripts charge and read.

#: The strategies of ``queue.dispatch`` (the picks of the same names, and ``slot``: the live
#: owner of a routing key's hash slot, as ``s.slots.owner``).
Strategy = Literal["slot", "least_loaded", "two_choices", "weighted", "round_robin"]
STRATEGIES: tuple[str, ...] = ("slot", "least_loaded", "two_choices", "weighted", "round_robin")

#: The first 7 KEYS of the dispatch scripts: ``luasched:{ns}:d:<kind>:<queue>`` then the request
#: key ``luasched:{ns}:d:req:<request_id>:<queue>`` (lua/include/dispatch.lua.j2).
DISPATCH_KEY_KINDS: tuple[str, ...] = (
    "ready",  # ZSET (score 0) hex(node) ":" 16-digit score, task id: one node = one lex range
    "delayed",  # ZSET task ids by due time (server ms)
    "leased",  # ZSET task ids by lease deadline (server ms)
    "dead",  # ZSET dead letters by time of death
    "tasks",  # HASH p/m/n/k/r + id (payload, meta, route, routing key, reason), seq, fence
    "assigned",  # ZSET (score 0) hex(node) ":" task id of leased and delayed tasks
)
#: KEYS 8..19 of the dispatch scripts: the registry and pick keys (``Namespace.key`` names).
DISPATCH_REGISTRY_KEYS: tuple[str, ...] = (
    "nodes:index",
    "nodes:id",
    "nodes:weight",
    "nodes:capacity",
    "nodes:deadline",
    "nodes:draining",
    "slots:owner",
    "pick:load",
    "pick:util",
    "pick:ring",
    "pick:state",
    "pick:weighted",
)


@dataclass(frozen=True)
class DispatchKeys:
    """The keys of the dispatch side of one queue (built once per ``Queue``)."""

    namespace: Namespace
    queue: bytes
    fixed: tuple[bytes, ...]
    registry: tuple[bytes, ...]

    @classmethod
    def of(cls, namespace: Namespace, queue: bytes) -> DispatchKeys:
        fixed = tuple(
            namespace.prefix + b"d:" + kind.encode() + b":" + queue for kind in DISPATCH_KEY_KINDS
        )
        registry = tuple(namespace.key(name) for name in DISPATCH_REGISTRY_KEYS)
        return cls(namespace, queue, fixed, registry)

    @property
    def tasks(self) -> bytes:
        """The dispatched tasks' hash: what a node queue's ``Lease`` records as its ``queue``."""
        return self.fixed[4]

    def with_request(self, request_id: bytes) -> tuple[bytes, ...]:
        """The 21 KEYS of a call with ``request_id`` (b"": none; the key is then unused): the 7
        dispatch queue keys, the 12 registry and pick keys, the wake list and the waiters zset.
        Every key a dispatch script touches is one of them."""
        request = self.namespace.prefix + b"d:req:" + request_id + b":" + self.queue
        return (*self.fixed, request, *self.registry, self.wake, self.waiters)

    @property
    def wake(self) -> bytes:
        """``luasched:{ns}:d:wake:<queue>``: the signals (hex node ids) of blocked node workers."""
        return self.namespace.prefix + b"d:wake:" + self.queue

    @property
    def waiters(self) -> bytes:
        """``luasched:{ns}:d:waiters:<queue>``: hex node ids by the server ms their worker waits."""
        return self.namespace.prefix + b"d:waiters:" + self.queue

    def node_wake(self, node_hex: bytes) -> bytes:
        """``luasched:{ns}:d:node-wake:<hex node id>:<queue>``: the own wake list of a node's
        blocked workers, where a worker of another node passes on the node's signal (no script
        touches it)."""
        return self.namespace.prefix + b"d:node-wake:" + node_hex + b":" + self.queue

    def node_wait(self, node_id: bytes) -> NodeWait:
        """How a blocked worker of ``node_id`` waits (``NodeWait``)."""
        node_hex = node_id.hex().encode()
        return NodeWait(self, node_hex, (self.node_wake(node_hex), self.wake))


@dataclass(frozen=True)
class NodeWait:
    """How a blocked worker of one node waits: BLPOP on ``lists`` (the node's own list, then the
    queue's wake list). The scripts push a node's hex id on the queue's wake list when it got a
    task while a worker of it waited; a worker that pops the signal of another node passes it on
    to that node's own list (``pass_on``), so every signal reaches a worker of its node."""

    keys: DispatchKeys
    node_hex: bytes
    lists: tuple[bytes, ...]

    def pass_on(self, popped: Any) -> bytes | None:
        """The own list of the node that ``popped`` (BLPOP's reply) names, when it is another
        node's signal from the queue's wake list; else None (nothing to pass on)."""
        if not popped:
            return None
        key, signal = to_bytes(popped[0]), to_bytes(popped[1])
        if key != self.keys.wake or signal == self.node_hex or not _is_hex_id(signal):
            return None
        return self.keys.node_wake(signal)


def _is_hex_id(signal: bytes) -> bool:
    """Whether ``signal`` is a node id as the scripts write it: lowercase hex, whole bytes."""
    return len(signal) % 2 == 0 and bool(signal) and all(c in b"0123456789abcdef" for c in signal)


def wake_lists(wake: bytes | NodeWait) -> list[bytes]:
    """What a blocked dequeue BLPOPs: the plain queue's wake list, or a node worker's lists."""
    return [wake] if isinstance(wake, bytes) else list(wake.lists)


def pass_on_target(wake: bytes | NodeWait, popped: Any) -> bytes | None:
    """Where a blocked dequeue passes on what BLPOP ``popped`` (None: nowhere)."""
    return None if isinstance(wake, bytes) else wake.pass_on(popped)


#: The wake lists' bounds, as lua/include/queue_limits.j2's wake_max and wake_ttl_ms.
WAKE_MAX = 16
WAKE_TTL_MS = 2_000


def pass_on_commands(key: bytes, signal: bytes) -> tuple[tuple[Any, ...], ...]:
    """The commands that pass a node's ``signal`` on to its own wake list ``key``, bounded as
    the scripts bound the wake lists (``WAKE_MAX`` entries, ``WAKE_TTL_MS``)."""
    return blocking.pass_on_commands(key, signal, WAKE_MAX, WAKE_TTL_MS)


@dataclass(frozen=True)
class Dispatched:
    """What ``dispatch`` did: ``created`` False means the id existed and nothing changed (its
    ``state`` and ``node`` are then the existing task's); else queued for ``node``, ``state``
    ``ready`` or ``delayed``."""

    created: bool
    state: str
    node: bytes


@dataclass(frozen=True)
class Redispatched:
    """What one ``redispatch`` call did: ``moved`` tasks, ``more`` True if the node still has
    tasks (call again), ``node_state`` ``dead``, ``draining``, ``absent`` or ``live`` (then
    nothing moved: a live, non-draining node keeps its tasks)."""

    moved: int
    more: bool
    node_state: str


@dataclass(frozen=True)
class RequeuedDispatched:
    """What ``requeue_dead_dispatched`` did: ``state`` ``requeued`` (dispatched again, ready now
    on ``node``), or the state of a task that was not dead (``ready``, ``delayed``, ``leased``)
    or ``absent``; ``node`` is then None and nothing changed."""

    state: str
    node: bytes | None

    @property
    def requeued(self) -> bool:
        """Whether the dead task was dispatched again."""
        return self.state == "requeued"


@dataclass(frozen=True)
class NodeCounts:
    """One node's share of a dispatch queue: ``ready`` tasks, ``assigned`` (leased or delayed)
    and its ``load`` (pick:load; None when the node is not registered)."""

    ready: int
    assigned: int
    load: int | None


@dataclass(frozen=True)
class DispatchStats:
    """Counts of a queue's dispatched tasks at ``now_ms`` and per node asked about."""

    now_ms: int
    ready: int
    delayed: int
    leased: int
    dead: int
    nodes: dict[bytes, NodeCounts]


def _dispatched(reply: Any) -> Dispatched:
    return Dispatched(created=bool(int(reply[0])), state=_text(reply[1]), node=bytes(reply[2]))


def dispatch_call(
    keys: DispatchKeys,
    task_id: str | bytes,
    payload: str | bytes,
    rng: RandomSource,
    *,
    strategy: str = "least_loaded",
    routing_key: str | bytes | None = None,
    cost: int = 1,
    priority: int = 0,
    delay_ms: int = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
) -> Call[Dispatched]:
    """The ``queue.dispatch`` call (three random integers from ``rng``). InvalidArgument naming
    ``routing_key`` when strategy ``slot`` has none."""
    script = "queue.dispatch"
    if strategy == "slot" and routing_key is None:
        raise InvalidArgument("routing_key must be given with strategy 'slot'")
    key = b"" if routing_key is None else routing_key
    rid = _request(request_id)
    args = (
        validate.arg(script, "task_id", task_id),
        validate.arg(script, "payload", payload),
        validate.arg(script, "strategy", strategy),
        validate.arg(script, "routing_key", key, name="routing_key", hi=MAX_KEY_BYTES_LIMIT),
        validate.arg(script, "cost", cost),
        validate.arg(script, "priority", priority),
        validate.arg(script, "delay_ms", delay_ms),
        _max_attempts(script, max_attempts),
        rng.randrange(RANDOM_LIMIT),
        rng.randrange(RANDOM_LIMIT),
        rng.randrange(RANDOM_LIMIT),
        rid,
        validate.arg(script, "request_ttl_ms", request_ttl_ms),
    )
    return Call(script, keys.with_request(rid), args, _dispatched)


def node_dequeue_call(
    keys: DispatchKeys,
    node_id: str | bytes,
    worker_id: str | bytes,
    count: int,
    lease_ms: int,
    *,
    wait_ms: int = 0,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
    shape: str = "reply",
) -> Call[Any]:
    """The ``queue.node_dequeue`` call; ``shape`` as in ``dequeue_call``. ``wait_ms`` 0 sends
    the 6 arguments of a non-blocking call (the 7th, wait_ms, is optional)."""
    script = "queue.node_dequeue"
    rid = _request(request_id)
    args: tuple[Any, ...] = (
        validate.arg(script, "node_id", node_id),
        validate.arg(script, "worker_id", worker_id),
        validate.arg(script, "count", count, hi=MAX_BATCH_LIMIT),
        validate.arg(script, "lease_ms", lease_ms),
        rid,
        validate.arg(script, "request_ttl_ms", request_ttl_ms),
    )
    if validate.arg("queue.dequeue", "wait_ms", wait_ms):
        args = (*args, wait_ms)
    return Call(script, keys.with_request(rid), args, _shape(shape, keys.tasks))


def node_take(
    keys: DispatchKeys,
    node_id: bytes,
    worker_id: str | bytes,
    count: int,
    lease_ms: int,
    request_ttl_ms: int,
) -> TakeCall:
    """The ``node_dequeue_call`` of one take (``NodeQueue.dequeue``/``dequeue_many``), by wait_ms,
    request id and shape, for ``Queue._blocking_take`` (a node queue acks nothing while taking)."""

    def call(wait_ms: int, ack: Lease | None, rid: str | bytes | None, shape: str) -> Call[Any]:
        return node_dequeue_call(
            keys,
            node_id,
            worker_id,
            count,
            lease_ms,
            wait_ms=wait_ms,
            request_id=rid,
            request_ttl_ms=request_ttl_ms,
            shape=shape,
        )

    return call


def node_ack_call(
    keys: DispatchKeys,
    lease: Lease,
    *,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
) -> Call[bool]:
    """The ``queue.node_ack`` call; parses True."""
    return ack_call(
        keys, lease, request_id=request_id, request_ttl_ms=request_ttl_ms, script="queue.node_ack"
    )


def node_nack_call(
    keys: DispatchKeys,
    lease: Lease,
    *,
    delay_ms: int | None = None,
    reason: str | bytes = b"",
    backoff_base_ms: int = DEFAULT_BACKOFF_BASE_MS,
    backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
    mode: int = NACK_FAILED,
) -> Call[Nacked]:
    """The ``queue.node_nack`` call (delay_ms None: the script's exponential backoff; ``mode``
    as in ``nack_call``)."""
    return nack_call(
        keys,
        lease,
        delay_ms=delay_ms,
        reason=reason,
        backoff_base_ms=backoff_base_ms,
        backoff_max_ms=backoff_max_ms,
        request_id=request_id,
        request_ttl_ms=request_ttl_ms,
        script="queue.node_nack",
        mode=mode,
    )


def node_extend_call(keys: DispatchKeys, lease: Lease, lease_ms: int) -> Call[int]:
    """The ``queue.node_extend`` call; parses the new deadline (server ms)."""
    return extend_call(keys, lease, lease_ms, script="queue.node_extend")


def _redispatched(reply: Any) -> Redispatched:
    return Redispatched(moved=int(reply[0]), more=bool(int(reply[1])), node_state=_text(reply[2]))


def redispatch_call(
    keys: DispatchKeys, node_id: str | bytes, rng: RandomSource, limit: int = 100
) -> Call[Redispatched]:
    """The ``queue.redispatch`` call (one random seed from ``rng``)."""
    script = "queue.redispatch"
    args = (
        validate.arg(script, "node_id", node_id),
        validate.arg(script, "limit", limit),
        rng.randrange(RANDOM_LIMIT),
    )
    return Call(script, keys.with_request(b""), args, _redispatched)


def _requeued_dispatched(reply: Any) -> RequeuedDispatched:
    state = _text(reply[0])
    return RequeuedDispatched(state=state, node=bytes(reply[1]) if state == "requeued" else None)


def dispatch_requeue_dead_call(
    keys: DispatchKeys, task_id: str | bytes, rng: RandomSource
) -> Call[RequeuedDispatched]:
    """The ``queue.dispatch_requeue_dead`` call (one random seed from ``rng``)."""
    script = "queue.dispatch_requeue_dead"
    args = (validate.arg(script, "task_id", task_id), rng.randrange(RANDOM_LIMIT))
    return Call(script, keys.with_request(b""), args, _requeued_dispatched)


def dispatch_stats_call(
    keys: DispatchKeys, nodes: tuple[str | bytes, ...] | list[str | bytes]
) -> Call[DispatchStats]:
    """The ``queue.node_stats`` call for ``nodes`` (a list or tuple of 1..100 node ids)."""
    ids: tuple[bytes, ...] = validate.many("queue.node_stats", "node_id", nodes, name="nodes")

    def parse(reply: Any) -> DispatchStats:
        values = [int(value) for value in reply]
        per_node = {
            node: NodeCounts(
                ready=values[5 + 3 * index],
                assigned=values[6 + 3 * index],
                load=None if values[7 + 3 * index] < 0 else values[7 + 3 * index],
            )
            for index, node in enumerate(ids)
        }
        now_ms, ready, delayed, leased, dead = values[:5]
        return DispatchStats(now_ms, ready, delayed, leased, dead, per_node)

    return Call("queue.node_stats", keys.with_request(b""), ids, parse)


EVICTING_POLICIES = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})


def policy_warning(policy: str) -> str | None:
    """The warning for a ``maxmemory-policy`` that could evict queue keys, or None."""
    if policy == "noeviction" or policy.startswith("volatile-"):
        return None
    return (
        f"the server's maxmemory-policy is {policy!r}: under memory pressure Redis may evict "
        "luasched queue keys (tasks, leases, fencing counters) and lose tasks; use noeviction "
        "(or a volatile-* policy) on servers that hold queues"
    )


def _policy_of(config: Any) -> str | None:
    if isinstance(config, dict):
        value = config.get("maxmemory-policy")
        if value is None:  # RedisCluster may answer per node
            for entry in config.values():
                if isinstance(entry, dict) and "maxmemory-policy" in entry:
                    value = entry["maxmemory-policy"]
                    break
        if value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def check_eviction_policy(client: Any, namespace: Namespace) -> str | None:
    """Warn (``warnings.warn``) when the server holding ``namespace`` could evict its keys.

    Returns the policy, or None when it could not be read (CONFIG not permitted, renamed...):
    then nothing is warned and nothing fails.
    """
    from luasched.scripts import is_cluster

    try:
        if is_cluster(client):
            node = client.get_node_from_key(namespace.prefix)
            config = client.config_get("maxmemory-policy", target_nodes=node)
        else:
            config = client.config_get("maxmemory-policy")
    except Exception:  # CONFIG may be refused (ACL, managed services): never fatal
        return None
    policy = _policy_of(config)
    message = policy and policy_warning(policy)
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return policy


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
    wake: bytes | NodeWait,
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
    rid = _request(request_id)
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


class Queue:
    """One task queue of a namespace (``s.queue(name)``).

    Every method is one script call, atomic on the server, that checks all its arguments first
    and changes nothing when it raises (``InvalidArgument``, ``StaleLease``, ``CorruptState``);
    a blocking ``dequeue`` is a loop of such calls around a BLPOP. Task ids, payloads and worker
    ids are any bytes (str is sent as UTF-8) and come back as bytes. Times are the server's
    clock; callers pass relative durations. Mutating calls take a ``request_id`` (None: a random
    one per call; b"": none): a replay with the same id within ``request_ttl_ms`` acts once.
    Needs a client that answers bytes (``decode_responses=False``, redis-py's default).
    """

    def __init__(
        self,
        runner: Runner,
        namespace: Namespace,
        name: str | bytes,
        *,
        client: Any = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base_ms: int = DEFAULT_BACKOFF_BASE_MS,
        backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS,
        request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
        poll_ms: int = DEFAULT_POLL_MS,
        rng: RandomSource | None = None,
    ) -> None:
        check_queue_options(max_attempts, backoff_base_ms, backoff_max_ms, request_ttl_ms, poll_ms)
        self._runner = runner
        self._client = client
        self.keys = QueueKeys.of(namespace, name)
        self.name = self.keys.queue
        self.dispatch_keys = DispatchKeys.of(namespace, self.name)
        self._rng = rng if rng is not None else default_rng()
        self.max_attempts = max_attempts
        self.backoff_base_ms = backoff_base_ms
        self.backoff_max_ms = backoff_max_ms
        self.request_ttl_ms = request_ttl_ms
        self.poll_ms = poll_ms

    def enqueue(
        self,
        task_id: str | bytes,
        payload: str | bytes = b"",
        *,
        priority: int = 0,
        delay_ms: int = 0,
        max_attempts: int | None = None,
        request_id: str | bytes | None = None,
    ) -> Enqueued:
        """Add a task, ready now or after ``delay_ms`` (server clock); idempotent by task id.

        A task id that exists (ready, delayed, leased or dead) is left as it is:
        ``created=False`` and its state. Priority -512..511, higher first, FIFO within a
        priority. ``max_attempts`` (default: the queue's) leases before the dead letters.
        O(log n). Raises InvalidArgument.
        """
        return self._runner.run(
            enqueue_call(
                self.keys,
                task_id,
                payload,
                priority=priority,
                delay_ms=delay_ms,
                max_attempts=self.max_attempts if max_attempts is None else max_attempts,
                request_id=request_id,
                request_ttl_ms=self.request_ttl_ms,
            )
        )

    def _call(
        self,
        worker_id: str | bytes,
        count: int,
        lease_ms: int,
        wait_ms: int,
        ack: Lease | None,
        request_id: str | bytes | None,
        shape: str,
    ) -> Call[Any]:
        return dequeue_call(
            self.keys,
            worker_id,
            count,
            lease_ms,
            wait_ms=wait_ms,
            ack=ack,
            request_id=request_id,
            request_ttl_ms=self.request_ttl_ms,
            shape=shape,
        )

    def _take(
        self,
        worker_id: str | bytes,
        count: int,
        lease_ms: int,
        block_ms: int,
        ack: Lease | None,
        request_id: str | bytes | None,
        shape: str,
    ) -> Any:
        check_take(worker_id, count, lease_ms, block_ms)

        def call(wait_ms: int, ack: Lease | None, rid: str | bytes | None, shape: str) -> Call[Any]:
            return self._call(worker_id, count, lease_ms, wait_ms, ack, rid, shape)

        return self._blocking_take(call, self.keys.wake, block_ms, ack, request_id, shape)

    def _blocking_take(
        self,
        call: TakeCall,
        wake: bytes | NodeWait,
        block_ms: int,
        ack: Lease | None,
        request_id: str | bytes | None,
        shape: str,
    ) -> Any:
        """The take of ``call`` (a dequeue script call, by wait_ms, ack, request id and shape):
        one call, or ``blocking_take`` when ``block_ms`` > 0."""
        if block_ms <= 0:  # one call (also what a pipeline queues)
            return self._runner.run(call(0, ack, request_id, shape))
        if self._client is None:
            raise ValueError("a blocking dequeue cannot be queued in a pipeline")
        loop = blocking_take(call, wake, block_ms, ack, request_id, shape, self.poll_ms)
        return drive(loop, self._runner.run, self._client)

    def dequeue(
        self,
        worker_id: str | bytes,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> Lease | None:
        """Take the next ready task and lease it to ``worker_id`` for ``lease_ms``, atomically.

        None when nothing is ready (after waiting up to ``block_ms``: the wait is a BLPOP on the
        queue's wake list, woken by enqueue, nack and promotion, and capped by the next delayed
        task's due time and ``poll_ms``; the script decides every time). The same call first
        promotes due delayed tasks and reclaims expired leases (bounded). O(log n).
        """
        return self._take(worker_id, 1, lease_ms, block_ms, None, request_id, "one")  # type: ignore[no-any-return]

    def dequeue_many(
        self,
        worker_id: str | bytes,
        n: int,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> list[Lease]:
        """Take up to ``n`` (1..config.max_batch) ready tasks in one call, best first."""
        return self._take(worker_id, n, lease_ms, block_ms, None, request_id, "many")  # type: ignore[no-any-return]

    def ack_and_dequeue(
        self,
        lease: Lease,
        worker_id: str | bytes,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> Lease | None:
        """Ack ``lease`` and take the next task in the same call (see ``ack`` and ``dequeue``).

        Raises StaleLease (and takes nothing) when ``lease`` is no longer held.
        """
        validate.lease("lease", lease, self.keys.tasks)  # None means no ack: refuse it
        return self._take(worker_id, 1, lease_ms, block_ms, lease, request_id, "one")  # type: ignore[no-any-return]

    def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish ``lease``'s task: it is removed from the queue. O(log n).

        Raises StaleLease when the lease is no longer held (finished already, or expired and
        leased again): the task belongs to the newer lease. A lease past its deadline that no
        dequeue has reclaimed yet is still held.
        """
        return self._runner.run(
            ack_call(self.keys, lease, request_id=request_id, request_ttl_ms=self.request_ttl_ms)
        )

    def nack(
        self,
        lease: Lease,
        delay_ms: int | None = None,
        reason: str | bytes = b"",
        *,
        request_id: str | bytes | None = None,
    ) -> Nacked:
        """Give ``lease``'s task back as a failed attempt.

        Ready again after ``delay_ms``, or (None) after min(backoff_max_ms, backoff_base_ms *
        2^(attempt-1)); after max_attempts leases it goes to the dead letters with ``reason``.
        O(log n). Raises StaleLease.
        """
        return self._runner.run(
            nack_call(
                self.keys,
                lease,
                delay_ms=delay_ms,
                reason=reason,
                backoff_base_ms=self.backoff_base_ms,
                backoff_max_ms=self.backoff_max_ms,
                request_id=request_id,
                request_ttl_ms=self.request_ttl_ms,
            )
        )

    def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move ``lease``'s deadline to the server's now + ``lease_ms``; the new deadline.

        Raises StaleLease. O(log n).
        """
        return self._runner.run(extend_call(self.keys, lease, lease_ms))

    def requeue_dead(self, task_id: str | bytes) -> bool:
        """Bring a dead-letter task back (ready now, attempts reset); False if it was not dead."""
        return self._runner.run(requeue_dead_call(self.keys, task_id)) == "requeued"

    def stats(self) -> QueueStats:
        """Counts (ready, delayed, leased, dead), oldest ready age, next due. Read-only."""
        return self._runner.run(stats_call(self.keys))

    # ----------------------------------------------------------------------------------------
    # Dispatch to nodes

    def dispatch(
        self,
        task_id: str | bytes,
        payload: str | bytes = b"",
        *,
        strategy: Strategy = "least_loaded",
        routing_key: str | bytes | None = None,
        cost: int = 1,
        priority: int = 0,
        delay_ms: int = 0,
        max_attempts: int | None = None,
        request_id: str | bytes | None = None,
    ) -> Dispatched:
        """Choose a node with ``strategy`` and queue the task for it, charging it ``cost``.

        One script: the pick (``slot``: the live owner of ``routing_key``'s slot; the others
        as ``s.pick.<strategy>``; capacities are respected by ``least_loaded`` and
        ``two_choices`` only), the charge and the enqueue into the node's own queue
        (``for_node(node)``). Idempotent by task id like ``enqueue``; a replay of
        ``request_id`` acts once. Raises NoNode, AllNodesFull, ScanLimitReached,
        InvalidArgument, CorruptState (nothing changed).
        """
        return self._runner.run(
            dispatch_call(
                self.dispatch_keys,
                task_id,
                payload,
                self._rng,
                strategy=strategy,
                routing_key=routing_key,
                cost=cost,
                priority=priority,
                delay_ms=delay_ms,
                max_attempts=self.max_attempts if max_attempts is None else max_attempts,
                request_id=request_id,
                request_ttl_ms=self.request_ttl_ms,
            )
        )

    def for_node(self, node_id: str | bytes) -> NodeQueue:
        """The queue of the tasks dispatched to ``node_id``: what its workers take and finish."""
        return NodeQueue(self, validate.arg("queue.node_dequeue", "node_id", node_id))

    def redispatch(self, node_id: str | bytes, limit: int = 100) -> Redispatched:
        """Move up to ``limit`` (1..100) tasks off a dead, draining or removed node.

        Each goes to a node chosen again with its own strategy; its leases are revoked (late
        acks refused), its cost moves with it. A live, non-draining node is left alone. Call
        again while ``more``. If a pick fails for the first task, raises (nothing changed).
        """
        return self._runner.run(redispatch_call(self.dispatch_keys, node_id, self._rng, limit))

    def requeue_dead_dispatched(self, task_id: str | bytes) -> RequeuedDispatched:
        """Dispatch a dead-letter dispatched task again: ready now, attempts reset, reason cleared.

        One script: the node is chosen with the task's own strategy and cost (``slot``: the live
        owner of its routing key's slot, as ``redispatch`` re-picks), charged the cost as
        ``dispatch`` charges, and the task queued for it (payload, priority, max_attempts kept).
        A task that is not dead is left as it is: the reply says its state (``node`` None).
        O(log n) plus the pick. Raises NoNode, AllNodesFull, ScanLimitReached, CorruptState
        (nothing changed: the task stays dead).
        """
        return self._runner.run(dispatch_requeue_dead_call(self.dispatch_keys, task_id, self._rng))

    def dispatch_stats(self, nodes: tuple[str | bytes, ...] | list[str | bytes]) -> DispatchStats:
        """Counts of the dispatched tasks, and ready/assigned/load of each of ``nodes`` (1..100)."""
        return self._runner.run(dispatch_stats_call(self.dispatch_keys, nodes))


class NodeQueue:
    """The tasks a queue dispatched to one node (``q.for_node(node_id)``).

    Its workers take tasks with ``dequeue``/``dequeue_many`` (leases with fencing tokens, as
    ``Queue.dequeue``; ``block_ms`` waits on the node's own wake list and the queue's,
    ``keys.node_wait``), keep long ones with ``extend`` and finish them with ``ack``/``nack``,
    which give the task's cost back to the node's load when the task leaves it (ack, dead letter;
    ``Queue.requeue_dead_dispatched`` dispatches a dead one again).
    """

    def __init__(self, queue: Queue, node_id: bytes) -> None:
        self.queue = queue
        self.node = node_id

    def _take(
        self,
        worker_id: str | bytes,
        count: int,
        lease_ms: int,
        block_ms: int,
        request_id: str | bytes | None,
        shape: str,
    ) -> Any:
        check_take(worker_id, count, lease_ms, block_ms)
        q = self.queue
        keys = q.dispatch_keys
        call = node_take(keys, self.node, worker_id, count, lease_ms, q.request_ttl_ms)
        return q._blocking_take(call, keys.node_wait(self.node), block_ms, None, request_id, shape)

    def dequeue(
        self,
        worker_id: str | bytes,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> Lease | None:
        """Take and lease the node's next ready task (None: none, after waiting up to
        ``block_ms``: a BLPOP on the node's wake list, woken by dispatch, nack, redispatch and
        promotion into this node's queue, capped by the next due time and ``poll_ms``, as
        ``Queue.dequeue``). Also promotes due delayed tasks and reclaims expired leases of the
        dispatch queue (bounded). O(log n)."""
        return self._take(worker_id, 1, lease_ms, block_ms, request_id, "one")  # type: ignore[no-any-return]

    def dequeue_many(
        self,
        worker_id: str | bytes,
        n: int,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> list[Lease]:
        """Take up to ``n`` of the node's ready tasks in one call, best first (``block_ms`` as
        in ``dequeue``)."""
        return self._take(worker_id, n, lease_ms, block_ms, request_id, "many")  # type: ignore[no-any-return]

    def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish the task and give its cost back to its node. Raises StaleLease."""
        return self.queue._runner.run(
            node_ack_call(
                self.queue.dispatch_keys,
                lease,
                request_id=request_id,
                request_ttl_ms=self.queue.request_ttl_ms,
            )
        )

    def nack(
        self,
        lease: Lease,
        delay_ms: int | None = None,
        reason: str | bytes = b"",
        *,
        request_id: str | bytes | None = None,
    ) -> Nacked:
        """A failed attempt: back in the node's queue (after the backoff), or a dead letter
        (its cost given back) after max_attempts. Raises StaleLease."""
        q = self.queue
        return q._runner.run(
            node_nack_call(
                q.dispatch_keys,
                lease,
                delay_ms=delay_ms,
                reason=reason,
                backoff_base_ms=q.backoff_base_ms,
                backoff_max_ms=q.backoff_max_ms,
                request_id=request_id,
                request_ttl_ms=q.request_ttl_ms,
            )
        )

    def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move ``lease``'s deadline to the server's now + ``lease_ms``; the new deadline.

        As ``Queue.extend``: a lease past its deadline that no dequeue of the dispatch queue has
        reclaimed yet is still held and live again after this call; the task stays on its node
        and keeps its charge. Raises StaleLease (finished, expired and taken again, or
        redispatched; nothing changed). O(log n).
        """
        return self.queue._runner.run(node_extend_call(self.queue.dispatch_keys, lease, lease_ms))

    def stats(self) -> NodeCounts:
        """This node's ready and assigned tasks and its load."""
        call = dispatch_stats_call(self.queue.dispatch_keys, (self.node,))
        node = self.node
        return self.queue._runner.run(
            Call(call.script, call.keys, call.args, lambda reply: call.parse(reply).nodes[node])
        )
