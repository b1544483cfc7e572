"""luasched demo: tasks dispatched to nodes, workers per node, one killed mid-lease.

Run with `make demo` (under ~30 s). Without REDIS_URL it starts redis-server (or valkey-server)
from the PATH or from .tools/servers on a free 127.0.0.1 port, with no persistence, and stops it
at the end (luasched.testing.ThrowawayServer). With REDIS_URL it uses that server, in a
namespace of its own (``demo-<random>``) whose keys it deletes at the end.

What happens:

1. Four nodes register with different weights and capacities, and take their share of the slot
   table (``s.slots.rebalance``).
2. The main process dispatches 3,000 tasks with the five strategies in turn (slot owner of a
   routing key, least loaded, two choices, weighted, round robin), in pipelines; ``dispatch``
   charges the chosen node's load in the same script. Capacity-aware strategies that find every
   node full (AllNodesFull) are retried a moment later.
3. One worker process per node runs a ``luasched.Worker`` on its node's queue
   (``q.for_node(node)``): it joins and heartbeats the node, leases batches, runs the handler
   ("works": sleeps) and acks each task, which gives the load back; SIGTERM drains it.
4. Midway, node-c's worker is killed with SIGKILL in the middle of a task: it dies holding
   leases, and its node's heartbeat stops. The leases expire (an expired lease is a failed
   attempt: reclaimed into node-c's queue); the node's deadline lapses; this process sweeps it
   (``s.nodes.sweep``, which also hands its slots to the others) and moves its tasks to live
   nodes (``q.redispatch``), where they are delivered again with attempt 2. (That step moves
   into the scripts live workers already call, bounded, once they heal dead nodes themselves.)
5. The summary checks that every task was acknowledged exactly once.

The display refreshes in place on a terminal, and prints a line per second otherwise.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import redis

import luasched
from luasched import Scheduler
from luasched.dispatch import STRATEGIES, DispatchStats
from luasched.errors import AllNodesFull, NoNode
from luasched.testing import ThrowawayServer, find_server_binary

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "renders"
TOTAL_TASKS = 3000
LEASE_MS = 1000
NODE_TTL_MS = 1500
HEARTBEAT_S = 0.3
WORK_S = 0.004  # per unit of cost
BATCH = 10
VICTIM = "node-c"
KILL_AT_DONE = TOTAL_TASKS // 3
TIME_LIMIT_S = 60.0
QUEUED_LIMIT = 400


@dataclass(frozen=True)
class NodeSpec:
    name: str
    weight: int
    capacity: int


NODES = (
    NodeSpec("node-a", 1, 150),
    NodeSpec("node-b", 2, 300),
    NodeSpec("node-c", 3, 450),
    NodeSpec("node-d", 2, 300),
)


@contextlib.contextmanager
def connection() -> Iterator[tuple[str, str]]:
    """(URL of the server, namespace): REDIS_URL in a fresh namespace, or a throwaway server."""
    url = os.environ.get("REDIS_URL")
    if url:
        namespace = "demo-" + secrets.token_hex(4)
        print(f"using REDIS_URL={url}, namespace {namespace} (deleted at the end)")
        try:
            yield url, namespace
        finally:
            client = redis.Redis.from_url(url)
            prefix = b"luasched:{" + namespace.encode() + b"}:"
            keys = list(client.scan_iter(match=prefix + b"*", count=1000))
            for first in range(0, len(keys), 500):
                client.delete(*keys[first : first + 500])
            client.close()
        return
    with ThrowawayServer(find_server_binary(ROOT)) as server:
        print(f"started {server.binary} on 127.0.0.1:{server.port} (stopped at the end)")
        yield f"redis://127.0.0.1:{server.port}/0", "demo"


# --------------------------------------------------------------------------------------------
# A worker process: one per node


def worker(
    url: str,
    namespace: str,
    node: NodeSpec,
    acked: Synchronized[int],
    redelivered: Synchronized[int],
    die: Any,
) -> None:
    """A ``luasched.Worker`` on ``node``'s queue: it heartbeats the node, leases batches, runs
    ``work`` and acks; SIGTERM drains it. On ``die`` it SIGKILLs itself while it holds leases
    (from its status hook: between two turns of its loop, so never between an ack and the
    record of it)."""
    client = redis.Redis.from_url(url)
    s = Scheduler(client, namespace)
    done_key = s.namespace.key("demo", "done")

    def work(job: luasched.Job) -> None:
        if job.attempt > 1:
            with redelivered.get_lock():
                redelivered.value += 1
        time.sleep(WORK_S * int(job.payload.split(b":")[1]))

    def finished(job: luasched.Job) -> None:
        # After the ack: a record per acknowledged task (a set: a second ack would not grow it,
        # the summary compares its size with the number of acks).
        client.sadd(done_key, job.task_id)
        with acked.get_lock():
            acked.value += 1

    def crash(stats: luasched.WorkerStats) -> None:
        if die.is_set() and stats.in_flight:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-lease: its leases are never finished

    luasched.Worker(
        s.queue(QUEUE).for_node(node.name),
        work,
        batch=BATCH,
        lease_ms=LEASE_MS,
        node_ttl_ms=NODE_TTL_MS,
        worker_id=f"{node.name}/pid{os.getpid()}",
        on_success=finished,
        status=crash,
        status_interval_s=0.01,
    ).run(signals=True)


# --------------------------------------------------------------------------------------------
# The display


class Display:
    """A refreshing table on a terminal; one line per second otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.lines = 0
        self.last_line = 0.0

    def show(self, rows: list[str], line: str) -> None:
        if self.tty:
            if self.lines:
                sys.stdout.write(f"\x1b[{self.lines}F")
            for row in rows:
                sys.stdout.write("\x1b[2K" + row + "\n")
            sys.stdout.flush()
            self.lines = len(rows)
        elif time.monotonic() - self.last_line >= 1.0:
            self.last_line = time.monotonic()
            print(line, flush=True)


def frame(
    s: Scheduler,
    stats: DispatchStats,
    started: float,
    dispatched: int,
    acked: int,
    redelivered: int,
    moved: int,
) -> tuple[list[str], str]:
    listing = {info.node_id: info for info in s.nodes.list()}
    rows = [
        f"  {'node':<8} {'weight':>6} {'cap':>5} {'state':<7} {'load':>5} "
        f"{'ready':>6} {'leased':>6}  slots",
    ]
    parts = []
    for spec in NODES:
        counts = stats.nodes[spec.name.encode()]
        info = listing.get(spec.name.encode())
        state = "swept" if info is None else ("live" if info.live else "DEAD")
        load = "-" if counts.load is None else str(counts.load)
        slots = 0 if info is None else info.slots
        rows.append(
            f"  {spec.name:<8} {spec.weight:>6} {spec.capacity:>5} {state:<7} {load:>5} "
            f"{counts.ready:>6} {counts.assigned:>6}  {slots}"
        )
        parts.append(f"{spec.name[-1]}:{state[0]}/{load}/{counts.ready}")
    elapsed = time.monotonic() - started
    totals = (
        f"  t={elapsed:4.1f}s dispatched {dispatched}/{TOTAL_TASKS}  ready {stats.ready}  "
        f"leased {stats.leased}  acked {acked}  redelivered {redelivered}  redispatched {moved}"
    )
    rows.append(totals)
    line = f"t={elapsed:4.1f}s acked={acked} ready={stats.ready} leased={stats.leased} " + (
        " ".join(parts)
    )
    return rows, line


# --------------------------------------------------------------------------------------------
# The run


def dispatch_some(s: Scheduler, pending: list[tuple[str, str, int]], budget: int) -> int:
    """Dispatch up to ``budget`` pending tasks in one pipeline; those refused because every node
    is full (AllNodesFull) or the routing key's slot owner just died (NoNode, until the
    supervisor's sweep hands its slots over) stay pending. Returns how many were dispatched."""
    batch, rest = pending[:budget], pending[budget:]
    with s.pipeline() as pipe:
        queued = pipe.queue(QUEUE)
        for task_id, strategy, cost in batch:
            queued.dispatch(
                task_id,
                f"{task_id}:{cost}",
                strategy=strategy,  # type: ignore[arg-type]
                routing_key=f"customer:{task_id[-3:]}",
                cost=cost,
            )
        results = pipe.execute(raise_on_error=False)
    retry = []
    for task, result in zip(batch, results, strict=True):
        if isinstance(result, (AllNodesFull, NoNode)):
            retry.append(task)
        elif isinstance(result, Exception):
            raise result
    pending[:] = retry + rest
    return len(batch) - len(retry)


def supervise(s: Scheduler) -> int:
    """Sweep dead nodes and move their tasks to live ones; how many tasks moved. (Until the
    scripts that live workers call heal dead nodes themselves, bounded, this process does it.)"""
    q = s.queue(QUEUE)
    moved = 0
    swept = s.nodes.sweep()
    for node in swept.removed:
        while True:
            step = q.redispatch(node)
            moved += step.moved
            if not step.more:
                break
    return moved


def main() -> int:
    with connection() as (url, namespace):
        client = redis.Redis.from_url(url)
        info = client.info("server")
        product = info.get("server_name", "redis")
        version = info.get("valkey_version", info["redis_version"])
        print(f"server: {product} {version}; luasched {luasched.__version__}")
        s = Scheduler(client, namespace, rng=random.Random(2026))
        print(f"loaded {len(s.load_scripts())} scripts (SCRIPT LOAD once, then EVALSHA)")
        for spec in NODES:
            s.nodes.register(
                spec.name, weight=spec.weight, capacity=spec.capacity, ttl_ms=NODE_TTL_MS
            )
        s.slots.rebalance()
        print(
            f"{len(NODES)} nodes, {TOTAL_TASKS} tasks ({', '.join(STRATEGIES)} in turn), "
            f"{len(NODES)} worker processes; {VICTIM}'s worker gets SIGKILL midway\n"
        )

        context = multiprocessing.get_context("fork")
        acked = context.Value("q", 0)
        redelivered = context.Value("q", 0)
        dies = {spec.name: context.Event() for spec in NODES}
        workers = {
            spec.name: context.Process(
                target=worker,
                args=(url, namespace, spec, acked, redelivered, dies[spec.name]),
                daemon=True,
            )
            for spec in NODES
        }
        rng = random.Random(7)
        pending = [
            (f"task-{number:04d}", STRATEGIES[number % len(STRATEGIES)], rng.choice((1, 1, 2, 3)))
            for number in range(TOTAL_TASKS)
        ]
        started = time.monotonic()
        for process in workers.values():
            process.start()
        display = Display()
        q = s.queue(QUEUE)
        names = [spec.name for spec in NODES]
        dispatched = moved = 0
        killed_at = None
        try:
            while acked.value < TOTAL_TASKS:
                if time.monotonic() - started > TIME_LIMIT_S:
                    raise RuntimeError(f"not done after {TIME_LIMIT_S:.0f} s")
                stats = q.dispatch_stats(names)
                if pending:
                    # Feed about as fast as the workers drain: at most QUEUED_LIMIT waiting.
                    budget = min(150, QUEUED_LIMIT - stats.ready)
                    if budget > 0:
                        dispatched += dispatch_some(s, pending, budget)
                if killed_at is None and acked.value >= KILL_AT_DONE:
                    dies[VICTIM].set()
                    killed_at = time.monotonic() - started
                moved += supervise(s)
                display.show(
                    *frame(s, stats, started, dispatched, acked.value, redelivered.value, moved)
                )
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            stats = q.dispatch_stats(names)
            display.show(
                *frame(s, stats, started, dispatched, acked.value, redelivered.value, moved)
            )
        finally:
            for process in workers.values():
                if process.is_alive():
                    process.terminate()
            for process in workers.values():
                process.join(5)

        victim = workers[VICTIM]
        stats = q.dispatch_stats(names)
        done = client.scard(s.namespace.key("demo", "done"))
        load_left = sum(counts.load or 0 for counts in stats.nodes.values())
        exactly_once = (
            acked.value == TOTAL_TASKS == done and stats.ready + stats.leased + stats.dead == 0
        )
        print("\nsummary:")
        print(f"  tasks dispatched        {dispatched} of {TOTAL_TASKS}")
        print(f"  tasks acknowledged      {acked.value} (distinct task ids acked: {done})")
        print(
            f"  left in the queue       ready {stats.ready}, leased {stats.leased}, "
            f"delayed {stats.delayed}, dead {stats.dead}; load left on nodes {load_left}"
        )
        print(
            f"  {VICTIM + ' worker':<24}killed by SIGKILL at t={killed_at or 0:.1f}s "
            f"(exit code {victim.exitcode})"
        )
        print(f"  redelivered             {redelivered.value} (leased again with attempt > 1)")
        print(f"  redispatched            {moved} (moved off the dead node)")
        print(f"  time                    {elapsed:.1f} s")
        print(f"  every task done exactly once: {'yes' if exactly_once else 'NO'}")
        client.close()
        return 0 if exactly_once and redelivered.value > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
