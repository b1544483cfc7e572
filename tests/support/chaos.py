"""The chaos run (issue 9, item 1): a queue drained by worker processes that are killed with SIGKILL
at random moments, while Redis itself is killed (kill -9) and restarted once and its script cache
flushed once, then a check from the server's state and the workers' logs that every task was
acknowledged exactly once, none was lost and no task was in two leases at once.

    python tests/support/chaos.py              # make chaos: 50,000 tasks, 8 workers (~1-2 min)
    python tests/support/chaos.py --tasks 4000 --kills 16 --server /usr/bin/redis-server
    python tests/support/chaos.py --help       # every knob; --seed N replays the kill schedule

The run starts its own server (``luasched.testing.ThrowawayServer``: 127.0.0.1, a free port, an
AOF with ``appendfsync always`` in a temporary directory), its own worker processes (this file,
``worker`` sub-command) and a producer thread, and stops all of them whatever happens; it has a
time limit (``--time-limit``, 280 s by default). tests/test_chaos.py runs a short version in the
default suite.

What happens:

* A producer enqueues the tasks in pipelined batches of 500 (request id ``e-<task>`` per task,
  a batch that failed is sent again as it was), keeping about 2,000 ready, so enqueues go on
  through the whole run.
* ``--workers`` processes take ``--batch`` tasks per call (``dequeue_many``, lease
  ``--lease-ms``) and ack them in one pipeline (request ids ``d-<worker>-<n>`` and
  ``a-<task>-<token>``), sending a call that met a connection error again with the same
  request ids until it answers (their client retries only 3 times, so the Redis outage reaches
  this loop). One task in ``--pause-every`` is held 1.5 leases long on its first attempt (a
  process pause, which delays its whole batch): those leases are reclaimed and the late acks
  must be refused (``StaleLease``). Each worker appends one line per event to its log (B start,
  L lease, A ack sent, K ack answered, S stale ack refused, E connection error, Q stopped).
* The driver kills ``--kills`` times a random worker (a working one among the least killed so
  far) with SIGKILL, and starts a new one in its place. The moments are drawn at random in
  the run's progress (tasks done, uniform over 2-90 %), not in seconds, so a slow machine
  does not turn the run into a string of start-ups (a worker takes ~0.3 s of CPU to start).
  Every kill happens, however slow the machine: a kill that is due while no worker has leased
  yet waits at most ``KILL_PATIENCE_S`` and then takes any worker, and the producer holds the
  last ``TAIL_SHARE`` of the tasks back until the last kill, so the run cannot end first.
  At 30 %
  of the tasks done it sends ``SCRIPT FLUSH``, at 60 % it kills the server with SIGKILL, keeps
  it down ``--down-for`` s (1.5) and starts it again on the same port and directory (it
  reloads its AOF; loaded scripts are gone, so every client meets NOSCRIPT).
* Request records are kept for 30 minutes (``request_ttl_ms``), so at the end the server holds
  the record of every enqueue, dequeue and ack that it applied: ``a-<task>-<token>`` exists
  exactly for the acks that took effect.

Checks at the end (any failure: exit status 1 and the list of violations):

* server: nothing ready, delayed, leased or dead; the tasks hash holds only ``seq`` and
  ``fence``; one enqueue record per task, each "created"; exactly one applied ack per task;
  no fencing token is in two dequeue records (or twice in one), and the largest one is
  ``fence`` (tokens follow the server's clock, lua/include/fence.j2: they skip, never repeat);
* logs: every logged lease is in the server's records under its token; per task, each lease
  starts (deadline - lease_ms, server clock) no earlier than the previous lease's deadline (no
  two leases at once); an answered ack is the task's applied ack; a refused ack is not; an
  applied ack that no log shows answered was sent by a worker that was killed right after.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from luasched import Scheduler
from luasched.errors import StaleLease
from luasched.keys import Namespace
from luasched.queue import Lease
from luasched.testing import ThrowawayServer, die_with_parent, find_server_binary

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "chaos"
QUEUE = "jobs"
REQUEST_TTL_MS = 1_800_000
MAX_ATTEMPTS = 1_000  # never dead-lettered: every task must end acked
BATCH = 500
BACKLOG = 2_000
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)
#: Decodes request records (msgpack) on the server; tests only, on the run's own server.
#: Each record as JSON. Integers are written with '%d' first: cjson writes numbers with 14
#: significant digits, and fencing tokens (the server's clock in us) have 16.
DECODE_RECORDS = """
local out = {}
for index, key in ipairs(KEYS) do
  local raw = redis.call('GET', key)
  if raw then
    local record = cmsgpack.unpack(raw)
    for position, value in ipairs(record) do
      if type(value) == 'number' then
        record[position] = string.format('%d', value)
      end
    end
    out[index] = cjson.encode(record)
  else
    out[index] = ''
  end
end
return out
"""


def task_id(index: int) -> bytes:
    return b"t%06d" % index


def persist(action: Callable[[], T], on_error: Callable[[BaseException], None]) -> T:
    """``action()``, again and again while it meets connection errors (the server restarting):
    the caller passes the same request id every time, so a call that ran acts once."""
    while True:
        try:
            return action()
        except CONNECTION_ERRORS as error:
            on_error(error)
            time.sleep(0.05)


def make_queue(client: redis.Redis) -> Any:
    scheduler = Scheduler(client, NAMESPACE, use_functions=False)
    return scheduler.queue(QUEUE, request_ttl_ms=REQUEST_TTL_MS, max_attempts=MAX_ATTEMPTS)


# --------------------------------------------------------------------------------------------
# The worker process


def worker_main(args: argparse.Namespace) -> int:
    # A short retry budget (redis-py's default rides out ~5 s): a longer outage reaches this
    # loop as a ConnectionError, and the call is sent again with the same request id.
    client = redis.Redis(
        port=args.port,
        socket_timeout=10,
        socket_connect_timeout=2,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), 3),
    )
    scheduler = Scheduler(client, NAMESPACE, use_functions=False)
    queue = make_queue(client)
    log = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    wid = args.worker_id.encode()

    def note(*fields: Any) -> None:  # one write per line: a SIGKILL never leaves half a line
        line = " ".join(f.decode() if isinstance(f, bytes) else str(f) for f in fields)
        os.write(log, line.encode() + b"\n")

    def connection_error(error: BaseException) -> None:
        note("E", type(error).__name__)

    def ack_all(leases: list[Lease]) -> list[Any]:
        with scheduler.pipeline() as pipe:
            piped = pipe.queue(QUEUE, request_ttl_ms=REQUEST_TTL_MS, max_attempts=MAX_ATTEMPTS)
            for lease in leases:
                piped.ack(lease, request_id=b"a-" + lease.task_id + b"-%d" % lease.token)
            return pipe.execute(raise_on_error=False)

    stopping = threading.Event()  # SIGTERM (the end of the run): finish the batch, then leave
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    note("B", os.getpid())
    calls = 0
    while not stopping.is_set():
        calls += 1
        request = b"d-" + wid + b"-%d" % calls
        leases = persist(
            lambda request=request: queue.dequeue_many(
                wid, args.batch, args.lease_ms, request_id=request
            ),
            connection_error,
        )
        if not leases:
            time.sleep(0.005)
            continue
        for lease in leases:
            note("L", lease.task_id, lease.token, lease.deadline_ms, lease.attempt)
        for lease in leases:
            index = int(lease.task_id[1:])
            if args.pause_every and index % args.pause_every == 7 and lease.attempt == 1:
                time.sleep(args.lease_ms * 1.5 / 1000)  # a process pause past the deadline
        for lease in leases:
            note("A", lease.task_id, lease.token)
        results = persist(lambda leases=leases: ack_all(leases), connection_error)
        for lease, result in zip(leases, results, strict=True):
            if isinstance(result, StaleLease):
                note("S", lease.task_id, lease.token)
            elif result is True:
                note("K", lease.task_id, lease.token)
            else:
                raise RuntimeError(f"ack of {lease.task_id!r} answered {result!r}")
    note("Q")
    return 0


# --------------------------------------------------------------------------------------------
# The driver


@dataclass
class ChaosConfig:
    tasks: int = 50_000
    workers: int = 8
    binary: Path | None = None
    seed: int = 0
    lease_ms: int = 1_000
    kills: int = 64
    down_for_s: float = 1.5
    pause_every: int = 2_000
    batch: int = 10
    time_limit_s: float = 280.0
    verbose: bool = True


@dataclass
class ChaosReport:
    config: ChaosConfig
    server: str = ""
    duration_s: float = 0.0  # from the start to the last ack (checks not included)
    check_s: float = 0.0
    kills: int = 0
    kills_per_worker: list[int] = field(default_factory=list)
    leases: int = 0
    redeliveries: int = 0
    stale_acks_refused: int = 0
    acks_unanswered: int = 0
    worker_connection_errors: int = 0
    server_restarts: int = 0
    restart_downtime_s: float = 0.0
    script_flushes: int = 0
    noscript_replies: int = 0
    script_loads: int = 0
    enqueue_batches_resent: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def lines(self) -> list[str]:
        c = self.config
        rate = c.tasks / self.duration_s if self.duration_s else 0.0
        lines = [
            f"chaos run on {self.server}: {len(self.violations)} violations",
            f"  tasks                 {c.tasks:,} enqueued, acked exactly once: "
            f"{'yes' if self.ok else 'NO'}",
            f"  workers               {c.workers} processes, lease {c.lease_ms} ms, seed {c.seed}",
            f"  SIGKILLed workers     {self.kills} (per slot {self.kills_per_worker})",
            f"  leases granted        {self.leases:,} (as many distinct fencing tokens)",
            f"  redeliveries          {self.redeliveries:,} (leases beyond the first per task)",
            f"  stale acks refused    {self.stale_acks_refused}",
            f"  acks applied, answer lost to a kill  {self.acks_unanswered}",
            f"  Redis kill -9 + restart  {self.server_restarts} "
            f"(down {self.restart_downtime_s:.2f} s; AOF appendfsync always)",
            f"  SCRIPT FLUSH          {self.script_flushes}",
            f"  NOSCRIPT replies      {self.noscript_replies} "
            f"(answered by {self.script_loads} SCRIPT LOADs, then the same call again)",
            f"  connection errors     {self.worker_connection_errors} in workers, "
            f"{self.enqueue_batches_resent} enqueue batches resent",
            f"  duration              {self.duration_s:.1f} s ({rate:,.0f} tasks/s), "
            f"checks {self.check_s:.1f} s",
        ]
        lines += [f"  VIOLATION: {violation}" for violation in self.violations[:20]]
        if len(self.violations) > 20:
            lines.append(f"  ... and {len(self.violations) - 20} more violations")
        return lines

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("config", "violations")}
        data["tasks"] = self.config.tasks
        data["workers"] = self.config.workers
        data["ok"] = self.ok
        return data


#: The share of the tasks the producer holds back until every kill has happened.
TAIL_SHARE = 0.05
#: The highest kill moment, in progress (below 1 - TAIL_SHARE, so every moment is reached).
LAST_KILL_SHARE = 0.90
#: How long a due kill waits for a worker that has leased before it takes any worker.
KILL_PATIENCE_S = 0.5


class Deadline(Exception):
    """The run went past its time limit."""


class Driver:
    def __init__(self, config: ChaosConfig, server: ThrowawayServer, log_dir: Path) -> None:
        self.config = config
        self.server = server
        self.log_dir = log_dir
        self.rng = random.Random(config.seed)
        self.report = ChaosReport(config, kills_per_worker=[0] * config.workers)
        self.started = time.monotonic()
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * config.workers
        self.incarnations = [0] * config.workers
        self.killed_logs: set[str] = set()
        self.enqueued = 0
        self.producer_error: BaseException | None = None
        self.stop_producer = threading.Event()
        self.kills_done = threading.Event()  # releases the tail of the tasks (TAIL_SHARE)
        self.scripting_before_restart = (0, 0)
        self.client = server.client(socket_timeout=10)
        self.queue = make_queue(self.client)

    # ---- helpers

    def say(self, message: str) -> None:
        if self.config.verbose:
            print(f"[chaos {time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def check_time(self) -> None:
        if time.monotonic() - self.started > self.config.time_limit_s:
            raise Deadline(f"the run took more than {self.config.time_limit_s:.0f} s")

    def retrying(self, action: Callable[[], T]) -> T:
        def on_error(error: BaseException) -> None:
            self.check_time()

        return persist(action, on_error)

    def done(self) -> int:
        """Tasks acked so far: enqueued minus those still in the queue (server's view)."""
        stats = self.retrying(self.queue.stats)
        return self.enqueued - (stats.ready + stats.delayed + stats.leased + stats.dead)

    def scripting_counts(self) -> tuple[int, int]:
        """(NOSCRIPT error replies, SCRIPT LOAD calls) since the server started (6.2: every
        SCRIPT subcommand counts as a load; the run's one SCRIPT FLUSH is taken off)."""
        errors = self.retrying(lambda: self.client.info("errorstats"))
        commands = self.retrying(lambda: self.client.info("commandstats"))
        noscript = errors.get("errorstat_NOSCRIPT", {}).get("count", 0)
        loads = commands.get("cmdstat_script|load", {}).get("calls")
        if loads is None:  # 6.2: no subcommand stats
            loads = commands.get("cmdstat_script", {}).get("calls", 0)
            loads -= 1 if self.report.script_flushes and not self.report.server_restarts else 0
        return int(noscript), int(loads)

    # ---- workers

    def start_worker(self, slot: int) -> None:
        self.incarnations[slot] += 1
        worker_id = f"w{slot}-{self.incarnations[slot]}"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "worker",
            "--port", str(self.server.port),
            "--worker-id", worker_id,
            "--log", str(self.log_dir / f"{worker_id}.log"),
            "--lease-ms", str(self.config.lease_ms),
            "--pause-every", str(self.config.pause_every),
            "--batch", str(self.config.batch),
        ]  # fmt: skip
        self.processes[slot] = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_dir / f"{worker_id}.err", "wb"),  # noqa: SIM115
            preexec_fn=die_with_parent,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )

    def working(self, slot: int) -> bool:
        """Whether the worker in ``slot`` is past its start-up (it logged a lease)."""
        log = self.log_dir / f"w{slot}-{self.incarnations[slot]}.log"
        with contextlib.suppress(OSError), log.open("rb") as lines:
            return any(line.startswith(b"L ") for line in lines)
        return False

    def kill_one(self, any_worker: bool = False) -> bool:
        """SIGKILL a worker among the least killed slots (so every slot is killed once before any
        is killed twice) and start another in its place. Only a working one (past its start-up:
        a kill then would only slow the run), so False when none of them works yet, unless
        ``any_worker``."""
        fewest = min(self.report.kills_per_worker)
        candidates = [
            slot
            for slot in range(self.config.workers)
            if self.report.kills_per_worker[slot] == fewest and (any_worker or self.working(slot))
        ]
        if not candidates:
            return False
        slot = self.rng.choice(candidates)
        process = self.processes[slot]
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.killed_logs.add(f"w{slot}-{self.incarnations[slot]}")
        self.report.kills += 1
        self.report.kills_per_worker[slot] += 1
        self.start_worker(slot)
        return True

    def check_workers(self) -> None:
        for slot, process in enumerate(self.processes):
            if process is not None and process.poll() is not None:
                name = f"w{slot}-{self.incarnations[slot]}"
                error = (self.log_dir / f"{name}.err").read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"worker {name} exited by itself ({process.returncode}):\n{error}"
                )

    def stop_workers(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for slot, process in enumerate(self.processes):
            if process is not None:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
                    self.report.violations.append(f"worker slot {slot} did not stop on SIGTERM")

    # ---- producer

    def produce(self) -> None:
        try:
            client = self.server.client(socket_timeout=10)
            scheduler = Scheduler(client, NAMESPACE, use_functions=False)
            queue = make_queue(client)
            options = {"request_ttl_ms": REQUEST_TTL_MS, "max_attempts": MAX_ATTEMPTS}
            next_index = 0
            head = self.config.tasks - int(self.config.tasks * TAIL_SHARE)
            while next_index < self.config.tasks and not self.stop_producer.is_set():
                if next_index >= head and not self.kills_done.is_set():
                    self.kills_done.wait(0.02)  # the tail waits for the last kill
                    continue
                ready = persist(queue.stats, lambda error: None).ready
                if ready >= BACKLOG - BATCH:
                    time.sleep(0.02)
                    continue
                batch = range(next_index, min(self.config.tasks, next_index + BATCH))

                def send(batch: range = batch) -> list[Any]:
                    with scheduler.pipeline() as pipe:
                        piped = pipe.queue(QUEUE, **options)
                        for index in batch:
                            tid = task_id(index)
                            piped.enqueue(tid, b"payload-" + tid, request_id=b"e-" + tid)
                        return pipe.execute()

                def resent(error: BaseException) -> None:
                    self.report.enqueue_batches_resent += 1

                results = persist(send, resent)
                if not all(result.created for result in results):
                    raise RuntimeError("an enqueue answered created=False: a task id was live")
                next_index = batch.stop
                self.enqueued = next_index
            client.close()
        except BaseException as error:
            self.producer_error = error

    # ---- the run

    def run(self) -> None:
        config = self.config
        self.report.server = "{name} {version}".format(**self.server.info())
        self.say(
            f"server {self.report.server} on 127.0.0.1:{self.server.port}, logs {self.log_dir}"
        )
        producer = threading.Thread(target=self.produce, name="producer", daemon=True)
        producer.start()
        try:
            for slot in range(config.workers):
                self.start_worker(slot)
            # The kill moments, in tasks done: random points of the run's progress.
            kill_at = sorted(
                self.rng.uniform(0.02, LAST_KILL_SHARE) * config.tasks for _ in range(config.kills)
            )
            if not kill_at:
                self.kills_done.set()
            kill_due_since: float | None = None
            flushed = restarted = False
            last_say = 0.0
            while True:
                self.check_time()
                self.check_workers()
                if self.producer_error is not None:
                    raise RuntimeError(f"producer failed: {self.producer_error!r}")
                done = max(0, self.done())  # below 0 while an enqueue batch is in flight
                if done >= config.tasks and not producer.is_alive():
                    self.report.duration_s = time.monotonic() - self.started
                    break
                if not flushed and done >= 0.3 * config.tasks:
                    self.retrying(self.client.script_flush)
                    flushed = True
                    self.report.script_flushes += 1
                    self.say(f"SCRIPT FLUSH at {done:,} tasks done")
                if not restarted and done >= 0.6 * config.tasks:
                    self.restart_server(done)
                    restarted = True
                now = time.monotonic()
                if kill_at and done >= kill_at[0]:
                    kill_due_since = kill_due_since or now
                    if self.kill_one(any_worker=now - kill_due_since > KILL_PATIENCE_S):
                        kill_at.pop(0)
                        kill_due_since = None
                        if not kill_at:
                            self.kills_done.set()
                if now - last_say >= 5:
                    self.say(f"{done:,}/{config.tasks:,} done, {self.report.kills} kills")
                    last_say = now
                time.sleep(0.02)
        finally:
            self.stop_producer.set()
            self.stop_workers()
            producer.join(15)
        self.say("workers stopped")
        noscript, loads = self.scripting_counts()
        self.report.noscript_replies = self.scripting_before_restart[0] + noscript
        self.report.script_loads = self.scripting_before_restart[1] + loads
        self.say(f"all {config.tasks:,} tasks done in {self.report.duration_s:.1f} s; checking")
        began = time.monotonic()
        Checker(self).check()
        self.report.check_s = time.monotonic() - began
        self.say(
            f"checked in {self.report.check_s:.1f} s: {len(self.report.violations)} violations"
        )

    def restart_server(self, done: int) -> None:
        self.scripting_before_restart = self.scripting_counts()
        began = time.monotonic()
        self.server.restart(crash=True, down_for_s=self.config.down_for_s)
        self.report.restart_downtime_s = time.monotonic() - began
        self.report.server_restarts += 1
        self.say(
            f"Redis killed with SIGKILL and restarted at {done:,} tasks done "
            f"({self.report.restart_downtime_s:.2f} s)"
        )


# --------------------------------------------------------------------------------------------
# The checks


@dataclass(frozen=True)
class LeaseLine:
    token: int
    deadline_ms: int
    attempt: int
    log: str


class Checker:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.report = driver.report
        self.config = driver.config
        self.violations = self.report.violations

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def check(self) -> None:
        client = self.driver.client
        keys = make_queue(client).keys
        stats = make_queue(client).stats()
        counts = (stats.ready, stats.delayed, stats.leased, stats.dead)
        if counts != (0, 0, 0, 0):
            self.fail(f"left in the queue (ready, delayed, leased, dead): {counts}")
        tasks_hash = client.hgetall(keys.fixed[4])
        if set(tasks_hash) != {b"seq", b"fence", b"layout"}:
            self.fail(f"the tasks hash holds {len(tasks_hash) - 3} task fields after the run")
        fence = int(tasks_hash.get(b"fence", 0))
        records = self.records(client)
        applied_ack = self.check_records(records, fence)
        self.report.leases = len(self.granted)
        self.report.redeliveries = len(self.granted) - self.config.tasks
        self.check_logs(applied_ack)

    def records(self, client: redis.Redis) -> dict[str, dict[bytes, Any]]:
        """Request records by kind (e, d, a) -> request id -> decoded record."""
        prefix = Namespace(NAMESPACE).prefix + b"q:req:"
        suffix = b":" + QUEUE.encode()
        found = [
            key for key in client.scan_iter(match=prefix + b"*", count=5000) if key.endswith(suffix)
        ]
        decode = client.register_script(DECODE_RECORDS)
        by_kind: dict[str, dict[bytes, Any]] = defaultdict(dict)
        for start in range(0, len(found), 1000):
            chunk = found[start : start + 1000]
            for key, raw in zip(chunk, decode(keys=chunk), strict=True):
                request = key[len(prefix) : -len(suffix)]
                by_kind[request[:1].decode()][request] = json.loads(raw) if raw else None
        return by_kind

    def check_records(self, records: dict[str, dict[bytes, Any]], fence: int) -> dict[bytes, int]:
        tasks = self.config.tasks
        enqueued = records.get("e", {})
        expected = {b"e-" + task_id(index) for index in range(tasks)}
        if set(enqueued) != expected:
            self.fail(f"{len(expected - set(enqueued))} tasks have no enqueue record")
        not_created = [
            rid for rid, record in enqueued.items() if record != ["enqueue", "1", "ready"]
        ]
        if not_created:
            self.fail(
                f"{len(not_created)} enqueue records are not 'created', e.g. {not_created[0]!r}"
            )
        applied_ack: dict[bytes, int] = {}
        for request in records.get("a", {}):
            task, _, token = request[2:].rpartition(b"-")
            if task in applied_ack:
                self.fail(f"task {task!r} acked twice: tokens {applied_ack[task]} and {token!r}")
            applied_ack[task] = int(token)
        missing = [task_id(i) for i in range(tasks) if task_id(i) not in applied_ack]
        if missing:
            self.fail(f"{len(missing)} tasks were never acked (lost), e.g. {missing[0]!r}")
        granted: Counter[int] = Counter()
        self.granted: dict[int, bytes] = {}
        for record in records.get("d", {}).values():
            pairs = record[2:]
            for position in range(0, len(pairs), 2):
                granted[int(pairs[position + 1])] += 1
                self.granted[int(pairs[position + 1])] = pairs[position].encode()
        twice = [token for token, count in granted.items() if count > 1]
        if twice:
            self.fail(f"{len(twice)} fencing tokens were granted twice, e.g. {twice[0]}")
        if granted and max(granted) != fence:
            self.fail(
                f"the largest token in the dequeue records is {max(granted)}, the fence counter "
                f"says {fence}"
            )
        for task, token in applied_ack.items():
            if self.granted.get(token) != task:
                self.fail(f"task {task!r} was acked with token {token}, not one of its leases")
        return applied_ack

    def log_lines(self) -> Iterator[tuple[str, list[str]]]:
        for path in sorted(self.driver.log_dir.glob("*.log")):
            for line in path.read_text().splitlines():
                yield path.stem, line.split()

    def check_logs(self, applied_ack: dict[bytes, int]) -> None:
        leases: dict[bytes, list[LeaseLine]] = defaultdict(list)
        answered: dict[bytes, set[int]] = defaultdict(set)
        pending: dict[str, set[tuple[str, str]]] = defaultdict(set)  # acks sent, not answered
        for log, fields in self.log_lines():
            kind = fields[0]
            if kind == "A":
                pending[log].add((fields[1], fields[2]))
            elif kind in ("K", "S"):
                pending[log].discard((fields[1], fields[2]))
            if kind == "L":
                task, token = fields[1].encode(), int(fields[2])
                leases[task].append(LeaseLine(token, int(fields[3]), int(fields[4]), log))
                if self.granted.get(token) != task:
                    self.fail(f"{log}: lease {fields[1]}/{token} is not in the server's records")
            elif kind == "K":
                answered[fields[1].encode()].add(int(fields[2]))
            elif kind == "S":
                self.report.stale_acks_refused += 1
                task, token = fields[1].encode(), int(fields[2])
                if applied_ack.get(task) == token:
                    self.fail(f"{log}: the ack of {fields[1]}/{token} was refused yet applied")
            elif kind == "E":
                self.report.worker_connection_errors += 1
        pending_at_kill = {
            sent for log in self.driver.killed_logs for sent in pending.get(log, set())
        }
        for task, held in leases.items():
            held.sort(key=lambda lease: lease.token)
            for before, after in itertools.pairwise(held):
                start = after.deadline_ms - self.config.lease_ms
                if start < before.deadline_ms:
                    self.fail(
                        f"task {task!r}: lease {after.token} ({after.log}) began at {start}, "
                        f"before lease {before.token} ({before.log}) ended at "
                        f"{before.deadline_ms}: two leases at once"
                    )
        for task, tokens in answered.items():
            if tokens != {applied_ack.get(task)}:
                self.fail(f"task {task!r}: acks answered for tokens {sorted(tokens)}, applied "
                          f"{applied_ack.get(task)}")  # fmt: skip
        for task, token in applied_ack.items():
            if task in answered:
                continue
            # Applied, never answered: its worker was killed between sending and logging.
            if (task.decode(), str(token)) in pending_at_kill:
                self.report.acks_unanswered += 1
            else:
                self.fail(f"task {task!r}: ack {token} applied but no worker logged it")


# --------------------------------------------------------------------------------------------
# Entry points


def run(config: ChaosConfig) -> ChaosReport:
    """One chaos run on its own server; the report (``report.ok``: every check passed)."""
    binary = config.binary or find_server_binary(ROOT)
    with (
        tempfile.TemporaryDirectory(prefix="luasched-chaos-") as log_dir,
        ThrowawayServer(binary, ["--appendfsync", "always"], persistent=True) as server,
    ):
        driver = Driver(config, server, Path(log_dir))
        try:
            driver.run()
        finally:
            driver.client.close()
        return driver.report


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tests/support/chaos.py", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="(internal) one worker process")
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--worker-id", required=True)
    worker.add_argument("--log", required=True)
    worker.add_argument("--lease-ms", type=int, required=True)
    worker.add_argument("--pause-every", type=int, default=0)
    worker.add_argument("--batch", type=int, default=10)
    defaults = ChaosConfig()
    parser.add_argument("--tasks", type=int, default=defaults.tasks)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--server", type=Path, help="server binary (default: find_server_binary)")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--lease-ms", type=int, default=defaults.lease_ms)
    parser.add_argument("--kills", type=int, default=defaults.kills,
                        help="worker SIGKILLs, at random points of the progress")  # fmt: skip
    parser.add_argument("--down-for", type=float, default=defaults.down_for_s,
                        help="seconds the server stays down when it is killed")  # fmt: skip
    parser.add_argument("--pause-every", type=int, default=defaults.pause_every)
    parser.add_argument("--batch", type=int, default=defaults.batch,
                        help="tasks per dequeue_many (their acks go in one pipeline)")  # fmt: skip
    parser.add_argument("--time-limit", type=float, default=defaults.time_limit_s)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.command == "worker":
        return worker_main(args)
    config = ChaosConfig(
        tasks=args.tasks,
        workers=args.workers,
        binary=args.server,
        seed=random.randrange(2**32) if args.seed is None else args.seed,
        lease_ms=args.lease_ms,
        kills=args.kills,
        down_for_s=args.down_for,
        pause_every=args.pause_every,
        batch=args.batch,
        time_limit_s=args.time_limit,
    )
    report = run(config)
    print("\n".join(report.lines()))
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
