"""The task queue (queue.*) on every server: priorities and FIFO, delays on the server's clock,
idempotent enqueue, dequeue-and-lock with fencing tokens, replays by request id, leases that
expire, nack backoff, dead letters, blocking waits, stats, and every error path of every queue
script leaving every key of the namespace byte-for-byte untouched."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import redis

import luasched.asyncio
from luasched import InvalidArgument, Scheduler
from luasched.errors import StaleLease
from luasched.queue import Lease, QueueKeys
from luasched.render import render_all
from support.helpers import (
    HELD_TOKEN,
    assert_codes_covered,
    assert_refused,
    snapshot,
    with_held_tokens,
)
from test_queue_groups import GROUPED_SCRIPTS

Client = Any  # redis.Redis or RedisCluster


def server_ms(r: Client, s: Scheduler) -> int:
    """The server's clock (the node holding the namespace), in ms."""
    return s.queue("clock").stats().now_ms


# --------------------------------------------------------------------------------------------
# Order: priorities, FIFO, delays


def test_priorities_then_fifo(r: Client) -> None:
    q = Scheduler(r, "order").queue("jobs")
    plan = [("a", 0), ("b", 5), ("c", 0), ("d", -512), ("e", 511), ("f", 5), ("g", 0)]
    for task_id, priority in plan:
        assert q.enqueue(task_id, task_id.upper(), priority=priority).created
    leases = q.dequeue_many("w", 100, 10_000)
    assert [lease.task_id for lease in leases] == [b"e", b"b", b"f", b"a", b"c", b"g", b"d"]
    assert [lease.payload for lease in leases] == [b"E", b"B", b"F", b"A", b"C", b"G", b"D"]
    tokens = [lease.token for lease in leases]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert all(lease.attempt == 1 for lease in leases)
    assert q.dequeue("w", 1000) is None


def test_delayed_tasks_wait_for_the_server_clock(r: Client) -> None:
    s = Scheduler(r, "delay")
    q = s.queue("jobs")
    assert q.enqueue("later", b"x", delay_ms=300) == type(q.enqueue("x", b""))(True, "delayed")
    q.dequeue("w", 1000)  # takes "x"
    due_ms = int(r.zscore(q.keys.fixed[1], b"later"))
    assert due_ms > q.stats().now_ms
    assert q.dequeue("w", 1000) is None
    stats = q.stats()
    assert (stats.ready, stats.delayed) == (0, 1)
    assert stats.next_due_ms is not None and 0 < stats.next_due_ms <= 300
    lease = None
    while lease is None:
        lease = q.dequeue("w", 1000)
        time.sleep(0.02)
    # Delivered at or after its due time on the server's clock (deadline = take time + 1000).
    assert lease.deadline_ms - 1000 >= due_ms


def test_enqueue_is_idempotent_by_task_id(r: Client) -> None:
    q = Scheduler(r, "dedupe").queue("jobs")
    assert q.enqueue("t", b"first", priority=3)
    again = q.enqueue("t", b"second", priority=-3, delay_ms=5000)
    assert (again.created, again.state) == (False, "ready")
    lease = q.dequeue("w", 1000)
    assert lease is not None and lease.payload == b"first"
    assert q.enqueue("t", b"third").state == "leased"
    q.ack(lease)
    assert q.enqueue("t", b"fourth").created  # finished tasks leave no trace: a new task


def test_any_bytes_for_ids_payloads_and_queue_names(r: Client) -> None:
    s = Scheduler(r, "bytes")
    ids = [b"\x00", b"with space", b"{brace}", b"m-prefix", b"\xff\xfe", b"x" * 1024, b"seq"]
    for name in (b"q:a", b"q\x00\n", "n\u00e9".encode()):
        q = s.queue(name)
        for task_id in ids:
            assert q.enqueue(task_id, task_id + b"\x00payload", max_attempts=1).created
        leases = q.dequeue_many(b"\x00worker \xff", len(ids), 10_000)
        assert [lease.task_id for lease in leases] == ids
        assert [lease.payload for lease in leases] == [t + b"\x00payload" for t in ids]
        for lease in leases[:3]:
            assert q.ack(lease)
        for lease in leases[3:]:
            assert q.nack(lease, reason=b"\xff bad").state == "dead"
        assert q.stats().dead == len(ids) - 3
        # The meta keeps the whole worker id (a NUL byte included): the lean path of the batch
        # wrote the leases, format_meta (main()) the dead letters, the lean single take the last.
        tasks = q.keys.with_request(b"")[4]
        assert all(r.hget(tasks, b"m" + t).endswith(b" \x00worker \xff") for t in ids[3:])
        assert all(q.requeue_dead(task_id) for task_id in ids[3:])
        assert q.stats().ready == len(ids) - 3
        lease = q.dequeue(b"w\x00", 10_000)
        assert lease is not None and r.hget(tasks, b"m" + lease.task_id).endswith(b" w\x00")


# --------------------------------------------------------------------------------------------
# Leases: fencing, expiry, replays


def test_dequeue_replay_returns_the_same_lease(r: Client) -> None:
    q = Scheduler(r, "replay").queue("jobs")
    for task_id in ("a", "b", "c"):
        q.enqueue(task_id, b"")
    first = q.dequeue("w", 10_000, request_id="req-1")
    assert q.dequeue("w", 10_000, request_id="req-1") == first
    batch = q.dequeue_many("w", 2, 10_000, request_id="req-2")
    assert q.dequeue_many("w", 5, 10_000, request_id="req-2") == batch
    assert q.dequeue("w", 10_000) is None  # nothing was taken twice
    assert first is not None
    assert q.ack(first, request_id="ack-1") is True
    assert q.ack(first, request_id="ack-1") is True  # a replay answers the first reply
    with pytest.raises(StaleLease):
        q.ack(first)  # a new request: the lease is finished
    # A replay of a dequeue whose lease is finished answers no lease (and takes none).
    assert q.dequeue("w", 10_000, request_id="req-1") is None
    with pytest.raises(InvalidArgument, match="used by another call"):
        q.enqueue("z", b"", request_id="req-2")


def test_enqueue_replay_acts_once(r: Client) -> None:
    q = Scheduler(r, "enqreplay").queue("jobs")
    assert q.enqueue("t", b"p", request_id="e1").created
    lease = q.dequeue("w", 1000)
    assert lease is not None
    q.ack(lease)
    # The retry of the first enqueue (its reply lost) does not enqueue the task again.
    assert q.enqueue("t", b"p", request_id="e1").created
    assert q.stats().ready == 0
    assert q.dequeue("w", 1000) is None


def test_expired_lease_is_redelivered_and_the_old_one_refused(r: Client) -> None:
    q = Scheduler(r, "expiry").queue("jobs", max_attempts=2)
    q.enqueue("t", b"p")
    old = q.dequeue("slow", 60)
    assert old is not None and old.attempt == 1
    assert q.dequeue("other", 1000) is None
    time.sleep(0.1)
    # Past its deadline but not reclaimed yet: still held (extend revives it).
    assert q.extend(old, 60) > old.deadline_ms
    time.sleep(0.1)
    new = q.dequeue("other", 1000)
    assert new is not None
    assert (new.task_id, new.attempt) == (b"t", 2)
    assert new.token > old.token
    for refused in (lambda: q.ack(old), lambda: q.nack(old), lambda: q.extend(old, 1000)):
        with pytest.raises(StaleLease):
            refused()
    with pytest.raises(StaleLease):
        q.ack_and_dequeue(old, "slow", 1000)
    # The second expiry exhausts max_attempts: dead letter with the reason.
    assert q.extend(new, 30) > 0
    time.sleep(0.08)
    assert q.dequeue("third", 1000) is None
    stats = q.stats()
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 1)
    assert r.hget(q.keys.fixed[4], b"rt") == b"lease expired"


def test_nack_backoff_dead_letters_and_requeue(r: Client) -> None:
    q = Scheduler(r, "nack").queue("jobs", backoff_base_ms=40, backoff_max_ms=70)
    q.enqueue("t", b"p", max_attempts=3)
    delays = []
    for attempt in (1, 2):
        lease = None
        while lease is None:
            lease = q.dequeue("w", 1000)
            time.sleep(0.005)
        assert lease.attempt == attempt
        result = q.nack(lease, reason=f"try {attempt}")
        assert result.state == "delayed"
        delays.append(result.delay_ms)
    assert delays == [40, 70]  # 40 * 2^0, then min(70, 40 * 2^1)
    lease = None
    while lease is None:
        lease = q.dequeue("w", 1000)
        time.sleep(0.005)
    assert q.nack(lease, reason=b"final \xff").state == "dead"
    assert q.stats().dead == 1
    assert r.hget(q.keys.fixed[4], b"rt") == b"final \xff"
    assert q.requeue_dead("t") is True
    assert q.requeue_dead("t") is False
    assert q.requeue_dead("ghost") is False
    again = q.dequeue("w", 1000)
    assert again is not None and again.attempt == 1 and again.payload == b"p"
    assert q.nack(again, delay_ms=0, request_id="n-1").state == "ready"
    assert q.nack(again, delay_ms=0, request_id="n-1").state == "ready"  # replay
    assert q.stats().ready == 1


def test_ack_and_dequeue_and_batches(r: Client) -> None:
    s = Scheduler(r, "batch")
    q = s.queue("jobs")
    with s.pipeline() as pipe:
        pq = pipe.queue("jobs")
        for index in range(250):
            pq.enqueue(f"t{index:03d}", b"%d" % index)
        assert all(result.created for result in pipe.execute())
    leases = q.dequeue_many("w", 200, 10_000)
    assert [lease.task_id for lease in leases] == [b"t%03d" % i for i in range(200)]
    lease: Lease | None = leases[-1]
    seen = 0
    while lease is not None:
        lease = q.ack_and_dequeue(lease, "w", 10_000)
        seen += 1
    assert seen == 51
    assert q.stats().leased == 199
    for lease in leases[:-1]:
        q.ack(lease)
    stats = q.stats()
    assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)
    # Finished tasks leave no trace: only the counters and the layout field remain in the tasks
    # hash, which stays a hashtable (O(1) field access at every depth).
    assert set(r.hkeys(q.keys.fixed[4])) == {b"seq", b"fence", b"layout"}
    assert r.object("encoding", q.keys.fixed[4]) == b"hashtable"
    with pytest.raises(InvalidArgument):
        q.dequeue_many("w", s.config.max_batch + 1, 1000)


def test_stats(r: Client) -> None:
    q = Scheduler(r, "stats").queue("jobs")
    empty = q.stats()
    assert (empty.ready, empty.oldest_ready_age_ms, empty.next_due_ms) == (0, None, None)
    q.enqueue("low", b"", priority=-5)
    time.sleep(0.12)
    q.enqueue("high", b"", priority=9)
    q.enqueue("later", b"", delay_ms=60_000)
    q.enqueue("leased", b"", priority=100)
    q.dequeue("w", 60_000)
    stats = q.stats()
    assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (2, 1, 1, 0)
    assert stats.oldest_ready_age_ms is not None and stats.oldest_ready_age_ms >= 100
    assert stats.next_due_ms is not None and 59_000 < stats.next_due_ms <= 60_000


# --------------------------------------------------------------------------------------------
# Blocking dequeue


def _blocked_take(q: Any, block_ms: int, out: list[Any]) -> None:
    started = time.monotonic()
    lease = q.dequeue("sleeper", 10_000, block_ms=block_ms)
    out.append((lease, time.monotonic() - started))


def test_blocking_dequeue_wakes_on_enqueue_and_on_due_time(server: Any, r: Client) -> None:
    s = Scheduler(server.client(), "block")
    q = s.queue("jobs", poll_ms=3_000)
    out: list[Any] = []
    waiter = threading.Thread(target=_blocked_take, args=(q, 5_000, out))
    waiter.start()
    time.sleep(0.3)
    producer = Scheduler(r, "block").queue("jobs")
    enqueued = time.monotonic()
    producer.enqueue("now", b"")
    waiter.join(5)
    lease, _ = out[0]
    assert lease is not None and lease.task_id == b"now"
    assert time.monotonic() - enqueued < 2.0  # woken by the signal, not by the 3 s poll

    producer.enqueue("soon", b"", delay_ms=400)
    out.clear()
    _blocked_take(q, 5_000, out)
    lease, waited = out[0]
    assert lease is not None and lease.task_id == b"soon"
    assert 0.35 < waited < 2.0  # at the due time, not at the 3 s poll
    # Nothing arrives: the wait ends at block_ms with None.
    started = time.monotonic()
    assert q.dequeue("w", 1000, block_ms=150) is None
    assert 0.14 < time.monotonic() - started < 2.0
    assert r.llen(q.keys.wake) <= 16


# --------------------------------------------------------------------------------------------
# Twins, warnings


def test_pipeline_and_asyncio_twins(server: Any, r: Client) -> None:
    s = Scheduler(r, "twins")
    with s.pipeline() as pipe:
        pq = pipe.queue("jobs")
        pq.enqueue("a", b"1")
        pq.enqueue("b", b"2", priority=1)
        pq.dequeue("w", 10_000)
        pq.stats()
        created_a, created_b, lease, stats = pipe.execute()
    assert created_a.created and created_b.created
    assert lease.task_id == b"b"
    assert (stats.ready, stats.leased) == (1, 1)

    async def scenario() -> list[Any]:
        client = server.async_client()
        try:
            a = luasched.asyncio.Scheduler(client, "twins")
            q = a.queue("jobs")
            taken = await q.dequeue("w", 10_000)
            assert taken is not None
            results: list[Any] = [
                taken,
                await q.extend(taken, 20_000),
                await q.ack(taken),
                await q.ack(lease),
                await q.enqueue("c", b"3", delay_ms=150),
                await q.dequeue("w", 1000, block_ms=2000),
            ]
            results.append(await q.nack(results[-1], delay_ms=0))
            results.append(await q.dequeue_many("w", 5, 1000))
            results.append(await q.ack_and_dequeue(results[-1][0], "w", 1000))
            results.append(await q.stats())
            async with a.pipeline() as pipe:
                await pipe.queue("jobs").enqueue("d", b"4")
                results.append(await pipe.execute())
            return results
        finally:
            await client.aclose()

    results = asyncio.run(scenario())
    assert results[0].task_id == b"a"
    assert results[2] is True and results[3] is True
    assert results[5].task_id == b"c"
    assert results[6].state == "ready"
    assert [lease.task_id for lease in results[7]] == [b"c"]
    assert results[8] is None
    assert results[9].ready == 0
    assert results[10][0].created


@pytest.mark.standalone_only
def test_warns_when_queue_keys_could_be_evicted(r: Client) -> None:
    r.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.warns(RuntimeWarning, match="maxmemory-policy"):
            Scheduler(r, "evict").queue("jobs")
        r.config_set("maxmemory-policy", "volatile-lru")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Scheduler(r, "evict").queue("jobs")
    finally:
        r.config_set("maxmemory-policy", "noeviction")

    class NoConfig(redis.Redis):
        def config_get(self, *args: Any, **kwargs: Any) -> Any:
            raise redis.ResponseError("NOPERM this user has no permissions to run 'config'")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kwargs = r.connection_pool.connection_kwargs
        client = NoConfig(host=kwargs["host"], port=kwargs["port"])
        q = Scheduler(client, "evict").queue("jobs")
        assert q.stats().ready == 0


# --------------------------------------------------------------------------------------------
# Error paths: every queue script, every code; nothing changes

NS = "qerr"
QUEUE = b"jobs"


def _populated(r: Client, s: Scheduler) -> None:
    q = s.queue(QUEUE)
    for index in range(6):
        q.enqueue(f"t{index}", b"p%d" % index, priority=index % 3, request_id=f"e{index}")
    q.enqueue("later", b"", delay_ms=600_000)
    lease = q.dequeue("w", 600_000, request_id="d0")
    assert lease is not None
    dead = q.dequeue("w", 600_000)
    assert dead is not None
    q.nack(dead, reason="r")  # attempt 1 of 5: delayed by the backoff
    r.set(s.namespace.key("marker"), b"\x00untouched")
    # Request records expire; without a TTL their snapshot does not change while the test runs.
    for key in snapshot(r, s.namespace):
        r.persist(key)


def _wrong_tasks(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    r.delete(QueueKeys.of(s.namespace, QUEUE).fixed[4])
    r.set(QueueKeys.of(s.namespace, QUEUE).fixed[4], b"not a hash")


def _wrong_ready(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    r.delete(QueueKeys.of(s.namespace, QUEUE).fixed[0])
    r.set(QueueKeys.of(s.namespace, QUEUE).fixed[0], b"not a zset")


def _bad_meta(r: Client, s: Scheduler) -> None:
    _populated(r, s)
    r.hset(QueueKeys.of(s.namespace, QUEUE).fixed[4], b"mt0", b"garbage")


SETUPS: dict[str, Callable[[Client, Scheduler], None]] = {
    "populated": _populated,
    "wrong_tasks": _wrong_tasks,
    "wrong_ready": _wrong_ready,
    "bad_meta": _bad_meta,
}

T = 600_000
DEQ = (b"w", 1, 1000, 0, b"", 0, b"", T)
ENQ = (b"n", b"p", 0, 0, 5, b"", T)

# (script, setup, keys: "ok" | "short" | "long", args, code, detail)
ERROR_CASES: list[tuple[str, str, str, tuple[Any, ...], str, str]] = [
    # queue.enqueue
    ("queue.enqueue", "populated", "short", ENQ, "ARG", "expected 8 key(s), got 7"),
    ("queue.enqueue", "populated", "long", ENQ, "ARG", "expected 8 key(s), got 9"),
    ("queue.enqueue", "populated", "ok", ENQ[:6], "ARG", "expected 7 argument(s), got 6"),
    (
        "queue.enqueue",
        "populated",
        "ok",
        (b"", *ENQ[1:]),
        "ARG",
        "task_id must be 1 to 1024 bytes long, got 0 bytes",
    ),
    (
        "queue.enqueue",
        "populated",
        "ok",
        (b"n", b"p", 512, 0, 5, b"", T),
        "ARG",
        "priority must be between -512 and 511, got 512",
    ),
    (
        "queue.enqueue",
        "populated",
        "ok",
        (b"n", b"p", 0, -1, 5, b"", T),
        "ARG",
        "delay_ms must be between 0 and 31536000000, got -1",
    ),
    (
        "queue.enqueue",
        "populated",
        "ok",
        (b"n", b"p", 0, 0, 0, b"", T),
        "ARG",
        "max_attempts must be between 1 and 1000000, got 0",
    ),
    (
        "queue.enqueue",
        "populated",
        "ok",
        (b"n", b"p", b"1.5", 0, 5, b"", T),
        "ARG",
        'priority must be an integer, got "1.5"',
    ),
    (
        "queue.enqueue",
        "populated",
        "ok",
        (b"n", b"p", 0, 0, 5, b"a:b", T),
        "ARG",
        'request_id may hold only letters, digits, "_" and "-", got "a:b"',
    ),
    (
        "queue.enqueue",
        "populated",
        "ok",
        (b"n", b"p", 0, 0, 5, b"", 0),
        "ARG",
        "request_ttl_ms must be between 1 and 86400000, got 0",
    ),
    (
        "queue.enqueue",
        "populated",
        "ok",
        (b"n", b"p", 0, 0, 5, b"d0", T),
        "ARG",
        'request id "d0" was used by another call (dequeue)',
    ),
    ("queue.enqueue", "wrong_tasks", "ok", ENQ, "CORRUPT", "holds another type than the layout"),
    ("queue.enqueue", "wrong_ready", "ok", ENQ, "CORRUPT", "holds another type than the layout"),
    (
        "queue.enqueue",
        "bad_meta",
        "ok",
        (b"t0", b"p", 0, 0, 5, b"", T),
        "CORRUPT",
        'task "t0" has a malformed meta "garbage"',
    ),
    # queue.dequeue
    ("queue.dequeue", "populated", "short", DEQ, "ARG", "expected 8 key(s), got 7"),
    ("queue.dequeue", "populated", "ok", DEQ[:7], "ARG", "expected 8 argument(s), got 7"),
    (
        "queue.dequeue",
        "populated",
        "ok",
        (b"w", 0, 1000, 0, b"", 0, b"", T),
        "ARG",
        "count must be between 1 and 1000, got 0",
    ),
    (
        "queue.dequeue",
        "populated",
        "ok",
        (b"w", 1001, 1000, 0, b"", 0, b"", T),
        "ARG",
        "count must be between 1 and 1000, got 1001",
    ),
    (
        "queue.dequeue",
        "populated",
        "ok",
        (b"w", 1, 0, 0, b"", 0, b"", T),
        "ARG",
        "lease_ms must be between 1 and 31536000000, got 0",
    ),
    (
        "queue.dequeue",
        "populated",
        "ok",
        (b"w", 1, 1000, 0, b"t0", 0, b"", T),
        "ARG",
        "ack_task_id and ack_token come together (both empty/0, or both set)",
    ),
    (
        "queue.dequeue",
        "populated",
        "ok",
        (b"w", 1, 1000, 0, b"", 5, b"", T),
        "ARG",
        "ack_task_id and ack_token come together (both empty/0, or both set)",
    ),
    (
        "queue.dequeue",
        "populated",
        "ok",
        (b"w", 1, 1000, 0, b"", 0, b"e1", T),
        "ARG",
        'request id "e1" was used by another call (enqueue)',
    ),
    (
        "queue.dequeue",
        "populated",
        "ok",
        (b"w", 1, 1000, 0, b"t4", 99, b"", T),
        "STALE",
        'the lease of task "t4" with token 99 is no longer held',
    ),
    (
        "queue.dequeue",
        "populated",
        "ok",
        (b"w", 1, 1000, 0, b"ghost", 1, b"", T),
        "STALE",
        'the lease of task "ghost" with token 1 is no longer held',
    ),
    ("queue.dequeue", "wrong_tasks", "ok", DEQ, "CORRUPT", "holds another type than the layout"),
    ("queue.dequeue", "wrong_ready", "ok", DEQ, "CORRUPT", "holds another type than the layout"),
    # queue.ack
    ("queue.ack", "populated", "long", (b"t4", 1, b"", T), "ARG", "expected 8 key(s), got 9"),
    ("queue.ack", "populated", "ok", (b"t4", 1, b""), "ARG", "expected 4 argument(s), got 3"),
    (
        "queue.ack",
        "populated",
        "ok",
        (b"t4", 0, b"", T),
        "ARG",
        "token must be between 1 and 9007199254740991, got 0",
    ),
    (
        "queue.ack",
        "populated",
        "ok",
        (b"t4", 2, b"", T),
        "STALE",
        'the lease of task "t4" with token 2 is no longer held',
    ),
    (
        "queue.ack",
        "populated",
        "ok",
        (b"t0", 1, b"", T),
        "STALE",
        'the lease of task "t0" with token 1 is no longer held',
    ),
    (
        "queue.ack",
        "wrong_tasks",
        "ok",
        (b"t4", 1, b"", T),
        "CORRUPT",
        "holds another type than the layout",
    ),
    (
        "queue.ack",
        "bad_meta",
        "ok",
        (b"t0", 1, b"", T),
        "CORRUPT",
        'task "t0" has a malformed meta "garbage"',
    ),
    # queue.nack
    (
        "queue.nack",
        "populated",
        "short",
        (b"t4", 1, -1, b"", 1, 1, b"", T),
        "ARG",
        "expected 8 key(s), got 7",
    ),
    (
        "queue.nack",
        "populated",
        "ok",
        (b"t4", 1, -2, b"", 1, 1, b"", T),
        "ARG",
        "delay_ms must be between -1 and 31536000000, got -2",
    ),
    (
        "queue.nack",
        "populated",
        "ok",
        (b"t4", 1, -1, b"x" * 4097, 1, 1, b"", T),
        "ARG",
        "reason must be 0 to 4096 bytes long, got 4097 bytes",
    ),
    (
        "queue.nack",
        "populated",
        "ok",
        (b"t4", 7, -1, b"", 1, 1, b"", T),
        "STALE",
        'the lease of task "t4" with token 7 is no longer held',
    ),
    (
        "queue.nack",
        "wrong_ready",
        "ok",
        (b"t2", HELD_TOKEN, 0, b"", 1, 1, b"", T),
        "CORRUPT",
        "holds another type than the layout",
    ),
    # queue.extend
    ("queue.extend", "populated", "short", (b"t4", 1, 10), "ARG", "expected 8 key(s), got 7"),
    ("queue.extend", "populated", "ok", (b"t4", 1), "ARG", "expected 3 argument(s), got 2"),
    (
        "queue.extend",
        "populated",
        "ok",
        (b"t4", 1, 0),
        "ARG",
        "lease_ms must be between 1 and 31536000000, got 0",
    ),
    (
        "queue.extend",
        "populated",
        "ok",
        (b"t4", 3, 10),
        "STALE",
        'the lease of task "t4" with token 3 is no longer held',
    ),
    (
        "queue.extend",
        "wrong_tasks",
        "ok",
        (b"t4", 1, 10),
        "CORRUPT",
        "holds another type than the layout",
    ),
    # queue.requeue_dead
    ("queue.requeue_dead", "populated", "long", (b"t4",), "ARG", "expected 8 key(s), got 9"),
    ("queue.requeue_dead", "populated", "ok", (), "ARG", "expected 1 argument(s), got 0"),
    (
        "queue.requeue_dead",
        "populated",
        "ok",
        (b"",),
        "ARG",
        "task_id must be 1 to 1024 bytes long, got 0 bytes",
    ),
    (
        "queue.requeue_dead",
        "bad_meta",
        "ok",
        (b"t0",),
        "CORRUPT",
        'task "t0" has a malformed meta "garbage"',
    ),
    # queue.stats
    ("queue.stats", "populated", "short", (), "ARG", "expected 8 key(s), got 7"),
    ("queue.stats", "populated", "ok", (b"x",), "ARG", "expected 0 argument(s), got 1"),
    ("queue.stats", "wrong_ready", "ok", (), "CORRUPT", "holds another type than the layout"),
]


def test_every_queue_script_and_error_code_is_covered() -> None:
    # The dispatch scripts (keys luasched:{ns}:d:...) are covered by test_queue_dispatch.py, the
    # scripts of queues with groups (11 KEYS) and the GROUPED answers by test_queue_groups.py.
    scripts = {
        name
        for name, script in render_all().items()
        if name.startswith("queue.")
        and script.spec.keys[0].pattern.startswith("luasched:{ns}:q:")
        and len(script.spec.keys) == 8
    }
    grouped = [(name, "GROUPED") for name in GROUPED_SCRIPTS]
    assert_codes_covered(ERROR_CASES, scripts, elsewhere=grouped)


@pytest.mark.parametrize(
    ("script", "setup", "keys", "args", "code", "detail"),
    ERROR_CASES,
    ids=[f"{case[0]}-{case[4]}-{index}" for index, case in enumerate(ERROR_CASES)],
)
def test_bad_input_is_refused_and_changes_nothing(
    r: Client, script: str, setup: str, keys: str, args: tuple[Any, ...], code: str, detail: str
) -> None:
    s = Scheduler(r, NS)
    SETUPS[setup](r, s)
    assert len(snapshot(r, s.namespace)) >= 6
    request_id = next((a for a in args[-2:-1] if isinstance(a, bytes)), b"")
    base = list(QueueKeys.of(s.namespace, QUEUE).with_request(request_id))
    key_list = {"ok": base, "short": base[:-1], "long": [*base, s.namespace.key("x")]}[keys]
    if HELD_TOKEN in args:
        args = with_held_tokens(r, base[4], args)
    assert_refused(r, s, script, key_list, args, code, detail, exact=False)


def test_request_keys_never_leak_across_queues(r: Client) -> None:
    s = Scheduler(r, "leak")
    a, b = s.queue("a"), s.queue("a:b")
    a.enqueue("t", b"", request_id="same")
    assert b.enqueue("t", b"", request_id="same").created  # another queue: another record
    assert QueueKeys.of(s.namespace, "a").with_request(b"x")[-1] == b"luasched:{leak}:q:req:x:a"
