"""The lean paths of queue.enqueue and queue.ack (the top of lua/queue/enqueue.lua.j2 and
lua/queue/ack.lua.j2) answer and write exactly what their main() would: the same random sequence
of calls runs on two queues of one namespace, queue "lean" with canonical arguments (the lean path
takes what it can) and queue "full" with request_ttl_ms "060000" (a leading zero: only main()
takes it), and after every step the replies and every key's contents must be equal.

Both calls of a step run in one MULTI/EXEC between two TIME reads, so both scripts read the same
server millisecond (the meta, delayed and leased scores hold server times); a step whose TIME
reads straddle a millisecond is undone (every key of the namespace restored) and run again."""

from __future__ import annotations

import random
import secrets
from collections import Counter
from typing import Any

import pytest
import redis
import redis.cluster

from helpers import namespace_keys
from luasched import Scheduler
from luasched.queue import QueueKeys
from luasched.render import render_all

Client = Any  # redis.Redis or RedisCluster

QUEUES = (b"lean", b"full")
IDS = [b"t%d" % number for number in range(24)] + [b"", b"\x00bin\xff id"]
LONG_MS = 10**9  # delays and leases that never come due during the test


def _direct(r: Client, prefix: bytes) -> Any:
    """A plain connection to the primary of the namespace's slot (MULTI with TIME on a cluster)."""
    if isinstance(r, redis.cluster.RedisCluster):
        return r.get_redis_connection(r.get_node_from_key(prefix))
    return r


def _contents(client: Any, s: Scheduler) -> dict[bytes, dict[bytes, Any]]:
    """Every key of each queue by its name without the queue: (type, contents, PTTL), read in one
    MULTI, so a key that expires (the wake list lives 2 s) is gone from both or neither."""
    found: dict[bytes, dict[bytes, Any]] = {queue: {} for queue in QUEUES}
    keys = namespace_keys(client, s.namespace)
    types = [
        kind.decode() if isinstance(kind, bytes) else kind
        for kind in [client.type(key) for key in keys]
    ]
    reads = {"string": "GET", "hash": "HGETALL", "list": "LRANGE", "zset": "ZRANGE"}
    pipe = client.pipeline(transaction=True)
    for key, kind in zip(keys, types, strict=True):
        extra = {"list": [0, -1], "zset": [0, -1, "WITHSCORES"]}.get(kind, [])  # "none": expired
        pipe.execute_command(reads.get(kind, "TYPE"), key, *extra)
        pipe.pttl(key)
    replies = pipe.execute(raise_on_error=False)
    for position, (key, kind) in enumerate(zip(keys, types, strict=True)):
        value, ttl = replies[2 * position], replies[2 * position + 1]
        if ttl == -2:  # expired (or deleted) since the scan
            continue
        for queue in QUEUES:
            if key.endswith(b":" + queue):
                found[queue][key[: -len(queue) - 1]] = (kind, value, ttl)
    return found


def _save(client: Any, s: Scheduler) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the namespace: its DUMP and its absolute deadline (0: none), read in one MULTI
    (a key of queue "full" takes the deadline of its "lean" twin: they were set in the same ms)."""
    keys = namespace_keys(client, s.namespace)
    pipe = client.pipeline(transaction=True)
    pipe.time()
    for key in keys:
        pipe.dump(key)
        pipe.pttl(key)
    replies = pipe.execute()
    now_ms = _ms(replies[0])
    saved = {
        key: (replies[1 + 2 * at], now_ms + replies[2 + 2 * at] if replies[2 + 2 * at] > 0 else 0)
        for at, key in enumerate(keys)
        if replies[1 + 2 * at] is not None
    }
    for key in saved:
        twin = key[:-5] + b":lean"
        if key.endswith(b":full") and twin in saved:
            saved[key] = (saved[key][0], saved[twin][1])
    return saved


def _restore(client: Any, s: Scheduler, saved: dict[bytes, tuple[bytes, int]]) -> None:
    """Puts `saved` back, each key with its absolute deadline (RESTORE ... ABSTTL)."""
    for key in namespace_keys(client, s.namespace):
        client.delete(key)
    for key, (dumped, deadline_ms) in saved.items():
        client.restore(key, deadline_ms, dumped, replace=True, absttl=deadline_ms > 0)


def _without_ttl(contents: dict[bytes, Any]) -> dict[bytes, Any]:
    return {key: (kind, value, ttl > 0) for key, (kind, value, ttl) in contents.items()}


def _ms(reply: Any) -> int:
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


def _answer(value: Any) -> Any:
    return f"error: {value}" if isinstance(value, Exception) else value


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_enqueue_and_ack_lean_paths_write_as_main(r: Client, seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler(r, f"leanw-{seed}")
    client = _direct(r, s.namespace.prefix)
    keys = {queue: QueueKeys.of(s.namespace, queue) for queue in QUEUES}
    scripts = render_all()
    texts = {
        name: scripts[name].text
        for name in ("queue.enqueue", "queue.ack", "queue.dequeue", "queue.nack")
    }
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
            now_ms = _ms(client.time())  # one absolute deadline per key pair
            for queue in QUEUES:
                if present:
                    client.set(keys[queue].fixed[6], b"1", pxat=now_ms + LONG_MS)
                    if seed != 1:  # a wake list at its cap: the next pushes trim it
                        client.rpush(keys[queue].fixed[5], *[b"1"] * 15)
                        client.pexpireat(keys[queue].fixed[5], now_ms + 2000)
                else:
                    client.delete(keys[queue].fixed[6], keys[queue].fixed[5])
            continue
        for _attempt in range(50):
            saved = _save(client, s)
            pipe = client.pipeline(transaction=True)
            pipe.time()
            for queue in QUEUES:
                call_keys = keys[queue].with_request(rid)
                pipe.eval(texts[name], len(call_keys), *call_keys, *per_queue[queue])
            pipe.time()
            before, lean, full, after = pipe.execute(raise_on_error=False)
            if _ms(before) == _ms(after):
                break
            _restore(client, s, saved)  # the two calls may have read different milliseconds
        else:
            pytest.fail("no step within one millisecond in 50 attempts")
        assert _answer(lean) == _answer(full), (step, name, per_queue[b"lean"])
        contents = _contents(client, s)
        assert _without_ttl(contents[b"lean"]) == _without_ttl(contents[b"full"]), (step, name)
        for key, (_kind, _value, ttl) in contents[b"lean"].items():
            # Both set in the same millisecond, read in one MULTI: at most 1 ms apart.
            assert abs(ttl - contents[b"full"][key][2]) <= 1, (step, name, key)
        if name == "queue.dequeue" and not isinstance(lean, Exception):
            leases.extend((bytes(lean[at]), int(lean[at + 3])) for at in range(1, len(lean), 5))
        outcome = str(lean).split(":")[0] if isinstance(lean, Exception) else "ok"
        if name == "queue.enqueue" and not isinstance(lean, Exception):
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
