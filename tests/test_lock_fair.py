"""Fair locks: FIFO grants, waiters that die or give up leave the queue by themselves."""

from __future__ import annotations

import threading
import time
from typing import Any

from luasched import Scheduler
from luasched.lock import acquire_call, new_token, release_call, waiter_wake_key


def attempt(s: Scheduler, name: bytes, token: bytes, wait_ttl_ms: int, ttl_ms: int = 10_000) -> Any:
    call = acquire_call(s.namespace, name, token, ttl_ms, fair=True, wait_ttl_ms=wait_ttl_ms)
    return s.runner.run(call)


def queue_length(r: Any, s: Scheduler, name: bytes) -> int:
    return int(r.zcard(s.namespace.key("lock-queue", name)))


def test_replies_and_positions(r: Any) -> None:
    s = Scheduler(r, "fair")
    a, b, c = new_token(), new_token(), new_token()
    held = attempt(s, b"f", a, 1000)
    assert held.status == "acquired"
    first = attempt(s, b"f", b, 1000)
    assert (first.status, first.position) == ("held", 1) and first.wait_ms > 0
    assert attempt(s, b"f", c, 1000).position == 2
    assert attempt(s, b"f", b, 1000).position == 1  # renewing keeps the place
    s.runner.run(release_call(s.namespace, b"f", a))
    # Free, but b comes first: c is told so and stays second.
    queued = attempt(s, b"f", c, 1000)
    assert (queued.status, queued.position, queued.wait_ms) == ("queued", 2, 0)
    granted = attempt(s, b"f", b, 1000)
    assert granted.status == "acquired" and granted.fence > held.fence
    assert attempt(s, b"f", c, 1000).position == 1
    assert queue_length(r, s, b"f") == 1
    # A try without a place (wait_ttl_ms=0) never enters the queue.
    d = new_token()
    assert attempt(s, b"f", d, 0).position == 0
    assert queue_length(r, s, b"f") == 1


def test_grants_follow_arrival_order(r: Any, server: Any) -> None:
    s = Scheduler(r, "fair")
    holder = s.lock("order", fair=True).acquire()
    assert holder is not None
    order: list[int] = []
    errors: list[BaseException] = []

    def wait(index: int) -> None:
        client = server.client()
        try:
            # places that outlast any stall of a loaded machine (the default, 5 x retry_ms =
            # 0.5 s, lapses if a thread is not scheduled for that long: then it loses its turn)
            lock = Scheduler(client, "fair").lock(
                "order", fair=True, retry_ms=100, wait_ttl_ms=20_000
            )
            handle = lock.acquire(timeout=20)
            assert handle is not None
            order.append(index)
            time.sleep(0.01)
            assert lock.release(handle).released
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    threads = []
    for index in range(6):  # staggered arrivals
        thread = threading.Thread(target=wait, args=(index,))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while queue_length(r, s, b"order") < index + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert queue_length(r, s, b"order") == 6
    holder.release()
    for thread in threads:
        thread.join(20)
    assert not errors, errors[0]
    assert order == list(range(6))
    assert queue_length(r, s, b"order") == 0


def test_a_dead_waiter_blocks_the_others_only_until_its_place_lapses(r: Any) -> None:
    s = Scheduler(r, "fair")
    holder = s.lock("dead", fair=True).acquire()
    assert holder is not None
    dead = attempt(s, b"dead", new_token(), wait_ttl_ms=400)  # then never calls again
    assert dead.position == 1
    place_lapses_ms = dead.now_ms + 400
    waiter = s.lock("dead", fair=True, retry_ms=50)
    holder.release()
    started = time.monotonic()
    handle = waiter.acquire(timeout=5)
    assert handle is not None
    assert handle.acquired_ms >= place_lapses_ms  # it did wait for the dead waiter's place
    assert time.monotonic() - started < 3.0  # but not for its 5 s timeout
    assert queue_length(r, s, b"dead") == 0


def test_a_waiter_that_gives_up_leaves_the_queue(r: Any) -> None:
    s = Scheduler(r, "fair")
    holder = s.lock("quit", fair=True).acquire()
    assert holder is not None
    assert s.lock("quit", fair=True, retry_ms=50).acquire(timeout=0.2) is None
    assert queue_length(r, s, b"quit") == 0
    assert r.zcard(s.namespace.key("lock-places", b"quit")) == 0


def test_lapsed_places_are_swept_a_bounded_number_per_call(r: Any) -> None:
    s = Scheduler(r, "fair")
    queue, places = s.namespace.key("lock-queue", b"many"), s.namespace.key("lock-places", b"many")
    r.zadd(queue, {b"w%03d" % index: index + 1 for index in range(100)})
    r.zadd(places, {b"w%03d" % index: 1 for index in range(100)})  # lapsed long ago
    token = new_token()
    first = attempt(s, b"many", token, 1000)
    assert first.status == "queued"  # 64 scanned, all lapsed: nobody is granted this call
    assert queue_length(r, s, b"many") == 100 - 64 + 1
    second = attempt(s, b"many", token, 1000)
    assert second.status == "acquired"
    assert queue_length(r, s, b"many") == 0


def test_fair_queue_keys_expire_once_every_waiter_is_gone(r: Any) -> None:
    s = Scheduler(r, "fair")
    assert attempt(s, b"exp", new_token(), 1000).status == "acquired"
    attempt(s, b"exp", new_token(), 150)
    assert 0 < r.pttl(s.namespace.key("lock-queue", b"exp")) <= 150
    time.sleep(0.2)
    assert (
        r.exists(s.namespace.key("lock-queue", b"exp"), s.namespace.key("lock-places", b"exp")) == 0
    )


def test_fair_contention_spreads_grants_evenly(r: Any, server: Any) -> None:
    counts = [0] * 8
    window_s = 1.0
    stop = [0.0]
    errors: list[BaseException] = []
    # The window opens when every thread has its client (under load, starting 8 threads and
    # their connections took longer than the whole window).
    ready = threading.Barrier(9)

    def work(index: int) -> None:
        client = server.client()
        try:
            lock = Scheduler(client, "fair").lock("even", fair=True, retry_ms=100)
            ready.wait(30)
            while time.monotonic() < stop[0]:
                handle = lock.acquire(timeout=5)
                assert handle is not None
                counts[index] += 1
                lock.release(handle)
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    stop[0] = time.monotonic() + 30  # until the barrier below lets everyone in
    ready.wait(30)
    stop[0] = time.monotonic() + window_s
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert sum(counts) >= 8, counts
    jain = sum(counts) ** 2 / (len(counts) * sum(count * count for count in counts))
    print(f"\n{server.name}: fair {sum(counts)} grants in {window_s} s, Jain {jain:.3f}, {counts}")
    assert jain > 0.9


def test_a_release_wakes_the_head_of_the_queue_only(r: Any) -> None:
    """The signal names the oldest live waiter: its token, pushed on the lock's wake list (a key
    the call declares); no script writes a waiter's own list (a waiter that pops another's token
    passes it on there: the test below)."""
    s = Scheduler(r, "fair")
    holder, w1, w2, w3 = new_token(), new_token(), new_token(), new_token()
    wake = s.namespace.key("lock-wake", b"head")

    def own_lists() -> int:
        return sum(int(r.exists(waiter_wake_key(s.namespace, b"head", t))) for t in (w1, w2, w3))

    assert attempt(s, b"head", holder, 0).status == "acquired"
    for token in (w1, w2, w3):
        assert attempt(s, b"head", token, 5_000).status == "held"
    assert s.runner.run(release_call(s.namespace, b"head", holder)).released
    assert r.lrange(wake, 0, -1) == [w1]
    # w1 gives up instead of taking it: its release wakes the next head, w2.
    assert s.runner.run(release_call(s.namespace, b"head", w1)).status == "expired"
    assert r.lrange(wake, 0, -1) == [w2, w1]
    r.delete(wake)
    assert attempt(s, b"head", w2, 5_000).status == "acquired"
    assert s.runner.run(release_call(s.namespace, b"head", w2)).released
    assert r.lrange(wake, 0, -1) == [w3]
    assert attempt(s, b"head", w3, 5_000).status == "acquired"
    r.delete(wake)
    # Nobody waits any more: the last release writes no signal anywhere.
    assert s.runner.run(release_call(s.namespace, b"head", w3)).released
    assert r.exists(wake) == 0 and own_lists() == 0


def test_a_fair_waiter_passes_on_a_signal_of_another_waiter(r: Any, server: Any) -> None:
    """w1 holds the head place (a raw attempt) but does not block; w2 (retry_ms 5 s) is the only
    one blocked, so it pops the signal the release pushes for w1: it passes it on to w1's own
    list and keeps waiting (w1 is the head); once w1 has taken and released the lock, w2 is
    granted well before its 5 s timer."""
    s = Scheduler(r, "fair")
    holder = s.lock("pass", fair=True).acquire()
    assert holder is not None
    w1 = new_token()
    assert attempt(s, b"pass", w1, 20_000).status == "held"  # the head of the queue
    got: list[float] = []
    errors: list[BaseException] = []

    def wait() -> None:
        client = server.client()
        try:
            lock = Scheduler(client, "fair").lock("pass", fair=True, retry_ms=5_000)
            handle = lock.acquire(timeout=15)
            assert handle is not None
            got.append(time.monotonic())
            assert lock.release(handle).released
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    second = threading.Thread(target=wait)
    second.start()
    deadline = time.monotonic() + 5
    while queue_length(r, s, b"pass") < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)  # w2 is in its BLPOP
    holder.release()
    own = waiter_wake_key(s.namespace, b"pass", w1)
    while not r.exists(own) and time.monotonic() < deadline + 5:
        time.sleep(0.005)
    assert r.lrange(own, 0, -1) == [w1]  # passed on by w2
    assert not got  # w2 still waits: w1 is the head
    assert attempt(s, b"pass", w1, 20_000).status == "acquired"
    released = time.monotonic()
    assert s.runner.run(release_call(s.namespace, b"pass", w1)).released
    second.join(20)
    assert not errors, errors[0]
    assert got and got[0] - released < 3.0  # woken by w1's release, not by its 5 s timer


def test_fair_waiters_are_woken_by_the_release_not_by_their_timer(r: Any, server: Any) -> None:
    """retry_ms=5 s: every waiter here can only be served in time by the release's signal to
    the head of the queue; a signal to the wrong waiter would cost a 5 s timed retry."""
    s = Scheduler(r, "fair")
    holder = s.lock("woken", fair=True).acquire()
    assert holder is not None
    order: list[int] = []
    errors: list[BaseException] = []

    def wait(index: int) -> None:
        client = server.client()
        try:
            lock = Scheduler(client, "fair").lock("woken", fair=True, retry_ms=5_000)
            handle = lock.acquire(timeout=30)
            assert handle is not None
            order.append(index)
            assert lock.release(handle).released
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    threads = []
    for index in range(4):
        thread = threading.Thread(target=wait, args=(index,))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while queue_length(r, s, b"woken") < index + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    started = time.monotonic()
    holder.release()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    assert not errors, errors[0]
    assert order == [0, 1, 2, 3]
    assert elapsed < 4.0, f"4 hand-overs took {elapsed:.2f} s: a waiter waited for its timer"
