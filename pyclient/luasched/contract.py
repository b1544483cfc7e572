"""What the Python side reads from the scripts' contract: KEYS layouts, ARGV specs, enum choices
and the limits that the scripts and the wrappers must agree on.

Nothing here types a layout, a choice list or a limit. KEYS layouts and ARGV specs come from
each script's header, as the manifest states them (``render_all()`` of the default
configuration: layouts and enums do not depend on ``ScriptConfig``); limits come from the
templates' limit files (``render.limits``). So the Python wrappers build exactly the KEYS the
scripts declare, in their order, as a client in any other language builds them from
manifest.json.

Everything is read on first use and cached for the process; ``luasched.asyncio`` loads the
scripts at import (``validate.preload``), so no event loop waits on it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from luasched.render import ArgSpec, ScriptSpec, limits, render_all

if TYPE_CHECKING:
    from luasched.keys import Namespace

__all__ = [
    "BoundKeys",
    "Layout",
    "arg_spec",
    "choices",
    "layout",
    "limit",
    "scripts_named",
    "spec",
]

#: Every key pattern starts with it; ``{ns}`` stands for the namespace in braces.
PATTERN_PREFIX = "luasched:{ns}:"
#: The placeholder a request key carries: filled per call (``BoundKeys.with_request``).
REQUEST_PLACE = "request_id"
_PLACE = re.compile(r"<([a-z_]+)>")


def spec(script: str) -> ScriptSpec:
    """The contract of ``script`` (its parsed header), as the manifest states it."""
    return render_all()[script].spec


def scripts_named(prefix: str) -> tuple[str, ...]:
    """The names of every script that starts with ``prefix`` (``"pick."``), in name order."""
    return tuple(name for name in render_all() if name.startswith(prefix))


@functools.cache
def arg_spec(script: str, argv_name: str) -> ArgSpec:
    """ARGV ``argv_name`` of ``script``: its type, range, choices and repeat count."""
    for arg in spec(script).args:
        if arg.name == argv_name:
            return arg
    raise KeyError(f"{script} has no argument {argv_name!r}")  # a bug in a call builder


@functools.cache
def choices(script: str, argv_name: str) -> tuple[str, ...]:
    """The choices of the enum ARGV ``argv_name`` of ``script``, in the manifest's order."""
    found = arg_spec(script, argv_name).choices
    if found is None:
        raise KeyError(f"{script} argument {argv_name!r} is not an enum")
    return found


@functools.cache
def limit(family: str, name: str) -> int:
    """The limit ``name`` of the ``family`` scripts (``limit("queue", "wake_max")``): the value
    the templates render (lua/include/<family>_limits.j2)."""
    try:
        return limits()[family][name]
    except KeyError:
        raise KeyError(f"no limit {name!r} of {family!r}") from None


@dataclass(frozen=True)
class Layout:
    """The KEYS layout of a script: each key's manifest name and pattern, in KEYS order.

    ``parts`` is each pattern after ``luasched:{ns}:``, split into fixed text (even positions)
    and ``<placeholder>`` names (odd positions). Scripts with equal layouts share one object.
    """

    names: tuple[str, ...]
    patterns: tuple[str, ...]
    parts: tuple[tuple[str, ...], ...]

    def position(self, name: str) -> int:
        """The 0-based KEYS position of the key named ``name``; KeyError if there is none."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no key named {name!r}; the layout has {self.names}") from None

    @property
    def request(self) -> int:
        """The 0-based KEYS position of the request key (its pattern holds ``<request_id>``);
        -1 when the layout has none."""
        for position, parts in enumerate(self.parts):
            if REQUEST_PLACE in parts[1::2]:
                return position
        return -1

    @property
    def tails(self) -> tuple[str, ...]:
        """The names under the namespace (``pick:util``) of a layout without placeholders."""
        if any(len(parts) > 1 for parts in self.parts):
            raise ValueError(f"the layout {self.patterns} has placeholders")
        return tuple(parts[0] for parts in self.parts)

    def bind(self, namespace: Namespace, **places: bytes) -> BoundKeys:
        """The KEYS of this layout in ``namespace`` with ``places`` filled in (``queue=b"jobs"``).

        A key with a ``<request_id>`` is kept as the text around it (filled per call); any other
        placeholder left unfilled is a bug in the caller (KeyError)."""
        built: list[bytes] = []
        request = -1
        head = tail = b""
        for position, parts in enumerate(self.parts):
            pieces = [namespace.prefix]
            for index, part in enumerate(parts):
                if index % 2 == 0:
                    pieces.append(part.encode())
                elif part == REQUEST_PLACE:
                    if request >= 0:
                        raise KeyError(f"two request keys in {self.patterns}")
                    request, head = position, b"".join(pieces)
                    pieces = []
                elif part in places:
                    pieces.append(places[part])
                else:
                    raise KeyError(f"no value for <{part}> of {self.patterns[position]!r}")
            if request == position:
                tail = b"".join(pieces)
                built.append(head + tail)
            else:
                built.append(b"".join(pieces))
        return BoundKeys(self, tuple(built), request, head, tail)


@dataclass(frozen=True)
class BoundKeys:
    """A layout's KEYS in one namespace, built once (per queue, lock...) and completed per call.

    ``keys`` holds every key, the request key (if any, at ``request``) with an empty request id:
    exactly what a call without a request id sends.
    """

    layout: Layout
    keys: tuple[bytes, ...]
    request: int
    head: bytes
    tail: bytes

    def with_request(self, request_id: bytes) -> tuple[bytes, ...]:
        """The KEYS of a call with ``request_id`` (b"": none; the request key is then unused)."""
        if not request_id or self.request < 0:
            return self.keys
        keys = self.keys
        at = self.request
        return (*keys[:at], self.head + request_id + self.tail, *keys[at + 1 :])

    def __getitem__(self, name: str) -> bytes:
        """The key named ``name`` in the manifest (``"wake"``)."""
        return self.keys[self.layout.position(name)]

    def run(self, first: str, last: str) -> tuple[bytes, ...]:
        """The keys from the one named ``first`` to the one named ``last``, both included."""
        return self.keys[self.layout.position(first) : self.layout.position(last) + 1]


@functools.cache
def _layout_of(names: tuple[str, ...], patterns: tuple[str, ...]) -> Layout:
    parts = []
    for pattern in patterns:
        if not pattern.startswith(PATTERN_PREFIX):
            raise ValueError(f"key pattern {pattern!r} does not start with {PATTERN_PREFIX!r}")
        parts.append(tuple(_PLACE.split(pattern[len(PATTERN_PREFIX) :])))
    return Layout(names, patterns, tuple(parts))


@functools.cache
def layout(script: str) -> Layout:
    """The KEYS layout of ``script``, from its manifest entry (scripts whose layouts are equal
    share one ``Layout`` object)."""
    keys = spec(script).keys
    return _layout_of(tuple(key.name for key in keys), tuple(key.pattern for key in keys))
