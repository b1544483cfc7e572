"""Lost replies (issue 9, item 2): the server runs a call, the reply never reaches the client,
redis-py reconnects and sends the call again. Through tests/support/proxy.py, which drops the
reply of a chosen command after the server executed it: enqueue, dequeue, ack, lock acquire and
release each act exactly once (checked directly on the server, not through the proxy).

The controls show the proxy makes a retry act twice when nothing guards against it (a plain
INCR, a dequeue and an ack without request id), so the tests above them can fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from luasched import Scheduler
from luasched.errors import StaleLease
from support.helpers import lock_state
from support.proxy import Command, ReplyDroppingProxy

pytestmark = pytest.mark.standalone_only

Client = Any


@pytest.fixture
def proxy(server: Any, r: Client) -> Iterator[ReplyDroppingProxy]:
    """A reply-dropping proxy in front of the test's (emptied) server."""
    with ReplyDroppingProxy(server.port) as running:
        yield running


@pytest.fixture
def via(proxy: ReplyDroppingProxy) -> Iterator[redis.Redis]:
    """A client through the proxy that retries a call once after a connection error (redis-py
    does so by default too, up to 10 times; one retry is explicit here)."""
    client = redis.Redis(
        port=proxy.port,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis.ConnectionError],
        socket_timeout=10,
    )
    yield client
    client.close()


def evalsha_of(s: Scheduler, script: str) -> Any:
    """Matches the EVALSHA commands of ``script`` (by its SHA1)."""
    sha1 = s.scripts[script].sha1.encode()

    def match(command: Command) -> bool:
        return len(command) > 1 and command[0].upper() == b"EVALSHA" and command[1] == sha1

    return match


def through(via: redis.Redis, r: Client) -> tuple[Scheduler, Scheduler]:
    """A Scheduler through the proxy and one direct to the server, scripts loaded (so the first
    EVALSHA is the call itself, not a NOSCRIPT) and EVALSHA forced (no Functions probe)."""
    direct = Scheduler(r, "lost", use_functions=False)
    direct.load_scripts()
    return Scheduler(via, "lost", use_functions=False), direct


# --------------------------------------------------------------------------------------------
# Controls: without an idempotency guard the retry acts twice


def test_control_a_plain_incr_is_applied_twice(
    proxy: ReplyDroppingProxy, via: redis.Redis, r: Client
) -> None:
    proxy.drop_reply_of(lambda command: command[0].upper() == b"INCR")
    assert via.execute_command("INCR", "counter") == 2  # the retry's answer: the first INCR ran too
    assert r.get("counter") == b"2"
    assert len(proxy.dropped) == 1


def test_control_a_dequeue_without_request_id_takes_two_tasks(
    proxy: ReplyDroppingProxy, via: redis.Redis, r: Client
) -> None:
    s, direct = through(via, r)
    direct.queue("jobs").enqueue("a", b"1")
    direct.queue("jobs").enqueue("b", b"2")
    proxy.drop_reply_of(evalsha_of(s, "queue.dequeue"))
    lease = s.queue("jobs").dequeue("w", 60_000, request_id=b"")
    assert lease is not None and lease.task_id == b"b"  # "a" was taken by the lost call
    stats = direct.queue("jobs").stats()
    assert (stats.ready, stats.leased) == (0, 2)


def test_control_an_ack_without_request_id_is_refused_on_retry(
    proxy: ReplyDroppingProxy, via: redis.Redis, r: Client
) -> None:
    s, direct = through(via, r)
    direct.queue("jobs").enqueue("a", b"1")
    lease = direct.queue("jobs").dequeue("w", 60_000)
    assert lease is not None
    proxy.drop_reply_of(evalsha_of(s, "queue.ack"))
    with pytest.raises(StaleLease):  # the first ack ran: the retry finds the task gone
        s.queue("jobs").ack(lease, request_id=b"")


# --------------------------------------------------------------------------------------------
# With the request ids the wrapper draws, each call acts once


def test_enqueue_acts_once(proxy: ReplyDroppingProxy, via: redis.Redis, r: Client) -> None:
    s, direct = through(via, r)
    match = evalsha_of(s, "queue.enqueue")
    proxy.drop_reply_of(match)
    result = s.queue("jobs").enqueue("a", b"payload")
    assert (result.created, result.state) == (True, "ready")  # the first call's reply, replayed
    assert proxy.count(match) == 2 and len(proxy.dropped) == 1
    tasks = direct.queue("jobs").keys.fixed[4]
    assert r.zrange(direct.queue("jobs").keys.fixed[0], 0, -1) == [b"a"]
    assert r.hget(tasks, "seq") == b"1"  # one task became ready, once


def test_dequeue_acts_once(proxy: ReplyDroppingProxy, via: redis.Redis, r: Client) -> None:
    s, direct = through(via, r)
    direct.queue("jobs").enqueue("a", b"1")
    direct.queue("jobs").enqueue("b", b"2")
    match = evalsha_of(s, "queue.dequeue")
    proxy.drop_reply_of(match)
    lease = s.queue("jobs").dequeue("w", 60_000)
    assert lease is not None
    assert (lease.task_id, lease.payload, lease.attempt) == (b"a", b"1", 1)
    assert proxy.count(match) == 2 and len(proxy.dropped) == 1
    keys = direct.queue("jobs").keys.fixed
    assert r.zrange(keys[2], 0, -1) == [b"a"]  # leased: only a
    assert r.zrange(keys[0], 0, -1) == [b"b"]  # ready: b untouched
    assert r.hget(keys[4], "fence") == b"%d" % lease.token  # the replay answered the one lease


def test_ack_acts_once(proxy: ReplyDroppingProxy, via: redis.Redis, r: Client) -> None:
    s, direct = through(via, r)
    direct.queue("jobs").enqueue("a", b"1")
    lease = direct.queue("jobs").dequeue("w", 60_000)
    assert lease is not None
    match = evalsha_of(s, "queue.ack")
    proxy.drop_reply_of(match)
    assert s.queue("jobs").ack(lease) is True  # replayed, not refused as stale
    assert proxy.count(match) == 2 and len(proxy.dropped) == 1
    keys = direct.queue("jobs").keys.fixed
    fields = r.hgetall(keys[4])
    fields.pop(b"layout", None)  # the hash's layout marker (lua/include/queue_limits.j2)
    assert fields == {b"seq": b"1", b"fence": b"%d" % lease.token}  # the task is gone, once
    stats = direct.queue("jobs").stats()
    assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)


def test_lock_acquire_acts_once(proxy: ReplyDroppingProxy, via: redis.Redis, r: Client) -> None:
    s, direct = through(via, r)
    match = evalsha_of(s, "lock.acquire")
    proxy.drop_reply_of(match)
    handle = s.lock("job", ttl_ms=60_000).acquire(blocking=False)
    assert handle is not None
    assert proxy.count(match) == 2 and len(proxy.dropped) == 1
    state = lock_state(r, direct.namespace.key("lock", b"job"))
    assert state is not None
    assert (state["owner"], state["count"]) == (handle.token, 1)
    assert state["fence"] == handle.fence  # the replay answered the one grant
    # The hold is the caller's: another owner is refused, its own release works.
    assert direct.lock("job").acquire(blocking=False) is None
    assert s.lock("job").release(handle).released


def hold_count(r: Client, s: Scheduler, name: bytes) -> int:
    """The hold count in a lock's state string (lua/include/lock_state.lua.j2)."""
    state = lock_state(r, s.namespace.key("lock", name))
    assert state is not None
    return int(state["count"])


def test_lock_release_acts_once(proxy: ReplyDroppingProxy, via: redis.Redis, r: Client) -> None:
    s, direct = through(via, r)
    lock = s.lock("job", ttl_ms=60_000, reentrant=True)
    first = direct.lock("other").acquire(blocking=False)  # unrelated, must stay
    handle = lock.acquire(blocking=False)
    again = lock.acquire(blocking=False)  # reentrant: count 2, so a double release would show
    assert first is not None and handle is not None and again is not None
    assert hold_count(r, direct, b"job") == 2
    match = evalsha_of(s, "lock.release")
    proxy.drop_reply_of(match)
    result = lock.release(handle)
    assert (result.status, result.count) == ("released", 1)  # the first reply, replayed
    assert proxy.count(match) == 2 and len(proxy.dropped) == 1
    assert hold_count(r, direct, b"job") == 1  # released once
    other = lock_state(r, direct.namespace.key("lock", b"other"))
    assert other is not None and other["owner"] == first.token
    assert lock.release(again).count == 0


# --------------------------------------------------------------------------------------------
# Queues with groups (issue 21): the queue.group_* scripts act once too, and the group counts
# (leases held, the ring) move once.


def test_control_a_group_dequeue_without_request_id_takes_two_tasks(
    proxy: ReplyDroppingProxy, via: redis.Redis, r: Client
) -> None:
    s, direct = through(via, r)
    direct.queue("jobs").enqueue("a", b"1", group="g")
    direct.queue("jobs").enqueue("b", b"2", group="g")
    proxy.drop_reply_of(evalsha_of(s, "queue.group_dequeue"))
    lease = s.queue("jobs", grouped=True).dequeue("w", 60_000, request_id=b"")
    assert lease is not None and lease.task_id == b"b"  # "a" was taken by the lost call
    assert direct.queue("jobs").set_group("g").active == 2


def test_group_enqueue_acts_once(proxy: ReplyDroppingProxy, via: redis.Redis, r: Client) -> None:
    s, direct = through(via, r)
    match = evalsha_of(s, "queue.group_enqueue")
    proxy.drop_reply_of(match)
    result = s.queue("jobs").enqueue("a", b"payload", group="g")
    assert (result.created, result.state) == (True, "ready")  # the first call's reply, replayed
    assert proxy.count(match) == 2 and len(proxy.dropped) == 1
    keys = direct.queue("jobs").group_keys.bound
    assert r.zcard(keys["gready"]) == 1
    assert r.hget(keys["tasks"], "seq") == b"1"


def test_group_dequeue_ack_and_nack_act_once(
    proxy: ReplyDroppingProxy, via: redis.Redis, r: Client
) -> None:
    s, direct = through(via, r)
    plain = direct.queue("jobs")
    for task_id in ("a", "b", "c"):
        plain.enqueue(task_id, b"1", group="g")
    q = s.queue("jobs", grouped=True)
    match = evalsha_of(s, "queue.group_dequeue")
    proxy.drop_reply_of(match)
    lease = q.dequeue("w", 60_000)
    assert lease is not None and lease.task_id == b"a"
    assert proxy.count(match) == 2 and len(proxy.dropped) == 1
    assert r.hget(plain.keys.tasks, "fence") == b"%d" % lease.token  # the replay answered it
    assert plain.set_group("g").active == 1  # one lease taken, counted once
    second = plain.dequeue("w", 60_000)
    assert second is not None and second.task_id == b"b"

    ack = evalsha_of(s, "queue.group_ack")
    proxy.drop_reply_of(ack)
    assert q.ack(lease) is True  # replayed, not refused as stale
    assert proxy.count(ack) == 2
    assert plain.set_group("g").active == 1  # -1 once

    nack = evalsha_of(s, "queue.group_nack")
    proxy.drop_reply_of(nack)
    assert q.nack(second, delay_ms=0).state == "ready"
    assert proxy.count(nack) == 2
    assert plain.set_group("g").active == 0  # -1 once
    keys = plain.group_keys.bound
    assert r.zcard(keys["gready"]) == 2  # c, and b back in its group once
