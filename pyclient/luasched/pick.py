"""Node selection: ``pick.*`` scripts (lua/pick/) and their wrapper ``Pick`` (``s.pick``).

Each strategy is one script that reads the node registry (``luasched.nodes``), decides and
records its decision in the same step: only live (heartbeat deadline after the server's now),
non-draining nodes are candidates, and two callers never both take the last unit of a node's
capacity. The strategies:

* ``least_loaded(cost)``: lowest utilization (load / capacity) with room for ``cost``, charged
  in the same step; ``release(node, cost)`` gives it back. O(log n).
* ``two_choices(cost)``: the less utilized of two random candidates, charged. O(log n).
* ``round_robin()``: the next node after a cursor, in index (registration) order. O(log n).
* ``weighted()``: random, with probability weight / total weight. O(log n) (O(n log n) for the
  first pick after a membership or weight change, which rebuilds its table).
* ``smooth_weighted()``: nginx's smooth weighted round-robin, deterministic. O(n) per pick, at
  most 2000 candidates.
* ``least_recent()``: the node picked longest ago (logical clock). O(log n).

The wrapper draws the random integers the scripts need (never ``math.random`` on the server)
from an injectable ``rng`` (anything with ``randrange``, e.g. ``random.Random(seed)``). The call
builders below are shared by the sync, asyncio and pipeline wrappers; they hold no decision.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from luasched import contract, validate
from luasched.keys import Namespace
from luasched.scripts import Call, Runner

__all__ = [
    "PICK_KEYS",  # noqa: F822 (module __getattr__: read from the manifest)
    "RANDOM_LIMIT",
    "Pick",
    "Picked",
    "RandomSource",
    "least_loaded_call",
    "least_recent_call",
    "release_call",
    "round_robin_call",
    "smooth_weighted_call",
    "two_choices_call",
    "weighted_call",
]

#: Random integers sent to the scripts are uniform in 0..RANDOM_LIMIT-1 (2^53: exact in Lua).
RANDOM_LIMIT = 1 << 53


def __getattr__(name: str) -> Any:
    """``PICK_KEYS``: the KEYS of each ``pick.*`` script, in order, as names under the namespace
    (``pick:util``...), read from the manifest on first use (``luasched.contract``)."""
    if name == "PICK_KEYS":
        return {script: contract.layout(script).tails for script in contract.scripts_named("pick.")}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RandomSource(Protocol):
    """Where the wrapper draws random integers: ``random.Random`` or anything alike."""

    def randrange(self, stop: int, /) -> int: ...


@dataclass(frozen=True)
class Picked:
    """The node a pick chose.

    Attributes:
        node: the node id (bytes).
        load: its load after the charge (``least_loaded``, ``two_choices``), else None.
        capacity: its capacity (None: unlimited) for the charging picks; None otherwise.
    """

    node: bytes
    load: int | None = None
    capacity: int | None = None


@functools.lru_cache(maxsize=1024)
def _keys(namespace: Namespace, script: str) -> tuple[bytes, ...]:
    """The KEYS of ``script`` in ``namespace`` (its manifest layout; cached: one per pick)."""
    return contract.layout(script).bind(namespace).keys


def _charged(reply: Any) -> Picked:
    node_id, load, capacity = reply
    return Picked(
        node=bytes(node_id),
        load=int(load),
        capacity=None if int(capacity) == -1 else int(capacity),
    )


def _node(reply: Any) -> Picked:
    return Picked(node=bytes(reply))


def _draw(rng: RandomSource) -> int:
    return rng.randrange(RANDOM_LIMIT)


def least_loaded_call(namespace: Namespace, rng: RandomSource, cost: int = 1) -> Call[Picked]:
    """The ``pick.least_loaded`` call (one random integer for ties)."""
    script = "pick.least_loaded"
    args = (validate.arg(script, "cost", cost), _draw(rng))
    return Call(script, _keys(namespace, script), args, _charged)


def two_choices_call(namespace: Namespace, rng: RandomSource, cost: int = 1) -> Call[Picked]:
    """The ``pick.two_choices`` call (three random integers)."""
    script = "pick.two_choices"
    args = (validate.arg(script, "cost", cost), _draw(rng), _draw(rng), _draw(rng))
    return Call(script, _keys(namespace, script), args, _charged)


def release_call(namespace: Namespace, node_id: str | bytes, cost: int = 1) -> Call[int]:
    """The ``pick.release`` call; parses the node's load after the release."""
    script = "pick.release"
    args = (validate.arg(script, "node_id", node_id), validate.arg(script, "cost", cost))
    return Call(script, _keys(namespace, script), args, int)


def round_robin_call(namespace: Namespace) -> Call[Picked]:
    """The ``pick.round_robin`` call."""
    script = "pick.round_robin"
    return Call(script, _keys(namespace, script), (), _node)


def weighted_call(namespace: Namespace, rng: RandomSource) -> Call[Picked]:
    """The ``pick.weighted`` call (two random integers)."""
    script = "pick.weighted"
    return Call(script, _keys(namespace, script), (_draw(rng), _draw(rng)), _node)


def smooth_weighted_call(namespace: Namespace) -> Call[Picked]:
    """The ``pick.smooth_weighted`` call."""
    script = "pick.smooth_weighted"
    return Call(script, _keys(namespace, script), (), _node)


def least_recent_call(namespace: Namespace) -> Call[Picked]:
    """The ``pick.least_recent`` call."""
    script = "pick.least_recent"
    return Call(script, _keys(namespace, script), (), _node)


def default_rng() -> RandomSource:
    """A fresh ``random.Random`` seeded from the OS (what Pick uses unless given one)."""
    return random.Random()


#: What a Pick sends its calls through: a runner or a batch, sync or asyncio.
R = TypeVar("R")


class PickBase(Generic[R]):
    """What ``Pick`` and ``AsyncPick`` share: the runner, the namespace and the random source
    (``rng``, default ``default_rng()``) the charging and random picks draw from."""

    def __init__(self, runner: R, namespace: Namespace, rng: RandomSource | None = None) -> None:
        self._runner = runner
        self._namespace = namespace
        self._rng = rng if rng is not None else default_rng()


class Pick(PickBase[Runner]):
    """Node selection for a namespace (``s.pick``).

    Every method is one script call, atomic on the server: candidates are the live,
    non-draining nodes of ``s.nodes``; the decision and its record (a charged load, a cursor, a
    clock) are made in the same step. A call that raises changed nothing. Raises NoNode when no
    node is live and not draining, AllNodesFull when every one is at capacity (charging picks),
    ScanLimitReached when the bounded walk met only dead nodes (call ``s.nodes.sweep()``),
    InvalidArgument, CorruptState.
    """

    def least_loaded(self, cost: int = 1) -> Picked:
        """The least utilized node (load / capacity) with room for ``cost``, charged ``cost``.

        Ties at the lowest utilization are broken uniformly at random. Unlimited nodes count as
        capacity 2^50. ``cost`` is 1..10^12. O(log n). Raises AllNodesFull when every live
        node is full for ``cost``.
        """
        return self._runner.run(least_loaded_call(self._namespace, self._rng, cost))

    def two_choices(self, cost: int = 1) -> Picked:
        """The less utilized of two random nodes that has room for ``cost``, charged ``cost``.

        Falls back to ``least_loaded`` in the same step when neither can take it. O(log n).
        """
        return self._runner.run(two_choices_call(self._namespace, self._rng, cost))

    def release(self, node_id: str | bytes, cost: int = 1) -> int:
        """Give back ``cost`` of ``node_id``'s load (never below 0); the load after it.

        Works on draining and dead (not yet swept) nodes. O(log n). Raises UnknownNode if the
        node is not registered (its load left with it).
        """
        return self._runner.run(release_call(self._namespace, node_id, cost))

    def round_robin(self) -> Picked:
        """The next node after the last round-robin pick, in index order, wrapping. O(log n)."""
        return self._runner.run(round_robin_call(self._namespace))

    def weighted(self) -> Picked:
        """A random node, each with probability weight / total weight. Changes nothing.

        O(log n); the first pick after a change of membership or weights rebuilds a table of
        cumulative weights in O(n log n).
        """
        return self._runner.run(weighted_call(self._namespace, self._rng))

    def smooth_weighted(self) -> Picked:
        """The next node of nginx's smooth weighted round-robin (deterministic, interleaved).

        Over any W picks (W = total weight) without membership or weight change each node is
        picked exactly its weight times; any such change resets the sequence. O(n) per pick;
        raises TooManyNodes above 2000 candidates.
        """
        return self._runner.run(smooth_weighted_call(self._namespace))

    def least_recent(self) -> Picked:
        """The node picked longest ago (never-picked ones first), stamped now. O(log n)."""
        return self._runner.run(least_recent_call(self._namespace))
