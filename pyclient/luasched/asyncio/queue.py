"""Async twin of ``luasched.queue``: the same calls and results, awaited I/O."""

from __future__ import annotations

from typing import Any

from luasched import validate
from luasched.asyncio.slots import AsyncRunner
from luasched.dispatch import (
    Dispatched,
    DispatchKeys,
    DispatchStats,
    NodeCounts,
    NodeWait,
    Redispatched,
    RequeuedDispatched,
    Strategy,
    dispatch_call,
    dispatch_requeue_dead_call,
    dispatch_stats_call,
    node_ack_call,
    node_extend_call,
    node_nack_call,
    node_take,
    redispatch_call,
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
    TakeCall,
    ack_call,
    blocking_take,
    check_take,
    extend_call,
    nack_call,
)
from luasched.loops import drive_async
from luasched.pick import RandomSource, default_rng
from luasched.queue import (
    Enqueued,
    QueueKeys,
    QueueStats,
    check_queue_options,
    dequeue_call,
    enqueue_call,
    requeue_dead_call,
    stats_call,
)
from luasched.scripts import Call

__all__ = ["AsyncNodeQueue", "AsyncQueue", "check_eviction_policy_async"]


async def check_eviction_policy_async(client: Any, namespace: Namespace) -> str | None:
    """Async twin of ``luasched.queue.check_eviction_policy``."""
    import warnings

    from luasched.queue import _policy_of, policy_warning
    from luasched.scripts import is_cluster

    try:
        if is_cluster(client):
            node = client.get_node_from_key(namespace.prefix)
            config = await client.config_get("maxmemory-policy", target_nodes=node)
        else:
            config = await client.config_get("maxmemory-policy")
    except Exception:  # CONFIG may be refused (ACL, managed services): never fatal
        return None
    policy = _policy_of(config)
    message = policy and policy_warning(policy)
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return policy


class AsyncQueue:
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
    ) -> None:
        check_queue_options(max_attempts, backoff_base_ms, backoff_max_ms, request_ttl_ms, poll_ms)
        self._runner = runner
        self._client = client
        self._on_first_call = on_first_call
        self.keys = QueueKeys.of(namespace, name)
        self.name = self.keys.queue
        self.dispatch_keys = DispatchKeys.of(namespace, self.name)
        self._rng = rng if rng is not None else default_rng()
        self.max_attempts = max_attempts
        self.backoff_base_ms = backoff_base_ms
        self.backoff_max_ms = backoff_max_ms
        self.request_ttl_ms = request_ttl_ms
        self.poll_ms = poll_ms

    async def _run(self, call: Call[Any]) -> Any:
        if self._on_first_call is not None:
            hook, self._on_first_call = self._on_first_call, None
            await hook()
        return await self._runner.run(call)

    async def enqueue(
        self,
        task_id: str | bytes,
        payload: str | bytes = b"",
        *,
        priority: int = 0,
        delay_ms: int = 0,
        max_attempts: int | None = None,
        request_id: str | bytes | None = None,
    ) -> Enqueued:
        """Add a task; see ``luasched.queue.Queue.enqueue``."""
        result: Enqueued = await self._run(
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
        return result

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

    async def _take(
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

        return await self._blocking_take(call, self.keys.wake, block_ms, ack, request_id, shape)

    async def _blocking_take(
        self,
        call: TakeCall,
        wake: bytes | NodeWait,
        block_ms: int,
        ack: Lease | None,
        request_id: str | bytes | None,
        shape: str,
    ) -> Any:
        """Async twin of ``luasched.queue.Queue._blocking_take``."""
        if block_ms <= 0:
            return await self._run(call(0, ack, request_id, shape))
        if self._client is None:
            raise ValueError("a blocking dequeue cannot be queued in a pipeline")
        loop = blocking_take(call, wake, block_ms, ack, request_id, shape, self.poll_ms)
        return await drive_async(loop, self._run, self._client)

    async def dequeue(
        self,
        worker_id: str | bytes,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> Lease | None:
        """Take and lease the next task; see ``luasched.queue.Queue.dequeue``."""
        lease: Lease | None = await self._take(
            worker_id, 1, lease_ms, block_ms, None, request_id, "one"
        )
        return lease

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
        leases: list[Lease] = await self._take(
            worker_id, n, lease_ms, block_ms, None, request_id, "many"
        )
        return leases

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
        taken: Lease | None = await self._take(
            worker_id, 1, lease_ms, block_ms, lease, request_id, "one"
        )
        return taken

    async def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish a task; see ``luasched.queue.Queue.ack``."""
        done: bool = await self._run(
            ack_call(self.keys, lease, request_id=request_id, request_ttl_ms=self.request_ttl_ms)
        )
        return done

    async def nack(
        self,
        lease: Lease,
        delay_ms: int | None = None,
        reason: str | bytes = b"",
        *,
        request_id: str | bytes | None = None,
    ) -> Nacked:
        """A failed attempt; see ``luasched.queue.Queue.nack``."""
        result: Nacked = await self._run(
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
        return result

    async def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move the deadline; see ``luasched.queue.Queue.extend``."""
        deadline: int = await self._run(extend_call(self.keys, lease, lease_ms))
        return deadline

    async def requeue_dead(self, task_id: str | bytes) -> bool:
        """Bring a dead letter back; see ``luasched.queue.Queue.requeue_dead``."""
        status = await self._run(requeue_dead_call(self.keys, task_id))
        return status == "requeued" if status is not None else False

    async def stats(self) -> QueueStats:
        """Counts; see ``luasched.queue.Queue.stats``."""
        result: QueueStats = await self._run(stats_call(self.keys))
        return result

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
    ) -> Dispatched:
        """Choose a node and queue the task for it; see ``luasched.queue.Queue.dispatch``."""
        result: Dispatched = await self._run(
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
        return result

    def for_node(self, node_id: str | bytes) -> AsyncNodeQueue:
        """The tasks dispatched to ``node_id``; see ``luasched.queue.Queue.for_node``."""
        return AsyncNodeQueue(self, validate.arg("queue.node_dequeue", "node_id", node_id))

    async def redispatch(self, node_id: str | bytes, limit: int = 100) -> Redispatched:
        """Move tasks off a dead node; see ``luasched.queue.Queue.redispatch``."""
        result: Redispatched = await self._run(
            redispatch_call(self.dispatch_keys, node_id, self._rng, limit)
        )
        return result

    async def requeue_dead_dispatched(self, task_id: str | bytes) -> RequeuedDispatched:
        """Dispatch a dead letter again; see ``luasched.queue.Queue.requeue_dead_dispatched``."""
        result: RequeuedDispatched = await self._run(
            dispatch_requeue_dead_call(self.dispatch_keys, task_id, self._rng)
        )
        return result

    async def dispatch_stats(
        self, nodes: tuple[str | bytes, ...] | list[str | bytes]
    ) -> DispatchStats:
        """Counts of the dispatched tasks; see ``luasched.queue.Queue.dispatch_stats``."""
        result: DispatchStats = await self._run(dispatch_stats_call(self.dispatch_keys, nodes))
        return result


class AsyncNodeQueue:
    """Async twin of ``luasched.queue.NodeQueue`` (``q.for_node(node_id)``)."""

    def __init__(self, queue: AsyncQueue, node_id: bytes) -> None:
        self.queue = queue
        self.node = node_id

    async def _take(
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
        wait = keys.node_wait(self.node)
        return await q._blocking_take(call, wait, block_ms, None, request_id, shape)

    async def dequeue(
        self,
        worker_id: str | bytes,
        lease_ms: int,
        *,
        block_ms: int = 0,
        request_id: str | bytes | None = None,
    ) -> Lease | None:
        """Take the node's next task; see ``luasched.queue.NodeQueue.dequeue``."""
        lease: Lease | None = await self._take(worker_id, 1, lease_ms, block_ms, request_id, "one")
        return lease

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
        leases: list[Lease] = await self._take(worker_id, n, lease_ms, block_ms, request_id, "many")
        return leases

    async def ack(self, lease: Lease, *, request_id: str | bytes | None = None) -> bool:
        """Finish the task; see ``luasched.queue.NodeQueue.ack``."""
        q = self.queue
        done: bool = await q._run(
            node_ack_call(
                q.dispatch_keys, lease, request_id=request_id, request_ttl_ms=q.request_ttl_ms
            )
        )
        return done

    async def nack(
        self,
        lease: Lease,
        delay_ms: int | None = None,
        reason: str | bytes = b"",
        *,
        request_id: str | bytes | None = None,
    ) -> Nacked:
        """A failed attempt; see ``luasched.queue.NodeQueue.nack``."""
        q = self.queue
        result: Nacked = await q._run(
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
        return result

    async def extend(self, lease: Lease, lease_ms: int) -> int:
        """Move the deadline; see ``luasched.queue.NodeQueue.extend``."""
        deadline: int = await self.queue._run(
            node_extend_call(self.queue.dispatch_keys, lease, lease_ms)
        )
        return deadline

    async def stats(self) -> NodeCounts:
        """This node's counts; see ``luasched.queue.NodeQueue.stats``."""
        result: DispatchStats = await self.queue._run(
            dispatch_stats_call(self.queue.dispatch_keys, (self.node,))
        )
        return result.nodes[self.node]
