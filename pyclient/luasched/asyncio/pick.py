"""Async twin of ``luasched.pick``."""

from __future__ import annotations

from luasched.asyncio.slots import AsyncRunner
from luasched.pick import (
    PickBase,
    Picked,
    least_loaded_call,
    least_recent_call,
    release_call,
    round_robin_call,
    smooth_weighted_call,
    two_choices_call,
    weighted_call,
)

__all__ = ["AsyncPick"]


class AsyncPick(PickBase[AsyncRunner]):
    """Node selection for a namespace (``s.pick``); see ``luasched.pick.Pick``."""

    async def least_loaded(self, cost: int = 1) -> Picked:
        """Least utilized node with room, charged; see ``luasched.pick.Pick.least_loaded``."""
        return await self._runner.run(least_loaded_call(self._namespace, self._rng, cost))

    async def two_choices(self, cost: int = 1) -> Picked:
        """Power of two choices, charged; see ``luasched.pick.Pick.two_choices``."""
        return await self._runner.run(two_choices_call(self._namespace, self._rng, cost))

    async def release(self, node_id: str | bytes, cost: int = 1) -> int:
        """Give load back; see ``luasched.pick.Pick.release``."""
        return await self._runner.run(release_call(self._namespace, node_id, cost))

    async def round_robin(self) -> Picked:
        """Next node in index order; see ``luasched.pick.Pick.round_robin``."""
        return await self._runner.run(round_robin_call(self._namespace))

    async def weighted(self) -> Picked:
        """Weighted random node; see ``luasched.pick.Pick.weighted``."""
        return await self._runner.run(weighted_call(self._namespace, self._rng))

    async def smooth_weighted(self) -> Picked:
        """Smooth weighted round-robin; see ``luasched.pick.Pick.smooth_weighted``."""
        return await self._runner.run(smooth_weighted_call(self._namespace))

    async def least_recent(self) -> Picked:
        """Least recently picked node; see ``luasched.pick.Pick.least_recent``."""
        return await self._runner.run(least_recent_call(self._namespace))
