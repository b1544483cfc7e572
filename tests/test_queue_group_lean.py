"""The lean paths of queue.group_dequeue and queue.group_ack (the top of
lua/queue/group_dequeue.lua.j2 and lua/queue/group_ack.lua.j2) answer and write exactly what their
main() would: the same random sequence of calls on two queues with groups in one namespace, queue
"lean" called as the wrapper calls it and queue "full" with an argument in a form only main()
accepts (a dequeue's wait_ms and an ack's request_ttl_ms with a leading zero), must answer the same
and leave the same keys after every step. The sequence mixes what sends a call to main(): groups
with weights, caps, pauses and rates, a queue cap and pause, tasks without a group, delays, short
leases, nacks, batches, acks inside a dequeue, replays. Both calls of a step run at one server
millisecond (tests/support/twins.py)."""

from __future__ import annotations

import random
import time
from collections import Counter
from functools import partial
from typing import Any

import pytest

from luasched import Scheduler
from luasched.leases import ack_call, nack_call
from luasched.queue import (
    GroupKeys,
    dequeue_call,
    enqueue_call,
    new_request_id,
    set_group_call,
    set_limits_call,
    set_rate_call,
)
from luasched.scripts import Call
from support.twins import QUEUES, QueueTwins, full_form, held_lease, leases_in

Client = Any  # redis.Redis or RedisCluster
TTL_MS = 2000  # request records: short-lived, so the namespace stays small
GROUPS = [b"g0", b"g1", b"g2", b"tenant-\x00\xff", b"g" * 40]


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "settings"), [(1, 0.06), (2, 0.06), (3, 0.06), (4, 0.0)])
def test_group_dequeue_and_ack_lean_paths_decide_as_main(
    r: Client, seed: int, settings: float
) -> None:
    """``settings``: the share of steps that change a group's or the queue's settings (with
    none, most takes and acks stay on the lean paths)."""
    rng = random.Random(seed)
    s = Scheduler(r, f"lean-group-{seed}")
    twins = QueueTwins(r, s)
    keys = {queue: GroupKeys.of(s.namespace, queue) for queue in QUEUES}
    held: list[tuple[bytes, int]] = []  # leases handed out (some finished or lapsed since)
    dequeue_rids: list[bytes] = [b""]
    paths: Counter[str] = Counter()
    number = 0

    for step in range(320):
        roll = rng.random()
        kind, full_at = "dequeue", -1
        if roll < 0.36:
            kind = "enqueue"
            number += 1
            group = rng.choice([*GROUPS, *GROUPS[:3], None])  # None: a task without a group
            make: Any = partial(
                enqueue_call,
                task_id=b"t%d" % number,
                payload=b"payload-%d" % number,
                priority=rng.choice([0, 0, 0, 5, -3]),
                delay_ms=rng.choice([0] * 8 + [2, 15]),
                max_attempts=rng.choice([1, 2, 5]),
                request_id=b"",
                request_ttl_ms=TTL_MS,
                group=group,
            )
            if group is None:  # queue.enqueue (8 KEYS): the plain script, as a client sends it
                make = partial(_plain_enqueue, make, twins)
        elif roll < 0.36 + settings:
            # Settings come and go: most calls set a group or the queue back to no limit.
            kind = "settings"
            group = rng.choice(GROUPS[:3])
            choice = rng.random()
            if choice < 0.5:
                make = partial(
                    set_group_call,
                    group=group,
                    weight=rng.choice([None, 1, 2, 3]),
                    max_active=rng.choice([None, 0, 0, 0, 1, 3]),
                    paused=rng.choice([None, None, False, False, True]),
                )
            elif choice < 0.75:
                make = partial(
                    set_rate_call,
                    per_second=rng.choice([0, 0, 0, 500, 5000]),
                    burst=rng.choice([1, 3]),
                    group=rng.choice([group, group, None]),
                )
            else:
                make = partial(
                    set_limits_call,
                    max_active=rng.choice([None, 0, 0, 0, 4]),
                    paused=rng.choice([None, False, False, False, True]),
                )
        elif roll < 0.58 + settings and held:
            task_id, token = rng.choice(held[-4:] if rng.random() < 0.8 else held)
            lease = held_lease(task_id, token + (1000 if rng.random() < 0.05 else 0))
            if rng.random() < 0.75:
                kind, full_at = "ack", 3
                make = partial(
                    ack_call,
                    lease=lease,
                    request_id=rng.choice([b"", new_request_id()]),
                    request_ttl_ms=TTL_MS,
                    script="queue.group_ack",
                )
            else:
                kind = "nack"
                make = partial(
                    nack_call,
                    lease=lease,
                    delay_ms=rng.choice([None, 0, 3]),
                    request_id=b"",
                    request_ttl_ms=TTL_MS,
                    backoff_base_ms=1,
                    script="queue.group_nack",
                )
        else:
            full_at = 3
            count = rng.choice([1] * 7 + [2, 3])
            rid = rng.choice([b"", new_request_id(), new_request_id()])
            if rng.random() < 0.1:
                rid = rng.choice(dequeue_rids)  # a replay
            dequeue_rids.append(rid)
            ack = None
            if held and rng.random() < 0.15:
                kind = "ack_and_dequeue"
                ack = held_lease(*rng.choice(held[-3:]))
                count = 1
            make = partial(
                dequeue_call,
                worker_id=rng.choice([b"w", b"", b"w\x00nul"]),
                count=count,
                lease_ms=rng.choice([60000] * 6 + [4, 20]),
                wait_ms=rng.choice([0, 0, 0, 600000]),
                ack=ack,
                request_id=rid,
                request_ttl_ms=rng.choice([TTL_MS, 5000]),
            )
        lean_call, full_call = make(keys[b"lean"]), make(keys[b"full"])
        if full_at >= 0:
            full_call = full_form(full_call, full_at)
        lean, full = twins.step(lean_call, full_call)
        assert lean == full, (step, kind, lean, full)
        if kind in ("dequeue", "ack_and_dequeue"):
            path = "main" if twins.calls_of("zrangebyscore") else "lean"
            paths[f"dequeue:{path}"] += 1
            held.extend(leases_in(lean))
        elif kind == "ack":
            paths["ack:" + ("main" if twins.calls_of("time") else "lean")] += 1
        twins.assert_same_keys((step, kind))
        if rng.random() < 0.12:
            time.sleep(rng.choice([0.002, 0.01, 0.025]))  # short leases and delays lapse
    # Which path a call takes depends on what lapsed by then: several of each, not a count.
    for kind in ("dequeue", "ack"):
        assert paths[f"{kind}:lean"] >= 2, paths  # the lean path answered
        assert paths[f"{kind}:main"] >= 2, paths  # and fell through


def _plain_enqueue(make: Any, twins: QueueTwins, keys: GroupKeys) -> Call[Any]:
    """``make``'s enqueue of a task without a group as queue.enqueue (the queue's 8 KEYS)."""
    call = make(keys)
    plain = twins.keys[keys.queue]
    return Call("queue.enqueue", plain.with_request(b""), call.args, call.parse)
