"""luasched's queue against other Python task queues on the same server: RQ, BullMQ, Dramatiq.

Unlike the rows of ``engine.py`` (one call per loop), a task queue is a producer and workers, so
each system here is measured in phases, each with ``INFO cpu`` read before and after:

* **enqueue**: this process adds tasks one call each (the library's ordinary single add), for
  at most ``Settings.seconds * 3`` and ``PRODUCE_MAX`` tasks;
* **1 worker**: one worker process (fork) drains what was just enqueued (dequeue-and-lock +
  ack, a task that only counts itself), bounded in time: tasks/s of one worker;
* **4 workers** (``Settings.clients``): the queue is filled with ``drain_tasks`` (20,000 in the
  full run; fast bulk fill, unmeasured) and that many worker processes drain it: tasks/s and
  Redis CPU per task of the consumer side alone.

One logical op = enqueue + dequeue-and-lock + ack of one task: its Redis CPU is the enqueue
phase's CPU per task plus the 1-worker phase's CPU per task. Every worker does what that
library's own worker does by default (RQ ``SimpleWorker``, BullMQ ``Worker`` with concurrency
1, Dramatiq ``Worker`` with its default 8 threads and prefetch 16); luasched's worker leases
``LUASCHED_BATCH`` tasks per ``dequeue_many`` call and acks them in one pipeline.

The workers are forked after the server's address is known; each builds its library's worker,
waits at a barrier, and on "go" works until the queue is empty or the parent says stop. A task
increments a counter shared by the processes; the parent polls it: a drain's measurement (INFO
cpu, the clock) starts once the first 2 % of the tasks (at least ``WARM_TASKS`` per worker) are
done, so the workers' start is not charged per task, and ends when all are done (or at the time
bound); the CPU delta is read after the workers stopped (their stop is charged).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

import luasched
from luasched.queue import QueueKeys
from luasched.testing import die_with_parent

from .cases import fill_queue
from .engine import Env, Settings, snapshot

PAYLOAD = b"p" * 32
QUEUE = "peers"
LUASCHED_NAMESPACE = "bench-peers"
#: Tasks luasched's worker leases per dequeue_many call (Dramatiq's default prefetch is 16).
LUASCHED_BATCH = 16
LEASE_MS = 600_000
#: At most this many tasks per enqueue phase (also bounded by time).
PRODUCE_MAX = 20_000
POLL_S = 0.002
#: Tasks per worker (at least 2 % of the queue) taken before a drain's measurement starts.
WARM_TASKS = 20

# The counter the task of every system increments (set in the parent before the fork).
_COUNTER: Any = None


def count_task(*args: Any, **kwargs: Any) -> None:
    """The task every system runs: count itself (RQ imports it as bench.queue_peers.count_task)."""
    with _COUNTER.get_lock():
        _COUNTER.value += 1


# ------------------------------------------------------------------------------------ systems


@dataclass
class System:
    """One task queue: how to add one task, fill many, run one worker, and clean up.

    ``enqueue(env)`` returns a function adding one task per call (and a close);
    ``fill(env, count)`` queues ``count`` tasks fast (bulk, unmeasured); ``work(env, stop,
    gate)`` runs in a worker process: builds its worker, calls ``gate()`` (the start), then works
    until the queue is empty or ``stop`` is set; ``prefixes``: the key
    patterns it leaves, deleted after each phase.
    """

    name: str
    module: str
    note: str
    enqueue: Callable[[Env], tuple[Callable[[], object], Callable[[], object]]]
    fill: Callable[[Env, int], None]
    work: Callable[[Env, Any, Callable[[], object]], None]
    prefixes: tuple[str, ...]


def _wait(stop: Any) -> None:
    """Wait for the parent's stop by polling: a process that exits while blocked in
    ``Event.wait`` leaves the parent's ``Event.set`` waiting for it forever."""
    while not stop.is_set():
        time.sleep(POLL_S * 5)


def _url(env: Env) -> str:
    return f"redis://{env.host}:{env.port}/0"


def _ids() -> Iterator[bytes]:
    prefix = f"{os.getpid()}-{time.monotonic_ns()}-".encode()
    number = 0
    while True:
        number += 1
        yield prefix + str(number).encode()


# luasched ---------------------------------------------------------------------------------


def _luasched_queue(client: redis.Redis) -> tuple[luasched.Scheduler, Any]:
    scheduler = luasched.Scheduler(client, LUASCHED_NAMESPACE)
    scheduler.load_scripts()
    return scheduler, scheduler.queue(QUEUE)


def luasched_enqueue(env: Env) -> tuple[Callable[[], object], Callable[[], object]]:
    client = env.control()
    _scheduler, queue = _luasched_queue(client)
    ids = _ids()
    return (lambda: queue.enqueue(next(ids), PAYLOAD)), client.close


def luasched_fill(env: Env, count: int) -> None:
    client = env.control()
    try:
        scheduler, _queue = _luasched_queue(client)
        sha = scheduler.load_scripts()["queue.enqueue"]
        fill_queue(env.host, env.port, sha, QueueKeys.of(scheduler.namespace, QUEUE), count, _ids())
    finally:
        client.close()


def luasched_work(env: Env, stop: Any, gate: Callable[[], object]) -> None:
    client = env.control()
    scheduler, queue = _luasched_queue(client)
    worker = f"worker-{os.getpid()}".encode()
    gate()
    try:
        while not stop.is_set():
            leases = queue.dequeue_many(worker, LUASCHED_BATCH, LEASE_MS)
            if not leases:
                return
            for lease in leases:
                count_task(lease.payload)
            with scheduler.pipeline() as pipe:
                acks = pipe.queue(QUEUE)
                for lease in leases:
                    acks.ack(lease)
                pipe.execute()
    finally:
        client.close()


def luasched_worker_work(env: Env, stop: Any, gate: Callable[[], object]) -> None:
    """The runtime: ``luasched.Worker`` with a no-op handler (the task counts itself), its
    defaults (one handler thread) but the batch and lease of the hand-written loop, burst mode
    (it returns once the queue is empty): batched takes, pipelined acks."""
    client = env.control()
    _scheduler, queue = _luasched_queue(client)
    worker = luasched.Worker(
        queue,
        lambda job: count_task(job.payload),
        batch=LUASCHED_BATCH,
        lease_ms=LEASE_MS,
        burst=True,
        worker_id=f"worker-{os.getpid()}",
    )
    watcher = threading.Thread(target=lambda: (_wait(stop), worker.stop(now=True)), daemon=True)
    gate()
    watcher.start()
    try:
        worker.run()
    finally:
        client.close()


def luasched_one_at_a_time_work(env: Env, stop: Any, gate: Callable[[], object]) -> None:
    """The plain worker loop: q.dequeue, then q.ack_and_dequeue (the ack of a task and the lease
    of the next in one call)."""
    client = env.control()
    _scheduler, queue = _luasched_queue(client)
    worker = f"worker-{os.getpid()}".encode()
    gate()
    try:
        lease = queue.dequeue(worker, LEASE_MS)
        while lease is not None:
            count_task(lease.payload)
            if stop.is_set():
                queue.ack(lease)
                return
            lease = queue.ack_and_dequeue(lease, worker, LEASE_MS)
    finally:
        client.close()


# RQ ---------------------------------------------------------------------------------------


def rq_enqueue(env: Env) -> tuple[Callable[[], object], Callable[[], object]]:
    from rq import Queue

    client = env.control()
    queue = Queue(QUEUE, connection=client)
    return (lambda: queue.enqueue(count_task, PAYLOAD)), client.close


def rq_fill(env: Env, count: int) -> None:
    from rq import Queue

    client = env.control()
    try:
        queue = Queue(QUEUE, connection=client)
        for start in range(0, count, 1000):
            jobs = [
                Queue.prepare_data(count_task, args=(PAYLOAD,))
                for _ in range(min(1000, count - start))
            ]
            with client.pipeline() as pipe:
                queue.enqueue_many(jobs, pipeline=pipe)
                pipe.execute()
    finally:
        client.close()


def rq_work(env: Env, stop: Any, gate: Callable[[], object]) -> None:
    from rq import Queue, SimpleWorker

    client = env.control()
    worker = SimpleWorker([Queue(QUEUE, connection=client)], connection=client)

    def watch() -> None:
        _wait(stop)
        worker._stop_requested = True  # what RQ's own SIGTERM handler sets mid-job

    threading.Thread(target=watch, daemon=True).start()
    gate()
    try:
        worker.work(burst=True, logging_level="WARNING")
    finally:
        client.close()


# BullMQ -----------------------------------------------------------------------------------


def bullmq_enqueue(env: Env) -> tuple[Callable[[], object], Callable[[], object]]:
    """An async add (``produce`` runs its loop inside one coroutine, as an asyncio app would)."""
    from bullmq import Queue

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    queue = Queue(QUEUE, {"connection": _url(env)})
    data = {"p": PAYLOAD.decode()}

    async def add() -> None:
        await queue.add("task", data)

    def close() -> None:
        loop.run_until_complete(queue.close())
        asyncio.set_event_loop(None)
        loop.close()

    return add, close


def bullmq_fill(env: Env, count: int) -> None:
    from bullmq import Queue

    async def fill() -> None:
        queue = Queue(QUEUE, {"connection": _url(env)})
        try:
            data = {"p": PAYLOAD.decode()}
            for start in range(0, count, 1000):
                size = min(1000, count - start)
                await queue.addBulk([{"name": "task", "data": data} for _ in range(size)])
        finally:
            await queue.close()

    asyncio.run(fill())


def bullmq_work(env: Env, stop: Any, gate: Callable[[], object]) -> None:
    from bullmq import Worker

    async def process(job: Any, token: str) -> None:
        count_task(job.data)

    async def main() -> None:
        worker = Worker(QUEUE, process, {"connection": _url(env), "autorun": False})
        gate()
        running = asyncio.ensure_future(worker.run())
        while not stop.is_set() and not running.done():
            await asyncio.sleep(POLL_S * 5)
        await worker.close()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    asyncio.run(main())


# Dramatiq ---------------------------------------------------------------------------------


def _dramatiq_broker(env: Env) -> tuple[Any, Any]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=_url(env))
    actor = dramatiq.actor(count_task, broker=broker, actor_name="count_task", queue_name=QUEUE)
    return broker, actor


def dramatiq_enqueue(env: Env) -> tuple[Callable[[], object], Callable[[], object]]:
    broker, actor = _dramatiq_broker(env)
    return (lambda: actor.send(PAYLOAD.decode())), broker.close


def dramatiq_fill(env: Env, count: int) -> None:
    # Dramatiq has no bulk send: its own enqueue (the dispatch script), pipelined in chunks.
    broker, actor = _dramatiq_broker(env)
    try:
        real = broker.client
        for start in range(0, count, 1000):
            pipe = real.pipeline(transaction=False)
            broker.client = pipe
            dispatch = broker.scripts["dispatch"]
            try:
                for _ in range(min(1000, count - start)):
                    message = actor.message(PAYLOAD.decode())
                    message = message.copy(options={"redis_message_id": message.message_id})
                    dispatch(
                        keys=[broker.namespace],
                        args=[
                            "enqueue",
                            int(time.time() * 1000),
                            QUEUE,
                            broker.broker_id,
                            broker.heartbeat_timeout,
                            broker.dead_message_ttl,
                            0,
                            broker._max_unpack_size(),
                            message.options["redis_message_id"],
                            message.encode(),
                        ],
                        client=pipe,
                    )
                pipe.execute()
            finally:
                broker.client = real
    finally:
        broker.close()


def dramatiq_work(env: Env, stop: Any, gate: Callable[[], object]) -> None:
    from dramatiq import Worker

    broker, _actor = _dramatiq_broker(env)
    worker = Worker(broker)  # its defaults: 8 threads, prefetch 16
    gate()
    worker.start()
    try:
        _wait(stop)
    finally:
        worker.stop()
        broker.close()


SYSTEMS = [
    System(
        "luasched",
        "luasched",
        f"q.enqueue (request id: its default); worker: q.dequeue_many(n={LUASCHED_BATCH}) + "
        "the acks of the batch in one pipeline (s.pipeline().queue(name).ack)",
        luasched_enqueue,
        luasched_fill,
        luasched_work,
        (f"luasched:{{{LUASCHED_NAMESPACE}}}:*",),
    ),
    System(
        "luasched Worker",
        "luasched",
        f"the same enqueue; worker: luasched.Worker (runtime) with a no-op handler, "
        f"batch={LUASCHED_BATCH}, one handler thread (its default), burst mode",
        luasched_enqueue,
        luasched_fill,
        luasched_worker_work,
        (f"luasched:{{{LUASCHED_NAMESPACE}}}:*",),
    ),
    System(
        "luasched, one task per call",
        "luasched",
        "the same enqueue; worker: q.dequeue once, then q.ack_and_dequeue per task (one call "
        "per task, no batch); not used by the targets",
        luasched_enqueue,
        luasched_fill,
        luasched_one_at_a_time_work,
        (f"luasched:{{{LUASCHED_NAMESPACE}}}:*",),
    ),
    System(
        "RQ",
        "rq",
        "Queue.enqueue(func, payload); worker: SimpleWorker.work(burst=True) (job runs in the "
        "worker process; result kept result_ttl=500 s, its default)",
        rq_enqueue,
        rq_fill,
        rq_work,
        ("rq:*",),
    ),
    System(
        "BullMQ",
        "bullmq",
        "await Queue.add(name, data); worker: bullmq.Worker (asyncio, concurrency 1, its "
        "default; completed jobs kept, removeOnComplete false, its default)",
        bullmq_enqueue,
        bullmq_fill,
        bullmq_work,
        ("bull:*",),
    ),
    System(
        "Dramatiq",
        "dramatiq",
        "actor.send(payload) (RedisBroker); worker: dramatiq.Worker, its defaults (8 threads, "
        "prefetch 16: one fetch script call per batch, one ack script call per message)",
        dramatiq_enqueue,
        dramatiq_fill,
        dramatiq_work,
        ("dramatiq:*",),
    ),
]


def installed() -> list[System]:
    found = []
    for system in SYSTEMS:
        try:
            __import__(system.module)
        except ImportError:
            continue
        found.append(system)
    return found


# ---------------------------------------------------------------------------------- phases


def _cpu(control: redis.Redis) -> float:
    shot = snapshot(control)
    return shot.cpu_main if shot.cpu_main is not None else shot.cpu_total


def _drop(control: redis.Redis, system: System) -> None:
    for pattern in system.prefixes:
        batch = list(control.scan_iter(match=pattern, count=10_000))
        for start in range(0, len(batch), 10_000):
            control.unlink(*batch[start : start + 10_000])


def _child(system: System, env: Env, barrier: Any, stop: Any, errors: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    try:
        system.work(env, stop, lambda: barrier.wait(timeout=120))
    except BaseException:
        errors.put(traceback.format_exc())
        barrier.abort()  # the parent stops waiting for this worker's start


def produce(system: System, env: Env, control: redis.Redis, seconds: float) -> dict[str, Any]:
    """The enqueue phase: single adds for ``seconds`` (at most PRODUCE_MAX)."""
    add, close = system.enqueue(env)
    try:
        if asyncio.iscoroutinefunction(add):
            loop = asyncio.get_event_loop()

            async def adds(limit: int, deadline: float) -> int:
                count = 0
                while count < limit and time.perf_counter() < deadline:
                    await add()
                    count += 1
                return count

            def run(limit: int, deadline: float) -> int:
                return loop.run_until_complete(adds(limit, deadline))
        else:

            def run(limit: int, deadline: float) -> int:
                count = 0
                while count < limit and time.perf_counter() < deadline:
                    add()
                    count += 1
                return count

        run(1, math.inf)  # warm: scripts loaded, connection open
        before = _cpu(control)
        started = time.perf_counter()
        count = run(PRODUCE_MAX, started + seconds)
        wall = time.perf_counter() - started
        cpu = _cpu(control) - before
    finally:
        close()
    return {"tasks": count + 1, "measured": count, "wall_s": wall, "cpu_s": cpu}


def drain(
    system: System, env: Env, control: redis.Redis, workers: int, total: int, seconds: float
) -> dict[str, Any]:
    """``workers`` worker processes take the ``total`` queued tasks, for at most ``seconds``."""
    global _COUNTER
    context = multiprocessing.get_context("fork")
    _COUNTER = context.Value("q", 0)
    barrier = context.Barrier(workers + 1)
    stop = context.Event()
    errors = context.Queue()
    processes = [
        context.Process(target=_child, args=(system, env, barrier, stop, errors), daemon=True)
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    warm = max(workers * WARM_TASKS, total // 50)
    try:
        barrier.wait(timeout=120)
        deadline = time.perf_counter() + seconds
        # The measurement starts once the workers have taken ``warm`` tasks: their start
        # (connections, script loads, registration) is not a cost per task.
        while _COUNTER.value < warm and time.perf_counter() < deadline:
            if not any(process.is_alive() for process in processes):
                break
            time.sleep(POLL_S / 4)
        before = _cpu(control)
        started = time.perf_counter()
        first = _COUNTER.value
        while _COUNTER.value < total and time.perf_counter() < deadline:
            if not any(process.is_alive() for process in processes):
                break
            time.sleep(POLL_S)
        wall = time.perf_counter() - started
        done = _COUNTER.value - first
        stop.set()
        for process in processes:
            process.join(timeout=60)
        cpu = _cpu(control) - before
        finished = _COUNTER.value - first
    except BaseException as error:
        barrier.abort()
        if isinstance(error, threading.BrokenBarrierError) and not errors.empty():
            raise RuntimeError(f"{system.name} worker failed:\n{errors.get()}") from None
        raise
    finally:
        stop.set()
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    if not errors.empty():
        raise RuntimeError(f"{system.name} worker failed:\n{errors.get()}")
    return {
        "workers": workers,
        "queued": total,
        "warm_up": first,
        "done": done,
        "finished": finished,
        "all_taken": first + finished >= total,
        "wall_s": wall,
        "cpu_s": cpu,
        "tasks_per_s": done / wall if wall > 0 else None,
        "cpu_us_per_task": cpu * 1e6 / finished if finished else None,
    }


def phase_seconds(settings: Settings) -> float:
    """How long an enqueue phase lasts (a 1-worker drain: at most 3 times that)."""
    return max(0.5, settings.seconds * 2)


def estimate(settings: Settings) -> float:
    """A planned length of one system's phases, for the progress display."""
    return settings.peer_rounds * phase_seconds(settings) * 3 + settings.drain_seconds / 3 + 2


def run_system(
    system: System,
    env: Env,
    control: redis.Redis,
    on_phase: Callable[[str, int, int], object] | None = None,
) -> dict[str, Any]:
    """Every phase of ``system``: ``peer_rounds`` enqueue + 1-worker rounds, then one drain of
    ``drain_tasks`` by ``clients`` workers (at most ``drain_seconds``)."""
    settings = env.settings
    rounds = settings.peer_rounds
    drain_tasks = settings.drain_tasks
    seconds = phase_seconds(settings)
    cycles = []
    _drop(control, system)
    try:
        for number in range(rounds):
            if on_phase:
                on_phase("enqueue + 1 worker", number + 1, rounds)
            made = produce(system, env, control, seconds)
            taken = drain(system, env, control, 1, made["tasks"], seconds * 3)
            _drop(control, system)
            enqueue_us = made["cpu_s"] * 1e6 / made["measured"] if made["measured"] else None
            cycle = {
                "enqueued": made["measured"],
                "enqueue_per_s": made["measured"] / made["wall_s"] if made["wall_s"] else None,
                "enqueue_cpu_us_per_task": enqueue_us,
                "worker": taken,
            }
            if enqueue_us is not None and taken["cpu_us_per_task"] is not None:
                cycle["cycle_cpu_us_per_op"] = enqueue_us + taken["cpu_us_per_task"]
            cycles.append(cycle)
        if on_phase:
            on_phase(f"fill {drain_tasks:,}, {settings.clients} workers drain them", 1, 1)
        system.fill(env, drain_tasks)
        many = drain(system, env, control, settings.clients, drain_tasks, settings.drain_seconds)
    finally:
        _drop(control, system)
    return {
        "name": system.name,
        "note": system.note,
        "cycles": cycles,
        "drain": many,
        "median": {
            "enqueue_cpu_us_per_task": _median(c.get("enqueue_cpu_us_per_task") for c in cycles),
            "cycle_cpu_us_per_op": _median(c.get("cycle_cpu_us_per_op") for c in cycles),
            "one_worker_cpu_us_per_task": _median(c["worker"]["cpu_us_per_task"] for c in cycles),
            "one_worker_tasks_per_s": _median(c["worker"]["tasks_per_s"] for c in cycles),
            "enqueue_per_s": _median(c.get("enqueue_per_s") for c in cycles),
            "workers_tasks_per_s": many["tasks_per_s"],
            "workers_cpu_us_per_task": many["cpu_us_per_task"],
            "workers": many["workers"],
            "drain_tasks": drain_tasks,
            "drained_all": many["all_taken"],
        },
    }


def _median(values: Any) -> float | None:
    found = sorted(value for value in values if value is not None)
    if not found:
        return None
    middle = len(found) // 2
    return found[middle] if len(found) % 2 else (found[middle - 1] + found[middle]) / 2
