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
from collections.abc import Callable
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
from luasched.errors import GroupedQueue, InvalidArgument
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
from luasched.loops import Do, Loop, Run, drive, no_calls
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
    "GroupKeys",
    "GroupSettings",
    "GroupStat",
    "GroupStats",
    "Lease",
    "Nacked",
    "NodeCounts",
    "NodeQueue",
    "Queue",
    "QueueCalls",
    "QueueKeys",
    "QueueLimits",
    "QueueStats",
    "RateLimit",
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
    "group_stats_call",
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
    "refuse_group",
    "remaining_ms",
    "requeue_dead_call",
    "set_group_call",
    "set_limits_call",
    "set_rate_call",
    "stats_call",
]

MIN_PRIORITY = -512
MAX_PRIORITY = 511
#: A queue name is 1..MAX_QUEUE_NAME_BYTES bytes (the tail of its key names).
MAX_QUEUE_NAME_BYTES = 1024

R = TypeVar("R")

#: The script whose KEYS layout every plain queue script shares (lua/include/queue_keys.j2).
QUEUE_SCRIPT = "queue.dequeue"
#: The script whose KEYS layout every ``queue.group_*`` script shares (the queue's, then
#: lua/include/group_keys.j2: gready, gring, groups).
GROUP_SCRIPT = "queue.group_dequeue"
#: The lease scripts that refuse a task with a group, and their ``queue.group_*`` twins (which
#: take any lease of a queue with groups). ``queue.extend`` has none: it serves both.
LEASE_TWINS = {"queue.ack": "queue.group_ack", "queue.nack": "queue.group_nack"}


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
class GroupKeys(BoundQueueKeys):
    """The KEYS of the ``queue.group_*`` scripts of one queue: the queue's 8 (``QueueKeys``), then
    gready, gring and groups (lua/include/group_keys.j2), in the manifest's layout."""

    namespace: Namespace
    queue: bytes
    bound: BoundKeys

    @classmethod
    def of(cls, namespace: Namespace, queue: str | bytes) -> GroupKeys:
        """The group keys of ``queue`` in ``namespace``; InvalidArgument naming ``name``."""
        name = validate.key_bytes("name", queue, 1, MAX_QUEUE_NAME_BYTES)
        return cls(namespace, name, contract.layout(GROUP_SCRIPT).bind(namespace, queue=name))


@dataclass(frozen=True)
class GroupSettings:
    """A group's settings after ``set_group``: ``weight`` (1..1000), ``max_active`` (0: no cap),
    ``paused``, and ``active``: the leases of its tasks held now."""

    weight: int
    max_active: int
    paused: bool
    active: int


@dataclass(frozen=True)
class QueueLimits:
    """A queue's limits after ``set_limits``: ``max_active`` (0: no cap), ``paused``, and
    ``active``: the leases held in the whole queue now."""

    max_active: int
    paused: bool
    active: int


@dataclass(frozen=True)
class RateLimit:
    """A rate limit after ``set_rate``: ``interval_ms`` between two takes at the steady rate
    (0.0: no limit) and ``burst``, the most takes at once."""

    interval_ms: float
    burst: int


@dataclass(frozen=True)
class GroupStat:
    """One group of ``group_stats``: its ready tasks, the leases of its tasks held (``active``),
    its settings (``interval_ms`` 0.0: no rate limit) and ``rate_wait_ms``, the ms until its
    rate allows a take (0: now)."""

    ready: int
    active: int
    weight: int
    max_active: int
    paused: bool
    interval_ms: float
    burst: int
    rate_wait_ms: int


@dataclass(frozen=True)
class GroupStats:
    """Counts of a queue with groups at ``now_ms`` (server clock): ``ready`` tasks with a group,
    ``leased`` (every lease held), groups in the ring (``ring``) and held back by their rate
    (``waiting``), the queue's own limits, each group asked about (``groups``), and ``queue``:
    the whole queue's counts as ``stats()`` gives them (its ``ready`` with and without a group;
    ``oldest_ready_age_ms`` of the tasks without a group)."""

    queue: QueueStats
    now_ms: int
    ready: int
    leased: int
    ring: int
    waiting: int
    max_active: int
    paused: bool
    interval_ms: float
    burst: int
    groups: dict[bytes, GroupStat]


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
    keys: QueueKeys | GroupKeys,
    task_id: str | bytes,
    payload: str | bytes,
    *,
    priority: int = 0,
    delay_ms: int = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    request_id: str | bytes | None = None,
    request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
    group: str | bytes | None = None,
) -> Call[Enqueued]:
    """The ``queue.enqueue`` call (request_id None: a fresh random one; b"": none); with a
    ``group``, ``queue.group_enqueue`` (``keys``: the queue's GroupKeys).
    InvalidArgument for any argument out of the script's range (``luasched.validate``)."""
    script = "queue.enqueue" if group is None else "queue.group_enqueue"
    rid = request_of(request_id)
    args = (
        validate.arg(script, "task_id", task_id),
        validate.arg(script, "payload", payload),
        validate.arg(script, "priority", priority),
        validate.arg(script, "delay_ms", delay_ms),
        max_attempts_arg(script, max_attempts),
        rid,
        validate.arg(script, "request_ttl_ms", request_ttl_ms),
        *(() if group is None else (validate.arg(script, "group", group),)),
    )
    return Call(script, keys.with_request(rid), args, _enqueued)


def dequeue_call(
    keys: QueueKeys | GroupKeys,
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
    ``many`` (a list of Lease). With GroupKeys: ``queue.group_dequeue`` (the same ARGV and reply).
    """
    script = GROUP_SCRIPT if isinstance(keys, GroupKeys) else "queue.dequeue"
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


def requeue_dead_call(keys: QueueKeys | GroupKeys, task_id: str | bytes) -> Call[str]:
    """The ``queue.requeue_dead`` call (``queue.group_requeue_dead`` with GroupKeys); parses
    ``requeued`` or where the task is."""
    script = "queue.group_requeue_dead" if isinstance(keys, GroupKeys) else "queue.requeue_dead"
    args = (validate.arg(script, "task_id", task_id),)
    return Call(script, keys.with_request(b""), args, _requeued)


def _group_settings(reply: Any) -> GroupSettings:
    weight, max_active, paused, active = (int(value) for value in reply)
    return GroupSettings(weight, max_active, bool(paused), active)


def _keep(script: str, name: str, value: int | bool | None) -> int:
    """ARGV ``name`` of ``script`` for a setting: -1 (keep) for None, else the value checked
    (a bool as 0/1); InvalidArgument naming ``name``."""
    if value is None:
        return -1
    return validate.arg(script, name, int(value) if isinstance(value, bool) else value, lo=0)  # type: ignore[no-any-return]


def set_group_call(
    keys: GroupKeys,
    group: str | bytes,
    *,
    weight: int | None = None,
    max_active: int | None = None,
    paused: bool | None = None,
) -> Call[GroupSettings]:
    """The ``queue.set_group`` call (None: keep the setting as it is)."""
    script = "queue.set_group"
    group_arg = validate.arg(script, "group", group)
    weight_arg = -1 if weight is None else validate.arg(script, "weight", weight, lo=1)
    args = (
        group_arg,
        weight_arg,
        _keep(script, "max_active", max_active),
        _keep(script, "paused", paused),
    )
    return Call(script, keys.with_request(b""), args, _group_settings)


def _queue_limits(reply: Any) -> QueueLimits:
    max_active, paused, active = (int(value) for value in reply)
    return QueueLimits(max_active, bool(paused), active)


def set_limits_call(
    keys: GroupKeys, *, max_active: int | None = None, paused: bool | None = None
) -> Call[QueueLimits]:
    """The ``queue.set_limits`` call (None: keep the setting as it is)."""
    script = "queue.set_limits"
    args = (_keep(script, "max_active", max_active), _keep(script, "paused", paused))
    return Call(script, keys.with_request(b""), args, _queue_limits)


def _rate_limit(reply: Any) -> RateLimit:
    return RateLimit(float(reply[0]), int(reply[1]))


def set_rate_call(
    keys: GroupKeys, per_second: int, burst: int = 1, group: str | bytes | None = None
) -> Call[RateLimit]:
    """The ``queue.set_rate`` call (group None: the whole queue; per_second 0: no limit)."""
    script = "queue.set_rate"
    args = (
        b"" if group is None else validate.arg(script, "group", group, lo=1),
        validate.arg(script, "per_second", per_second),
        validate.arg(script, "burst", burst),
    )
    return Call(script, keys.with_request(b""), args, _rate_limit)


def group_stats_call(
    keys: GroupKeys, groups: tuple[str | bytes, ...] | list[str | bytes] = ()
) -> Call[GroupStats]:
    """The ``queue.group_stats`` call for ``groups`` (a list or tuple of 0..100 groups)."""
    names: tuple[bytes, ...] = validate.many("queue.group_stats", "group", groups, name="groups")

    def parse(reply: Any) -> GroupStats:
        queue = _stats(reply[:7])
        reply = reply[7:]
        per_group = {}
        for index, name in enumerate(names):
            at = 7 + 8 * index
            ready, active, weight, cap, paused = (int(value) for value in reply[at : at + 5])
            per_group[name] = GroupStat(
                ready,
                active,
                weight,
                cap,
                bool(paused),
                float(reply[at + 5]),
                int(reply[at + 6]),
                int(reply[at + 7]),
            )
        ready, ring, waiting, cap, paused = (int(value) for value in reply[:5])
        return GroupStats(
            queue,
            queue.now_ms,
            ready,
            queue.leased,
            ring,
            waiting,
            cap,
            bool(paused),
            float(reply[5]),
            int(reply[6]),
            per_group,
        )

    return Call("queue.group_stats", keys.with_request(b""), names, parse)


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


def refuse_group(group: str | bytes | None, queues: str) -> None:
    """InvalidArgument (``ARG``) naming ``group`` when one is given to ``queues``, a kind of queue
    without groups (only a plain queue has them: docs/queue.md), before any I/O."""
    if group is not None:
        raise InvalidArgument(f"group: {queues} have no groups (a plain queue has), got {group!r}")


def _plan_loop(plan: Call[Any] | Loop[Any]) -> Loop[Any]:
    """``plan`` as a loop: one ``Run`` step for a call, the loop itself for a blocking take."""
    if isinstance(plan, Call):
        return (yield Run(plan))
    return (yield from plan)


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
        grouped: bool = False,
    ) -> None:
        check_queue_options(max_attempts, backoff_base_ms, backoff_max_ms, request_ttl_ms, poll_ms)
        self._runner = runner
        self._client = client
        self.keys = QueueKeys.of(namespace, name)
        self.group_keys = GroupKeys.of(namespace, name)
        #: Whether this object calls the ``queue.group_*`` scripts: set by ``grouped=True``, by
        #: the first call with a group, ``set_group``, ``set_limits``, or a GROUPED answer.
        self.grouped = grouped
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
        group: str | bytes | None = None,
    ) -> Call[Enqueued]:
        if group is not None:
            self.grouped = True
        return enqueue_call(
            self.keys if group is None else self.group_keys,
            task_id,
            payload,
            priority=priority,
            delay_ms=delay_ms,
            max_attempts=self.max_attempts if max_attempts is None else max_attempts,
            request_id=request_id,
            request_ttl_ms=self.request_ttl_ms,
            group=group,
        )

    def _set_group_call(
        self,
        group: str | bytes,
        weight: int | None,
        max_active: int | None,
        paused: bool | None,
    ) -> Call[GroupSettings]:
        call = set_group_call(
            self.group_keys, group, weight=weight, max_active=max_active, paused=paused
        )
        self.grouped = True
        return call

    def _set_limits_call(self, max_active: int | None, paused: bool | None) -> Call[QueueLimits]:
        call = set_limits_call(self.group_keys, max_active=max_active, paused=paused)
        self.grouped = True
        return call

    def _set_rate_call(
        self, per_second: int, burst: int, group: str | bytes | None
    ) -> Call[RateLimit]:
        call = set_rate_call(self.group_keys, per_second, burst, group)
        self.grouped = True
        return call

    def _pause_call(self, group: str | bytes | None, paused: bool) -> Call[Any]:
        if group is None:
            return self._set_limits_call(None, paused)
        return self._set_group_call(group, None, None, paused)

    def _to_groups(self) -> bool:
        """After a GROUPED answer (the queue has groups; the answer changed nothing): make this
        object call the ``queue.group_*`` scripts from now on. False when it called them
        already (then GROUPED is not a switch but an error to raise)."""
        if self.grouped:
            return False
        self.grouped = True
        return True

    def _switching_loop(self, build: Callable[[], Call[Any] | Loop[Any]]) -> Loop[Any]:
        """What ``build`` makes (a call, or a blocking take's loop) as one loop; when a script
        answers GROUPED, switch to the ``queue.group_*`` scripts (``_to_groups``) and run what
        ``build`` makes then, once (it builds the same request on the group scripts' keys)."""
        try:
            return (yield from _plan_loop(build()))
        except GroupedQueue:
            if not self._to_groups():
                raise
        return (yield from _plan_loop(build()))

    def _stats_call(self) -> Call[QueueStats]:
        if not self.grouped:
            return stats_call(self.keys)
        call = group_stats_call(self.group_keys)
        return Call(call.script, call.keys, call.args, lambda reply: call.parse(reply).queue)

    def _requeue_dead_call(self, task_id: str | bytes) -> Call[str]:
        return requeue_dead_call(self.group_keys if self.grouped else self.keys, task_id)

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
        keys: QueueKeys | GroupKeys = self.group_keys if self.grouped else self.keys
        request_ttl_ms = self.request_ttl_ms

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

    def _lease_keys(self, script: str) -> QueueKeys | DispatchKeys | GroupKeys:
        """The keys a lease call of ``script`` takes: the queue's, a node queue's, or (a
        ``queue.group_*`` script) the queue's group keys."""
        if script.startswith("queue.node_"):
            return self.dispatch_keys
        return self.group_keys if script.startswith("queue.group_") else self.keys

    def _lease_script(self, script: str) -> str:
        """``script``, or its ``queue.group_*`` twin when this queue calls those."""
        return LEASE_TWINS.get(script, script) if self.grouped else script

    def _ack_call(
        self, lease: Lease, request_id: str | bytes | None, script: str = "queue.ack"
    ) -> Call[bool]:
        script = self._lease_script(script)
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
        script = self._lease_script(script)
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
        group: str | bytes | None = None,
    ) -> Call[Dispatched]:
        refuse_group(group, "node queues (dispatch)")
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

    def _switching(self, build: Callable[[], Call[Any] | Loop[Any]]) -> Any:
        """Run what ``build`` makes, switching to the group scripts on GROUPED
        (``QueueCalls._switching_loop``)."""
        return drive(self._switching_loop(build), self._runner.run, self._client)

    def enqueue(
        self,
        task_id: str | bytes,
        payload: str | bytes = b"",
        *,
        priority: int = 0,
        delay_ms: int = 0,
        max_attempts: int | None = None,
        request_id: str | bytes | None = None,
        group: str | bytes | None = None,
    ) -> Enqueued:
        """Add a task, ready now or after ``delay_ms`` (server clock); idempotent by task id.

        A task id that exists (ready, delayed, leased or dead) is left as it is:
        ``created=False`` and its state. Priority -512..511, higher first, FIFO within a
        priority. ``max_attempts`` (default: the queue's) leases before the dead letters.
        ``group`` (1..256 bytes, e.g. a tenant; None: none) puts the task in that group: takes
        then go round the groups that have ready tasks (by weight, ``set_group``), priority and
        FIFO within a group, and the task keeps its group through delays, retries, expired
        leases and the dead letters. O(log n). Raises InvalidArgument.
        """
        return self._runner.run(
            self._enqueue_call(
                task_id, payload, priority, delay_ms, max_attempts, request_id, group
            )
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
        return self._switching(  # type: ignore[no-any-return]
            lambda: self._take_plan(worker_id, 1, lease_ms, block_ms, None, request_id, "one")
        )

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
        return self._switching(  # type: ignore[no-any-return]
            lambda: self._take_plan(worker_id, n, lease_ms, block_ms, None, request_id, "many")
        )

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
        return self._switching(  # type: ignore[no-any-return]
            lambda: self._take_plan(worker_id, 1, lease_ms, block_ms, lease, request_id, "one")
        )

    def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish ``lease``'s task: it is removed from the queue. O(log n).

        Raises StaleLease when the lease is no longer held (finished already, or expired and
        leased again): the task belongs to the newer lease. A lease past its deadline that no
        dequeue has reclaimed yet is still held.
        """
        return self._switching(lambda: self._ack_call(lease, request_id))  # type: ignore[no-any-return]

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
        return self._switching(lambda: self._nack_call(lease, delay_ms, reason, request_id))  # type: ignore[no-any-return]

    def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move ``lease``'s deadline to the server's now + ``lease_ms``; the new deadline.

        Raises StaleLease. O(log n).
        """
        return self._runner.run(self._extend_call(lease, lease_ms))

    def requeue_dead(self, task_id: str | bytes) -> bool:
        """Bring a dead-letter task back (ready now, attempts reset); False if it was not dead."""
        return self._switching(lambda: self._requeue_dead_call(task_id)) == "requeued"  # type: ignore[no-any-return]

    def stats(self) -> QueueStats:
        """Counts (ready, delayed, leased, dead), oldest ready age, next due. Read-only. Of a
        queue with groups (once this object calls the group scripts): ``ready`` counts the
        ready tasks with a group too (``queue.group_stats``)."""
        return self._runner.run(self._stats_call())

    # ----------------------------------------------------------------------------------------
    # Groups, caps and pause

    def set_group(
        self,
        group: str | bytes,
        *,
        weight: int | None = None,
        max_active: int | None = None,
        paused: bool | None = None,
    ) -> GroupSettings:
        """Set ``group``'s weight (1..1000; default 1), its cap ``max_active`` (most leases of
        its tasks held at once, 0: none) and whether it is ``paused``; None keeps a setting.

        One script: the group is put in or out of the ring the dequeue takes from, so a group
        at its cap or paused is skipped (not waited on) and comes back when a lease of it is
        acked, nacked or expires, or when it is resumed. O(log n). Raises InvalidArgument.
        """
        return self._runner.run(self._set_group_call(group, weight, max_active, paused))

    def set_limits(
        self, *, max_active: int | None = None, paused: bool | None = None
    ) -> QueueLimits:
        """Set the whole queue's cap ``max_active`` (most leases held at once, with or without a
        group; 0: none) and whether it is ``paused`` (nothing is taken); None keeps a setting.
        O(1). Raises InvalidArgument."""
        return self._runner.run(self._set_limits_call(max_active, paused))

    def set_rate(
        self, per_second: int, burst: int = 1, group: str | bytes | None = None
    ) -> RateLimit:
        """Limit the takes of ``group`` (None: the whole queue) to ``burst`` at once, then
        ``per_second`` per second of the server's clock (GCRA; 0: no limit), checked in the
        same step that leases. A group held back by its rate is skipped; when nothing may be
        taken because of a rate, a blocking dequeue waits until it may (the reply says how
        long). O(log n). Raises InvalidArgument."""
        return self._runner.run(self._set_rate_call(per_second, burst, group))

    def group_stats(self, groups: tuple[str | bytes, ...] | list[str | bytes]) -> GroupStats:
        """Counts of the queue's groups and of each of ``groups`` (1..100): ready, leases held,
        settings, rate state. Read-only; O(k log n) for k groups."""
        return self._runner.run(group_stats_call(self.group_keys, groups))

    def pause(self, group: str | bytes | None = None) -> None:
        """Pause the queue (None) or one group: dequeues take none of its tasks (they stay)."""
        self._runner.run(self._pause_call(group, True))

    def resume(self, group: str | bytes | None = None) -> None:
        """Resume what ``pause`` paused."""
        self._runner.run(self._pause_call(group, False))

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
        group: str | bytes | None = None,
    ) -> Dispatched:
        """Choose a node with ``strategy`` and queue the task for it, charging it ``cost``.

        One script: the pick (``slot``: the live owner of ``routing_key``'s slot; the others
        as ``s.pick.<strategy>``; capacities are respected by ``least_loaded`` and
        ``two_choices`` only), the charge and the enqueue into the node's own queue
        (``for_node(node)``). Idempotent by task id like ``enqueue``; a replay of
        ``request_id`` acts once. Raises NoNode, AllNodesFull, ScanLimitReached,
        InvalidArgument, CorruptState (nothing changed). Node queues have no groups: a
        ``group`` is refused (InvalidArgument, before any I/O).
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
                group,
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
