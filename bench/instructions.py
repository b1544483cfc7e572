"""Server instructions per operation (group ``instructions``): callgrind, ours and the peers'.

The CPU µs rows of the other groups move with the machine; the instructions the server executes
for the same calls do not (two server processes, two runs: within ~1-2 %). This group starts its
own throwaway server under ``valgrind --tool=callgrind`` (``--hz 1 --dynamic-hz no``, so the
periodic ``serverCron`` runs once per wall-clock second), and measures each case in *windows*:
``callgrind_control -z`` (counters to zero), the calls, ``callgrind_control -d`` (a dump); a
window's figure is the dump's ``summary:`` minus the inclusive cost of ``serverCron`` in it
(``callgrind_annotate --inclusive=yes``), which would otherwise charge the window for the
seconds it lasted under valgrind. Everything the server does for the calls counts: reading the
request, the command or script, the reply; the client's own work does not.

Every case starts from ``FLUSHALL`` (and a ``SCRIPT FLUSH``-free server: scripts stay loaded),
loads its scripts, warms up outside the windows, and uses task ids and lock names of one fixed
width, so no case pays for longer strings than another. The cases:

* locks: one uncontended acquire + release, ``LOCK_CYCLES`` times: luasched's lock (plain,
  fair, reentrant), redis-py ``Lock``, python-redis-lock, pottery ``Redlock`` on one master;
* queue, one task at a time: enqueue + dequeue + ack (luasched), enqueue + ``ack_and_dequeue``
  (luasched), Dramatiq with prefetch 1 (``send`` + the consumer's fetch + ``ack``);
* queue, batched: per round 16 enqueues (one call each) in one window, then one
  ``dequeue_many(16)`` + the 16 acks in one pipeline (luasched) or the consumer's fetch of 16 +
  16 acks (Dramatiq, prefetch 16) in another, at queue depths 16, 208 and 10,000 (the depth the
  queue holds before the round's enqueues: 0, 192 and 9,984 tasks are put in first, unmeasured);
  the enqueue windows alone give the enqueue rows;
* queue floors (bench/cases.py ``FEATURED_*``, the least a queue with luasched's guarantees
  executes, and ``SHAPED_*``, Dramatiq's shape with a request record per call), called with
  EVALSHA in the same shapes: one at a time (the featured one also with ack-and-take-next) and
  batched (the featured one at the three depths, the shaped one at 16), and the featured one
  batched at depth 16 with a batch's acks in one call (``FEATURED_ACK_MANY``);
* queue with groups (issue 21): one ``dequeue`` per call, then the ``ack`` of each, in two
  windows, from a queue of 2,000 ready tasks without groups (``queue.dequeue``, ``queue.ack``) and
  from queues with 10 groups of 200 and 100,000 groups of 2 (``queue.group_dequeue``,
  ``queue.group_ack``); those queues are built on a server without valgrind and RESTOREd;
* RQ and BullMQ, one task's whole life: N enqueues, then the library's worker drains them (RQ
  ``SimpleWorker`` in burst mode; BullMQ's ``Worker``, concurrency 1), all in one window: the
  worker's start and stop are charged to the N tasks.

Dramatiq runs with ``maintenance_chance=0`` (no random sweep inside a window). A peer that is not
installed (the ``bench`` extra) is left out, and so is the whole group when valgrind is not found
(``apt-get install valgrind``); the report says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

import luasched
from luasched.testing import HOST, ThrowawayServer

from .cases import (
    FEATURED_ACK,
    FEATURED_ACK_MANY,
    FEATURED_DEQUEUE,
    FEATURED_ENQUEUE,
    FEATURED_REQUEST_TTL_MS,
    SHAPED_ACK,
    SHAPED_ENQUEUE,
    SHAPED_FETCH,
    _installed,
    _lock_cycle,
)

#: The cases run, and how many operations each window holds.
LOCK_CYCLES = 300
ONE_AT_A_TIME = 300
BATCH = 16
BATCH_ROUNDS = 20
DEPTHS = (16, 208, 10_000)
LIFE_TASKS = 200
WARM = 20
PAYLOAD = b"p" * 32
LOCK_TTL_MS = 600_000
LEASE_MS = 600_000
NAMESPACE = "bench-instr"
QUEUE = "instr"
#: serverCron's inclusive cost in a callgrind_annotate line: "1,234,567 (12.3%)  file:serverCron".
_CRON = re.compile(r"^\s*([\d,]+)\s.*[:\s]serverCron\b", re.MULTILINE)


def valgrind() -> str | None:
    """The valgrind binary, or None (then the group does not run)."""
    found = shutil.which("valgrind")
    return found if found and shutil.which("callgrind_control") else None


@dataclass
class Callgrind:
    """A throwaway server under callgrind, and the windows measured on it."""

    binary: Path
    server: ThrowawayServer = field(init=False)
    directory: Path = field(init=False)

    def __enter__(self) -> Callgrind:
        self.directory = Path(tempfile.mkdtemp(prefix="luasched-callgrind-"))
        self.server = ThrowawayServer(
            self.binary,
            ["--hz", "1", "--dynamic-hz", "no"],
            launcher=[
                str(valgrind()),
                "--tool=callgrind",
                f"--callgrind-out-file={self.directory}/callgrind.out.%p",
                "--dump-instr=no",
            ],
            ready_timeout_s=120.0,
        )
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.server.port, socket_timeout=120)

    def _control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    @contextlib.contextmanager
    def window(self, into: list[int]) -> Iterator[None]:
        """Count what the server executes inside the block; append it (serverCron excluded)."""
        self._control("-z")
        yield
        before = set(self.directory.glob("callgrind.out.*"))
        self._control("-d", "window")
        deadline = time.monotonic() + 60
        while True:
            dumps = set(self.directory.glob("callgrind.out.*")) - before
            if dumps or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        (dump,) = dumps
        text = dump.read_text(errors="replace")
        total = int(re.search(r"^summary:\s+(\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
        annotated = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        cron = sum(int(found.replace(",", "")) for found in _CRON.findall(annotated))
        dump.unlink()
        into.append(total - cron)


@dataclass
class Figure:
    """One row: instructions per operation over its windows."""

    name: str
    operations: int = 0
    windows: list[int] = field(default_factory=list)

    @property
    def per_op(self) -> float:
        return sum(self.windows) / self.operations if self.operations else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "per_op": round(self.per_op),
            "operations": self.operations,
            "windows": self.windows,
        }


def _ids(prefix: str) -> Iterator[bytes]:
    number = 0
    while True:
        number += 1
        yield f"{prefix}{number:012d}".encode()


# ------------------------------------------------------------------------------------ locks


def _lock_rows(cg: Callgrind) -> list[Figure]:
    def luasched_cycle(client: redis.Redis, **options: Any) -> Callable[[], None]:
        scheduler = luasched.Scheduler(client, NAMESPACE)
        scheduler.load_scripts()
        lock = scheduler.lock("lock-000000000001", ttl_ms=LOCK_TTL_MS, **options)

        def cycle() -> None:
            handle = lock.acquire(blocking=False)
            if handle is None:
                raise RuntimeError("an uncontended lock was not acquired")
            handle.release()

        return cycle

    def redis_py(client: redis.Redis) -> Callable[[], None]:
        lock = client.lock("lock-000000000001", timeout=LOCK_TTL_MS / 1000)
        return _lock_cycle(lambda: lock.acquire(blocking=False), lock.release)

    def python_redis_lock(client: redis.Redis) -> Callable[[], None]:
        import redis_lock

        lock = redis_lock.Lock(client, "lock-000000000001", expire=LOCK_TTL_MS // 1000)
        return _lock_cycle(lambda: lock.acquire(blocking=False), lock.release)

    def pottery(client: redis.Redis) -> Callable[[], None]:
        from pottery import Redlock

        lock = Redlock(
            key="lock-000000000001", masters={client}, auto_release_time=LOCK_TTL_MS / 1000
        )
        return _lock_cycle(lambda: lock.acquire(blocking=False), lock.release)

    makers: list[tuple[str, str | None, Callable[[redis.Redis], Callable[[], None]]]] = [
        ("luasched lock", None, luasched_cycle),
        ("luasched fair lock", None, lambda c: luasched_cycle(c, fair=True)),
        ("luasched reentrant lock", None, lambda c: luasched_cycle(c, reentrant=True)),
        ("redis-py Lock", None, redis_py),
        ("python-redis-lock", "redis_lock", python_redis_lock),
        ("pottery Redlock (1 master)", "pottery", pottery),
        *(
            (name, None, lambda c, floor=floor: _floor_cycle(c, floor))
            for name, floor in LOCK_FLOORS.items()
        ),
    ]
    figures = []
    for name, module, make in makers:
        if module is not None and not _installed(module):
            continue
        client = cg.client()
        try:
            client.flushall()
            cycle = make(client)
            for _ in range(WARM):
                cycle()
            figure = Figure(name, LOCK_CYCLES)
            with cg.window(figure.windows):
                for _ in range(LOCK_CYCLES):
                    cycle()
            figures.append(figure)
        finally:
            client.close()
    return figures


FLOOR_PLAIN = "floor: SET NX PX + release script (redis-py Lock's shape, no fencing token)"
FLOOR_FENCED = "floor: acquire script (SET NX PX + INCR fence) + release script"
FLOOR_CLOCK = (
    "floor: acquire script (SET NX PX, TIME, fence = max(stored + 1, server µs)) + release script"
)
FLOOR_FAIR = (
    "floor: fair lock: the clock-fenced acquire checks the waiters' queue first (EXISTS) "
    "+ release script"
)
FLOOR_REENTRANT = (
    "floor: reentrant lock: the clock-fenced acquire and the release each GET and SET a "
    "request record (replays of a token that holds several times)"
)
FLOOR_SHAPE = (
    "floor: luasched's call shape (lock.acquire's 5 KEYS + 6 ARGV and 7-integer reply, "
    "lock.release's 5 KEYS + 2 ARGV and 3-element reply), no redis call"
)


@dataclass(frozen=True)
class LockFloor:
    """A lock cycle that makes only the calls a guarantee needs (no argument checks): not
    luasched's scripts, what any design with that guarantee pays. ``acquire`` None: a bare
    ``SET NX PX``. KEYS: the hold, the fence (when the acquire is a script), the fair queue
    (``queue``), a fresh request record per call (``records``, last; the release gets the
    hold and it). ``of``: the luasched row whose least it is."""

    acquire: str | None
    release: str
    of: str
    queue: bool = False
    records: bool = False
    #: The call shape floor: luasched's KEYS and ARGV, no fence key.
    luasched_keys: bool = False


#: The release of redis-py's ``Lock``: GET, compare, DEL.
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
#: The failover-safe fencing token (lua/include/fence.j2's rule): TIME, GET and SET of the fence.
_CLOCK_FENCE = (
    "local t = redis.call('TIME') local now = t[1] * 1000000 + t[2] "
    "local stored = redis.call('GET', KEYS[2]) local token = stored and stored + 1 or 1 "
    "if now > token then token = now end redis.call('SET', KEYS[2], token) "
)
_SET_NX = "if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end "
LOCK_FLOORS = {
    FLOOR_PLAIN: LockFloor(None, _RELEASE, "luasched lock"),
    FLOOR_FENCED: LockFloor(
        "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then "
        "return redis.call('INCR', KEYS[2]) end return false",
        _RELEASE,
        "luasched lock",
    ),
    FLOOR_CLOCK: LockFloor(_SET_NX + _CLOCK_FENCE + "return token", _RELEASE, "luasched lock"),
    # A free lock with live waiters queued goes to the oldest: the acquire must see the queue
    # (its release finds a waiter's mark in the hold's value, which GET already read).
    FLOOR_FAIR: LockFloor(
        "if redis.call('EXISTS', KEYS[3]) == 1 then return false end "
        + _SET_NX
        + _CLOCK_FENCE
        + "return token",
        _RELEASE,
        "luasched fair lock",
        queue=True,
    ),
    # One token holds several times, so only a request id tells a resent call from a new one:
    # each call looks its record up first and writes it last (the hold's value carries the count).
    FLOOR_REENTRANT: LockFloor(
        "local recorded = redis.call('GET', KEYS[3]) if recorded then return recorded end "
        "if not redis.call('SET', KEYS[1], ARGV[1] .. ' 1', 'NX', 'PX', ARGV[2]) then "
        "return false end "
        + _CLOCK_FENCE
        + "redis.call('SET', KEYS[3], token, 'PX', 60000) return token",
        "local recorded = redis.call('GET', KEYS[2]) if recorded then return recorded end "
        "if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' 1' then return 0 end "
        "redis.call('DEL', KEYS[1]) redis.call('SET', KEYS[2], '1', 'PX', 60000) return 1",
        "luasched reentrant lock",
        records=True,
    ),
    FLOOR_SHAPE: LockFloor(
        "return {'acquired', 1764800000000001, 1764800600000, 1, 0, 0, 1764800000000}",
        "return {'released', 0, 1764800000000}",
        "luasched lock",
        luasched_keys=True,
    ),
}


def _floor_cycle(client: redis.Redis, floor: LockFloor) -> Callable[[], None]:
    """A lock cycle of a floor: its acquire (a bare SET NX PX when None), then its release."""
    release = client.script_load(floor.release)
    acquire = client.script_load(floor.acquire) if floor.acquire else None
    hold, fence, queue = "lock-000000000001", "fence-00000000001", "queue-00000000001"
    token = b"token-0000000001"
    requests = _ids("req-")
    luasched_keys = [
        f"luasched:{{{NAMESPACE}}}:{kind}:lock-000000000001"
        for kind in ("lock", "lock-queue", "lock-places", "lock-wake", "lock-req:")
    ]

    def cycle() -> None:
        if floor.luasched_keys:
            granted = client.evalsha(acquire, 5, *luasched_keys, token, LOCK_TTL_MS, 0, 0, 0, "")
            released = client.evalsha(release, 5, *luasched_keys, token, "")
            ok = granted[0] == b"acquired" and released[0] == b"released"
        else:
            if acquire is None:
                granted = client.set(hold, token, nx=True, px=LOCK_TTL_MS)
            else:
                keys = [hold, fence, *([queue] if floor.queue else [])]
                keys += [next(requests)] if floor.records else []
                granted = client.evalsha(acquire, len(keys), *keys, token, LOCK_TTL_MS)
            keys = [hold, *([next(requests)] if floor.records else [])]
            ok = bool(granted) and client.evalsha(release, len(keys), *keys, token) == 1
        if not ok:
            raise RuntimeError("an uncontended floor lock was not acquired and released")

    return cycle


# ------------------------------------------------------------------------------------ queue


class _Luasched:
    """luasched's queue as the worker runtime uses it."""

    def __init__(self, client: redis.Redis) -> None:
        self.scheduler = luasched.Scheduler(client, NAMESPACE)
        self.scheduler.load_scripts()
        self.queue = self.scheduler.queue(QUEUE)
        self.ids = _ids("task-")
        self.worker = b"worker-000001"

    def fill(self, count: int) -> None:
        for start in range(0, count, 1000):
            with self.scheduler.pipeline() as pipe:
                queue = pipe.queue(QUEUE)
                for _ in range(min(1000, count - start)):
                    queue.enqueue(next(self.ids), PAYLOAD)
                pipe.execute()

    def enqueue(self) -> None:
        self.queue.enqueue(next(self.ids), PAYLOAD)

    def take_batch(self) -> None:
        leases = self.queue.dequeue_many(self.worker, BATCH, LEASE_MS)
        if len(leases) != BATCH:
            raise RuntimeError(f"dequeue_many took {len(leases)} of {BATCH}")
        with self.scheduler.pipeline() as pipe:
            acks = pipe.queue(QUEUE)
            for lease in leases:
                acks.ack(lease)
            pipe.execute()

    def take_one(self) -> None:
        lease = self.queue.dequeue(self.worker, LEASE_MS)
        if lease is None or not self.queue.ack(lease):
            raise RuntimeError("no task to take")

    def cycle(self) -> None:
        self.enqueue()
        self.take_one()

    def close(self) -> None:
        """Nothing to close: the caller closes the client."""


class _Dramatiq:
    """Dramatiq's RedisBroker: ``actor.send`` and its consumer (fetch, ack), prefetch ``n``."""

    def __init__(self, port: int, prefetch: int) -> None:
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        self.broker = RedisBroker(url=f"redis://{HOST}:{port}/0", maintenance_chance=0)
        self.actor = dramatiq.actor(
            lambda payload: None, broker=self.broker, actor_name="instr", queue_name=QUEUE
        )
        self.consumer = self.broker.consume(QUEUE, prefetch=prefetch, timeout=1000)
        self.prefetch = prefetch

    def fill(self, count: int) -> None:
        for _ in range(count):
            self.enqueue()

    def enqueue(self) -> None:
        self.actor.send(PAYLOAD.decode())

    def take(self, count: int) -> None:
        for _ in range(count):
            message = next(self.consumer)
            if message is None:
                raise RuntimeError("Dramatiq's consumer found no message")
            self.consumer.ack(message)

    def take_batch(self) -> None:
        self.take(BATCH)

    def take_one(self) -> None:
        self.take(1)

    def cycle(self) -> None:
        self.enqueue()
        self.take_one()

    def close(self) -> None:
        self.consumer.close()
        self.broker.close()


class _Floor:
    """A queue floor of bench/cases.py (scripts called with EVALSHA, no wrapper): ``FEATURED_*``
    (``shaped=False``: today's guarantees at the least) or ``SHAPED_*`` (Dramatiq's shape plus
    a request record per call). Every call has a fresh request key of one fixed width."""

    def __init__(self, client: redis.Redis, shaped: bool = False, ack_many: bool = False) -> None:
        self.client = client
        self.shaped = shaped
        #: The acks of a batch in one call (FEATURED_ACK_MANY) instead of one call each.
        self.ack_many_sha = client.script_load(FEATURED_ACK_MANY) if ack_many else None
        scripts = (
            (SHAPED_ENQUEUE, SHAPED_FETCH, SHAPED_ACK)
            if shaped
            else (FEATURED_ENQUEUE, FEATURED_DEQUEUE, FEATURED_ACK)
        )
        self.enqueue_sha, self.dequeue_sha, self.ack_sha = (
            client.script_load(script) for script in scripts
        )
        kinds = (
            ("queue", "messages", "unacked") if shaped else ("ready", "delayed", "leased", "tasks")
        )
        self.keys = tuple(f"floor:{{q}}:{kind}" for kind in kinds)
        self.ids = _ids("task-")
        self.requests = _ids("floor:{q}:req:")
        self.held: Any = None

    def _call(self, target: Any, sha: str, *args: object) -> Any:
        keys = (*self.keys, next(self.requests))
        return target.evalsha(sha, len(keys), *keys, *args)

    def _enqueue_args(self) -> tuple[object, ...]:
        task = next(self.ids)
        if self.shaped:
            return (task, PAYLOAD, FEATURED_REQUEST_TTL_MS)
        return (task, PAYLOAD, 0, FEATURED_REQUEST_TTL_MS)

    def fill(self, count: int) -> None:
        for start in range(0, count, 1000):
            pipe = self.client.pipeline(transaction=False)
            for _ in range(min(1000, count - start)):
                self._call(pipe, self.enqueue_sha, *self._enqueue_args())
            pipe.execute()

    def enqueue(self) -> None:
        if self._call(self.client, self.enqueue_sha, *self._enqueue_args()) != 1:
            raise RuntimeError("a floor enqueue did not enqueue")

    def _take(self, count: int, *ack: object) -> list[tuple[bytes, int]]:
        """``count`` tasks taken, as (id, token) pairs (the shaped floor: token 0)."""
        if self.shaped:
            taken = self._call(self.client, self.dequeue_sha, count, FEATURED_REQUEST_TTL_MS)
            pairs = [(task, 0) for task in (taken or [])[::2]]
        else:
            taken = self._call(
                self.client, self.dequeue_sha, count, LEASE_MS, FEATURED_REQUEST_TTL_MS, *ack
            )
            pairs = list(zip((taken or [])[::5], (taken or [])[3::5], strict=True))
        if len(pairs) != count:
            raise RuntimeError(f"a floor dequeue took {len(pairs)} of {count}")
        return pairs

    def _ack(self, target: Any, task: bytes, token: int) -> Any:
        if self.shaped:
            return self._call(target, self.ack_sha, task, FEATURED_REQUEST_TTL_MS)
        return self._call(target, self.ack_sha, task, token, FEATURED_REQUEST_TTL_MS)

    def take_batch(self) -> None:
        taken = self._take(BATCH)
        if self.ack_many_sha is not None:
            leases = [part for task, token in taken for part in (task, token)]
            acked = self._call(self.client, self.ack_many_sha, FEATURED_REQUEST_TTL_MS, *leases)
        else:
            pipe = self.client.pipeline(transaction=False)
            for task, token in taken:
                self._ack(pipe, task, token)
            acked = pipe.execute()
        if acked != [1] * BATCH:
            raise RuntimeError("a floor ack was refused")

    def cycle(self) -> None:
        self.enqueue()
        ((task, token),) = self._take(1)
        if self._ack(self.client, task, token) != 1:
            raise RuntimeError("a floor ack was refused")

    def ack_and_take(self) -> None:
        """Enqueue one, then ack the held task and lease the next in one call (featured only)."""
        self.enqueue()
        if self.held is None:
            (self.held,) = self._take(1)
        else:
            (self.held,) = self._take(1, *self.held)

    def close(self) -> None:
        """Nothing to close: the caller closes the client."""


def _floor(shaped: bool, aad: bool = False) -> Callable[[redis.Redis], Any]:
    def make(client: redis.Redis) -> tuple[Callable[[], None], Callable[[], None]]:
        floor = _Floor(client, shaped)
        return (floor.ack_and_take if aad else floor.cycle), floor.close

    return make


def _one_at_a_time(cg: Callgrind, name: str, make: Callable[[redis.Redis], Any]) -> Figure:
    """``ONE_AT_A_TIME`` steps of ``make(client)``'s step (after ``WARM``), one window."""
    client = cg.client()
    client.flushall()
    figure = Figure(name, ONE_AT_A_TIME)
    step, close = make(client)
    try:
        for _ in range(WARM):
            step()
        with cg.window(figure.windows):
            for _ in range(ONE_AT_A_TIME):
                step()
    finally:
        close()
        client.close()
    return figure


def _luasched_cycle(client: redis.Redis) -> tuple[Callable[[], None], Callable[[], None]]:
    ours = _Luasched(client)
    return ours.cycle, ours.close


def _luasched_ack_and_dequeue(client: redis.Redis) -> tuple[Callable[[], None], Callable[[], None]]:
    """Enqueue one, then ack the held task and lease the next in one call."""
    ours = _Luasched(client)
    ours.enqueue()
    held = [ours.queue.dequeue(ours.worker, LEASE_MS)]

    def step() -> None:
        ours.enqueue()
        held[0] = ours.queue.ack_and_dequeue(held[0], ours.worker, LEASE_MS)
        if held[0] is None:
            raise RuntimeError("ack_and_dequeue found no task")

    return step, ours.close


def _dramatiq_cycle(cg: Callgrind) -> Callable[[redis.Redis], Any]:
    def make(client: redis.Redis) -> tuple[Callable[[], None], Callable[[], None]]:
        peer = _Dramatiq(cg.server.port, 1)
        return peer.cycle, peer.close

    return make


def _batched(
    cg: Callgrind, label: str, make: Callable[[redis.Redis], Any], depth: int
) -> list[Figure]:
    """``BATCH_ROUNDS`` rounds at ``depth``: the round's enqueues in one window, its batched take
    and acks in another; three figures (enqueue, take + acks, the whole task)."""
    client = cg.client()
    client.flushall()
    peer = make(client)
    try:
        peer.fill(depth - BATCH)
        for _ in range(2):  # warm-up rounds
            for _ in range(BATCH):
                peer.enqueue()
            peer.take_batch()
        tasks = BATCH * BATCH_ROUNDS
        enqueues = Figure(f"{label}: enqueue, depth {depth}", tasks)
        takes = Figure(f"{label}: batched take + acks, depth {depth}", tasks)
        for _ in range(BATCH_ROUNDS):
            with cg.window(enqueues.windows):
                for _ in range(BATCH):
                    peer.enqueue()
            with cg.window(takes.windows):
                peer.take_batch()
    finally:
        peer.close()
        client.close()
    whole = Figure(f"{label}: batched task, depth {depth}", tasks, enqueues.windows + takes.windows)
    return [enqueues, takes, whole]


def _queue_rows(cg: Callgrind) -> list[Figure]:
    dramatiq = _installed("dramatiq")
    figures = [
        _one_at_a_time(cg, ONE_LUASCHED, _luasched_cycle),
        _one_at_a_time(cg, ONE_LUASCHED_AAD, _luasched_ack_and_dequeue),
    ]
    if dramatiq:
        figures.append(_one_at_a_time(cg, ONE_DRAMATIQ, _dramatiq_cycle(cg)))
    figures += [
        _one_at_a_time(cg, ONE_FLOOR, _floor(shaped=False)),
        _one_at_a_time(cg, ONE_FLOOR_AAD, _floor(shaped=False, aad=True)),
        _one_at_a_time(cg, ONE_SHAPED, _floor(shaped=True)),
    ]
    figures += _batched(cg, SHAPED, lambda client: _Floor(client, shaped=True), DEPTHS[0])
    figures += _batched(cg, FLOOR_ACK_MANY, lambda client: _Floor(client, ack_many=True), DEPTHS[0])
    for depth in DEPTHS:
        figures += _batched(cg, LUASCHED, _Luasched, depth)
        figures += _batched(cg, FLOOR, _Floor, depth)
        if dramatiq:
            figures += _batched(
                cg, DRAMATIQ_16, lambda _client: _Dramatiq(cg.server.port, BATCH), depth
            )
    if _installed("rq"):
        figures.append(_rq_life(cg))
    if _installed("bullmq"):
        try:
            figures.append(_bullmq_life(cg))
        except asyncio.TimeoutError:  # TimeoutError itself on 3.11+, not on 3.10
            # Seen once: its Worker took none of the jobs within the bound. Left out of this
            # run (docs/bench.md then has no BullMQ row) rather than ending the whole bench.
            print("bench: BullMQ's worker did not finish its tasks in 120 s: row left out")
    return figures


# ------------------------------------------------------------------------ queue with groups


def _queue_state(binary: Path, groups: int, per_group: int) -> dict[bytes, bytes]:
    """The DUMP of every key of a queue holding ``per_group`` ready tasks in each of ``groups``
    groups (``groups`` 0: that many tasks without a group), built on a throwaway server of
    ``binary`` without valgrind (200,000 enqueues under callgrind would take many minutes) and
    RESTOREd into the measured one: the same data, written by the same scripts."""
    with ThrowawayServer(binary) as server:
        client = redis.Redis(host=HOST, port=server.port, socket_timeout=120)
        try:
            scheduler = luasched.Scheduler(client, NAMESPACE)
            ids = _ids("task-")
            names = [b"group-%06d" % index for index in range(groups)] or [None]
            tasks = [name for _ in range(per_group) for name in names]
            for start in range(0, len(tasks), 2000):
                with scheduler.pipeline() as pipe:
                    queue = pipe.queue(QUEUE, grouped=bool(groups))
                    for group in tasks[start : start + 2000]:
                        queue.enqueue(next(ids), PAYLOAD, request_id=b"", group=group)
                    pipe.execute()
            keys = list(client.scan_iter(match=f"luasched:{{{NAMESPACE}}}:*", count=1000))
            return {key: client.dump(key) for key in keys}
        finally:
            client.close()


def _dequeue_and_ack(cg: Callgrind, state: dict[bytes, bytes], grouped: bool) -> list[Figure]:
    """One task at a time from the queue in ``state``: ``ONE_AT_A_TIME`` dequeues in one window,
    then their acks in another (after ``WARM`` of each); two figures."""
    client = cg.client()
    client.flushall()
    try:
        for key, dumped in state.items():
            client.restore(key, 0, dumped)
        scheduler = luasched.Scheduler(client, NAMESPACE)
        scheduler.load_scripts()
        queue = scheduler.queue(QUEUE, grouped=grouped)
        worker = b"worker-000001"
        for _ in range(WARM):
            lease = queue.dequeue(worker, LEASE_MS)
            if lease is None or not queue.ack(lease):
                raise RuntimeError("no task to take")
        dequeues = Figure("", ONE_AT_A_TIME)
        acks = Figure("", ONE_AT_A_TIME)
        leases = []
        with cg.window(dequeues.windows):
            for _ in range(ONE_AT_A_TIME):
                leases.append(queue.dequeue(worker, LEASE_MS))
        if any(lease is None for lease in leases):
            raise RuntimeError("a dequeue found no task")
        with cg.window(acks.windows):
            for lease in leases:
                queue.ack(lease)
        return [dequeues, acks]
    finally:
        client.close()


def _group_rows(cg: Callgrind) -> list[Figure]:
    """Issue 21: a dequeue and an ack of a queue with groups (``queue.group_dequeue``,
    ``queue.group_ack``) at 10 and 100,000 groups, beside the same calls without groups."""
    figures = []
    for groups, per_group in ((0, GROUP_DEPTH), *GROUP_STATES):
        dequeue, ack = _dequeue_and_ack(cg, _queue_state(cg.binary, groups, per_group), groups > 0)
        dequeue.name, ack.name = group_row("dequeue", groups), group_row("ack", groups)
        figures += [dequeue, ack]
    return figures


def group_row(call: str, groups: int) -> str:
    """The name of issue 21's row of ``call`` (dequeue, ack) with ``groups`` groups (0: none)."""
    if not groups:
        return f"luasched {call}, no groups ({GROUP_DEPTH:,} ready)"
    return f"luasched {call} with groups, {groups:,} groups"


def _drain(cg: Callgrind, name: str, work: Callable[..., None]) -> Figure:
    """``DRAIN_TASKS`` tasks (put in unmeasured) drained by ``DRAIN_WORKERS`` forked processes
    running ``work`` (bench/queue_peers.py's hand-written loop or ``luasched.Worker``), the
    whole drain in one window: workers' start and stop are charged to the tasks."""
    import multiprocessing

    from . import queue_peers
    from .engine import Env, Settings

    context = multiprocessing.get_context("fork")
    queue_peers._COUNTER = context.Value("q", 0)
    env = Env(HOST, cg.server.port, Settings())
    client = cg.client()
    client.flushall()
    figure = Figure(name, DRAIN_TASKS)
    try:
        queue_peers.luasched_fill(env, DRAIN_TASKS)
        stop = context.Event()
        processes = [
            context.Process(target=work, args=(env, stop, lambda: None), daemon=True)
            for _ in range(DRAIN_WORKERS)
        ]
        with cg.window(figure.windows):
            for process in processes:
                process.start()
            for process in processes:
                process.join(600)
        alive = [process for process in processes if process.is_alive()]
        for process in alive:
            process.kill()
        if alive or queue_peers._COUNTER.value != DRAIN_TASKS:
            raise RuntimeError(f"{name}: ran {queue_peers._COUNTER.value} of {DRAIN_TASKS}")
    finally:
        client.close()
    return figure


def _drain_rows(cg: Callgrind) -> list[Figure]:
    from . import queue_peers

    return [
        _drain(cg, DRAIN_LOOP, queue_peers.luasched_work),
        _drain(cg, DRAIN_WORKER, queue_peers.luasched_worker_work),
    ]


def _rq_life(cg: Callgrind) -> Figure:
    """``LIFE_TASKS`` ``Queue.enqueue`` calls, then ``SimpleWorker.work(burst=True)``."""
    import multiprocessing

    from rq import Queue, SimpleWorker

    from . import queue_peers

    queue_peers._COUNTER = multiprocessing.Value("q", 0)
    client = cg.client()
    client.flushall()
    figure = Figure(LIFE_RQ, LIFE_TASKS)
    try:
        queue = Queue(QUEUE, connection=client)
        with cg.window(figure.windows):
            for _ in range(LIFE_TASKS):
                queue.enqueue(queue_peers.count_task, PAYLOAD)
            SimpleWorker([queue], connection=client).work(burst=True, logging_level="WARNING")
        if queue_peers._COUNTER.value != LIFE_TASKS:
            raise RuntimeError(f"RQ ran {queue_peers._COUNTER.value} of {LIFE_TASKS} tasks")
    finally:
        client.close()
    return figure


def _bullmq_life(cg: Callgrind) -> Figure:
    """``LIFE_TASKS`` ``Queue.add`` calls, then a ``Worker`` (concurrency 1) until all ran; no
    timer of BullMQ's fires inside the window (stalled checks and lock renewals every hour)."""
    from bullmq import Queue, Worker

    url = f"redis://{HOST}:{cg.server.port}/0"
    cg.client().flushall()
    figure = Figure(LIFE_BULLMQ, LIFE_TASKS)
    done = 0

    async def process(job: Any, token: str) -> None:
        nonlocal done
        done += 1

    async def life() -> None:
        queue = Queue(QUEUE, {"connection": url})
        for _ in range(LIFE_TASKS):
            await queue.add("task", {"p": PAYLOAD.decode()})
        worker = Worker(
            QUEUE,
            process,
            {"connection": url, "stalledInterval": 3_600_000, "lockDuration": 3_600_000},
        )
        while done < LIFE_TASKS:
            await asyncio.sleep(0.01)
        await worker.close()
        await queue.close()

    with cg.window(figure.windows):
        asyncio.run(asyncio.wait_for(life(), 120))
    return figure


ONE_LUASCHED = "luasched, one task at a time: enqueue + dequeue + ack"
ONE_LUASCHED_AAD = "luasched, one task at a time: enqueue + ack_and_dequeue"
ONE_DRAMATIQ = "Dramatiq prefetch 1: send + fetch + ack"
LUASCHED = "luasched"
FLOOR = "queue floor: featured"
ONE_FLOOR = f"{FLOOR}, one task at a time: enqueue + dequeue + ack"
ONE_FLOOR_AAD = f"{FLOOR}, one task at a time: enqueue + ack_and_dequeue"
SHAPED = "queue floor: Dramatiq-shaped + a request record per call"
FLOOR_ACK_MANY = f"{FLOOR}, a batch's acks in one call"
ONE_SHAPED = f"{SHAPED}, one task at a time: enqueue + fetch + ack"
DRAIN_WORKERS = 4
DRAIN_TASKS = 4_000
DRAIN_LOOP = (
    "luasched, 4 processes drain a backlog: dequeue_many(16) + the acks in one pipeline, per task"
)
DRAIN_WORKER = "luasched.Worker, 4 processes drain a backlog (no-op handler, batch 16), per task"
#: Issue 21's queue states: tasks without a group, then (groups, ready tasks per group); the
#: groups take turns, so each take and ack is of another group's task.
GROUP_DEPTH = 2_000
GROUP_STATES = ((10, 200), (100_000, 2))
LIFE_RQ = "RQ: Queue.enqueue, then SimpleWorker (burst)"
LIFE_BULLMQ = "BullMQ: Queue.add, then Worker (concurrency 1)"
DRAMATIQ_16 = "Dramatiq prefetch 16"


def measure(binary: Path, phase: Callable[[str, int, int], None], quick: bool) -> dict[str, Any]:
    """Every instruction figure on a throwaway server of ``binary`` under callgrind; ``quick``:
    a quarter of the operations per case (the figures move by ~1-2 %, Lua's garbage collector
    stepping every 50 script calls being the larger share of it)."""
    global LOCK_CYCLES, ONE_AT_A_TIME, BATCH_ROUNDS, LIFE_TASKS, DRAIN_TASKS
    if quick:
        LOCK_CYCLES, ONE_AT_A_TIME, BATCH_ROUNDS, LIFE_TASKS, DRAIN_TASKS = 100, 100, 6, 50, 1000
    with Callgrind(binary) as cg:
        info = cg.server.info()
        phase("locks", 1, 2)
        rows = _lock_rows(cg)
        phase("queue", 2, 2)
        rows += _queue_rows(cg)
        rows += _group_rows(cg)
        rows += _drain_rows(cg)
    return {
        "server": info,
        "method": "callgrind summary minus serverCron's inclusive cost, per operation",
        "rows": {figure.name: figure.as_dict() for figure in rows},
        "floor_of": {name: floor.of for name, floor in LOCK_FLOORS.items()},
    }


def line(result: dict[str, Any]) -> str:
    """The one-line summary ``python -m bench`` prints when the group is done."""
    if result.get("skipped"):
        return f"instructions: not measured ({result['skipped']})"
    rows = result["rows"]
    shown = ", ".join(
        f"{name} {rows[name]['per_op']:,}"
        for name in ("luasched lock", "redis-py Lock", ONE_LUASCHED, ONE_DRAMATIQ)
        if name in rows
    )
    return f"instructions per op: {shown}"
