"""queue.dequeue's lean path (top of lua/queue/dequeue.lua.j2) against its full path (main()), on
every server: the same random calls on two queues of one namespace, the "lean" queue called as
the wrapper calls it and the "full" queue with wait_ms in a form only main() accepts ("00" for
0), answer the same and leave the same keys after every step.

The two calls of a step run in one MULTI between two TIMEs: when both TIMEs read the same
millisecond, both scripts read that millisecond too, so deadlines and due times agree exactly;
otherwise the step is undone (DUMP/RESTORE of every key) and run again. Both queues live in one
namespace (one hash tag, one slot), so the transaction is legal on a cluster too."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import redis
import redis.cluster

from helpers import namespace_keys
from luasched import Scheduler
from luasched.queue import (
    Lease,
    QueueKeys,
    ack_call,
    dequeue_call,
    enqueue_call,
    nack_call,
    new_request_id,
)
from luasched.render import render_all
from luasched.scripts import Call

Client = Any  # redis.Redis or RedisCluster
QUEUES = (b"lean", b"full")  # the same length: equal keys have equal encodings
SCRIPTS = ("queue.enqueue", "queue.dequeue", "queue.ack", "queue.nack")
TTL_MS = 2000  # request records: short-lived, so the namespace stays small
Maker = Callable[..., "Call[Any]"]  # keys -> the call on that queue


def _plain(r: Client, s: Scheduler) -> redis.Redis:
    """A plain connection to the server (the primary of the namespace's slot on a cluster)."""
    if isinstance(r, redis.cluster.RedisCluster):
        return r.get_redis_connection(r.get_node_from_key(s.namespace.prefix))
    return r  # type: ignore[no-any-return]


def _ms(reply: tuple[int, int]) -> int:
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


def _calls(info: dict[str, Any], command: str) -> int:
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


class Twins:
    """The lean and the full queue of one namespace, stepped together."""

    def __init__(self, r: Client, s: Scheduler) -> None:
        self.conn = _plain(r, s)
        self.namespace = s.namespace
        self.keys = {queue: QueueKeys.of(s.namespace, queue) for queue in QUEUES}
        scripts = render_all()
        self.sha = {name: self.conn.script_load(scripts[name].text) for name in SCRIPTS}
        self.retries = 0
        self.path = ""  # of the last dequeue of the lean queue: "lean", "main" (after the sweeps)

    def _saved(self) -> list[tuple[bytes, bytes, int]]:
        keys = namespace_keys(self.conn, self.namespace)
        pipe = self.conn.pipeline(transaction=True)
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        replies = pipe.execute()
        # RESTORE's ttl 0 is "none": a key about to lapse (PTTL 0) keeps 1 ms.
        return [
            (key, dumped, 0 if int(ttl) == -1 else max(int(ttl), 1))
            for key, dumped, ttl in zip(keys, replies[0::2], replies[1::2], strict=True)
            if dumped is not None
        ]

    def _restore(self, saved: list[tuple[bytes, bytes, int]]) -> None:
        pipe = self.conn.pipeline(transaction=True)
        keys = namespace_keys(self.conn, self.namespace)
        if keys:
            pipe.delete(*keys)
        for key, dumped, ttl in saved:
            pipe.restore(key, ttl, dumped)
        pipe.execute()

    def _add(self, pipe: Any, call: Call[Any]) -> None:
        pipe.evalsha(self.sha[call.script], len(call.keys), *call.keys, *call.args)

    def step(self, make: Maker) -> tuple[Any, Any]:
        """Runs make(keys) on both queues at one server millisecond (a dequeue of the full queue
        in its main()-only form); both replies (an error reply as its text)."""
        for _ in range(100):
            saved = self._saved()
            pipe = self.conn.pipeline(transaction=True)
            pipe.time()
            pipe.info("commandstats")
            lean_call = make(self.keys[b"lean"])
            self._add(pipe, lean_call)
            pipe.info("commandstats")
            self._add(pipe, _full_form(make(self.keys[b"full"])))
            pipe.time()
            before, stats_0, lean, stats_1, full, after = pipe.execute(raise_on_error=False)
            if _ms(before) == _ms(after):
                # main() sweeps with ZRANGEBYSCORE, the lean path counts with ZCOUNT (commandstats
                # count the calls of scripts too).
                swept = _calls(stats_1, "zrangebyscore") - _calls(stats_0, "zrangebyscore")
                counted = _calls(stats_1, "zcount") - _calls(stats_0, "zcount")
                self.path = "lean" if counted == 2 and swept == 0 else "main" if swept else ""
                return _text(lean), _text(full)
            self.retries += 1
            self._restore(saved)
        raise AssertionError("no two calls in one millisecond in 100 tries")

    def contents(self) -> dict[bytes, dict[bytes, Any]]:
        """Per queue, every key of it by its name without the queue's suffix: its type, value
        and TTL (-1: none). One transaction: every key is read at one moment."""
        keys = namespace_keys(self.conn, self.namespace)
        pipe = self.conn.pipeline(transaction=True)
        for key in keys:
            pipe.type(key)
            pipe.pttl(key)
        replies = pipe.execute()
        kinds = [kind.decode() if isinstance(kind, bytes) else kind for kind in replies[0::2]]
        pipe = self.conn.pipeline(transaction=True)
        for key, kind in zip(keys, kinds, strict=True):
            if kind == "string":
                pipe.get(key)
            elif kind == "hash":
                pipe.hgetall(key)
            elif kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            elif kind == "list":
                pipe.lrange(key, 0, -1)
            else:
                pipe.exists(key)  # none (expired since): left out below
        values = pipe.execute()
        found: dict[bytes, dict[bytes, Any]] = {queue: {} for queue in QUEUES}
        for key, kind, ttl, value in zip(keys, kinds, replies[1::2], values, strict=True):
            queue = key.rsplit(b":", 1)[1]
            if kind != "none" and queue in found:
                found[queue][key[: -len(queue) - 1]] = (kind, value, int(ttl))
        return found

    def assert_same_keys(self, where: object) -> None:
        """Both queues hold the same keys with the same contents, and a TTL on the same ones.
        A key within 300 ms of expiring on either side is left out (it may lapse between reads)."""
        contents = self.contents()
        lean, full = contents[b"lean"], contents[b"full"]
        for name in set(lean) | set(full):
            if any(0 <= side[name][2] < 300 for side in (lean, full) if name in side):
                lean.pop(name, None)
                full.pop(name, None)
        assert {name: (kind, value, ttl > 0) for name, (kind, value, ttl) in lean.items()} == {
            name: (kind, value, ttl > 0) for name, (kind, value, ttl) in full.items()
        }, where


def _text(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        return f"error: {reply}"
    return reply


def _full_form(call: Call[Any]) -> Call[Any]:
    """A dequeue call with wait_ms as "00"-style text (a leading zero: main() only)."""
    if call.script != "queue.dequeue":
        return call
    args = list(call.args)
    args[3] = "0" + str(args[3])
    return Call(call.script, call.keys, tuple(args), call.parse)


def _leases(reply: Any) -> list[tuple[bytes, int]]:
    if not isinstance(reply, list):
        return []
    return [(bytes(reply[i]), int(reply[i + 3])) for i in range(1, len(reply), 5)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dequeue_lean_path_decides_as_the_full_script(r: Client, seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler(r, f"lean-take-{seed}")
    twins = Twins(r, s)
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
            lease = _lease(task_id, token)
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
            # string.format's %s (format_meta) cuts a worker id at a NUL byte below 100 bytes.
            worker = rng.choice([b"w%d" % seed] * 4 + [b"", b"w\x00nul", b"x" * 150 + b"\x00y"])
            request_ttl_ms = rng.choice([TTL_MS, 5000])
            dequeue_rids.append(rid)
            ack = None
            if held and rng.random() < 0.35:
                kind = "ack_and_dequeue"
                task_id, token = rng.choice(held[-3:] if rng.random() < 0.8 else held)
                ack = _lease(task_id, token + (1000 if rng.random() < 0.1 else 0))
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
        lean, full = twins.step(make)
        paths[kind + ":" + twins.path] += 1
        assert lean == full, (step, kind)
        if kind not in ("enqueue", "ack", "nack"):
            held.extend(_leases(lean))
        twins.assert_same_keys((step, kind))
        if rng.random() < 0.15:
            time.sleep(rng.choice([0.002, 0.01, 0.025]))  # short leases and delays lapse
    for kind in ("dequeue", "dequeue_many", "ack_and_dequeue"):
        assert paths[kind + ":lean"] >= 5, paths  # the lean path answered
        assert paths[kind + ":main"] >= 5, paths  # and fell through


def _lease(task_id: bytes, token: int) -> Lease:
    return Lease(task_id=task_id, payload=b"", attempt=1, token=token, deadline_ms=0)
