"""The argument checks of the Python API, shared by the sync, asyncio and pipeline wrappers.

Every public call checks its arguments here before it sends anything: a bad argument raises
``InvalidArgument`` (code ``ARG``) whose message names the parameter as the caller spelled it and
the accepted range, and no command has been sent, so no key has changed. The rules
(docs/api.md):

* **Integers** are ``int`` only: a bool, a float (even ``2.0``), a str (even ``"5"``) or None
  is not one. Ranges are the scripts' own, read from their manifest (``ArgSpec``), so the Python
  check and the server check cannot disagree.
* **Durations in ms** (``lease_ms``, ``delay_ms``, ``block_ms``, ``ttl_ms``...) are integers too;
  a negative wait is an error, never "no wait".
* **Timeouts in seconds** (``timeout=``) are None (no limit) or a finite int or float >= 0; a
  bool, NaN or infinity is refused.
* **Ids, names and payloads** are bytes or str (str is sent as UTF-8) within the script's length
  range; anything else (None, ints...) is refused.
* **Flags** (``fair``, ``blocking``...) are bools.

The bounds the ``ScriptConfig`` of a Scheduler sets (``max_batch``, ``max_key_bytes``) are
checked here against the largest configuration any Scheduler may have; the script then checks
the configured value (``LUASCHED_ARG``, nothing changed).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from luasched.contract import arg_spec
from luasched.errors import InvalidArgument
from luasched.render import render_all

if TYPE_CHECKING:
    from luasched.leases import Lease

__all__ = [
    "arg",
    "choice",
    "client",
    "flag",
    "integer",
    "key_bytes",
    "lease",
    "many",
    "request_id",
    "timeout_s",
]

_REQUEST_ID = re.compile(rb"[0-9A-Za-z_-]*")


#: Durable mode (``luasched.ha``; here so the CLI reads them without importing redis):
#: ``wait_timeout_ms`` when not given, how long one ``WAIT`` may block; the largest
#: ``wait_replicas`` / ``wait_timeout_ms`` accepted (Redis takes larger; no use).
DEFAULT_WAIT_TIMEOUT_MS = 1000
MAX_WAIT_REPLICAS = 1000
MAX_WAIT_TIMEOUT_MS = 3_600_000


def _refuse(name: str, rule: str, value: object) -> InvalidArgument:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:60] + "..."
    return InvalidArgument(f"{name} must be {rule}, got {shown}")


def integer(name: str, value: object, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool) in ``lo..hi``, else InvalidArgument naming
    ``name`` and the range."""
    if type(value) is int and lo <= value <= hi:  # the common case first: one call per check
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(name, f"an integer in {lo}..{hi} (not a bool, float or str)", value)
    if not lo <= value <= hi:
        raise _refuse(name, f"an integer in {lo}..{hi}", value)
    return value


def timeout_s(name: str, value: object) -> float | None:
    """``value`` if it is None (no limit) or a finite number of seconds >= 0 (int or float, not
    a bool), else InvalidArgument naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(name, "None or a number of seconds >= 0 (not a bool or str)", value)
    if not (math.isfinite(value) and value >= 0):
        raise _refuse(name, "None or a finite number of seconds >= 0", value)
    return float(value)


def key_bytes(name: str, value: object, lo: int, hi: int | None) -> bytes:
    """``value`` as bytes (str encoded UTF-8) if it is bytes or str of ``lo..hi`` bytes (``hi``
    None: no upper bound), else InvalidArgument naming ``name`` and the range."""
    if type(value) is bytes and lo <= len(value) and (hi is None or len(value) <= hi):
        return value
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise _refuse(name, "bytes or a str that UTF-8 can encode", value) from None
    else:
        what = "bytes or str" if hi is None else f"bytes or str of {lo}..{hi} bytes"
        raise _refuse(name, what, value)
    if len(raw) < lo or (hi is not None and len(raw) > hi):
        span = f"at least {lo}" if hi is None else f"{lo} to {hi}"  # the scripts' wording
        raise InvalidArgument(f"{name} must be {span} bytes long, got {len(raw)} bytes")
    return raw


def flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else InvalidArgument naming ``name``."""
    if not isinstance(value, bool):
        raise _refuse(name, "True or False", value)
    return value


def choice(name: str, value: object, choices: Collection[str]) -> str:
    """``value`` if it is one of ``choices`` (str), else InvalidArgument naming them."""
    if not isinstance(value, str) or value not in choices:
        raise _refuse(name, "one of " + ", ".join(repr(item) for item in choices), value)
    return value


def preload() -> None:
    """Load now the default scripts whose manifest the checks read (else: at the first check).

    ``luasched.asyncio`` calls it when it is imported, so that the first call made on an event
    loop does not load them there (a call's arguments are checked before it is awaited)."""
    render_all()


#: (script, ARGV name) -> (type, min, max, choices) of the manifest, filled on first use.
_BOUNDS: dict[tuple[str, str], tuple[str, int, int, tuple[str, ...]]] = {}


def _bounds(script: str, argv_name: str) -> tuple[str, int, int, tuple[str, ...]]:
    found = _BOUNDS.get((script, argv_name))
    if found is None:
        spec = arg_spec(script, argv_name)
        found = (spec.type, int(spec.min or 0), int(spec.max or 0), spec.choices or ())
        _BOUNDS[(script, argv_name)] = found
    return found


def arg(
    script: str,
    argv_name: str,
    value: object,
    *,
    name: str | None = None,
    lo: int | None = None,
    hi: int | None = None,
) -> Any:
    """``value`` checked against ARGV ``argv_name`` of ``script`` (its manifest type and range):
    an int, bytes (str encoded UTF-8) or an enum choice. ``name`` is the caller's name for it
    (default ``argv_name``); ``lo``/``hi`` narrow or widen the manifest's range where the Python
    API differs (a None that stands for the script's -1, a bound a ``ScriptConfig`` sets)."""
    kind, low, high, choices = _bounds(script, argv_name)
    shown = argv_name if name is None else name
    if kind == "enum":
        return choice(shown, value, choices)
    if lo is not None:
        low = lo
    if hi is not None:
        high = hi
    if kind == "string":
        return key_bytes(shown, value, low, high)
    return integer(shown, value, low, high)


def many(
    script: str,
    argv_name: str,
    values: object,
    *,
    name: str,
    most: int | None = None,
    hi: int | None = None,
) -> tuple[Any, ...]:
    """``values`` (any iterable but one str or bytes) checked as the repeated ARGV
    ``argv_name`` of ``script``: how many (the manifest's repeat range, or 1..``most``) and each
    one (``arg``, its length up to ``hi`` if given); InvalidArgument naming ``name``."""
    spec = arg_spec(script, argv_name)
    low, high = spec.count or (1, 1)
    high = high if most is None else most
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise _refuse(name, f"an iterable of {low}..{high} items (not one str or bytes)", values)
    values = tuple(values)
    if not low <= len(values) <= high:
        raise InvalidArgument(f"{name} must hold {low}..{high} items, got {len(values)}")
    return tuple(arg(script, argv_name, value, name=f"{name}[{index}]", hi=hi)
                 for index, value in enumerate(values))  # fmt: skip


def request_id(name: str, value: object, new: Any) -> bytes:
    """A queue call's request id: ``new()`` for None, else bytes or str of 0..64 characters of
    ``[0-9A-Za-z_-]`` (the scripts' rule), else InvalidArgument naming ``name``."""
    if value is None:
        return bytes(new())
    raw = arg("queue.ack", "request_id", value, name=name)
    if _REQUEST_ID.fullmatch(raw) is None:
        raise _refuse(name, 'letters, digits, "_" and "-" only', value)
    return bytes(raw)


@functools.cache
def _lease_class() -> type[Lease]:
    from luasched.leases import Lease  # luasched.leases imports this module

    return Lease


def lease(name: str, value: object, queue: bytes) -> Lease:
    """``value`` if it is a ``Lease`` taken from the queue whose task hash is ``queue``, else
    InvalidArgument naming ``name``. A lease built by hand (``queue`` b"") is not checked for
    its queue; its task id and token are checked against the scripts' ranges by the caller."""
    if not isinstance(value, _lease_class()):
        raise _refuse(name, "a Lease", value)
    if value.queue and value.queue != queue:
        raise InvalidArgument(
            f"{name} was taken from another queue ({value.queue!r}), not this one ({queue!r})"
        )
    return value


def client(name: str, value: object) -> None:
    """Refuse a redis-py client that decodes replies (``decode_responses=True``): luasched
    reads bytes (ids, payloads, tokens), and a decoding client would fail after the script ran
    (a task leased to no one). Covers ``redis.Redis``, ``redis.asyncio.Redis``, ``RedisCluster``
    and the asyncio ``RedisCluster`` (all keep the flag on their encoder)."""
    get_encoder = getattr(value, "get_encoder", None)
    if get_encoder is None:
        raise _refuse(name, "a redis-py client (Redis, RedisCluster or their asyncio twins)", value)
    if getattr(get_encoder(), "decode_responses", False):
        raise InvalidArgument(
            f"{name} must be created with decode_responses=False (redis-py's default): "
            "luasched reads ids, payloads and tokens as bytes"
        )
