"""The lean paths of queue.enqueue and queue.ack (the top of lua/queue/enqueue.lua.j2 and
lua/queue/ack.lua.j2) answer and write exactly what their main() would: the same random sequence
of calls runs on two queues of one namespace, queue "lean" with canonical arguments (the lean path
takes what it can) and queue "full" with request_ttl_ms "060000" (a leading zero: only main()
takes it), and after every step the replies and every key's contents must be equal.

Both calls of a step run at one server millisecond (tests/support/twins.py): the meta, delayed and
leased scores hold server times."""

from __future__ import annotations

import random
import secrets
from collections import Counter
from typing import Any

import pytest

from luasched import Scheduler
from support.twins import QUEUES, QueueTwins, raw_call, server_ms

Client = Any  # redis.Redis or RedisCluster
IDS = [b"t%d" % number for number in range(24)] + [b"", b"\x00bin\xff id"]
LONG_MS = 10**9  # delays and leases that never come due during the test


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_enqueue_and_ack_lean_paths_write_as_main(r: Client, seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler(r, f"leanw-{seed}")
    twins = QueueTwins(r, s)
    client, keys = twins.conn, twins.keys
    if seed == 2:  # the sequence is near its end: big scores, then exhaustion (CORRUPT via main())
        for queue in QUEUES:
            client.hset(keys[queue].fixed[4], b"seq", str((1 << 43) - 25))
    leases: list[tuple[bytes, int]] = []  # (task_id, token) ever leased (some stale by now)
    request_ids: list[bytes] = []
    seen: Counter[str] = Counter()
    waiting = False

    def request_id() -> bytes:
        roll = rng.random()
        if roll < 0.3:
            return b""
        if roll < 0.8 or not request_ids:
            request_ids.append(secrets.token_hex(16).encode())
            return request_ids[-1]
        return rng.choice(request_ids)  # a replay, maybe of another script's request

    for step in range(260):
        roll = rng.random()
        request_ttl = rng.choice(["60000", "90000", "86400000"])
        ttl = {b"lean": request_ttl, b"full": "0" + request_ttl}  # "0...": only main() takes it
        if roll < 0.45:
            name, rid = "queue.enqueue", request_id()
            args = [
                rng.choice(IDS[:-2] if rng.random() < 0.95 else IDS),
                rng.choice([b"", b"payload", secrets.token_bytes(rng.randrange(1, 40))]),
                rng.choice([0, 0, 0, 1, -3, 511, -512, 7]),
                rng.choice([0, 0, 0, 0, 0, 0, LONG_MS, 1]),
                rng.choice([1, 2, 3, 25]),
                rid,
            ]
            per_queue = {queue: [*args, ttl[queue]] for queue in QUEUES}
        elif roll < 0.75:
            name, rid = "queue.ack", request_id()
            if leases and rng.random() < 0.85:
                task_id, token = rng.choice(leases[-4:] if rng.random() < 0.7 else leases)
                token += rng.choice([0, 0, 0, 0, -1, 1])
            else:
                task_id, token = rng.choice(IDS[:-2]), rng.randrange(1, 5)
            per_queue = {queue: [task_id, max(token, 1), rid, ttl[queue]] for queue in QUEUES}
        elif roll < 0.88:
            name, rid = "queue.dequeue", b""
            args = [b"w", rng.randrange(1, 4), LONG_MS, 0, b"", 0, rid, 60000]
            per_queue = {queue: args for queue in QUEUES}
        elif roll < 0.94 and leases:
            name, rid = "queue.nack", b""
            task_id, token = rng.choice(leases[-4:])
            delay = rng.choice([0, LONG_MS, -1])
            args = [task_id, token, delay, b"why", 1000, 10**6, rid, 60000]
            per_queue = {queue: args for queue in QUEUES}
        else:
            name = "waiters"  # a dequeuer starts or stops blocking (enqueue then pushes wake-ups)
            present = waiting = rng.random() < 0.6
            now_ms = server_ms(client.time())  # one absolute deadline per key pair
            for queue in QUEUES:
                if present:
                    client.set(keys[queue].fixed[6], b"1", pxat=now_ms + LONG_MS)
                    if seed != 1:  # a wake list at its cap: the next pushes trim it
                        client.rpush(keys[queue].fixed[5], *[b"1"] * 15)
                        client.pexpireat(keys[queue].fixed[5], now_ms + 2000)
                else:
                    client.delete(keys[queue].fixed[6], keys[queue].fixed[5])
            continue
        calls = {
            queue: raw_call(name, keys[queue].with_request(rid), per_queue[queue])
            for queue in QUEUES
        }
        lean, full = twins.step(calls[b"lean"], calls[b"full"])
        assert lean == full, (step, name, per_queue[b"lean"])
        twins.assert_same_keys((step, name))
        failed = isinstance(lean, str) and lean.startswith("error: ")  # as_text of an error
        if name == "queue.dequeue" and not failed:
            leases.extend((bytes(lean[at]), int(lean[at + 3])) for at in range(1, len(lean), 5))
        outcome = lean[len("error: ") :].split(":")[0] if failed else "ok"
        if name == "queue.enqueue" and not failed:
            outcome = f"created={lean[0]} {lean[1].decode()}"
            seen["woken"] += waiting and lean[0] == 1
        seen[f"{name} {outcome}"] += 1
    # The sequence reached what it is for: creations (ready and delayed), existing ids, acks and
    # stale acks, request ids used by another script; seed 2 the exhausted sequence (after which
    # dequeue's promotions fail too, so few acks).
    assert seen["queue.enqueue created=1 ready"] > 10, seen
    assert seen["queue.enqueue created=1 delayed"] > 3, seen
    assert sum(count for what, count in seen.items() if "created=0" in what) > 5, seen
    assert seen["queue.ack LUASCHED_STALE queue.ack"] > 3, seen
    assert seen["woken"] > 3, seen  # creations while a dequeuer waits (wake-up pushes)
    assert (
        seen["queue.enqueue LUASCHED_ARG queue.enqueue"] + seen["queue.ack LUASCHED_ARG queue.ack"]
        > 0
    )
    if seed == 2:
        assert seen["queue.enqueue LUASCHED_CORRUPT queue.enqueue"] > 3, seen
    else:
        assert seen["queue.ack ok"] > 10, seen


#: Arguments at and just past each bound the lean paths check by length first (a value shorter
#: than its bound's own length needs no comparison): enqueue's priority, delay_ms, max_attempts,
#: request_ttl_ms, and whether main() refuses them. Each in-range call must create the task as
#: main() does, each one past a bound must be refused (ARG) as main() refuses it, no key changed.
ENQUEUE_BOUNDS = [
    (511, 0, 3, "60000", False),
    (-512, 0, 3, "60000", False),
    (512, 0, 3, "60000", True),
    (-513, 0, 3, "60000", True),
    (0, 0, 999_999, "60000", False),
    (0, 0, 1_000_000, "60000", False),
    (0, 0, 1_000_001, "60000", True),
    (0, 9_999_999_999, 3, "60000", False),
    (0, 31_536_000_000, 3, "60000", False),
    (0, 31_536_000_001, 3, "60000", True),
    (0, 0, 3, "9999999", False),
    (0, 0, 3, "86400000", False),
    (0, 0, 3, "86400001", True),
]


def _unechoed(reply: Any) -> Any:
    """An error reply without the value it echoes (the full twin's request_ttl_ms has a leading
    zero); any other reply as it is."""
    return reply.split(", got ")[0] if isinstance(reply, str) else reply


def test_enqueue_and_ack_lean_paths_at_their_bounds_answer_as_main(r: Client) -> None:
    s = Scheduler(r, "leanw-bounds")
    twins = QueueTwins(r, s)
    keys = twins.keys
    outcomes = []
    for number, (priority, delay, attempts, ttl, _) in enumerate(ENQUEUE_BOUNDS):
        rid = secrets.token_hex(16).encode()
        args = [b"b%d" % number, b"payload", priority, delay, attempts, rid]
        calls = [
            raw_call("queue.enqueue", keys[queue].with_request(rid), [*args, prefix + ttl])
            for queue, prefix in ((b"lean", ""), (b"full", "0"))
        ]
        lean, full = map(_unechoed, twins.step(*calls))
        assert lean == full, (priority, delay, attempts, ttl)
        twins.assert_same_keys((priority, delay, attempts, ttl))
        outcomes.append(lean if isinstance(lean, str) else tuple(lean))
    arg = "error: LUASCHED_ARG queue.enqueue"
    refused = [isinstance(outcome, str) and outcome.startswith(arg) for outcome in outcomes]
    assert refused == [bound[4] for bound in ENQUEUE_BOUNDS], outcomes
    # Every ready task is taken; the acks at the request_ttl_ms and token bounds, then stale.
    take = [b"w", 16, LONG_MS, 0, b"", 0, b"", 60000]
    lean, full = twins.step(
        *(raw_call("queue.dequeue", keys[queue].with_request(b""), take) for queue in QUEUES)
    )
    assert lean == full
    leases = [(bytes(lean[at]), int(lean[at + 3])) for at in range(1, len(lean), 5)]
    assert len(leases) == 6, lean
    acks = [
        (leases[0][0], leases[0][1], "86400000"),
        (leases[1][0], leases[1][1], "86400001"),
        (leases[1][0], leases[1][1], "9999999"),
        (leases[2][0], 9_007_199_254_740_991, "60000"),
        (leases[2][0], 9_007_199_254_740_992, "60000"),
        (leases[0][0], leases[0][1], "60000"),
    ]
    answers = []
    for task_id, token, ttl in acks:
        rid = secrets.token_hex(16).encode()
        calls = [
            raw_call(
                "queue.ack", keys[queue].with_request(rid), [task_id, token, rid, prefix + ttl]
            )
            for queue, prefix in ((b"lean", ""), (b"full", "0"))
        ]
        lean, full = map(_unechoed, twins.step(*calls))
        assert lean == full, (task_id, token, ttl)
        twins.assert_same_keys((task_id, token, ttl))
        answers.append(lean if isinstance(lean, str) else int(lean))
    assert [answer if answer == 1 else ":".join(answer.split(":")[:2]) for answer in answers] == [
        1,
        "error: LUASCHED_ARG queue.ack",
        1,
        "error: LUASCHED_STALE queue.ack",
        "error: LUASCHED_ARG queue.ack",
        "error: LUASCHED_STALE queue.ack",
    ], answers
