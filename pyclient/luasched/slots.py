"""Hash slots and their owners: ``slots.*`` (lua/slots/) and the wrapper ``Slots`` (``s.slots``).

A namespace keeps a table of the 16384 Redis Cluster hash slots, each owned by at most one node
of its registry (``luasched.nodes``); a key belongs to the owner of its slot. ``rebalance``
hands the slots to the live, non-draining nodes in proportion to their weights with minimal
movement; the lookups (``owner``, ``owners``, ``owner_of_slot``) cost O(1) per key whatever the
number of nodes, and never answer a node that is not live (see ``Owner``).

The call builders below are shared by the sync, asyncio and pipeline wrappers; they hold no
decision, only the shape of KEYS/ARGV and of the reply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from luasched import validate
from luasched.keys import Namespace
from luasched.render import MAX_BATCH_LIMIT, MAX_KEY_BYTES_LIMIT
from luasched.scripts import Call, Runner

__all__ = [
    "Owner",
    "Rebalance",
    "Runner",
    "Slots",
    "keyslot_call",
    "keyslots_call",
    "owner_call",
    "owner_of_slot_call",
    "owners_call",
    "rebalance_call",
]

T = TypeVar("T")


def _ints(reply: Any) -> list[int]:
    return [int(value) for value in reply]


def keyslots_call(keys: Iterable[str | bytes]) -> Call[list[int]]:
    """The ``slots.keyslot`` call for ``keys`` (str is sent as UTF-8)."""
    return Call("slots.keyslot", (), _many_keys("slots.keyslot", keys), _ints)


def _many_keys(script: str, keys: object) -> tuple[bytes, ...]:
    """``keys`` (a list or tuple, not one key) as ARGV of ``script``; InvalidArgument naming
    ``keys``. Up to the largest ``max_batch`` and ``max_key_bytes`` (the script checks the
    configured ones)."""
    return validate.many(
        script, "key", keys, name="keys", most=MAX_BATCH_LIMIT, hi=MAX_KEY_BYTES_LIMIT
    )


def _key(script: str, key: object) -> bytes:
    return validate.arg(script, "key", key, hi=MAX_KEY_BYTES_LIMIT)  # type: ignore[no-any-return]


def _first(reply: Any) -> int:
    return int(reply[0])


def keyslot_call(key: str | bytes) -> Call[int]:
    """The ``slots.keyslot`` call for one key."""
    return Call("slots.keyslot", (), (_key("slots.keyslot", key),), _first)


@dataclass(frozen=True)
class Owner:
    """The answer of a lookup: a slot and its live owner.

    ``node`` is None when the slot has no live owner: it was never assigned, its owner was
    removed, or its owner's heartbeat lapsed (dead, even before ``sweep``). A lookup never falls
    through to another node; call ``s.nodes.sweep()`` or ``s.slots.rebalance()`` and ask again.
    (When no node at all is live, the lookup raises NoNode instead.)
    """

    slot: int
    node: bytes | None


@dataclass(frozen=True)
class Rebalance:
    """What ``rebalance`` did: slots that changed owner, and each eligible node's slot count."""

    moved: int
    counts: Mapping[bytes, int]


def _owner(entry: Any) -> Owner:
    slot, found, node_id = entry
    return Owner(slot=int(slot), node=bytes(node_id) if int(found) else None)


def _owners(reply: Any) -> list[Owner]:
    return [_owner(entry) for entry in reply]


def owner_call(namespace: Namespace, key: str | bytes) -> Call[Owner]:
    """The ``slots.owner`` call for one key."""
    return Call("slots.owner", namespace.registry_keys, (_key("slots.owner", key),), _owner)


def owners_call(namespace: Namespace, keys: Iterable[str | bytes]) -> Call[list[Owner]]:
    """The ``slots.owners`` call for ``keys`` (1 to ``ScriptConfig.max_batch``)."""
    args = _many_keys("slots.owners", keys)
    return Call("slots.owners", namespace.registry_keys, args, _owners)


def owner_of_slot_call(namespace: Namespace, slot: int) -> Call[Owner]:
    """The ``slots.owner_of_slot`` call."""
    args = (validate.arg("slots.owner_of_slot", "slot", slot),)
    return Call("slots.owner_of_slot", namespace.registry_keys, args, _owner)


def _rebalance(reply: Any) -> Rebalance:
    moved, flat = reply
    counts = {bytes(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    return Rebalance(moved=int(moved), counts=counts)


def rebalance_call(namespace: Namespace) -> Call[Rebalance]:
    """The ``slots.rebalance`` call."""
    return Call("slots.rebalance", namespace.registry_keys, (), _rebalance)


class Slots:
    """Hash slots of a namespace and their owners, decided by the server (``s.slots``).

    Every method is one script call, atomic on the server. Needs a client that answers bytes
    (``decode_responses=False``, redis-py's default).
    """

    def __init__(self, runner: Runner, namespace: Namespace) -> None:
        self._runner = runner
        self._namespace = namespace

    def keyslot(self, key: str | bytes) -> int:
        """The Redis Cluster slot (0..16383) of ``key``, as ``CLUSTER KEYSLOT`` computes it.

        One script call; reads and writes no key. Raises InvalidArgument for a key longer
        than ``ScriptConfig.max_key_bytes``.
        """
        return self._runner.run(keyslot_call(key))

    def keyslots(self, keys: Iterable[str | bytes]) -> list[int]:
        """The slot of each key, in order, in one call (1 to ``ScriptConfig.max_batch`` keys)."""
        return self._runner.run(keyslots_call(keys))

    def owner(self, key: str | bytes) -> Owner:
        """The live owner of ``key``'s slot (``Owner.node`` None if the slot has none).

        Read-only, O(len(key)) + O(1): the cost does not grow with the number of nodes. A
        draining node still owns its slots until a rebalance; a dead or removed one never is
        answered. Raises NoNode when the slot has no live owner and no node is live at all,
        InvalidArgument for a key longer than ``ScriptConfig.max_key_bytes``.
        """
        return self._runner.run(owner_call(self._namespace, key))

    def owners(self, keys: Iterable[str | bytes]) -> list[Owner]:
        """``owner`` of each key, in order, in one call (1 to ``ScriptConfig.max_batch`` keys).

        One reading of the server's clock for the whole batch. Raises like ``owner``.
        """
        return self._runner.run(owners_call(self._namespace, keys))

    def owner_of_slot(self, slot: int) -> Owner:
        """The live owner of ``slot`` (0..16383), for clients that hash keys themselves
        (``luasched.key_slot``). O(1); raises like ``owner``."""
        return self._runner.run(owner_of_slot_call(self._namespace, slot))

    def rebalance(self) -> Rebalance:
        """Assign all 16384 slots to the live, non-draining nodes in proportion to weight.

        Each eligible node ends with floor or ceil of 16384 * weight / total weight. Minimal
        movement: a slot stays with its owner while that owner is eligible and under its quota;
        only orphaned slots, slots of dead or draining nodes and the surplus of over-quota nodes
        move (adding one node to N equal ones moves about 16384/(N+1) slots; a second rebalance
        with no change moves none). Deterministic and atomic. O(16384 + n log n) for n live
        nodes (a few ms for 1,000 nodes). Dead nodes stay registered (see ``nodes.sweep``).
        Raises NoNode (nothing changed) when no node is live and not draining.
        """
        return self._runner.run(rebalance_call(self._namespace))
