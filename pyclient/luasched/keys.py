"""The key layout of a namespace, and the cluster key slot computed in Python.

A namespace is one Redis Cluster hash tag: every key of namespace ``orders`` is named
``luasched:{orders}:<kind>[:<name>]``, so all of them live in one slot and one script call can
touch any of them, standalone or on a cluster. ``key_slot`` is the same function as the
``slots.keyslot`` script and as ``CLUSTER KEYSLOT``.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

__all__ = ["KEY_PREFIX", "MAX_NAMESPACE_BYTES", "Namespace", "key_slot", "to_bytes"]

KEY_PREFIX = b"luasched:"
MAX_NAMESPACE_BYTES = 128
SLOT_COUNT = 16384


def to_bytes(value: str | bytes) -> bytes:
    """``value`` as bytes (UTF-8 for str), the way redis-py sends it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"expected str or bytes, got {type(value).__name__}")


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that Redis Cluster hashes: its hash tag if it has a non-empty one."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot (0..16383) of ``key``: CRC-16/XMODEM of its hash tag."""
    return binascii.crc_hqx(hash_tag(to_bytes(key)), 0) % SLOT_COUNT


@dataclass(frozen=True)
class Namespace:
    """The keys of one namespace.

    Raises ValueError for a name that is empty, longer than 128 bytes, or contains ``{`` or
    ``}`` (which would change the hash tag, and so the slot, of its keys).
    """

    name: bytes

    def __init__(self, name: str | bytes) -> None:
        raw = to_bytes(name)
        if not raw or len(raw) > MAX_NAMESPACE_BYTES:
            raise ValueError(f"namespace must be 1 to {MAX_NAMESPACE_BYTES} bytes, got {len(raw)}")
        if b"{" in raw or b"}" in raw:
            raise ValueError(f"namespace must not contain '{{' or '}}': {name!r}")
        object.__setattr__(self, "name", raw)

    @property
    def prefix(self) -> bytes:
        """``luasched:{<namespace>}:``, the start of every key of this namespace."""
        return KEY_PREFIX + b"{" + self.name + b"}:"

    def key(self, *parts: str | bytes) -> bytes:
        """The key ``luasched:{<namespace>}:part1:part2...``."""
        return self.prefix + b":".join(to_bytes(part) for part in parts)

    @property
    def slot(self) -> int:
        """The cluster slot that holds every key of this namespace."""
        return key_slot(self.prefix)
