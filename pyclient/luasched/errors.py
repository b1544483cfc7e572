"""Stable error codes of the luasched scripts, and the exceptions they map to.

Every script reports bad input and refused operations as an error reply of the form
``LUASCHED_<CODE> <script>: <detail>``. The code is stable and part of the public contract
(``manifest.json`` lists them); the detail is for humans and may change. A script that answers
with an error has changed no key.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # an annotation only: the error codes are needed without redis (render.py)
    from redis.exceptions import ResponseError

__all__ = [
    "ERROR_CLASSES",
    "ERROR_CODES",
    "AllNodesFull",
    "CorruptState",
    "GroupedQueue",
    "InvalidArgument",
    "LockTimeout",
    "LuaschedError",
    "NoNode",
    "NotReplicated",
    "RegistryFull",
    "ScanLimitReached",
    "StaleLease",
    "TooManyNodes",
    "UnknownNode",
    "error_from_response",
]


class LuaschedError(Exception):
    """Base class of every error a luasched script reports.

    Attributes:
        code: the stable code (``"ARG"``...), without the ``LUASCHED_`` prefix.
        script: the name of the script that refused (``"slots.keyslot"``), or ``""``.
        detail: the human-readable explanation.
    """

    code: ClassVar[str] = ""
    description: ClassVar[str] = "an error reported by a luasched script"

    def __init__(self, detail: str, *, script: str = "", code: str | None = None) -> None:
        self.script = script
        self.detail = detail
        if code is not None:
            self.code = code  # type: ignore[misc]  # an unknown code keeps its own name
        where = f"{script}: " if script else ""
        super().__init__(f"LUASCHED_{self.code} {where}{detail}")


class InvalidArgument(LuaschedError, ValueError):
    """An argument was missing, malformed or out of range (also: wrong number of keys)."""

    code = "ARG"
    description = (
        "an argument is missing, malformed or out of range, or the call passed the wrong "
        "number of keys or arguments"
    )


class NoNode(LuaschedError, LookupError):
    """No node can take the call: none is live (lookups), or none is live and not draining
    (rebalance)."""

    code = "NONODE"
    description = (
        "no live node is registered (lookups), or no live node that is not draining (rebalance)"
    )


class UnknownNode(LuaschedError, LookupError):
    """The node id is not registered (never was, was removed, or was swept as dead)."""

    code = "NOSUCHNODE"
    description = "the node id is not registered (never was, was removed, or was swept)"


class RegistryFull(LuaschedError):
    """The namespace already holds the most nodes it can (65535)."""

    code = "FULL"
    description = "the registry already holds the most nodes a namespace can have (65535)"


class CorruptState(LuaschedError):
    """A key of the namespace holds another type or shape than luasched's layout.

    Only something other than luasched (a manual write, a key name clash) can cause it; the
    script refused before changing anything.
    """

    code = "CORRUPT"
    description = (
        "a key of the namespace holds another type or shape than the layout (changed outside "
        "luasched); nothing was changed"
    )


class AllNodesFull(LuaschedError):
    """Every candidate node of a pick is at its capacity for the requested cost (pick.least_loaded,
    pick.two_choices); nothing was charged. Release some load, or register more capacity."""

    code = "ATCAPACITY"
    description = (
        "every live, non-draining node is at its capacity for the requested cost; nothing was "
        "charged"
    )


class ScanLimitReached(LuaschedError):
    """A pick examined its bounded number of candidates without finding a usable one: they were
    dead (heartbeat lapsed, not swept yet) or lacked room for the cost. Call ``nodes.sweep``, or
    ask for a smaller cost."""

    code = "SCANLIMIT"
    description = (
        "a pick examined as many candidates as it may (dead nodes not swept yet, or nodes without "
        "room for the cost) without finding one; nothing changed: sweep dead nodes and retry"
    )


class StaleLease(LuaschedError):
    """A queue lease is no longer held under its fencing token: the task was finished already, or
    its lease expired and the task was leased again (queue.ack, nack, extend). Nothing changed;
    the work belongs to the newer lease."""

    code = "STALE"
    description = (
        "the queue lease is no longer held under that fencing token (finished already, or expired "
        "and leased again); nothing changed"
    )


class GroupedQueue(LuaschedError):
    """The queue has groups (queue.group_enqueue, set_group or set_limits was called on it), or the
    task has a group: the plain script cannot keep the groups' fairness, caps and counts, so it
    refused (queue.dequeue; queue.ack, nack, requeue_dead of a task with a group). Nothing changed:
    call the queue.group_* script instead (the Python queues switch to them by themselves)."""

    code = "GROUPED"
    description = (
        "the queue (or the task) has groups: call the queue.group_* script of the same operation; "
        "nothing changed"
    )


class TooManyNodes(LuaschedError):
    """More candidate nodes than a strategy with O(n) picks supports (pick.smooth_weighted)."""

    code = "TOOMANY"
    description = "more live, non-draining nodes than the strategy supports (its cost is O(n))"


class LockTimeout(LuaschedError, TimeoutError):
    """A lock or semaphore used as a context manager (``with s.lock(name, timeout=5):``) was not
    granted within its ``timeout``. Raised by the client, not by a script: nothing is held, and
    the waiter's place in the lock's queue was given back (best effort; else it lapses after
    ``wait_ttl_ms``). Also a ``TimeoutError``. ``acquire()`` answers None instead."""

    code = "LOCKTIMEOUT"
    description = "a lock or semaphore was not granted within the context manager's timeout"


class NotReplicated(LuaschedError):
    """Durable mode (``Scheduler(..., wait_replicas=N)``): the call ran on the primary, but
    ``WAIT`` reported fewer than N replicas holding it within ``wait_timeout_ms``. Raised by the
    client, not by a script, once the ``RetryPolicy`` has sent the same call again (same request
    id) as often as it allows. The call may or may not survive a failover: send it again with the
    same ``request_id`` (a script with a request record then acts once) or treat it as unknown.

    Attributes:
        acked: how many replicas ``WAIT`` reported.
        wanted: ``wait_replicas``.
        request_id: the call's request id (``b""`` when the script takes none).
    """

    code = "NOTREPLICATED"
    description = (
        "durable mode: fewer replicas than wait_replicas acknowledged the call within "
        "wait_timeout_ms; it ran on the primary and may be lost in a failover"
    )

    def __init__(self, script: str, acked: int, wanted: int, request_id: bytes) -> None:
        self.acked = acked
        self.wanted = wanted
        self.request_id = request_id
        shown = request_id.decode("utf-8", "replace") if request_id else "(none)"
        super().__init__(
            f"{acked} of {wanted} replica(s) acknowledged the call (request id {shown})",
            script=script,
        )


#: The codes scripts answer with (``LockTimeout`` and ``NotReplicated`` are the client's own,
#: not among them).
_CLASSES: tuple[type[LuaschedError], ...] = (
    InvalidArgument,
    NoNode,
    UnknownNode,
    RegistryFull,
    CorruptState,
    AllNodesFull,
    ScanLimitReached,
    TooManyNodes,
    StaleLease,
    GroupedQueue,
)

#: Every stable code with what it means; the manifest and docs are generated from this table.
ERROR_CODES: dict[str, str] = {cls.code: cls.description for cls in _CLASSES}
#: Every stable code -> the exception class a reply with that code is raised as.
ERROR_CLASSES: dict[str, type[LuaschedError]] = {cls.code: cls for cls in _CLASSES}
_BY_CODE = ERROR_CLASSES

_REPLY = re.compile(r"^LUASCHED_([A-Z][A-Z0-9_]*) ([^:\s]+): (.*)$", re.DOTALL)


def error_from_response(error: ResponseError) -> LuaschedError | None:
    """The luasched exception for a ``LUASCHED_*`` error reply, or None for any other error."""
    match = _REPLY.match(str(error))
    if match is None:
        return None
    code, script, detail = match.groups()
    cls = _BY_CODE.get(code)
    if cls is None:
        return LuaschedError(detail, script=script, code=code)
    return cls(detail, script=script)
