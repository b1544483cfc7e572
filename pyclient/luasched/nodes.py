"""The node registry: ``nodes.*`` scripts (lua/nodes/) and their wrapper ``Nodes`` (``s.nodes``).

A namespace keeps a registry of nodes (workers, shards, servers: anything that owns slots and
takes work). Each node has an id (any bytes, 1..1024 of them), a weight (its share of the slot
table), an optional capacity and metadata, a draining flag and a heartbeat deadline on the
server's clock. A node is *live* while its deadline is after the server's now; one that missed
its heartbeat is *dead* until ``sweep`` removes it (or a heartbeat revives it first).

The call builders below are shared by the sync, asyncio and pipeline wrappers; they hold no
decision, only the shape of KEYS/ARGV and of the reply. Every call is one script execution:
atomic, and either fully applied or (on any error) not applied at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from luasched import validate
from luasched.keys import Namespace
from luasched.render import MAX_BATCH_LIMIT
from luasched.scripts import Call, Runner

__all__ = [
    "NodeInfo",
    "NodeList",
    "Nodes",
    "Removal",
    "SweepResult",
    "drain_call",
    "heartbeat_call",
    "list_call",
    "register_call",
    "remove_call",
    "sweep_call",
]


@dataclass(frozen=True)
class NodeInfo:
    """One registered node, as ``Nodes.list`` reports it.

    Attributes:
        node_id: the id, as registered (bytes).
        weight: its weight.
        capacity: its capacity, or None for unlimited.
        draining: whether it is draining (gets no slots on rebalance).
        live: whether its deadline was after the server's clock at the time of the listing.
        deadline_ms: its heartbeat deadline (server clock, Unix ms), or None for no deadline.
        slots: how many slots it owns in the table (a dead node may still own some until
            ``sweep`` or ``rebalance``; lookups never answer it).
        meta: its metadata (b"" if none).
    """

    node_id: bytes
    weight: int
    capacity: int | None
    draining: bool
    live: bool
    deadline_ms: int | None
    slots: int
    meta: bytes


@dataclass(frozen=True)
class NodeList:
    """Every registered node (registration-index order) and the server's clock when listed."""

    now_ms: int
    nodes: tuple[NodeInfo, ...]

    def __iter__(self) -> Iterator[NodeInfo]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)


@dataclass(frozen=True)
class Removal:
    """What ``Nodes.remove`` did: whether the node was registered, and how many slots it left
    without owner (until the next rebalance or sweep)."""

    removed: bool
    slots_released: int


@dataclass(frozen=True)
class SweepResult:
    """What ``Nodes.sweep`` did.

    Attributes:
        removed: the ids of the dead nodes removed, earliest deadline first.
        more: whether dead nodes are left (call ``sweep`` again).
        moved: slots whose owner changed (to none, if no node was eligible).
    """

    removed: tuple[bytes, ...]
    more: bool
    moved: int


def _keys(namespace: Namespace) -> tuple[bytes, ...]:
    return namespace.registry_keys


def _bool(reply: Any) -> bool:
    return bool(int(reply))


def register_call(
    namespace: Namespace,
    node_id: str | bytes,
    weight: int = 1,
    capacity: int | None = None,
    meta: str | bytes | None = None,
    ttl_ms: int | None = None,
) -> Call[bool]:
    """The ``nodes.register`` call (capacity None -> -1, ttl_ms None -> 0, meta None -> b"").
    InvalidArgument for any argument out of the script's range (``luasched.validate``)."""
    script = "nodes.register"
    args = (
        validate.arg(script, "node_id", node_id),
        validate.arg(script, "weight", weight),
        -1 if capacity is None else validate.arg(script, "capacity", capacity, lo=0),
        0 if ttl_ms is None else validate.arg(script, "ttl_ms", ttl_ms),
        b"" if meta is None else validate.arg(script, "meta", meta),
    )
    return Call(script, _keys(namespace), args, _bool)


def heartbeat_call(namespace: Namespace, node_id: str | bytes, ttl_ms: int) -> Call[int]:
    """The ``nodes.heartbeat`` call; parses the new deadline (server ms)."""
    script = "nodes.heartbeat"
    args = (validate.arg(script, "node_id", node_id), validate.arg(script, "ttl_ms", ttl_ms))
    return Call(script, _keys(namespace), args, int)


def drain_call(namespace: Namespace, node_id: str | bytes, draining: bool = True) -> Call[bool]:
    """The ``nodes.drain`` call (mode ``on`` or ``off``); parses whether the flag changed."""
    mode = b"on" if draining else b"off"
    args = (validate.arg("nodes.drain", "node_id", node_id), mode)
    return Call("nodes.drain", _keys(namespace), args, _bool)


def _removal(reply: Any) -> Removal:
    return Removal(removed=bool(int(reply[0])), slots_released=int(reply[1]))


def remove_call(namespace: Namespace, node_id: str | bytes) -> Call[Removal]:
    """The ``nodes.remove`` call."""
    args = (validate.arg("nodes.remove", "node_id", node_id),)
    return Call("nodes.remove", _keys(namespace), args, _removal)


def _node_info(entry: Any) -> NodeInfo:
    node_id, weight, capacity, draining, live, deadline, slots, meta = entry
    return NodeInfo(
        node_id=bytes(node_id),
        weight=int(weight),
        capacity=None if int(capacity) == -1 else int(capacity),
        draining=bool(int(draining)),
        live=bool(int(live)),
        deadline_ms=None if int(deadline) == -1 else int(deadline),
        slots=int(slots),
        meta=bytes(meta),
    )


def _node_list(reply: Any) -> NodeList:
    return NodeList(now_ms=int(reply[0]), nodes=tuple(_node_info(entry) for entry in reply[1:]))


def list_call(namespace: Namespace) -> Call[NodeList]:
    """The ``nodes.list`` call."""
    return Call("nodes.list", _keys(namespace), (), _node_list)


def _sweep(reply: Any) -> SweepResult:
    more, moved, removed = reply
    return SweepResult(
        removed=tuple(bytes(node_id) for node_id in removed),
        more=bool(int(more)),
        moved=int(moved),
    )


def sweep_call(namespace: Namespace, limit: int = 100) -> Call[SweepResult]:
    """The ``nodes.sweep`` call."""
    args = (validate.arg("nodes.sweep", "limit", limit, hi=MAX_BATCH_LIMIT),)
    return Call("nodes.sweep", _keys(namespace), args, _sweep)


class Nodes:
    """The node registry of a namespace (``s.nodes``).

    Every method is one script call, atomic on the server: it checks all its arguments first and
    changes nothing when it raises. Node ids are any bytes (str is sent as UTF-8) and come back
    as bytes. Times are the server's clock; callers pass relative durations (``ttl_ms``).
    Needs a client that answers bytes (``decode_responses=False``, redis-py's default).
    """

    def __init__(self, runner: Runner, namespace: Namespace) -> None:
        self._runner = runner
        self._namespace = namespace

    def register(
        self,
        node_id: str | bytes,
        weight: int = 1,
        capacity: int | None = None,
        meta: str | bytes | None = None,
        *,
        ttl_ms: int | None = None,
    ) -> bool:
        """Register ``node_id``, or update it if registered; True if it was created.

        A new node owns no slot until ``s.slots.rebalance()`` (or a ``sweep`` that removes a
        node) gives it its share. Re-registering keeps the node's slots and draining flag and
        replaces weight (1..1,000,000), capacity (None: unlimited; stored for schedulers, unused
        by the slot table), meta (up to 65,536 bytes; None is b"") and the deadline: the node is
        live for ``ttl_ms`` from now (server clock), or until removed if ``ttl_ms`` is None.
        O(log n). Raises InvalidArgument, RegistryFull (65,535 nodes), CorruptState.
        """
        return self._runner.run(
            register_call(self._namespace, node_id, weight, capacity, meta, ttl_ms)
        )

    def heartbeat(self, node_id: str | bytes, ttl_ms: int) -> int:
        """Keep ``node_id`` live for ``ttl_ms`` more ms (1 ms to 1 year); the new deadline.

        The deadline is server time (Unix ms). A node that lapsed but was not swept yet is live
        again. O(log n). Raises UnknownNode if it is not registered (removed or swept: register
        again), InvalidArgument.
        """
        return self._runner.run(heartbeat_call(self._namespace, node_id, ttl_ms))

    def drain(self, node_id: str | bytes) -> bool:
        """Mark ``node_id`` as draining; True if it was not draining before.

        A draining node stays live and keeps its slots and work, and lookups still answer it;
        it gets no slot on rebalance, so the next ``s.slots.rebalance()`` (or a ``sweep`` that
        removes a node) hands its slots to the other nodes. O(1). Raises UnknownNode.
        """
        return self._runner.run(drain_call(self._namespace, node_id, True))

    def undrain(self, node_id: str | bytes) -> bool:
        """Make a draining node eligible for slots again; True if it was draining. O(1)."""
        return self._runner.run(drain_call(self._namespace, node_id, False))

    def remove(self, node_id: str | bytes) -> Removal:
        """Remove ``node_id`` now, live or not.

        Its slots become ownerless (lookups answer no owner for them) until the next
        ``s.slots.rebalance()`` or a ``sweep`` that removes a node; no other slot changes.
        Removing an unknown node changes nothing (``removed=False``), so a retry is harmless.
        O(16384) (one pass over the slot table). Raises CorruptState.
        """
        return self._runner.run(remove_call(self._namespace, node_id))

    def list(self) -> NodeList:
        """Every registered node with its state and slot count, and the server's clock.

        Read-only; O(n log n + 16384) for n nodes.
        """
        return self._runner.run(list_call(self._namespace))

    def sweep(self, limit: int = 100) -> SweepResult:
        """Remove up to ``limit`` (1..max_batch) dead nodes, earliest deadline first.

        If any was removed, the slot table is rebalanced in the same call (exactly as
        ``s.slots.rebalance()``), so their slots go to the live, non-draining nodes; with no such
        node their slots are left ownerless. ``more`` says whether dead nodes are left. O(log n)
        if nothing is dead, else O(16384 + n log n). Raises InvalidArgument, CorruptState.
        """
        return self._runner.run(sweep_call(self._namespace, limit))
