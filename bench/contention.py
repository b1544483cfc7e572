"""Locks under contention: ``THREADS`` threads of one process fight for one lock for a bounded
time (``Settings.contention_seconds``); each thread loops acquire (blocking, bounded by the time
left) + release, with nothing in between.

Unlike the rows of ``engine.py`` this is not a per-call cost: it measures how many acquisitions
the whole group gets per second, how evenly they are spread over the threads (Jain's fairness
index: 1 = perfectly even, 1/n = one thread got them all), and the Redis CPU per acquisition
(waiting included: polls, wake-ups, refused attempts).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

import luasched

from .engine import SENT, Env, snapshot

THREADS = 8
LOCK_TTL_MS = 30_000

#: What one thread does once: block until it holds the lock (or ``timeout`` s passed), then
#: release it; True if it held it.
Cycle = Callable[[float], bool]


@dataclass
class Contender:
    """One row of the contention table: ``make(client, lock_name)`` builds one thread's cycle."""

    name: str
    make: Callable[[redis.Redis, str], Cycle]
    note: str = ""


CONTENDERS: list[Contender] = []


def redis_py_cycle(client: redis.Redis, name: str) -> Cycle:
    lock = client.lock(f"bench:contended:{name}", timeout=LOCK_TTL_MS / 1000)

    def cycle(timeout: float) -> bool:
        if not lock.acquire(blocking=True, blocking_timeout=timeout):
            return False
        lock.release()
        return True

    return cycle


def luasched_cycle(fair: bool) -> Callable[[redis.Redis, str], Cycle]:
    def make(client: redis.Redis, name: str) -> Cycle:
        scheduler = luasched.Scheduler(client, "bench-contended")
        scheduler.load_scripts()
        lock = scheduler.lock(name, ttl_ms=LOCK_TTL_MS, fair=fair)

        def cycle(timeout: float) -> bool:
            handle = lock.acquire(timeout=timeout)
            if handle is None:
                return False
            handle.release()
            return True

        return cycle

    return make


CONTENDERS += [
    Contender(
        "redis-py Lock",
        redis_py_cycle,
        "blocking acquire polls SET NX every `sleep` = 0.1 s (its default)",
    ),
    Contender(
        "luasched lock",
        luasched_cycle(fair=False),
        "waiters BLPOP the wake list (retry_ms 200 as the authority); one woken to lose "
        "goes back to its timer",
    ),
    Contender(
        "luasched fair lock",
        luasched_cycle(fair=True),
        "FIFO: a release wakes the oldest waiter only (its own wake list)",
    ),
]


def jain(counts: list[int]) -> float:
    """Jain's fairness index of ``counts``: (sum x)^2 / (n * sum x^2)."""
    squares = sum(count * count for count in counts)
    return (sum(counts) ** 2) / (len(counts) * squares) if squares else float("nan")


def run_contender(contender: Contender, env: Env, control: redis.Redis) -> dict[str, Any]:
    """``THREADS`` threads on one lock for ``env.settings.contention_seconds``."""
    seconds = env.settings.contention_seconds
    name = f"contended-{contender.name.replace(' ', '-')}"
    clients = [env.client() for _ in range(THREADS)]
    cycles = [contender.make(client, name) for client in clients]
    counts = [0] * THREADS
    errors: list[BaseException] = []
    start_gate = threading.Barrier(THREADS + 1)
    deadline = 0.0

    def thread(number: int) -> None:
        cycle = cycles[number]
        start_gate.wait()
        try:
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                if cycle(left):
                    counts[number] += 1
        except BaseException as error:  # reported after the join
            errors.append(error)

    threads = [threading.Thread(target=thread, args=(number,)) for number in range(THREADS)]
    for worker in threads:
        worker.start()
    try:
        SENT.clear()
        before = snapshot(control)
        started = time.perf_counter()
        deadline = started + seconds
        start_gate.wait()
        for worker in threads:
            worker.join()
        wall = time.perf_counter() - started
        after = snapshot(control)
        sent = sum(SENT.values())
    finally:
        for client in clients:
            client.close()
    if errors:
        raise RuntimeError(f"{contender.name}: a thread failed") from errors[0]
    total = sum(counts)
    cpu_before = before.cpu_main if before.cpu_main is not None else before.cpu_total
    cpu_after = after.cpu_main if after.cpu_main is not None else after.cpu_total
    cpu_s = (cpu_after or 0.0) - (cpu_before or 0.0)
    return {
        "name": contender.name,
        "note": contender.note,
        "threads": THREADS,
        "seconds": round(wall, 3),
        "acquisitions": total,
        "acquisitions_per_s": round(total / wall, 1) if wall > 0 else None,
        "per_thread": counts,
        "jain": round(jain(counts), 4),
        "cpu_us_per_acquisition": round(cpu_s * 1e6 / total, 2) if total else None,
        "commands_per_acquisition": round(sent / total, 2) if total else None,
    }
