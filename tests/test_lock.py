"""lock.acquire / lock.release / lock.extend: plain and reentrant locks, fencing, waiting."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import threading
import time
from collections import Counter
from typing import Any

import pytest

from luasched import Scheduler
from luasched.errors import LuaschedError
from luasched.lock import (
    ReleaseResult,
    _acquire_result,
    _release_result,
    acquire_call,
    extend_call,
    lock_keys,
    new_request_id,
    new_token,
    place_ttl_ms,
    release_call,
)
from luasched.scripts import Call
from support.helpers import lock_state, namespace_keys


def acquire(s: Scheduler, name: bytes, token: bytes, ttl_ms: int = 10_000, **kw: Any) -> Any:
    return s.runner.run(acquire_call(s.namespace, name, token, ttl_ms, **kw))


def release(s: Scheduler, name: bytes, token: bytes, request_id: bytes = b"") -> ReleaseResult:
    return s.runner.run(release_call(s.namespace, name, token, request_id))


def test_replies_tell_every_outcome_apart(r: Any) -> None:
    s = Scheduler(r, "lk")
    a, b = new_token(), new_token()
    first = acquire(s, b"job", a, 10_000)
    assert (first.status, first.count, first.wait_ms, first.position) == ("acquired", 1, 0, 0)
    assert first.fence >= 1
    assert first.deadline_ms == first.now_ms + 10_000
    held = acquire(s, b"job", b, 5_000)
    assert held.status == "held" and held.fence == 0 and held.deadline_ms == first.deadline_ms
    assert 9_000 < held.wait_ms <= 10_000
    assert release(s, b"job", b).status == "not_owner"
    assert s.runner.run(extend_call(s.namespace, b"job", b, 1000)).status == "not_owner"
    extended = s.runner.run(extend_call(s.namespace, b"job", a, 60_000))
    assert extended.status == "extended" and extended.deadline_ms == extended.now_ms + 60_000
    state = lock_state(r, s.namespace.key("lock", b"job"))
    assert state is not None and state["deadline"] == extended.deadline_ms
    assert (state["owner"], state["count"], state["fence"]) == (a, 1, first.fence)
    assert r.pttl(s.namespace.key("lock", b"job")) == -1  # the state carries the fence: no expiry
    released = release(s, b"job", a)
    assert (released.status, released.count) == ("released", 0)
    assert release(s, b"job", a).status == "released"  # a replay: acts no second time
    assert s.runner.run(extend_call(s.namespace, b"job", a, 1000)).status == "expired"
    assert release(s, b"job", new_token()).status == "expired"  # nobody holds it
    assert acquire(s, b"job", b).fence > first.fence


def test_a_lapsed_hold_is_free_and_fencing_tokens_keep_growing(r: Any) -> None:
    s = Scheduler(r, "lk")
    a, b = new_token(), new_token()
    first = acquire(s, b"x", a, 50)
    assert first.acquired
    time.sleep(0.08)
    assert s.runner.run(extend_call(s.namespace, b"x", a, 1000)).status == "expired"
    granted = acquire(s, b"x", b, 50)
    assert granted.fence > first.fence  # the lapsed hold was free; the fence went on
    assert release(s, b"x", a).status == "not_owner"
    time.sleep(0.08)
    assert release(s, b"x", b).status == "expired"
    third = acquire(s, b"x", a)  # b was granted since: a's token is a new owner again
    assert third.fence > granted.fence
    state = lock_state(r, s.namespace.key("lock", b"x"))
    assert state is not None and state["fence"] == third.fence
    assert r.pttl(s.namespace.key("lock", b"x")) == -1


def test_reentrant_owner_releases_as_many_times(r: Any) -> None:
    s = Scheduler(r, "lk")
    lock = s.lock(b"re", reentrant=True, ttl_ms=10_000)
    other = s.lock(b"re")
    first = lock.acquire()
    second = lock.acquire()
    assert first is not None and second is not None
    assert (first.count, second.count) == (1, 2)
    assert first.fence == second.fence and first.token == second.token
    assert other.acquire(blocking=False) is None
    assert lock.release(second).count == 1
    assert other.acquire(blocking=False) is None
    assert lock.release(first).count == 0
    assert other.acquire(blocking=False) is not None


def test_reentrant_counts(r: Any) -> None:
    s = Scheduler(r, "lk")
    lock = s.lock(b"re", reentrant=True, ttl_ms=10_000)
    other = s.lock(b"re")
    handles = [lock.acquire() for _ in range(3)]
    assert [h.count for h in handles if h] == [1, 2, 3]
    assert [lock.release(handles[0]).count for _ in range(2)] == [2, 1]
    assert other.acquire(blocking=False) is None
    assert lock.release(handles[0]).count == 0
    assert other.acquire(blocking=False) is not None


def test_plain_acquire_by_the_owner_is_a_replay_not_a_second_hold(r: Any) -> None:
    s = Scheduler(r, "lk")
    token = new_token()
    first = acquire(s, b"p", token, 1000)
    time.sleep(0.002)
    again = acquire(s, b"p", token, 5000)
    assert again == first  # the first grant's reply: same fence, deadline, grant time; no change
    assert acquire(s, b"p", token, 10) == first
    assert release(s, b"p", token).count == 0


def test_plain_lock_replays_without_request_id_act_once(r: Any) -> None:
    """No request id (what s.lock sends for a non-reentrant lock): the single-use owner token is
    the idempotency key of both calls, kept in the lock's state, no record key written."""
    s = Scheduler(r, "lk")
    key = s.namespace.key("lock", b"tok")
    a, b = new_token(), new_token()
    first = acquire(s, b"tok", a, 10_000, wait_ttl_ms=1000)
    assert first.status == "acquired"
    assert acquire(s, b"tok", a, 10_000, wait_ttl_ms=1000) == first
    released = release(s, b"tok", a)
    assert (released.status, released.count) == ("released", 0)
    # After the release: a replayed acquire answers the grant and takes nothing (no new fence)...
    assert acquire(s, b"tok", a, 10_000) == first
    state = lock_state(r, key)
    assert state is not None and (state["count"], state["fence"], state["owner"]) == (
        0,
        first.fence,
        a,
    )
    # ... and a replayed release answers "released" again and changes nothing.
    before = r.get(key)
    assert release(s, b"tok", a).status == "released"
    assert r.get(key) == before
    # Another owner: the replays never touch its hold.
    granted = acquire(s, b"tok", b)
    assert granted.fence > first.fence
    assert acquire(s, b"tok", a).status == "held"
    assert release(s, b"tok", a).status == "not_owner"
    state = lock_state(r, key)
    assert state is not None and (state["owner"], state["count"]) == (b, 1)
    assert [k for k in r.scan_iter(match=s.namespace.key("lock-req", b"*"))] == []


def test_replayed_request_ids_act_once(r: Any) -> None:
    s = Scheduler(r, "lk")
    a, b = new_token(), new_token()
    rid_acquire, rid_release = new_request_id(), new_request_id()
    first = acquire(s, b"id", a, 10_000, request_id=rid_acquire)
    assert first.status == "acquired"
    assert acquire(s, b"id", a, 10_000, request_id=rid_acquire) == first  # no second anything
    released = release(s, b"id", a, rid_release)
    assert released.status == "released"
    # A replayed acquire answers the first grant and takes nothing.
    assert acquire(s, b"id", a, 10_000, request_id=rid_acquire) == first
    state = lock_state(r, s.namespace.key("lock", b"id"))
    assert state is not None and state["count"] == 0  # released, and still so
    # B takes it; a replayed release answers "released" again and leaves B's hold alone.
    assert acquire(s, b"id", b).fence > first.fence
    assert release(s, b"id", a, rid_release) == released
    state = lock_state(r, s.namespace.key("lock", b"id"))
    assert state is not None and (state["owner"], state["count"]) == (b, 1)
    # Reentrant: a replayed acquire does not add a hold.
    c = new_token()
    rid = new_request_id()
    release(s, b"id", b)
    assert acquire(s, b"id", c, reentrant=True, request_id=rid).count == 1
    assert acquire(s, b"id", c, reentrant=True, request_id=rid).count == 1
    state = lock_state(r, s.namespace.key("lock", b"id"))
    assert state is not None and state["count"] == 1
    ttl = r.pttl(s.namespace.key("lock-req", rid, b"id"))
    assert 0 < ttl <= 60_000


def test_handle_is_immutable_and_a_context_manager(r: Any) -> None:
    s = Scheduler(r, "lk")
    lock = s.lock("ctx", ttl_ms=5000)
    with lock.acquire() as handle:  # type: ignore[union-attr]
        assert handle.fence >= 1 and handle.name == b"ctx"
        assert handle.deadline_ms == handle.acquired_ms + 5000
        with pytest.raises(dataclasses.FrozenInstanceError):
            handle.fence = 7  # type: ignore[misc]
        assert s.lock("ctx").acquire(blocking=False) is None
    assert s.lock("ctx").acquire(blocking=False) is not None


def test_lock_names_are_arbitrary_bytes_and_never_share_keys(r: Any) -> None:
    s = Scheduler(r, "lk")
    names = [b"a", b"a:x", b"{a}", b"\x00\xff", b"lock-queue:a", b"a b", "é".encode()]
    handles = [s.lock(name).acquire(blocking=False) for name in names]
    # One grant each: every name's key holds its own hold (and fence).
    assert all(h is not None for h in handles)
    assert [lock_state(r, s.namespace.key("lock", name)) for name in names] == [
        {"fence": h.fence, "count": 1, "deadline": h.deadline_ms, "granted": h.acquired_ms,
         "waited": False, "owner": h.token}
        for h in handles if h is not None
    ]  # fmt: skip


def test_blocking_acquire_is_woken_by_the_release(r: Any, server: Any) -> None:
    s = Scheduler(r, "lk")
    holder = s.lock("w", ttl_ms=30_000).acquire()
    assert holder is not None
    got: list[float] = []

    def wait() -> None:
        client = server.client()
        waiter = Scheduler(client, "lk").lock("w", retry_ms=5_000)  # the timer alone: 5 s
        handle = waiter.acquire(timeout=10)
        got.append(time.monotonic())
        assert handle is not None
        handle.release()
        client.close()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)  # the waiter tried, was refused, and blocks on the wake list
    released_at = time.monotonic()
    holder.release()
    thread.join(10)
    assert got and got[0] - released_at < 3.0  # woken by the signal, not the 5 s timer


def test_waiter_retries_when_the_hold_lapses(r: Any) -> None:
    s = Scheduler(r, "lk")
    first = s.lock("lapse", ttl_ms=300).acquire()  # never released
    assert first is not None
    started = time.monotonic()
    handle = s.lock("lapse", retry_ms=5_000).acquire(timeout=5)
    assert handle is not None and handle.fence > first.fence
    assert 0.2 < time.monotonic() - started < 3.0  # at the lapse, not at the 5 s timer


def test_timeout_and_non_blocking_give_up(r: Any) -> None:
    s = Scheduler(r, "lk")
    assert s.lock("t").acquire() is not None
    started = time.monotonic()
    assert s.lock("t", retry_ms=50).acquire(timeout=0.3) is None
    assert 0.25 < time.monotonic() - started < 2.0  # gave up at its timeout (slack: load)
    assert s.lock("t").acquire(blocking=False) is None


def test_auto_renew_keeps_the_hold_and_stops_for_sure(r: Any) -> None:
    s = Scheduler(r, "lk")
    # A ttl long enough for a starved renewer thread on a loaded 2-core box (300 ms was not).
    lock = s.lock("renew", ttl_ms=900, auto_renew=True)
    handle = lock.acquire()
    assert handle is not None
    time.sleep(2.0)  # more than two ttls: the hold lives only through renewals
    assert s.lock("renew").acquire(blocking=False) is None
    assert not lock.renewal_lost(handle)
    renewer = lock._renewers[handle.token]
    assert lock.release(handle).released
    assert not renewer._thread.is_alive() and not lock._renewers
    # Nothing extends it any more: another owner takes it and keeps it.
    assert s.lock("renew").acquire(blocking=False) is not None


def test_auto_renew_notices_a_lost_hold(r: Any) -> None:
    s = Scheduler(r, "lk")
    lock = s.lock("lost", ttl_ms=150, auto_renew=True)
    handle = lock.acquire()
    assert handle is not None
    r.delete(s.namespace.key("lock", b"lost"))
    time.sleep(0.3)
    assert lock.renewal_lost(handle)
    assert lock.release(handle).status == "expired"
    assert not lock._renewers


def contend(server: Any, name: str, threads: int, per_thread: int) -> list[tuple[int, int, int]]:
    """``threads`` clients take and give back one lock ``per_thread`` times each; every hold as
    (fence, granted_ms, released_ms) from the server's clock. Checks mutual exclusion in Python
    too (a shared counter that must be 0 on entry)."""
    holds: list[tuple[int, int, int]] = []
    inside = [0]
    errors: list[BaseException] = []
    guard = threading.Lock()

    def work() -> None:
        client = server.client()
        try:
            lock = Scheduler(client, "contend").lock(name, ttl_ms=30_000, retry_ms=50)
            for _ in range(per_thread):
                handle = lock.acquire(timeout=60)
                assert handle is not None
                with guard:
                    inside[0] += 1
                    assert inside[0] == 1, "two holders at once"
                with guard:
                    inside[0] -= 1
                result = lock.release(handle)
                assert result.released
                holds.append((handle.fence, handle.acquired_ms, result.now_ms))
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors[0]
    return holds


def check_no_overlap(holds: list[tuple[int, int, int]]) -> None:
    holds.sort()
    fences = [fence for fence, _, _ in holds]
    assert len(set(fences)) == len(fences)  # no fence handed out twice
    for (_, _, released), (_, granted, _) in itertools.pairwise(holds):
        # In fence order, the next hold starts after the previous one ended: fences grow with
        # the grants' order.
        assert granted >= released


def test_sixteen_clients_contending_never_overlap(r: Any, server: Any) -> None:
    started = time.monotonic()
    holds = contend(server, "hot", threads=16, per_thread=40)
    elapsed = time.monotonic() - started
    check_no_overlap(holds)
    print(f"\n{server.name}: {len(holds)} acquisitions in {elapsed:.2f} s "
          f"({len(holds) / elapsed:.0f}/s)")  # fmt: skip


@pytest.mark.slow
def test_one_hundred_thousand_acquisitions_never_overlap(luasched_servers: Any) -> None:
    """Issue 6's contention run, once per session, on redis-7.0 (or the first standalone)."""
    standalone = [handle for handle in luasched_servers.values() if not handle.is_cluster]
    assert standalone, "select at least one standalone server"
    server = luasched_servers.get("redis-7.0") or standalone[0]
    server.flush()
    started = time.monotonic()
    holds = contend(server, "stress", threads=16, per_thread=6_250)
    elapsed = time.monotonic() - started
    assert len(holds) == 100_000
    check_no_overlap(holds)
    print(f"\n100,000 acquisitions in {elapsed:.1f} s ({len(holds) / elapsed:.0f}/s)")


def test_only_a_waited_for_hold_wakes_a_waiter(r: Any) -> None:
    """A refused attempt that takes a place (wait_ttl_ms > 0) marks the hold; its release pushes
    one signal on the wake list. A try (wait_ttl_ms=0) marks nothing; an unmarked release (the
    lean path) writes no signal."""
    s = Scheduler(r, "lk")
    key, wake = s.namespace.key("lock", b"mark"), s.namespace.key("lock-wake", b"mark")
    holder, waiter = new_token(), new_token()
    held = acquire(s, b"mark", holder)
    assert held.acquired
    assert acquire(s, b"mark", waiter, wait_ttl_ms=0).status == "held"
    state = lock_state(r, key)
    assert state is not None and not state["waited"]
    assert acquire(s, b"mark", waiter, wait_ttl_ms=2_000).status == "held"
    state = lock_state(r, key)
    assert state is not None and state["waited"]
    assert r.zscore(s.namespace.key("lock-places", b"mark"), waiter) is not None
    assert release(s, b"mark", holder).released
    assert r.lrange(wake, 0, -1) == [b"1"]
    granted = acquire(s, b"mark", waiter, wait_ttl_ms=2_000)
    assert granted.acquired and granted.fence > held.fence
    assert r.zcard(s.namespace.key("lock-places", b"mark")) == 0  # its place is given back
    r.delete(wake)
    assert release(s, b"mark", waiter).released
    assert r.exists(wake) == 0


def test_a_woken_waiter_that_loses_asks_for_no_signal() -> None:
    """The wrapper's policy (place_ttl_ms): a non-fair attempt right after a wake-up signal takes
    no place, so a lock taken again and again by one caller is not slowed by woken waiters."""

    class Options:
        wait_ttl_ms = 1_000
        fair = False

    plain, fair = Options(), Options()
    fair.fair = True
    assert place_ttl_ms(plain, blocking=True, woken=False) == 1_000
    assert place_ttl_ms(plain, blocking=True, woken=True) == 0
    assert place_ttl_ms(fair, blocking=True, woken=True) == 1_000
    assert place_ttl_ms(plain, blocking=False, woken=False) == 0


#: The redis calls the lock scripts make (INFO commandstats names).
_LOCK_CALLS = (
    *("time", "get", "set", "del", "type", "zscore", "zcard", "zrange", "zrank", "zmscore"),
    *("zcount", "zadd", "zrem", "pttl", "pexpire", "lpush", "ltrim"),
)


@pytest.mark.parametrize("mode", ["plain", "fair", "reentrant"])
def test_uncontended_cycles_take_the_lean_paths(r: Any, server: Any, mode: str) -> None:
    """The wrapper's uncontended acquire + release of each kind of lock make the lean paths'
    redis calls and no other (INFO commandstats, summed over the primaries): the full scripts
    would also read the fair queue (ZRANGE, ZRANK) or, releasing, the caller's queue entry and
    place (two ZSCOREs). The fast cycles of docs/locks.md ("The lean path") rely on it."""
    s = Scheduler(r, "lk")
    lock = s.lock(b"lean", ttl_ms=30_000, fair=mode == "fair", reentrant=mode == "reentrant")
    handle = lock.acquire(blocking=False)  # loads the scripts
    assert handle is not None
    handle.release()
    for conn in server.primaries():
        with conn:
            conn.config_resetstat()
    for _ in range(3):
        handle = lock.acquire(blocking=False)
        assert handle is not None
        handle.release()
    calls: Counter[str] = Counter()
    for conn in server.primaries():
        with conn:
            for name, fields in conn.info("commandstats").items():
                command = name.removeprefix("cmdstat_")
                if command in _LOCK_CALLS:
                    calls[command] += int(fields["calls"])
    # Per cycle: TIME, GET, SET in each script, the acquire's look at the waiters (ZSCORE of
    # its place; the fair lock: ZCARD of its queue); a reentrant lock's GET and SET of each
    # call's request record.
    records = 2 if mode == "reentrant" else 0
    waiters = {"zcard": 3} if mode == "fair" else {"zscore": 3}
    assert calls == Counter({"time": 6, "get": 6 + 3 * records, "set": 6 + 3 * records, **waiters})


_FUTURE = 9_000_000_000_000  # a deadline far ahead of the server's clock (ms)


def _norm(value: int, now_ms: int) -> object:
    """An integer of a reply or a key with the call's clock taken out: the two namespaces of
    the lean-path test are called a few ms apart."""
    if value - now_ms in (0, 1_000, 30_000):
        return ("now", value - now_ms)
    if _FUTURE - value == now_ms:
        return "future-now"
    if value // 1000 == now_ms:
        return "clock-us"  # a fencing token from the call's clock (us), not the stored fence + 1
    return value


def _lock_dump(
    r: Any, s: Scheduler, name: bytes, now_ms: int, records: bool = False
) -> dict[bytes, object]:
    """Every key of the lock by its name inside the namespace, its times normalized; TTLs by
    whether there is one. Request records only with ``records`` (their request id taken out of
    the name): the plain twins' full-path form has a request id, the lean form none."""
    prefix = s.namespace.prefix
    keys = namespace_keys(r, s.namespace)
    types = r.pipeline(transaction=False)
    for key in keys:
        types.type(key)
    kinds = types.execute()
    reads = r.pipeline(transaction=False)
    for key, kind in zip(keys, kinds, strict=True):
        if kind == b"string":
            reads.get(key)
        elif kind == b"zset":
            reads.zrange(key, 0, -1, withscores=True)
        elif kind == b"list":
            reads.lrange(key, 0, -1)
        else:
            reads.hgetall(key)
        reads.pttl(key)
    replies = reads.execute()
    dump: dict[bytes, object] = {}
    for key, kind, read, ttl in zip(keys, kinds, replies[0::2], replies[1::2], strict=True):
        short = key[len(prefix) :]
        if short.startswith(b"lock-req:"):
            if not records:
                continue
            short = b"lock-req:*:" + short.split(b":", 2)[2]
        value: object = read
        if kind == b"string":
            value = [_norm(int(p), now_ms) if p.isdigit() else p for p in read.split(b" ")]
        elif kind == b"zset":
            value = [(m, _norm(int(sc), now_ms)) for m, sc in read]
        dump[short] = (kind, value, ttl > 0)
    return dump


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "fair", "reentrant"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lean_paths_answer_and_write_as_the_full_scripts(r: Any, seed: int, mode: str) -> None:
    """The lean paths at the top of lua/lock/acquire.lua.j2 and release.lua.j2 against main(),
    for each kind of lock the wrapper calls them for (``mode``: plain, fair, reentrant): each
    step writes one random lock state (free, released, lapsed, held by the caller or another,
    waited for, at the largest fences, of the wrong shape or type, with or without waiters'
    places, a fair queue, a request record) into two namespaces, then makes the same call on
    both: once as the wrapper sends it (the lean path may take it: no request id, or one of 32
    bytes for a reentrant lock), once in a form only main() takes (ttl_ms "030000"; a release
    with a request id of 31 bytes). The replies and every key of the lock (request records too,
    where both forms write them) must agree, with the server's clock of each call taken out."""
    rng = random.Random(seed)
    lean = Scheduler(r, f"lean-{mode}-{seed}")
    full = Scheduler(r, f"full-{mode}-{seed}")
    name, me, other = b"L", b"me-" + new_token(), b"other-" + new_token()
    reentrant, fair = (b"1" if mode == "reentrant" else b"0"), (b"1" if mode == "fair" else b"0")
    outcomes: Counter[str] = Counter()
    for step in range(250):
        # Fences below the clock (the token is the clock's us), ahead of it (the fence + 1), at
        # the largest token (granted), past it (CORRUPT), and of 16 digits above 2^53.
        fence = rng.choice(
            [
                *(b"0", b"1", b"41", b"99999999999999", b"5000000000000000"),
                *(b"9007199254740990", b"9007199254740991", b"9999999999999999"),
            ]
        )
        state = rng.choice(
            [None, None, b"garbage", b"hash"]
            + [
                b" ".join(
                    [fence, count, deadline, b"1700000000000", waited, rng.choice([me, other])]
                )
                for count in (b"0", b"1", b"2")
                for deadline in (b"1", b"%d" % _FUTURE)
                for waited in (b"0", b"1")
            ]
        )
        places = rng.choice([None, None, "mine", "mine-lapsed", "other", "both", "wrong"])
        # A fair queue (its members have places: the scripts' invariant).
        queue = rng.choice([None, None, "mine", "other", "wrong"]) if mode == "fair" else None
        if queue in ("mine", "other"):
            places = {"mine": "mine", "other": "other"}[queue]
        # A request record already there for the call's request id (a reentrant replay).
        wake = rng.random() < 0.2
        op = rng.choice(["acquire", "acquire", "release"])
        replayed = b"acquired 5 9000000000000 1 0 0 1" if op == "acquire" else b"released 1 1"
        record = rng.choice([None, None, None, replayed, b"acquired 1 x", "hash"])
        if op == "release" and state is not None and state.endswith(me):
            # Unreachable by the scripts: the last grantee with a waiter's place of its own
            # (every grant takes the grantee's place away, and an owner is never refused); the
            # lean release relies on it and does not look for one.
            places = rng.choice([None, "other", "wrong"])
            queue = None
            if state.split(b" ")[1:3] == [b"1", b"%d" % _FUTURE] and b" 0 me-" in state:
                # The lean release's case: it reads the lock key only. By design it wakes
                # nobody for a hold no waiter was refused during (main() wakes for any live
                # place; docs/locks.md), and it does not see a places key of the wrong type.
                places = None
        wait = rng.choice([b"0", b"1000"])
        replies, dumps = [], []
        for s, lean_form in ((lean, True), (full, False)):
            if op == "acquire":
                request_id = new_request_id() if mode == "reentrant" else b""
            else:
                request_id = new_request_id()[: 32 if lean_form else 31]
                if mode != "reentrant" and lean_form:
                    request_id = b""
            keys = lock_keys(s.namespace, name, request_id)
            setup = r.pipeline(transaction=False)
            for key in namespace_keys(r, s.namespace):
                setup.delete(key)
            if state == b"hash":
                setup.hset(keys[0], "f", "v")
            elif state is not None:
                setup.set(keys[0], state)
            if places == "wrong":
                setup.set(keys[2], "x")
            elif places is not None:
                members = {}
                if places in ("mine", "both", "mine-lapsed"):
                    members[me] = 1 if places == "mine-lapsed" else _FUTURE
                if places in ("other", "both"):
                    members[other] = _FUTURE
                setup.zadd(keys[2], members)
                setup.pexpire(keys[2], 60_000)
            if queue == "wrong":
                setup.set(keys[1], "x")
            elif queue is not None:
                setup.zadd(keys[1], {me if queue == "mine" else other: 1})
                setup.pexpire(keys[1], 60_000)
            if record is not None and mode == "reentrant":
                if record == "hash":
                    setup.hset(keys[4], "f", "v")
                else:
                    setup.set(keys[4], record, px=60_000)
            if wake:
                setup.rpush(keys[3], b"1")
            setup.execute()
            if op == "acquire":
                ttl = b"30000" if lean_form else b"030000"
                call: Call[Any] = Call(
                    "lock.acquire",
                    keys,
                    (me, ttl, reentrant, fair, wait, request_id),
                    _acquire_result,
                )
            else:
                call = Call("lock.release", keys, (me, request_id), _release_result)
            # Records: both forms write them, but for a plain or fair release.
            records = mode == "reentrant"
            try:
                result = s.runner.run(call)
            except LuaschedError as error:
                message = str(error).replace(s.namespace.prefix.decode(), "<ns>")
                message = re.sub(r'lock-req:[^"]*', "lock-req:<request id>", message)
                replies.append((type(error).__name__, message))
                dumps.append(_lock_dump(r, s, name, 0, records))
                continue
            now_ms = result.now_ms
            reply = dataclasses.astuple(result)
            replies.append(tuple(_norm(v, now_ms) if isinstance(v, int) else v for v in reply))
            dumps.append(_lock_dump(r, s, name, now_ms, records))
        assert replies[0] == replies[1], (step, state, places, queue, record, op, wait)
        assert dumps[0] == dumps[1], (step, state, places, queue, record, op, wait)
        outcomes[str(replies[0][0])] += 1
    assert outcomes["acquired"] > 20 and outcomes["released"] > 5, outcomes
    assert outcomes["CorruptState"] > 5 and outcomes["held"] > 5, outcomes
    if mode == "fair":
        assert outcomes["queued"] > 3, outcomes
