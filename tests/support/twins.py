"""Two queues of one namespace stepped together: how the lean-path tests compare a script's lean
path with its full path (main()).

The queues are named "lean" and "full" (equal lengths: equal keys have equal encodings). A step
sends one call to each in one MULTI between two TIMEs. When both TIMEs read the same millisecond,
both scripts read that millisecond too, so deadlines and due times agree exactly; otherwise the
step is undone (every key DUMPed before, RESTOREd with its absolute deadline) and sent again.
Fencing tokens come from the server's clock in microseconds (max(last + 1, now_us)): on servers
whose clock stands still for a whole MULTI (7.2+, Valkey) both calls read the same microsecond;
on the others (6.2, 7.0) both queues start with a fence far ahead of the clock (FENCE_AHEAD,
support/helpers.py), so their tokens are the stored fence + 1 on both sides.
Both queues live in one namespace (one hash tag, one slot), so the transaction is legal on a
cluster too. Used by tests/test_queue_lean_write.py and tests/test_queue_lean_take.py."""

from __future__ import annotations

from typing import Any

import redis
import redis.cluster

from luasched import Scheduler
from luasched.queue import Lease, QueueKeys
from luasched.render import render_all
from luasched.scripts import Call
from support.helpers import FENCE_AHEAD, clock_moves_in_multi, namespace_keys

Client = Any  # redis.Redis or RedisCluster
QUEUES = (b"lean", b"full")
#: A key this close to its deadline on either side is left out of a comparison (it may lapse
#: between the reads of one side and the other on servers whose clock moves inside MULTI).
LAPSE_MARGIN_MS = 300
#: How far the PTTLs of two twin keys may differ (the request TTLs a test draws differ by 30 s
#: and more, so a script that writes the wrong TTL still fails the comparison).
TTL_SLACK_MS = 50


def server_ms(reply: Any) -> int:
    """The server's ms from a TIME reply."""
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


def as_text(reply: Any) -> Any:
    """A reply as compared: an error reply as its text."""
    return f"error: {reply}" if isinstance(reply, BaseException) else reply


def raw_call(script: str, keys: tuple[bytes, ...], args: list[Any]) -> Call[Any]:
    """A call with the reply left as it is."""
    return Call(script, keys, tuple(args), lambda reply: reply)


def full_form(call: Call[Any], position: int) -> Call[Any]:
    """``call`` with its ARGV ``position`` as text with a leading zero ("0" + the number): a
    non-canonical decimal the lean paths leave to main(), so the twin runs the full path."""
    args = list(call.args)
    args[position] = "0" + str(args[position])
    return Call(call.script, call.keys, tuple(args), call.parse)


def leases_in(reply: Any) -> list[tuple[bytes, int]]:
    """(task_id, token) of each lease in a raw dequeue reply (none in an error or an int)."""
    if not isinstance(reply, list):
        return []
    return [(bytes(reply[i]), int(reply[i + 3])) for i in range(1, len(reply), 5)]


def held_lease(task_id: bytes, token: int) -> Lease:
    """A lease built from what a reply gave (no queue: the script decides if it is held)."""
    return Lease(task_id=task_id, payload=b"", attempt=1, token=token, deadline_ms=0)


def _calls(info: dict[str, Any], command: str) -> int:
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


class QueueTwins:
    """The lean and the full queue of one namespace; ``step`` runs a call on both at one server
    millisecond, ``assert_same_keys`` compares every key of the two."""

    def __init__(self, r: Client, s: Scheduler) -> None:
        if isinstance(r, redis.cluster.RedisCluster):  # MULTI needs the slot's primary itself
            self.conn = r.get_redis_connection(r.get_node_from_key(s.namespace.prefix))
        else:
            self.conn = r
        self.namespace = s.namespace
        self.keys = {queue: QueueKeys.of(s.namespace, queue) for queue in QUEUES}
        self._texts = {name: script.text for name, script in render_all().items()}
        self._sha: dict[str, str] = {}
        self.retries = 0
        #: INFO commandstats just before and just after the lean call of the last step (a
        #: script's redis.calls are counted too: which of its paths ran).
        self.stats: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        #: Whether the server's clock stands still for a whole MULTI, else the fences start at
        #: FENCE_AHEAD.
        self.clock_frozen = not clock_moves_in_multi(self.conn)
        if not self.clock_frozen:
            for keys in self.keys.values():
                self.conn.hset(keys.fixed[4], b"fence", FENCE_AHEAD)

    def calls_of(self, command: str) -> int:
        """How many times the lean call of the last step ran ``command``."""
        before, after = self.stats
        return _calls(after, command) - _calls(before, command)

    def _save(self) -> dict[bytes, tuple[bytes, int]]:
        """Every key: its DUMP and absolute deadline (0: none), read in one MULTI; a key of the
        full queue takes the deadline of its lean twin (they were set in the same ms)."""
        keys = namespace_keys(self.conn, self.namespace)
        pipe = self.conn.pipeline(transaction=True)
        pipe.time()
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        replies = pipe.execute()
        now_ms = server_ms(replies[0])
        saved = {
            # PTTL 0 is a key in its last ms: keep it 1 ms (RESTORE's 0 would mean no TTL).
            key: (dumped, now_ms + max(int(ttl), 1) if int(ttl) >= 0 else 0)
            for key, dumped, ttl in zip(keys, replies[1::2], replies[2::2], strict=True)
            if dumped is not None
        }
        for key in saved:
            twin = key[: -len(b"full")] + b"lean"
            if key.endswith(b":full") and twin in saved:
                saved[key] = (saved[key][0], saved[twin][1])
        return saved

    def _restore(self, saved: dict[bytes, tuple[bytes, int]]) -> None:
        pipe = self.conn.pipeline(transaction=True)
        keys = namespace_keys(self.conn, self.namespace)
        if keys:
            pipe.delete(*keys)
        for key, (dumped, deadline_ms) in saved.items():
            pipe.restore(key, deadline_ms, dumped, absttl=deadline_ms > 0)
        pipe.execute()

    def _send(self, pipe: Any, call: Call[Any]) -> None:
        if call.script not in self._sha:
            self._sha[call.script] = self.conn.script_load(self._texts[call.script])
        pipe.evalsha(self._sha[call.script], len(call.keys), *call.keys, *call.args)

    def step(self, lean: Call[Any], full: Call[Any], tries: int = 1000) -> tuple[Any, Any]:
        """Runs ``lean`` and ``full`` at one server millisecond; both replies (``as_text``).
        A try that straddles a millisecond is undone and sent again: the grouped full path with
        two INFOs in one MULTI can take most of a millisecond on a loaded machine (seen: 100
        tries all straddling, on the 7.0 cluster), so up to ``tries`` of them."""
        for _ in range(tries):
            saved = self._save()
            pipe = self.conn.pipeline(transaction=True)
            pipe.time()
            pipe.info("commandstats")
            self._send(pipe, lean)
            pipe.info("commandstats")
            self._send(pipe, full)
            pipe.time()
            before, stats_0, lean_reply, stats_1, full_reply, after = pipe.execute(
                raise_on_error=False
            )
            if server_ms(before) == server_ms(after):
                self.stats = (stats_0, stats_1)
                return as_text(lean_reply), as_text(full_reply)
            self.retries += 1
            self._restore(saved)
        raise AssertionError(f"no two calls in one millisecond in {tries} tries")

    def contents(self) -> dict[bytes, dict[bytes, tuple[str, Any, int]]]:
        """Per queue, every key of it by its name without the queue: (type, value, PTTL), values
        and PTTLs read in one MULTI (a key that lapsed since the scan is left out)."""
        keys = namespace_keys(self.conn, self.namespace)
        types = self.conn.pipeline(transaction=False)
        for key in keys:
            types.type(key)
        kinds = [kind.decode() if isinstance(kind, bytes) else kind for kind in types.execute()]
        reads = {"string": "GET", "hash": "HGETALL", "list": "LRANGE", "zset": "ZRANGE"}
        pipe = self.conn.pipeline(transaction=True)
        for key, kind in zip(keys, kinds, strict=True):
            extra = {"list": [0, -1], "zset": [0, -1, "WITHSCORES"]}.get(kind, [])
            pipe.execute_command(reads.get(kind, "TYPE"), key, *extra)  # "none": lapsed
            pipe.pttl(key)
        replies = pipe.execute(raise_on_error=False)
        found: dict[bytes, dict[bytes, tuple[str, Any, int]]] = {queue: {} for queue in QUEUES}
        for key, kind, value, ttl in zip(keys, kinds, replies[0::2], replies[1::2], strict=True):
            queue = key.rsplit(b":", 1)[1]
            if ttl != -2 and queue in found:
                found[queue][key[: -len(queue) - 1]] = (kind, value, int(ttl))
        return found

    def assert_same_keys(self, where: object) -> None:
        """Both queues hold the same keys with the same contents, and the same TTLs within
        TTL_SLACK_MS (both were set in one ms, but on 6.2/7.0 the clock moves while one MULTI
        reads hundreds of keys). A key within LAPSE_MARGIN_MS of its deadline on either side is
        left out."""
        contents = self.contents()
        lean, full = contents[b"lean"], contents[b"full"]
        for name in set(lean) | set(full):
            if any(0 <= side[name][2] < LAPSE_MARGIN_MS for side in (lean, full) if name in side):
                lean.pop(name, None)
                full.pop(name, None)
        assert {name: (kind, value, ttl >= 0) for name, (kind, value, ttl) in lean.items()} == {
            name: (kind, value, ttl >= 0) for name, (kind, value, ttl) in full.items()
        }, where
        for name, (_kind, _value, ttl) in lean.items():
            assert abs(ttl - full[name][2]) <= TTL_SLACK_MS, (where, name, ttl, full[name][2])
