"""Sharded queues (luasched.sharded): placement on different primaries, a recorded layout,
routing by key, consumers that rotate over the partitions, leases that remember their partition,
the asyncio twin, and the bounded retry on a server that goes away and comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from luasched import InvalidArgument, PartitionLease, RetryPolicy, Scheduler, StaleLease
from luasched.asyncio import Scheduler as AsyncScheduler
from luasched.keys import Namespace
from luasched.queue import Lease
from luasched.testing import ThrowawayServer, find_server_binary
from support.helpers import snapshot_ignoring_ttl
from support.servers import ROOT, ServerHandle

Client = Any


def owner_port_of_slot(server: ServerHandle, slot: int) -> int:
    """The primary serving ``slot``, as the server says (CLUSTER SLOTS, raw)."""
    with redis.Redis(host=server.host, port=server.port) as node:
        for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1])
    raise AssertionError(f"slot {slot} is not served")


def server_slot(server: ServerHandle, key: bytes) -> int:
    with redis.Redis(host=server.host, port=server.port) as node:
        return int(node.execute_command("CLUSTER", "KEYSLOT", key))


def keys_for_partitions(sq: Any, per_partition: int) -> list[list[bytes]]:
    """``per_partition`` routing keys for each partition (found by trying, any will do)."""
    found: list[list[bytes]] = [[] for _ in sq.partitions]
    index = 0
    while min(len(keys) for keys in found) < per_partition:
        key = b"key-%d" % index
        bucket = found[sq.partition_of(key)]
        if len(bucket) < per_partition:
            bucket.append(key)
        index += 1
    return found


def test_partitions_are_placed_on_different_primaries(server: ServerHandle, r: Client) -> None:
    sq = Scheduler(r, "shop").sharded_queue("jobs", partitions=3)
    names = [ns.name for ns in sq.namespaces]
    assert len(set(names)) == 3
    assert all(name.startswith(b"shop~") for name in names)
    if server.is_cluster:
        owners = {
            owner_port_of_slot(server, server_slot(server, ns.prefix)) for ns in sq.namespaces
        }
        assert owners == set(server.ports)  # one partition on each of the three primaries
    else:
        assert names == [b"shop~0", b"shop~1", b"shop~2"]
    # k > primaries: still spread, round robin over the primaries
    wide = Scheduler(r, "wide").sharded_queue("jobs", partitions=6)
    if server.is_cluster:
        per_owner = Counter(
            owner_port_of_slot(server, server_slot(server, ns.prefix)) for ns in wide.namespaces
        )
        assert sorted(per_owner.values()) == [2, 2, 2]
    assert len({ns.name for ns in wide.namespaces}) == 6


def test_the_layout_is_recorded_and_every_client_uses_it(server: ServerHandle, r: Client) -> None:
    first = Scheduler(r, "shop").sharded_queue("jobs", partitions=3)
    record = r.get(b"luasched:{shop}:sq:jobs")
    assert record is not None and record.startswith(b"luasched-sharded-v1 ")
    other_client = server.client()
    try:
        second = Scheduler(other_client, "shop").sharded_queue("jobs", partitions=3)
        assert second.namespaces == first.namespaces
        with pytest.raises(ValueError, match="has 3 partitions, not 4"):
            Scheduler(other_client, "shop").sharded_queue("jobs", partitions=4)
        # The recorded layout wins over a fresh plan: an edited record is what clients use.
        r.set(b"luasched:{shop}:sq:jobs", b"luasched-sharded-v1 7,8,9")
        edited = Scheduler(other_client, "shop").sharded_queue("jobs", partitions=3)
        assert [ns.name for ns in edited.namespaces] == [b"shop~7", b"shop~8", b"shop~9"]
        # Same layout, same plan: without the record a new client chooses the same tags.
        r.delete(b"luasched:{shop}:sq:jobs")
        again = Scheduler(other_client, "shop").sharded_queue("jobs", partitions=3)
        assert again.namespaces == first.namespaces
    finally:
        other_client.close()


def test_producers_route_by_key_and_spread_evenly(server: ServerHandle, r: Client) -> None:
    sq = Scheduler(r, "shop").sharded_queue("jobs", partitions=3)
    for index in range(600):
        assert sq.enqueue(b"t-%d" % index, b"x").created
    counts = [queue.stats().ready for queue in sq.partitions]  # read on each partition
    assert sum(counts) == 600
    assert all(120 <= count <= 280 for count in counts), counts
    # same routing key -> same partition, whatever the task id
    for index in range(30):
        sq.enqueue(b"order-%d" % index, b"y", routing_key=b"customer-42")
    home = sq.partition_of(b"customer-42")
    after = [queue.stats().ready for queue in sq.partitions]
    assert after[home] == counts[home] + 30
    assert [a - c for a, c in zip(after, counts, strict=True)].count(0) == 2
    # idempotent by task id: the default routing key is the task id, so a replay hits home
    assert not sq.enqueue(b"t-1", b"x").created


def test_consumers_rotate_and_no_partition_starves(server: ServerHandle, r: Client) -> None:
    sq = Scheduler(r, "shop").sharded_queue("jobs", partitions=3)
    keys = keys_for_partitions(sq, 1)
    heavy, light = 60, 3
    for partition, (key,) in enumerate(keys):
        for index in range(heavy if partition == 0 else light):
            sq.enqueue(b"p%d-%d" % (partition, index), b"", routing_key=key)
    served = []
    for _ in range(9):
        lease = sq.dequeue("w", 10_000)
        assert lease is not None
        served.append(lease.partition)
        assert lease.task_id.startswith(b"p%d-" % lease.partition)
        assert sq.ack(lease)
    assert Counter(served) == {0: 3, 1: 3, 2: 3}  # round robin, the busy partition waits its turn
    assert all(served[i] != served[i + 1] for i in range(8))
    # light partitions are empty now: the rotation skips them, the heavy one keeps serving
    rest = [sq.dequeue("w", 10_000) for _ in range(5)]
    assert all(lease is not None and lease.partition == 0 for lease in rest)
    # a batch fills from the next partitions when the first has too few
    for partition in (1, 2):
        sq.enqueue(b"late-%d" % partition, b"", routing_key=keys[partition][0])
    batcher = next(b"b%d" % i for i in range(100) if sq.rotation.order(b"b%d" % i)[0] == 1)
    batch = sq.dequeue_many(batcher, 10, 10_000)
    assert [lease.partition for lease in batch] == [1, 2] + [0] * 8


def test_a_lease_remembers_its_partition(server: ServerHandle, r: Client) -> None:
    sq = Scheduler(r, "shop").sharded_queue("jobs", partitions=3, backoff_base_ms=1)
    keys = keys_for_partitions(sq, 1)
    for partition in range(3):
        sq.enqueue(b"t%d" % partition, b"payload", routing_key=keys[partition][0])
    leases = [sq.dequeue("w", 5_000) for _ in range(3)]
    assert sorted(lease.partition for lease in leases if lease) == [0, 1, 2]
    by_partition = {lease.partition: lease for lease in leases if lease}
    assert sq.extend(by_partition[0], 60_000) > by_partition[0].deadline_ms
    assert sq.nack(by_partition[1], delay_ms=0).state == "ready"
    assert sq.ack(by_partition[2])
    stats = sq.stats()
    assert [(s.ready, s.leased) for s in stats.partitions] == [(0, 1), (1, 0), (0, 0)]
    # the same task under the wrong partition is not held there: refused, nothing changes
    forged = PartitionLease.of(by_partition[0], 2)
    before = snapshot_ignoring_ttl(r, sq.namespaces[2])
    with pytest.raises(InvalidArgument, match="lease was taken from another queue"):
        sq.ack(forged)
    assert snapshot_ignoring_ttl(r, sq.namespaces[2]) == before
    plain = Lease(b"t0", b"", 1, by_partition[0].token, 0)
    with pytest.raises(InvalidArgument, match="lease must be a PartitionLease"):
        sq.ack(plain)
    nxt = sq.ack_and_dequeue(by_partition[0], "w", 5_000)
    assert nxt is not None and nxt.partition == 1 and nxt.attempt == 2
    assert sq.ack(nxt)
    assert (sq.stats().ready, sq.stats().leased) == (0, 0)


def test_a_blocking_dequeue_wakes_for_any_partition(server: ServerHandle, r: Client) -> None:
    sq = Scheduler(r, "shop").sharded_queue("jobs", partitions=3)
    keys = keys_for_partitions(sq, 1)
    for partition in range(3):
        # start each try at another partition than the one that will receive the task
        producer_client = server.client()
        producer = Scheduler(producer_client, "shop").sharded_queue("jobs", partitions=3)
        target = (sq.rotation.order("sleeper")[0] + 2) % 3

        def later(q: Any = producer, key: bytes = keys[target][0], n: int = partition) -> None:
            time.sleep(0.3)
            q.enqueue(b"wake-%d" % n, b"", routing_key=key)

        thread = threading.Thread(target=later)
        started = time.monotonic()
        thread.start()
        lease = sq.dequeue("sleeper", 5_000, block_ms=5_000)
        waited = time.monotonic() - started
        thread.join()
        producer_client.close()
        assert lease is not None and lease.task_id == b"wake-%d" % partition
        assert lease.partition == target
        # woken by the enqueue at +0.3 s, not by the end of the 5 s block (a bound a loaded
        # machine keeps: only a missed wake-up waits that long)
        assert 0.25 <= waited < 4.0, waited
        sq.ack(lease)
    started = time.monotonic()
    assert sq.dequeue("sleeper", 5_000, block_ms=500) is None
    assert 0.45 <= time.monotonic() - started < 2.0


def test_the_asyncio_twin(server: ServerHandle, r: Client) -> None:
    sync_sq = Scheduler(r, "shop").sharded_queue("jobs", partitions=3)

    async def scenario() -> list[Any]:
        client = server.async_client()
        try:
            sq = await AsyncScheduler(client, "shop").sharded_queue("jobs", partitions=3)
            assert sq.namespaces == sync_sq.namespaces
            for index in range(30):
                assert (await sq.enqueue(b"a-%d" % index, b"p")).created
            got = []
            while (lease := await sq.dequeue("aw", 5_000)) is not None:
                got.append(lease)
                assert await sq.ack(lease)
            batch_ids = [b"b-%d" % index for index in range(6)]
            for task_id in batch_ids:
                await sq.enqueue(task_id)
            batch = await sq.dequeue_many("aw", 10, 5_000, block_ms=100)
            for lease in batch:
                await sq.extend(lease, 5_000)
                await sq.nack(lease, delay_ms=0)
            chained = await sq.dequeue("aw", 5_000)
            assert chained is not None
            while chained is not None:
                got.append(chained)
                chained = await sq.ack_and_dequeue(chained, "aw", 5_000)
            stats = await sq.stats()
            assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)
            return got
        finally:
            await client.aclose()

    got = asyncio.run(scenario())
    assert sorted(lease.task_id for lease in got) == sorted(
        [b"a-%d" % i for i in range(30)] + [b"b-%d" % i for i in range(6)]
    )
    assert {lease.partition for lease in got} == {0, 1, 2}


@pytest.mark.parametrize("policy_budget_ms", [3_000])
def test_retry_rides_out_a_server_that_goes_away_and_comes_back(policy_budget_ms: int) -> None:
    """A plain server is killed and started again 0.6 s later on the same port: the call made
    meanwhile is sent again (with backoff) and succeeds. Against a server that stays away the
    retry is bounded by its budget; a script error is never sent twice. redis-py's own
    connection retries are off here, so every retry seen is the wrapper's."""
    with ThrowawayServer(find_server_binary(ROOT)) as throwaway:
        client = throwaway.client(socket_timeout=1, retry=Retry(NoBackoff(), 0))
        policy = RetryPolicy(base_ms=20, max_ms=200, budget_ms=policy_budget_ms)
        s = Scheduler(client, "retry", retry=policy)
        q = s.queue("jobs")
        q.enqueue("before", b"")
        assert throwaway.process is not None
        os.kill(throwaway.process.pid, signal.SIGKILL)
        throwaway.process.wait()

        outcome: dict[str, Any] = {}

        def call_meanwhile() -> None:
            started = time.monotonic()
            try:
                outcome["result"] = q.enqueue("during", b"")
            except Exception as error:  # reported by the assertions below
                outcome["error"] = error
            outcome["elapsed"] = time.monotonic() - started

        # The caller runs in a thread: the server must be started by the main thread (it
        # gets SIGKILL when the thread that started it ends: PR_SET_PDEATHSIG).
        thread = threading.Thread(target=call_meanwhile)
        thread.start()
        time.sleep(0.6)
        assert throwaway._launch()  # same port, empty data (no persistence)
        thread.join(10)
        assert "error" not in outcome, outcome
        assert outcome["result"].created  # the server was down when this was first sent
        elapsed = outcome["elapsed"]
        assert elapsed >= 0.5, elapsed  # it waited for the server (the join above bounds it)
        assert q.stats().ready == 1  # "before" died with the process; "during" arrived once
        # NOSCRIPT after the restart was handled too (the scripts were gone with the process)
        assert int(client.info("commandstats")["cmdstat_script|load"]["calls"]) >= 1

        # a script error is an answer, not a transient failure: sent once, raised at once
        lease = q.dequeue("w", 1_000)
        assert lease is not None and q.ack(lease)
        client.config_resetstat()
        with pytest.raises(StaleLease):
            q.ack(lease)
        assert int(client.info("commandstats")["cmdstat_evalsha"]["calls"]) == 1

        os.kill(throwaway.process.pid, signal.SIGKILL)
        throwaway.process.wait()
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            q.stats()
        elapsed = time.monotonic() - started
        # a refused connection fails in about a millisecond: the time is the policy's sleeps,
        # 20, 40, 80, 160, then 200 ms each, stopped before the next would pass 3 s
        # (the upper bound only tells "gave up" from "kept retrying": slack for a loaded machine)
        assert policy_budget_ms / 1000 - 0.4 <= elapsed <= policy_budget_ms / 1000 + 2.0, elapsed
        client.close()


def test_retry_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_ms=100, max_ms=10)
    policy = RetryPolicy(base_ms=10, max_ms=80)
    assert [policy.pause_s(n) for n in range(1, 6)] == [0.01, 0.02, 0.04, 0.08, 0.08]


def test_namespace_of_a_partition_is_a_valid_namespace() -> None:
    from luasched.sharded import partition_namespace, plan_layout

    base = Namespace("n" * 120)
    assert partition_namespace(base, 12345).name == b"n" * 120 + b"~12345"
    with pytest.raises(ValueError):
        partition_namespace(Namespace("n" * 127), 12)  # over 128 bytes
    assert plan_layout(base, 4, None) == (0, 1, 2, 3)
    with pytest.raises(ValueError):
        plan_layout(base, 0, None)
