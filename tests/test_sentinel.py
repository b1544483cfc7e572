"""Redis Sentinel: the test topology, ``Scheduler.from_sentinel``, failover recovery and the
durable mode (``wait_replicas``), on one primary, two replicas and three sentinels.

Each test starts its own topology (``sentinel`` fixture: Docker with host networking, or local
processes) of Redis 7.0 and of Redis 8.2, and stops it at its end; they run only when the
version's matrix server is selected.

The acceptance run (issue 19), once per version: a durable mode (``wait_replicas=2``, every
replica) and a plain one side by side, each with a producer, two workers, a lock loop and a
semaphore loop (every thread on its own Scheduler), through a ``SENTINEL FAILOVER`` and then a
kill -9 of the new primary. Durable: no acknowledged enqueue is lost and nothing but
``NotReplicated`` reaches the threads (they send the same call again, same request id). In
every mode no lock fence, permit token or lease token repeats or goes back. What each event did
in each mode is printed, with where the run's time went
(docs/ha.md's table is made of these lines)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from luasched import NotReplicated, Scheduler, StaleLease
from luasched.asyncio import Scheduler as AsyncScheduler
from luasched.lock import Lock, Semaphore
from support.servers import HOST, SENTINEL_SERVICE, SentinelTopology

pytestmark = pytest.mark.sentinel

T = TypeVar("T")
#: Long enough that no lease lapses during a run: an ack then never meets StaleLease.
LEASE_MS = 120_000
LOCK_TTL_MS = 3_000
CLIENT = {"socket_timeout": 5, "socket_connect_timeout": 2}
LUASCHED = Path(sys.executable).with_name("luasched")


def role(port: int) -> str:
    with redis.Redis(host=HOST, port=port, socket_timeout=2) as node:
        return str(node.info("replication")["role"])


def ready_on(port: int, namespace: str, queue: str) -> int:
    """How many tasks the node on ``port`` holds ready in ``queue`` (read there directly)."""
    with redis.Redis(host=HOST, port=port, socket_timeout=2) as node:
        return Scheduler(node, namespace).queue(queue).stats().ready


def test_the_topology_fails_over_and_takes_a_killed_primary_back(
    sentinel: SentinelTopology,
) -> None:
    first = sentinel.primary()
    assert first == sentinel.spec.ports[0]
    with redis.Redis(host=HOST, port=first) as node:
        node.set(b"k", b"v")
    sentinel.wait_replicas_synced()

    promoted = sentinel.failover()
    assert promoted != first and promoted in sentinel.spec.ports
    assert role(promoted) == "master"
    with redis.Redis(host=HOST, port=promoted) as node:
        assert node.get(b"k") == b"v"
    sentinel.wait_replicas_synced(timeout=40)  # the old primary is reconfigured ~10 s later

    killed, heir = sentinel.kill_primary()
    assert killed == promoted and heir != killed
    sentinel.restart(killed)
    sentinel.wait_replicas_synced()
    assert role(killed) == "slave"
    with redis.Redis(host=HOST, port=killed) as node:
        assert node.get(b"k") == b"v"


def test_from_sentinel_and_its_asyncio_twin_run_on_the_primary(sentinel: SentinelTopology) -> None:
    s = Scheduler.from_sentinel(
        sentinel.sentinels, SENTINEL_SERVICE, "ha", connection_kwargs=CLIENT, wait_replicas=2
    )
    try:
        assert s.queue("jobs").enqueue(b"t1", b"x").created is True
    finally:
        s.client.close()

    async def main() -> bool:
        a = AsyncScheduler.from_sentinel(
            sentinel.sentinels, SENTINEL_SERVICE, "ha", sentinel_kwargs={"socket_timeout": 2}
        )
        try:
            return (await a.queue("jobs").enqueue(b"t2", b"x")).created
        finally:
            await a.client.aclose()

    assert asyncio.run(main()) is True
    assert ready_on(sentinel.primary(), "ha", "jobs") == 2


def evalsha_calls(port: int) -> int:
    with redis.Redis(host=HOST, port=port, socket_timeout=2) as node:
        return int(node.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_after_a_sentinel_failover_a_durable_call_is_resent_to_the_new_primary(
    sentinel: SentinelTopology,
) -> None:
    """The old primary keeps taking writes until the sentinels demote it (~10 s), and the pool's
    connection still points there. The durable call sent there is NotReplicated (the promoted
    replica left it); the Scheduler asks the sentinels, drops that connection, and every resend
    goes to the new primary (it succeeds once the old primary has become its second replica)."""
    s = Scheduler.from_sentinel(
        sentinel.sentinels,
        SENTINEL_SERVICE,
        "ha",
        connection_kwargs=CLIENT,
        wait_replicas=2,
        wait_timeout_ms=200,
    )
    try:
        q = s.queue("jobs")
        q.enqueue(b"t0", b"x")  # the pool now holds a connection to the first primary
        old = sentinel.primary()
        new = sentinel.failover()  # every sentinel reports the new primary from here on
        before = evalsha_calls(old)
        assert q.enqueue(b"t1", b"x", request_id=b"r1").created is True
        # At most the first send (none when the old primary was demoted first: READONLY is a
        # rejected call); every resend went to `new` (before the rediscovery: 15 here).
        assert evalsha_calls(old) - before <= 1
        assert s.client.connection_pool.master_address == (HOST, new)
        sentinel.wait_replicas_synced()
        assert ready_on(new, "ha", "jobs") == 2
    finally:
        s.client.close()


def test_the_cli_reaches_the_primary_through_the_sentinels(
    sentinel: SentinelTopology, tmp_path: Path
) -> None:
    """``luasched stats``, ``install-functions`` (on the primary) and a durable ``luasched worker
    --burst``, given ``--sentinel``."""
    s = Scheduler.from_sentinel(sentinel.sentinels, SENTINEL_SERVICE, "cli", wait_replicas=2)
    try:
        for index in range(20):
            s.queue("jobs").enqueue(b"t%d" % index, b"x")
        where = ["--sentinel", ",".join(f"{h}:{p}" for h, p in sentinel.sentinels)]
        where += ["--service", SENTINEL_SERVICE]
        stats = subprocess.run(
            [str(LUASCHED), "stats", "cli", *where, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["queues"][0]["ready"] == 20
        installed = subprocess.run(
            [str(LUASCHED), "install-functions", *where],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert installed.returncode == 0, installed.stderr
        assert installed.stdout.split("\t")[0] == f"{HOST}:{sentinel.primary()}"
        (tmp_path / "handlers.py").write_text("def run(job):\n    return None\n")
        command = [str(LUASCHED), "worker", "handlers:run", "--queue", "jobs", "--namespace"]
        command += ["cli", *where, "--burst", "--wait-replicas", "2"]
        worker = subprocess.run(
            command,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert worker.returncode == 0, worker.stderr
        sentinel.wait_replicas_synced()
        for port in sentinel.spec.ports:  # the acks reached every replica
            with redis.Redis(host=HOST, port=port, socket_timeout=2) as node:
                done = Scheduler(node, "cli").queue("jobs").stats()
            assert (done.ready, done.leased) == (0, 0), port
    finally:
        s.client.close()


# ------------------------------------------------------------------------------ acceptance

#: Events of the acceptance run, in order: a planned failover, then a crash of the new primary.
EVENTS = ("sentinel-failover", "kill-9")
#: Enqueues each mode must see succeed after the replicas are back from an event.
AFTER_EVENT = 20


@dataclass
class Run:
    """What one mode's threads saw (on one namespace), each with when they saw it."""

    mode: str
    enqueued: dict[bytes, float] = field(default_factory=dict)  # task id -> when acknowledged
    acked: Counter[bytes] = field(default_factory=Counter)
    fences: list[tuple[float, int]] = field(default_factory=list)
    permits: list[tuple[float, int]] = field(default_factory=list)
    tokens: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    not_replicated: list[tuple[float, str]] = field(default_factory=list)
    stale: list[float] = field(default_factory=list)
    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_producing: threading.Event = field(default_factory=threading.Event)
    produced: threading.Event = field(default_factory=threading.Event)  # the producer is done
    idle: set[str] = field(default_factory=set)  # workers that found nothing once it was
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def durable(self) -> bool:
        return self.mode == "durable"

    def note(self, values: list[tuple[float, T]], value: T) -> None:
        with self.lock:
            values.append((time.monotonic(), value))

    def acked_count(self) -> int:
        with self.lock:
            return sum(self.acked.values())

    def all_acked(self) -> bool:
        with self.lock:
            return set(self.acked) >= set(self.enqueued)

    def enqueued_since(self, since: float) -> int:
        with self.lock:
            return sum(1 for when in self.enqueued.values() if when > since)


def again(run: Run, who: str, send: Callable[[], T]) -> T:
    """``send()`` until it returns: NotReplicated (counted) means "send the same call again"."""
    while True:
        try:
            return send()
        except NotReplicated:
            run.note(run.not_replicated, who)
            if run.stop.is_set():
                raise


def scheduler(topology: SentinelTopology, run: Run) -> Scheduler:
    options: dict[str, Any] = {"wait_replicas": 2, "wait_timeout_ms": 500} if run.durable else {}
    return Scheduler.from_sentinel(
        topology.sentinels,
        SENTINEL_SERVICE,
        f"acc-{run.mode}",
        connection_kwargs=CLIENT,
        **options,
    )


def thread(run: Run, who: str, body: Callable[[], None]) -> threading.Thread:
    def guarded() -> None:
        try:
            body()
        except BaseException as error:
            with run.lock:
                run.errors.append((who, error))

    return threading.Thread(target=guarded, name=f"{run.mode}-{who}", daemon=True)


def producer(run: Run, s: Scheduler) -> None:
    q = s.queue("jobs")
    index = 0
    try:
        while not run.stop_producing.is_set():
            task_id = b"t-%06d" % index
            again(run, "producer", lambda t=task_id: q.enqueue(t, b"x", request_id=b"e" + t))
            with run.lock:
                run.enqueued[task_id] = time.monotonic()
            index += 1
            time.sleep(0.002)
    finally:
        run.produced.set()


def worker(run: Run, s: Scheduler, wid: str) -> None:
    q = s.queue("jobs")
    tokens = run.tokens.setdefault(wid, [])
    rounds = 0
    while not run.stop.is_set():
        rounds += 1
        rid = f"{wid}-{rounds}".encode()
        after_the_last_enqueue = run.produced.is_set()
        leases = again(
            run, wid, lambda r=rid: q.dequeue_many(wid, 10, LEASE_MS, block_ms=100, request_id=r)
        )
        if not leases and after_the_last_enqueue:  # it acked all it took before this round
            with run.lock:
                run.idle.add(wid)
        for lease in leases:
            run.note(tokens, lease.token)
            try:
                again(run, wid, lambda ls=lease: q.ack(ls, request_id=b"a%d" % ls.token))
            except StaleLease:  # plain mode: the lease was on writes a failover discarded
                with run.lock:
                    run.stale.append(time.monotonic())
                continue
            with run.lock:
                run.acked[lease.task_id] += 1


def hold_loop(run: Run, who: str, hold: Lock | Semaphore, issued: list[tuple[float, int]]) -> None:
    """Acquire, note the fencing token, release; a lock's fence, a semaphore permit's token."""
    while not run.stop.is_set():
        try:
            handle = hold.acquire(timeout=10)
        except NotReplicated:  # a grant may hold it unknown to us: it lapses after its TTL
            run.note(run.not_replicated, who)
            continue
        if handle is None:
            continue
        run.note(issued, handle.fence)
        try:
            hold.release(handle)
        except NotReplicated:
            run.note(run.not_replicated, who)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def out_of_order(values: list[int]) -> list[tuple[int, int]]:
    """The pairs in which a value repeats or goes below the one received before it."""
    return [(a, b) for a, b in itertools.pairwise(values) if b <= a]


def assert_issued_in_order(name: str, issued: list[tuple[float, int]]) -> None:
    """Strictly increasing: no value repeats or goes below one received before it."""
    backwards = out_of_order([value for _, value in issued])
    assert not backwards, f"{name}: {len(backwards)} went back or repeated, e.g. {backwards[:5]}"


def enqueues_kept(port: int, run: Run) -> int:
    """How many enqueues the history of the node on ``port`` holds for the mode's queue: the
    tasks hash's ``seq`` (docs/queue.md), one per task made ready; no lease lapses, no task is
    delayed or nacked in the run, so nothing else moves it."""
    with redis.Redis(host=HOST, port=port, socket_timeout=2) as node:
        tasks_key = Scheduler(node, f"acc-{run.mode}").queue("jobs").keys.fixed[4]
        return int(node.hget(tasks_key, "seq") or 0)


def report(server: str, event: str, run: Run, window: tuple[float, float], started: float) -> None:
    """The summary line of one event in one mode (docs/ha.md's table is made of these):
    what was acknowledged, lost, repeated and raised from ``window[0]`` to ``window[1]``."""
    begin, end = window

    def inside(when: float) -> bool:
        return begin <= when < end

    enqueued = {task for task, when in run.enqueued.items() if inside(when)}
    lost = enqueued - set(run.acked)
    twice = [task for task in enqueued if run.acked[task] > 1]
    series = [run.fences, run.permits, *run.tokens.values()]
    repeated = sum(len(out_of_order([v for w, v in s if inside(w)])) for s in series)
    not_replicated = Counter(who for when, who in run.not_replicated if inside(when))
    stale = sum(1 for when in run.stale if inside(when))
    times = [started, *sorted(w for w in run.enqueued.values() if started < w < end)]
    stalled = max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else end - started
    print(
        f"\n[sentinel {server} {event} {run.mode}] enqueued {len(enqueued)}, "
        f"acked-enqueues lost {len(lost)}, acked twice {len(twice)}, tokens/fences/permits "
        f"repeated or back {repeated}, NotReplicated {sum(not_replicated.values())} "
        f"{dict(not_replicated)}, StaleLease {stale}, other errors {len(run.errors)}, "
        f"longest time without a successful enqueue from the event on {stalled:.1f}s"
    )


@pytest.mark.slow
def test_acceptance_a_producer_two_workers_a_lock_and_a_semaphore_ride_out_two_failovers(
    sentinel: SentinelTopology,
) -> None:
    """Issue 19's acceptance in one run per server: a durable mode (``wait_replicas=2``) and a
    plain one, each on its own namespace with a producer, two workers, a lock loop and a
    semaphore loop (each thread on its own Scheduler), run side by side through a
    ``SENTINEL FAILOVER`` and then, once both modes' calls succeed again, a kill -9 of the new
    primary (restarted empty and made a replica, as a supervisor would).

    Over the whole run: durable, no acknowledged enqueue lost (each acked by a worker, and the
    final primary's history counts every one of them) or acked twice, and nothing but
    ``NotReplicated`` (counted) reaching the threads; plain, no exception but the ``StaleLease``
    of an ack on discarded writes; both, no lock fence, permit token or lease token repeats or
    goes below one received before it."""
    timings: dict[str, float] = {}
    began = time.monotonic()
    runs = [Run("durable"), Run("plain")]
    schedulers: list[Scheduler] = []
    threads: list[threading.Thread] = []

    for run in runs:
        own = [scheduler(sentinel, run) for _ in range(5)]
        schedulers += own
        lock = own[3].lock("L", ttl_ms=LOCK_TTL_MS)
        semaphore = own[4].semaphore("S", 2, ttl_ms=LOCK_TTL_MS)
        threads += [
            thread(run, "producer", partial(producer, run, own[0])),
            thread(run, "w1", partial(worker, run, own[1], "w1")),
            thread(run, "w2", partial(worker, run, own[2], "w2")),
            thread(run, "lock", partial(hold_loop, run, "lock", lock, run.fences)),
            thread(run, "semaphore", partial(hold_loop, run, "semaphore", semaphore, run.permits)),
        ]
    for t in threads:
        t.start()
    starts: list[float] = []
    try:
        wait_for(
            lambda: all(r.acked_count() >= 100 and r.fences and r.permits for r in runs),
            30,
            "100 acks, a fence and a permit in each mode before the first event",
        )
        timings["warm-up"] = time.monotonic() - began
        for event in EVENTS:
            starts.append(time.monotonic())
            if event == "sentinel-failover":
                sentinel.failover()
            else:
                killed, _ = sentinel.kill_primary()
                sentinel.restart(killed)
            timings[f"{event}: promoted"] = time.monotonic() - starts[-1]
            # The event is over when the old primary is a replica of the new one (failover:
            # ~10 s after the promotion) or the killed one is back as a replica.
            sentinel.wait_replicas_synced(timeout=40)
            settled = time.monotonic()
            timings[f"{event}: replicas synced"] = settled - starts[-1]
            wait_for(
                lambda since=settled: all(
                    r.enqueued_since(since) >= AFTER_EVENT
                    and any(w > since for w, _ in r.fences)
                    and any(w > since for w, _ in r.permits)
                    for r in runs
                ),
                30,
                f"{AFTER_EVENT} enqueues, a fence and a permit in each mode after the {event}",
            )
            timings[f"{event}: calls succeed again"] = time.monotonic() - starts[-1]
        for run in runs:
            run.stop_producing.set()
        drain = time.monotonic()
        # Durable: every enqueue is acked. Plain: what a failover discarded never comes (and a
        # lease a discarded ack left stays): both workers found nothing once the producer was
        # done, so they acked whatever they took.
        wait_for(runs[0].all_acked, 30, "every durable enqueue acked")
        wait_for(lambda: runs[1].idle == set(runs[1].tokens), 30, "the plain workers to idle")
        timings["drain"] = time.monotonic() - drain
    finally:
        for run in runs:
            run.stop_producing.set()
            run.stop.set()
        for t in threads:
            t.join(30)
        for s in schedulers:
            s.client.close()
    ended = time.monotonic()
    bounds = [0.0, *starts[1:], ended]
    for index, event in enumerate(EVENTS):
        for run in runs:
            report(
                sentinel.spec.server, event, run, (bounds[index], bounds[index + 1]), starts[index]
            )
    # What the surviving history holds: an enqueue discarded with a primary counts here even
    # when a worker took and acked it there before it was discarded.
    primary = sentinel.primary()
    kept = {run.mode: enqueues_kept(primary, run) for run in runs}
    print(
        f"[sentinel {sentinel.spec.server} kept] enqueues the final primary holds: "
        + ", ".join(f"{run.mode} {kept[run.mode]} of {len(run.enqueued)}" for run in runs)
    )
    print(
        f"[sentinel {sentinel.spec.server} timings] "
        + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
        + f", run {ended - began:.1f}s"
    )
    assert all(not t.is_alive() for t in threads)
    for run in runs:
        assert not run.errors, (run.mode, run.errors[:3])
        if run.durable:
            assert not run.stale, "a durable ack met StaleLease"
            lost = set(run.enqueued) - set(run.acked)
            assert not lost, f"{len(lost)} acknowledged enqueues lost, e.g. {sorted(lost)[:5]}"
            twice = sorted(task for task, n in run.acked.items() if n > 1)
            assert not twice, twice[:5]
            assert kept[run.mode] >= len(run.enqueued), "acknowledged enqueues were discarded"
    # Every mode: fencing tokens never repeat or go back, per client and over all clients.
    for run in runs:
        assert_issued_in_order(f"{run.mode}: lock fences", run.fences)
        assert_issued_in_order(f"{run.mode}: permit tokens", run.permits)
        for wid, tokens in run.tokens.items():
            assert_issued_in_order(f"{run.mode}: lease tokens of {wid}", tokens)
        every = [token for tokens in run.tokens.values() for _, token in tokens]
        assert len(set(every)) == len(every), f"{run.mode}: a lease token was issued twice"
