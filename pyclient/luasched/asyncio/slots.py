"""Async twin of ``luasched.slots``."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Protocol, TypeVar

from luasched.keys import Namespace
from luasched.scripts import Call
from luasched.slots import (
    Owner,
    Rebalance,
    keyslot_call,
    keyslots_call,
    owner_call,
    owner_of_slot_call,
    owners_call,
    rebalance_call,
)

__all__ = ["AsyncSlots"]

T = TypeVar("T")


class AsyncRunner(Protocol):
    """An AsyncScriptRunner, or an AsyncBatch that queues the call."""

    def run(self, call: Call[T]) -> Awaitable[T]: ...


class AsyncSlots:
    """Hash slots and their owners (``s.slots``); see ``luasched.slots.Slots``."""

    def __init__(self, runner: AsyncRunner, namespace: Namespace) -> None:
        self._runner = runner
        self._namespace = namespace

    async def keyslot(self, key: str | bytes) -> int:
        """The Redis Cluster slot (0..16383) of ``key``."""
        return await self._runner.run(keyslot_call(key))

    async def keyslots(self, keys: Iterable[str | bytes]) -> list[int]:
        """The slot of each key, in order, in one call."""
        return await self._runner.run(keyslots_call(keys))

    async def owner(self, key: str | bytes) -> Owner:
        """The live owner of ``key``'s slot; see ``luasched.slots.Slots.owner``."""
        return await self._runner.run(owner_call(self._namespace, key))

    async def owners(self, keys: Iterable[str | bytes]) -> list[Owner]:
        """``owner`` of each key, in one call; see ``luasched.slots.Slots.owners``."""
        return await self._runner.run(owners_call(self._namespace, keys))

    async def owner_of_slot(self, slot: int) -> Owner:
        """The live owner of ``slot``; see ``luasched.slots.Slots.owner_of_slot``."""
        return await self._runner.run(owner_of_slot_call(self._namespace, slot))

    async def rebalance(self) -> Rebalance:
        """Weighted, minimal-movement assignment; see ``luasched.slots.Slots.rebalance``."""
        return await self._runner.run(rebalance_call(self._namespace))
