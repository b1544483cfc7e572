"""The chaos run in short (issue 9, item 1; `make chaos` is the full one): 4,000 tasks, 8 worker
processes SIGKILLed and restarted, one kill -9 of Redis (AOF, appendfsync always) and one
SCRIPT FLUSH mid-run, on a throwaway server of its own. Once per session, with the binary of
redis-7.0 when selected, else of the first standalone server selected (tests/support/chaos.py).

And the checker itself, on a run whose records and logs were tampered with: it must see a task
acked twice, a lost task, two leases at once and a refused ack that was applied.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luasched.keys import Namespace
from luasched.testing import ThrowawayServer
from support import chaos
from support.servers import SPECS, local_binary


def chosen_binary(luasched_servers: dict[str, Any]) -> Path:
    standalone = [name for name, handle in luasched_servers.items() if not handle.is_cluster]
    assert standalone, "select at least one standalone server"
    name = "redis-7.0" if "redis-7.0" in standalone else standalone[0]
    return local_binary(SPECS[name])


@pytest.mark.slow
def test_chaos_run_loses_nothing_and_acks_every_task_once(
    luasched_servers: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    config = chaos.ChaosConfig(
        tasks=4_000,
        binary=chosen_binary(luasched_servers),
        seed=int.from_bytes(os.urandom(4), "big"),
        kills=16,
        # 16 paused first attempts: a pause whose worker is SIGKILLed mid-pause sends no late ack
        # (about half do), so with 4 pauses a run saw no stale ack at all about once in 16.
        pause_every=250,
        time_limit_s=150.0,  # a hang guard, not a speed claim (a run takes ~15 s here)
    )
    report = chaos.run(config)
    with capsys.disabled():
        print("\n" + "\n".join(report.lines()))
    # The guarantee: every task acked exactly once, none lost, never two leases at once.
    assert report.violations == []
    # The faults were injected: each of these holds by the harness's construction whatever the
    # machine's load (chaos.py: the tail waits for the last kill; flush at 30 %, restart at
    # 60 %), so a miss is a harness defect. How many late acks came back stale depends on
    # timing, so it is reported, not asserted; a refused one is always a redelivered task.
    assert report.kills == 16 and min(report.kills_per_worker) >= 1  # every slot was killed
    assert (report.server_restarts, report.script_flushes) == (1, 1)
    assert report.noscript_replies >= 1 and report.script_loads >= 2  # flush and restart
    assert report.leases >= config.tasks
    assert report.redeliveries >= report.stale_acks_refused


# --------------------------------------------------------------------------------------------
# The checker can fail


@pytest.fixture
def small_run(tmp_path: Path) -> Iterator[chaos.Driver]:
    """A driver on its own server, with three tasks enqueued, leased and acked the way the
    workers do (request ids, logs), and no worker process."""
    binary = chaos.find_server_binary(chaos.ROOT)
    config = chaos.ChaosConfig(tasks=3, verbose=False)
    with ThrowawayServer(binary) as server:
        driver = chaos.Driver(config, server, tmp_path)
        queue = driver.queue
        lines = []
        for index in range(3):
            tid = chaos.task_id(index)
            queue.enqueue(tid, b"p", request_id=b"e-" + tid, max_attempts=chaos.MAX_ATTEMPTS)
        leases = queue.dequeue_many(b"w0-1", 3, 60_000, request_id=b"d-w0-1-1")
        for lease in leases:
            lines.append(f"L {lease.task_id.decode()} {lease.token} {lease.deadline_ms} 1")
            queue.ack(lease, request_id=b"a-" + lease.task_id + b"-%d" % lease.token)
            lines.append(f"A {lease.task_id.decode()} {lease.token}")
            lines.append(f"K {lease.task_id.decode()} {lease.token}")
        (tmp_path / "w0-1.log").write_text("\n".join(lines) + "\n")
        try:
            yield driver
        finally:
            driver.client.close()


def token_of(driver: chaos.Driver, index: int) -> int:
    """The fencing token of the small run's lease of task ``index`` (from its log)."""
    for line in (driver.log_dir / "w0-1.log").read_text().splitlines():
        kind, task, token, *_ = line.split()
        if kind == "L" and task == chaos.task_id(index).decode():
            return int(token)
    raise AssertionError(f"task {index} was not leased")


def violations(driver: chaos.Driver) -> list[str]:
    chaos.Checker(driver).check()
    return driver.report.violations


def test_the_checker_passes_an_honest_run(small_run: chaos.Driver) -> None:
    assert violations(small_run) == []
    assert small_run.report.leases == 3


def test_the_checker_sees_a_second_ack_and_a_refused_ack_that_was_applied(
    small_run: chaos.Driver,
) -> None:
    first, second = token_of(small_run, 0), token_of(small_run, 1)
    prefix = Namespace(chaos.NAMESPACE).prefix + b"q:req:a-t000001-"
    suffix = b":" + chaos.QUEUE.encode()
    # A second applied ack of task 1, under a token that was never its lease.
    applied = small_run.client.get(prefix + b"%d" % second + suffix)
    small_run.client.set(prefix + b"%d" % (second + 7) + suffix, applied)
    with (small_run.log_dir / "w0-1.log").open("a") as log:
        log.write(f"S t000000 {first}\n")
    found = violations(small_run)
    assert any("acked twice" in v for v in found), found
    assert any("refused yet applied" in v for v in found), found


def test_the_checker_sees_a_lost_task_and_two_leases_at_once(small_run: chaos.Driver) -> None:
    keys = small_run.queue.keys
    prefix = Namespace(chaos.NAMESPACE).prefix + b"q:req:"
    third = token_of(small_run, 2)
    small_run.client.delete(prefix + b"a-t000002-%d:" % third + chaos.QUEUE.encode())  # never acked
    with (small_run.log_dir / "w0-1.log").open("a") as log:  # a second lease, overlapping
        later = token_of(small_run, 0) + 1
        log.write(f"L t000000 {later} {small_run.queue.stats().now_ms + 60_000} 2\n")
    found = violations(small_run)
    assert any("never acked (lost)" in v for v in found), found
    assert any("two leases at once" in v for v in found), found
    assert small_run.client.hget(keys.fixed[4], "fence") == b"%d" % third  # the last token
