"""Async twin of ``luasched.queue``: the same calls and results, awaited I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from luasched import validate
from luasched.asyncio.slots import AsyncRunner
from luasched.dispatch import (
    Dispatched,
    DispatchStats,
    NodeCounts,
    NodeQueueCalls,
    Redispatched,
    RequeuedDispatched,
    Strategy,
    dispatch_stats_call,
)
from luasched.keys import Namespace
from luasched.leases import (
    DEFAULT_BACKOFF_BASE_MS,
    DEFAULT_BACKOFF_MAX_MS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_POLL_MS,
    DEFAULT_REQUEST_TTL_MS,
    Lease,
    Nacked,
)
from luasched.loops import Loop, drive_async, no_calls
from luasched.pick import RandomSource
from luasched.queue import (
    Enqueued,
    GroupSettings,
    GroupStats,
    QueueCalls,
    QueueLimits,
    QueueStats,
    RateLimit,
    group_stats_call,
    policy_loop,
    warn_policy,
)
from luasched.scripts import Call

__all__ = ["AsyncNodeQueue", "AsyncQueue", "check_eviction_policy_async"]


async def check_eviction_policy_async(client: Any, namespace: Namespace) -> str | None:
    """Async twin of ``luasched.queue.check_eviction_policy``."""
    return warn_policy(await drive_async(policy_loop(client, namespace), no_calls, client))


class AsyncQueue(QueueCalls[AsyncRunner]):
    """One task queue (``s.queue(name)``); see ``luasched.queue.Queue``.

    The first awaited call of a queue made by ``Scheduler.queue`` checks the server's
    maxmemory-policy once per Scheduler (a warning, never an error).
    """

    def __init__(
        self,
        runner: AsyncRunner,
        namespace: Namespace,
        name: str | bytes,
        *,
        client: Any = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base_ms: int = DEFAULT_BACKOFF_BASE_MS,
        backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS,
        request_ttl_ms: int = DEFAULT_REQUEST_TTL_MS,
        poll_ms: int = DEFAULT_POLL_MS,
        on_first_call: Any = None,
        rng: RandomSource | None = None,
        grouped: bool = False,
    ) -> None:
        super().__init__(
            runner,
            namespace,
            name,
            client=client,
            max_attempts=max_attempts,
            backoff_base_ms=backoff_base_ms,
            backoff_max_ms=backoff_max_ms,
            request_ttl_ms=request_ttl_ms,
            poll_ms=poll_ms,
            rng=rng,
            grouped=grouped,
        )
        self._on_first_call = on_first_call

    async def _run(self, call: Call[Any]) -> Any:
        if self._on_first_call is not None:
            hook, self._on_first_call = self._on_first_call, None
            await hook()
        return await self._runner.run(call)

    async def _do(self, plan: Call[Any] | Loop[Any]) -> Any:
        """Run ``plan``: one call, or a blocking take's loop (``luasched.loops.drive_async``)."""
        if isinstance(plan, Call):
            return await self._run(plan)
        return await drive_async(plan, self._run, self._client)

    async def _switching(self, build: Callable[[], Call[Any] | Loop[Any]]) -> Any:
        """``luasched.queue.Queue._switching``, awaited (the same loop)."""
        return await drive_async(self._switching_loop(build), self._run, self._client)

    async def enqueue(
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
        """Add a task; see ``luasched.queue.Queue.enqueue``."""
        return await self._run(  # type: ignore[no-any-return]
            self._enqueue_call(
                task_id, payload, priority, delay_ms, max_attempts, request_id, group
            )
        )

    async def dequeue(
        self,
        worker_id: str | bytes,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> Lease | None:
        """Take and lease the next task; see ``luasched.queue.Queue.dequeue``."""
        return await self._switching(  # type: ignore[no-any-return]
            lambda: self._take_plan(worker_id, 1, lease_ms, block_ms, None, request_id, "one")
        )

    async def dequeue_many(
        self,
        worker_id: str | bytes,
        n: int,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> list[Lease]:
        """Take up to ``n``; see ``luasched.queue.Queue.dequeue_many``."""
        return await self._switching(  # type: ignore[no-any-return]
            lambda: self._take_plan(worker_id, n, lease_ms, block_ms, None, request_id, "many")
        )

    async def ack_and_dequeue(
        self,
        lease: Lease,
        worker_id: str | bytes,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> Lease | None:
        """Ack and take the next; see ``luasched.queue.Queue.ack_and_dequeue``."""
        validate.lease("lease", lease, self.keys.tasks)  # None means no ack: refuse it
        return await self._switching(  # type: ignore[no-any-return]
            lambda: self._take_plan(worker_id, 1, lease_ms, block_ms, lease, request_id, "one")
        )

    async def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish a task; see ``luasched.queue.Queue.ack``."""
        return await self._switching(lambda: self._ack_call(lease, request_id))  # type: ignore[no-any-return]

    async def nack(
        self,
        lease: Lease,
        delay_ms: int | None = None,
        reason: str | bytes = b"",
        *,
        request_id: str | bytes | None = None,
    ) -> Nacked:
        """A failed attempt; see ``luasched.queue.Queue.nack``."""
        return await self._switching(  # type: ignore[no-any-return]
            lambda: self._nack_call(lease, delay_ms, reason, request_id)
        )

    async def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move the deadline; see ``luasched.queue.Queue.extend``."""
        return await self._run(self._extend_call(lease, lease_ms))  # type: ignore[no-any-return]

    async def requeue_dead(self, task_id: str | bytes) -> bool:
        """Bring a dead letter back; see ``luasched.queue.Queue.requeue_dead``."""
        status = await self._switching(lambda: self._requeue_dead_call(task_id))
        return status == "requeued" if status is not None else False

    async def stats(self) -> QueueStats:
        """Counts; see ``luasched.queue.Queue.stats``."""
        return await self._run(self._stats_call())  # type: ignore[no-any-return]

    # ----------------------------------------------------------------------------------------
    # Groups, caps and pause (see luasched.queue.Queue)

    async def set_group(
        self,
        group: str | bytes,
        *,
        weight: int | None = None,
        max_active: int | None = None,
        paused: bool | None = None,
    ) -> GroupSettings:
        """A group's weight, cap and pause; see ``luasched.queue.Queue.set_group``."""
        call = self._set_group_call(group, weight, max_active, paused)
        return await self._run(call)  # type: ignore[no-any-return]

    async def set_limits(
        self, *, max_active: int | None = None, paused: bool | None = None
    ) -> QueueLimits:
        """The queue's cap and pause; see ``luasched.queue.Queue.set_limits``."""
        return await self._run(self._set_limits_call(max_active, paused))  # type: ignore[no-any-return]

    async def set_rate(
        self, per_second: int, burst: int = 1, group: str | bytes | None = None
    ) -> RateLimit:
        """A rate limit; see ``luasched.queue.Queue.set_rate``."""
        return await self._run(self._set_rate_call(per_second, burst, group))  # type: ignore[no-any-return]

    async def group_stats(self, groups: tuple[str | bytes, ...] | list[str | bytes]) -> GroupStats:
        """Counts of the groups; see ``luasched.queue.Queue.group_stats``."""
        return await self._run(group_stats_call(self.group_keys, groups))  # type: ignore[no-any-return]

    async def pause(self, group: str | bytes | None = None) -> None:
        """Pause the queue or one group; see ``luasched.queue.Queue.pause``."""
        await self._run(self._pause_call(group, True))

    async def resume(self, group: str | bytes | None = None) -> None:
        """Resume; see ``luasched.queue.Queue.resume``."""
        await self._run(self._pause_call(group, False))

    # ----------------------------------------------------------------------------------------
    # Dispatch to nodes (see luasched.queue.Queue)

    async def dispatch(
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
        """Choose a node and queue the task for it; see ``luasched.queue.Queue.dispatch``."""
        call = self._dispatch_call(
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
        return await self._run(call)  # type: ignore[no-any-return]

    def for_node(self, node_id: str | bytes) -> AsyncNodeQueue:
        """The tasks dispatched to ``node_id``; see ``luasched.queue.Queue.for_node``."""
        return AsyncNodeQueue(self, self._node_id(node_id))

    async def redispatch(self, node_id: str | bytes, limit: int = 100) -> Redispatched:
        """Move tasks off a dead node; see ``luasched.queue.Queue.redispatch``."""
        return await self._run(self._redispatch_call(node_id, limit))  # type: ignore[no-any-return]

    async def requeue_dead_dispatched(self, task_id: str | bytes) -> RequeuedDispatched:
        """Dispatch a dead letter again; see ``luasched.queue.Queue.requeue_dead_dispatched``."""
        call = self._requeue_dead_dispatched_call(task_id)
        return await self._run(call)  # type: ignore[no-any-return]

    async def dispatch_stats(
        self, nodes: tuple[str | bytes, ...] | list[str | bytes]
    ) -> DispatchStats:
        """Counts of the dispatched tasks; see ``luasched.queue.Queue.dispatch_stats``."""
        call = dispatch_stats_call(self.dispatch_keys, nodes)
        return await self._run(call)  # type: ignore[no-any-return]


class AsyncNodeQueue(NodeQueueCalls[AsyncQueue]):
    """Async twin of ``luasched.queue.NodeQueue`` (``q.for_node(node_id)``)."""

    async def dequeue(
        self,
        worker_id: str | bytes,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> Lease | None:
        """Take the node's next task; see ``luasched.queue.NodeQueue.dequeue``."""
        plan = self._take_plan(worker_id, 1, lease_ms, block_ms, request_id, "one")
        return await self.queue._do(plan)  # type: ignore[no-any-return]

    async def dequeue_many(
        self,
        worker_id: str | bytes,
        n: int,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> list[Lease]:
        """Take up to ``n``; see ``luasched.queue.NodeQueue.dequeue_many``."""
        plan = self._take_plan(worker_id, n, lease_ms, block_ms, request_id, "many")
        return await self.queue._do(plan)  # type: ignore[no-any-return]

    async def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish the task; see ``luasched.queue.NodeQueue.ack``."""
        call = self.queue._ack_call(lease, request_id, "queue.node_ack")
        return await self.queue._run(call)  # type: ignore[no-any-return]

    async def nack(
        self,
        lease: Lease,
        delay_ms: int | None = None,
        reason: str | bytes = b"",
        *,
        request_id: str | bytes | None = None,
    ) -> Nacked:
        """A failed attempt; see ``luasched.queue.NodeQueue.nack``."""
        call = self.queue._nack_call(lease, delay_ms, reason, request_id, "queue.node_nack")
        return await self.queue._run(call)  # type: ignore[no-any-return]

    async def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move the deadline; see ``luasched.queue.NodeQueue.extend``."""
        call = self.queue._extend_call(lease, lease_ms, "queue.node_extend")
        return await self.queue._run(call)  # type: ignore[no-any-return]

    async def stats(self) -> NodeCounts:
        """This node's counts; see ``luasched.queue.NodeQueue.stats``."""
        return await self.queue._run(self._stats_call())  # type: ignore[no-any-return]
