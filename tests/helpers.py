"""Helpers shared by the tests (no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import redis
import redis.cluster

from luasched.keys import SLOT_COUNT, Namespace, to_bytes
from luasched.scheduler import Scheduler

__all__ = ["counts_of", "namespace_keys", "snapshot", "snapshot_ignoring_ttl", "table_owners"]

Client = redis.Redis | redis.cluster.RedisCluster


def _prefix(namespace: Namespace | str | bytes) -> bytes:
    if isinstance(namespace, Namespace):
        return namespace.prefix
    return Namespace(namespace).prefix


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` with the glob metacharacters of MATCH escaped (namespaces may hold any byte)."""
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


def namespace_keys(client: Client, namespace: Namespace | str | bytes) -> list[bytes]:
    """Every key of ``namespace`` (SCAN MATCH on its prefix; tests only), sorted.

    On a cluster every key of a namespace lives in one slot, so only the primary that owns it
    is scanned.
    """
    prefix = _prefix(namespace)
    pattern = _glob_escape(prefix) + b"*"
    if isinstance(client, redis.cluster.RedisCluster):
        node = client.get_node_from_key(prefix)
        found = client.scan_iter(match=pattern, count=1000, target_nodes=node)
    else:
        found = client.scan_iter(match=pattern, count=1000)
    return sorted({to_bytes(key) for key in found})


def snapshot(client: Client, namespace: Namespace | str | bytes) -> dict[bytes, bytes]:
    """Key -> DUMP of every key of ``namespace``: equal snapshots mean byte-identical data.

    DUMP's payload covers the value and its encoding, not the TTL; the TTL is appended (as
    ``b"|ttl=<ms>"``, -1 for none) so a changed expiry shows too.
    """
    result: dict[bytes, bytes] = {}
    for key in namespace_keys(client, namespace):
        dumped = client.dump(key)
        if dumped is None:  # expired or deleted between SCAN and DUMP
            continue
        ttl = client.pttl(key)
        result[key] = bytes(dumped) + b"|ttl=" + str(ttl).encode()
    return result


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
