"""The task queue under concurrent worker processes: every task acked exactly once, none lost,
never leased to two workers at once (fencing tokens), and a worker killed mid-lease."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest

from luasched import Scheduler
from luasched.errors import StaleLease
from luasched.queue import Lease
from support.helpers import worker_pool

Client = Any

FORK = multiprocessing.get_context("fork")


def _fill(s: Scheduler, queue: str, count: int) -> None:
    for start in range(0, count, 1000):
        with s.pipeline() as pipe:
            pq = pipe.queue(queue)
            for index in range(start, min(count, start + 1000)):
                pq.enqueue(b"task-%06d" % index, b"payload-%d" % index, priority=index % 4)
            assert all(result.created for result in pipe.execute())


def _work(server: Any, namespace: str, queue: str, worker: int, style: str) -> list[Any]:
    """Drain the queue; return (task_id, token, acked) for every lease taken."""
    client = server.client()
    q = Scheduler(client, namespace).queue(queue)
    wid = b"worker-%d" % worker
    taken: list[Any] = []
    if style == "batch":
        while True:
            leases = q.dequeue_many(wid, 10, 60_000)
            if not leases:
                break
            for each in leases:
                taken.append((each.task_id, each.token, q.ack(each)))
    elif style == "chain":
        lease: Lease | None = q.dequeue(wid, 60_000)
        while lease is not None:
            following = q.ack_and_dequeue(lease, wid, 60_000)
            taken.append((lease.task_id, lease.token, True))
            lease = following
    else:
        while (single := q.dequeue(wid, 60_000)) is not None:
            taken.append((single.task_id, single.token, q.ack(single)))
    client.close()
    return taken


def _drain_with_workers(server: Any, r: Client, workers: int, tasks: int) -> None:
    namespace, queue = "drain", "jobs"
    s = Scheduler(r, namespace)
    _fill(s, queue, tasks)
    styles = ["single", "batch", "chain"]
    with worker_pool(workers) as pool:
        results = pool.starmap(
            _work,
            [(server, namespace, queue, index, styles[index % 3]) for index in range(workers)],
        )
    leases = [entry for result in results for entry in result]
    acked = Counter(task_id for task_id, _, ok in leases if ok)
    assert len(leases) == tasks  # no lease expired: every task was leased exactly once
    assert set(acked) == {b"task-%06d" % index for index in range(tasks)}  # none lost
    assert set(acked.values()) == {1}  # acked exactly once
    tokens = [token for _, token, _ in leases]
    assert len(set(tokens)) == tasks  # one fencing token per lease: never two holders
    assert sum(1 for result in results if result) >= 2  # the work was shared
    stats = s.queue(queue).stats()
    assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)


@pytest.mark.standalone_only
def test_eight_workers_drain_every_task_exactly_once(server: Any, r: Client) -> None:
    _drain_with_workers(server, r, workers=8, tasks=3000)


@pytest.mark.slow
def test_sixteen_workers_drain_twenty_thousand_tasks(luasched_servers: Any) -> None:
    """Issue 5's 16-process, 20,000-task run, once per session (time budget): on redis-7.0 if
    selected, else on the first standalone server."""
    standalone = [handle for handle in luasched_servers.values() if not handle.is_cluster]
    assert standalone, "select at least one standalone server"
    server = luasched_servers.get("redis-7.0") or standalone[0]
    server.flush()
    client = server.client()
    try:
        _drain_with_workers(server, client, workers=16, tasks=20_000)
    finally:
        client.close()


def _take_and_hang(server: Any, pipe: Any) -> None:
    q = Scheduler(server.client(), "killed").queue("jobs")
    lease = q.dequeue("doomed", 400)
    pipe.send(lease)
    time.sleep(60)


@pytest.mark.standalone_only
def test_a_worker_killed_mid_lease(server: Any, r: Client) -> None:
    q = Scheduler(r, "killed").queue("jobs")
    q.enqueue("t", b"work")
    parent_end, child_end = FORK.Pipe()
    child = FORK.Process(target=_take_and_hang, args=(server, child_end))
    child.start()
    try:
        old = parent_end.recv()
        assert old.task_id == b"t" and old.attempt == 1
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(5)
    assert q.dequeue("rescuer", 10_000) is None  # not before the lease expires
    new = q.dequeue("rescuer", 10_000, block_ms=3000)
    assert new is not None
    assert (new.task_id, new.payload, new.attempt) == (b"t", b"work", 2)
    assert new.token > old.token
    assert q.stats().now_ms >= old.deadline_ms
    with pytest.raises(StaleLease):
        q.ack(old)  # the killed worker's late ack
    assert q.ack(new) is True
