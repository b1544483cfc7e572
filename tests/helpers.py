"""Helpers shared by the tests (no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import redis
import redis.cluster

from luasched.keys import Namespace, to_bytes

__all__ = ["namespace_keys", "snapshot"]

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
