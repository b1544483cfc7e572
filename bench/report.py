"""Results as JSON (every round, medians, machine) and as the markdown report docs/bench.md.

The markdown is built from the JSON document alone, so ``python -m bench --report-from FILE``
can rebuild it without measuring again.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from .engine import RowResult

TIMES = "\N{MULTIPLICATION SIGN}"
FLOOR = "EVALSHA return 1"
#: The cold-start group (bench/coldstart.py): no rows, its own section and targets.
COLDSTART = "coldstart"
#: The instruction-count group (bench/instructions.py): no rows, its own section and targets.
INSTRUCTIONS = "instructions"
#: The issue the cold-start targets come from (it has no number).
SINGLE_SOURCE = "single-source"
REBALANCE_PREFIX = "slots.rebalance"
#: The views of a scaling (same call, small vs large state): key -> (mode, metric, label).
SCALING_VIEWS = {
    "cpu_us_per_call_pipelined": ("pipelined", "cpu_us_per_op", "Redis CPU, pipelined"),
    "cpu_us_per_call": ("single", "cpu_us_per_op", "Redis CPU, 1 client (includes the I/O)"),
    "cmd_us_per_call_pipelined": ("pipelined", "cmd_us_per_op", "commandstats, pipelined"),
    "cmd_us_per_call": ("single", "cmd_us_per_op", "commandstats, 1 client"),
}
#: CPU time of the main thread with the I/O amortized: the server's own cost of the call, and
#: not inflated when the server thread is preempted (commandstats is wall-clock time).
SCALING_VERDICT = "cpu_us_per_call_pipelined"


@dataclass(frozen=True)
class Scaling:
    """The same call over a small and a large state; ``larges``: the first present is used."""

    key: str
    group: str
    issue: int
    small: str
    larges: tuple[str, ...]
    limit: float
    what: str


SCALINGS = [
    Scaling(
        "slots.owner",
        "nodes",
        3,
        "slots.owner, 10 nodes",
        ("slots.owner, 10,000 nodes",),
        1.5,
        "registered nodes",
    ),
    *(
        Scaling(
            f"pick.{strategy}",
            "pick",
            4,
            f"pick.{strategy}, 10 nodes",
            (f"pick.{strategy}, 10,000 nodes",),
            2.0,
            "registered nodes",
        )
        for strategy in ("least_loaded", "two_choices", "weighted", "least_recent")
    ),
    Scaling(
        "queue.dequeue",
        "queue",
        5,
        "queue.dequeue, 1,000 queued",
        ("queue.dequeue, 1,000,000 queued", "queue.dequeue, 100,000 queued"),
        1.5,
        "queued tasks",
    ),
]


@dataclass(frozen=True)
class Target:
    """An acceptance figure of an issue: ``value / of`` (or ``value`` alone) against ``limit``.

    A figure is ``(row, mode, metric)``; mode ``contention`` reads bench/contention.py's results
    (metrics ``acquisitions_per_s``, ``jain``), mode ``queue_peers`` bench/queue_peers.py's
    medians (row: the system's name; metrics: the keys of its ``median``), mode ``coldstart``
    bench/coldstart.py's (row: its case, such as ``luasched``; metric ``seconds``), mode
    ``instructions`` bench/instructions.py's (row: its name; metric ``per_op``).
    """

    issue: int | str
    label: str
    value: tuple[str, str, str]
    of: tuple[str, str, str] | None
    limit: float
    at_most: bool = True
    #: Cold-start wall times only: the value is the median of the per-run ratios (the cases run
    #: interleaved, run i of one beside run i of the other), and the verdict asks whether the
    #: run's noise leaves the limit possible: met when the 95 % interval of that median (sign
    #: test) reaches the limit. For "no slower than" between two cases that do the same work.
    paired: bool = False


LOCK = "luasched lock acquire+release"
CYCLE = "queue enqueue+dequeue+ack"
FEATURED = "featured floor queue enqueue+dequeue+ack"
REFERENCE = "bare reference queue enqueue+dequeue+ack"


def _cpu(row: str, mode: str = "single") -> tuple[str, str, str]:
    return (row, mode, "cpu_us_per_op")


def _ops(row: str) -> tuple[str, str, str]:
    return (row, "single", "ops_per_s")


def _peer(system: str, metric: str) -> tuple[str, str, str]:
    return (system, "queue_peers", metric)


def _instr(row: str) -> tuple[str, str, str]:
    return (row, INSTRUCTIONS, "per_op")


#: Issue 20's targets, in server instructions per operation (bench/instructions.py).
INSTRUCTION_TARGETS = [
    *(
        Target(
            20,
            f"instructions per task, batched worker (enqueue + dequeue_many(16) + acks), depth "
            f"{depth:,} / Dramatiq prefetch 16",
            _instr(f"luasched: batched task, depth {depth}"),
            _instr(f"Dramatiq prefetch 16: batched task, depth {depth}"),
            1.0,
        )
        for depth in (16, 208, 10_000)
    ),
    Target(
        20,
        "instructions per task, batched worker: depth 10,000 / depth 16",
        _instr("luasched: batched task, depth 10000"),
        _instr("luasched: batched task, depth 16"),
        1.1,
    ),
    Target(
        20,
        "instructions per task, one at a time (enqueue + dequeue + ack) / Dramatiq prefetch 1",
        _instr("luasched, one task at a time: enqueue + dequeue + ack"),
        _instr("Dramatiq prefetch 1: send + fetch + ack"),
        1.0,
    ),
    Target(
        20,
        "instructions per task, one at a time with ack_and_dequeue / Dramatiq prefetch 1",
        _instr("luasched, one task at a time: enqueue + ack_and_dequeue"),
        _instr("Dramatiq prefetch 1: send + fetch + ack"),
        0.85,
    ),
    Target(
        20,
        "instructions per enqueue (depth 16) / Dramatiq send",
        _instr("luasched: enqueue, depth 16"),
        _instr("Dramatiq prefetch 16: enqueue, depth 16"),
        1.3,
    ),
    Target(
        20,
        "instructions per lock cycle (acquire + release) / redis-py Lock",
        _instr("luasched lock"),
        _instr("redis-py Lock"),
        1.5,
    ),
    *(
        Target(
            20,
            f"instructions per {what} lock cycle / redis-py Lock",
            _instr(f"luasched {what} lock"),
            _instr("redis-py Lock"),
            3.0,
        )
        for what in ("fair", "reentrant")
    ),
]

#: Issue 21's targets: a queue with groups against one without (bench/instructions.py,
#: ``group_row``: one dequeue per call, 2,000 ready tasks without groups, 10 groups of 200,
#: 100,000 groups of 2).
GROUP_TARGETS = [
    Target(
        21,
        "instructions per dequeue: with groups (10 groups) / without groups",
        _instr("luasched dequeue with groups, 10 groups"),
        _instr("luasched dequeue, no groups (2,000 ready)"),
        1.3,
    ),
    Target(
        21,
        "instructions per dequeue with groups: 100,000 groups / 10 groups",
        _instr("luasched dequeue with groups, 100,000 groups"),
        _instr("luasched dequeue with groups, 10 groups"),
        1.5,
    ),
]

#: The issue-5 figures against the other task queues (bench/queue_peers.py).
PEER_TARGETS = [
    Target(
        5,
        "enqueue+dequeue+ack: Redis CPU per task / Dramatiq (send + fetch + ack)",
        _peer("luasched", "cycle_cpu_us_per_op"),
        _peer("Dramatiq", "cycle_cpu_us_per_op"),
        1.0,
    ),
    Target(
        5,
        "enqueue+dequeue+ack: Redis CPU per task / BullMQ (Queue.add + Worker)",
        _peer("luasched", "cycle_cpu_us_per_op"),
        _peer("BullMQ", "cycle_cpu_us_per_op"),
        0.5,
    ),
    Target(
        5,
        "one worker process: tasks/s / a BullMQ Worker",
        _peer("luasched", "one_worker_tasks_per_s"),
        _peer("BullMQ", "one_worker_tasks_per_s"),
        2.0,
        at_most=False,
    ),
    Target(
        5,
        "one worker process: tasks/s / an RQ SimpleWorker",
        _peer("luasched", "one_worker_tasks_per_s"),
        _peer("RQ", "one_worker_tasks_per_s"),
        5.0,
        at_most=False,
    ),
    Target(
        5,
        "4 worker processes: tasks/s / 4 BullMQ Workers",
        _peer("luasched", "workers_tasks_per_s"),
        _peer("BullMQ", "workers_tasks_per_s"),
        2.0,
        at_most=False,
    ),
    Target(
        5,
        "consumer side, 4 worker processes drain the queue: Redis CPU per task / Dramatiq's "
        "default worker",
        _peer("luasched", "workers_cpu_us_per_task"),
        _peer("Dramatiq", "workers_cpu_us_per_task"),
        1.0,
    ),
    Target(
        18,
        "luasched.Worker (no-op handler), one worker process: tasks/s / the hand-written loop",
        _peer("luasched Worker", "one_worker_tasks_per_s"),
        _peer("luasched", "one_worker_tasks_per_s"),
        0.9,
        at_most=False,
    ),
    Target(
        18,
        "luasched.Worker, 4 worker processes: tasks/s / the hand-written loop",
        _peer("luasched Worker", "workers_tasks_per_s"),
        _peer("luasched", "workers_tasks_per_s"),
        0.9,
        at_most=False,
    ),
    Target(
        18,
        "luasched.Worker, one worker process: tasks/s / Dramatiq's default worker",
        _peer("luasched Worker", "one_worker_tasks_per_s"),
        _peer("Dramatiq", "one_worker_tasks_per_s"),
        2.0,
        at_most=False,
    ),
    Target(
        18,
        "luasched.Worker, one worker process: tasks/s / a BullMQ Worker",
        _peer("luasched Worker", "one_worker_tasks_per_s"),
        _peer("BullMQ", "one_worker_tasks_per_s"),
        4.0,
        at_most=False,
    ),
    Target(
        18,
        "luasched.Worker, 4 worker processes drain a backlog: server instructions per task / "
        "the hand-written loop (callgrind; the Redis CPU µs of one drain each, in the queue "
        "table, move by ~20 % between runs of the same code)",
        (
            "luasched.Worker, 4 processes drain a backlog (no-op handler, batch 16), per task",
            "instructions",
            "per_op",
        ),
        (
            "luasched, 4 processes drain a backlog: dequeue_many(16) + the acks in one "
            "pipeline, per task",
            "instructions",
            "per_op",
        ),
        1.1,
    ),
]


TARGETS = [
    Target(
        4,
        "pick.least_loaded, 10 nodes: Redis CPU / floor (1 client)",
        _cpu("pick.least_loaded, 10 nodes"),
        _cpu(FLOOR),
        2.5,
    ),
    Target(
        4,
        "pick.least_loaded, 10,000 nodes: Redis CPU / floor (1 client)",
        _cpu("pick.least_loaded, 10,000 nodes"),
        _cpu(FLOOR),
        2.5,
    ),
    Target(
        5,
        "enqueue+dequeue+ack: Redis CPU / the bare reference queue (1 client)",
        _cpu(CYCLE),
        _cpu(REFERENCE),
        1.25,
    ),
    Target(
        5,
        "enqueue+dequeue+ack: Redis CPU / the bare reference queue (pipelined)",
        _cpu(CYCLE, "pipelined"),
        _cpu(REFERENCE, "pipelined"),
        1.25,
    ),
    Target(
        5,
        "dequeue_many n=100: Redis CPU per task / single dequeues (1 client)",
        _cpu("queue.dequeue_many n=100, 1,000 queued"),
        _cpu("queue.dequeue, 1,000 queued"),
        0.2,
    ),
    Target(
        5,
        "dequeue_many n=100: Redis CPU per task / single dequeues (pipelined)",
        _cpu("queue.dequeue_many n=100, 1,000 queued"),
        _cpu("queue.dequeue, 1,000 queued", "pipelined"),
        0.2,
    ),
    Target(
        6,
        "lock cycle: Redis CPU / redis-py Lock (1 client)",
        _cpu(LOCK),
        _cpu("redis-py Lock acquire+release"),
        1.2,
    ),
    Target(
        6,
        "lock cycle: cycles/s / redis-py Lock (1 client)",
        _ops(LOCK),
        _ops("redis-py Lock acquire+release"),
        0.9,
        at_most=False,
    ),
    Target(
        6,
        "lock cycle: cycles/s / python-redis-lock (1 client)",
        _ops(LOCK),
        _ops("python-redis-lock acquire+release"),
        1.2,
        at_most=False,
    ),
    Target(
        6,
        "lock cycle: cycles/s / pottery Redlock (1 client)",
        _ops(LOCK),
        _ops("pottery Redlock (1 master) acquire+release"),
        2.0,
        at_most=False,
    ),
    Target(
        6,
        "8 threads, one lock: acquisitions/s / redis-py Lock",
        ("luasched lock", "contention", "acquisitions_per_s"),
        ("redis-py Lock", "contention", "acquisitions_per_s"),
        1.0,
        at_most=False,
    ),
    Target(
        6,
        "8 threads, one fair lock: Jain fairness index",
        ("luasched fair lock", "contention", "jain"),
        None,
        0.99,
        at_most=False,
    ),
    *PEER_TARGETS,
    *INSTRUCTION_TARGETS,
    *GROUP_TARGETS,
    Target(
        SINGLE_SOURCE,
        "cold start, fresh process: import luasched + Scheduler + first slots.keyslot / "
        "import redis + PING (wall time)",
        ("luasched", COLDSTART, "seconds"),
        ("redis", COLDSTART, "seconds"),
        2.0,
    ),
    Target(
        SINGLE_SOURCE,
        "`luasched export DIR`: the whole process, seconds",
        ("export", COLDSTART, "seconds"),
        None,
        0.5,
    ),
    *(
        Target(
            SINGLE_SOURCE,
            f"first Schedulers of 8 threads at once / of 1 thread ({what}; median of the "
            "per-run ratios, met when its 95 % interval reaches 1: no slower beyond the noise)",
            (f"threads_8_{config}", COLDSTART, "seconds"),
            (f"threads_1_{config}", COLDSTART, "seconds"),
            1.0,
            paired=True,
        )
        for config, what in (
            ("default", "default configuration: loaded"),
            ("custom", "custom configuration: rendered"),
        )
    ),
]


#: Ratios that explain targets without being targets: (label, value, of).
CONTEXT = [
    (
        "featured floor queue / the bare reference queue (1 client)",
        _cpu(FEATURED),
        _cpu(REFERENCE),
    ),
    (
        "featured floor queue / the bare reference queue (pipelined)",
        _cpu(FEATURED, "pipelined"),
        _cpu(REFERENCE, "pipelined"),
    ),
    ("enqueue+dequeue+ack / the featured floor queue (1 client)", _cpu(CYCLE), _cpu(FEATURED)),
    (
        "enqueue+dequeue+ack / the featured floor queue (pipelined)",
        _cpu(CYCLE, "pipelined"),
        _cpu(FEATURED, "pipelined"),
    ),
    (
        "enqueue+ack_and_dequeue (2 calls a task) / the bare reference queue (1 client)",
        _cpu("queue enqueue+ack_and_dequeue"),
        _cpu(REFERENCE),
    ),
    (
        "Schedulers of 8 threads at once / of 1 thread, the scripts loaded before the clock "
        "(the floor of the single-source thread rows: the threads alone, wall time)",
        ("threads_8_loaded", COLDSTART, "seconds"),
        ("threads_1_loaded", COLDSTART, "seconds"),
    ),
    (
        "first Schedulers of 8 threads at once / of 1 thread (default configuration), the "
        "process pinned to one CPU (the same work with no GIL handoffs between cores)",
        ("threads_8_one_cpu", COLDSTART, "seconds"),
        ("threads_1_one_cpu", COLDSTART, "seconds"),
    ),
    (
        "8 threads released at once that make no Scheduler / 1 such thread (the interpreter's "
        "own floor under the single-source thread rows, wall time)",
        ("threads_8_bare", COLDSTART, "seconds"),
        ("threads_1_bare", COLDSTART, "seconds"),
    ),
]

#: Per group, the row the others are compared with (a row's own ``reference`` wins).
GROUP_REFERENCE = {"locks": "redis-py Lock acquire+release"}
GROUP_TITLES = {
    "floor": "Floors",
    "slots": "Hash slots (`slots.keyslot`)",
    "nodes": "Node registry and slot table (issue 3)",
    "locks": "Locks: luasched's and its peers (issue 6)",
    "pick": "Node selection, `s.pick` (issue 4)",
    "queue": "Task queue, `s.queue` (issue 5)",
    "durable": "Durable mode, `wait_replicas` (issue 19)",
}


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0 or math.isnan(value):
        return None
    return value / reference


def row_document(row: RowResult) -> dict[str, Any]:
    case = row.case
    return {
        "name": case.name,
        "group": case.group,
        "unit": case.unit,
        "ops_per_call": case.ops_per_call,
        "note": case.note,
        "reference": case.reference,
        "seconds": round(row.seconds, 3),
        "setup_seconds": round(row.setup_seconds, 3),
        "modes": {
            mode: {
                "median": {key: round(value, 3) for key, value in result.median.items()},
                "rounds": [round_.as_dict() for round_ in result.rounds],
            }
            for mode, result in row.modes.items()
        },
    }


def _median(row: dict[str, Any], mode: str, metric: str) -> float | None:
    found = row["modes"].get(mode)
    return None if found is None else found["median"].get(metric)


def _figure(document: dict[str, Any], figure: tuple[str, str, str]) -> float | None:
    name, mode, metric = figure
    if mode == COLDSTART:
        found = (document.get(COLDSTART) or {}).get(name)
        return None if found is None else float(found[metric])
    if mode == INSTRUCTIONS:
        found = ((document.get(INSTRUCTIONS) or {}).get("rows") or {}).get(name)
        return None if found is None else float(found[metric])
    if mode == "queue_peers":
        for entry in document.get("queue_peers", []):
            if entry["name"] == name:
                value = entry["median"].get(metric)
                return None if value is None else float(value)
        return None
    if mode == "contention":
        for entry in document.get("contention", []):
            if entry["name"] == name:
                value = entry.get(metric)
                return None if value is None else float(value)
        return None
    for row in document["rows"]:
        if row["name"] == name:
            return _median(row, mode, metric)
    return None


def _paired_interval(document: dict[str, Any], target: Target) -> tuple[float, float, float] | None:
    """(median, low, high) of the per-run ratios of a paired cold-start target: the 95 %
    interval of a median by the sign test, the k-th smallest and k-th largest ratios with k the
    largest for which P(Binomial(n, 1/2) < k) <= 2.5 %. None without the rounds."""
    if target.of is None:
        return None
    entry = document.get(COLDSTART) or {}
    top, bottom = entry.get(target.value[0]), entry.get(target.of[0])
    if not top or not bottom or "rounds" not in top or "rounds" not in bottom:
        return None
    ratios = sorted(
        a[0] / b[0] for a, b in zip(top["rounds"], bottom["rounds"], strict=True) if b[0] > 0
    )
    n = len(ratios)
    if n < 6:
        return None
    k, below = 0, 0.0
    while below + math.comb(n, k) / 2**n <= 0.025:
        below += math.comb(n, k) / 2**n
        k += 1
    # P(X < k) <= 2.5 % for X ~ Binomial(n, 1/2): the interval is the k-th smallest to the k-th
    # largest (1-based), at least 95 % coverage.
    return statistics.median(ratios), ratios[max(k - 1, 0)], ratios[n - max(k, 1)]


def add_derived(document: dict[str, Any]) -> None:
    """Ratios to the floor and to each row's reference, scalings, targets, rebalance, in place."""
    rows: list[dict[str, Any]] = document["rows"]
    by_name = {row["name"]: row for row in rows}
    floor = by_name.get(FLOOR)
    floor_cpu = _median(floor, "single", "cpu_us_per_op") if floor else None
    floor_cmd = _median(floor, "single", "cmd_us_per_op") if floor else None
    document["floor"] = {"name": FLOOR, "cpu_us_per_op": floor_cpu, "cmd_us_per_op": floor_cmd}
    for row in rows:
        cpu = _median(row, "single", "cpu_us_per_op")
        cmd = _median(row, "single", "cmd_us_per_op")
        headline: dict[str, Any] = {
            "cpu_us_per_op": cpu,
            "cpu_ratio_to_floor": _round(_ratio(cpu, floor_cpu)),
            "cmd_us_per_op": cmd,
            "cmd_ratio_to_floor": _round(_ratio(cmd, floor_cmd)),
        }
        reference_name = row.get("reference") or GROUP_REFERENCE.get(row["group"], "")
        reference = by_name.get(reference_name)
        if reference is not None and reference is not row:
            headline["reference"] = reference["name"]
            headline["cpu_ratio_to_reference"] = _round(
                _ratio(cpu, _median(reference, "single", "cpu_us_per_op"))
            )
            headline["pipelined_cpu_ratio_to_reference"] = _round(
                _ratio(
                    _median(row, "pipelined", "cpu_us_per_op"),
                    _median(reference, "pipelined", "cpu_us_per_op"),
                )
            )
            headline["single_ops_ratio_to_reference"] = _round(
                _ratio(
                    _median(row, "single", "ops_per_s"),
                    _median(reference, "single", "ops_per_s"),
                )
            )
        row["headline"] = headline
    scalings: dict[str, Any] = {}
    for spec in SCALINGS:
        small = by_name.get(spec.small)
        large = next((by_name[name] for name in spec.larges if name in by_name), None)
        if small is None or large is None:
            continue
        scaling: dict[str, Any] = {
            "group": spec.group,
            "issue": spec.issue,
            "what": spec.what,
            "rows": [small["name"], large["name"]],
            "limit": spec.limit,
        }
        for key, (mode, metric, _label) in SCALING_VIEWS.items():
            low, high = _median(small, mode, metric), _median(large, mode, metric)
            scaling[key] = {"small": low, "large": high, "ratio": _round(_ratio(high, low))}
        ratio = scaling[SCALING_VERDICT]["ratio"]
        scaling["verdict_on"] = SCALING_VERDICT
        scaling["within_limit"] = ratio is not None and ratio <= spec.limit
        scalings[spec.key] = scaling
    document["scaling"] = scalings
    targets = []
    for key, scaling in scalings.items():
        targets.append(
            {
                "issue": scaling["issue"],
                "label": f"{key}: {scaling['rows'][1].split(', ')[-1]} / "
                f"{scaling['rows'][0].split(', ')[-1]} (Redis CPU, pipelined)",
                "value": scaling[SCALING_VERDICT]["ratio"],
                "limit": scaling["limit"],
                "at_most": True,
                "met": scaling["within_limit"],
            }
        )
    for target in TARGETS:
        value = _figure(document, target.value)
        if target.of is not None:
            value = _ratio(value, _figure(document, target.of))
        interval = _paired_interval(document, target) if target.paired else None
        if interval is not None:
            value, low, high = interval
        met = None
        if value is not None and not math.isnan(value):
            reached = low if interval is not None and target.at_most else value
            reached = high if interval is not None and not target.at_most else reached
            met = reached <= target.limit if target.at_most else reached >= target.limit
        targets.append(
            {
                "issue": target.issue,
                "label": target.label,
                "value": _round(value),
                "interval": None if interval is None else [_round(low), _round(high)],
                "limit": target.limit,
                "at_most": target.at_most,
                "met": met,
            }
        )
    document["targets"] = sorted(targets, key=lambda entry: str(entry["issue"]))
    document["context"] = [
        {"label": label, "value": _round(_ratio(_figure(document, value), _figure(document, of)))}
        for label, value, of in CONTEXT
    ]
    busy = document["meta"]["server"].get("busy_reply_threshold_ms")
    rebalance = {}
    for row in rows:
        if not row["name"].startswith(REBALANCE_PREFIX):
            continue
        cmd_ms = (_median(row, "single", "cmd_us_per_op") or math.nan) / 1000
        cpu_ms = (_median(row, "single", "cpu_us_per_op") or math.nan) / 1000
        rebalance[row["name"]] = {
            "cmd_ms_per_call": round(cmd_ms, 3),
            "cpu_ms_per_call": round(cpu_ms, 3),
            "busy_reply_threshold_ms": busy,
            "fraction_of_threshold": _round(cmd_ms / busy, 6) if busy else None,
        }
    if rebalance:
        document["rebalance"] = rebalance


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------- markdown


def _us(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{TIMES}"


def _rate(value: float | None) -> str:
    """Three significant digits with thousands separators (client rates are noisy)."""
    if value is None or math.isnan(value):
        return "—"
    return f"{float(f'{value:.3g}'):,.0f}"


def _count(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.0f}" if abs(value - round(value)) < 0.01 else f"{value:.2f}"


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    settings = document["settings"]
    server = meta["server"]
    machine = meta["machine"]
    cpu_source = meta["cpu_source"]
    clients = settings["clients"]
    batch = settings["batch"]
    lines = [
        "# luasched benchmarks",
        "",
        "Generated by `make bench` (bench/); do not edit by hand. Raw data, every round: "
        "[bench/results/latest.json](../bench/results/latest.json).",
        "",
        f"- **Command**: `{meta['command']}` at luasched commit "
        f"`{machine.get('commit') or 'unknown'}`",
        f"- **Date**: {meta['date']} (run took {meta['elapsed_s']:.0f} s)",
        f"- **Machine**: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['platform']}; load average {machine['loadavg_start']} at start, "
        f"{machine['loadavg_end']} at end (other jobs share this machine)",
        f"- **Server**: {server['name']} {server['version']} (`{server['binary']}`), "
        f'throwaway on {server["host"]}, `--save "" --appendonly no`',
        f"- **Client**: Python {machine['python']}, redis-py {machine['redis_py']}",
        f"- **Rounds**: {settings['rounds']} per mode (median shown), each up to "
        f"{settings['seconds']} s and {settings['max_calls']:,} calls",
        "",
        "## What is measured",
        "",
        f"- **Redis CPU µs/op**: {cpu_source}, read with `INFO cpu` before and after each "
        "round, divided by the logical operations done, with one client making one "
        "call per round trip. It includes reading the request and writing the reply (the "
        "system calls), so it is what one operation costs the server in practice. The headline.",
        f"- **{TIMES} floor**: that figure over the same figure for `EVALSHA` of `return 1`, "
        "measured in the same run on the same server: the ratio is what compares across "
        "machines.",
        f"- **CPU µs/op, pipelined**: the same, with {batch} calls per round trip (I/O amortized).",
        "- **cmdstats µs/op**: `INFO commandstats` time of the commands the client sent itself "
        "(a command run inside a script is counted once, inside EVALSHA), per operation: "
        "execution time without the I/O, measured as wall-clock time by the server (it grows "
        "when the server thread is preempted, CPU time does not). **commands/call**: "
        "commands the client sent per call (round trips, unless pipelined).",
        "- **ops/s**: client-observed logical operations per second (Python client, one process; "
        f"pipelined: {batch} calls per round trip; {clients} clients: {clients} processes, "
        "summed). Bounded by the Python client more than by the server.",
        "",
    ]
    floor = document.get("floor", {})
    if floor.get("cpu_us_per_op") is not None:
        lines += [
            f"Floor in this run: `EVALSHA return 1` costs {_us(floor['cpu_us_per_op'])} µs of "
            f"Redis CPU per call ({_us(floor['cmd_us_per_op'])} µs in commandstats).",
            "",
        ]
    lines += _targets_section(document)
    lines += _instructions_section(document)
    lines += _plots_section(document)
    groups: list[str] = []
    for row in document["rows"]:
        if row["group"] not in groups:
            groups.append(row["group"])
    for group in groups:
        rows = [row for row in document["rows"] if row["group"] == group]
        has_reference = any("reference" in row["headline"] for row in rows)
        lines += [f"## {GROUP_TITLES.get(group, group)}", ""]
        header = (
            f"| row | per | Redis CPU µs/op | {TIMES} floor | CPU µs/op pipelined "
            "| cmdstats µs/op | commands/call | ops/s 1 client | ops/s pipelined "
            f"| ops/s {clients} clients |"
        )
        rule = "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
        if has_reference:
            header += (
                f" compared with | {TIMES} its CPU | {TIMES} its CPU pipelined "
                f"| {TIMES} its ops/s 1 client |"
            )
            rule += "---|--:|--:|--:|"
        lines += [header, rule]
        for row in rows:
            headline = row["headline"]
            cells = [
                row["name"],
                row["unit"],
                _us(headline["cpu_us_per_op"]),
                _x(headline["cpu_ratio_to_floor"]),
                _us(_median(row, "pipelined", "cpu_us_per_op")),
                _us(headline["cmd_us_per_op"]),
                _count(_median(row, "single", "commands_per_call")),
                _rate(_median(row, "single", "ops_per_s")),
                _rate(_median(row, "pipelined", "ops_per_s")),
                _rate(_median(row, "multi", "ops_per_s")),
            ]
            if has_reference:
                cells += [
                    headline.get("reference", "—"),
                    _x(headline.get("cpu_ratio_to_reference")),
                    _x(headline.get("pipelined_cpu_ratio_to_reference")),
                    _x(headline.get("single_ops_ratio_to_reference")),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        notes = [f"- {row['name']}: {row['note']}" for row in rows if row["note"]]
        lines += [*notes, ""]
        if group == "locks":
            lines += [
                "One lock name per client: uncontended acquire + release (`cycle`), one cycle "
                "per loop; a cycle needs the acquire's reply, so there is no pipelined column. "
                "The CPU column is what each library makes the server do per cycle.",
                "",
            ]
            lines += _contention_section(document)
        if group == "queue":
            lines += [
                "`task`: one task's whole life in the first rows (enqueue + dequeue-and-lock + "
                "ack: 3 calls, 2 with ack_and_dequeue); one leased task in the dequeue rows. "
                "The queue rows use one queue per client.",
                "",
            ]
            lines += _peers_section(document)
        lines += _scaling_section(document, group)
        if group == "nodes":
            lines += _rebalance_section(document)
    lines += _coldstart_section(document)
    return "\n".join(lines).rstrip() + "\n"


#: (label, luasched's row, the peer's row) of the instruction comparisons in docs/bench.md.
INSTRUCTION_COMPARISONS = [
    ("lock cycle vs redis-py Lock", "luasched lock", "redis-py Lock"),
    ("fair lock cycle vs redis-py Lock", "luasched fair lock", "redis-py Lock"),
    ("reentrant lock cycle vs redis-py Lock", "luasched reentrant lock", "redis-py Lock"),
    (
        "a task one at a time vs Dramatiq prefetch 1",
        "luasched, one task at a time: enqueue + dequeue + ack",
        "Dramatiq prefetch 1: send + fetch + ack",
    ),
    (
        "a task one at a time, ack_and_dequeue, vs Dramatiq prefetch 1",
        "luasched, one task at a time: enqueue + ack_and_dequeue",
        "Dramatiq prefetch 1: send + fetch + ack",
    ),
    *(
        (
            f"a batched task, depth {depth:,}, vs Dramatiq prefetch 16",
            f"luasched: batched task, depth {depth}",
            f"Dramatiq prefetch 16: batched task, depth {depth}",
        )
        for depth in (16, 208, 10_000)
    ),
    (
        "an enqueue, depth 16, vs Dramatiq send",
        "luasched: enqueue, depth 16",
        "Dramatiq prefetch 16: enqueue, depth 16",
    ),
    (
        "a task's whole life vs RQ",
        "luasched, one task at a time: enqueue + dequeue + ack",
        "RQ: Queue.enqueue, then SimpleWorker (burst)",
    ),
    (
        "a task's whole life vs BullMQ",
        "luasched, one task at a time: enqueue + dequeue + ack",
        "BullMQ: Queue.add, then Worker (concurrency 1)",
    ),
]


#: (label, the floor's row, Dramatiq's row, luasched's row, issue 20's limit on luasched / Dramatiq
#: or None) of the queue floors table in docs/bench.md (bench/instructions.py's floor rows).
QUEUE_FLOOR_COMPARISONS = [
    *(
        (
            f"a batched task, depth {depth:,}",
            f"queue floor: featured: batched task, depth {depth}",
            f"Dramatiq prefetch 16: batched task, depth {depth}",
            f"luasched: batched task, depth {depth}",
            1.0,
        )
        for depth in (16, 208, 10_000)
    ),
    (
        "a batched task, depth 16, the batch's acks in one call",
        "queue floor: featured, a batch's acks in one call: batched task, depth 16",
        "Dramatiq prefetch 16: batched task, depth 16",
        None,
        None,
    ),
    (
        "a task one at a time (enqueue + dequeue + ack)",
        "queue floor: featured, one task at a time: enqueue + dequeue + ack",
        "Dramatiq prefetch 1: send + fetch + ack",
        "luasched, one task at a time: enqueue + dequeue + ack",
        1.0,
    ),
    (
        "a task one at a time with ack_and_dequeue",
        "queue floor: featured, one task at a time: enqueue + ack_and_dequeue",
        "Dramatiq prefetch 1: send + fetch + ack",
        "luasched, one task at a time: enqueue + ack_and_dequeue",
        0.85,
    ),
    (
        "an enqueue, depth 16",
        "queue floor: featured: enqueue, depth 16",
        "Dramatiq prefetch 16: enqueue, depth 16",
        "luasched: enqueue, depth 16",
        1.3,
    ),
    (
        "Dramatiq's shape + request records: a task one at a time",
        "queue floor: Dramatiq-shaped + a request record per call, one task at a time: "
        "enqueue + fetch + ack",
        "Dramatiq prefetch 1: send + fetch + ack",
        None,
        None,
    ),
    (
        "Dramatiq's shape + request records: a batched task, depth 16",
        "queue floor: Dramatiq-shaped + a request record per call: batched task, depth 16",
        "Dramatiq prefetch 16: batched task, depth 16",
        None,
        None,
    ),
    (
        "Dramatiq's shape + request records: an enqueue, depth 16",
        "queue floor: Dramatiq-shaped + a request record per call: enqueue, depth 16",
        "Dramatiq prefetch 16: enqueue, depth 16",
        None,
        None,
    ),
]


def _queue_floors(rows: dict[str, Any]) -> list[str]:
    """The queue floors against Dramatiq (and luasched against both), issue 20's targets 1-3."""
    found = [entry for entry in QUEUE_FLOOR_COMPARISONS if entry[1] in rows and entry[2] in rows]
    if not found:
        return []
    lines = [
        "",
        "The queue floors are bench/cases.py's `FEATURED_*` scripts (the least a queue with "
        "docs/guarantees.md's guarantees executes: request records, idempotent enqueue, FIFO "
        "within a priority, server-time leases, due and expired probes, attempts, clock-derived "
        "fencing tokens, token-checked acks; no argument checks) and `SHAPED_*` (Dramatiq's "
        "list + hash + set with only a request record per call), against Dramatiq, and "
        "luasched against them. Where the floor / Dramatiq is above the target, the target "
        "contradicts the guarantees ([redis-notes.md](redis-notes.md) says which costs what):",
        "",
        "| per task | floor | Dramatiq | floor / Dramatiq | luasched | luasched / floor | "
        "luasched / Dramatiq | target |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, floor_row, peer_row, ours_row, limit in found:
        floor, peer = rows[floor_row]["per_op"], rows[peer_row]["per_op"]
        ours = rows[ours_row]["per_op"] if ours_row in rows else None
        lines.append(
            f"| {label} | {floor:,} | {peer:,} | {floor / peer:.2f}x | "
            + (f"{ours:,} | {ours / floor:.2f}x | {ours / peer:.2f}x" if ours else "- | - | -")
            + f" | {f'<= {limit:.2f}x' if limit else '-'} |"
        )
    return lines


def _instructions_section(document: dict[str, Any]) -> list[str]:
    entry = document.get(INSTRUCTIONS)
    if not entry:
        return []
    lines = ["## Server instructions per operation (bench/instructions.py, callgrind)", ""]
    if entry.get("skipped"):
        return [*lines, f"Not measured in this run: {entry['skipped']}.", ""]
    server = entry["server"]
    lines += [
        f"{server['name']} {server['version']} under `valgrind --tool=callgrind` (`--hz 1`), "
        "its own throwaway server; each figure is the callgrind `summary:` of its windows "
        "minus the inclusive cost of `serverCron`, over the operations in them: everything "
        "the server executes for the calls (request parsing, the command or script, the "
        "reply), not the client's work. Instruction counts do not move with the machine's "
        "load (two runs agree within ~1-2 %), so these are the figures to compare.",
        "",
        "| operation | instructions per op | operations |",
        "|---|--:|--:|",
    ]
    for name, row in entry["rows"].items():
        lines.append(f"| {name} | {row['per_op']:,} | {row['operations']:,} |")
    rows = entry["rows"]
    pairs = [
        (label, rows.get(ours), rows.get(peer))
        for label, ours, peer in INSTRUCTION_COMPARISONS
        if ours in rows and peer in rows
    ]
    if pairs:
        lines += [
            "",
            "| comparison (instructions per op) | luasched | peer | luasched / peer |",
            "|---|--:|--:|--:|",
        ]
        lines += [
            f"| {label} | {ours['per_op']:,} | {peer['per_op']:,} | "
            f"{ours['per_op'] / peer['per_op']:.2f}x |"
            for label, ours, peer in pairs
            if ours and peer
        ]
    reference = entry["rows"].get("redis-py Lock")
    floors = [name for name in entry["rows"] if name.startswith("floor: ")]
    floor_of = entry.get("floor_of", {})
    if reference and floors:
        lines += [
            "",
            "The floors are what any lock with that guarantee executes at the least (only the "
            "unavoidable calls, no checks), against redis-py's `Lock` (issue 20's target 4 asks "
            "at most 1.5x for the plain lock, with fencing tokens that never go back across a "
            "failover, and at most 3x for the fair and the reentrant lock), and luasched's row "
            "over the floor it is bounded by: what luasched pays above that guarantee's least.",
            "",
            "| floor | instructions per cycle | / redis-py Lock | luasched's row | row / floor |",
            "|---|--:|--:|---|--:|",
        ]
        for name in floors:
            cost = entry["rows"][name]["per_op"]
            ours = floor_of.get(name)
            row = entry["rows"].get(ours) if ours else None
            lines.append(
                f"| {name[len('floor: ') :]} | {cost:,} | {cost / reference['per_op']:.2f}x | "
                + (f"{ours} | {row['per_op'] / cost:.2f}x |" if row else "- | - |")
            )
    lines += _queue_floors(entry["rows"])
    return [*lines, ""]


#: The cold-start cases in the report's order, with what each one does.
COLDSTART_CASES = {
    "redis": "`import redis`, `PING` (the reference)",
    "luasched": '`import luasched`, `Scheduler(...)`, first `s.slots.keyslot("a")`',
    "export": "`luasched export DIR` (the whole process)",
    "threads_1_default": "1 thread's first Scheduler (default configuration)",
    "threads_8_default": "8 threads' first Schedulers at once (default configuration)",
    "threads_1_custom": "1 thread's first Scheduler (custom configuration)",
    "threads_8_custom": "8 threads' first Schedulers at once (custom configuration)",
    "threads_1_loaded": "1 thread's Scheduler, scripts loaded before the clock (floor)",
    "threads_8_loaded": "8 threads' Schedulers at once, scripts loaded before the clock (floor)",
    "threads_1_one_cpu": "1 thread's first Scheduler (default configuration), one CPU",
    "threads_8_one_cpu": "8 threads' first Schedulers at once (default configuration), one CPU",
    "threads_1_bare": "1 thread released, no Scheduler (the interpreter's floor)",
    "threads_8_bare": "8 threads released at once, no Scheduler (the interpreter's floor)",
}


def _coldstart_section(document: dict[str, Any]) -> list[str]:
    entry = document.get(COLDSTART)
    if not entry:
        return []
    lines = [
        "## Cold start: a fresh process's first call (bench/coldstart.py)",
        "",
        f"Medians of {entry['runs']} fresh Python processes per case, the cases interleaved. "
        "*In the process*: from before the first import to the end of the case (interpreter "
        "start-up excluded; for the thread cases, from releasing the threads to the last "
        "join, after the imports and the redis-py clients). *Whole process*: spawn to exit. "
        "*Renders*: `render_count()` at the end (0: the scripts were loaded from the "
        "package; the custom "
        f"configuration is `max_batch={entry['custom_max_batch']}`).",
        "",
        "| case | ms in the process | ms whole process | renders |",
        "|---|--:|--:|--:|",
    ]
    for name, label in COLDSTART_CASES.items():
        found = entry.get(name)
        if found is None:
            continue
        inside = "—" if name == "export" else f"{found['seconds'] * 1000:.1f}"
        lines.append(
            f"| {label} | {inside} | {found['process_seconds'] * 1000:.0f} | {found['renders']} |"
        )
    return [*lines, ""]


def _targets_section(document: dict[str, Any]) -> list[str]:
    targets = document.get("targets", [])
    if not targets:
        return []
    lines = [
        "## Issue targets in this run",
        "",
        "Ratios of figures measured in this run (medians); `—`: a row did not run.",
        "",
        "| issue | figure | value | target | met |",
        "|--:|---|--:|--:|---|",
    ]
    for target in targets:
        sign = "≤" if target["at_most"] else "≥"
        value = target["value"]
        shown = "—" if value is None else f"{value:.3f}"
        if value is not None and target.get("interval"):
            low, high = target["interval"]
            shown += f" (95 %: {low:.3f} to {high:.3f})"
        met = {True: "yes", False: "**no**", None: "—"}[target["met"]]
        lines.append(
            f"| {target['issue']} | {target['label']} | {shown} | {sign} {target['limit']} "
            f"| {met} |"
        )
    context = [entry for entry in document.get("context", []) if entry["value"] is not None]
    if context:
        lines += ["", "Context (ratios of this run, no target):", ""]
        lines += ["| figure | value |", "|---|--:|"]
        lines += [f"| {entry['label']} | {entry['value']:.3f} |" for entry in context]
    return [*lines, ""]


def _contention_section(document: dict[str, Any]) -> list[str]:
    entries = document.get("contention", [])
    if not entries:
        return []
    first = entries[0]
    reference = next((e for e in entries if e["name"] == "redis-py Lock"), None)
    lines = [
        f"### Under contention: {first['threads']} threads, one lock, {first['seconds']:.0f} s",
        "",
        "Threads of one Python process, each with its own connection, loop blocking acquire "
        "(bounded by the time left) + release, nothing in between. Jain index: 1 = every "
        f"thread got as many, 1/{first['threads']} = one thread got them all.",
        "",
        f"| lock | acquisitions/s | {TIMES} redis-py Lock | Jain index | per thread min..max "
        "| Redis CPU µs/acquisition | commands/acquisition |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for entry in entries:
        ratio = _ratio(
            entry["acquisitions_per_s"], reference["acquisitions_per_s"] if reference else None
        )
        counts = entry["per_thread"]
        lines.append(
            f"| {entry['name']} | {_rate(entry['acquisitions_per_s'])} | {_x(ratio)} "
            f"| {entry['jain']:.3f} | {min(counts):,}..{max(counts):,} "
            f"| {_us(entry['cpu_us_per_acquisition'])} "
            f"| {_count(entry['commands_per_acquisition'])} |"
        )
    lines.append("")
    lines += [f"- {entry['name']}: {entry['note']}" for entry in entries if entry["note"]]
    return [*lines, ""]


def _scaling_section(document: dict[str, Any], group: str) -> list[str]:
    lines: list[str] = []
    for key, scaling in document.get("scaling", {}).items():
        if scaling.get("group") != group:
            continue
        small, large = scaling["rows"]
        small_label, large_label = small.split(", ")[-1], large.split(", ")[-1]
        verdict = "yes" if scaling["within_limit"] else "**no**"
        lines += [
            f"### `{key}` scaling: {small_label} vs {large_label}",
            "",
            f"| server-side µs per call | {small_label} | {large_label} | ratio |",
            "|---|--:|--:|--:|",
        ]
        for view_key, (_mode, _metric, label) in SCALING_VIEWS.items():
            view = scaling.get(view_key)
            if view is None:
                continue
            lines.append(
                f"| {label} | {_us(view['small'])} | {_us(view['large'])} | {_x(view['ratio'])} |"
            )
        lines += [
            "",
            f"Acceptance (issue {scaling['issue']}), within {scaling['limit']}{TIMES} on the "
            f"first line (the server's CPU for the call, I/O amortized): {verdict}.",
            "",
        ]
    if lines:
        lines += [
            "Compare rows of one mode only: the same script costs more per call with one client "
            "(the server sleeps between calls and starts each on cold caches), and commandstats "
            "counts wall-clock time, which grows when other jobs preempt the server.",
            "",
        ]
    return lines


def _rebalance_section(document: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    rebalance = document.get("rebalance", {})
    if rebalance:
        lines += [
            "### `slots.rebalance`: server-side time per call against the busy threshold",
            "",
            "| call | commandstats ms (wall) | Redis CPU ms | busy-reply-threshold "
            "| share of it (wall) |",
            "|---|--:|--:|--:|--:|",
        ]
        for name, figures in rebalance.items():
            share = figures["fraction_of_threshold"]
            lines.append(
                f"| {name} | {figures['cmd_ms_per_call']:.2f} | {figures['cpu_ms_per_call']:.2f} "
                f"| {figures['busy_reply_threshold_ms']} ms "
                f"| {'—' if share is None else f'{share * 100:.2f} %'} |"
            )
        lines.append("")
    return lines


def _peers_section(document: dict[str, Any]) -> list[str]:
    entries = document.get("queue_peers", [])
    if not entries:
        return []
    settings = document["settings"]
    floor_cpu = document.get("floor", {}).get("cpu_us_per_op")
    ours = next((entry for entry in entries if entry["name"] == "luasched"), None)
    ours_cycle = ours["median"]["cycle_cpu_us_per_op"] if ours else None
    workers = entries[0]["median"]["workers"]
    drain_tasks = entries[0]["median"]["drain_tasks"]
    lines = [
        "### Against other task queues: RQ, BullMQ, Dramatiq (same server, same run)",
        "",
        "Each system in its ordinary use (bench/queue_peers.py): this process enqueues tasks one "
        "call each; then one worker process (fork) drains them with the library's own worker "
        "(the task only counts itself); then the queue is filled with "
        f"{drain_tasks:,} tasks (bulk, unmeasured) and {workers} worker processes drain them "
        f"(at most {settings.get('drain_seconds', 0):.0f} s). One task = enqueue + "
        "dequeue-and-lock + ack: its Redis CPU is the enqueue phase's per task plus the "
        f"1-worker phase's per task. Medians of {settings.get('peer_rounds', 1)} enqueue + "
        "1-worker rounds; one drain. In a drain, the first 2 % of the tasks (at least 20 per "
        "worker) are a warm-up and not measured, so a worker's start (connections, script "
        "loads, registration) is not charged per task; its stop is.",
        "",
        "| system | Redis CPU µs/task: enqueue | dequeue + ack, 1 worker | enqueue + dequeue + ack "
        f"| {TIMES} floor | luasched {TIMES} it | enqueues/s 1 client | tasks/s 1 worker "
        f"| tasks/s {workers} workers | Redis CPU µs/task, {workers} workers |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for entry in entries:
        median = entry["median"]
        cycle = median["cycle_cpu_us_per_op"]
        drained = "" if median["drained_all"] else f" (part: {entry['drain']['finished']:,})"
        lines.append(
            f"| {entry['name']} | {_us(median['enqueue_cpu_us_per_task'])} "
            f"| {_us(median['one_worker_cpu_us_per_task'])} | {_us(cycle)} "
            f"| {_x(_round(_ratio(cycle, floor_cpu)))} "
            f"| {_x(_round(_ratio(ours_cycle, cycle)))} "
            f"| {_rate(median['enqueue_per_s'])} | {_rate(median['one_worker_tasks_per_s'])} "
            f"| {_rate(median['workers_tasks_per_s'])}{drained} "
            f"| {_us(median['workers_cpu_us_per_task'])} |"
        )
    lines.append("")
    lines += [f"- {entry['name']}: {entry['note']}" for entry in entries if entry["note"]]
    lines += [
        "",
        "`(part: n)`: the drain hit its time bound after n tasks; its figures are over those. "
        "The clients, the workers and the server share this machine's cores, so the tasks/s "
        "columns measure the Python side as much as the server.",
        "",
    ]
    return lines


def _plots_section(document: dict[str, Any]) -> list[str]:
    drawn = document.get("plots")
    if drawn is None:
        return []
    lines = ["## Scaling plots", ""]
    if not drawn:
        return [*lines, "No plot drawn (matplotlib is not installed: the `bench` extra).", ""]
    lines += [
        "Redis CPU per call against the size of the state (log scale), from this run's medians; "
        "the tables below have the numbers.",
        "",
    ]
    for name in drawn:
        lines += [f"![{name}]({name})", ""]
    return lines
