"""queue.dequeue's lean path (top of lua/queue/dequeue.lua.j2) against its full path (main()), on
every server: the same random calls on two queues of one namespace, the "lean" queue called as
the wrapper calls it and the "full" queue with wait_ms in a form only main() accepts ("00" for
0), answer the same and leave the same keys after every step. Both
calls of a step run at one server millisecond (tests/support/twins.py)."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from luasched import Scheduler
from luasched.queue import (
    ack_call,
    dequeue_call,
    enqueue_call,
    nack_call,
    new_request_id,
)
from luasched.scripts import Call
from support.twins import QUEUES, QueueTwins, full_form, held_lease, leases_in

Client = Any  # redis.Redis or RedisCluster
TTL_MS = 2000  # request records: short-lived, so the namespace stays small
Maker = Callable[..., "Call[Any]"]  # keys -> the call on that queue


def _path(twins: QueueTwins) -> str:
    """Which path the last lean dequeue took: main() sweeps with ZRANGEBYSCORE, the lean path
    counts with ZCOUNT ("": neither, another script)."""
    swept, counted = twins.calls_of("zrangebyscore"), twins.calls_of("zcount")
    return "lean" if counted == 2 and swept == 0 else "main" if swept else ""


def _full_form(call: Call[Any]) -> Call[Any]:
    """A dequeue call with wait_ms as "00"-style text (a leading zero: main() only)."""
    return full_form(call, 3) if call.script == "queue.dequeue" else call


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dequeue_lean_path_decides_as_the_full_script(r: Client, seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler(r, f"lean-take-{seed}")
    twins = QueueTwins(r, s)
    held: list[tuple[bytes, int]] = []  # leases handed out (some finished or lapsed since)
    dequeue_rids: list[bytes] = [b""]
    other_rids: list[bytes] = []
    task_ids = [b"t0"]
    paths: Counter[str] = Counter()

    def request_id(replays: list[bytes]) -> bytes:
        roll = rng.random()
        if roll < 0.15:
            return b""
        if roll < 0.25 and replays:
            return rng.choice(replays)
        if roll < 0.28 and other_rids:
            return rng.choice(other_rids)  # used by another call: ARG on both
        return new_request_id()

    for step in range(300):
        roll = rng.random()
        kind = "dequeue"
        if roll < 0.45:
            kind = "enqueue"
            if rng.random() < 0.8:  # mostly a new task, else an id seen before (maybe a no-op)
                task_ids.append(b"t%d" % len(task_ids))
                task_id = task_ids[-1]
            else:
                task_id = rng.choice(task_ids)
            rid = new_request_id()
            other_rids.append(rid)
            priority = rng.choice([0, 0, 0, 5, -3])
            delay_ms = rng.choice([0] * 8 + [2, 15])
            max_attempts = rng.choice([1, 2, 5])

            make: Maker = partial(
                enqueue_call,
                task_id=task_id,
                payload=b"payload-" + task_id,
                priority=priority,
                delay_ms=delay_ms,
                max_attempts=max_attempts,
                request_id=rid,
                request_ttl_ms=TTL_MS,
            )
        elif roll < 0.58 and held:
            kind = "ack" if rng.random() < 0.5 else "nack"
            task_id, token = rng.choice(held)
            lease = held_lease(task_id, token)
            rid = new_request_id()
            other_rids.append(rid)
            delay, base_ms = rng.choice([None, 0, 3]), rng.choice([1, 5, 1000])

            if kind == "ack":
                make = partial(ack_call, lease=lease, request_id=rid, request_ttl_ms=TTL_MS)
            else:
                make = partial(
                    nack_call,
                    lease=lease,
                    delay_ms=delay,
                    request_id=rid,
                    request_ttl_ms=TTL_MS,
                    backoff_base_ms=base_ms,
                )
        elif roll < 0.60:
            kind = "corrupt"  # a non-canonical seq or fence: main() takes it, rewrites it

            field = rng.choice([b"seq", b"fence"])
            for queue in QUEUES:
                tasks = twins.keys[queue].fixed[4]
                twins.conn.hset(tasks, field, b"0" + (twins.conn.hget(tasks, field) or b"0"))
            make = partial(dequeue_call, worker_id=b"w", count=1, lease_ms=60000, request_id=b"")
        else:
            count = rng.choice([1, 1, 1, 2, 3, 5])
            lease_ms = rng.choice([60000] * 5 + [4, 20])
            wait_ms = rng.choice([0, 0, 0, 600000])
            rid = request_id(dequeue_rids)
            # Worker ids with NUL bytes, short and long (Lua 5.1's %s cuts one below 100 bytes).
            worker = rng.choice([b"w%d" % seed] * 4 + [b"", b"w\x00nul", b"x" * 150 + b"\x00y"])
            request_ttl_ms = rng.choice([TTL_MS, 5000])
            dequeue_rids.append(rid)
            ack = None
            if held and rng.random() < 0.35:
                kind = "ack_and_dequeue"
                task_id, token = rng.choice(held[-3:] if rng.random() < 0.8 else held)
                ack = held_lease(task_id, token + (1000 if rng.random() < 0.1 else 0))
                count = 1
            elif count > 1:
                kind = "dequeue_many"
            make = partial(
                dequeue_call,
                worker_id=worker,
                count=count,
                lease_ms=lease_ms,
                wait_ms=wait_ms,
                ack=ack,
                request_id=rid,
                request_ttl_ms=request_ttl_ms,
            )
        lean, full = twins.step(make(twins.keys[b"lean"]), _full_form(make(twins.keys[b"full"])))
        paths[kind + ":" + _path(twins)] += 1
        assert lean == full, (step, kind)
        if kind not in ("enqueue", "ack", "nack"):
            held.extend(leases_in(lean))
        twins.assert_same_keys((step, kind))
        if rng.random() < 0.15:
            time.sleep(rng.choice([0.002, 0.01, 0.025]))  # short leases and delays lapse
    for kind in ("dequeue", "dequeue_many", "ack_and_dequeue"):
        # Which path a call takes depends on what lapsed by then (short leases, sleeps): at
        # least twice each, not an exact count (a loaded cluster run saw 4 of one kind).
        assert paths[kind + ":lean"] >= 2, paths  # the lean path answered
        assert paths[kind + ":main"] >= 2, paths  # and fell through
