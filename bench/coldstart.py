"""Cold start (group ``coldstart``): what a fresh process pays before its first luasched call.

Unlike the rows of ``engine.py`` this is not the server's cost per call but the client's wall
time in a new interpreter, each figure the median of ``Settings.coldstart_runs`` fresh
subprocesses, the cases interleaved run by run (so a busy spell of the machine hits each alike):

* ``luasched``: ``import luasched``, ``Scheduler(redis.Redis(...), ns)``, a first
  ``s.slots.keyslot("a")`` (its EVALSHA, NOSCRIPT the first time on the server, the Functions
  probe); ``redis``: ``import redis`` and a ``PING`` on the same server. Timed inside the
  process from before the first import to the reply (interpreter start-up excluded, the same
  for both); the whole process's wall time is recorded too.
* ``export``: the whole ``python -m luasched.cli export DIR`` process, start-up included.
* threads: ``n`` threads of one fresh process create their first Scheduler at once, 1 vs 8,
  for the default configuration (loaded from the package) and a custom one (rendered); the
  imports and the redis-py clients are made before the clock starts. The ``loaded`` cases are
  their floor: the same threads, with the default configuration's scripts loaded before the
  clock (``render_all()``), so what 8 threads cost more than 1 there is the threads' own
  start-up and Scheduler objects, with nothing to load. The ``one_cpu`` cases are the default
  ones in a process pinned to one CPU (``os.sched_setaffinity``) before the clock: the same
  work, with no GIL handoffs between cores while the loading thread reads its files. The
  ``bare`` cases are the interpreter's own floor: the same threads released at once, making no
  Scheduler at all (what 8 threads cost more than 1 before luasched does anything).

Every luasched process also reports ``render_count()``, so the figures say whether anything was
rendered. The subprocesses may write and use bytecode caches (``PYTHONDONTWRITEBYTECODE`` is
dropped from their environment), as an installed package has them (pip compiles a wheel's
modules): the warm-up run writes them, so no measured run compiles source, redis's or luasched's.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

from .engine import Env

#: The configuration the custom-configuration thread rows render (any but the default).
CUSTOM_MAX_BATCH = 999

_CLOCK = """\
import time
started = time.perf_counter()
"""

REDIS = (
    _CLOCK
    + """\
import sys
import redis
client = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]))
client.ping()
print(time.perf_counter() - started, 0)
"""
)

LUASCHED = (
    _CLOCK
    + """\
import sys
import redis
import luasched
from luasched.render import render_count
s = luasched.Scheduler(redis.Redis(host=sys.argv[1], port=int(sys.argv[2])), "bench-coldstart")
s.slots.keyslot("a")
print(time.perf_counter() - started, render_count())
"""
)

THREADS = """\
import os
import sys
import threading
import time
import redis
from luasched import Scheduler  # imports all a Scheduler needs, before the clock starts
from luasched.render import ScriptConfig, render_all, render_count
host, port, count, max_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = ScriptConfig(max_batch=max_batch)
if sys.argv[5] == "loaded":
    render_all(config)
elif sys.argv[5] == "one_cpu":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
clients = [redis.Redis(host=host, port=port) for _ in range(count)]
gate = threading.Barrier(count + 1)
bare = sys.argv[5] == "bare"
def first_scheduler(client):
    gate.wait()
    if not bare:
        Scheduler(client, "bench-coldstart", config=config)
threads = [threading.Thread(target=first_scheduler, args=(client,)) for client in clients]
for thread in threads:
    thread.start()
started = time.perf_counter()
gate.wait()
for thread in threads:
    thread.join()
print(time.perf_counter() - started, render_count())
"""


def _timed(command: list[str]) -> tuple[float, float, int]:
    """Run ``command``; (its reported seconds, the whole process's wall seconds, renders)."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=environment
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed: {done.stderr.strip()[-2000:]}")
    inside, renders = done.stdout.split()[-2:]
    return float(inside), wall, int(renders)


def _python(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def _export(directory: str) -> list[str]:
    # The command prints the written paths; a last line "<seconds> 0" keeps _timed's format.
    return _python(
        "import sys\nfrom luasched.cli import main\nstatus = main(['export', sys.argv[1]])\n"
        "print(0, 0)\nsys.exit(status)",
        directory,
    )


def measure(env: Env, phase: Callable[[str, int, int], None]) -> dict[str, Any]:
    """Every cold-start figure, medians of ``env.settings.coldstart_runs`` fresh processes."""
    runs = env.settings.coldstart_runs
    host, port = env.host, env.port
    default_batch = 1000  # ScriptConfig().max_batch: the shipped configuration
    with tempfile.TemporaryDirectory(prefix="luasched-bench-export-") as directory:
        cases: dict[str, list[str]] = {
            "redis": _python(REDIS, host, port),
            "luasched": _python(LUASCHED, host, port),
            "export": _export(directory),
            **{
                f"threads_{count}_{case}": _python(THREADS, host, port, count, batch, when)
                for case, batch, when in (
                    ("default", default_batch, "first"),
                    ("custom", CUSTOM_MAX_BATCH, "first"),
                    ("loaded", default_batch, "loaded"),
                    ("one_cpu", default_batch, "one_cpu"),
                    ("bare", default_batch, "bare"),
                )
                for count in (1, 8)
            },
        }
        for command in cases.values():  # warm-up: file caches, the script on the server
            _timed(command)
        samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in cases}
        for run in range(runs):
            phase("fresh processes", run + 1, runs)
            for name, command in cases.items():
                samples[name].append(_timed(command))
    result: dict[str, Any] = {"runs": runs, "custom_max_batch": CUSTOM_MAX_BATCH}
    for name, taken in samples.items():
        result[name] = {
            "seconds": round(statistics.median(inside for inside, _, _ in taken), 6),
            "process_seconds": round(statistics.median(wall for _, wall, _ in taken), 4),
            "renders": max(renders for _, _, renders in taken),
            "rounds": [[round(inside, 6), round(wall, 4)] for inside, wall, _ in taken],
        }
    result["export"]["seconds"] = result["export"]["process_seconds"]
    return result


def line(entry: dict[str, Any]) -> str:
    """One status line of the results."""

    def seconds(name: str) -> str:
        return f"{entry[name]['seconds'] * 1000:.0f} ms"

    return (
        f"coldstart: luasched {seconds('luasched')} vs redis {seconds('redis')} "
        f"({entry['luasched']['seconds'] / entry['redis']['seconds']:.2f}x); export "
        f"{seconds('export')}; first Schedulers 8 vs 1 threads: default "
        f"{seconds('threads_8_default')} vs {seconds('threads_1_default')}, custom "
        f"{seconds('threads_8_custom')} vs {seconds('threads_1_custom')}; renders "
        f"{ {name: entry[name]['renders'] for name in ('luasched', 'threads_8_custom')} }"
    )
