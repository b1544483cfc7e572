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

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from luasched import contract, validate
from luasched.contract import BoundKeys
from luasched.dispatch import (
    Dispatched,
    DispatchKeys,
    DispatchStats,
    NodeCounts,
    NodeQueue,
    NodeWait,
    Redispatched,
    RequeuedDispatched,
    Strategy,
    dispatch_call,
    dispatch_requeue_dead_call,
    dispatch_stats_call,
    node_ack_call,
    node_dequeue_call,
    node_extend_call,
    node_nack_call,
    node_take,
    redispatch_call,
)
from luasched.keys import Namespace, new_request_id
from luasched.leases import (
    DEFAULT_BACKOFF_BASE_MS,
    DEFAULT_BACKOFF_MAX_MS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_POLL_MS,
    DEFAULT_REQUEST_TTL_MS,
    NACK_DEAD,
    NACK_FAILED,
    NACK_GIVE_BACK,
    BoundQueueKeys,
    Dequeued,
    Lease,
    Nacked,
    TakeCall,
    ack_call,
    check_take,
    extend_call,
    held,
    max_attempts_arg,
    nack_call,
    optional,
    pass_on_commands,
    poll_wait_ms,
    remaining_ms,
    request_of,
    take_plan,
    take_shape,
    text,
)
from luasched.loops import Do, Loop, drive, no_calls
from luasched.pick import RandomSource, default_rng
from luasched.render import MAX_BATCH_LIMIT
from luasched.scripts import Call, Runner

__all__ = [
    "DEFAULT_BACKOFF_BASE_MS",
    "DEFAULT_BACKOFF_MAX_MS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_POLL_MS",
    "DEFAULT_REQUEST_TTL_MS",
    "DISPATCH_KEY_KINDS",  # noqa: F822 (module __getattr__: read from the manifest)
    "DISPATCH_REGISTRY_KEYS",  # noqa: F822 (module __getattr__: read from the manifest)
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "NACK_DEAD",
    "NACK_FAILED",
    "NACK_GIVE_BACK",
    "QUEUE_KEY_KINDS",  # noqa: F822 (module __getattr__: read from the manifest)
    "STRATEGIES",  # noqa: F822 (module __getattr__: read from the manifest)
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
    "QueueCalls",
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
    "pass_on_commands",
    "poll_wait_ms",
    "redispatch_call",
    "remaining_ms",
    "requeue_dead_call",
    "stats_call",
]

MIN_PRIORITY = -512
MAX_PRIORITY = 511
#: A queue name is 1..MAX_QUEUE_NAME_BYTES bytes (the tail of its key names).
MAX_QUEUE_NAME_BYTES = 1024

R = TypeVar("R")

#: The script whose KEYS layout every plain queue script shares (lua/include/queue_keys.j2).
QUEUE_SCRIPT = "queue.dequeue"


def __getattr__(name: str) -> Any:
    """Names read from the manifest on first use (``luasched.contract``):

    - ``QUEUE_KEY_KINDS``: the kinds of a plain queue's KEYS before the request key
      (``luasched:{ns}:q:<kind>:<queue>``: ready, delayed, leased, dead, tasks, wake, waiting);
    - ``STRATEGIES``, ``DISPATCH_KEY_KINDS``, ``DISPATCH_REGISTRY_KEYS``: ``luasched.dispatch``'s;
    - ``WAKE_MAX``, ``WAKE_TTL_MS``: the bounds of the queues' wake lists (queue_limits.j2).
    """
    if name == "QUEUE_KEY_KINDS":
        layout = contract.layout(QUEUE_SCRIPT)
        return tuple(parts[0].split(":")[1] for parts in layout.parts[: layout.request])
    if name in {"STRATEGIES", "DISPATCH_KEY_KINDS", "DISPATCH_REGISTRY_KEYS"}:
        from luasched import dispatch

        return getattr(dispatch, name)
    if name in {"WAKE_MAX", "WAKE_TTL_MS"}:
        return contract.limit("queue", name.lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class QueueKeys(BoundQueueKeys):
    """The keys of one queue of a namespace (built once per ``Queue``), in the layout of the
    queue scripts' manifest: ``fixed`` (the keys before the request key: ready, delayed, leased,
    dead, tasks, wake, waiting), ``bound`` (all 8 KEYS, completed per call by ``with_request``);
    ``wake`` is the list blocked dequeuers BLPOP."""

    namespace: Namespace
    queue: bytes
    fixed: tuple[bytes, ...]
    bound: BoundKeys

    @classmethod
    def of(cls, namespace: Namespace, queue: str | bytes) -> QueueKeys:
        """The keys of ``queue`` (1..1024 bytes, any bytes) in ``namespace``; InvalidArgument
        naming ``name`` for anything else."""
        name = validate.key_bytes("name", queue, 1, MAX_QUEUE_NAME_BYTES)
        bound = contract.layout(QUEUE_SCRIPT).bind(namespace, queue=name)
        return cls(namespace, name, bound.keys[: bound.request], bound)


@dataclass(frozen=True)
class Enqueued:
    """What ``enqueue`` did: ``created`` False means the id existed and nothing changed; ``state``
    is then its state (``ready``, ``delayed``, ``leased``, ``dead``), else ``ready``/``delayed``."""

    created: bool
    state: str


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
    max_attempts_arg("queue.enqueue", max_attempts)
    validate.arg("queue.nack", "backoff_base_ms", backoff_base_ms)
    validate.arg("queue.nack", "backoff_max_ms", backoff_max_ms)
    validate.arg("queue.enqueue", "request_ttl_ms", request_ttl_ms)
    validate.arg("queue.dequeue", "lease_ms", poll_ms, name="poll_ms")


def _enqueued(reply: Any) -> Enqueued:
    return Enqueued(created=bool(int(reply[0])), state=text(reply[1]))


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
    rid = request_of(request_id)
    args = (
        validate.arg(script, "task_id", task_id),
        validate.arg(script, "payload", payload),
        validate.arg(script, "priority", priority),
        validate.arg(script, "delay_ms", delay_ms),
        max_attempts_arg(script, max_attempts),
        rid,
        validate.arg(script, "request_ttl_ms", request_ttl_ms),
    )
    return Call("queue.enqueue", keys.with_request(rid), args, _enqueued)


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
    ack_task_id, ack_token = (b"", 0) if ack is None else held("queue.ack", ack, keys.tasks)
    rid = request_of(request_id)
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
    return Call(script, keys.with_request(rid), args, take_shape(shape, keys.tasks))


def _requeued(reply: Any) -> str:
    return text(reply)


def requeue_dead_call(keys: QueueKeys, task_id: str | bytes) -> Call[str]:
    """The ``queue.requeue_dead`` call; parses ``requeued`` or where the task is."""
    script = "queue.requeue_dead"
    args = (validate.arg(script, "task_id", task_id),)
    return Call(script, keys.with_request(b""), args, _requeued)


def _stats(reply: Any) -> QueueStats:
    now_ms, ready, delayed, leased, dead, oldest, next_due = (int(value) for value in reply)
    return QueueStats(now_ms, ready, delayed, leased, dead, optional(oldest), optional(next_due))


def stats_call(keys: QueueKeys) -> Call[QueueStats]:
    """The ``queue.stats`` call."""
    return Call("queue.stats", keys.with_request(b""), (), _stats)


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


def policy_loop(client: Any, namespace: Namespace) -> Loop[str | None]:
    """Read the ``maxmemory-policy`` of the server holding ``namespace`` (a loop of one ``Do``
    step, for the sync and the asyncio client alike); None when it could not be read."""
    from luasched.scripts import is_cluster

    try:
        if is_cluster(client):
            node = client.get_node_from_key(namespace.prefix)
            config = yield Do(
                functools.partial(client.config_get, "maxmemory-policy", target_nodes=node)
            )
        else:
            config = yield Do(functools.partial(client.config_get, "maxmemory-policy"))
    except Exception:  # CONFIG may be refused (ACL, managed services): never fatal
        return None
    return _policy_of(config)


def warn_policy(policy: str | None, stacklevel: int = 4) -> str | None:
    """Warn (``RuntimeWarning``, attributed ``stacklevel`` frames up: by default to the caller
    of the Scheduler method that checked) when ``policy`` could evict queue keys; returns
    ``policy``."""
    message = policy and policy_warning(policy)
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    return policy


def check_eviction_policy(client: Any, namespace: Namespace) -> str | None:
    """Warn (``warnings.warn``) when the server holding ``namespace`` could evict its keys.

    Returns the policy, or None when it could not be read (CONFIG not permitted, renamed...):
    then nothing is warned and nothing fails.
    """
    return warn_policy(drive(policy_loop(client, namespace), no_calls, client))


class QueueCalls(Generic[R]):
    """What ``Queue`` and ``AsyncQueue`` share: a queue's options, keys and random source, and
    the script call (or, for a blocking take, the loop) of each of its methods. The subclasses
    only run what these build, ``Queue`` with blocking I/O and ``AsyncQueue`` awaited; so both
    check the same arguments, send the same KEYS and ARGV and parse the same replies.

    Raises InvalidArgument (before any I/O) for an option out of range (``check_queue_options``)
    or a bad queue name.
    """

    def __init__(
        self,
        runner: R,
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

    def _enqueue_call(
        self,
        task_id: str | bytes,
        payload: str | bytes,
        priority: int,
        delay_ms: int,
        max_attempts: int | None,
        request_id: str | bytes | None,
    ) -> Call[Enqueued]:
        return enqueue_call(
            self.keys,
            task_id,
            payload,
            priority=priority,
            delay_ms=delay_ms,
            max_attempts=self.max_attempts if max_attempts is None else max_attempts,
            request_id=request_id,
            request_ttl_ms=self.request_ttl_ms,
        )

    def _take_plan(
        self,
        worker_id: str | bytes,
        count: int,
        lease_ms: int,
        block_ms: int,
        ack: Lease | None,
        request_id: str | bytes | None,
        shape: str,
    ) -> Call[Any] | Loop[Any]:
        """A take of this queue (``take_plan``), its arguments checked first (``check_take``)."""
        check_take(worker_id, count, lease_ms, block_ms)
        keys, request_ttl_ms = self.keys, self.request_ttl_ms

        def call(wait_ms: int, ack: Lease | None, rid: str | bytes | None, shape: str) -> Call[Any]:
            return dequeue_call(
                keys,
                worker_id,
                count,
                lease_ms,
                wait_ms=wait_ms,
                ack=ack,
                request_id=rid,
                request_ttl_ms=request_ttl_ms,
                shape=shape,
            )

        return self._plan(call, keys.wake, block_ms, ack, request_id, shape)

    def _plan(
        self,
        call: TakeCall,
        wake: bytes | NodeWait,
        block_ms: int,
        ack: Lease | None,
        request_id: str | bytes | None,
        shape: str,
    ) -> Call[Any] | Loop[Any]:
        return take_plan(call, wake, block_ms, ack, request_id, shape, self.poll_ms, self._client)

    def _lease_keys(self, script: str) -> QueueKeys | DispatchKeys:
        """The keys a lease call of ``script`` takes: the queue's, or a node queue's."""
        return self.dispatch_keys if script.startswith("queue.node_") else self.keys

    def _ack_call(
        self, lease: Lease, request_id: str | bytes | None, script: str = "queue.ack"
    ) -> Call[bool]:
        keys = self._lease_keys(script)
        ttl_ms = self.request_ttl_ms
        return ack_call(keys, lease, request_id=request_id, request_ttl_ms=ttl_ms, script=script)

    def _extend_call(self, lease: Lease, lease_ms: int, script: str = "queue.extend") -> Call[int]:
        return extend_call(self._lease_keys(script), lease, lease_ms, script=script)

    def _nack_call(
        self,
        lease: Lease,
        delay_ms: int | None,
        reason: str | bytes,
        request_id: str | bytes | None,
        script: str = "queue.nack",
    ) -> Call[Nacked]:
        return nack_call(
            self._lease_keys(script),
            lease,
            delay_ms=delay_ms,
            reason=reason,
            backoff_base_ms=self.backoff_base_ms,
            backoff_max_ms=self.backoff_max_ms,
            request_id=request_id,
            request_ttl_ms=self.request_ttl_ms,
            script=script,
        )

    def _dispatch_call(
        self,
        task_id: str | bytes,
        payload: str | bytes,
        strategy: str,
        routing_key: str | bytes | None,
        cost: int,
        priority: int,
        delay_ms: int,
        max_attempts: int | None,
        request_id: str | bytes | None,
    ) -> Call[Dispatched]:
        return dispatch_call(
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

    def _node_id(self, node_id: str | bytes) -> bytes:
        return validate.arg("queue.node_dequeue", "node_id", node_id)  # type: ignore[no-any-return]

    def _redispatch_call(self, node_id: str | bytes, limit: int) -> Call[Redispatched]:
        return redispatch_call(self.dispatch_keys, node_id, self._rng, limit)

    def _requeue_dead_dispatched_call(self, task_id: str | bytes) -> Call[RequeuedDispatched]:
        return dispatch_requeue_dead_call(self.dispatch_keys, task_id, self._rng)


class Queue(QueueCalls[Runner]):
    """One task queue of a namespace (``s.queue(name)``).

    Every method is one script call, atomic on the server, that checks all its arguments first
    and changes nothing when it raises (``InvalidArgument``, ``StaleLease``, ``CorruptState``);
    a blocking ``dequeue`` is a loop of such calls around a BLPOP. Task ids, payloads and worker
    ids are any bytes (str is sent as UTF-8) and come back as bytes. Times are the server's
    clock; callers pass relative durations. Mutating calls take a ``request_id`` (None: a random
    one per call; b"": none): a replay with the same id within ``request_ttl_ms`` acts once.
    Needs a client that answers bytes (``decode_responses=False``, redis-py's default).
    """

    def _do(self, plan: Call[Any] | Loop[Any]) -> Any:
        """Run ``plan``: one call, or a blocking take's loop (``luasched.loops.drive``)."""
        if isinstance(plan, Call):
            return self._runner.run(plan)
        return drive(plan, self._runner.run, self._client)

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
            self._enqueue_call(task_id, payload, priority, delay_ms, max_attempts, request_id)
        )

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
        return self._do(self._take_plan(worker_id, 1, lease_ms, block_ms, None, request_id, "one"))  # type: ignore[no-any-return]

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
        return self._do(self._take_plan(worker_id, n, lease_ms, block_ms, None, request_id, "many"))  # type: ignore[no-any-return]

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
        plan = self._take_plan(worker_id, 1, lease_ms, block_ms, lease, request_id, "one")
        return self._do(plan)  # type: ignore[no-any-return]

    def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish ``lease``'s task: it is removed from the queue. O(log n).

        Raises StaleLease when the lease is no longer held (finished already, or expired and
        leased again): the task belongs to the newer lease. A lease past its deadline that no
        dequeue has reclaimed yet is still held.
        """
        return self._runner.run(self._ack_call(lease, request_id))

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
        return self._runner.run(self._nack_call(lease, delay_ms, reason, request_id))

    def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move ``lease``'s deadline to the server's now + ``lease_ms``; the new deadline.

        Raises StaleLease. O(log n).
        """
        return self._runner.run(self._extend_call(lease, lease_ms))

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
            self._dispatch_call(
                task_id,
                payload,
                strategy,
                routing_key,
                cost,
                priority,
                delay_ms,
                max_attempts,
                request_id,
            )
        )

    def for_node(self, node_id: str | bytes) -> NodeQueue:
        """The queue of the tasks dispatched to ``node_id``: what its workers take and finish."""
        return NodeQueue(self, self._node_id(node_id))

    def redispatch(self, node_id: str | bytes, limit: int = 100) -> Redispatched:
        """Move up to ``limit`` (1..100) tasks off a dead, draining or removed node.

        Each goes to a node chosen again with its own strategy; its leases are revoked (late
        acks refused), its cost moves with it. A live, non-draining node is left alone. Call
        again while ``more``. If a pick fails for the first task, raises (nothing changed).
        """
        return self._runner.run(self._redispatch_call(node_id, limit))

    def requeue_dead_dispatched(self, task_id: str | bytes) -> RequeuedDispatched:
        """Dispatch a dead-letter dispatched task again: ready now, attempts reset, reason cleared.

        One script: the node is chosen with the task's own strategy and cost (``slot``: the live
        owner of its routing key's slot, as ``redispatch`` re-picks), charged the cost as
        ``dispatch`` charges, and the task queued for it (payload, priority, max_attempts kept).
        A task that is not dead is left as it is: the reply says its state (``node`` None).
        O(log n) plus the pick. Raises NoNode, AllNodesFull, ScanLimitReached, CorruptState
        (nothing changed: the task stays dead).
        """
        return self._runner.run(self._requeue_dead_dispatched_call(task_id))

    def dispatch_stats(self, nodes: tuple[str | bytes, ...] | list[str | bytes]) -> DispatchStats:
        """Counts of the dispatched tasks, and ready/assigned/load of each of ``nodes`` (1..100)."""
        return self._runner.run(dispatch_stats_call(self.dispatch_keys, nodes))
