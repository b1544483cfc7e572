"""Fuzzing every script, driven by the manifest (issue 9, item 3).

Nothing here names a script: every case is built from ``luasched.render.manifest()`` (KEYS with
their patterns, ARGV with their types, ranges and repeat counts, the error codes), so a new
script is fuzzed without new code. Only calls that are invalid by the manifest's declared
contract are generated (a valid call may legitimately change state):

- a wrong number of KEYS (fewer, or more taken from the namespace's key patterns, so on the
  cluster every key stays in the namespace's slot), with valid ARGV;
- a wrong number of ARGV (fewer, or more: past a ``repeat``'s maximum too);
- one or several ARGV entries that break their declared type or range: empty, huge, non-numeric,
  ``nan``/``inf``/hex/exponent/sign/space forms, out of range (2^53, 2^63, 10^30...), non-UTF-8
  and NUL bytes, strings one byte too short or too long, enum near-misses.

Every such call must answer ``LUASCHED_<CODE> <script>: ...`` with a CODE the manifest lists for
the script, and leave every key of the namespace unchanged (every value and whether a TTL
exists, digested on the server by support.helpers.DIGEST_SCRIPT; the PTTL countdown is ignored)
with no new key anywhere on the node.

Two tests per script and server: a deterministic catalog (every argument x every bad value of its
type, every wrong count, including a payload one byte over its 16 MiB maximum), then Hypothesis
(``LUASCHED_FUZZ_EXAMPLES`` examples per script and server, default 64; each example sends 1-4
invalid calls in one pipeline together with the digest/DBSIZE check). The examples are
reproducible, and each server draws its own (Hypothesis seeded by the server's place in the
matrix): the scripts' argument checks are the same Lua on every server, so six servers running
six different sets of 64 cover 384 distinct inputs per script, where six copies of one set of
200 covered 200.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis
import redis.cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from redis.exceptions import NoScriptError, ResponseError

from luasched.keys import Namespace
from luasched.render import manifest, render_all
from luasched.scheduler import Scheduler
from support.helpers import digest_command, digests, namespace_keys, render_key
from support.servers import SERVER_NAMES, ServerHandle

MANIFEST: dict[str, Any] = manifest()
SCRIPTS: dict[str, dict[str, Any]] = MANIFEST["scripts"]
EXAMPLES = int(os.environ.get("LUASCHED_FUZZ_EXAMPLES", "64"))
NAMESPACE = Namespace("fuzz")
#: Values of the ``<placeholder>`` parts of key patterns (and of ARGV entries of the same name,
#: so keys and arguments agree). ``request_id`` is drawn from REQUEST_IDS per call.
PLACEHOLDERS: dict[str, bytes] = {"name": b"mutex", "queue": b"jobs"}
SEEDED_REQUEST_ID = b"fuzz-rid-1"
REQUEST_IDS = (b"", SEEDED_REQUEST_ID)
#: Hypothesis builds over-long strings only up to this length; longer maxima (the 16 MiB payload)
#: are covered once per server by the catalog.
HUGE_STRING_LIMIT = 1 << 20
ERROR_REPLY = re.compile(r"LUASCHED_([A-Z][A-Z0-9_]*) (\S+): ")

Conn = redis.Redis
#: An argument past the declared ones: any bytes.
EXTRA: dict[str, Any] = {"name": "extra", "type": "string", "min_length": 0, "max_length": 16}


# --------------------------------------------------------------------------------------------
# The manifest's contract, as predicates and values


def key_values(request_id: bytes) -> dict[str, bytes]:
    return {**PLACEHOLDERS, "request_id": request_id}


def script_keys(entry: Mapping[str, Any], request_id: bytes) -> list[bytes]:
    return [render_key(key["pattern"], NAMESPACE, key_values(request_id)) for key in entry["keys"]]


#: Every key a manifest pattern names in the namespace: extra KEYS come from here.
KEY_POOL: list[bytes] = sorted(
    {
        render_key(key["pattern"], NAMESPACE, key_values(request_id))
        for entry in SCRIPTS.values()
        for key in entry["keys"]
        for request_id in REQUEST_IDS
    }
)

_INT = re.compile(rb"-?[0-9]+")
_NUMBER = re.compile(rb"-?(?:[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?|\.[0-9]+)")


def accepts(arg: Mapping[str, Any], raw: bytes) -> bool:
    """Whether the manifest's contract for ``arg`` accepts ``raw`` (conservatively: True when
    in doubt, so that only clearly invalid values are ever sent)."""
    kind = arg["type"]
    if kind == "int":
        if _INT.fullmatch(raw) is None:
            return False
        if len(raw.lstrip(b"-").lstrip(b"0")) > 20:  # every bound is below 2^53
            return False
        return bool(arg["min"] <= int(raw) <= arg["max"])
    if kind == "number":
        if _NUMBER.fullmatch(raw) is None:
            return False
        value = float(raw)
        return math.isfinite(value) and arg["min"] <= value <= arg["max"]
    if kind == "string":
        return bool(arg["min_length"] <= len(raw) <= arg["max_length"])
    if kind == "enum":
        return raw in {choice.encode() for choice in arg["choices"]}
    raise AssertionError(f"unknown argument type {kind!r}")


def canonical(arg: Mapping[str, Any], request_id: bytes) -> bytes:
    """One valid value of ``arg`` (the placeholder's value for key-naming arguments)."""
    kind = arg["type"]
    if arg["name"] == "request_id":
        return request_id
    if arg["name"] in PLACEHOLDERS:
        return PLACEHOLDERS[arg["name"]]
    if kind in ("int", "number"):
        low = math.ceil(arg["min"])
        return str(max(low, min(1, math.floor(arg["max"])))).encode()
    if kind == "string":
        return b"v" * max(arg["min_length"], min(1, arg["max_length"]))
    return arg["choices"][0].encode()


def _numbers(*values: int) -> list[bytes]:
    return [str(value).encode() for value in values]


#: Values no integer or number argument accepts (filtered per argument with ``accepts``).
NUMERIC_BAD: list[bytes] = [
    b"", b" ", b"nan", b"NaN", b"-nan", b"inf", b"-inf", b"+inf", b"Infinity", b"1e999",
    b"0x10", b"0X1F", b"-0x1", b"0b1", b" 5", b"5 ", b"\t5", b"5\n", b"1e3", b"1E3", b"+1",
    b"1.0", b"1.5", b".5", b"1.", b"-", b"--1", b"1-", b"1_000", b"1,000", b"1/2", b"abc",
    b"true", b"\x00", b"5\x00", b"\x005", b"\xff\xfe\xfd", b"\xc3\x28", "\uff15".encode(),
    b"9" * 18, b"1" * 5000,
    *_numbers(2**53, 2**53 + 1, 2**63, 2**64, 10**30, -(2**53) - 1, -(2**63), -(10**30)),
]  # fmt: skip


def near_misses(choices: Sequence[str]) -> list[bytes]:
    out: list[bytes] = [b"", b" ", b"\x00", b"true", b"yes", b"\xff"]
    for choice in choices:
        raw = choice.encode()
        out += [raw + b" ", b" " + raw, raw.upper(), raw[:-1], raw + raw, raw + b"\x00",
                b"0" + raw, raw + b".0", raw + b"\n", raw.swapcase()]  # fmt: skip
    return out


def bad_values(arg: Mapping[str, Any], *, huge: bool) -> list[bytes]:
    """The catalog of values that break ``arg``'s contract (``huge``: strings of any size)."""
    kind = arg["type"]
    if kind in ("int", "number"):
        low, high = math.ceil(arg["min"]), math.floor(arg["max"])
        candidates = NUMERIC_BAD + _numbers(low - 1, high + 1, low - 10**6, high * 2 + 1)
    elif kind == "string":
        low, high = arg["min_length"], arg["max_length"]
        candidates = [b"", b"x" * max(0, low - 1)]
        if huge or high + 1 <= HUGE_STRING_LIMIT:
            candidates += [b"x" * (high + 1), b"\x00\xff" * (high // 2 + 1), b"y" * (high + 100)]
    else:
        candidates = near_misses(arg["choices"])
    seen: list[bytes] = []
    for raw in candidates:
        if raw not in seen and not accepts(arg, raw):
            seen.append(raw)
    return seen


def arg_slots(entry: Mapping[str, Any]) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    """(the fixed ARGV entries, (least, most) ARGV count)."""
    argv = entry["argv"]
    if argv and "repeat" in argv[-1]:
        fixed = len(argv) - 1
        return argv, (fixed + argv[-1]["repeat"]["min"], fixed + argv[-1]["repeat"]["max"])
    return argv, (len(argv), len(argv))


def spec_at(entry: Mapping[str, Any], position: int) -> dict[str, Any]:
    """The ARGV entry that governs position ``position`` (repeats extend the last one; past
    the declared ones: any bytes, as an extra argument)."""
    argv = entry["argv"]
    if position < len(argv):
        return argv[position]  # type: ignore[no-any-return]
    if argv and "repeat" in argv[-1]:
        return argv[-1]  # type: ignore[no-any-return]
    return EXTRA


def canonical_args(entry: Mapping[str, Any], request_id: bytes) -> list[bytes]:
    argv, (least, _) = arg_slots(entry)
    args = [canonical(arg, request_id) for arg in argv]
    if argv and "repeat" in argv[-1]:
        args = args[:-1] + [canonical(argv[-1], request_id)] * argv[-1]["repeat"]["min"]
    assert len(args) == least
    return args


# --------------------------------------------------------------------------------------------
# The catalog: every wrong count and every bad value of every argument, deterministically


Call = tuple[str, list[bytes], list[bytes]]  # (what was broken, KEYS, ARGV)


def catalog(entry: Mapping[str, Any]) -> Iterator[Call]:
    for request_id in REQUEST_IDS:
        keys = script_keys(entry, request_id)
        args = canonical_args(entry, request_id)
        _, (least, most) = arg_slots(entry)
        for count in range(len(keys) + 4):
            if count != len(keys):
                extra = [KEY_POOL[(i * 7) % len(KEY_POOL)] for i in range(count - len(keys))]
                yield f"{count} keys", (keys + extra)[:count], args
        for count in [*range(least), most + 1, most + 2]:
            extended = args + [
                canonical(spec_at(entry, i), request_id) for i in range(least, count)
            ]
            yield f"{count} args", keys, extended[:count]
        # An optional last argument (repeat min 0: queue.node_dequeue's wait_ms) is broken too.
        optional = len(entry["argv"]) > least
        filled = args + [canonical(spec_at(entry, least), request_id)] * optional
        for position in range(len(filled)):
            for bad in bad_values(spec_at(entry, position), huge=request_id == b""):
                broken = list(filled)
                broken[position] = bad
                yield f"ARGV[{position + 1}]={bad[:20]!r}", keys, broken


# --------------------------------------------------------------------------------------------
# Hypothesis strategies


def valid_value(arg: Mapping[str, Any], request_id: bytes) -> st.SearchStrategy[bytes]:
    if arg["name"] == "request_id" or arg["name"] in PLACEHOLDERS:
        return st.just(canonical(arg, request_id))
    kind = arg["type"]
    if kind == "int":
        low, high = int(arg["min"]), int(arg["max"])
        return st.one_of(st.sampled_from([low, high]), st.integers(low, high)).map(
            lambda value: str(value).encode()
        )
    if kind == "number":
        return st.floats(arg["min"], arg["max"], allow_nan=False).map(lambda v: repr(v).encode())
    if kind == "string":
        low = arg["min_length"]
        return st.binary(min_size=low, max_size=max(low, min(arg["max_length"], 32)))
    return st.sampled_from([choice.encode() for choice in arg["choices"]])


def _sized(length: int, pattern: bytes) -> bytes:
    return (pattern * (length // len(pattern) + 1))[:length]


def invalid_value(arg: Mapping[str, Any]) -> st.SearchStrategy[bytes] | None:
    """Values that break ``arg``'s contract, or None if none is cheap enough to generate."""
    kind = arg["type"]
    fixed = bad_values(arg, huge=False)
    options: list[st.SearchStrategy[bytes]] = [st.sampled_from(fixed)] if fixed else []
    if kind in ("int", "number"):
        low, high = math.ceil(arg["min"]), math.floor(arg["max"])
        options += [
            st.integers(max_value=low - 1).map(lambda value: str(value).encode()),
            st.integers(min_value=high + 1).map(lambda value: str(value).encode()),
            st.floats().map(lambda value: repr(value).encode()),
            st.binary(max_size=24),
            st.text(max_size=12).map(lambda text: text.encode("utf-8", "surrogatepass")),
        ]
    elif kind == "string":
        low, high = arg["min_length"], arg["max_length"]
        if low > 0:
            options.append(st.binary(max_size=low - 1))
        if high + 1 <= HUGE_STRING_LIMIT:
            options.append(
                st.builds(
                    _sized, st.integers(high + 1, high + 64), st.binary(min_size=1, max_size=8)
                )
            )
    else:
        options.append(st.binary(max_size=8))
    if not options:
        return None
    return st.one_of(options).filter(lambda raw: not accepts(arg, raw))


_STRATEGIES: dict[tuple[str, int, bytes, bool], st.SearchStrategy[bytes] | None] = {}


def strategy_at(
    script: str, position: int, request_id: bytes, *, invalid: bool
) -> st.SearchStrategy[bytes] | None:
    """The (cached) strategy of valid or invalid values for ARGV position ``position``."""
    entry = SCRIPTS[script]
    index = min(position, len(entry["argv"]))  # every position past the declared ones alike
    cache_key = (script, index, request_id, invalid)
    if cache_key not in _STRATEGIES:
        arg = spec_at(entry, position)
        _STRATEGIES[cache_key] = invalid_value(arg) if invalid else valid_value(arg, request_id)
    return _STRATEGIES[cache_key]


def _valid(script: str, position: int, request_id: bytes) -> st.SearchStrategy[bytes]:
    strategy = strategy_at(script, position, request_id, invalid=False)
    assert strategy is not None
    return strategy


@st.composite
def invalid_call(draw: st.DrawFn, script: str) -> Call:
    entry = SCRIPTS[script]
    request_id = draw(st.sampled_from(REQUEST_IDS))
    keys = script_keys(entry, request_id)
    argv, (least, most) = arg_slots(entry)
    count = len(argv)
    if argv and "repeat" in argv[-1]:
        repeat = argv[-1]["repeat"]
        count = (
            len(argv) - 1 + draw(st.integers(repeat["min"], min(repeat["max"], repeat["min"] + 4)))
        )
    args = [draw(_valid(script, position, request_id)) for position in range(count)]
    breakable = [
        position
        for position in range(len(args))
        if strategy_at(script, position, request_id, invalid=True) is not None
    ]
    kind = draw(st.sampled_from(["keys", "args"] + (["one arg", "several"] if breakable else [])))
    what = [kind]
    if kind == "keys" or (kind == "several" and draw(st.booleans())):
        count = draw(st.sampled_from([c for c in range(len(keys) + 4) if c != len(keys)]))
        if count < len(keys):
            keep = draw(st.sets(st.integers(0, len(keys) - 1), min_size=count, max_size=count))
            keys = [keys[i] for i in sorted(keep)]
        else:
            extra = st.lists(st.sampled_from(KEY_POOL), min_size=count - len(keys),
                             max_size=count - len(keys))  # fmt: skip
            keys = keys + draw(extra)
        what.append(f"{count} keys")
    if kind == "args":
        count = draw(st.sampled_from([*range(least), most + 1, most + 2, most + 5]))
        if count > len(args):  # a few drawn, the rest (up to a repeat's maximum) canonical
            drawn = [draw(_valid(script, p, request_id)) for p in range(len(args), len(args) + 3)]
            args = args + drawn
            args += [canonical(spec_at(entry, p), request_id) for p in range(len(args), count)]
        args = args[:count]
        what.append(f"{count} args")
    if kind in ("one arg", "several"):
        most_broken = len(breakable) if kind == "several" else 1
        positions = draw(
            st.lists(st.sampled_from(breakable), min_size=1, max_size=most_broken, unique=True)
        )
        for position in positions:
            strategy = strategy_at(script, position, request_id, invalid=True)
            assert strategy is not None
            args[position] = draw(strategy)
        what.append(f"ARGV{[p + 1 for p in positions]}")
    return " ".join(what), keys, args


# --------------------------------------------------------------------------------------------
# The namespace under test: seeded through the real API, checked with digests and DBSIZE


def seed(client: redis.Redis | redis.cluster.RedisCluster) -> None:
    """Some state in every part of the namespace: nodes, slots, picks, a queue (plain, with
    groups, and dispatched), a lock."""
    hour = 3_600_000
    scheduler = Scheduler(client, NAMESPACE.name, rng=random.Random(7))
    nodes = scheduler.nodes
    nodes.register("node-a", weight=3, capacity=10, meta=b"m\x00\xffeta", ttl_ms=hour)
    nodes.register("node-b", weight=1, ttl_ms=hour)
    nodes.register("node-c", weight=2, capacity=5)
    nodes.register("node-d")
    nodes.remove("node-d")  # a free index
    nodes.drain("node-c")
    scheduler.slots.rebalance()
    pick = scheduler.pick
    pick.least_loaded(cost=2)
    pick.two_choices()
    pick.round_robin()
    pick.weighted()
    pick.smooth_weighted()
    pick.least_recent()
    queue = scheduler.queue(PLACEHOLDERS["queue"], request_ttl_ms=hour)
    queue.enqueue("t-dead", b"x", priority=511, max_attempts=1, request_id="")
    lease = queue.dequeue("worker-1", hour, request_id="")
    assert lease is not None
    queue.nack(lease, reason=b"boom", request_id="")  # -> dead letters
    queue.enqueue("t-1", b"payload \x00\xff", priority=5, request_id=SEEDED_REQUEST_ID)
    queue.enqueue("t-2", b"", priority=-3, request_id="")
    queue.enqueue("t-3", b"later", delay_ms=hour, request_id="")
    assert queue.dequeue("worker-2", hour, request_id="") is not None
    # Groups (the queue.group_* scripts): ready tasks in two groups, one leased, settings.
    queue.enqueue("g-1", b"x", group="tenant-a", request_id="")
    queue.enqueue("g-2", b"y", group=b"tenant-\x00\xff", priority=3, request_id="")
    queue.set_group("tenant-a", weight=3, max_active=2)
    queue.set_limits(max_active=100)
    queue.set_rate(100, burst=5, group="tenant-a")
    assert queue.dequeue("worker-2", hour, request_id="") is not None
    # Dispatched tasks: a dead letter, a leased one, a ready one and a delayed one.
    doomed = queue.dispatch("d-dead", b"x", strategy="round_robin", priority=511, max_attempts=1,
                            request_id="")  # fmt: skip
    lease = queue.for_node(doomed.node).dequeue("worker-3", hour, request_id="")
    assert lease is not None and lease.task_id == b"d-dead"
    assert queue.for_node(doomed.node).nack(lease, reason=b"boom", request_id="").state == "dead"
    held = queue.dispatch("d-held", b"h", strategy="least_loaded", priority=511, request_id="")
    assert queue.for_node(held.node).dequeue("worker-3", hour, request_id="") is not None
    queue.dispatch("d-ready", b"r", strategy="slot", routing_key=b"user:1", request_id="")
    queue.dispatch("d-later", b"l", strategy="weighted", delay_ms=hour, request_id="")
    assert scheduler.lock(PLACEHOLDERS["name"], ttl_ms=hour).acquire(blocking=False)
    semaphore = scheduler.semaphore(PLACEHOLDERS["name"], 2, ttl_ms=hour)
    assert semaphore.acquire(blocking=False)


def node_client(client: redis.Redis | redis.cluster.RedisCluster) -> Conn:
    """A plain client on the node that holds the namespace (the server itself if standalone)."""
    if isinstance(client, redis.cluster.RedisCluster):
        node = client.get_node_from_key(NAMESPACE.prefix)
        return client.get_redis_connection(node)
    return client


#: Each key's digest (type, content, whether it has a TTL) and DBSIZE.
State = tuple[dict[bytes, bytes], int]


class Target:
    """The seeded namespace on one node and the checks every invalid call must pass."""

    def __init__(self, client: redis.Redis | redis.cluster.RedisCluster, script: str) -> None:
        seed(client)
        self.conn = node_client(client)
        self.script = script
        self.entry = SCRIPTS[script]
        self.codes = {error["code"] for error in self.entry["errors"]}
        self.sha1 = render_all()[script].sha1
        loaded = self.conn.script_load(render_all()[script].text.encode("utf-8"))
        assert (loaded.decode() if isinstance(loaded, bytes) else loaded) == self.sha1
        self.keys = namespace_keys(client, NAMESPACE)
        assert len(self.keys) >= 20, self.keys  # the seed reached every part of the namespace
        self.baseline = self.state()
        self.seen: Counter[str] = Counter()

    def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """One round trip on a raw connection (errors stand in the list, like a pipeline's
        ``raise_on_error=False``, without its per-command overhead: this runs ~40,000 times)."""
        pool = self.conn.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command(connection.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except ResponseError as error:
                    replies.append(error)
            return replies
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def _checks(self) -> list[tuple[Any, ...]]:
        return [digest_command(self.keys)]

    def _state_of(self, replies: Sequence[Any]) -> State:
        return digests(self.keys, replies[0])

    def state(self) -> State:
        return self._state_of(self._send(self._checks()))

    def check(self, calls: Sequence[Call]) -> None:
        """Send ``calls`` and the state checks in one round trip; assert every call was refused
        with a listed LUASCHED_ code and that nothing changed."""
        commands = [("EVALSHA", self.sha1, len(keys), *keys, *args) for _, keys, args in calls]
        replies = self._send(commands + self._checks())
        for (what, keys, args), reply in zip(calls, replies, strict=False):
            described = f"{self.script} {what}: {len(keys)} keys, ARGV={_short(args)}"
            assert isinstance(reply, ResponseError), f"{described} answered {reply!r}"
            assert not isinstance(reply, NoScriptError), described
            message = str(reply)
            match = ERROR_REPLY.match(message)
            assert match is not None, f"{described}: not a LUASCHED_ error: {message[:200]!r}"
            assert match[2] == self.script, f"{described}: {message[:200]!r}"
            assert match[1] in self.codes, f"{described}: unlisted code in {message[:200]!r}"
            assert len(message) < 400, f"{described}: reply of {len(message)} bytes"
            self.seen[match[1]] += 1
        after = self._state_of(replies[len(calls) :])
        if after != self.baseline:
            changed = sorted(
                key for key in self.keys if after[0].get(key) != self.baseline[0].get(key)
            )
            raise AssertionError(
                f"{self.script}: calls {[_short(c[2]) for c in calls]} changed {changed} "
                f"(dbsize {self.baseline[1]} -> {after[1]})"
            )


def _short(args: Sequence[bytes]) -> str:
    shown = [arg[:24] + (b"...(%d bytes)" % len(arg) if len(arg) > 24 else b"") for arg in args[:8]]
    return repr(shown) + (f" +{len(args) - 8} more" if len(args) > 8 else "")


def _runs_on(server: ServerHandle, script: str) -> bool:
    since = tuple(int(part) for part in SCRIPTS[script]["min_server"].split("."))
    return server.version >= since


# --------------------------------------------------------------------------------------------
# The tests


def test_the_manifest_gives_every_script_invalid_calls() -> None:
    for name, entry in SCRIPTS.items():
        whats = [what for what, _, _ in catalog(entry)]
        assert any(what.endswith(" keys") for what in whats), name
        assert any(what.endswith(" args") for what in whats), name
        assert all(
            any(w.startswith(f"ARGV[{i + 1}]=") for w in whats) for i in range(len(entry["argv"]))
        ), name
        assert "ARG" in {error["code"] for error in entry["errors"]}, name


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_catalog_of_invalid_calls_is_refused_and_changes_nothing(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle, script: str
) -> None:
    if not _runs_on(server, script):
        pytest.skip(f"{script} needs {SCRIPTS[script]['min_server']}")
    target = Target(r, script)
    calls = list(catalog(SCRIPTS[script]))
    batch: list[Call] = []
    size = 0
    for call in calls:
        batch.append(call)
        size += sum(len(arg) for arg in call[2])
        if len(batch) >= 100 or size > 4 << 20:
            target.check(batch)
            batch, size = [], 0
    if batch:
        target.check(batch)
    assert sum(target.seen.values()) == len(calls)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_random_invalid_calls_are_refused_and_change_nothing(
    r: redis.Redis | redis.cluster.RedisCluster, server: ServerHandle, script: str
) -> None:
    if not _runs_on(server, script):
        pytest.skip(f"{script} needs {SCRIPTS[script]['min_server']}")
    target = Target(r, script)
    examples = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=False,  # seeded below, per server
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    @given(calls=st.lists(invalid_call(script), min_size=1, max_size=4))
    def fuzz(calls: list[Call]) -> None:
        nonlocal examples
        examples += 1
        target.check(calls)

    hypothesis_seed(SERVER_NAMES.index(server.name))(fuzz)()
    assert examples >= EXAMPLES
