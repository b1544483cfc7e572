"""Async twin of ``luasched.sharded``: the same placement, routing and rotation, awaited I/O."""

from __future__ import annotations

import time
from typing import Any

from luasched.asyncio.queue import AsyncQueue
from luasched.keys import Namespace
from luasched.leases import Lease, Nacked, check_take, remaining_ms
from luasched.queue import Enqueued
from luasched.retry import RetryPolicy
from luasched.sharded import (
    PartitionLease,
    ShardedBase,
    ShardedStats,
    _check_lease,
    checked_layout,
    encode_layout,
    layout_key,
    partition_for,
    plan_layout,
    slot_groups,
)

__all__ = ["AsyncShardedQueue", "sharded_layout_async"]


async def sharded_layout_async(
    client: Any, base: Namespace, name: bytes, partitions: int, retry: RetryPolicy
) -> tuple[int, ...]:
    """Async twin of ``luasched.sharded.sharded_layout``."""
    from luasched.scripts import is_cluster

    key = layout_key(base, name)
    value = await retry.call_async(lambda: client.get(key))
    if value is None:
        groups = None
        if is_cluster(client):
            groups = slot_groups(await retry.call_async(lambda: client.cluster_slots()))
        planned = encode_layout(plan_layout(base, partitions, groups))
        await retry.call_async(lambda: client.set(key, planned, nx=True))
        value = await retry.call_async(lambda: client.get(key))
    return checked_layout(value, partitions, name)


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
    ) -> Enqueued:
        """See ``luasched.sharded.ShardedQueue.enqueue``."""
        partition = partition_for(task_id, routing_key, len(self.partitions))
        return await self.partitions[partition].enqueue(
            task_id,
            payload,
            priority=priority,
            delay_ms=delay_ms,
            max_attempts=max_attempts,
            request_id=request_id,
        )

    async def _sweep(
        self, worker_id: str | bytes, count: int, lease_ms: int
    ) -> list[PartitionLease]:
        taken: list[PartitionLease] = []
        last: int | None = None
        for partition in self.rotation.order(worker_id):
            queue = self.partitions[partition]
            leases = await queue.dequeue_many(worker_id, count - len(taken), lease_ms)
            if leases:
                last = partition
                taken += [PartitionLease.of(lease, partition) for lease in leases]
                if len(taken) >= count:
                    break
        self.rotation.served(worker_id, last)
        return taken

    async def dequeue_many(
        self, worker_id: str | bytes, n: int, lease_ms: int, *, block_ms: int = 0
    ) -> list[PartitionLease]:
        """See ``luasched.sharded.ShardedQueue.dequeue_many``."""
        check_take(worker_id, n, lease_ms, block_ms)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            taken = await self._sweep(worker_id, n, lease_ms)
            wait_ms = remaining_ms(deadline)
            if taken or wait_ms <= 0:
                return taken
            partition = self.rotation.order(worker_id)[0]
            leases = await self.partitions[partition].dequeue_many(
                worker_id, n, lease_ms, block_ms=min(wait_ms, self.block_slice_ms)
            )
            self.rotation.served(worker_id, partition if leases else None)
            if leases:
                return [PartitionLease.of(lease, partition) for lease in leases]

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
        held = _check_lease(lease, len(self.partitions))
        check_take(worker_id, 1, lease_ms, block_ms)
        if self.rotation.order(worker_id)[0] == held.partition:
            queue = self.partitions[held.partition]
            following = await queue.ack_and_dequeue(held, worker_id, lease_ms)
            if following is not None:
                self.rotation.served(worker_id, held.partition)
                return PartitionLease.of(following, held.partition)
        else:
            await self.ack(held)
        return await self.dequeue(worker_id, lease_ms, block_ms=block_ms)

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
