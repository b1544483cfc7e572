"""Issue 8's acceptance run: 20,000 tasks through a sharded queue of 3 partitions on the
three-primary cluster. Each primary executes between 25% and 42% of the script calls (read from
every node's INFO commandstats), and every task is acknowledged exactly once."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import redis

from luasched import Scheduler
from support.helpers import worker_pool
from support.servers import ServerHandle

TASKS = 20_000
PRODUCERS = 4
WORKERS = 6
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


def _produce(server: ServerHandle, ids: list[bytes]) -> int:
    client = server.client()
    try:
        sq = Scheduler(client, "accept").sharded_queue("jobs", partitions=3)
        return sum(1 for task_id in ids if sq.enqueue(task_id, b"payload").created)
    finally:
        client.close()


def _drain(server: ServerHandle, worker: int) -> list[tuple[bytes, int, int]]:
    """(task_id, token, partition) of every lease this worker acked."""
    client = server.client()
    acked = []
    try:
        sq = Scheduler(client, "accept").sharded_queue("jobs", partitions=3)
        wid = b"worker-%d" % worker
        while leases := sq.dequeue_many(wid, 10, 60_000):
            for lease in leases:
                assert sq.ack(lease)
                acked.append((lease.task_id, lease.token, lease.partition))
    finally:
        client.close()
    return acked


def script_calls(port: int) -> int:
    with redis.Redis(host="127.0.0.1", port=port) as node:
        stats = node.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SCRIPT_COMMANDS)


@pytest.mark.cluster_only
def test_twenty_thousand_tasks_spread_over_three_primaries(
    server: ServerHandle, r: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    sq = Scheduler(r, "accept").sharded_queue("jobs", partitions=3)  # records the layout
    for node in server.primaries():
        with node:
            node.config_resetstat()
    ids = [b"task-%05d" % index for index in range(TASKS)]
    started = time.monotonic()
    with worker_pool(PRODUCERS) as pool:
        created = pool.starmap(_produce, [(server, ids[i::PRODUCERS]) for i in range(PRODUCERS)])
    filled = time.monotonic()
    with worker_pool(WORKERS) as pool:
        results = pool.starmap(_drain, [(server, index) for index in range(WORKERS)])
    drained = time.monotonic()
    assert sum(created) == TASKS

    acked = Counter(task_id for result in results for task_id, _, _ in result)
    assert set(acked) == set(ids)  # none lost
    assert set(acked.values()) == {1}  # acknowledged exactly once
    per_partition = Counter(partition for result in results for _, _, partition in result)
    assert sum(1 for result in results if result) >= 2  # the work was shared

    calls = {port: script_calls(port) for port in server.ports}
    total = sum(calls.values())
    shares = {port: count / total for port, count in calls.items()}
    with capsys.disabled():
        print(
            f"\n[acceptance] {TASKS} tasks: fill {filled - started:.1f}s, drain "
            f"{drained - filled:.1f}s; tasks per partition {dict(sorted(per_partition.items()))}; "
            f"script calls per primary "
            + ", ".join(f":{port} {calls[port]} ({shares[port]:.1%})" for port in server.ports)
        )
    assert total >= 2 * TASKS  # every enqueue and ack is a script call, counted somewhere
    for port, share in shares.items():
        assert 0.25 <= share <= 0.42, (port, share)
    stats = sq.stats()
    assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)
