"""The key layout of a namespace, and the cluster key slot computed in Python.

A namespace is one Redis Cluster hash tag: every key of namespace ``orders`` is named
``luasched:{orders}:<kind>[:<name>]``, so all of them live in one slot and one script call can
touch any of them, standalone or on a cluster. ``key_slot`` is the same function as the
``slots.keyslot`` script and as ``CLUSTER KEYSLOT``.
"""

from __future__ import annotations

import binascii
import functools
import secrets
from dataclasses import dataclass
from typing import Any

from luasched import contract, validate
from luasched.errors import InvalidArgument

__all__ = [
    "KEY_PREFIX",
    "MAX_NAMESPACE_BYTES",
    "REGISTRY_KEYS",  # noqa: F822 (module __getattr__: read from the manifest)
    "Namespace",
    "glob_escape",
    "key_slot",
    "new_request_id",
    "to_bytes",
]

KEY_PREFIX = b"luasched:"
MAX_NAMESPACE_BYTES = 128
SLOT_COUNT = 16384

#: ``REGISTRY_KEYS`` (the names under the namespace of the node registry's and slot table's
#: KEYS, in order) is read from the manifest on first use: see ``__getattr__``.


def __getattr__(name: str) -> Any:
    """``REGISTRY_KEYS``: the KEYS every ``nodes.*`` script and ``slots.rebalance``/``owner``/
    ``owners``/``owner_of_slot`` take, as names under the namespace, from the manifest
    (``nodes.register``'s layout, lua/include/registry_keys.j2). Node ids never enter a key
    name: they are hash fields and values."""
    if name == "REGISTRY_KEYS":
        return contract.layout(REGISTRY_SCRIPT).tails
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The script whose KEYS layout is the registry's (every registry and slot table script shares it).
REGISTRY_SCRIPT = "nodes.register"


def new_request_id() -> bytes:
    """A fresh random request id: 16 random bytes (``secrets``), as 32 lowercase hex digits
    (what every script accepts: ``[0-9A-Za-z_-]``, no ``:``)."""
    return secrets.token_hex(16).encode()


def to_bytes(value: str | bytes) -> bytes:
    """``value`` as bytes (UTF-8 for str), the way redis-py sends it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"expected str or bytes, got {type(value).__name__}")


def glob_escape(raw: bytes) -> bytes:
    """``raw`` with the glob metacharacters of Redis patterns (``*?[]\\``) escaped, so that it
    matches only itself in ``SCAN MATCH`` and ACL key patterns (a namespace may hold any byte)."""
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


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

    Raises InvalidArgument (a ValueError) naming ``namespace`` for a name that is not bytes or
    str, is empty, longer than 128 bytes, or contains ``{`` or ``}`` (which would change the
    hash tag, and so the slot, of its keys).
    """

    name: bytes

    def __init__(self, name: str | bytes) -> None:
        raw = validate.key_bytes("namespace", name, 1, MAX_NAMESPACE_BYTES)
        if b"{" in raw or b"}" in raw:
            raise InvalidArgument(f"namespace must not contain '{{' or '}}', got {name!r}")
        object.__setattr__(self, "name", raw)

    @property
    def prefix(self) -> bytes:
        """``luasched:{<namespace>}:``, the start of every key of this namespace."""
        return KEY_PREFIX + b"{" + self.name + b"}:"

    @property
    def key_pattern(self) -> bytes:
        """``luasched:{<namespace>}:*`` with the namespace's glob characters escaped: the glob
        pattern (``SCAN MATCH``, ACL ``~``) that matches this namespace's keys and no other's."""
        return glob_escape(self.prefix) + b"*"

    def key(self, *parts: str | bytes) -> bytes:
        """The key ``luasched:{<namespace>}:part1:part2...``."""
        return self.prefix + b":".join(to_bytes(part) for part in parts)

    @property
    def registry_keys(self) -> tuple[bytes, ...]:
        """The KEYS of the registry and slot table scripts, in order (``REGISTRY_KEYS``)."""
        return _registry_keys(self)

    @property
    def slot(self) -> int:
        """The cluster slot that holds every key of this namespace."""
        return key_slot(self.prefix)


@functools.lru_cache(maxsize=1024)
def _registry_keys(namespace: Namespace) -> tuple[bytes, ...]:
    return contract.layout(REGISTRY_SCRIPT).bind(namespace).keys
