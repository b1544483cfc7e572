"""``with s.lock(name, timeout=...) as handle:`` (and semaphores, and ``async with``): the handle
of a granted lock, released at the end of the block; ``LockTimeout`` when it was not granted in
time, with the owner's hold untouched and nothing of the waiter left behind."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import luasched
import luasched.asyncio
from luasched import LockTimeout, LuaschedError, Scheduler
from support.helpers import lock_state, snapshot_ignoring_ttl

NS = "ctx"


def hold_fields(r: Any, s: Scheduler, name: bytes) -> dict[str, Any] | None:
    """The lock's state without the ``waited`` mark (a refused waiter sets it; it only asks the
    hold's release to look for waiters)."""
    state = lock_state(r, s.namespace.key("lock", name))
    if state is not None:
        state.pop("waited")
    return state


def without_lock_key(snap: dict[bytes, bytes], s: Scheduler, name: bytes) -> dict[bytes, bytes]:
    return {key: value for key, value in snap.items() if key != s.namespace.key("lock", name)}


def test_lock_timeout_is_a_luasched_error_and_a_timeout_error() -> None:
    assert issubclass(LockTimeout, LuaschedError) and issubclass(LockTimeout, TimeoutError)
    assert luasched.LockTimeout is LockTimeout
    assert LockTimeout.code == "LOCKTIMEOUT"
    assert LockTimeout.code not in luasched.ERROR_CODES  # the client's own, no script answers it


@pytest.mark.parametrize("fair", [False, True], ids=["plain", "fair"])
def test_a_busy_lock_raises_lock_timeout_and_changes_nothing(r: Any, fair: bool) -> None:
    s = Scheduler(r, NS)
    owner = s.lock("job", ttl_ms=60_000, fair=fair).acquire(blocking=False)
    assert owner is not None
    hold_before, keys_before = hold_fields(r, s, b"job"), snapshot_ignoring_ttl(r, NS)
    entered = False
    busy = s.lock("job", ttl_ms=10_000, fair=fair, timeout=0.3, retry_ms=50)
    with pytest.raises(LockTimeout) as raised, busy:
        entered = True
    assert not entered
    assert raised.value.code == "LOCKTIMEOUT" and raised.value.script == "lock.acquire"
    assert str(raised.value).startswith("LUASCHED_LOCKTIMEOUT lock.acquire: ")
    assert hold_fields(r, s, b"job") == hold_before  # still the owner's, same fence and deadline
    assert hold_before is not None and hold_before["owner"] == owner.token
    # no waiter place or queue entry left behind (the waiter gave its place back)
    assert without_lock_key(snapshot_ignoring_ttl(r, NS), s, b"job") == without_lock_key(
        keys_before, s, b"job"
    )
    assert s.lock("job", fair=fair).acquire(blocking=False) is None  # acquire() still says None
    assert owner.release().released


@pytest.mark.parametrize("fair", [False, True], ids=["plain", "fair"])
def test_a_free_lock_gives_a_handle_released_on_exit(r: Any, fair: bool) -> None:
    s = Scheduler(r, NS)
    with s.lock("job", ttl_ms=10_000, fair=fair, timeout=5) as handle:
        state = lock_state(r, s.namespace.key("lock", b"job"))
        assert state is not None and (state["owner"], state["count"]) == (handle.token, 1)
        assert state["fence"] == handle.fence
    state = lock_state(r, s.namespace.key("lock", b"job"))
    assert state is not None and state["count"] == 0  # released (the state keeps the fence)
    with pytest.raises(RuntimeError, match="boom"), s.lock("job", fair=fair, timeout=5) as second:
        assert second.fence > handle.fence
        raise RuntimeError("boom")
    state = lock_state(r, s.namespace.key("lock", b"job"))
    assert state is not None and state["count"] == 0  # released on the way out of an error too


def test_a_reentrant_lock_entered_nested_releases_once_per_exit(r: Any) -> None:
    s = Scheduler(r, NS)
    lock = s.lock("re", reentrant=True, timeout=1)
    key = s.namespace.key("lock", b"re")
    with lock as outer:
        with lock as inner:
            assert (outer.count, inner.count) == (1, 2)
        state = lock_state(r, key)
        assert state is not None and state["count"] == 1
    state = lock_state(r, key)
    assert state is not None and state["count"] == 0


def test_one_lock_object_entered_by_two_threads_releases_each_ones_own_hold(r: Any) -> None:
    s = Scheduler(r, NS)
    lock = s.lock("shared", ttl_ms=10_000, timeout=10, retry_ms=20)
    key = s.namespace.key("lock", b"shared")
    seen: dict[str, Any] = {}
    first_in, release_first = threading.Event(), threading.Event()

    def first() -> None:
        with lock as handle:
            seen["first"] = handle
            first_in.set()
            release_first.wait(10)

    def second() -> None:
        first_in.wait(10)
        with lock as handle:  # waits for the first thread's exit
            state = lock_state(r, key)
            seen["second-owner"] = None if state is None else state["owner"]
            seen["second"] = handle

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert first_in.wait(10)
    release_first.set()
    for thread in threads:
        thread.join(15)
    assert not any(thread.is_alive() for thread in threads)
    assert seen["second"].fence > seen["first"].fence
    assert seen["second-owner"] == seen["second"].token  # the first exit did not release it
    state = lock_state(r, key)
    assert state is not None and state["count"] == 0


def test_a_full_semaphore_raises_lock_timeout_and_a_free_one_gives_a_permit(r: Any) -> None:
    s = Scheduler(r, NS)
    holders = s.namespace.key("sem", b"pool")
    owner = s.semaphore("pool", 1, ttl_ms=60_000).acquire(blocking=False)
    assert owner is not None
    before = snapshot_ignoring_ttl(r, NS)
    full = s.semaphore("pool", 1, timeout=0.3, retry_ms=50)
    with pytest.raises(LockTimeout) as raised, full:
        pytest.fail("entered a full semaphore")
    assert raised.value.script == "lock.semaphore_acquire"
    assert snapshot_ignoring_ttl(r, NS) == before  # the owner's lease only
    assert s.semaphore("pool", 1).acquire(blocking=False) is None
    assert owner.release().released
    with s.semaphore("pool", 1, ttl_ms=10_000, timeout=5) as permit:
        assert r.zscore(holders, permit.token) is not None
    assert r.zcard(holders) == 0  # given back on exit


# --------------------------------------------------------------------------------------------
# asyncio


def test_async_with_a_busy_lock_or_semaphore_raises_lock_timeout(r: Any, server: Any) -> None:
    s = Scheduler(r, NS)
    owner = s.lock("job", ttl_ms=60_000).acquire(blocking=False)
    permit = s.semaphore("pool", 1, ttl_ms=60_000).acquire(blocking=False)
    assert owner is not None and permit is not None
    hold_before = hold_fields(r, s, b"job")
    before = without_lock_key(snapshot_ignoring_ttl(r, NS), s, b"job")

    async def scenario() -> None:
        client = server.async_client()
        try:
            a = luasched.asyncio.Scheduler(client, NS)
            with pytest.raises(LockTimeout):
                async with a.lock("job", timeout=0.3, retry_ms=50):
                    pytest.fail("entered a held lock")
            with pytest.raises(LockTimeout):
                async with a.semaphore("pool", 1, timeout=0.3, retry_ms=50):
                    pytest.fail("entered a full semaphore")
        finally:
            await client.aclose()

    asyncio.run(scenario())
    assert hold_fields(r, s, b"job") == hold_before
    assert without_lock_key(snapshot_ignoring_ttl(r, NS), s, b"job") == before


def test_async_with_a_free_lock_or_semaphore_gives_a_handle_released_on_exit(
    r: Any, server: Any
) -> None:
    s = Scheduler(r, NS)
    key, holders = s.namespace.key("lock", b"job"), s.namespace.key("sem", b"pool")

    async def scenario() -> None:
        client = server.async_client()
        try:
            a = luasched.asyncio.Scheduler(client, NS)
            async with a.lock("job", ttl_ms=10_000, timeout=5) as handle:
                state = lock_state(r, key)
                assert state is not None and (state["owner"], state["count"]) == (handle.token, 1)
            async with a.semaphore("pool", 2, timeout=5) as permit:
                assert r.zscore(holders, permit.token) is not None
        finally:
            await client.aclose()

    asyncio.run(scenario())
    state = lock_state(r, key)
    assert state is not None and state["count"] == 0
    assert r.zcard(holders) == 0
