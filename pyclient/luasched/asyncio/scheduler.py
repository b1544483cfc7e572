"""Async twin of ``luasched.scheduler``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from luasched import validate
from luasched.asyncio.lock import AsyncLock, AsyncSemaphore
from luasched.asyncio.nodes import AsyncNodes
from luasched.asyncio.pick import AsyncPick
from luasched.asyncio.queue import AsyncQueue, check_eviction_policy_async
from luasched.asyncio.scripts import AsyncBatch, AsyncClient, AsyncScriptRunner
from luasched.asyncio.sharded import AsyncShardedQueue, sharded_layout_async
from luasched.asyncio.slots import AsyncSlots
from luasched.ha import DEFAULT_WAIT_TIMEOUT_MS, durability, sentinel_client
from luasched.keys import Namespace
from luasched.lock import DEFAULT_RETRY_MS, DEFAULT_TTL_MS
from luasched.pick import RandomSource
from luasched.render import LazyScripts, RenderedScript, ScriptConfig
from luasched.retry import RetryPolicy
from luasched.sharded import DEFAULT_BLOCK_SLICE_MS, check_sharded, partition_namespace

__all__ = ["AsyncSchedulerPipeline", "Scheduler"]


class Scheduler:
    """The luasched API on a ``redis.asyncio`` client; see ``luasched.Scheduler``.

    Creating it does no work: its scripts are loaded (or, for a custom configuration, rendered)
    in a worker thread before its first call, never on the event loop.
    """

    def __init__(
        self,
        client: AsyncClient,
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
        self.durability = durability(client, wait_replicas, wait_timeout_ms)
        self.client = client
        self.namespace = Namespace(namespace)
        self.config = config or ScriptConfig()
        # Loaded (or, for a custom configuration, rendered) in a worker thread before the first
        # call: never on the event loop (AsyncScriptRunner.ready).
        self.scripts: Mapping[str, RenderedScript] = LazyScripts(self.config)
        self.runner = AsyncScriptRunner(
            client,
            self.scripts,
            use_functions=use_functions,
            retry=retry,
            durability=self.durability,
        )
        self.slots = AsyncSlots(self.runner, self.namespace)
        self.nodes = AsyncNodes(self.runner, self.namespace)
        self.pick = AsyncPick(self.runner, self.namespace, rng)
        self._rng = rng

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        namespace: str | bytes,
        *,
        sentinel_kwargs: Mapping[str, Any] | None = None,
        connection_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Scheduler:
        """A Scheduler on the primary that the sentinels name ``service_name`` (asyncio twin of
        ``luasched.Scheduler.from_sentinel``: redis-py's ``redis.asyncio.sentinel.Sentinel``)."""
        client = sentinel_client(
            sentinels, service_name, sentinel_kwargs, connection_kwargs, asyncio=True
        )
        return cls(client, namespace, **options)

    async def install_functions(self) -> str:
        """Install the Redis Functions library on every primary (Redis 7.0+); its name."""
        return await self.runner.install_functions()

    async def load_scripts(self) -> dict[str, str]:
        """``SCRIPT LOAD`` every script now (every primary of a cluster); name -> SHA1."""
        return await self.runner.load()

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
    ) -> AsyncLock:
        """A distributed lock named ``name``; see ``luasched.asyncio.lock.AsyncLock``. No I/O."""
        return AsyncLock(
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
    ) -> AsyncSemaphore:
        """A counting semaphore; see ``luasched.asyncio.lock.AsyncSemaphore``. No I/O."""
        return AsyncSemaphore(
            self.runner,
            self.namespace,
            name,
            permits,
            ttl_ms=ttl_ms,
            retry_ms=retry_ms,
            timeout=timeout,
        )

    def queue(self, name: str | bytes, **options: Any) -> AsyncQueue:
        """The task queue ``name``; see ``luasched.Scheduler.queue``. No I/O here: the first
        awaited call of the first queue checks the server's maxmemory-policy (a warning)."""
        hook = None
        if not getattr(self, "_eviction_checked", False):
            self._eviction_checked = True

            async def hook() -> None:
                await check_eviction_policy_async(self.client, self.namespace)

        options.setdefault("rng", self._rng)
        return AsyncQueue(
            self.runner, self.namespace, name, client=self.client, on_first_call=hook, **options
        )

    async def sharded_queue(
        self,
        name: str | bytes,
        partitions: int,
        *,
        block_slice_ms: int = DEFAULT_BLOCK_SLICE_MS,
        **options: Any,
    ) -> AsyncShardedQueue:
        """See ``luasched.Scheduler.sharded_queue`` (awaited: it reads the layout)."""
        raw = check_sharded(name, partitions, block_slice_ms, options)
        layout = await sharded_layout_async(
            self.client, self.namespace, raw, partitions, self.runner.retry
        )
        queues = []
        for candidate in layout:
            namespace = partition_namespace(self.namespace, candidate)
            await check_eviction_policy_async(self.client, namespace)
            queues.append(AsyncQueue(self.runner, namespace, raw, client=self.client, **options))
        return AsyncShardedQueue(queues, block_slice_ms=block_slice_ms)

    def pipeline(self) -> AsyncSchedulerPipeline:
        """A batch of calls sent in one round trip (not a transaction)."""
        return AsyncSchedulerPipeline(self.runner.batch(), self.namespace, self._rng)


class AsyncSchedulerPipeline:
    """Async twin of ``luasched.SchedulerPipeline``: ``await pipe.slots.keyslot(k)`` queues."""

    def __init__(
        self, batch: AsyncBatch, namespace: Namespace, rng: RandomSource | None = None
    ) -> None:
        self._batch = batch
        self.slots = AsyncSlots(batch, namespace)
        self.nodes = AsyncNodes(batch, namespace)
        self.pick = AsyncPick(batch, namespace, rng)
        self._queue_namespace = namespace
        self._rng = rng

    def queue(self, name: str | bytes, **options: Any) -> AsyncQueue:
        """The queue ``name``, queued: ``await pipe.queue(n).enqueue(...)`` queues the call."""
        options.setdefault("rng", self._rng)
        return AsyncQueue(self._batch, self._queue_namespace, name, **options)

    def __len__(self) -> int:
        return len(self._batch)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued calls; results in order."""
        return await self._batch.execute(raise_on_error)

    async def __aenter__(self) -> AsyncSchedulerPipeline:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None
