"""Hash slots: ``slots.keyslot`` (lua/slots/keyslot.lua.j2) and its wrapper.

The call builders below are shared by the sync, asyncio and pipeline wrappers; they hold no
decision, only the shape of KEYS/ARGV and of the reply.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from luasched.keys import to_bytes
from luasched.scripts import Call

__all__ = ["Slots", "keyslot_call", "keyslots_call"]

T = TypeVar("T")


class Runner(Protocol):
    """Something that runs a call: a ScriptRunner, or a Batch that queues it."""

    def run(self, call: Call[T]) -> T: ...


def _ints(reply: Any) -> list[int]:
    return [int(value) for value in reply]


def keyslots_call(keys: Iterable[str | bytes]) -> Call[list[int]]:
    """The ``slots.keyslot`` call for ``keys`` (str is sent as UTF-8)."""
    if isinstance(keys, (str, bytes)):
        raise TypeError("keys must be a sequence of keys, not a single key")
    return Call("slots.keyslot", (), tuple(to_bytes(key) for key in keys), _ints)


def _first(reply: Any) -> int:
    return int(reply[0])


def keyslot_call(key: str | bytes) -> Call[int]:
    """The ``slots.keyslot`` call for one key."""
    return Call("slots.keyslot", (), (to_bytes(key),), _first)


class Slots:
    """Slot lookups, computed by the server (``s.slots``)."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def keyslot(self, key: str | bytes) -> int:
        """The Redis Cluster slot (0..16383) of ``key``, as ``CLUSTER KEYSLOT`` computes it.

        One script call; reads and writes no key. Raises InvalidArgument for a key longer
        than ``ScriptConfig.max_key_bytes``.
        """
        return self._runner.run(keyslot_call(key))

    def keyslots(self, keys: Iterable[str | bytes]) -> list[int]:
        """The slot of each key, in order, in one call (1 to ``ScriptConfig.max_batch`` keys)."""
        return self._runner.run(keyslots_call(keys))
