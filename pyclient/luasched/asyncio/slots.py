"""Async twin of ``luasched.slots``."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Protocol, TypeVar

from luasched.scripts import Call
from luasched.slots import keyslot_call, keyslots_call

__all__ = ["AsyncSlots"]

T = TypeVar("T")


class AsyncRunner(Protocol):
    """An AsyncScriptRunner, or an AsyncBatch that queues the call."""

    def run(self, call: Call[T]) -> Awaitable[T]: ...


class AsyncSlots:
    """Slot lookups, computed by the server (``s.slots``); see ``luasched.slots.Slots``."""

    def __init__(self, runner: AsyncRunner) -> None:
        self._runner = runner

    async def keyslot(self, key: str | bytes) -> int:
        """The Redis Cluster slot (0..16383) of ``key``."""
        return await self._runner.run(keyslot_call(key))

    async def keyslots(self, keys: Iterable[str | bytes]) -> list[int]:
        """The slot of each key, in order, in one call."""
        return await self._runner.run(keyslots_call(keys))
