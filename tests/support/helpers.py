"""Helpers shared by the tests (no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import re
import signal
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis
import redis.cluster

from luasched.keys import SLOT_COUNT, Namespace, to_bytes
from luasched.scheduler import Scheduler

__all__ = [
    "CONTENTS_SCRIPT",
    "DIGEST_SCRIPT",
    "assert_codes_covered",
    "assert_refused",
    "contents",
    "contents_command",
    "counts_of",
    "digest_command",
    "digests",
    "lock_state",
    "namespace_keys",
    "render_key",
    "snapshot",
    "snapshot_ignoring_ttl",
    "table_owners",
    "worker_pool",
]

Client = redis.Redis | redis.cluster.RedisCluster
FORK = multiprocessing.get_context("fork")


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def worker_pool(processes: int) -> Iterator[multiprocessing.pool.Pool]:
    """A fork ``Pool`` for tests: its workers die on SIGTERM, and it is closed and joined.

    Forked workers inherit the session's SIGTERM handler (conftest turns SIGTERM into
    KeyboardInterrupt), so ``Pool.terminate`` -- which ``with Pool() as pool`` calls on exit --
    could leave a worker alive, blocked on the pool's queue lock, and the test hung forever
    (seen in CI-style runs). The workers reset SIGTERM to the default, and after the work the pool
    is closed and joined (workers leave on their own); terminate is only the error path.
    """
    pool = FORK.Pool(processes, initializer=_default_sigterm)
    try:
        yield pool
        pool.close()
        pool.join()
    finally:
        pool.terminate()
        pool.join()


PLACEHOLDER = re.compile(r"<([a-z_]+)>")


def render_key(pattern: str, namespace: Namespace, values: Mapping[str, bytes]) -> bytes:
    """The key named by a manifest ``pattern`` (``luasched:{ns}:lock:<name>``) in ``namespace``;
    each ``<placeholder>`` is ``values[placeholder]`` (b"p" when absent)."""
    head, found, tail = pattern.partition("{ns}")
    assert found, pattern
    out = head.encode() + b"{" + namespace.name + b"}"
    position = 0
    for match in PLACEHOLDER.finditer(tail):
        out += tail[position : match.start()].encode() + values.get(match[1], b"p")
        position = match.end()
    return out + tail[position:].encode()


def _namespace(namespace: Namespace | str | bytes) -> Namespace:
    return namespace if isinstance(namespace, Namespace) else Namespace(namespace)


def namespace_keys(client: Client, namespace: Namespace | str | bytes) -> list[bytes]:
    """Every key of ``namespace`` (SCAN MATCH on its prefix; tests only), sorted.

    On a cluster every key of a namespace lives in one slot, so only the primary that owns it
    is scanned.
    """
    space = _namespace(namespace)
    prefix, pattern = space.prefix, space.key_pattern
    if isinstance(client, redis.cluster.RedisCluster):
        node = client.get_node_from_key(prefix)
        found = client.scan_iter(match=pattern, count=1000, target_nodes=node)
    else:
        found = client.scan_iter(match=pattern, count=1000)
    return sorted({to_bytes(key) for key in found})


#: A script (EVAL, KEYS: the keys to read) answering, per key, {type, content}: a string's
#: value, a hash's or a zset's flat field/value or member/score list, a list's items, a set's
#: members, a stream's entries; {"none", {}} for an absent key. Compared through ``contents``,
#: which puts hashes and sets in one order. Not DUMP: a DUMP also carries the encoding, and a
#: hashtable's (the queue's tasks hash is one) iterates in an order that incremental rehashing
#: moves, even on reads: two DUMPs of one unchanged hash can differ.
CONTENTS_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  local value = {}
  if kind == 'string' then value = { redis.call('GET', key) }
  elseif kind == 'hash' then value = redis.call('HGETALL', key)
  elseif kind == 'zset' then value = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'list' then value = redis.call('LRANGE', key, 0, -1)
  elseif kind == 'set' then value = redis.call('SMEMBERS', key)
  elseif kind == 'stream' then value = redis.call('XRANGE', key, '-', '+')
  end
  out[i] = { kind, value }
end
return out
"""


def contents_command(keys: Sequence[bytes]) -> tuple[Any, ...]:
    """The command reading ``keys`` with CONTENTS_SCRIPT (one slot on a cluster)."""
    return ("EVAL", CONTENTS_SCRIPT, len(keys), *keys)


def contents(reply: Sequence[Any]) -> list[tuple[bytes, Any]]:
    """CONTENTS_SCRIPT's reply with hashes and sets in one order: per key (type, content);
    equal results mean the same values, whatever the encodings."""

    def frozen(value: Any) -> Any:
        return tuple(frozen(item) for item in value) if isinstance(value, list) else value

    found: list[tuple[bytes, Any]] = []
    for kind, value in reply:
        kind = to_bytes(kind)
        if kind == b"hash":
            found.append((kind, tuple(sorted(zip(value[0::2], value[1::2], strict=True)))))
        elif kind == b"set":
            found.append((kind, tuple(sorted(value))))
        else:
            found.append((kind, frozen(value)))
    return found


#: A script (EVAL, KEYS: the keys to read) answering one SHA1 per key of its type, its content
#: as CONTENTS_SCRIPT reads it (hash fields and set members in any order: each field/value pair
#: or member is digested on its own and the digests sorted) and whether it has a TTL, then
#: DBSIZE. Equal digests mean what equal ``contents`` + ``PTTL >= 0`` mean; only N short strings
#: come back (the fuzz and key-layout checks run it ~100,000 times).
DIGEST_SCRIPT = """
local function encode(value, out)
  if type(value) == 'table' then
    out[#out + 1] = '*' .. #value .. ':'
    for i = 1, #value do encode(value[i], out) end
  else
    value = tostring(value)
    out[#out + 1] = '$' .. #value .. ':' .. value
  end
end
local function digest(value)
  local out = {}
  encode(value, out)
  return redis.sha1hex(table.concat(out))
end
local digests = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  local value = {}
  if kind == 'string' then value = { redis.call('GET', key) }
  elseif kind == 'hash' or kind == 'set' then
    local step = kind == 'hash' and 2 or 1
    local flat = redis.call(step == 2 and 'HGETALL' or 'SMEMBERS', key)
    for j = 1, #flat, step do value[#value + 1] = digest({ flat[j], flat[j + step - 1] }) end
    table.sort(value)
  elseif kind == 'zset' then value = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'list' then value = redis.call('LRANGE', key, 0, -1)
  elseif kind == 'stream' then value = redis.call('XRANGE', key, '-', '+')
  end
  digests[i] = digest({ kind, tostring(redis.call('PTTL', key) >= 0), value })
end
digests[#KEYS + 1] = redis.call('DBSIZE')
return digests
"""


def digest_command(keys: Sequence[bytes]) -> tuple[Any, ...]:
    """The command digesting ``keys`` with DIGEST_SCRIPT (one slot on a cluster)."""
    return ("EVAL", DIGEST_SCRIPT, len(keys), *keys)


def digests(keys: Sequence[bytes], reply: Sequence[Any]) -> tuple[dict[bytes, bytes], int]:
    """DIGEST_SCRIPT's reply as ({key: its digest}, DBSIZE)."""
    return dict(zip(keys, map(to_bytes, reply[:-1]), strict=True)), int(reply[-1])


def snapshot(client: Client, namespace: Namespace | str | bytes) -> dict[bytes, bytes]:
    """Key -> the content of every key of ``namespace`` (CONTENTS_SCRIPT) and its TTL: equal
    snapshots mean the same data.

    The content is the value alone, not its encoding (see CONTENTS_SCRIPT); the TTL is appended
    (as ``b"|ttl=<ms>"``, -1 for none) so a changed expiry shows too.
    """
    keys = namespace_keys(client, namespace)
    if not keys:
        return {}
    if isinstance(client, redis.cluster.RedisCluster):  # one slot: its primary answers all
        client = client.get_redis_connection(client.get_node_from_key(keys[0]))
    pipe = client.pipeline(transaction=False)
    pipe.execute_command(*contents_command(keys))
    for key in keys:
        pipe.pttl(key)
    replies = pipe.execute()
    return {
        key: repr(content).encode() + b"|ttl=" + str(ttl).encode()
        for key, content, ttl in zip(keys, contents(replies[0]), replies[1:], strict=True)
        if content[0] != b"none"  # expired or deleted between SCAN and the read
    }


def snapshot_ignoring_ttl(client: Client, namespace: Namespace | str | bytes) -> dict[bytes, bytes]:
    """``snapshot`` with each TTL reduced to whether the key has one (``|ttl`` or ``|no-ttl``):
    the countdown moves between two snapshots, an expiry that is set or removed still shows."""
    return {
        key: dumped.rsplit(b"|ttl=", 1)[0]
        + (b"|no-ttl" if dumped.endswith(b"|ttl=-1") else b"|ttl")
        for key, dumped in snapshot(client, namespace).items()
    }


def table_owners(client: Client, scheduler: Scheduler) -> list[bytes | None]:
    """The owner id of every slot (None: no owner), read raw from the slot table.

    Its layout is part of the documented contract (luasched.keys.REGISTRY_KEYS): 16384
    big-endian 16-bit node indexes, 0 for no owner; ``nodes:id`` maps index -> node id.
    """
    namespace = scheduler.namespace
    raw = client.get(namespace.key("slots:owner")) or b"\x00" * (2 * SLOT_COUNT)
    assert len(raw) == 2 * SLOT_COUNT
    ids = {
        int(index): node_id for index, node_id in client.hgetall(namespace.key("nodes:id")).items()
    }
    owners: list[bytes | None] = []
    for slot in range(SLOT_COUNT):
        index = int.from_bytes(raw[2 * slot : 2 * slot + 2], "big")
        owners.append(ids[index] if index else None)
    return owners


def counts_of(owners: list[bytes | None]) -> dict[bytes, int]:
    """How many slots each node owns in ``owners`` (as from ``table_owners``)."""
    counts: dict[bytes, int] = {}
    for owner in owners:
        if owner is not None:
            counts[owner] = counts.get(owner, 0) + 1
    return counts


def assert_refused(
    client: Client,
    scheduler: Any,
    script: str,
    keys: Sequence[bytes],
    args: Sequence[Any],
    code: str,
    detail: str,
    *,
    exact: bool = True,
) -> None:
    """``script`` refuses the call and changes nothing.

    Checked twice: a raw EVAL of the script's text answers ``LUASCHED_<code> <script>: <detail>``
    (``detail`` equal to the reply's, or with ``exact=False`` contained in it), and the wrapper's
    runner raises the exception class of ``code`` with the same detail. Every key of the
    scheduler's namespace is byte-for-byte the same afterwards (DUMP and TTL).
    """
    from luasched.errors import ERROR_CLASSES, LuaschedError
    from luasched.scripts import Call

    before = snapshot(client, scheduler.namespace)
    assert before, "seed the namespace: the check must compare something"
    with pytest.raises(redis.ResponseError) as raw:
        client.eval(scheduler.scripts[script].text, len(keys), *keys, *args)
    prefix = f"LUASCHED_{code} {script}: "
    message = str(raw.value)
    assert message.startswith(prefix), message
    got = message[len(prefix) :]
    assert got == detail if exact else detail in got, got
    with pytest.raises(LuaschedError) as typed:
        scheduler.runner.run(Call(script, tuple(keys), tuple(args), lambda reply: reply))
    assert type(typed.value) is ERROR_CLASSES[code]
    assert (typed.value.code, typed.value.script, typed.value.detail) == (code, script, got)
    assert snapshot(client, scheduler.namespace) == before


def assert_codes_covered(
    cases: Iterable[Sequence[Any]], scripts: set[str], elsewhere: Iterable[tuple[str, str]] = ()
) -> None:
    """Error cases ``(script, _, _, _, code, ...)`` cover every script of ``scripts`` and every
    code each declares; ``elsewhere`` lists (script, code) pairs tested by other tests."""
    from luasched.render import render_all

    cases = list(cases)
    assert {case[0] for case in cases} == scripts
    for name in scripts:
        declared = {code for code, _ in render_all()[name].spec.errors}
        tested = {case[4] for case in cases if case[0] == name}
        tested |= {code for script, code in elsewhere if script == name}
        assert tested == declared, name


def lock_state(client: Client, key: bytes) -> dict[str, Any] | None:
    """The state string of a lock key (lua/include/lock_state.lua.j2), parsed independently of
    the scripts: fence, count, deadline, granted, waited, owner; None if the key is absent."""
    raw = client.get(key)
    if raw is None:
        return None
    fence, count, deadline, granted, waited, owner = raw.split(b" ", 5)
    return {
        "fence": int(fence),
        "count": int(count),
        "deadline": int(deadline),
        "granted": int(granted),
        "waited": waited == b"1",
        "owner": owner,
    }


#: In an error case's arguments, right after a task id: the fencing token of that task's current
#: lease, read by ``with_held_tokens`` when the case runs (tokens come from the server's clock,
#: so no case can spell one in advance).
HELD_TOKEN = "<held token>"


def with_held_tokens(client: Client, tasks_key: bytes, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with each HELD_TOKEN replaced by the token in the meta of the task id before it
    (the meta "S P M A T W worker", lua/include/queue_limits.j2: T is the 5th field)."""
    out = list(args)
    for position, arg in enumerate(out):
        if arg == HELD_TOKEN:
            meta = client.hget(tasks_key, b"m" + out[position - 1])
            assert meta is not None, out[position - 1]
            out[position] = int(meta.split(b" ")[4])
    return tuple(out)


#: A fence far ahead of the server's clock in us (about 1.8e15 in 2027) and far below 2^53 - 1.
#: Tests that compare two calls made microseconds apart start their queues' fence here on
#: servers whose clock moves inside MULTI (``clock_moves_in_multi``), so that both calls' tokens
#: are the stored fence + 1 (lua/include/fence.j2), not two readings of the clock.
FENCE_AHEAD = 1 << 52


def clock_moves_in_multi(conn: redis.Redis) -> bool:
    """Whether the server's clock moves inside one MULTI (6.2, 7.0: TIME, 200 commands, TIME
    differ), or stands still for all of it (7.2+, Valkey)."""
    pipe = conn.pipeline(transaction=True)
    pipe.time()
    for _ in range(200):
        pipe.echo(b"x")
    pipe.time()
    replies = pipe.execute()
    return bool(replies[0] != replies[-1])
