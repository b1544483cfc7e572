"""Dispatch to nodes: ``queue.dispatch``, ``queue.node_*``, ``queue.redispatch`` and their
wrapper ``NodeQueue`` (``q.for_node(node_id)``); docs/queue.md "Dispatch to nodes".

``Queue.dispatch`` picks a node (a strategy of ``luasched.pick``, or ``slot``: the live owner of
a routing key's hash slot) and queues the task for it, charging the node its cost, in one
script. A queue's dispatched tasks live in their own keys (``luasched:{ns}:d:<kind>:<queue>``),
beside the registry and pick keys the scripts charge and read; every KEYS layout here is the
manifest's (``luasched.contract``). A node's workers take, ack, nack and extend leases
exactly as on a plain queue (``luasched.leases``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from luasched import contract, validate
from luasched.contract import BoundKeys
from luasched.errors import InvalidArgument
from luasched.keys import Namespace, to_bytes
from luasched.leases import (
    DEFAULT_BACKOFF_BASE_MS,
    DEFAULT_BACKOFF_MAX_MS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_REQUEST_TTL_MS,
    NACK_FAILED,
    BoundQueueKeys,
    Lease,
    Nacked,
    TakeCall,
    ack_call,
    check_take,
    extend_call,
    max_attempts_arg,
    nack_call,
    request_of,
    take_shape,
    text,
)
from luasched.loops import Loop
from luasched.pick import RANDOM_LIMIT, RandomSource
from luasched.render import MAX_BATCH_LIMIT, MAX_KEY_BYTES_LIMIT
from luasched.scripts import Call

if TYPE_CHECKING:
    from luasched.queue import Queue, QueueCalls  # noqa: F401 (Queue: NodeQueue's base, a string)

#: The queue a node queue belongs to (``Queue``, ``AsyncQueue``).
Q = TypeVar("Q", bound="QueueCalls[Any]")

__all__ = [
    "DISPATCH_KEY_KINDS",  # noqa: F822 (module __getattr__: read from the manifest)
    "DISPATCH_REGISTRY_KEYS",  # noqa: F822 (module __getattr__: read from the manifest)
    "STRATEGIES",  # noqa: F822 (module __getattr__: read from the manifest)
    "DispatchKeys",
    "DispatchStats",
    "Dispatched",
    "NodeCounts",
    "NodeQueue",
    "NodeQueueCalls",
    "NodeWait",
    "Redispatched",
    "RequeuedDispatched",
    "Strategy",
    "dispatch_call",
    "dispatch_requeue_dead_call",
    "dispatch_stats_call",
    "node_ack_call",
    "node_dequeue_call",
    "node_extend_call",
    "node_nack_call",
    "node_take",
    "redispatch_call",
]

#: The strategies of ``queue.dispatch`` (the picks of the same names, and ``slot``: the live
#: owner of a routing key's hash slot, as ``s.slots.owner``), for type checkers. At run time the
#: choices are the manifest's (``STRATEGIES``); a test checks that both name the same strategies.
Strategy = Literal["slot", "least_loaded", "two_choices", "weighted", "round_robin"]

#: The script whose KEYS layout every dispatch script shares (lua/include/dispatch_keys.j2).
DISPATCH_SCRIPT = "queue.dispatch"


def __getattr__(name: str) -> Any:
    """Names read from the manifest on first use:

    - ``STRATEGIES``: the choices of ``queue.dispatch``'s ARGV strategy, in order;
    - ``DISPATCH_KEY_KINDS``: the kinds of the KEYS before the request key
      (``luasched:{ns}:d:<kind>:<queue>``: ready, delayed, leased, dead, tasks, assigned);
    - ``DISPATCH_REGISTRY_KEYS``: the registry and pick keys of the dispatch scripts, as names
      under the namespace (``nodes:index``...), in KEYS order.
    """
    if name == "STRATEGIES":
        return contract.choices(DISPATCH_SCRIPT, "strategy")
    if name == "DISPATCH_KEY_KINDS":
        layout = contract.layout(DISPATCH_SCRIPT)
        before = layout.parts[: layout.request]
        return tuple(parts[0].split(":")[1] for parts in before)
    if name == "DISPATCH_REGISTRY_KEYS":
        layout = contract.layout(DISPATCH_SCRIPT)
        return tuple(parts[0] for parts in layout.parts if len(parts) == 1)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DispatchKeys(BoundQueueKeys):
    """The keys of the dispatch side of one queue (built once per ``Queue``), in the layout of
    the dispatch scripts' manifest: ``fixed`` (the keys before the request key: ready, delayed,
    leased, dead, tasks, assigned), ``registry`` (the registry and pick keys), ``bound`` (all
    21 KEYS, completed per call by ``with_request``: the 7 dispatch queue keys, the 12 registry
    and pick keys, the wake list and the waiters zset; every key a dispatch script touches is
    one of them). ``wake`` (``luasched:{ns}:d:wake:<queue>``) holds the signals (hex node ids)
    of blocked node workers; ``tasks`` is what a node queue's ``Lease`` records as its queue."""

    namespace: Namespace
    queue: bytes
    fixed: tuple[bytes, ...]
    registry: tuple[bytes, ...]
    bound: BoundKeys

    @classmethod
    def of(cls, namespace: Namespace, queue: bytes) -> DispatchKeys:
        """The dispatch keys of ``queue`` (already checked: ``QueueKeys.of``) in ``namespace``."""
        bound = contract.layout(DISPATCH_SCRIPT).bind(namespace, queue=queue)
        parts = bound.layout.parts
        fixed = bound.keys[: bound.request]
        registry = tuple(key for key, part in zip(bound.keys, parts, strict=True) if len(part) == 1)
        return cls(namespace, queue, fixed, registry, bound)

    @property
    def waiters(self) -> bytes:
        """``luasched:{ns}:d:waiters:<queue>``: hex node ids by the server ms their worker waits."""
        return self.bound["waiters"]

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
    return Dispatched(created=bool(int(reply[0])), state=text(reply[1]), node=bytes(reply[2]))


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
    rid = request_of(request_id)
    args = (
        validate.arg(script, "task_id", task_id),
        validate.arg(script, "payload", payload),
        validate.arg(script, "strategy", strategy),
        validate.arg(script, "routing_key", key, name="routing_key", hi=MAX_KEY_BYTES_LIMIT),
        validate.arg(script, "cost", cost),
        validate.arg(script, "priority", priority),
        validate.arg(script, "delay_ms", delay_ms),
        max_attempts_arg(script, max_attempts),
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
    rid = request_of(request_id)
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
    return Call(script, keys.with_request(rid), args, take_shape(shape, keys.tasks))


def node_take(
    keys: DispatchKeys,
    node_id: bytes,
    worker_id: str | bytes,
    count: int,
    lease_ms: int,
    request_ttl_ms: int,
) -> TakeCall:
    """The ``node_dequeue_call`` of one take (``NodeQueue.dequeue``/``dequeue_many``), by
    wait_ms, request id and shape, for ``NodeQueueCalls._take_plan`` (a node queue acks nothing
    while taking)."""

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
    return Redispatched(moved=int(reply[0]), more=bool(int(reply[1])), node_state=text(reply[2]))


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
    state = text(reply[0])
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


class NodeQueueCalls(Generic[Q]):
    """What ``NodeQueue`` and ``AsyncNodeQueue`` share: the node queue's script calls (and a
    blocking take's loop), built from its queue's keys and options; the subclasses only run
    them, with blocking I/O or awaited."""

    def __init__(self, queue: Q, node_id: bytes) -> None:
        self.queue = queue
        self.node = node_id

    def _take_plan(
        self,
        worker_id: str | bytes,
        count: int,
        lease_ms: int,
        block_ms: int,
        request_id: str | bytes | None,
        shape: str,
    ) -> Call[Any] | Loop[Any]:
        """A take of this node's tasks (``take_plan``), its arguments checked first; a blocking
        one waits on the node's own wake list and the queue's (``DispatchKeys.node_wait``)."""
        check_take(worker_id, count, lease_ms, block_ms)
        q = self.queue
        keys = q.dispatch_keys
        call = node_take(keys, self.node, worker_id, count, lease_ms, q.request_ttl_ms)
        return q._plan(call, keys.node_wait(self.node), block_ms, None, request_id, shape)

    def _stats_call(self) -> Call[NodeCounts]:
        call = dispatch_stats_call(self.queue.dispatch_keys, (self.node,))
        node = self.node
        return Call(call.script, call.keys, call.args, lambda reply: call.parse(reply).nodes[node])


class NodeQueue(NodeQueueCalls["Queue"]):
    """The tasks a queue dispatched to one node (``q.for_node(node_id)``).

    Its workers take tasks with ``dequeue``/``dequeue_many`` (leases with fencing tokens, as
    ``Queue.dequeue``; ``block_ms`` waits on the node's own wake list and the queue's,
    ``keys.node_wait``), keep long ones with ``extend`` and finish them with ``ack``/``nack``,
    which give the task's cost back to the node's load when the task leaves it (ack, dead letter;
    ``Queue.requeue_dead_dispatched`` dispatches a dead one again).
    """

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
        return self.queue._do(self._take_plan(worker_id, 1, lease_ms, block_ms, request_id, "one"))  # type: ignore[no-any-return]

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
        plan = self._take_plan(worker_id, n, lease_ms, block_ms, request_id, "many")
        return self.queue._do(plan)  # type: ignore[no-any-return]

    def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish the task and give its cost back to its node. Raises StaleLease."""
        return self.queue._runner.run(self.queue._ack_call(lease, request_id, "queue.node_ack"))

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
        call = self.queue._nack_call(lease, delay_ms, reason, request_id, "queue.node_nack")
        return self.queue._runner.run(call)

    def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move ``lease``'s deadline to the server's now + ``lease_ms``; the new deadline.

        As ``Queue.extend``: a lease past its deadline that no dequeue of the dispatch queue has
        reclaimed yet is still held and live again after this call; the task stays on its node
        and keeps its charge. Raises StaleLease (finished, expired and taken again, or
        redispatched; nothing changed). O(log n).
        """
        return self.queue._runner.run(self.queue._extend_call(lease, lease_ms, "queue.node_extend"))

    def stats(self) -> NodeCounts:
        """This node's ready and assigned tasks and its load."""
        return self.queue._runner.run(self._stats_call())
