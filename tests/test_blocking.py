"""No blocking call waits past its limit plus a bounded slack, on any server (luasched.blocking).

Redis 6.2 rounds a ``BLPOP`` timeout of 1 ms down to 0, "block forever": a lock or semaphore
acquire with ``retry_ms=1`` or a 1-3 ms ``timeout``, and a dequeue with ``poll_ms=1`` or a 1-3 ms
``block_ms``, stalled there until some signal arrived (20 s and more, or forever without a socket
timeout). A ``BLPOP`` longer than the client's socket timeout, or one whose connection failed, was
sent again by the RetryPolicy for up to its 20 s budget.

These are guarantee tests, not speed claims: each call runs in a watchdog thread and must return
within its limit plus ``SLACK_S`` (5 s, against stalls of 20 s or more), without an error. If it
does not, the watchdog fails the test and ``CLIENT UNBLOCK``s every blocked client, so no stall
outlives it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import luasched.asyncio
from luasched import Scheduler
from luasched.blocking import block_timeout_s
from support.proxy import Command, ReplyDroppingProxy

T = TypeVar("T")

#: How long past its limit a blocking call may return (a loaded machine: three test workers on
#: two cores; one script call; Redis 6.2's ~100 ms timer); the stalls these tests catch last
#: 20 s or more, or end in a socket timeout's error, which fails the test whatever its time.
SLACK_S = 5.0

NS = "blk"

#: The waiters under test, by kind: the same options on the sync and the asyncio Scheduler.
WAITERS: dict[str, Callable[[Any], Any]] = {
    "lock": lambda s: s.lock("x", retry_ms=1, wait_ttl_ms=10),
    "fair-lock": lambda s: s.lock("x", fair=True, retry_ms=1, wait_ttl_ms=10),
    "reentrant-lock": lambda s: s.lock("x", reentrant=True, retry_ms=1, wait_ttl_ms=10),
    "semaphore": lambda s: s.semaphore("x", 1, retry_ms=1),
}
#: The same kinds with default options (retry_ms 200).
DEFAULT_WAITERS: dict[str, Callable[[Any], Any]] = {
    "lock": lambda s: s.lock("x"),
    "fair-lock": lambda s: s.lock("x", fair=True),
    "semaphore": lambda s: s.semaphore("x", 1),
}


def unblock_all(server: Any) -> None:
    """``CLIENT UNBLOCK`` every client blocked on any primary of ``server``."""
    for node in server.primaries():
        with node:
            for client in node.client_list():
                if "b" in client.get("flags", ""):
                    node.client_unblock(int(client["id"]))


def bounded(server: Any, limit_s: float, body: Callable[[], T]) -> T:
    """``body()``'s result; fails unless it returned (or raised) within ``limit_s + SLACK_S``.

    ``body`` runs in a daemon thread. On a stall the blocked clients are unblocked (bounded, up to
    ~10 s) so the thread can end, then the test fails."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = body()
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="bounded-call", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(limit_s + SLACK_S)
    elapsed = time.monotonic() - started
    if thread.is_alive():
        for _ in range(50):
            unblock_all(server)
            thread.join(0.2)
            if not thread.is_alive():
                break
        pytest.fail(
            f"a blocking call with a limit of {limit_s} s still waited after {elapsed:.1f} s"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


@contextmanager
def sync_scheduler(server: Any, socket_timeout: float | None) -> Iterator[Scheduler]:
    client = server.client(socket_timeout=socket_timeout)
    try:
        yield Scheduler(client, NS)
    finally:
        client.close()


def run_async(
    server: Any,
    socket_timeout: float | None,
    body: Callable[[luasched.asyncio.Scheduler], Awaitable[T]],
) -> Callable[[], T]:
    """A thread body: ``body(scheduler)`` on a fresh asyncio client (closed after it)."""

    async def scenario() -> T:
        client = server.async_client(socket_timeout=socket_timeout)
        try:
            return await body(luasched.asyncio.Scheduler(client, NS))
        finally:
            await client.aclose()

    return lambda: asyncio.run(scenario())


def hold(r: Any, kind: str) -> Any:
    """Take "x" of ``kind`` (all its permits) for a minute, directly; the handle."""
    s = Scheduler(r, NS)
    taker = s.semaphore("x", 1) if kind == "semaphore" else s.lock("x", fair=kind == "fair-lock")
    handle = taker.acquire(blocking=False)
    assert handle is not None
    return taker, handle


def assert_still_held(holder: Any) -> None:
    taker, handle = holder
    assert taker.extend(handle, 60_000).extended


# --------------------------------------------------------------------------------------------
# Locks and semaphores


@pytest.mark.parametrize("socket_timeout", [2.0, None], ids=["socket-2s", "no-socket-timeout"])
@pytest.mark.parametrize("kind", list(WAITERS))
def test_acquire_with_retry_ms_1_returns_by_its_timeout(
    r: Any, server: Any, kind: str, socket_timeout: float | None
) -> None:
    holder = hold(r, kind)
    with sync_scheduler(server, socket_timeout) as s:
        waiter = WAITERS[kind](s)
        assert bounded(server, 0.3, lambda: waiter.acquire(timeout=0.3)) is None
    assert_still_held(holder)


@pytest.mark.parametrize("socket_timeout", [2.0, None], ids=["socket-2s", "no-socket-timeout"])
@pytest.mark.parametrize("kind", list(WAITERS))
def test_async_acquire_with_retry_ms_1_returns_by_its_timeout(
    r: Any, server: Any, kind: str, socket_timeout: float | None
) -> None:
    holder = hold(r, kind)

    async def body(s: luasched.asyncio.Scheduler) -> Any:
        return await WAITERS[kind](s).acquire(timeout=0.3)

    assert bounded(server, 0.3, run_async(server, socket_timeout, body)) is None
    assert_still_held(holder)


#: Timeouts of 0 (one attempt) and 1-3 ms, each tried several times (a 1.2-3 ms timeout stalled
#: about 3 times in 20 on 6.2, a 1 ms one nearly always).
SHORT_TIMEOUTS = [0, 0.001, 0.0012, 0.002, 0.003] * 4


@pytest.mark.parametrize("kind", list(DEFAULT_WAITERS))
def test_acquire_with_a_timeout_of_0_to_3_ms_returns_by_it(r: Any, server: Any, kind: str) -> None:
    holder = hold(r, kind)
    with sync_scheduler(server, 2.0) as s:
        waiter = DEFAULT_WAITERS[kind](s)
        for timeout in SHORT_TIMEOUTS:
            acquire = functools.partial(waiter.acquire, timeout=timeout)
            assert bounded(server, timeout, acquire) is None
    assert_still_held(holder)


@pytest.mark.parametrize("kind", list(DEFAULT_WAITERS))
def test_async_acquire_with_a_timeout_of_0_to_3_ms_returns_by_it(
    r: Any, server: Any, kind: str
) -> None:
    holder = hold(r, kind)

    async def body(s: luasched.asyncio.Scheduler) -> list[Any]:
        waiter = DEFAULT_WAITERS[kind](s)
        assert await waiter.acquire(blocking=False) is None  # connected, scripts loaded
        return [await waiter.acquire(timeout=timeout) for timeout in SHORT_TIMEOUTS]

    got = bounded(server, sum(SHORT_TIMEOUTS), run_async(server, 2.0, body))
    assert got == [None] * len(SHORT_TIMEOUTS)
    assert_still_held(holder)


@pytest.mark.parametrize("kind", list(DEFAULT_WAITERS))
def test_a_wait_longer_than_the_socket_timeout_returns_by_its_timeout(
    r: Any, server: Any, kind: str
) -> None:
    """retry_ms 3 s on a client with a 0.5 s socket timeout: each BLPOP must end before the
    socket timeout (a cut BLPOP was sent again by the RetryPolicy for 20 s)."""
    holder = hold(r, kind)
    with sync_scheduler(server, 0.5) as s:
        waiter = (
            s.semaphore("x", 1, retry_ms=3_000)
            if kind == "semaphore"
            else s.lock("x", fair=kind == "fair-lock", retry_ms=3_000)
        )
        assert bounded(server, 1.5, lambda: waiter.acquire(timeout=1.5)) is None
    assert_still_held(holder)


# --------------------------------------------------------------------------------------------
# Queues: plain and node queue, dequeue and dequeue_many


def take(q: Any, node: bool, many: bool, block_ms: int) -> Any:
    view = q.for_node("n1") if node else q
    if many:
        return view.dequeue_many("w", 3, 1000, block_ms=block_ms)
    return view.dequeue("w", 1000, block_ms=block_ms)


QUEUE_SHAPES = [(False, False), (False, True), (True, False), (True, True)]
QUEUE_IDS = ["dequeue", "dequeue_many", "node-dequeue", "node-dequeue_many"]


def empty(many: bool) -> Any:
    return [] if many else None


@pytest.mark.parametrize("socket_timeout", [2.0, None], ids=["socket-2s", "no-socket-timeout"])
@pytest.mark.parametrize(("node", "many"), QUEUE_SHAPES, ids=QUEUE_IDS)
def test_dequeue_with_poll_ms_1_returns_by_block_ms(
    r: Any, server: Any, node: bool, many: bool, socket_timeout: float | None
) -> None:
    with sync_scheduler(server, socket_timeout) as s:
        q = s.queue("q", poll_ms=1)
        assert bounded(server, 0.3, lambda: take(q, node, many, 300)) == empty(many)


@pytest.mark.parametrize("socket_timeout", [2.0, None], ids=["socket-2s", "no-socket-timeout"])
@pytest.mark.parametrize(("node", "many"), QUEUE_SHAPES, ids=QUEUE_IDS)
def test_async_dequeue_with_poll_ms_1_returns_by_block_ms(
    r: Any, server: Any, node: bool, many: bool, socket_timeout: float | None
) -> None:
    async def body(s: luasched.asyncio.Scheduler) -> Any:
        view: Any = s.queue("q", poll_ms=1)
        view = view.for_node("n1") if node else view
        if many:
            return await view.dequeue_many("w", 3, 1000, block_ms=300)
        return await view.dequeue("w", 1000, block_ms=300)

    assert bounded(server, 0.3, run_async(server, socket_timeout, body)) == empty(many)


SHORT_BLOCKS = [1, 2, 3] * 4


@pytest.mark.parametrize(("node", "many"), QUEUE_SHAPES, ids=QUEUE_IDS)
def test_dequeue_with_block_ms_1_to_3_returns_by_it(
    r: Any, server: Any, node: bool, many: bool
) -> None:
    with sync_scheduler(server, 2.0) as s:
        q = s.queue("q")
        for block_ms in SHORT_BLOCKS:
            call = functools.partial(take, q, node, many, block_ms)
            got = bounded(server, block_ms / 1000, call)
            assert got == empty(many)


@pytest.mark.parametrize(("node", "many"), QUEUE_SHAPES, ids=QUEUE_IDS)
def test_async_dequeue_with_block_ms_1_to_3_returns_by_it(
    r: Any, server: Any, node: bool, many: bool
) -> None:
    async def body(s: luasched.asyncio.Scheduler) -> list[Any]:
        view: Any = s.queue("q")
        view = view.for_node("n1") if node else view
        take = view.dequeue_many if many else view.dequeue
        size = (3,) if many else ()
        assert await take("w", *size, 1000) == empty(many)  # connected, scripts loaded
        return [await take("w", *size, 1000, block_ms=block_ms) for block_ms in SHORT_BLOCKS]

    got = bounded(server, sum(SHORT_BLOCKS) / 1000, run_async(server, 2.0, body))
    assert got == [empty(many)] * len(SHORT_BLOCKS)


def test_a_dequeue_poll_longer_than_the_socket_timeout_returns_by_block_ms(
    r: Any, server: Any
) -> None:
    with sync_scheduler(server, 0.5) as s:
        q = s.queue("q", poll_ms=3_000)
        assert bounded(server, 1.5, lambda: q.dequeue("w", 1000, block_ms=1_500)) is None


def test_a_blocked_dequeue_still_takes_a_task_enqueued_meanwhile(r: Any, server: Any) -> None:
    """The 2 ms floor and the socket cap shorten waits, never skip a task: a worker blocked with
    poll_ms=1 gets a task enqueued while it waits."""
    with sync_scheduler(server, 2.0) as s:
        q = s.queue("q", poll_ms=1)
        producer = threading.Timer(0.2, lambda: Scheduler(r, NS).queue("q").enqueue("t1", b"p"))
        producer.start()
        try:
            lease = bounded(server, 5.0, lambda: q.dequeue("w", 1000, block_ms=5_000))
        finally:
            producer.join()
        assert lease is not None and lease.task_id == b"t1"


# --------------------------------------------------------------------------------------------
# A wait whose BLPOP fails is not sent again past the caller's limit


def is_blpop(command: Command) -> bool:
    return command[0].upper() == b"BLPOP"


@pytest.mark.standalone_only
@pytest.mark.parametrize("kind", ["lock", "semaphore", "queue"])
def test_a_failing_wait_is_not_resent_past_the_limit(r: Any, server: Any, kind: str) -> None:
    """Every BLPOP's reply is lost (the connection drops after the server ran it): the call
    must still return by its limit. The RetryPolicy used to send the BLPOP again for 20 s.
    (The client does not retry by itself: redis-py's own retries back off for seconds.)"""
    holder = hold(r, kind) if kind != "queue" else None
    with ReplyDroppingProxy(server.port) as proxy:
        proxy.drop_reply_of(is_blpop, times=1_000_000)
        client = redis.Redis(port=proxy.port, socket_timeout=2.0, retry=Retry(NoBackoff(), 0))
        try:
            s = Scheduler(client, NS, use_functions=False)
            if kind == "queue":
                q = s.queue("q", poll_ms=50)
                assert bounded(server, 0.6, lambda: q.dequeue("w", 1000, block_ms=600)) is None
            else:
                waiter = (
                    s.semaphore("x", 1, retry_ms=50)
                    if kind == "semaphore"
                    else s.lock("x", retry_ms=50)
                )
                assert bounded(server, 0.6, lambda: waiter.acquire(timeout=0.6)) is None
            assert proxy.count(is_blpop) > 0  # the waits did go through the proxy
        finally:
            client.close()
    if holder is not None:
        assert_still_held(holder)


# --------------------------------------------------------------------------------------------
# The one rule for the BLPOP timeout


def test_the_blpop_timeout_is_never_below_2_ms_nor_past_the_socket_timeout() -> None:
    assert block_timeout_s(0, None) is None  # no time left: no BLPOP at all
    assert block_timeout_s(-5, 2.0) is None
    assert block_timeout_s(0.3, None) == 0.002  # 6.2 blocks forever on 0.001
    assert block_timeout_s(1, None) == 0.002
    assert block_timeout_s(2.5, None) == 0.003  # whole ms, rounded up
    assert block_timeout_s(300, 2.0) == 0.3
    assert block_timeout_s(3_000, None) == 3.0
    assert block_timeout_s(3_000, 2.0) == 1.8  # 200 ms before the socket timeout
    assert block_timeout_s(3_000, 0.1) == 0.05  # half of a short socket timeout
    assert block_timeout_s(3_000, 0.001) == 0.002  # never below 2 ms
