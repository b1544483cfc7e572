"""A sharded queue on a replicated cluster (three primaries, each with a replica) while a primary
crashes and fails over, and while slots move between primaries: workers see no exception but the
API's own answers (StaleLease), scripts are reloaded on the promoted replica (NOSCRIPT), leased
tasks come back after their lease, and what asynchronous replication lost is counted and printed.

Each test starts its own replicated cluster (``replicated`` fixture: Docker with host networking,
or local processes) and stops it at its end; they run only when ``cluster`` is selected."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from luasched import PartitionLease, Scheduler, StaleLease
from support.servers import HOST, ReplicatedCluster

pytestmark = pytest.mark.replicated_cluster

LEASE_MS = 2_000
RUN_DEADLINE_S = 45.0


def cluster_client(cluster: ReplicatedCluster) -> RedisCluster:
    """A cluster client that knows every node (any one may be the one that dies)."""
    nodes = [ClusterNode(HOST, port) for port in cluster.spec.ports]
    return RedisCluster(startup_nodes=nodes, socket_timeout=2, socket_connect_timeout=1)


def slot_owner(port: int, slot: int) -> int:
    with redis.Redis(host=HOST, port=port, socket_timeout=1) as node:
        for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1])
    raise AssertionError(f"slot {slot} not served")


def commandstats_calls(port: int, *commands: str) -> int:
    with redis.Redis(host=HOST, port=port, socket_timeout=1) as node:
        stats = node.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in commands)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Run:
    """What the workers and the producer saw: every lease, ack and exception."""

    leases: list[PartitionLease] = field(default_factory=list)
    acked: Counter[bytes] = field(default_factory=Counter)
    enqueued: set[bytes] = field(default_factory=set)
    stale: list[bytes] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def worker(cluster: ReplicatedCluster, wid: str, run: Run) -> None:
    """User code: take, ack, handle StaleLease as the API documents; any other exception is a
    failure of the wrapper (recorded, the worker stops)."""
    client = cluster_client(cluster)
    try:
        sq = Scheduler(client, "fo").sharded_queue("jobs", partitions=3)
        while not run.stop.is_set():
            lease = sq.dequeue(wid, LEASE_MS, block_ms=200)
            if lease is None:
                continue
            with run.lock:
                run.leases.append(lease)
            try:
                sq.ack(lease)
            except StaleLease:
                with run.lock:
                    run.stale.append(lease.task_id)
                continue
            with run.lock:
                run.acked[lease.task_id] += 1
    except BaseException as error:
        with run.lock:
            run.errors.append(error)
    finally:
        client.close()


def producer(cluster: ReplicatedCluster, ids: list[bytes], run: Run) -> None:
    client = cluster_client(cluster)
    try:
        sq = Scheduler(client, "fo").sharded_queue("jobs", partitions=3)
        for task_id in ids:
            sq.enqueue(task_id, b"payload")
            with run.lock:
                run.enqueued.add(task_id)
    except BaseException as error:
        with run.lock:
            run.errors.append(error)
    finally:
        client.close()


def start_threads(
    cluster: ReplicatedCluster, run: Run, workers: int, later: list[bytes]
) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=worker, args=(cluster, f"w{index}", run), daemon=True)
        for index in range(workers)
    ]
    threads.append(threading.Thread(target=producer, args=(cluster, later, run), daemon=True))
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.slow
def test_a_primary_crashes_and_its_replica_takes_over_mid_run(
    replicated: ReplicatedCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    client = cluster_client(replicated)
    s = Scheduler(client, "fo")
    sq = s.sharded_queue("jobs", partitions=3)
    slot = sq.namespaces[0].slot
    victim = slot_owner(replicated.spec.ports[0], slot)
    heir = replicated.replica_of(victim)
    survivors = [port for port in replicated.spec.ports if port not in (victim, heir)]
    run = Run()
    first = [b"t-%05d" % index for index in range(1500)]
    later = [b"t-%05d" % index for index in range(1500, 3000)]
    for task_id in first:
        sq.enqueue(task_id, b"payload")
        run.enqueued.add(task_id)
    threads = start_threads(replicated, run, 4, later)
    try:
        wait_for(lambda: sum(run.acked.values()) >= 900, 30, "a third of the run")
        # A worker that will die with the primary: it holds leases in partition 0 and never
        # acks them. Its leases reached the replica before the crash (checked there).
        abandoned = sq.partitions[0].dequeue_many("doomed", 5, LEASE_MS)
        assert len(abandoned) == 5
        leased_key = sq.partitions[0].keys.fixed[2]

        def on_replica() -> bool:
            with redis.Redis(host=HOST, port=heir, socket_timeout=1) as node:
                node.execute_command("READONLY")
                return all(node.zscore(leased_key, lease.task_id) for lease in abandoned)

        wait_for(on_replica, 5, "the abandoned leases to reach the replica")
        acked_at_kill = sum(run.acked.values())
        evalsha_before = commandstats_calls(heir, "evalsha", "eval")
        replicated.kill(victim)
        killed_at = time.monotonic()
        wait_for(lambda: replicated.roles().get(heir) == "master", 20, "the replica's promotion")
        promoted_after = time.monotonic() - killed_at
        wait_for(lambda: slot_owner(survivors[0], slot) == heir, 10, "the slot map to follow")
        # everything enqueued (and not lost) gets acked; abandoned leases come back after expiry
        abandoned_ids = {lease.task_id for lease in abandoned}

        def finished() -> bool:
            with run.lock:
                if run.errors:
                    return True
                if len(run.enqueued) < 3000 or not abandoned_ids <= set(run.acked):
                    return False
            stats = sq.stats()
            return stats.ready + stats.delayed + stats.leased == 0

        wait_for(finished, RUN_DEADLINE_S, "the run to finish")
    finally:
        run.stop.set()
        for thread in threads:
            thread.join(30)
    client.close()
    assert not any(thread.is_alive() for thread in threads)
    assert run.errors == []  # no exception reached the user code

    all_ids = set(first) | set(later)
    assert run.enqueued == all_ids
    lost = sorted(all_ids - set(run.acked))
    acked_twice = sorted(task_id for task_id, n in run.acked.items() if n > 1)
    redelivered = [lease for lease in run.leases if lease.task_id in abandoned_ids]
    with capsys.disabled():
        print(
            f"\n[failover] killed primary :{victim} after {acked_at_kill} acks; replica :{heir} "
            f"promoted after {promoted_after:.1f}s. tasks: enqueued {len(all_ids)}, acked "
            f"{len(run.acked)}, lost to async replication {len(lost)} {lost[:5]}, acked twice "
            f"{len(acked_twice)}, stale acks refused {len(run.stale)}, abandoned leases "
            f"redelivered {len({lease.task_id for lease in redelivered})}/5"
        )
    # Asynchronous replication may lose the last writes before the crash: a handful at most on
    # loopback (replication lag is well under the time between two acks).
    assert len(lost) <= 20, lost
    # The abandoned tasks came back after their lease, as new attempts with newer tokens.
    for lease in abandoned:
        again = [later for later in redelivered if later.task_id == lease.task_id]
        assert again, lease.task_id
        assert all(later.attempt >= 2 and later.token > lease.token for later in again)
    # The promoted replica ran our scripts after reloading them (NOSCRIPT -> SCRIPT LOAD).
    assert commandstats_calls(heir, "script|load") >= 1
    assert commandstats_calls(heir, "evalsha", "eval") > evalsha_before


def move_slot(ports: list[int], slot: int, source: int, target: int) -> int:
    """Migrate ``slot`` from primary ``source`` to ``target`` (IMPORTING/MIGRATING, MIGRATE in
    batches, SETSLOT NODE everywhere); returns how many keys moved."""
    src = redis.Redis(host=HOST, port=source, socket_timeout=5)
    dst = redis.Redis(host=HOST, port=target, socket_timeout=5)
    moved = 0
    try:
        source_id = src.execute_command("CLUSTER", "MYID")
        target_id = dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 40):
            src.execute_command("MIGRATE", HOST, target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(0.005)  # let calls meet the half-moved slot (ASK / TRYAGAIN)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in ports:
            if port not in (source, target):
                with redis.Redis(host=HOST, port=port, socket_timeout=5) as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    finally:
        src.close()
        dst.close()
    return moved


@pytest.mark.slow
def test_slots_move_between_primaries_while_workers_run(
    replicated: ReplicatedCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    client = cluster_client(replicated)
    sq = Scheduler(client, "fo").sharded_queue("jobs", partitions=3)
    primaries = sorted(port for port, role in replicated.roles().items() if role == "master")
    run = Run()
    first = [b"t-%05d" % index for index in range(1500)]
    later = [b"t-%05d" % index for index in range(1500, 3000)]
    for task_id in first:
        sq.enqueue(task_id, b"payload")
        run.enqueued.add(task_id)
    for port in primaries:
        with redis.Redis(host=HOST, port=port) as node:
            node.config_resetstat()
    threads = start_threads(replicated, run, 3, later)
    moves = []
    try:
        wait_for(lambda: sum(run.acked.values()) >= 300, 30, "the run to get going")
        for round_ in range(2):
            for namespace in sq.namespaces:
                slot = namespace.slot
                source = slot_owner(primaries[0], slot)
                target = primaries[(primaries.index(source) + 1) % 3]
                keys = move_slot(primaries, slot, source, target)
                moves.append((round_, slot, source, target, keys))
                wait_for(
                    lambda s=slot, t=target: all(slot_owner(p, s) == t for p in primaries),
                    10,
                    "every primary to agree on the move",
                )

        def finished() -> bool:
            with run.lock:
                if run.errors:
                    return True
                if len(run.enqueued) < 3000:
                    return False
            stats = sq.stats()
            return stats.ready + stats.delayed + stats.leased == 0

        wait_for(finished, RUN_DEADLINE_S, "the run to finish")
    finally:
        run.stop.set()
        for thread in threads:
            thread.join(30)
    assert run.errors == []
    assert not any(thread.is_alive() for thread in threads)
    all_ids = set(first) | set(later)
    # calls that met a slot on the move were refused by the server (ASK, TRYAGAIN, MOVED) and
    # sent again by redis-py or the wrapper: Redis 7.0 counts them as rejected calls
    rejected = 0
    for port in primaries:
        with redis.Redis(host=HOST, port=port) as node:
            stats = node.info("commandstats")
        rejected += sum(
            int(stats.get(f"cmdstat_{name}", {}).get("rejected_calls", 0))
            for name in ("evalsha", "eval")
        )
    with capsys.disabled():
        print(
            f"\n[resharding] {len(moves)} slot moves (keys moved per move: "
            f"{[m[4] for m in moves]}) during the run; acked {len(run.acked)} of "
            f"{len(all_ids)}, {sum(run.acked.values()) - len(run.acked)} twice, stale "
            f"{len(run.stale)}; script calls redirected or refused mid-move: {rejected}"
        )
    assert rejected > 0  # the run did meet the moving slots
    assert all(keys > 0 for *_, keys in moves)  # the queue's keys really moved
    assert set(run.acked) == all_ids and set(run.acked.values()) == {1}  # exactly once
    assert run.stale == []
    # every partition now lives on the primary after the one it started on (moved twice: +2)
    # and a new client still finds the same partitions through the recorded layout
    again = Scheduler(client, "fo").sharded_queue("jobs", partitions=3)
    assert again.namespaces == sq.namespaces
    for _, slot, _, target, _ in moves[3:]:
        assert slot_owner(primaries[0], slot) == target
    client.close()


@dataclass
class TokenLoop:
    """One client taking and giving back a lock and a queue lease in turn, in real-time order:
    every lock fence and lease token it was handed, and any exception that reached it."""

    fences: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, cluster: ReplicatedCluster) -> None:
        client = cluster_client(cluster)
        try:
            s = Scheduler(client, "fence-fo")
            lock, queue = s.lock("job", ttl_ms=LEASE_MS), s.queue("jobs")
            while not self.stop.is_set():
                handle = lock.acquire(timeout=10)
                assert handle is not None
                self.fences.append(handle.fence)
                lock.release(handle)  # "expired" if the failover lost the grant: fine
                lease = queue.dequeue("w", LEASE_MS)
                if lease is not None:
                    self.tokens.append(lease.token)
                    with contextlib.suppress(StaleLease):  # the failover lost the lease
                        queue.ack(lease)
        except BaseException as error:
            self.errors.append(error)
        finally:
            client.close()


@pytest.mark.slow
def test_fencing_tokens_keep_growing_across_a_primary_kill(replicated: ReplicatedCluster) -> None:
    """Lock fences and lease tokens handed out before and after the failover of the primary that
    holds the namespace strictly increase (docs/guarantees.md, "Fencing tokens"): the promoted
    replica may have missed the last grants, the clock rule still puts its tokens above them."""
    client = cluster_client(replicated)
    s = Scheduler(client, "fence-fo")
    queue = s.queue("jobs")
    for index in range(3000):
        queue.enqueue(f"t{index}", b"p")
    victim = slot_owner(replicated.spec.ports[0], s.namespace.slot)
    heir = replicated.replica_of(victim)
    loop = TokenLoop()
    thread = threading.Thread(target=loop.run, args=(replicated,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(loop.fences) >= 200 or bool(loop.errors), 30, "the loop to run")
        before = len(loop.fences)
        replicated.kill(victim)
        wait_for(lambda: replicated.roles().get(heir) == "master", 20, "the replica's promotion")
        wait_for(
            lambda: len(loop.fences) >= before + 200 or bool(loop.errors),
            RUN_DEADLINE_S,
            "the loop to go on after the failover",
        )
    finally:
        loop.stop.set()
        thread.join(30)
        client.close()
    assert not thread.is_alive()
    assert loop.errors == []  # no exception reached the loop
    assert len(loop.fences) >= before + 200 and len(loop.tokens) >= 2
    for handed in (loop.fences, loop.tokens):
        assert all(earlier < later for earlier, later in itertools.pairwise(handed)), handed
