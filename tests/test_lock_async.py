"""The asyncio twin: same behaviour, and a cancelled acquire never leaves anything behind."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import luasched.asyncio
from support.helpers import lock_state as state_of


def lock_state(r: Any, s: Any, name: bytes) -> tuple[int, int, int]:
    """(holds of the lock, fair queue length, waiter places) of lock ``name``."""
    ns = s.namespace
    state = state_of(r, ns.key("lock", name))
    return (
        state["count"] if state else 0,
        int(r.zcard(ns.key("lock-queue", name))),
        int(r.zcard(ns.key("lock-places", name))),
    )


def test_async_lock_semaphore_and_context_managers(r: Any, server: Any) -> None:
    async def scenario() -> None:
        client = server.async_client()
        s = luasched.asyncio.Scheduler(client, "alk")
        lock = s.lock("a", ttl_ms=5_000)
        async with await lock.acquire() as handle:  # type: ignore[union-attr]
            first_fence = handle.fence
            assert await s.lock("a").acquire(blocking=False) is None
            assert (await lock.extend(handle, 10_000)).extended
        second = await lock.acquire(blocking=False)
        assert second is not None and second.fence > first_fence
        assert (await second.release()).released
        reentrant = s.lock("b", reentrant=True)
        one, two = await reentrant.acquire(), await reentrant.acquire()
        assert one is not None and two is not None and (one.count, two.count) == (1, 2)
        assert (await reentrant.release(two)).count == 1
        assert (await reentrant.release(one)).count == 0
        sem = s.semaphore("p", 2, ttl_ms=5_000)
        permits = [await sem.acquire(blocking=False) for _ in range(3)]
        assert permits[0] and permits[1] and permits[2] is None
        async with permits[0]:
            pass
        assert await sem.acquire(blocking=False) is not None
        await client.aclose()

    asyncio.run(scenario())


def test_async_waiter_is_woken_and_auto_renew_stops(r: Any, server: Any) -> None:
    async def scenario() -> None:
        client = server.async_client()
        s = luasched.asyncio.Scheduler(client, "alk")
        lock = s.lock("w", ttl_ms=300, auto_renew=True)
        holder = await lock.acquire()
        assert holder is not None
        waiter = asyncio.ensure_future(s.lock("w", retry_ms=5_000).acquire(timeout=10))
        await asyncio.sleep(0.7)  # longer than the ttl: auto-renew keeps the hold
        assert not waiter.done()
        loop = asyncio.get_running_loop()
        released_at = loop.time()
        await lock.release(holder)
        assert not lock._renewers
        handle = await asyncio.wait_for(waiter, 5)
        assert handle is not None and loop.time() - released_at < 1.0
        await handle.release()
        await client.aclose()

    asyncio.run(scenario())


def test_cancelled_waiters_leave_nothing_behind(r: Any, server: Any) -> None:
    async def scenario() -> None:
        client = server.async_client()
        s = luasched.asyncio.Scheduler(client, "alk")
        for fair in (False, True):
            name = b"c%d" % fair
            holder = await s.lock(name, fair=fair).acquire()
            assert holder is not None
            waiters = [
                asyncio.ensure_future(s.lock(name, fair=fair, retry_ms=50).acquire())
                for _ in range(3)
            ]
            for _ in range(100):  # each waiter's first refused attempt takes a place
                if lock_state(r, s, name)[2] == 3:
                    break
                await asyncio.sleep(0.05)
            assert lock_state(r, s, name)[2] == 3  # three waiter places
            for task in waiters:
                task.cancel()
            results = await asyncio.gather(*waiters, return_exceptions=True)
            assert all(isinstance(result, asyncio.CancelledError) for result in results)
            assert lock_state(r, s, name) == (1, 0, 0)  # the places are gone, the hold stays
            await holder.release()
        await client.aclose()

    asyncio.run(scenario())


def test_cancelling_at_any_moment_never_leaves_a_hold(r: Any, server: Any) -> None:
    async def scenario() -> None:
        client = server.async_client()
        s = luasched.asyncio.Scheduler(client, "alk")
        rng = random.Random(6)
        outcomes = {"cancelled": 0, "acquired": 0}
        for attempt in range(60):
            name = b"race"
            reentrant = attempt % 3 == 0
            fair = attempt % 2 == 0
            lock = s.lock(name, fair=fair, reentrant=reentrant)
            outer = await lock.acquire() if reentrant else None  # a hold the undo must keep
            task = asyncio.ensure_future(lock.acquire())
            # Before the send, while the script runs, or after: around one round trip.
            await asyncio.sleep(0 if attempt % 4 == 0 else rng.uniform(0, 0.0006))
            task.cancel()
            try:
                handle = await task
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            else:
                outcomes["acquired"] += 1
                assert handle is not None
                await lock.release(handle)
            if outer is not None:
                state = state_of(r, s.namespace.key("lock", name))
                assert state is not None and state["count"] == 1
                assert (await lock.release(outer)).count == 0
            assert lock_state(r, s, name) == (0, 0, 0), attempt
        assert outcomes["cancelled"] > 0
        await client.aclose()

    asyncio.run(scenario())


def test_cancelling_a_semaphore_acquire_at_any_moment_never_leaves_a_permit(
    r: Any, server: Any
) -> None:
    async def scenario() -> None:
        client = server.async_client()
        s = luasched.asyncio.Scheduler(client, "alk")
        holders = s.namespace.key("sem", b"race")
        rng = random.Random(7)
        cancelled = 0
        for attempt in range(60):
            sem = s.semaphore("race", 1)
            task = asyncio.ensure_future(sem.acquire())
            # Before the send, while the script runs, or after: around one round trip.
            await asyncio.sleep(0 if attempt % 4 == 0 else rng.uniform(0, 0.0006))
            task.cancel()
            try:
                handle = await task
            except asyncio.CancelledError:
                cancelled += 1
            else:
                assert handle is not None
                await sem.release(handle)
            assert r.zcard(holders) == 0, attempt  # the undo gave back what the attempt got
        assert cancelled > 0
        await client.aclose()

    asyncio.run(scenario())
