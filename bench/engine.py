"""The measuring engine: a registry of cases, and how one case becomes one row of numbers.

A *case* is one row of the report: a name, a group, and a factory that builds a *worker* for one
client (``Worker.call`` does one call, ``Worker.batch(n)`` does ``n`` calls in one round trip).
The engine runs each case in up to three *modes*, each for several *rounds*:

* ``single``: one client, one call per round trip;
* ``pipelined``: one client, ``batch`` calls per round trip (``Worker.batch``);
* ``multi``: ``clients`` processes (fork), each with its own connection, one call per round trip.

Around every round it reads ``INFO cpu`` and ``INFO commandstats`` on a separate control
connection, so each round yields: calls and logical ops done, wall time, the Redis main thread's
CPU time (user + sys, which includes reading and writing the sockets), and the commandstats time
of the commands the clients sent themselves (see ``SENT``). Rounds are bounded both in time
(``seconds``) and in count (``max_calls``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from luasched.testing import die_with_parent

MODES = ("single", "pipelined", "multi")

#: Top-level commands sent by the benchmark clients of this process, by lower-cased name
#: (``SCRIPT LOAD`` -> ``script``). Commands that a script runs inside EVALSHA also show in
#: ``INFO commandstats`` under their own name; counting only what the clients sent keeps them
#: out of the commandstats view (they are already inside EVALSHA's time).
SENT: Counter[str] = Counter()


def _command_name(first: object) -> str:
    raw = first.decode() if isinstance(first, bytes) else str(first)
    return raw.split(" ", 1)[0].lower()


class CountingConnection(redis.Connection):
    """A redis-py connection that counts, in ``SENT``, every command it sends."""

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        SENT[_command_name(args[0])] += 1
        base: Any = super()
        base.send_command(*args, **kwargs)

    def pack_commands(self, commands: Iterable[Any]) -> list[bytes | memoryview]:
        commands = list(commands)
        for command in commands:
            SENT[_command_name(command[0])] += 1
        base: Any = super()
        packed: list[bytes | memoryview] = base.pack_commands(commands)
        return packed


@dataclass
class Settings:
    """How long and how hard to measure (``--quick`` shrinks them)."""

    rounds: int = 5
    seconds: float = 1.0  # per round and mode
    max_calls: int = 300_000  # per round and mode, all clients together
    batch: int = 100  # calls per round trip in the pipelined mode
    clients: int = 4  # processes in the multi mode
    warmup_calls: int = 20
    contention_seconds: float = 5.0  # per contention row (bench/contention.py)
    peer_rounds: int = 3  # enqueue + 1-worker rounds per queue system (bench/queue_peers.py)
    drain_tasks: int = 20_000  # tasks the multi-worker drain of bench/queue_peers.py takes
    drain_seconds: float = 60.0  # at most this long (a slow system drains part of them)
    coldstart_runs: int = 15  # fresh processes per cold-start figure (bench/coldstart.py)
    full_only: bool = True  # run the rows marked full_only (``--quick`` turns it off)


@dataclass
class Env:
    """Where the benchmark server is, and how to make clients for it."""

    host: str
    port: int
    settings: Settings

    def client(self) -> redis.Redis:
        """A benchmark client: its commands are counted in ``SENT``."""
        pool = redis.ConnectionPool(
            host=self.host, port=self.port, connection_class=CountingConnection
        )
        return redis.Redis(connection_pool=pool)

    def control(self) -> redis.Redis:
        """A client for INFO, setup and teardown: not counted."""
        return redis.Redis(host=self.host, port=self.port)


@dataclass
class Worker:
    """What one client does: ``call()`` one call; ``batch(n)`` n calls in one round trip."""

    call: Callable[[], object]
    batch: Callable[[int], object] | None = None
    close: Callable[[], object] | None = None


@dataclass
class Case:
    """One row of the report. Adding a row is adding one of these to ``CASES`` (see cases.py).

    Attributes:
        name: the row's label.
        group: the report table it goes in (``--only GROUP``).
        worker: builds the worker of client number ``index`` (0-based; each multi-mode process
            calls it in its own process): ``worker(env, state, index)``.
        setup: runs once before the row, unmeasured; its result is the ``state``.
        teardown: runs once after the row: ``teardown(env, state)``.
        before_round: runs before every round, unmeasured: ``before_round(env, state)``.
        ops_per_call: logical operations per call (100 for a 100-key batch): every per-op
            figure divides by calls * ops_per_call.
        unit: what one logical operation is, for the report (``call``, ``key``, ``cycle``).
        modes: which of ``MODES`` apply (a lock cycle needs its reply: no pipelining).
        max_calls: a tighter per-round bound on calls (all clients) than ``Settings.max_calls``.
        rounds: how many rounds instead of ``Settings.rounds``.
        note: one line for the report.
        reference: the row this one is compared with in the report (its own column), instead
            of the group's reference (``GROUP_REFERENCE`` in report.py); it must run earlier.
        full_only: skipped by ``--quick`` (a setup too long for it).
    """

    name: str
    group: str
    worker: Callable[[Env, Any, int], Worker]
    setup: Callable[[Env], Any] | None = None
    teardown: Callable[[Env, Any], object] | None = None
    before_round: Callable[[Env, Any], object] | None = None
    ops_per_call: int = 1
    unit: str = "call"
    modes: tuple[str, ...] = MODES
    max_calls: int | None = None
    rounds: int | None = None
    note: str = ""
    reference: str | None = None
    full_only: bool = False


CASES: list[Case] = []


def add(case: Case) -> Case:
    """Register ``case`` (names are unique)."""
    if any(existing.name == case.name for existing in CASES):
        raise ValueError(f"duplicate bench case {case.name!r}")
    CASES.append(case)
    return case


# ----------------------------------------------------------------------------------- snapshots


@dataclass
class Snapshot:
    cpu_main: float | None  # used_cpu_user_main_thread + used_cpu_sys_main_thread, seconds
    cpu_total: float  # used_cpu_user + used_cpu_sys, seconds (all threads of the process)
    commands: dict[str, tuple[int, int]]  # name -> (calls, usec)


def snapshot(control: redis.Redis) -> Snapshot:
    cpu = control.info("cpu")
    main = None
    if "used_cpu_user_main_thread" in cpu and "used_cpu_sys_main_thread" in cpu:
        main = float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])
    total = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    stats = control.info("commandstats")
    commands = {
        key[len("cmdstat_") :]: (int(value["calls"]), int(value["usec"]))
        for key, value in stats.items()
        if key.startswith("cmdstat_") and isinstance(value, dict)
    }
    return Snapshot(main, total, commands)


def _top_level_usec(
    before: Snapshot, after: Snapshot, sent: Mapping[str, int]
) -> tuple[float, int]:
    """Commandstats time and calls of the commands the clients sent, counted once.

    A command name that also ran inside scripts in the window (more calls counted than sent) is
    charged its sent share of the time, as if every call of it cost the same.
    """
    usec = 0.0
    calls = 0
    for name, count in sent.items():
        if count <= 0:
            continue
        for stat, (calls_after, usec_after) in after.commands.items():
            if stat != name and not stat.startswith(name + "|"):
                continue
            calls_before, usec_before = before.commands.get(stat, (0, 0))
            delta_calls = calls_after - calls_before
            delta_usec = usec_after - usec_before
            if delta_calls <= 0:
                continue
            share = min(1.0, count / delta_calls)
            usec += delta_usec * share
            calls += min(count, delta_calls)
    return usec, calls


@dataclass
class Round:
    """One round of one mode: raw counts, as stored in the JSON."""

    calls: int
    ops: int
    wall_s: float
    ops_per_s: float
    cpu_main_s: float | None
    cpu_total_s: float
    cmd_usec: float
    cmd_calls: int
    sent: dict[str, int] = field(default_factory=dict)  # commands the clients sent, by name

    def commands_per_call(self) -> float:
        return sum(self.sent.values()) / self.calls if self.calls else float("nan")

    def cpu_us_per_op(self) -> float:
        cpu = self.cpu_main_s if self.cpu_main_s is not None else self.cpu_total_s
        return cpu * 1e6 / self.ops if self.ops else float("nan")

    def cmd_us_per_op(self) -> float:
        return self.cmd_usec / self.ops if self.ops else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "ops": self.ops,
            "wall_s": round(self.wall_s, 6),
            "ops_per_s": round(self.ops_per_s, 1),
            "cpu_main_s": self.cpu_main_s,
            "cpu_total_s": round(self.cpu_total_s, 6),
            "cmd_usec": round(self.cmd_usec, 1),
            "cmd_calls": self.cmd_calls,
            "cpu_us_per_op": round(self.cpu_us_per_op(), 3),
            "cmd_us_per_op": round(self.cmd_us_per_op(), 3),
            "sent": dict(sorted(self.sent.items())),
        }


def _make_round(
    before: Snapshot,
    after: Snapshot,
    sent: Mapping[str, int],
    calls: int,
    ops_per_call: int,
    wall_s: float,
    ops_per_s: float,
) -> Round:
    cpu_main = None
    if before.cpu_main is not None and after.cpu_main is not None:
        cpu_main = round(after.cpu_main - before.cpu_main, 6)
    usec, cmd_calls = _top_level_usec(before, after, sent)
    return Round(
        calls=calls,
        ops=calls * ops_per_call,
        wall_s=wall_s,
        ops_per_s=ops_per_s,
        cpu_main_s=cpu_main,
        cpu_total_s=after.cpu_total - before.cpu_total,
        cmd_usec=usec,
        cmd_calls=cmd_calls,
        sent=dict(sent),
    )


# -------------------------------------------------------------------------------------- modes


def _loop(worker: Worker, batch: int, max_calls: int, seconds: float) -> tuple[int, float]:
    """Call ``worker`` until ``seconds`` passed or ``max_calls`` were made; (calls, wall s)."""
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    if batch <= 1:
        call = worker.call
        while calls < max_calls and now < deadline:
            call()
            calls += 1
            now = time.perf_counter()
    else:
        assert worker.batch is not None
        send = worker.batch
        while calls < max_calls and now < deadline:
            size = min(batch, max_calls - calls)
            send(size)
            calls += size
            now = time.perf_counter()
    return calls, now - start


def _warm(worker: Worker, batch: int, calls: int) -> None:
    if batch > 1 and worker.batch is not None:
        worker.batch(min(batch, max(calls, 2)))
    for _ in range(calls):
        worker.call()


#: Called before every round: ``on_round(mode, round number (1-based), rounds)``.
OnRound = Callable[[str, int, int], object]


def _run_local(
    case: Case,
    env: Env,
    state: Any,
    control: redis.Redis,
    worker: Worker,
    batch: int,
    on_round: OnRound | None = None,
) -> list[Round]:
    settings = env.settings
    max_calls = min(case.max_calls or settings.max_calls, settings.max_calls)
    rounds = []
    count = case.rounds or settings.rounds
    for number in range(count):
        if on_round is not None:
            on_round("pipelined" if batch > 1 else "1 client", number + 1, count)
        if case.before_round is not None:
            case.before_round(env, state)
        SENT.clear()
        before = snapshot(control)
        calls, wall = _loop(worker, batch, max_calls, settings.seconds)
        after = snapshot(control)
        sent = dict(SENT)
        rate = calls * case.ops_per_call / wall if wall > 0 else float("nan")
        rounds.append(_make_round(before, after, sent, calls, case.ops_per_call, wall, rate))
    return rounds


def _child(
    case: Case,
    env: Env,
    state: Any,
    index: int,
    max_calls: int,
    barrier: Any,
    results: Any,
) -> None:
    """One multi-mode client process: warm up, wait for the start, run, report, wait, exit.

    Exactly one report per process, and always three barrier waits (ready, go, done), so a
    failing client never leaves the parent waiting.
    """
    worker: Worker | None = None
    waits = 0
    reported = False

    def wait() -> None:
        nonlocal waits
        waits += 1
        barrier.wait(timeout=120)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops everything
    die_with_parent()
    try:
        try:
            worker = case.worker(env, state, index)
            _warm(worker, 1, env.settings.warmup_calls)
        except BaseException:
            results.put(("error", index, traceback.format_exc(), 0.0, {}))
            reported = True
        SENT.clear()
        wait()  # ready
        wait()  # go
        if worker is not None:
            calls, wall = _loop(worker, 1, max_calls, env.settings.seconds)
            results.put(("ok", index, calls, wall, dict(SENT)))
            reported = True
    except BaseException:
        if not reported:
            results.put(("error", index, traceback.format_exc(), 0.0, {}))
    finally:
        while waits < 3:
            try:
                wait()  # done: the parent has read INFO
            except Exception:
                break
        if worker is not None and worker.close is not None:
            with contextlib.suppress(Exception):
                worker.close()


def _run_multi(
    case: Case, env: Env, state: Any, control: redis.Redis, on_round: OnRound | None = None
) -> list[Round]:
    settings = env.settings
    context = multiprocessing.get_context("fork")
    clients = settings.clients
    per_client = max(1, min(case.max_calls or settings.max_calls, settings.max_calls) // clients)
    rounds = []
    count = case.rounds or settings.rounds
    for number in range(count):
        if on_round is not None:
            on_round(f"{clients} clients", number + 1, count)
        if case.before_round is not None:
            case.before_round(env, state)
        barrier = context.Barrier(clients + 1)
        results = context.Queue()
        processes = [
            context.Process(
                target=_child,
                args=(case, env, state, index, per_client, barrier, results),
                daemon=True,
            )
            for index in range(clients)
        ]
        for process in processes:
            process.start()
        try:
            barrier.wait(timeout=120)  # ready
            before = snapshot(control)
            barrier.wait(timeout=120)  # go
            reports = [results.get(timeout=settings.seconds + 120) for _ in processes]
            after = snapshot(control)
            barrier.wait(timeout=120)  # done
        except BaseException:
            barrier.abort()  # wakes the clients at once
            raise
        finally:
            for process in processes:
                process.join(timeout=30)
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        errors = [report for report in reports if report[0] != "ok"]
        if errors:
            raise RuntimeError(f"client {errors[0][1]} failed:\n{errors[0][2]}")
        sent: Counter[str] = Counter()
        calls = 0
        rate = 0.0
        wall_max = 0.0
        for _status, _index, client_calls, wall, client_sent in reports:
            calls += client_calls
            sent.update(client_sent)
            rate += client_calls * case.ops_per_call / wall if wall > 0 else 0.0
            wall_max = max(wall_max, wall)
        rounds.append(_make_round(before, after, sent, calls, case.ops_per_call, wall_max, rate))
    return rounds


# ---------------------------------------------------------------------------------------- rows


METRICS = ("cpu_us_per_op", "cmd_us_per_op", "ops_per_s", "commands_per_call")


@dataclass
class ModeResult:
    rounds: list[Round]
    median: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.median = {
            "cpu_us_per_op": statistics.median(r.cpu_us_per_op() for r in self.rounds),
            "cmd_us_per_op": statistics.median(r.cmd_us_per_op() for r in self.rounds),
            "ops_per_s": statistics.median(r.ops_per_s for r in self.rounds),
            "commands_per_call": statistics.median(r.commands_per_call() for r in self.rounds),
        }


@dataclass
class RowResult:
    case: Case
    modes: dict[str, ModeResult]
    seconds: float
    setup_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def metric(self, mode: str, name: str) -> float | None:
        result = self.modes.get(mode)
        return None if result is None else result.median[name]


def run_case(
    case: Case, env: Env, control: redis.Redis, on_round: OnRound | None = None
) -> RowResult:
    """Measure ``case`` in each of its modes; setup and teardown around it."""
    started = time.perf_counter()
    if on_round is not None and case.setup is not None:
        on_round("setup", 1, 1)
    state = case.setup(env) if case.setup is not None else None
    setup_seconds = time.perf_counter() - started
    modes: dict[str, ModeResult] = {}
    try:
        local_modes = [mode for mode in ("single", "pipelined") if mode in case.modes]
        if local_modes:
            worker = case.worker(env, state, 0)
            try:
                for mode in local_modes:
                    batch = env.settings.batch if mode == "pipelined" else 1
                    if batch > 1 and worker.batch is None:
                        continue
                    _warm(worker, batch, env.settings.warmup_calls)
                    rounds = _run_local(case, env, state, control, worker, batch, on_round)
                    modes[mode] = ModeResult(rounds)
            finally:
                if worker.close is not None:
                    worker.close()
        if "multi" in case.modes and env.settings.clients > 0:
            modes["multi"] = ModeResult(_run_multi(case, env, state, control, on_round))
    finally:
        if case.teardown is not None:
            case.teardown(env, state)
    return RowResult(case, modes, time.perf_counter() - started, setup_seconds)
