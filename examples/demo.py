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
   leases, and its node's heartbeat stops. No supervisor process runs: once the node's deadline
   lapses, the live workers' own dequeues (``queue.node_dequeue``) heal it, a bounded number of
   tasks per call: its ready tasks move to live nodes, and its leases, when they expire (a
   failed attempt), are reclaimed onto live nodes, where they are delivered again with attempt
   2. The dead node stays registered (nobody sweeps it). A slot-routed dispatch whose key's slot
   node-c still owns answers NoNode; the producer then calls ``s.slots.rebalance()``, which
   hands a dead node's slots to the live ones (it stays registered), and retries: its own
   retry, like the one on AllNodesFull. The same rebalance lets the healing move node-c's
   slot-routed tasks (to the new owner of their key's slot).
5. The summary checks that every task was acknowledged exactly once, and counts the tasks
   dispatched to node-c that finished on live nodes ("healed").

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
    done_here_key = done_key + b":" + node.name.encode()

    def work(job: luasched.Job) -> None:
        if job.attempt > 1:
            with redelivered.get_lock():
                redelivered.value += 1
        time.sleep(WORK_S * int(job.payload.split(b":")[1]))

    def finished(job: luasched.Job) -> None:
        # After the ack: a record per acknowledged task (a set: a second ack would not grow it,
        # the summary compares its size with the number of acks), and of the node that ran it,
        # in one MULTI.
        with client.pipeline(transaction=True) as pipe:
            pipe.sadd(done_key, job.task_id)
            pipe.sadd(done_here_key, job.task_id)
            pipe.execute()
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
    healed: int,
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
        state = "gone" if info is None else ("live" if info.live else "DEAD")
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
        f"leased {stats.leased}  acked {acked}  redelivered {redelivered}  healed {healed}"
    )
    rows.append(totals)
    line = f"t={elapsed:4.1f}s acked={acked} ready={stats.ready} leased={stats.leased} " + (
        " ".join(parts)
    )
    return rows, line


# --------------------------------------------------------------------------------------------
# The run


def dispatch_some(
    s: Scheduler, pending: list[tuple[str, str, int]], budget: int, placed: dict[bytes, bytes]
) -> tuple[int, bool]:
    """Dispatch up to ``budget`` pending tasks in one pipeline, noting in ``placed`` the node
    each went to; those refused stay pending. AllNodesFull (every node full) is retried a moment
    later. NoNode means the routing key's slot owner is dead (a slot-routed dispatch needs its
    slot's owner live): ``s.slots.rebalance()`` hands the dead node's slots to the live nodes
    (it stays registered, for the healing) before the retry. Returns how many were dispatched,
    and whether it rebalanced."""
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
        else:
            placed[task[0].encode()] = result.node
    rebalance = any(isinstance(result, NoNode) for result in results)
    if rebalance:
        s.slots.rebalance()
    pending[:] = retry + rest
    return len(batch) - len(retry), rebalance


def healed_count(client: redis.Redis, s: Scheduler, placed: dict[bytes, bytes]) -> int:
    """How many tasks dispatched to the victim were acked on live nodes: moved there by the
    healing in the live workers' dequeues (nothing else moves them in this demo)."""
    victims = {task for task, node in placed.items() if node == VICTIM.encode()}
    done = s.namespace.key("demo", "done")
    others = [done + b":" + spec.name.encode() for spec in NODES if spec.name != VICTIM]
    return len(victims & set(client.sunion(others)))


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
        dispatched = rebalances = 0
        placed: dict[bytes, bytes] = {}
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
                        count, rebalanced = dispatch_some(s, pending, budget, placed)
                        dispatched += count
                        rebalances += rebalanced
                if killed_at is None and acked.value >= KILL_AT_DONE:
                    dies[VICTIM].set()
                    killed_at = time.monotonic() - started
                healed = healed_count(client, s, placed)
                display.show(
                    *frame(s, stats, started, dispatched, acked.value, redelivered.value, healed)
                )
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            stats = q.dispatch_stats(names)
            healed = healed_count(client, s, placed)
            display.show(
                *frame(s, stats, started, dispatched, acked.value, redelivered.value, healed)
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
        print(f"  healed                  {healed} ({VICTIM}'s tasks finished on live nodes)")
        print(
            f"  slots rebalanced        {rebalances} time(s) (a slot-routed dispatch met "
            f"{VICTIM}'s slots: NoNode)"
        )
        print(f"  time                    {elapsed:.1f} s")
        print(f"  every task done exactly once: {'yes' if exactly_once else 'NO'}")
        client.close()
        return 0 if exactly_once and redelivered.value > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
