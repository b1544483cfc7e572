"""Async twin of ``luasched.scheduler``."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from luasched.asyncio.lock import AsyncLock, AsyncSemaphore
from luasched.asyncio.nodes import AsyncNodes
from luasched.asyncio.pick import AsyncPick
from luasched.asyncio.queue import AsyncQueue, check_eviction_policy_async
from luasched.asyncio.scripts import AsyncBatch, AsyncClient, AsyncScriptRunner
from luasched.asyncio.sharded import AsyncShardedQueue
from luasched.asyncio.slots import AsyncRunner, AsyncSlots
from luasched.keys import Namespace
from luasched.loops import drive_async, no_calls
from luasched.pick import RandomSource
from luasched.render import LazyScripts
from luasched.retry import RetryPolicy
from luasched.scheduler import PipelineBase, SchedulerBase
from luasched.sharded import DEFAULT_BLOCK_SLICE_MS

__all__ = ["AsyncSchedulerPipeline", "Scheduler"]


def _api(
    runner: AsyncRunner, namespace: Namespace, rng: RandomSource | None
) -> tuple[AsyncSlots, AsyncNodes, AsyncPick]:
    """The ``slots``, ``nodes`` and ``pick`` of a Scheduler (its runner) or a pipeline (batch)."""
    return (
        AsyncSlots(runner, namespace),
        AsyncNodes(runner, namespace),
        AsyncPick(runner, namespace, rng),
    )


class Scheduler(SchedulerBase[AsyncClient, AsyncScriptRunner, AsyncLock, AsyncSemaphore]):
    """The luasched API on a ``redis.asyncio`` client; see ``luasched.Scheduler``.

    Creating it does no work: its scripts are loaded (or, for a custom configuration, rendered)
    in a worker thread before its first call, never on the event loop.
    """

    _lock_class = AsyncLock
    _semaphore_class = AsyncSemaphore
    _asyncio = True

    def _connect(self, use_functions: bool | None, retry: RetryPolicy | None) -> AsyncScriptRunner:
        # Loaded (or, for a custom configuration, rendered) in a worker thread before the first
        # call: never on the event loop (AsyncScriptRunner.ready).
        lazy = LazyScripts(self.config)
        runner = AsyncScriptRunner(
            self.client, lazy, use_functions=use_functions, retry=retry, durability=self.durability
        )
        self.slots, self.nodes, self.pick = _api(runner, self.namespace, self._rng)
        return runner

    async def install_functions(self) -> str:
        """Install the Redis Functions library on every primary (Redis 7.0+); its name."""
        return await self.runner.install_functions()

    async def load_scripts(self) -> dict[str, str]:
        """``SCRIPT LOAD`` every script now (every primary of a cluster); name -> SHA1."""
        return await self.runner.load()

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
        loop = self._sharded(name, partitions, block_slice_ms, options)
        raw, namespaces = await drive_async(loop, no_calls, self.client)
        queues = [
            AsyncQueue(self.runner, ns, raw, client=self.client, **options) for ns in namespaces
        ]
        return AsyncShardedQueue(queues, block_slice_ms=block_slice_ms)

    def pipeline(self) -> AsyncSchedulerPipeline:
        """A batch of calls sent in one round trip (not a transaction)."""
        return AsyncSchedulerPipeline(self.runner.batch(), self.namespace, self._rng)


class AsyncSchedulerPipeline(PipelineBase[AsyncBatch, AsyncQueue]):
    """Async twin of ``luasched.SchedulerPipeline``: ``await pipe.slots.keyslot(k)`` queues."""

    _queue_class = AsyncQueue

    def _connect(self) -> None:
        self.slots, self.nodes, self.pick = _api(self._batch, self._namespace, self._rng)

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
