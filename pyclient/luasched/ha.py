"""High availability: durable mode (``wait_replicas``) and Sentinel-managed primaries; what the
sync and asyncio runners and Schedulers share, without I/O.

Durable mode: a call whose script can change state (every script not flagged ``no-writes`` in
the manifest) is sent in one pipeline (one round trip, not a transaction) with ``WAIT N T``
after it. ``WAIT`` answers how many replicas hold every write the primary made up to that
point (the primary's replication offset after the call), so ``N`` acks mean the call's effect
is on ``N`` replicas. Fewer than ``N`` within ``T`` ms: ``NotReplicated`` -- transient for the
``RetryPolicy``, so the very same call (same request id) is sent again; a script with a request
record answers its first reply to the resend and acts once. Calls of ``no-writes`` scripts
(stats, lookups, ``nodes.list``) are sent alone.

Only a standalone primary (direct or behind Sentinel) takes durable mode: on a cluster each
call runs on its key's primary and a ``WAIT`` must reach that very node on the same
connection, which redis-py's cluster client does not offer; ``wait_replicas`` is refused there.

Sentinel: redis-py's ``SentinelConnectionPool`` asks the sentinels for the primary's address
only when it opens a connection, so after a ``SENTINEL FAILOVER`` its pooled connections keep
writing to the old primary (still a primary for ~10 s, and everything written there is
discarded when it becomes a replica). After an error that says "this is not (or no longer) the
primary you want" -- ``READONLY`` (a ``ConnectionError`` from redis-py's Sentinel connection),
``NOREPLICAS``, ``NotReplicated`` -- the runner asks the sentinels for the primary
(``rediscover``); when it changed, the pool closes its idle connections and drops the others
when they come back, so the resent call reaches the new primary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.exceptions import ConnectionError, ReadOnlyError

from luasched import validate
from luasched.errors import InvalidArgument, NotReplicated
from luasched.render import RenderedScript
from luasched.retry import no_replicas
from luasched.validate import DEFAULT_WAIT_TIMEOUT_MS, MAX_WAIT_REPLICAS, MAX_WAIT_TIMEOUT_MS

if TYPE_CHECKING:
    from luasched.scripts import Call

__all__ = [
    "DEFAULT_WAIT_TIMEOUT_MS",
    "Durability",
    "asks_for_primary",
    "changes_state",
    "durability",
    "request_id_of",
    "sentinel_client",
    "sentinel_pool",
]


@dataclass(frozen=True)
class Durability:
    """``WAIT replicas timeout_ms`` after every call that can change state."""

    replicas: int
    timeout_ms: int

    @property
    def command(self) -> tuple[str, int, int]:
        return ("WAIT", self.replicas, self.timeout_ms)

    def check(self, call: Call[Any], script: RenderedScript, acked: Any) -> None:
        """Raise what a ``WAIT`` reply means for ``call``: its error, or NotReplicated when
        fewer than ``replicas`` acknowledged."""
        if isinstance(acked, BaseException):
            raise acked
        if int(acked) < self.replicas:
            raise NotReplicated(call.script, int(acked), self.replicas, request_id_of(script, call))

    def result(self, call: Call[Any], script: RenderedScript, reply: Any, acked: Any) -> Any:
        """The parsed reply of a durable call (script reply, then ``WAIT`` reply); raises the
        script's error (translated), the ``WAIT``'s, or NotReplicated."""
        from luasched.scripts import translate

        if isinstance(reply, BaseException):
            raise translate(reply)
        self.check(call, script, acked)
        return call.parse(reply)

    def mark(
        self,
        calls: Sequence[Call[Any]],
        scripts: Any,
        replies: list[Any],
        acked: Any,
    ) -> list[Any]:
        """A batch's replies with each successful state-changing call's reply replaced by
        NotReplicated (or the ``WAIT``'s error) when the batch's ``WAIT`` fell short."""
        marked = list(replies)
        for index, (call, reply) in enumerate(zip(calls, replies, strict=True)):
            script = scripts[call.script]
            if isinstance(reply, BaseException) or not changes_state(script):
                continue
            try:
                self.check(call, script, acked)
            except Exception as error:
                marked[index] = error
        return marked


def durability(client: object, wait_replicas: object, wait_timeout_ms: object) -> Durability | None:
    """The validated durable mode of a Scheduler, or None (``wait_replicas=0``: off).

    Raises InvalidArgument naming ``wait_replicas`` / ``wait_timeout_ms`` (integers,
    0..1000 and 0..3600000; a ``wait_timeout_ms`` of 0 waits without limit, as ``WAIT`` does),
    or naming ``wait_replicas`` for a cluster client (durable mode is standalone/Sentinel only).
    """
    replicas = validate.integer("wait_replicas", wait_replicas, 0, MAX_WAIT_REPLICAS)
    timeout_ms = validate.integer("wait_timeout_ms", wait_timeout_ms, 0, MAX_WAIT_TIMEOUT_MS)
    if replicas == 0:
        return None
    from luasched.scripts import is_cluster

    if is_cluster(client):
        raise InvalidArgument(
            "wait_replicas: durable mode needs a standalone primary (direct or behind Sentinel); "
            "on a Redis Cluster a WAIT cannot follow each script to its key's primary"
        )
    return Durability(replicas, timeout_ms)


def changes_state(script: RenderedScript) -> bool:
    """Whether a call of ``script`` can change state (the manifest's ``no-writes`` flag)."""
    return "no-writes" not in script.spec.flags


def request_id_of(script: RenderedScript, call: Call[Any]) -> bytes:
    """The request id ``call`` carries (its ARGV ``request_id``), ``b""`` if it has none."""
    for index, arg in enumerate(script.spec.args):
        if arg.name == "request_id" and index < len(call.args):
            value = call.args[index]
            return value if isinstance(value, bytes) else str(value).encode()
    return b""


def sentinel_pool(client: object) -> Any | None:
    """The Sentinel-managed primary pool of ``client`` (sync or asyncio), else None."""
    import redis.asyncio.sentinel
    import redis.sentinel

    pool = getattr(client, "connection_pool", None)
    kinds = (redis.sentinel.SentinelConnectionPool, redis.asyncio.sentinel.SentinelConnectionPool)
    if isinstance(pool, kinds) and pool.is_master:
        return pool
    return None


def asks_for_primary(error: BaseException) -> bool:
    """Whether ``error`` says the call may have reached a node that is no longer the primary
    (or a primary cut off from its replicas): ask the sentinels again."""
    if isinstance(error, (ReadOnlyError, NotReplicated)) or no_replicas(error):
        return True
    return isinstance(error, ConnectionError) and "master is now a slave" in str(error)


#: What asking the sentinels may raise: not the call's error (the retry goes on without it).
REDISCOVER_ERRORS = (redis.RedisError, OSError)


def sentinel_client(
    sentinels: object,
    service_name: object,
    sentinel_kwargs: object,
    connection_kwargs: object,
    *,
    asyncio: bool,
) -> Any:
    """redis-py's ``Sentinel(sentinels, sentinel_kwargs=..., **connection_kwargs)
    .master_for(service_name)`` (``redis.asyncio.sentinel`` with ``asyncio``), after checking
    the arguments: ``sentinels`` a non-empty list of ``(host, port)``, ``service_name`` a
    non-empty str, the kwargs None or mappings (InvalidArgument naming the parameter). No I/O:
    the sentinels are asked when the first connection opens."""
    if (
        not isinstance(sentinels, (list, tuple))
        or not sentinels
        or not all(
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and isinstance(entry[0], str)
            and entry[0]
            and type(entry[1]) is int
            and 0 < entry[1] < 65536
            for entry in sentinels
        )
    ):
        raise InvalidArgument(
            f"sentinels must be a non-empty list of (host, port) pairs, got {sentinels!r}"
        )
    if not isinstance(service_name, str) or not service_name:
        raise InvalidArgument(f"service_name must be a non-empty str, got {service_name!r}")
    kwargs = (("sentinel_kwargs", sentinel_kwargs), ("connection_kwargs", connection_kwargs))
    for name, value in kwargs:
        if value is not None and not isinstance(value, Mapping):
            raise InvalidArgument(f"{name} must be a mapping or None, got {value!r}")
    hosts = [(str(entry[0]), int(entry[1])) for entry in sentinels]
    for_sentinels = (
        dict(cast(Mapping[str, Any], sentinel_kwargs)) if sentinel_kwargs is not None else None
    )
    for_primary = dict(cast(Mapping[str, Any], connection_kwargs or {}))
    if asyncio:
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        manager: Any = AsyncSentinel(hosts, sentinel_kwargs=for_sentinels, **for_primary)  # type: ignore[no-untyped-call]
    else:
        from redis.sentinel import Sentinel

        manager = Sentinel(hosts, sentinel_kwargs=for_sentinels, **for_primary)  # type: ignore[no-untyped-call]
    return manager.master_for(service_name)
