"""Async twin of ``luasched.nodes``."""

from __future__ import annotations

from luasched.asyncio.slots import AsyncRunner
from luasched.keys import Namespace
from luasched.nodes import (
    NodeList,
    Removal,
    SweepResult,
    drain_call,
    heartbeat_call,
    list_call,
    register_call,
    remove_call,
    sweep_call,
)

__all__ = ["AsyncNodes"]


class AsyncNodes:
    """The node registry of a namespace (``s.nodes``); see ``luasched.nodes.Nodes``."""

    def __init__(self, runner: AsyncRunner, namespace: Namespace) -> None:
        self._runner = runner
        self._namespace = namespace

    async def register(
        self,
        node_id: str | bytes,
        weight: int = 1,
        capacity: int | None = None,
        meta: str | bytes | None = None,
        *,
        ttl_ms: int | None = None,
    ) -> bool:
        """Register or update ``node_id``; see ``luasched.nodes.Nodes.register``."""
        return await self._runner.run(
            register_call(self._namespace, node_id, weight, capacity, meta, ttl_ms)
        )

    async def heartbeat(self, node_id: str | bytes, ttl_ms: int) -> int:
        """Extend the deadline; see ``luasched.nodes.Nodes.heartbeat``."""
        return await self._runner.run(heartbeat_call(self._namespace, node_id, ttl_ms))

    async def drain(self, node_id: str | bytes) -> bool:
        """Mark as draining; see ``luasched.nodes.Nodes.drain``."""
        return await self._runner.run(drain_call(self._namespace, node_id, True))

    async def undrain(self, node_id: str | bytes) -> bool:
        """Eligible again; see ``luasched.nodes.Nodes.undrain``."""
        return await self._runner.run(drain_call(self._namespace, node_id, False))

    async def remove(self, node_id: str | bytes) -> Removal:
        """Remove now; see ``luasched.nodes.Nodes.remove``."""
        return await self._runner.run(remove_call(self._namespace, node_id))

    async def list(self) -> NodeList:
        """Every registered node; see ``luasched.nodes.Nodes.list``."""
        return await self._runner.run(list_call(self._namespace))

    async def sweep(self, limit: int = 100) -> SweepResult:
        """Remove dead nodes and rebalance; see ``luasched.nodes.Nodes.sweep``."""
        return await self._runner.run(sweep_call(self._namespace, limit))
