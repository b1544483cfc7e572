"""The rows of the benchmark. Adding a row is a few lines: a worker factory and ``add(Case(...))``.

Groups (one report table each, ``--only GROUP``):

* ``floor``: ``PING``; ``EVALSHA`` of ``return 1`` (the floor every ratio refers to); and
  ``LEASE_SCRIPT`` below, the least work any atomic lease-based queue does per dequeue.
* ``slots``: ``slots.keyslot`` with 1 and with 100 keys per call.
* ``nodes``: ``slots.owner`` with 10 and 10,000 registered nodes; ``slots.rebalance`` over 1,000.
* ``locks``: the peers luasched's lock will be compared with (redis-py ``Lock``,
  python-redis-lock, pottery ``Redlock`` on one master): one acquire + one release per cycle.

A worker gets its own client from ``env.client()`` (its commands are counted for the
commandstats view); setup and teardown use ``env.control()``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import luasched
from luasched.keys import REGISTRY_KEYS, Namespace

from .engine import Case, Env, Worker, add

# --------------------------------------------------------------------------------- helpers


def command_worker(env: Env, *command: Any) -> Worker:
    """A worker that sends one fixed command per call (pipelined: n of them per round trip)."""
    client = env.client()
    execute: Any = client.execute_command  # redis-py leaves it untyped

    def batch(size: int) -> None:
        pipe: Any = client.pipeline(transaction=False)
        for _ in range(size):
            pipe.execute_command(*command)
        pipe.execute()

    return Worker(call=lambda: execute(*command), batch=batch, close=client.close)


def sample_keys(count: int = 1024) -> Iterator[str]:
    """Endless keys spread over many slots (``user:0`` .. ``user:1023`` over and over)."""
    return itertools.cycle([f"user:{number}" for number in range(count)])


def scheduler_worker(
    env: Env,
    namespace: str,
    one: Callable[[Any, Iterator[str]], object],
) -> Worker:
    """A worker that makes one luasched call per ``call()``: ``one(api, keys)`` where ``api`` is
    a ``Scheduler`` (single calls) or a ``SchedulerPipeline`` (``batch``)."""
    scheduler = luasched.Scheduler(env.client(), namespace)
    scheduler.load_scripts()
    keys = sample_keys()

    def batch(size: int) -> None:
        with scheduler.pipeline() as pipe:
            for _ in range(size):
                one(pipe, keys)
            pipe.execute()

    return Worker(call=lambda: one(scheduler, keys), batch=batch, close=scheduler.client.close)


# ---------------------------------------------------------------------------------- floors

#: The floor of any atomic lease-based queue: take the first ready task, record its lease
#: deadline (server clock) and its holder. Not part of luasched: the reference its queue
#: scripts are compared with. KEYS: ready (zset), leased (zset: task -> deadline ms),
#: holders (hash: task -> worker). ARGV: lease_ms, worker. Reply: the task, or nil if none.
LEASE_SCRIPT = """\
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local popped = redis.call('ZPOPMIN', KEYS[1])
if popped[1] == nil then return false end
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[1]), popped[1])
redis.call('HSET', KEYS[3], popped[1], ARGV[2])
return popped[1]
"""

#: Empties the three lease keys and queues ARGV[1] tasks (score = position), in chunks.
LEASE_FILL_SCRIPT = """\
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
local total = tonumber(ARGV[1])
local chunk = {}
for number = 1, total do
  chunk[#chunk + 1] = number
  chunk[#chunk + 1] = 'task:' .. number
  if #chunk >= 2000 then
    redis.call('ZADD', KEYS[1], unpack(chunk))
    chunk = {}
  end
end
if #chunk > 0 then redis.call('ZADD', KEYS[1], unpack(chunk)) end
return total
"""

LEASE_KEYS = ("bench:{lease}:ready", "bench:{lease}:leased", "bench:{lease}:holders")


def _sha(env: Env, script: str) -> str:
    control = env.control()
    try:
        sha = control.script_load(script)
        return sha.decode() if isinstance(sha, bytes) else str(sha)
    finally:
        control.close()


def _lease_fill(env: Env, state: Any) -> None:
    # Enough tasks for a whole round of every client, warm-up included: no call finds it empty.
    settings = env.settings
    total = settings.max_calls + (settings.clients + 2) * (settings.warmup_calls + settings.batch)
    control = env.control()
    try:
        control.eval(LEASE_FILL_SCRIPT, len(LEASE_KEYS), *LEASE_KEYS, total)
    finally:
        control.close()


def _delete(env: Env, *keys: str | bytes) -> None:
    control = env.control()
    try:
        control.delete(*keys)
    finally:
        control.close()


add(
    Case(
        name="PING",
        group="floor",
        worker=lambda env, state, index: command_worker(env, "PING"),
        note="the round trip alone",
    )
)
add(
    Case(
        name="EVALSHA return 1",
        group="floor",
        setup=lambda env: _sha(env, "return 1"),
        worker=lambda env, sha, index: command_worker(env, "EVALSHA", sha, 0),
        note="the floor of any script: every ratio in this report refers to this row",
    )
)
add(
    Case(
        name="lease reference (TIME+ZPOPMIN+ZADD+HSET)",
        group="floor",
        setup=lambda env: _sha(env, LEASE_SCRIPT),
        before_round=_lease_fill,
        teardown=lambda env, state: _delete(env, *LEASE_KEYS),
        worker=lambda env, sha, index: command_worker(
            env, "EVALSHA", sha, len(LEASE_KEYS), *LEASE_KEYS, 30_000, f"worker-{index}"
        ),
        note="the minimal atomic dequeue-with-lease of any queue (bench/cases.py LEASE_SCRIPT)",
    )
)

# ----------------------------------------------------------------------------------- slots


def _keyslot_one(api: Any, keys: Iterator[str]) -> object:
    return api.slots.keyslot(next(keys))


def _keyslot_hundred(api: Any, keys: Iterator[str]) -> object:
    return api.slots.keyslots([next(keys) for _ in range(100)])


add(
    Case(
        name="slots.keyslot, 1 key",
        group="slots",
        worker=lambda env, state, index: scheduler_worker(env, "bench", _keyslot_one),
        note="CRC-16 of a short key in Lua",
    )
)
add(
    Case(
        name="slots.keyslot, 100 keys per call",
        group="slots",
        worker=lambda env, state, index: scheduler_worker(env, "bench", _keyslot_hundred),
        ops_per_call=100,
        unit="key",
        note="per key: one call hashes 100 keys",
    )
)

# ----------------------------------------------------------------------------------- nodes


def _has_registry() -> bool:
    """Whether this luasched has the node registry and slot table (issue 3)."""
    try:
        from luasched.nodes import Nodes
        from luasched.slots import Slots
    except ImportError:
        return False
    return hasattr(Nodes, "register") and all(
        hasattr(Slots, name) for name in ("owner", "rebalance")
    )


HAS_REGISTRY = _has_registry()


def register_nodes(env: Env, namespace: str, count: int, weight: Callable[[int], int]) -> None:
    """Register ``count`` nodes (no deadline) in batches, then drop any slot table left."""
    control = env.control()
    try:
        control.delete(*Namespace(namespace).registry_keys)
        scheduler = luasched.Scheduler(control, namespace)
        for start in range(0, count, 1000):
            with scheduler.pipeline() as pipe:
                for number in range(start, min(count, start + 1000)):
                    pipe.nodes.register(f"node-{number}", weight=weight(number))
                pipe.execute()
    finally:
        control.close()


def _owner_setup(count: int) -> Callable[[Env], str]:
    def setup(env: Env) -> str:
        namespace = f"bench-owner-{count}"
        register_nodes(env, namespace, count, lambda number: 1)
        control = env.control()
        try:
            luasched.Scheduler(control, namespace).slots.rebalance()
        finally:
            control.close()
        return namespace

    return setup


def _drop_namespace(env: Env, namespace: str) -> None:
    _delete(env, *Namespace(namespace).registry_keys)


def _owner(api: Any, keys: Iterator[str]) -> object:
    return api.slots.owner(next(keys))


def _rebalance(api: Any, keys: Iterator[str]) -> object:
    return api.slots.rebalance()


REBALANCE_NODES = 1000


def _rebalance_setup(env: Env) -> str:
    namespace = "bench-rebalance"
    register_nodes(env, namespace, REBALANCE_NODES, lambda number: 1 + number % 10)
    return namespace


def _slot_table_key(namespace: str) -> bytes:
    return Namespace(namespace).registry_keys[REGISTRY_KEYS.index("slots:owner")]


def _forget_slots(env: Env, namespace: str) -> None:
    """Drop the slot table: the next rebalance assigns all 16384 slots (its worst case)."""
    _delete(env, _slot_table_key(namespace))


def _rebalanced_setup(env: Env) -> str:
    """1,000 nodes, already rebalanced: the next rebalance moves nothing."""
    namespace = _rebalance_setup(env)
    control = env.control()
    try:
        luasched.Scheduler(control, namespace).slots.rebalance()
    finally:
        control.close()
    return namespace


if HAS_REGISTRY:
    for node_count in (10, 10_000):
        add(
            Case(
                name=f"slots.owner, {node_count:,} nodes",
                group="nodes",
                setup=_owner_setup(node_count),
                teardown=_drop_namespace,
                worker=lambda env, namespace, index: scheduler_worker(env, namespace, _owner),
                note="after rebalance; keys user:0..1023 spread over the slots",
            )
        )
    add(
        Case(
            name=f"slots.rebalance, {REBALANCE_NODES:,} nodes, all 16384 slots move",
            group="nodes",
            setup=_rebalance_setup,
            teardown=_drop_namespace,
            before_round=_forget_slots,
            worker=lambda env, namespace, index: scheduler_worker(env, namespace, _rebalance),
            modes=("single",),
            max_calls=1,
            rounds=7,
            note="one call per round, from an empty slot table (weights 1..10): the worst case",
        )
    )
    add(
        Case(
            name=f"slots.rebalance, {REBALANCE_NODES:,} nodes, nothing moves",
            group="nodes",
            setup=_rebalanced_setup,
            teardown=_drop_namespace,
            worker=lambda env, namespace, index: scheduler_worker(env, namespace, _rebalance),
            modes=("single",),
            max_calls=200,
            note="a second rebalance with no change: the pass over the table alone",
        )
    )


# ----------------------------------------------------------------------------------- locks
# One lock name per client: these rows measure an uncontended acquire + release cycle.

LOCK_TTL_S = 30


def _lock_cycle(acquire: Callable[[], object], release: Callable[[], object]) -> Callable[[], None]:
    def cycle() -> None:
        if not acquire():
            raise RuntimeError("an uncontended lock was not acquired")
        release()

    return cycle


def redis_py_lock_worker(env: Env, state: Any, index: int) -> Worker:
    client = env.client()
    lock = client.lock(f"bench:lock:redis-py:{index}", timeout=LOCK_TTL_S)
    return Worker(
        call=_lock_cycle(lambda: lock.acquire(blocking=False), lock.release), close=client.close
    )


def python_redis_lock_worker(env: Env, state: Any, index: int) -> Worker:
    import redis_lock  # python-redis-lock

    client = env.client()
    lock = redis_lock.Lock(client, f"bench:python-redis-lock:{index}", expire=LOCK_TTL_S)
    return Worker(
        call=_lock_cycle(lambda: lock.acquire(blocking=False), lock.release), close=client.close
    )


def pottery_worker(env: Env, state: Any, index: int) -> Worker:
    from pottery import Redlock

    client = env.client()
    lock = Redlock(key=f"bench:pottery:{index}", masters={client}, auto_release_time=LOCK_TTL_S)
    return Worker(
        call=_lock_cycle(lambda: lock.acquire(blocking=False), lock.release), close=client.close
    )


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


LOCK_PEERS: list[tuple[str, str, Callable[[Env, Any, int], Worker], str]] = [
    ("redis-py Lock", "redis", redis_py_lock_worker, "SET NX PX; release: EVALSHA (GET+DEL)"),
    (
        "python-redis-lock",
        "redis_lock",
        python_redis_lock_worker,
        "GET + SET NX EX; release: EVALSHA (GET, DEL, LPUSH+PEXPIRE signal)",
    ),
    (
        "pottery Redlock (1 master)",
        "pottery",
        pottery_worker,
        "SET NX PX; release: EVALSHA; a thread pool per call",
    ),
]

for peer_name, peer_module, peer_worker, peer_note in LOCK_PEERS:
    if _installed(peer_module):
        add(
            Case(
                name=f"{peer_name} acquire+release",
                group="locks",
                worker=peer_worker,
                modes=("single", "multi"),
                unit="cycle",
                note=peer_note,
            )
        )
