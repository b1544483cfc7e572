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

#: KEYS: pairs of twin keys (lean, full); ARGV: LAPSE_MARGIN_MS, TTL_SLACK_MS. Answers the lean
#: key of every pair that differs: one side missing, another type or value (hash fields and set
#: members in any order, lists and zsets in order, scores as their text), a TTL on one side
#: only, or TTLs further apart than the slack. A pair with a side within the margin of its
#: deadline is left out. Run as one script: every key is read at one instant.
COMPARE_SCRIPT = """
local margin, slack = tonumber(ARGV[1]), tonumber(ARGV[2])
local function read(key)
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then return nil end
  local value
  if kind == 'string' then value = { redis.call('GET', key) }
  elseif kind == 'hash' then value = redis.call('HGETALL', key)
  elseif kind == 'zset' then value = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'list' then value = redis.call('LRANGE', key, 0, -1)
  elseif kind == 'set' then value = redis.call('SMEMBERS', key)
  else value = { redis.call('DUMP', key) } end
  return { kind = kind, value = value, ttl = redis.call('PTTL', key) }
end
local function same_map(a, b, step)
  if #a ~= #b then return false end
  local seen = {}
  for i = 1, #a, step do seen[a[i]] = a[i + step - 1] or true end
  for i = 1, #b, step do
    if seen[b[i]] ~= (b[i + step - 1] or true) then return false end
  end
  return true
end
local function same_list(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end
local different = {}
for i = 1, #KEYS, 2 do
  local lean, full = read(KEYS[i]), read(KEYS[i + 1])
  local lapsing = (lean and lean.ttl >= 0 and lean.ttl < margin)
    or (full and full.ttl >= 0 and full.ttl < margin)
  local same = true
  if lapsing then
    same = true
  elseif not lean or not full then
    same = not lean and not full
  elseif lean.kind ~= full.kind or (lean.ttl >= 0) ~= (full.ttl >= 0)
    or math.abs(lean.ttl - full.ttl) > slack then
    same = false
  elseif lean.kind == 'hash' then
    same = same_map(lean.value, full.value, 2)
  elseif lean.kind == 'set' then
    same = same_map(lean.value, full.value, 1)
  else
    same = same_list(lean.value, full.value)
  end
  if not same then different[#different + 1] = KEYS[i] end
end
return different
"""


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
        self._compare: Any = None
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

    def _saved(self, key: bytes) -> bytes:
        """Where ``step`` copies ``key`` before a try: outside the namespace's key pattern, in its
        slot (the same hash tag comes first)."""
        return b"twins-saved:{" + self.namespace.name + b"}:" + key

    def _restore(self, keys: list[bytes]) -> None:
        """Every key of the namespace back to its copy made by the last try (``keys``: what was
        copied; a key that had lapsed since is not there, and stays absent). COPY keeps the
        absolute deadline, so every TTL is what it was."""
        pipe = self.conn.pipeline(transaction=True)
        now = namespace_keys(self.conn, self.namespace)
        if now:
            pipe.delete(*now)
        for key in keys:
            pipe.copy(self._saved(key), key)
        pipe.execute()

    def _send(self, pipe: Any, call: Call[Any]) -> None:
        if call.script not in self._sha:
            self._sha[call.script] = self.conn.script_load(self._texts[call.script])
        pipe.evalsha(self._sha[call.script], len(call.keys), *call.keys, *call.args)

    def step(self, lean: Call[Any], full: Call[Any], tries: int = 1000) -> tuple[Any, Any]:
        """Runs ``lean`` and ``full`` at one server millisecond; both replies (``as_text``).
        A try that straddles a millisecond is undone and sent again: the grouped full path with
        two INFOs in one MULTI can take most of a millisecond on a loaded machine (seen: 100
        tries all straddling, on the 7.0 cluster), so up to ``tries`` of them. The undo copies
        each key in the same MULTI, before the calls (COPY: nothing read back to the client)."""
        copied: list[bytes] = []
        for _ in range(tries):
            pipe = self.conn.pipeline(transaction=True)
            if copied:
                pipe.delete(*map(self._saved, copied))
            copied = namespace_keys(self.conn, self.namespace)
            for key in copied:
                pipe.copy(key, self._saved(key), replace=True)
            pipe.time()
            pipe.info("commandstats")
            self._send(pipe, lean)
            pipe.info("commandstats")
            self._send(pipe, full)
            pipe.time()
            replies = pipe.execute(raise_on_error=False)
            before, stats_0, lean_reply, stats_1, full_reply, after = replies[-6:]
            if server_ms(before) == server_ms(after):
                self.stats = (stats_0, stats_1)
                if copied:
                    self.conn.delete(*map(self._saved, copied))
                return as_text(lean_reply), as_text(full_reply)
            self.retries += 1
            self._restore(copied)
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

    def different_keys(self) -> list[bytes]:
        """The names (without the queue) of the keys whose lean and full twins differ, compared
        by COMPARE_SCRIPT on the server at one instant: the rules of ``assert_same_keys``,
        with nothing but the differing names sent back."""
        names = sorted(
            {
                key[: -len(queue) - 1]
                for key in namespace_keys(self.conn, self.namespace)
                if (queue := key.rsplit(b":", 1)[1]) in QUEUES
            }
        )
        pairs = [name + b":" + queue for name in names for queue in QUEUES]
        if self._compare is None:
            self._compare = self.conn.register_script(COMPARE_SCRIPT)
        found = self._compare(keys=pairs, args=[LAPSE_MARGIN_MS, TTL_SLACK_MS])
        return [bytes(key)[: -len(b":lean")] for key in found]

    def assert_same_keys(self, where: object) -> None:
        """Both queues hold the same keys with the same contents, and the same TTLs within
        TTL_SLACK_MS (both were set in one ms, but on 6.2/7.0 the clock moves inside one MULTI).
        A key within LAPSE_MARGIN_MS of its deadline on either side is left out. Compared on the
        server (``different_keys``); a difference is shown with both sides' contents."""
        different = self.different_keys()
        if different:
            self._assert_same_contents(where)  # raises, showing the values
            raise AssertionError((where, "keys differ", different))

    def _assert_same_contents(self, where: object) -> None:
        """``assert_same_keys`` with every value read back and compared here."""
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
