"""Async twin of ``luasched.sharded``: the same placement, routing and rotation, awaited I/O."""

from __future__ import annotations

from typing import Any

from luasched.asyncio.queue import AsyncQueue
from luasched.keys import Namespace
from luasched.leases import Lease, Nacked
from luasched.loops import drive_async, no_calls
from luasched.queue import Enqueued
from luasched.retry import RetryPolicy
from luasched.sharded import (
    PartitionLease,
    ShardedBase,
    ShardedStats,
    _check_lease,
    layout_loop,
    partition_for,
)

__all__ = ["AsyncShardedQueue", "sharded_layout_async"]


async def sharded_layout_async(
    client: Any, base: Namespace, name: bytes, partitions: int, retry: RetryPolicy
) -> tuple[int, ...]:
    """Async twin of ``luasched.sharded.sharded_layout``."""
    return await drive_async(layout_loop(client, base, name, partitions, retry), no_calls, client)


class AsyncShardedQueue(ShardedBase[AsyncQueue]):
    """Async twin of ``luasched.sharded.ShardedQueue`` (``await s.sharded_queue(name, k)``)."""

    async def enqueue(
        self,
        task_id: str | bytes,
        payload: str | bytes = b"",
        *,
        routing_key: str | bytes | None = None,
        priority: int = 0,
        delay_ms: int = 0,
        max_attempts: int | None = None,
        request_id: str | bytes | None = None,
        group: str | bytes | None = None,
    ) -> Enqueued:
        """See ``luasched.sharded.ShardedQueue.enqueue``."""
        return await self._enqueue_partition(task_id, routing_key, group).enqueue(
            task_id,
            payload,
            priority=priority,
            delay_ms=delay_ms,
            max_attempts=max_attempts,
            request_id=request_id,
        )

    async def dequeue_many(
        self, worker_id: str | bytes, n: int, lease_ms: int, *, block_ms: int = 0
    ) -> list[PartitionLease]:
        """See ``luasched.sharded.ShardedQueue.dequeue_many``."""
        return await drive_async(self._take(worker_id, n, lease_ms, block_ms), no_calls, None)

    async def dequeue(
        self, worker_id: str | bytes, lease_ms: int, *, block_ms: int = 0
    ) -> PartitionLease | None:
        """See ``luasched.sharded.ShardedQueue.dequeue``."""
        taken = await self.dequeue_many(worker_id, 1, lease_ms, block_ms=block_ms)
        return taken[0] if taken else None

    async def ack_and_dequeue(
        self, lease: Lease, worker_id: str | bytes, lease_ms: int, *, block_ms: int = 0
    ) -> PartitionLease | None:
        """See ``luasched.sharded.ShardedQueue.ack_and_dequeue``."""
        loop = self._ack_and_take(lease, worker_id, lease_ms, block_ms)
        return await drive_async(loop, no_calls, None)

    async def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """``ack`` on the lease's partition."""
        held = _check_lease(lease, len(self.partitions))
        return await self.partitions[held.partition].ack(held, request_id=request_id)

    async def nack(
        self,
        lease: Lease,
        delay_ms: int | None = None,
        reason: str | bytes = b"",
        *,
        request_id: str | bytes | None = None,
    ) -> Nacked:
        """``nack`` on the lease's partition."""
        held = _check_lease(lease, len(self.partitions))
        return await self.partitions[held.partition].nack(
            held, delay_ms, reason, request_id=request_id
        )

    async def extend(self, lease: Lease, lease_ms: int) -> int:
        """``extend`` on the lease's partition."""
        held = _check_lease(lease, len(self.partitions))
        return await self.partitions[held.partition].extend(held, lease_ms)

    async def requeue_dead(
        self, task_id: str | bytes, *, routing_key: str | bytes | None = None
    ) -> bool:
        """``requeue_dead`` on the partition of ``routing_key`` (default: the task id)."""
        partition = partition_for(task_id, routing_key, len(self.partitions))
        return await self.partitions[partition].requeue_dead(task_id)

    async def stats(self) -> ShardedStats:
        """Every partition's ``stats()``."""
        return ShardedStats(tuple([await queue.stats() for queue in self.partitions]))
