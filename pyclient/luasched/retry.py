"""Bounded retries, with backoff, over the errors a Redis failover or resharding raises.

During a failover (a primary dies, its replica is promoted after ``cluster-node-timeout``) and
while slots move, redis-py raises errors that say "not now" rather than "no": the connection is
refused (``ConnectionError``, ``TimeoutError``), the cluster is down (``ClusterDownError``,
``MasterDownError``), a multi-key call meets a slot half-migrated (``TryAgainError``, or
redis-py's ``ClusterError`` once its own redirections ran out), the slot is not covered yet
(``SlotNotCoveredError``), a write reached a primary that was demoted (``ReadOnlyError``; behind
Sentinel redis-py turns it into a ``ConnectionError``), a primary refuses writes because too few
replicas are connected (``min-replicas-to-write``: ``NOREPLICAS``, which redis-py answers as a
plain ``ResponseError``; ``NoReplicasError`` here), a replica is still loading
(``BusyLoadingError``), or a replica lost its primary (``MASTERDOWN``: ``MasterDownError``). In
durable mode, ``NotReplicated`` (fewer replicas than ``wait_replicas`` acknowledged a call) is
sent again the same way: the same request id makes the resent call act once. ``MOVED`` and
``ASK`` are followed by redis-py itself. ``ScriptRunner.run`` (and the asyncio twin) sends a
call again on these errors, up to ``RetryPolicy.attempts`` sends and ``budget_ms`` in total,
sleeping ``base_ms * 2^n`` (at most ``max_ms``) between sends; past that the last error is
raised.

Sending a call again is safe because it is the same call: the same request id, so a script
that did run before its reply was lost answers its first reply instead of acting twice
(``enqueue``, ``dequeue``, ``ack``, ``nack``, ``dispatch``, lock acquire and release). Calls
without a request id either do no harm twice (``extend`` moves a deadline to the same place,
``requeue_dead`` and ``requeue_dead_dispatched`` answer where the task is by then, ``nodes.*``
set the same state, reads read) or are picks: a charging pick whose reply was lost
has charged a node the caller never learns of, retried or not (redis-py's own connection retries
already resend it); release such a charge by the node's stats if it matters.

Blocking waits (the ``BLPOP`` between two attempts of a lock acquire or a blocking dequeue) are
never sent again: a failed wait ends, and the next script call, sent under this policy, finds
out whether the server is back (``luasched.blocking``). A resent wait would run past the
caller's deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ConnectionError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from luasched.errors import NotReplicated

__all__ = [
    "NO_RETRY",
    "TRANSIENT_ERRORS",
    "NoReplicasError",
    "RetryPolicy",
    "is_transient",
    "no_replicas",
]


class NoReplicasError(ResponseError):
    """``NOREPLICAS``: the primary refuses writes while fewer than ``min-replicas-to-write``
    replicas are connected (redis-py has no class of its own for it). Nothing was written."""


def no_replicas(error: BaseException) -> bool:
    """Whether ``error`` is a ``NOREPLICAS`` reply (mapped to NoReplicasError or not yet)."""
    if isinstance(error, NoReplicasError):
        return True
    return isinstance(error, ResponseError) and str(error).startswith("NOREPLICAS")


T = TypeVar("T")

#: The errors a call is sent again on (ClusterDownError covers MasterDownError; ConnectionError
#: covers BusyLoadingError: both listed for the reader).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    ClusterError,
    TryAgainError,
    SlotNotCoveredError,
    ReadOnlyError,
    NoReplicasError,
    NotReplicated,
)

# Errors of redis-py's ConnectionError family that retrying cannot fix.
_PERMANENT_NAMES = frozenset({"AuthenticationError", "AuthorizationError"})


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is one a failover or resharding raises (worth sending again)."""
    if type(error).__name__ in _PERMANENT_NAMES:
        return False
    return isinstance(error, TRANSIENT_ERRORS) or no_replicas(error)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a call is sent again on a transient error.

    ``attempts``: sends in all (1: no retry). Between sends the wrapper sleeps
    ``min(max_ms, base_ms * 2^(n-1))`` after the n-th failed send; it stops early when the next
    sleep would end past ``budget_ms`` from the first send. The defaults ride out a failover
    with ``cluster-node-timeout`` up to ~5 s (detection, election and promotion) in about 12 s.
    """

    attempts: int = 30
    base_ms: int = 25
    max_ms: int = 500
    budget_ms: int = 20_000

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_ms < 0 or self.max_ms < self.base_ms:
            raise ValueError(f"invalid RetryPolicy: {self}")
        if self.budget_ms < 0:
            raise ValueError(f"invalid RetryPolicy: {self}")

    def pause_s(self, failures: int) -> float:
        """Seconds to sleep after the ``failures``-th failed send (1-based)."""
        return min(self.max_ms, self.base_ms << min(failures - 1, 30)) / 1000.0

    def next_pause_s(self, failures: int, started: float, error: BaseException) -> float | None:
        """The pause before the next send, or None when ``error`` must be raised now."""
        if failures >= self.attempts or not is_transient(error):
            return None
        pause = self.pause_s(failures)
        if time.monotonic() + pause - started > self.budget_ms / 1000:
            return None
        return pause

    def call(self, send: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``send(*args, **kwargs)``, sent again on transient errors as this policy says."""
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return send(*args, **kwargs)
            except Exception as error:
                failures += 1
                pause = self.next_pause_s(failures, started, error)
                if pause is None:
                    raise
            time.sleep(pause)

    async def call_async(self, send: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Async twin of ``call``."""
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return await send(*args, **kwargs)
            except Exception as error:
                failures += 1
                pause = self.next_pause_s(failures, started, error)
                if pause is None:
                    raise
            await asyncio.sleep(pause)


#: One send, no retry (the behaviour before failover handling; for tests of raw errors).
NO_RETRY = RetryPolicy(attempts=1)
