"""The worker runtime: ``luasched.Worker`` (threads), ``luasched.asyncio.Worker`` (coroutines)
and ``luasched worker`` (processes), and the nack modes it relies on.

The nack modes are script behaviour and run on every selected server. The runtime tests are
Python over scripts tested elsewhere on every server: they run on one server (``one_server``),
the sharded queue on the cluster. Each runtime test runs for threads and for asyncio; handler
runs are counted in Redis or in the test, so a double run is seen and attributed. No test
asserts a timing or a rate: each waits (bounded) for a state and asserts the guarantee.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import luasched.asyncio
from luasched import Fail, InvalidArgument, Job, Retry, Scheduler, Worker
from luasched.queue import (
    NACK_DEAD,
    NACK_GIVE_BACK,
    Lease,
    dequeue_call,
    nack_call,
    node_nack_call,
)
from support.helpers import assert_refused, snapshot
from support.servers import ServerHandle

NS = "wk"
KINDS = ["threads", "asyncio"]
LUASCHED = Path(sys.executable).with_name("luasched")


def _assert_all_done(q: Any) -> None:
    """Nothing is left in queue ``q``: no task ready, delayed, leased or dead."""
    counts = q.stats()
    assert (counts.ready, counts.delayed, counts.leased, counts.dead) == (0, 0, 0, 0)


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (bounded) until ``check()``; fail naming ``what`` when it never holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------------------- nack modes


def test_nack_give_back_is_uncharged_and_dead_is_now(r: Any) -> None:
    """mode 1: ready now, the attempt not counted, the last reason kept; mode 2: dead now.
    Fails before queue.nack had modes (the 9th argument was refused)."""
    s = Scheduler(r, NS)
    q = s.queue("modes")
    q.enqueue(b"t", b"p", max_attempts=2)
    first = q.dequeue(b"w", 60_000)
    assert first is not None and first.attempt == 1
    assert q.nack(first, 0, b"boom").state == "ready"
    second = q.dequeue(b"w", 60_000)
    assert second is not None and second.attempt == 2
    given = s.runner.run(nack_call(q.keys, second, mode=NACK_GIVE_BACK))
    assert (given.state, given.delay_ms) == ("ready", 0)
    assert r.hget(q.keys.tasks, b"rt") == b"boom"
    third = q.dequeue(b"w", 60_000)
    assert third is not None and third.attempt == 2  # the given-back lease was not charged
    assert q.nack(third, 0, b"again").state == "dead"  # 2 leases counted: max_attempts
    q.enqueue(b"u", b"p", max_attempts=5)
    lease = q.dequeue(b"w", 60_000)
    assert lease is not None and lease.attempt == 1
    dead = s.runner.run(nack_call(q.keys, lease, reason=b"bad", mode=NACK_DEAD))
    assert (dead.state, dead.delay_ms) == ("dead", -1)
    assert r.hget(q.keys.tasks, b"ru") == b"bad"
    assert q.stats().dead == 2


def test_node_nack_give_back_and_dead(r: Any) -> None:
    """queue.node_nack's modes: given back, the task is ready on its node again, uncharged;
    dead now, its cost is given back to the node's load."""
    s = Scheduler(r, NS)
    s.nodes.register(b"n1", ttl_ms=60_000)
    q = s.queue("nmodes")
    q.dispatch(b"t", b"p", max_attempts=1)
    node = q.for_node(b"n1")
    lease = node.dequeue(b"w", 60_000)
    assert lease is not None and lease.attempt == 1
    given = s.runner.run(node_nack_call(q.dispatch_keys, lease, mode=NACK_GIVE_BACK))
    assert given.state == "ready"
    counts = node.stats()
    assert (counts.ready, counts.assigned, counts.load) == (1, 0, 1)
    again = node.dequeue(b"w", 60_000)
    assert again is not None and again.attempt == 1  # max_attempts 1, and not dead
    dead = s.runner.run(node_nack_call(q.dispatch_keys, again, reason=b"x", mode=NACK_DEAD))
    assert dead.state == "dead"
    counts = node.stats()
    assert (counts.ready, counts.assigned, counts.load) == (0, 0, 0)


def test_nack_mode_out_of_range_is_refused(r: Any) -> None:
    """A mode outside 0..2: InvalidArgument naming ``mode`` before any I/O, and the script's
    ARG with every key unchanged."""
    s = Scheduler(r, NS)
    q = s.queue("badmode")
    q.enqueue(b"t", b"p", request_id=b"")  # no request records: their TTLs would tick
    lease = q.dequeue(b"w", 60_000, request_id=b"")
    assert lease is not None
    with pytest.raises(InvalidArgument, match="mode"):
        nack_call(q.keys, lease, mode=3)
    call = nack_call(q.keys, lease, request_id=b"")
    assert_refused(r, s, "queue.nack", call.keys, (*call.args, 3), "ARG", "mode", exact=False)


# ---------------------------------------------------------------------------- the runtime


def _serve(
    server: ServerHandle,
    kind: str,
    name: str,
    handler: Callable[[Job], Any],
    *,
    started: Callable[[Any], None] = lambda worker: None,
    **options: Any,
) -> tuple[bool, Any]:
    """Run a worker of ``kind`` on queue ``name`` to its end; (run()'s result, its stats).

    ``handler`` is sync; the asyncio worker runs it through ``_async_handler``'s rules (the
    handler returns an awaitable or not). ``started(worker)`` is called before it runs."""
    if kind == "threads":
        client = server.client()
        try:
            worker = Worker(Scheduler(client, NS).queue(name), handler, **options)
            started(worker)
            return worker.run(), worker.stats()
        finally:
            client.close()

    async def main() -> tuple[bool, Any]:
        client = server.async_client()
        try:

            async def handle(job: Job) -> None:
                result = handler(job)
                if asyncio.iscoroutine(result):
                    await result

            queue = luasched.asyncio.Scheduler(client, NS).queue(name)
            worker = luasched.asyncio.Worker(queue, handle, **options)
            started(worker)
            return await worker.run(), worker.stats()
        finally:
            await client.aclose()

    return asyncio.run(main())


def _pause(kind: str, seconds: float) -> Any:
    """Sleep ``seconds`` as a handler of ``kind`` does (the asyncio one returns a coroutine)."""
    if kind == "asyncio":
        return asyncio.sleep(seconds)
    time.sleep(seconds)
    return None


def _until_lost(kind: str, job: Job, seen: threading.Event) -> Any:
    """Run until the runtime says the lease is lost (at most 20 s), then set ``seen``: a thread
    waits on ``job.wait_lost``; a coroutine (returned) sleeps until its task is cancelled."""
    if kind == "threads":
        if job.wait_lost(20):
            seen.set()
        return None

    async def wait() -> None:
        try:
            await asyncio.sleep(20)
        except asyncio.CancelledError:
            seen.set()
            raise

    return wait()


@pytest.mark.one_server
@pytest.mark.standalone_only
@pytest.mark.parametrize("kind", KINDS)
def test_outcomes_ack_retry_fail_and_hooks(r: Any, server: ServerHandle, kind: str) -> None:
    """Return acks; Retry(delay_ms) retries; Fail and attempts past max_attempts go to the dead
    letters; the hooks and stats() say so."""
    q = Scheduler(r, NS).queue("outcomes")
    q.enqueue(b"ok", b"")
    q.enqueue(b"retry", b"")
    q.enqueue(b"fail", b"")
    q.enqueue(b"boom", b"", max_attempts=2)
    runs: Counter[bytes] = Counter()
    seen: dict[str, list[bytes]] = {"success": [], "failure": [], "dead": []}

    def handler(job: Job) -> None:
        runs[job.task_id] += 1
        if job.task_id == b"retry" and job.attempt == 1:
            raise Retry(delay_ms=0, reason="later")
        if job.task_id == b"fail":
            raise Fail("bad input")
        if job.task_id == b"boom":
            raise ValueError("no")

    clean, stats = _serve(
        server,
        kind,
        "outcomes",
        handler,
        burst=True,
        on_success=lambda job: seen["success"].append(job.task_id),
        on_failure=lambda job, error: seen["failure"].append(job.task_id),
        on_dead=lambda job, error: seen["dead"].append(job.task_id),
        worker_id="w",
    )
    assert clean is True
    assert runs == {b"ok": 1, b"retry": 2, b"fail": 1, b"boom": 2}
    assert sorted(seen["success"]) == [b"ok", b"retry"]
    assert sorted(seen["failure"]) == [b"boom", b"retry"]
    assert sorted(seen["dead"]) == [b"boom", b"fail"]
    assert (stats.processed, stats.failed, stats.retried, stats.dead) == (2, 4, 2, 2)
    counts = q.stats()
    assert (counts.ready, counts.delayed, counts.leased, counts.dead) == (0, 0, 0, 2)
    assert r.hget(q.keys.tasks, b"rfail") == b"bad input"
    assert r.hget(q.keys.tasks, b"rboom") == b"ValueError: no"


@pytest.mark.one_server
@pytest.mark.standalone_only
@pytest.mark.parametrize("concurrency", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_long_handler_is_extended_and_runs_once(
    r: Any, server: ServerHandle, kind: str, concurrency: int
) -> None:
    """A handler that runs 5x lease_ms keeps its lease (extended at lease_ms/3): it completes
    once, never redelivered, though the worker keeps taking (with 2: a free slot) meanwhile;
    with 1 (threads: the handler runs in the loop's thread) the loop is taken over by run()'s
    thread while the handler runs."""
    lease_ms = 300
    q = Scheduler(r, NS).queue("long")
    q.enqueue(b"long", b"")
    runs: Counter[bytes] = Counter()
    attempts: list[int] = []

    def handler(job: Job) -> Any:
        runs[job.task_id] += 1
        attempts.append(job.attempt)
        return _pause(kind, 5 * lease_ms / 1000)

    clean, stats = _serve(
        server, kind, "long", handler, concurrency=concurrency, lease_ms=lease_ms, burst=True
    )
    assert clean is True
    assert runs == {b"long": 1} and attempts == [1]
    assert (stats.processed, stats.lost) == (1, 0)
    _assert_all_done(q)


@pytest.mark.one_server
@pytest.mark.standalone_only
def test_one_thread_worker_whose_handler_overruns_runs_every_task_once_one_at_a_time(
    r: Any, server: ServerHandle
) -> None:
    """One handler thread (the default): the handlers of a batch run inline in the loop's
    thread; when one runs 3x lease_ms the loop goes on in run()'s thread and extends every
    lease (none has lapsed when that handler ends: the server's clock against the leases'
    deadlines), and the leases waiting behind it run after it on the handler's thread: every
    task runs once, on its first lease, never two handlers at once, and the later batches are
    served too."""
    lease_ms = 600
    q = Scheduler(r, NS).queue("overrun")
    for index in range(12):
        q.enqueue(b"t%02d" % index, b"")
    runs: Counter[bytes] = Counter()
    attempts: list[int] = []
    active = [0, 0]  # now, most at once
    guard = threading.Lock()
    lapsed: list[bytes] = []

    def handler(job: Job) -> None:
        with guard:
            active[0] += 1
            active[1] = max(active)
        runs[job.task_id] += 1
        attempts.append(job.attempt)
        if job.task_id == b"t01":
            time.sleep(3 * lease_ms / 1000)
            seconds, micros = r.time()
            now_ms = seconds * 1000 + micros // 1000
            leases = r.zrange(q.keys.fixed[2], 0, -1, withscores=True)
            lapsed.extend(task for task, deadline in leases if deadline <= now_ms)
        with guard:
            active[0] -= 1

    clean, stats = _serve(
        server, "threads", "overrun", handler, batch=4, lease_ms=lease_ms, burst=True
    )
    assert clean is True
    assert runs == {b"t%02d" % index: 1 for index in range(12)}
    assert attempts == [1] * 12
    assert lapsed == []
    assert active[1] == 1
    assert (stats.processed, stats.lost, stats.given_back) == (12, 0, 0)
    _assert_all_done(q)


@pytest.mark.one_server
@pytest.mark.standalone_only
def test_one_thread_worker_stop_returns_while_its_handler_overruns_the_drain(
    r: Any, server: ServerHandle
) -> None:
    """One handler thread (the default), whose handler runs in the loop's thread: a stop while
    that handler runs gives the waiting lease back at once (never run), and when the handler
    outlasts the drain timeout its lease is given back (uncharged, job.lost) and run() returns
    False while the handler still runs, as with more threads."""
    s = Scheduler(r, NS)
    q = s.queue("overdrain")
    q.enqueue(b"slow", b"", priority=1)
    q.enqueue(b"never", b"")
    workers: list[Any] = []
    runs: Counter[bytes] = Counter()
    lost, released, ended = threading.Event(), threading.Event(), threading.Event()

    def handler(job: Job) -> None:
        runs[job.task_id] += 1
        workers[0].stop()
        if job.wait_lost(20):
            lost.set()
        released.wait(30)
        ended.set()

    try:
        clean, stats = _serve(
            server,
            "threads",
            "overdrain",
            handler,
            batch=2,  # "never" is leased with "slow" and waits behind it
            drain_timeout_s=0.3,
            started=workers.append,
        )
        assert not ended.is_set(), "run() waited for the handler"
    finally:
        released.set()
    assert ended.wait(10)
    assert clean is False and lost.is_set()
    assert runs == {b"slow": 1}
    assert (stats.processed, stats.given_back) == (0, 2)
    counts = q.stats()
    assert (counts.ready, counts.leased) == (2, 0)
    again = q.dequeue_many(b"check", 2, 60_000)
    assert {(lease.task_id, lease.attempt) for lease in again} == {(b"slow", 1), (b"never", 1)}


def _count_takes(kind: str, worker: Any, sizes: list[int]) -> None:
    """Record in ``sizes`` how many leases each take of its own (``dequeue_many``) of
    ``worker`` answered; a take that rides in a pipeline of outcomes is not one."""
    original = worker.queue.dequeue_many
    if kind == "threads":

        def take(*args: Any, **kwargs: Any) -> Any:
            leases = original(*args, **kwargs)
            sizes.append(len(leases))
            return leases

    else:

        async def take(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            leases = await original(*args, **kwargs)
            sizes.append(len(leases))
            return leases

    worker.queue.dequeue_many = take


@pytest.mark.parametrize("kind", KINDS)
def test_busy_worker_takes_each_batch_with_the_last_ones_acks(
    r: Any, server: ServerHandle, kind: str
) -> None:
    """A busy worker makes one round trip per batch: only its first batch is a take of its own;
    each later one is leased in the pipeline that acks the batch before (after those acks), and
    every task still runs once and is acked. Fails before the take rode with the acks (four
    takes of their own)."""
    q = Scheduler(r, NS).queue("ride")
    for index in range(64):
        q.enqueue(b"t%02d" % index, b"")
    runs: Counter[bytes] = Counter()
    sizes: list[int] = []

    def handler(job: Job) -> None:
        runs[job.task_id] += 1

    clean, stats = _serve(
        server,
        kind,
        "ride",
        handler,
        batch=16,
        burst=True,
        started=lambda worker: _count_takes(kind, worker, sizes),
    )
    assert clean is True
    assert runs == {b"t%02d" % index: 1 for index in range(64)}
    assert [size for size in sizes if size] == [16]
    assert (stats.processed, stats.lost) == (64, 0)
    _assert_all_done(q)


@pytest.mark.parametrize("kind", KINDS)
def test_take_whose_reply_was_lost_is_replayed_not_left_to_lapse(
    r: Any, server: ServerHandle, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ran a take that rode with acks, but its reply was lost: the worker asks again
    under the take's request id, gets those very leases back and runs them, each once on its
    first attempt (not after their lease lapsed), and acks them."""
    import luasched.asyncio.worker as async_worker
    import luasched.worker as sync_worker

    lost: list[int] = []

    def lose_first_take(calls: Any, results: list[Any]) -> list[Any]:
        for index, (_runner, call) in enumerate(calls):
            if call.script == "queue.dequeue" and not lost and results[index]:
                lost.append(len(results[index]))
                results[index] = ConnectionError("reply lost (test)")
        return results

    if kind == "threads":
        send = sync_worker.send_calls
        monkeypatch.setattr(
            sync_worker, "send_calls", lambda calls: lose_first_take(calls, send(calls))
        )
    else:
        send_async = async_worker.send_calls_async

        async def send_calls_async(calls: Any) -> list[Any]:
            return lose_first_take(calls, await send_async(calls))

        monkeypatch.setattr(async_worker, "send_calls_async", send_calls_async)
    q = Scheduler(r, NS).queue("replay")
    for index in range(48):
        q.enqueue(b"t%02d" % index, b"")
    attempts: dict[bytes, list[int]] = {}

    def handler(job: Job) -> None:
        attempts.setdefault(job.task_id, []).append(job.attempt)

    clean, stats = _serve(server, kind, "replay", handler, batch=16, lease_ms=10_000, burst=True)
    assert lost == [16]
    assert clean is True
    assert attempts == {b"t%02d" % index: [1] for index in range(48)}
    assert (stats.processed, stats.lost) == (48, 0)
    _assert_all_done(q)


@pytest.mark.parametrize("kind", KINDS)
def test_stop_after_a_lost_take_reply_gives_those_leases_back(
    r: Any, server: ServerHandle, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop comes right after a take whose reply was lost: the worker asks the server for
    that take's leases (its request id) and gives them back uncharged, so they are ready now
    rather than leased until they lapse."""
    import luasched.asyncio.worker as async_worker
    import luasched.worker as sync_worker

    workers: list[Any] = []
    lost: list[int] = []

    def lose_take_and_stop(calls: Any, results: list[Any]) -> list[Any]:
        for index, (_runner, call) in enumerate(calls):
            if call.script == "queue.dequeue" and not lost and results[index]:
                lost.append(len(results[index]))
                results[index] = ConnectionError("reply lost (test)")
                workers[0].stop()
        return results

    if kind == "threads":
        send = sync_worker.send_calls
        monkeypatch.setattr(
            sync_worker, "send_calls", lambda calls: lose_take_and_stop(calls, send(calls))
        )
    else:
        send_async = async_worker.send_calls_async

        async def send_calls_async(calls: Any) -> list[Any]:
            return lose_take_and_stop(calls, await send_async(calls))

        monkeypatch.setattr(async_worker, "send_calls_async", send_calls_async)
    q = Scheduler(r, NS).queue("giveback")
    for index in range(48):
        q.enqueue(b"t%02d" % index, b"")
    runs: Counter[bytes] = Counter()

    def handler(job: Job) -> None:
        runs[job.task_id] += 1

    clean, stats = _serve(
        server, kind, "giveback", handler, batch=16, started=workers.append, worker_id="w"
    )
    assert lost == [16]
    assert clean is True
    assert len(runs) == 16 and set(runs.values()) == {1}
    assert (stats.processed, stats.given_back, stats.in_flight) == (16, 16, 0)
    counts = q.stats()
    assert (counts.ready, counts.delayed, counts.leased, counts.dead) == (32, 0, 0, 0)
    rest = q.dequeue_many(b"check", 32, 60_000)
    assert sorted(lease.task_id for lease in rest) == sorted(
        b"t%02d" % index for index in range(48) if b"t%02d" % index not in runs
    )
    assert {lease.attempt for lease in rest} == {1}


@pytest.mark.parametrize("kind", KINDS)
def test_a_queue_that_gains_groups_while_a_worker_runs(
    r: Any,
    server: ServerHandle,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another client enqueues tasks with a group while a busy worker serves the queue: the take
    that rides with the acks is answered GROUPED (nothing taken); the worker switches to the
    ``queue.group_*`` scripts and asks again at once, under the same request id. Every task,
    with and without a group, runs once on its first attempt (none waits for a lease to
    lapse), none is left leased, and no take is logged as failed. Fails before the switch (the
    GROUPED answer was logged as a failed take and asked again as one)."""
    import luasched.asyncio.worker as async_worker
    import luasched.worker as sync_worker

    q = Scheduler(r, NS).queue("gains")
    plain_ids = [b"t%02d" % index for index in range(32)]
    group_ids = [b"g%d-%d" % (index % 4, index) for index in range(16)]
    for task_id in plain_ids:
        q.enqueue(task_id, b"")
    answers: list[tuple[str, str]] = []

    def see(calls: Any, results: list[Any]) -> list[Any]:
        for (_runner, call), result in zip(calls, results, strict=True):
            if call.script.endswith("dequeue"):
                answers.append((call.script, type(result).__name__))
        return results

    if kind == "threads":
        send = sync_worker.send_calls
        monkeypatch.setattr(sync_worker, "send_calls", lambda calls: see(calls, send(calls)))
    else:
        send_async = async_worker.send_calls_async

        async def send_calls_async(calls: Any) -> list[Any]:
            return see(calls, await send_async(calls))

        monkeypatch.setattr(async_worker, "send_calls_async", send_calls_async)
    attempts: dict[bytes, list[int]] = {}

    def handler(job: Job) -> None:
        attempts.setdefault(job.task_id, []).append(job.attempt)
        if job.task_id == plain_ids[0]:  # in the first batch: the next take rides after it
            for index, task_id in enumerate(group_ids):
                q.enqueue(task_id, b"", group=b"g%d" % (index % 4))

    caplog.set_level("INFO", logger="luasched.worker")
    clean, stats = _serve(server, kind, "gains", handler, batch=8, lease_ms=10_000, burst=True)
    # The ridden take met the groups, and the next take went to the group scripts at once.
    grouped = answers.index(("queue.dequeue", "GroupedQueue"))
    assert answers[grouped + 1] == ("queue.group_dequeue", "list")
    assert clean is True
    assert attempts == {task_id: [1] for task_id in plain_ids + group_ids}
    assert (stats.processed, stats.lost, stats.given_back) == (48, 0, 0)
    assert r.zcard(q.keys.fixed[2]) == 0  # nothing leased
    counts = q.group_stats([])
    assert (counts.ready, counts.queue.ready, counts.queue.delayed) == (0, 0, 0)
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert errors == []


def _take_over(r: Any, s: Scheduler, name: str, task_id: bytes) -> Lease:
    """Make the lease of ``task_id`` lapse and lease the task to another worker, in one
    MULTI/EXEC (so no extend of its worker comes between): the other worker's lease."""
    q = s.queue(name)
    s.load_scripts()
    calls = [dequeue_call(q.keys, b"other", 1, 60_000, shape="one") for _ in range(2)]
    pipe = r.pipeline(transaction=True)
    pipe.zadd(q.keys.fixed[2], {task_id: 1}, xx=True)  # the deadline in the past
    for call in calls:  # the first reclaims it (and may take it), the second takes it
        pipe.evalsha(s.scripts[call.script].sha1, len(call.keys), *call.keys, *call.args)
    replies = pipe.execute()
    leases = [call.parse(reply) for call, reply in zip(calls, replies[1:], strict=True)]
    taken = [lease for lease in leases if lease is not None]
    assert len(taken) == 1 and taken[0].task_id == task_id and taken[0].attempt == 2, taken
    return taken[0]


@pytest.mark.one_server
@pytest.mark.standalone_only
@pytest.mark.parametrize("kind", KINDS)
def test_taken_over_lease_is_lost_and_never_acked(r: Any, server: ServerHandle, kind: str) -> None:
    """A lease that lapsed and was taken by another worker: the next extend is refused, the
    handler learns it (``job.lost`` / its task cancelled) and the runtime sends no outcome; the
    task completes once, on the other worker (whose ack succeeds)."""
    s = Scheduler(r, NS)
    q = s.queue("lost")
    q.enqueue(b"t", b"")
    running, saw_lost = threading.Event(), threading.Event()
    succeeded: list[bytes] = []

    def handler(job: Job) -> Any:
        running.set()
        return _until_lost(kind, job, saw_lost)

    result: list[Any] = []
    thread = threading.Thread(
        target=lambda: result.append(
            _serve(
                server,
                kind,
                "lost",
                handler,
                lease_ms=1500,
                burst=True,
                on_success=lambda job: succeeded.append(job.task_id),
            )
        )
    )
    thread.start()
    try:
        assert running.wait(10), "the handler never started"
        other = _take_over(r, s, "lost", b"t")
        assert saw_lost.wait(10), "the handler never learned that its lease was lost"
        assert q.ack(other) is True  # the task completes once, on the other worker
    finally:
        thread.join(20)
    assert not thread.is_alive()
    clean, stats = result[0]
    assert clean is True and succeeded == []
    assert (stats.processed, stats.lost) == (0, 1)
    _assert_all_done(q)


@pytest.mark.one_server
@pytest.mark.standalone_only
@pytest.mark.parametrize("kind", KINDS)
def test_stop_drains_then_gives_back_uncharged(r: Any, server: ServerHandle, kind: str) -> None:
    """stop(): no more leases; a lease that waits for a handler (prefetched) is given back at
    once and never run; a handler that finishes within the drain timeout is acked; one that
    does not is given back when it is over (ready, attempt not charged) and told it is lost."""
    s = Scheduler(r, NS)
    q = s.queue("drain")
    q.enqueue(b"quick", b"", priority=1)
    q.enqueue(b"slow", b"")
    q.enqueue(b"never", b"", priority=-1)
    workers: list[Any] = []
    slow_lost = threading.Event()
    runs: Counter[bytes] = Counter()

    def handler(job: Job) -> Any:
        runs[job.task_id] += 1
        stopped = workers[0].control.stop.is_set
        if job.task_id == b"quick":  # ends once stopped: no take between the two
            if kind == "threads":
                _until(stopped, 10, "the stop")
                return None

            async def after_stop() -> None:
                while not stopped():
                    await asyncio.sleep(0.01)

            return after_stop()
        workers[0].stop()  # the three leases were taken by one take (batch 3)
        return _until_lost(kind, job, slow_lost)

    clean, stats = _serve(
        server,
        kind,
        "drain",
        handler,
        concurrency=2,
        batch=3,  # "never" is leased too, and waits for a handler
        drain_timeout_s=0.5,
        started=workers.append,
    )
    assert clean is False
    assert slow_lost.wait(10)
    assert runs == {b"quick": 1, b"slow": 1}
    assert (stats.processed, stats.given_back) == (1, 2)
    counts = q.stats()
    assert (counts.ready, counts.leased) == (2, 0)
    again = q.dequeue_many(b"check", 2, 60_000)
    assert {(lease.task_id, lease.attempt) for lease in again} == {(b"slow", 1), (b"never", 1)}


@pytest.mark.one_server
@pytest.mark.standalone_only
@pytest.mark.parametrize("kind", KINDS)
def test_node_worker_joins_heartbeats_and_drains(r: Any, server: ServerHandle, kind: str) -> None:
    """A node queue's worker registers its node (live), serves it, and at shutdown drains the
    node and moves the node's queued tasks to a live node."""
    s = Scheduler(r, NS)
    s.nodes.register(b"n1", ttl_ms=60_000)
    q = s.queue("nodes")
    runs: Counter[bytes] = Counter()
    workers: list[Any] = []
    result: list[Any] = []

    def handler(job: Job) -> None:
        runs[job.task_id] += 1
        workers[0].stop()

    def serve() -> None:
        if kind == "threads":
            client = server.client()
            try:
                queue = Scheduler(client, NS).queue("nodes").for_node(b"n2")
                worker: Any = Worker(queue, handler, batch=1)  # one lease at a time
                workers.append(worker)
                result.append(worker.run())
            finally:
                client.close()
            return

        async def main() -> None:
            client = server.async_client()

            async def handle(job: Job) -> None:
                handler(job)

            try:
                queue = luasched.asyncio.Scheduler(client, NS).queue("nodes").for_node(b"n2")
                worker = luasched.asyncio.Worker(queue, handle, batch=1)
                workers.append(worker)
                result.append(await worker.run())
            finally:
                await client.aclose()

        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        _until(lambda: any(n.node_id == b"n2" and n.live for n in s.nodes.list()), 10, "n2")
        for index in range(6):
            q.dispatch(b"t%d" % index, b"", strategy="round_robin")
    finally:
        thread.join(20)
    assert not thread.is_alive() and result == [True]
    assert sum(runs.values()) == 1
    (n2,) = [node for node in s.nodes.list() if node.node_id == b"n2"]
    assert n2.draining
    counts = q.dispatch_stats([b"n1", b"n2"])
    assert (counts.nodes[b"n2"].ready, counts.nodes[b"n2"].assigned) == (0, 0)
    assert counts.nodes[b"n1"].ready == 5 and counts.ready == 5


@pytest.mark.one_server
@pytest.mark.cluster_only
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_queue_every_task_once(r: Any, server: ServerHandle, kind: str) -> None:
    """A worker on a sharded queue (partitions on different primaries) finishes every task
    once and leaves every partition empty."""
    s = Scheduler(r, NS)
    sq = s.sharded_queue("sh", partitions=3)
    for index in range(60):
        sq.enqueue(b"t%02d" % index, b"")
    runs: Counter[bytes] = Counter()

    def handler(job: Job) -> None:
        runs[job.task_id] += 1

    async def main() -> tuple[bool, Any]:
        client = server.async_client()
        try:
            queue = await luasched.asyncio.Scheduler(client, NS).sharded_queue("sh", partitions=3)

            async def handle(job: Job) -> None:
                handler(job)

            worker = luasched.asyncio.Worker(queue, handle, concurrency=4, burst=True)
            return await worker.run(), worker.stats()
        finally:
            await client.aclose()

    if kind == "threads":
        worker = Worker(sq, handler, concurrency=4, burst=True)
        clean, stats = worker.run(), worker.stats()
    else:
        clean, stats = asyncio.run(main())
    assert clean is True
    assert runs == {b"t%02d" % index: 1 for index in range(60)}
    assert stats.processed == 60
    total = sq.stats()
    assert (total.ready, total.delayed, total.leased, total.dead) == (0, 0, 0, 0)


def test_worker_options_are_checked(r: Any) -> None:
    """Bad options: InvalidArgument naming the option, before any I/O."""
    q = Scheduler(r, NS).queue("opts")
    before = snapshot(r, NS)
    for options, name in (
        ({"concurrency": 0}, "concurrency"),
        ({"batch": 0}, "n"),
        ({"lease_ms": 0}, "lease_ms"),
        ({"drain_timeout_s": -1}, "drain_timeout_s"),
        ({"burst": 1}, "burst"),
        ({"on_success": 5}, "on_success"),
    ):
        with pytest.raises(InvalidArgument, match=name):
            Worker(q, lambda job: None, **options)
    with pytest.raises(InvalidArgument, match="handler"):
        Worker(q, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="delay_ms"):
        Retry(delay_ms=-5)
    assert snapshot(r, NS) == before


# ---------------------------------------------------------------------------- luasched worker

HANDLERS = """
import asyncio, os, time
import redis

_r = redis.Redis.from_url(os.environ["WT_URL"])
_me = os.environ["WT_ME"].encode()


def _count(task_id):
    # One MULTI/EXEC: a kill cannot fall between the count and who ran it.
    pipe = _r.pipeline(transaction=True)
    pipe.hincrby("wt:runs", task_id, 1)
    pipe.sadd(b"wt:by:" + _me, task_id)
    pipe.execute()


def run(job):
    _count(job.task_id)
    time.sleep(0.002)


async def arun(job):
    _count(job.task_id)
    await asyncio.sleep(0.002)
"""

TASKS = 5000
DRAIN_TIMEOUT_S = 3.0
#: Slack on top of the drain timeout + 1 s for a process on a loaded machine to exit.
EXIT_SLACK_S = 5.0


def _held_by(r: Any, q: Any, worker: bytes) -> list[bytes]:
    """Task ids leased under ``worker``'s id now (the worker id is the meta's last field)."""
    leased = r.zrange(q.keys.fixed[2], 0, -1)
    metas = r.hmget(q.keys.tasks, [b"m" + task for task in leased]) if leased else []
    return [t for t, m in zip(leased, metas, strict=True) if m and m.split(b" ", 6)[6] == worker]


def _cli_worker(
    server: ServerHandle, tmp_path: Path, name: str, function: str, queue: str, *options: str
) -> subprocess.Popen[bytes]:
    """A ``luasched worker`` process on ``queue`` named ``name`` (its worker id, and ``WT_ME``
    for the handlers of HANDLERS, written to ``tmp_path``), leases of 1.5 s."""
    args = [str(LUASCHED), "worker", function, "--queue", queue, "--namespace", NS]
    args += ["--url", server.url, "--lease-ms", "1500", "--drain-timeout", str(DRAIN_TIMEOUT_S)]
    args += ["--worker-id", name, *options]
    env = {**os.environ, "WT_URL": server.url, "WT_ME": name, "PYTHONPATH": str(tmp_path)}
    return subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _end_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Kill whichever of ``procs`` still runs, and reap them all."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def _ran_once_but_killed(r: Any, tasks: set[bytes], killed: str) -> set[bytes]:
    """Assert from the handlers' counts that every one of ``tasks`` ran, and twice at most only
    for a task the ``killed`` worker ran; answer the tasks that ran twice."""
    runs = {task: int(count) for task, count in r.hgetall("wt:runs").items()}
    assert set(runs) == tasks
    twice = {task for task, count in runs.items() if count > 1}
    assert max(runs.values()) <= 2
    assert twice <= r.smembers(b"wt:by:" + killed.encode()), (
        "a task ran twice without the killed worker"
    )
    return twice


@pytest.mark.slow
@pytest.mark.one_server
@pytest.mark.standalone_only
@pytest.mark.parametrize("kind", KINDS)
def test_three_cli_workers_one_killed_one_terminated(
    r: Any, server: ServerHandle, kind: str, tmp_path: Path
) -> None:
    """Three ``luasched worker`` processes on 5,000 tasks; one SIGKILLed and one SIGTERMed
    midway. Every task is acked exactly once (the queue ends empty, no dead letter); a handler
    ran twice only for a task the killed worker ran; the terminated worker exits 0 after its
    drain and holds no lease when it has exited."""
    (tmp_path / "wtasks.py").write_text(HANDLERS)
    s = Scheduler(r, NS)
    q = s.queue("big")
    for start in range(0, TASKS, 1000):
        with s.pipeline() as pipe:
            pq = pipe.queue("big")
            for index in range(start, start + 1000):
                pq.enqueue(b"t%05d" % index, b"")
            pipe.execute()
    function = "wtasks:arun" if kind == "asyncio" else "wtasks:run"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name in ("kill", "term", "stay"):
        options = ["--concurrency", "4", "--batch", "16"]
        options += (["--burst"] if name == "stay" else []) + (
            ["--asyncio"] if kind == "asyncio" else []
        )
        procs[name] = _cli_worker(server, tmp_path, name, function, "big", *options)
    try:
        _until(lambda: r.hlen("wt:runs") >= TASKS // 5, 60, "a fifth of the tasks to run")
        procs["kill"].kill()
        _until(lambda: r.hlen("wt:runs") >= 2 * TASKS // 5, 60, "two fifths of the tasks")
        terminated = time.monotonic()
        procs["term"].send_signal(signal.SIGTERM)
        status = procs["term"].wait(DRAIN_TIMEOUT_S + 1 + EXIT_SLACK_S)
        exited_after = time.monotonic() - terminated
        assert _held_by(r, q, b"term") == []
        assert status == 0, procs["term"].stderr.read() if procs["term"].stderr else ""
        assert procs["stay"].wait(60) == 0
    finally:
        _end_all(procs)
    print(f"terminated worker exited {exited_after:.2f} s after SIGTERM")
    _assert_all_done(q)
    twice = _ran_once_but_killed(r, {b"t%05d" % index for index in range(TASKS)}, "kill")
    print(f"{len(twice)} task(s) ran twice (leases of the killed worker)")


NODE_TASKS = 3000
NODE_NAMES = ("n1", "n2", "n3", "n4")
#: Strategies that pick among live nodes only. Slot-routed tasks are left out: while the dead
#: node still owns slots (nothing rebalances here), healing cannot move them (docs/queue.md).
HEAL_STRATEGIES = ("least_loaded", "two_choices", "weighted", "round_robin")
#: A generous bound on the whole run (node TTL 10 s + lease + 3,000 tasks); a failure, not a
#: measurement: the guarantee asserted is "done, exactly once", not how fast.
HEAL_LIMIT_S = 120.0


@pytest.mark.slow
@pytest.mark.one_server
@pytest.mark.standalone_only
def test_four_node_workers_one_killed_healed_without_supervisor(
    r: Any, server: ServerHandle, tmp_path: Path
) -> None:
    """Four ``luasched worker --node`` processes on one dispatch queue of 3,000 tasks; one is
    SIGKILLed while its node still has ready tasks, and nothing else runs: no sweep, no
    redispatch. The live workers' own ``node_dequeue`` calls heal the dead node: every task is
    acked exactly once (a handler ran twice only for a task the killed worker ran), the dead
    node's tasks finish on live nodes, and the dead node stays registered (nobody swept it).
    Fails by its time limit with the healing of ready tasks disabled (a scratch render in which
    ``heal_plan`` takes no dead node's ready tasks)."""
    (tmp_path / "wtasks.py").write_text(HANDLERS)
    s = Scheduler(r, NS)
    q = s.queue("heal")
    for name in NODE_NAMES:
        s.nodes.register(name, ttl_ms=10_000)
    first_node: dict[bytes, bytes] = {}
    for start in range(0, NODE_TASKS, 500):
        with s.pipeline() as pipe:
            pq = pipe.queue("heal")
            for index in range(start, start + 500):
                strategy = HEAL_STRATEGIES[index % len(HEAL_STRATEGIES)]
                pq.dispatch(b"t%05d" % index, b"", strategy=strategy)  # type: ignore[arg-type]
            for index, placed in enumerate(pipe.execute(), start):
                first_node[b"t%05d" % index] = placed.node
    victim = NODE_NAMES[2]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name in NODE_NAMES:
        options = ("--node", name, "--concurrency", "4", "--batch", "8")
        procs[name] = _cli_worker(server, tmp_path, name, "wtasks:run", "heal", *options)
    try:
        _until(lambda: r.scard(b"wt:by:" + victim.encode()) >= 50, 60, "the victim to run tasks")
        procs[victim].kill()
        assert procs[victim].wait(10) == -signal.SIGKILL
        left_on_victim = q.dispatch_stats([victim]).nodes[victim.encode()].ready
        assert left_on_victim > 0, "the victim's queue was empty when it was killed"

        def settled() -> bool:
            stats = q.dispatch_stats(list(NODE_NAMES))
            return r.hlen("wt:runs") == NODE_TASKS and stats.ready + stats.leased == 0

        _until(settled, HEAL_LIMIT_S, "every task to run with the victim dead (no supervisor)")
        for name in NODE_NAMES:
            if name != victim:
                procs[name].send_signal(signal.SIGTERM)
        for name in NODE_NAMES:
            if name != victim:
                status = procs[name].wait(DRAIN_TIMEOUT_S + 1 + EXIT_SLACK_S)
                assert status == 0, procs[name].stderr.read() if procs[name].stderr else ""
    finally:
        _end_all(procs)
    stats = q.dispatch_stats(list(NODE_NAMES))
    assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)
    assert all(counts.load == 0 for counts in stats.nodes.values())
    twice = _ran_once_but_killed(r, set(first_node), victim)
    by_victim = r.smembers(b"wt:by:" + victim.encode())
    # The victim's tasks it never ran finished on live nodes, moved there by the healing alone.
    healed = {task for task, node in first_node.items() if node == victim.encode()} - by_victim
    assert len(healed) >= left_on_victim
    assert healed <= r.sunion([b"wt:by:" + n.encode() for n in NODE_NAMES if n != victim])
    # Nobody swept: the dead node is still registered, and dead.
    listing = {info.node_id: info for info in s.nodes.list()}
    assert victim.encode() in listing and not listing[victim.encode()].live
    print(f"{len(healed)} task(s) of the killed node healed; {len(twice)} ran twice")
