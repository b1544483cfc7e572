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
