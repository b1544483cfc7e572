"""Blocking waits: the one place that decides the ``BLPOP`` timeout a server gets.

Every blocking call of luasched (``Lock.acquire``, ``Semaphore.acquire``, a blocking
``dequeue`` of a plain, node or sharded queue; sync and asyncio) waits between two script
calls by blocking on a wake list. The loops decide how long they want to wait; this module
turns that into the timeout sent to the server, and sends it:

* **Never below** ``MIN_BLOCK_MS`` (2 ms). ``BLPOP key 0`` means "block forever", and Redis
  6.2 rounds ``0.001`` (and anything below 2 ms that rounds down) to 0: a 1 ms wait blocked
  until some signal arrived, possibly never. 2 ms is the smallest timeout every supported
  server honours; a shorter wanted wait blocks 2 ms (at most 2 ms past the caller's limit).
* **Never past the client's socket timeout** (less a margin): a ``BLPOP`` longer than the
  socket timeout would end in a ``TimeoutError`` instead of a reply. A wait cut short this way
  only means one more script call.
* **Never sent again.** A wait that fails with a transient error (a failover, a lost
  connection: ``luasched.retry.is_transient``) ends as "no signal" once its time is over; the
  loop's next script call, sent under the runner's ``RetryPolicy``, finds out whether the
  server is back. So a wait's own failure never turns into a resend loop past the caller's
  deadline. Other errors (an ACL refusing ``BLPOP``...) are raised.

With these rules a blocking call returns within its limit plus one script call, one 2 ms block
and the server's timer resolution (Redis 6.2 checks blocked clients' timeouts about every
100 ms), whatever ``retry_ms``, ``poll_ms``, ``timeout`` or ``block_ms`` (down to 1 ms, and 0:
no wait at all), and whether or not the client has a socket timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

from luasched.retry import is_transient

__all__ = [
    "MIN_BLOCK_MS",
    "SOCKET_MARGIN_MS",
    "block_timeout_s",
    "pass_on_commands",
    "socket_timeout_s",
    "wait_for_signal",
    "wait_for_signal_async",
]

#: The shortest ``BLPOP`` timeout sent: every supported server returns for it (Redis 6.2.5
#: blocks forever on 0.001, which it rounds down to 0).
MIN_BLOCK_MS = 2

#: A ``BLPOP`` ends at least this long (or half the socket timeout, if less) before the client's
#: socket timeout would cut it.
SOCKET_MARGIN_MS = 200

#: redis-py's socket timeout when the client's connection options do not name one.
_REDIS_PY_SOCKET_TIMEOUT_S = 5.0


def socket_timeout_s(client: Any) -> float | None:
    """The socket timeout of ``client``'s connections in seconds (None: none), for every
    redis-py client (``Redis``, ``RedisCluster``, sync or asyncio)."""
    get_kwargs = getattr(client, "get_connection_kwargs", None)
    if get_kwargs is None:
        return _REDIS_PY_SOCKET_TIMEOUT_S
    options = get_kwargs()
    if "socket_timeout" not in options:
        return _REDIS_PY_SOCKET_TIMEOUT_S
    timeout = options["socket_timeout"]
    return None if timeout is None else float(timeout)


def block_timeout_s(wait_ms: float, socket_timeout: float | None) -> float | None:
    """The ``BLPOP`` timeout, in seconds, for a wanted wait of ``wait_ms``; None: do not block
    (``wait_ms`` <= 0).

    Whole milliseconds, at least ``MIN_BLOCK_MS`` (never 0, which means "forever", nor a value
    Redis 6.2 rounds to 0), at most ``wait_ms`` rounded up to MIN_BLOCK_MS, and short of
    ``socket_timeout`` (seconds; None: no limit) by ``SOCKET_MARGIN_MS`` or half of it.
    """
    if not wait_ms > 0:  # also NaN
        return None
    block_ms = max(MIN_BLOCK_MS, math.ceil(wait_ms))
    if socket_timeout is not None:
        socket_ms = socket_timeout * 1000.0
        cap_ms = math.floor(socket_ms - min(SOCKET_MARGIN_MS, socket_ms / 2))
        block_ms = max(MIN_BLOCK_MS, min(block_ms, cap_ms))
    return block_ms / 1000.0


def wait_for_signal(client: Any, keys: Sequence[bytes], wait_ms: float) -> Any:
    """Block on the lists ``keys`` (BLPOP, the first that has a signal) for about ``wait_ms``
    (see ``block_timeout_s``); BLPOP's reply, ``(list, signal)``, or None when none came.
    Returns None at once for ``wait_ms`` <= 0. A transient error ends the wait, after the rest
    of its time, as no signal (never sent again); any other error is raised."""
    timeout = block_timeout_s(wait_ms, socket_timeout_s(client))
    if timeout is None:
        return None
    started = time.monotonic()
    try:
        return client.blpop(list(keys), timeout=timeout)
    except Exception as error:
        if not is_transient(error):
            raise
    # Sleep out the wait, so a server that refuses connections is not asked in a busy loop.
    time.sleep(max(0.0, timeout - (time.monotonic() - started)))
    return None


async def wait_for_signal_async(client: Any, keys: Sequence[bytes], wait_ms: float) -> Any:
    """Async twin of ``wait_for_signal``."""
    timeout = block_timeout_s(wait_ms, socket_timeout_s(client))
    if timeout is None:
        return None
    started = time.monotonic()
    try:
        return await client.blpop(list(keys), timeout=timeout)
    except Exception as error:
        if not is_transient(error):
            raise
    await asyncio.sleep(max(0.0, timeout - (time.monotonic() - started)))
    return None


def pass_on_commands(
    key: bytes, signal: bytes, max_length: int, ttl_ms: int
) -> tuple[tuple[Any, ...], ...]:
    """The commands that pass a wake-up ``signal`` popped by the wrong waiter on to the own list
    ``key`` of the waiter it names, bounded as the scripts bound their wake lists (at most
    ``max_length`` signals, expiring ``ttl_ms`` after a push). Node-queue workers and fair lock
    waiters both do it (``loops.Send``)."""
    return (
        ("LPUSH", key, signal),
        ("LTRIM", key, 0, max_length - 1),
        ("PEXPIRE", key, ttl_ms),
    )
