"""Counting semaphores: never over-granted, lapsed permits come back, replays act once."""

from __future__ import annotations

import threading
import time
from typing import Any

from luasched import Scheduler
from luasched.lock import (
    new_request_id,
    new_token,
    semaphore_acquire_call,
    semaphore_release_call,
)


def test_permits_replies_and_release(r: Any) -> None:
    s = Scheduler(r, "sem")
    sem = s.semaphore("pool", 3, ttl_ms=10_000)
    handles = [sem.acquire(blocking=False) for _ in range(3)]
    assert all(handles)
    assert sem.acquire(blocking=False) is None
    full = s.runner.run(semaphore_acquire_call(s.namespace, b"pool", new_token(), 3, 1000))
    assert (full.status, full.holders) == ("full", 3) and 9_000 < full.wait_ms <= 10_000
    released = sem.release(handles[0])  # type: ignore[arg-type]
    assert (released.status, released.count) == ("released", 2)
    assert sem.release(handles[0]).status == "expired"  # type: ignore[arg-type]
    with sem.acquire() as handle:  # type: ignore[union-attr]
        assert handle.deadline_ms == handle.acquired_ms + 10_000
        assert sem.extend(handle, 60_000).extended
    assert r.zcard(s.namespace.key("sem", b"pool")) == 2


def test_lapsed_permits_come_back_and_are_reclaimed_in_bounded_steps(r: Any) -> None:
    s = Scheduler(r, "sem")
    sem = s.semaphore("lease", 2, ttl_ms=100)
    first = [sem.acquire(blocking=False) for _ in range(2)]
    assert all(first) and sem.acquire(blocking=False) is None
    time.sleep(0.15)
    assert sem.extend(first[0]).status == "expired"  # type: ignore[arg-type]
    assert all(sem.acquire(blocking=False) for _ in range(2))
    key = s.namespace.key("sem", b"lease")
    r.zadd(key, {b"dead%03d" % index: 1 for index in range(100)})
    before = r.zcard(key)
    sem.acquire(blocking=False)  # full, but reclaims up to 64 lapsed leases
    assert r.zcard(key) == before - 64


def test_blocking_acquire_is_woken_by_a_release(r: Any, server: Any) -> None:
    s = Scheduler(r, "sem")
    held = s.semaphore("wake", 1, ttl_ms=30_000).acquire()
    assert held is not None
    got: list[float] = []

    def wait() -> None:
        client = server.client()
        handle = Scheduler(client, "sem").semaphore("wake", 1, retry_ms=5_000).acquire(timeout=10)
        got.append(time.monotonic())
        assert handle is not None
        client.close()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    released_at = time.monotonic()
    held.release()
    thread.join(10)
    assert got and got[0] - released_at < 3.0  # woken by the signal, not the 5 s timer


def test_replayed_request_ids_act_once(r: Any) -> None:
    s = Scheduler(r, "sem")
    token, rid = new_token(), new_request_id()
    call = semaphore_acquire_call(s.namespace, b"rp", token, 1, 10_000, rid)
    first = s.runner.run(call)
    assert first.status == "acquired"
    release_rid = new_request_id()
    released = s.runner.run(semaphore_release_call(s.namespace, b"rp", token, release_rid))
    assert released.status == "released"
    assert s.runner.run(call) == first  # the replay takes no second permit
    assert r.zcard(s.namespace.key("sem", b"rp")) == 0
    other = new_token()
    call = semaphore_acquire_call(s.namespace, b"rp", other, 1, 10_000)
    assert s.runner.run(call).status == "acquired"
    replay = s.runner.run(semaphore_release_call(s.namespace, b"rp", token, release_rid))
    assert replay == released
    assert r.zscore(s.namespace.key("sem", b"rp"), other) is not None


def test_never_more_holders_than_permits_under_contention(r: Any, server: Any) -> None:
    permits = 3
    inside = [0]
    most = [0]
    grants = [0]
    guard = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        client = server.client()
        try:
            sem = Scheduler(client, "sem").semaphore("hot", permits, ttl_ms=30_000, retry_ms=50)
            for _ in range(25):
                handle = sem.acquire(timeout=30)
                assert handle is not None
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    grants[0] += 1
                time.sleep(0.001)
                with guard:
                    inside[0] -= 1
                assert sem.release(handle).released
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert grants[0] == 16 * 25
    assert 1 < most[0] <= permits
    assert r.zcard(Scheduler(r, "sem").namespace.key("sem", b"hot")) == 0
