"""``Scheduler``: where users start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from luasched import validate
from luasched.ha import DEFAULT_WAIT_TIMEOUT_MS, Durability, durability, sentinel_client
from luasched.keys import Namespace
from luasched.lock import DEFAULT_RETRY_MS, DEFAULT_TTL_MS, Lock, LockBase, Semaphore, SemaphoreBase
from luasched.loops import Loop, drive, no_calls
from luasched.nodes import Nodes
from luasched.pick import Pick, RandomSource
from luasched.queue import Queue, QueueCalls, check_eviction_policy, policy_loop, warn_policy
from luasched.render import RenderedScript, ScriptConfig, render_all
from luasched.retry import RetryPolicy
from luasched.scripts import Batch, Runner, ScriptRunner, SyncClient
from luasched.sharded import (
    DEFAULT_BLOCK_SLICE_MS,
    ShardedQueue,
    check_sharded,
    layout_loop,
    partition_namespace,
)
from luasched.slots import Slots

if TYPE_CHECKING:
    from luasched.asyncio.scripts import AsyncScriptRunner

__all__ = ["Scheduler", "SchedulerPipeline"]


def _api(
    runner: Runner, namespace: Namespace, rng: RandomSource | None
) -> tuple[Slots, Nodes, Pick]:
    """The ``slots``, ``nodes`` and ``pick`` of a Scheduler (its runner) or a pipeline (batch)."""
    return Slots(runner, namespace), Nodes(runner, namespace), Pick(runner, namespace, rng)


#: A Scheduler's client, runner, lock class and semaphore class (sync, or asyncio).
C = TypeVar("C")
RN = TypeVar("RN", bound="ScriptRunner | AsyncScriptRunner")
L = TypeVar("L", bound="LockBase[Any]")
S = TypeVar("S", bound="SemaphoreBase[Any]")
#: The class ``from_sentinel`` builds.
SB = TypeVar("SB", bound="SchedulerBase[Any, Any, Any, Any]")


class SchedulerBase(Generic[C, RN, L, S]):
    """What ``Scheduler`` and ``luasched.asyncio.Scheduler`` share: the constructor (client and
    options checked before anything else: InvalidArgument naming the parameter), the factories
    that do no I/O (``lock``, ``semaphore``) and ``sharded_queue``'s checks, layout read and
    policy checks (a loop each driver runs). Each subclass names the classes it builds
    (``_lock_class``, ``_semaphore_class``) and makes its runner and its ``slots``, ``nodes``
    and ``pick`` (``_connect``)."""

    _lock_class: type[L]
    _semaphore_class: type[S]
    runner: RN

    def __init__(
        self,
        client: C,
        namespace: str | bytes,
        *,
        config: ScriptConfig | None = None,
        rng: RandomSource | None = None,
        use_functions: bool | None = None,
        retry: RetryPolicy | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        validate.client("client", client)
        if use_functions is not None:
            validate.flag("use_functions", use_functions)
        self.durability: Durability | None = durability(client, wait_replicas, wait_timeout_ms)
        self.client = client
        self.namespace = Namespace(namespace)
        self.config = config or ScriptConfig()
        self._rng = rng
        self.runner = self._connect(use_functions, retry)
        self.scripts: Mapping[str, RenderedScript] = self.runner.scripts

    def _connect(self, use_functions: bool | None, retry: RetryPolicy | None) -> RN:
        """The runner of this Scheduler's scripts (with ``self.durability``); sets ``slots``,
        ``nodes`` and ``pick`` on it. No I/O."""
        raise NotImplementedError

    #: Whether ``from_sentinel`` makes a ``redis.asyncio`` client.
    _asyncio = False

    @classmethod
    def from_sentinel(
        cls: type[SB],
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        namespace: str | bytes,
        *,
        sentinel_kwargs: Mapping[str, Any] | None = None,
        connection_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> SB:
        """A Scheduler on the primary that the sentinels name ``service_name``.

        Built on redis-py: ``Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs,
        **connection_kwargs).master_for(service_name)`` (``redis.asyncio.sentinel`` for
        ``luasched.asyncio.Scheduler``); ``sentinels`` is a list of ``(host, port)``;
        ``connection_kwargs`` go to the primary's connections (and to the sentinels' when
        ``sentinel_kwargs`` is None, as redis-py does); ``options`` are this class's
        (``wait_replicas``, ``retry``...). No I/O here.

        On top of redis-py's pool (which asks the sentinels only when it opens a connection),
        an error that says the primary moved -- ``READONLY``, ``NOREPLICAS``, ``NotReplicated``
        -- makes the Scheduler ask the sentinels again and drop its connections to the old
        primary before the call is sent again (``luasched.ha``). Raises InvalidArgument naming
        the parameter for a malformed ``sentinels``/``service_name``/kwargs."""
        client = sentinel_client(
            sentinels, service_name, sentinel_kwargs, connection_kwargs, asyncio=cls._asyncio
        )
        return cls(client, namespace, **options)

    def lock(
        self,
        name: str | bytes,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        fair: bool = False,
        reentrant: bool = False,
        auto_renew: bool = False,
        retry_ms: int = DEFAULT_RETRY_MS,
        wait_ttl_ms: int | None = None,
        timeout: float | None = None,
    ) -> L:
        """A distributed lock named ``name`` (any bytes): a ``luasched.lock.Lock`` (on
        ``luasched.asyncio``, a ``luasched.asyncio.lock.AsyncLock``). No I/O.

        ``with s.lock(name, timeout=5) as handle:`` (``async with`` on asyncio) waits up to
        ``timeout`` seconds (None: no limit) and raises ``luasched.LockTimeout`` if the lock was
        not granted."""
        return self._lock_class(
            self.runner,
            self.namespace,
            name,
            ttl_ms=ttl_ms,
            fair=fair,
            reentrant=reentrant,
            auto_renew=auto_renew,
            retry_ms=retry_ms,
            wait_ttl_ms=wait_ttl_ms,
            timeout=timeout,
        )

    def semaphore(
        self,
        name: str | bytes,
        permits: int,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        retry_ms: int = DEFAULT_RETRY_MS,
        timeout: float | None = None,
    ) -> S:
        """A counting semaphore of ``permits`` leased permits: a ``luasched.lock.Semaphore`` (on
        ``luasched.asyncio``, a ``luasched.asyncio.lock.AsyncSemaphore``). No I/O."""
        return self._semaphore_class(
            self.runner,
            self.namespace,
            name,
            permits,
            ttl_ms=ttl_ms,
            retry_ms=retry_ms,
            timeout=timeout,
        )

    def _sharded(
        self, name: str | bytes, partitions: int, block_slice_ms: int, options: dict[str, Any]
    ) -> Loop[tuple[bytes, list[Namespace]]]:
        """``sharded_queue`` up to its partitions (``luasched.loops``): the arguments checked,
        the layout read (or planned and recorded), and the maxmemory-policy of each partition's
        primary checked (a warning); the queue name as bytes and the partition namespaces."""
        raw = check_sharded(name, partitions, block_slice_ms, options)
        retry = self.runner.retry
        layout = yield from layout_loop(self.client, self.namespace, raw, partitions, retry)
        namespaces = []
        for candidate in layout:
            namespace = partition_namespace(self.namespace, candidate)
            # Attributed to the caller of sharded_queue: past this loop, its driver and the method.
            warn_policy((yield from policy_loop(self.client, namespace)), stacklevel=5)
            namespaces.append(namespace)
        return raw, namespaces


class Scheduler(SchedulerBase[SyncClient, ScriptRunner, Lock, Semaphore]):
    """The luasched API for one namespace on one redis-py client.

    ``client`` is a ``redis.Redis`` or a ``redis.cluster.RedisCluster`` that answers bytes
    (``decode_responses=False``, redis-py's default; a decoding client is refused here with
    InvalidArgument naming ``client``, before any call could lease a task it cannot read);
    ``namespace`` names
    the hash tag that holds every key of this scheduler (1..128 bytes, no braces). Creating a
    Scheduler does no network I/O. Its scripts come from ``render_all``: the default
    configuration's are read from the package (rendered when it was built), any other
    configuration is rendered once per process (thread-safe); they are sent to the server on
    first use (or up front with ``load_scripts``).

    Attributes:
        slots: hash slots and their owners (``s.slots.owner(key)``, ``s.slots.rebalance()``).
        nodes: the node registry (``s.nodes.register(node_id)``, ``s.nodes.heartbeat(...)``).
        pick: node selection (``s.pick.least_loaded()``, ``s.pick.weighted()``...); its random
            integers come from ``rng`` (default: a ``random.Random`` seeded by the OS).

    ``use_functions``: None (default) detects, once, whether the luasched Functions library
    (``luasched install-functions``, Redis 7.0+) is installed on every primary with exactly
    these scripts, and then calls them with FCALL instead of EVALSHA (same replies and effects;
    functions survive restarts and failovers). False: always EVALSHA. True: FCALL without
    detecting. Either way a call whose function is missing falls back to EVALSHA. Pipelines
    always use EVALSHA (EVAL on a cluster).

    ``retry``: how single calls ride out a failover or resharding (``luasched.retry``; default
    ``RetryPolicy()``: up to 30 sends within 20 s, backoff 25 ms doubling to 500 ms).
    """

    _lock_class = Lock
    _semaphore_class = Semaphore

    def _connect(self, use_functions: bool | None, retry: RetryPolicy | None) -> ScriptRunner:
        scripts = render_all(self.config)
        runner = ScriptRunner(
            self.client,
            scripts,
            use_functions=use_functions,
            retry=retry,
            durability=self.durability,
        )
        self.slots, self.nodes, self.pick = _api(runner, self.namespace, self._rng)
        return runner

    def install_functions(self) -> str:
        """``FUNCTION LOAD REPLACE`` the Functions library on every primary (Redis 7.0+); returns
        its name. Later calls of this Scheduler use FCALL (unless ``use_functions=False``)."""
        return self.runner.install_functions()

    def load_scripts(self) -> dict[str, str]:
        """``SCRIPT LOAD`` every script now (every primary of a cluster); name -> SHA1."""
        return self.runner.load()

    def queue(self, name: str | bytes, **options: Any) -> Queue:
        """The task queue ``name`` (1..1024 bytes); options as ``luasched.queue.Queue``.

        The first call per Scheduler reads the server's maxmemory-policy and warns
        (``RuntimeWarning``) if it could evict queue keys; CONFIG being refused is not an error.
        """
        options.setdefault("rng", self._rng)
        queue = Queue(self.runner, self.namespace, name, client=self.client, **options)
        if not getattr(self, "_eviction_checked", False):  # after the checks of Queue()
            self._eviction_checked = True
            check_eviction_policy(self.client, self.namespace)
        return queue

    def sharded_queue(
        self,
        name: str | bytes,
        partitions: int,
        *,
        block_slice_ms: int = DEFAULT_BLOCK_SLICE_MS,
        **options: Any,
    ) -> ShardedQueue:
        """One logical queue ``name`` over ``partitions`` partition namespaces placed on
        different primaries of a cluster (see ``luasched.sharded``); options as ``queue``.

        Reads (the first time: plans and records) the partition layout: a GET, and on first use
        CLUSTER SLOTS and a SET NX, in this namespace's slot. Warns like ``queue`` about an
        evicting maxmemory-policy of each partition's primary. Raises ValueError when the queue
        was created with another number of partitions.
        """
        loop = self._sharded(name, partitions, block_slice_ms, options)
        raw, namespaces = drive(loop, no_calls, self.client)
        queues = [Queue(self.runner, ns, raw, client=self.client, **options) for ns in namespaces]
        return ShardedQueue(queues, block_slice_ms=block_slice_ms)

    def pipeline(self) -> SchedulerPipeline:
        """A batch of calls sent in one round trip (not a transaction); see SchedulerPipeline."""
        return SchedulerPipeline(self.runner.batch(), self.namespace, self._rng)


B = TypeVar("B", bound=Sized)
Q = TypeVar("Q", bound="QueueCalls[Any]")


class PipelineBase(Generic[B, Q]):
    """What ``SchedulerPipeline`` and ``AsyncSchedulerPipeline`` share: the API objects on one
    batch (``slots``, ``nodes``, ``pick``, set by ``_connect``) and its queues."""

    _queue_class: type[Q]

    def __init__(self, batch: B, namespace: Namespace, rng: RandomSource | None = None) -> None:
        self._batch = batch
        self._namespace = namespace
        self._rng = rng
        self._connect()

    def _connect(self) -> None:
        """Set ``slots``, ``nodes`` and ``pick`` on the batch."""
        raise NotImplementedError

    def queue(self, name: str | bytes, **options: Any) -> Q:
        """The queue ``name``, queued: its calls (awaited, on asyncio) queue the call and return
        None; no blocking dequeue here."""
        options.setdefault("rng", self._rng)
        return self._queue_class(self._batch, self._namespace, name, **options)

    def __len__(self) -> int:
        return len(self._batch)


class SchedulerPipeline(PipelineBase[Batch, Queue]):
    """The Scheduler API, queued: methods return None; ``execute()`` returns the results.

    Usage::

        with scheduler.pipeline() as pipe:
            pipe.slots.keyslot("a")
            pipe.slots.keyslot("b")
            slot_a, slot_b = pipe.execute()

    Each call is atomic on its own; the batch is not a transaction. Calls that meet NOSCRIPT
    are loaded and retried once (they run after the other calls of the batch).
    """

    _queue_class = Queue

    def _connect(self) -> None:
        self.slots, self.nodes, self.pick = _api(self._batch, self._namespace, self._rng)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued calls; results in order (see ``Batch.execute``)."""
        return self._batch.execute(raise_on_error)

    def __enter__(self) -> SchedulerPipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None
