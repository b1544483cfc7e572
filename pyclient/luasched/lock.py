"""Distributed locks and counting semaphores: ``lock.*`` (lua/lock/), ``s.lock``, ``s.semaphore``.

Every decision (who holds the lock, which waiter is next, how many permits are out, when a hold
lapses) is taken by one script on the server, from the server's clock. This module only draws
random owner tokens and request ids, shapes KEYS/ARGV, reads replies, and waits between attempts:

* **Waiting** never polls in a tight loop: after a refused attempt the caller blocks on a wake
  list (``BLPOP``; the lock's, or a fair waiter's own) for at most ``retry_ms`` (or until the
  hold lapses, if sooner). A release that frees a waited-for lock pushes one signal (to the
  head of a fair queue), so a waiter usually retries at once; the timed retry is the authority
  when a signal is lost (a waiter that died, a signal that expired), so nothing depends on the
  signal arriving.
* **Idempotency**: redis-py may resend a command whose reply was lost; the resent call acts
  once. A non-reentrant lock draws a fresh owner token per ``acquire()``, and that single-use
  token is the idempotency key of its acquire and release (the lock's state keeps the token of
  its last grant; no request record, the scripts' lean path). A reentrant lock (one token for
  many holds) sends a fresh request id per attempt, whose reply the server records for 60 s.
* **Cancellation**: if an attempt is interrupted while its script may have run
  (``KeyboardInterrupt``, a lost connection, an asyncio cancellation), the wrapper replays the
  same attempt (same token / request id: it answers what the first attempt did, or does it now)
  and releases what it got, so an interrupted acquire never leaves a hold or a queue place
  behind (best effort: if the server cannot be reached, the hold lapses at its deadline and the
  place at its own).

The call builders and the loops below (``LockBase``, ``SemaphoreBase`` and ``renew_loop``:
generators of steps, see ``luasched.loops``) are shared by the sync and asyncio wrappers, which
only drive them; they hold no decision.
What a lock guarantees and what it cannot: docs/locks.md.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

from luasched import contract, validate
from luasched.blocking import pass_on_commands
from luasched.contract import BoundKeys
from luasched.errors import InvalidArgument, LockTimeout
from luasched.keys import Namespace, new_request_id, to_bytes
from luasched.loops import Cleanup, Loop, Run, Send, Sleep, Wait, drive
from luasched.scripts import Call, ScriptRunner

H = TypeVar("H")
#: The runner a lock or semaphore sends its calls through (sync or asyncio).
RN = TypeVar("RN")

__all__ = [
    "AcquireResult",
    "ExtendResult",
    "Lock",
    "LockHandle",
    "PermitHandle",
    "PermitResult",
    "ReleaseResult",
    "Semaphore",
    "acquire_call",
    "acquire_deadline",
    "check_options",
    "check_timeout",
    "extend_call",
    "held_token",
    "lock_keys",
    "lock_name",
    "new_request_id",
    "new_token",
    "release_call",
    "semaphore_acquire_call",
    "semaphore_extend_call",
    "semaphore_keys",
    "semaphore_release_call",
    "waiter_wake_key",
]

#: Defaults of ``s.lock`` / ``s.semaphore``.
DEFAULT_TTL_MS = 30_000
DEFAULT_RETRY_MS = 200


def new_token() -> bytes:
    """A fresh owner token: 16 random bytes (os.urandom), hex-encoded."""
    return os.urandom(16).hex().encode()


# ------------------------------------------------------------------------------------------
# Keys and call builders


def lock_keys(namespace: Namespace, name: str | bytes, request_id: bytes) -> tuple[bytes, ...]:
    """The 5 KEYS of every ``lock.acquire/release/extend`` call, in order.

    ``luasched:{ns}:<kind>:<name>`` for the kinds lock, lock-queue, lock-places, lock-wake, and
    ``luasched:{ns}:lock-req:<request_id>:<name>``: the layout of the manifest. The name (any
    bytes) is always the tail after a fixed kind, so two names never share a key.
    """
    return _bound_lock_keys(namespace, to_bytes(name)).with_request(request_id)


#: The scripts whose KEYS layouts the lock and the semaphore scripts share
#: (lua/include/lock_keys.j2, semaphore_keys.j2).
LOCK_SCRIPT = "lock.acquire"
SEMAPHORE_SCRIPT = "lock.semaphore_acquire"


def _bound_lock_keys(namespace: Namespace, name: bytes) -> BoundKeys:
    """The KEYS of the lock ``name``, in the manifest's layout, completed per call."""
    return contract.layout(LOCK_SCRIPT).bind(namespace, name=name)


def waiter_wake_key(namespace: Namespace, name: str | bytes, token: bytes) -> bytes:
    """The own wake list of a fair waiter: ``luasched:{ns}:lock-waiter:<token>:<name>``. No
    script touches it: a release pushes the head's token on the lock's wake list, and a fair
    waiter that pops another token passes it on to that token's own list."""
    return namespace.key("lock-waiter", token, to_bytes(name))


def __getattr__(name: str) -> Any:
    """``LOCK_WAKE_MAX``, ``LOCK_WAKE_TTL_MS``: the bounds of the locks' wake lists, the limits
    wake_max and wake_ttl_ms of lua/include/lock_limits.j2 (``luasched.contract.limit``)."""
    if name in {"LOCK_WAKE_MAX", "LOCK_WAKE_TTL_MS"}:
        return contract.limit("lock", name[len("LOCK_") :].lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def semaphore_keys(namespace: Namespace, name: str | bytes, request_id: bytes) -> tuple[bytes, ...]:
    """The 4 KEYS of every ``lock.semaphore_*`` call: sem, sem-wake, sem-fence,
    sem-req:<request_id> (the manifest's layout)."""
    bound = contract.layout(SEMAPHORE_SCRIPT).bind(namespace, name=to_bytes(name))
    return bound.with_request(request_id)


def _status(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class AcquireResult:
    """The reply of ``lock.acquire`` (see its manifest entry).

    ``status`` is ``"acquired"``, ``"held"`` (someone else holds it for ``wait_ms`` more) or
    ``"queued"`` (fair lock: free, but ``position - 1`` older waiters come first).
    """

    status: str
    fence: int
    deadline_ms: int
    count: int
    wait_ms: int
    position: int
    now_ms: int

    @property
    def acquired(self) -> bool:
        return self.status == "acquired"


@dataclass(frozen=True)
class ReleaseResult:
    """The reply of ``lock.release``: ``"released"`` (``count`` holds left), ``"not_owner"``
    (another owner holds the lock) or ``"expired"`` (nobody holds it: the hold lapsed)."""

    status: str
    count: int
    now_ms: int

    @property
    def released(self) -> bool:
        return self.status == "released"


@dataclass(frozen=True)
class ExtendResult:
    """The reply of ``lock.extend`` / ``lock.semaphore_extend``: ``"extended"`` (new
    ``deadline_ms``), ``"not_owner"`` (locks only) or ``"expired"``."""

    status: str
    deadline_ms: int
    now_ms: int

    @property
    def extended(self) -> bool:
        return self.status == "extended"


@dataclass(frozen=True)
class PermitResult:
    """The reply of ``lock.semaphore_acquire``: ``"acquired"`` or ``"full"`` (then ``wait_ms``
    until the earliest live lease lapses); ``holders`` = live leases; ``fence`` = the permit's
    fencing token (0 when full): larger than every token handed out before for this semaphore
    name, also across a failover (docs/guarantees.md, "Fencing tokens")."""

    status: str
    deadline_ms: int
    holders: int
    wait_ms: int
    now_ms: int
    fence: int

    @property
    def acquired(self) -> bool:
        return self.status == "acquired"


def _acquire_result(reply: Any) -> AcquireResult:
    status, fence, deadline_ms, count, wait_ms, position, now_ms = reply
    return AcquireResult(
        _status(status),
        int(fence),
        int(deadline_ms),
        int(count),
        int(wait_ms),
        int(position),
        int(now_ms),
    )


def _release_result(reply: Any) -> ReleaseResult:
    status, count, now_ms = reply
    return ReleaseResult(_status(status), int(count), int(now_ms))


def _extend_result(reply: Any) -> ExtendResult:
    status, deadline_ms, now_ms = reply
    return ExtendResult(_status(status), int(deadline_ms), int(now_ms))


def _permit_result(reply: Any) -> PermitResult:
    status, deadline_ms, holders, wait_ms, now_ms, fence = reply
    return PermitResult(
        _status(status), int(deadline_ms), int(holders), int(wait_ms), int(now_ms), int(fence)
    )


def acquire_call(
    namespace: Namespace,
    name: str | bytes,
    token: bytes,
    ttl_ms: int,
    *,
    reentrant: bool = False,
    fair: bool = False,
    wait_ttl_ms: int = 0,
    request_id: bytes = b"",
    keys: tuple[bytes, ...] | None = None,
) -> Call[AcquireResult]:
    """The ``lock.acquire`` call (one attempt). ``keys``: ``lock_keys(namespace, name,
    request_id)`` computed once by the caller (a ``Lock`` keeps them), else built here.

    ``request_id=b""`` with ``reentrant=False``: the token is single-use and is the call's own
    idempotency key (a replay answers its grant); reentrant acquires need a request id."""
    args = (token, ttl_ms, 1 if reentrant else 0, 1 if fair else 0, wait_ttl_ms, request_id)
    if keys is None:
        keys = lock_keys(namespace, name, request_id)
    return Call("lock.acquire", keys, args, _acquire_result)


def release_call(
    namespace: Namespace,
    name: str | bytes,
    token: bytes,
    request_id: bytes = b"",
    keys: tuple[bytes, ...] | None = None,
) -> Call[ReleaseResult]:
    """The ``lock.release`` call (also takes the token's place out of a fair queue)."""
    if keys is None:
        keys = lock_keys(namespace, name, request_id)
    return Call("lock.release", keys, (token, request_id), _release_result)


def extend_call(
    namespace: Namespace,
    name: str | bytes,
    token: bytes,
    ttl_ms: int,
    keys: tuple[bytes, ...] | None = None,
) -> Call[ExtendResult]:
    """The ``lock.extend`` call; InvalidArgument naming ``ttl_ms`` out of 1..the longest ttl."""
    if keys is None:
        keys = lock_keys(namespace, name, b"")
    args = (token, validate.arg("lock.extend", "ttl_ms", ttl_ms))
    return Call("lock.extend", keys, args, _extend_result)


def semaphore_acquire_call(
    namespace: Namespace,
    name: str | bytes,
    token: bytes,
    permits: int,
    ttl_ms: int,
    request_id: bytes = b"",
) -> Call[PermitResult]:
    """The ``lock.semaphore_acquire`` call (one attempt)."""
    keys = semaphore_keys(namespace, name, request_id)
    args = (token, permits, ttl_ms, request_id)
    return Call("lock.semaphore_acquire", keys, args, _permit_result)


def semaphore_release_call(
    namespace: Namespace, name: str | bytes, token: bytes, request_id: bytes = b""
) -> Call[ReleaseResult]:
    """The ``lock.semaphore_release`` call (``count`` of the result = live leases left)."""
    keys = semaphore_keys(namespace, name, request_id)
    return Call("lock.semaphore_release", keys, (token, request_id), _release_result)


def semaphore_extend_call(
    namespace: Namespace, name: str | bytes, token: bytes, ttl_ms: int
) -> Call[ExtendResult]:
    """The ``lock.semaphore_extend`` call; InvalidArgument naming ``ttl_ms`` out of range."""
    keys = semaphore_keys(namespace, name, b"")
    args = (token, validate.arg("lock.semaphore_extend", "ttl_ms", ttl_ms))
    return Call("lock.semaphore_extend", keys, args, _extend_result)


class LockKeys:
    """The KEYS of one lock name, built once (a ``Lock`` makes many calls on one name).

    ``attempt()`` is the request id and KEYS of one acquire or release attempt: a fresh request
    id for a reentrant lock (its token serves many holds, so only a request id tells a replay
    from a new acquire), none for the others (the single-use token is the idempotency key, and
    the scripts take their lean path).
    """

    def __init__(self, namespace: Namespace, name: bytes, reentrant: bool) -> None:
        self._namespace = namespace
        self._name = name
        self._reentrant = reentrant
        self._bound = _bound_lock_keys(namespace, name)
        self.plain = self._bound.keys
        #: The lock's wake list (its manifest name ``wake``).
        self.wake = self._bound["wake"]

    def attempt(self) -> tuple[bytes, tuple[bytes, ...]]:
        if not self._reentrant:
            return b"", self.plain
        request_id = new_request_id()
        return request_id, self._bound.with_request(request_id)

    def wake_lists(self, token: bytes, fair: bool) -> tuple[bytes, ...]:
        """Where a waiter blocks: the lock's wake list, and a fair waiter its own list first."""
        if not fair:
            return (self.wake,)
        return (waiter_wake_key(self._namespace, self._name, token), self.wake)

    def pass_on(self, token: bytes, fair: bool, popped: Any) -> bytes | None:
        """The own list of the fair waiter whose token ``popped`` (BLPOP's reply) carries, when a
        fair waiter ``token`` popped another waiter's signal from the lock's wake list; else
        None (its own signal, a plain lock's "1", or nothing)."""
        if not fair or not popped:
            return None
        key, signal = to_bytes(popped[0]), to_bytes(popped[1])
        if key != self.wake or signal in (token, b"1"):
            return None
        return waiter_wake_key(self._namespace, self._name, signal)


# ------------------------------------------------------------------------------------------
# Waiting policy (no decision about the lock: only how long to sleep before the next attempt)


def wait_ms(retry_ms: int, hint_ms: int, deadline: float | None) -> float | None:
    """How long to wait before the next attempt, in ms (> 0), or None if the caller's timeout
    is over. ``hint_ms`` > 0 is when the current hold/lease lapses. The ``BLPOP`` timeout sent
    for it is ``luasched.blocking.block_timeout_s``'s (never below 2 ms)."""
    wait = float(retry_ms)
    if hint_ms > 0:
        wait = min(wait, hint_ms)
    if deadline is not None:
        left = (deadline - time.monotonic()) * 1000.0
        if left <= 0:
            return None
        wait = min(wait, left)
    return wait


def place_ttl_ms(lock: Any, blocking: bool, woken: bool) -> int:
    """The ``wait_ttl_ms`` of one acquire attempt: 0 (take no place) when not blocking, and
    also for a non-fair waiter's attempt right after a wake-up signal: if another caller took
    the lock first, that attempt neither renews the place nor asks the hold's release for a
    signal, so a lock taken again and again by one caller is not slowed by waiters woken to
    lose (they are back on the timed retry, which renews the place long before it lapses:
    ``wait_ttl_ms`` > ``retry_ms``). A fair waiter is only woken at the head of the queue."""
    if not blocking or (woken and not lock.fair):
        return 0
    return int(lock.wait_ttl_ms)


def check_options(ttl_ms: int, retry_ms: int, wait_ttl_ms: int | None, **flags: object) -> int:
    """Validate a lock's or semaphore's options (InvalidArgument naming the first bad one:
    ``ttl_ms`` and ``retry_ms`` 1..the longest ttl, ``wait_ttl_ms`` None or longer than
    ``retry_ms``, ``flags`` bools); the fair queue place ttl (default 5 x retry_ms)."""
    validate.arg("lock.acquire", "ttl_ms", ttl_ms)
    validate.arg("lock.acquire", "ttl_ms", retry_ms, name="retry_ms")
    for flag_name, value in flags.items():
        validate.flag(flag_name, value)
    if wait_ttl_ms is None:
        return 5 * retry_ms
    validate.arg("lock.acquire", "wait_ttl_ms", wait_ttl_ms, lo=retry_ms + 1)
    return wait_ttl_ms


def lock_name(name: object) -> bytes:
    """A lock's or semaphore's name: any bytes or str (UTF-8); InvalidArgument naming ``name``."""
    return validate.key_bytes("name", name, 0, None)


def acquire_deadline(blocking: object, timeout: object) -> float | None:
    """The monotonic deadline of an ``acquire`` (None: no limit), after checking ``blocking``
    (a bool) and ``timeout`` (None or a finite number of seconds >= 0; a negative one is an
    error, not "one attempt"). Before any I/O."""
    validate.flag("blocking", blocking)
    seconds = validate.timeout_s("timeout", timeout)
    return None if seconds is None else time.monotonic() + seconds


def check_timeout(timeout: object) -> float | None:
    """The ``timeout=`` option of a lock or semaphore (what ``with`` / ``async with`` waits, in
    seconds), as given: None (no limit) or a finite int or float >= 0; InvalidArgument naming
    ``timeout`` for a negative, NaN or infinite one, a bool or a str."""
    validate.timeout_s("timeout", timeout)
    return timeout  # type: ignore[return-value]


def held_token(handle: object) -> bytes:
    """The owner token of ``handle`` (a handle ``acquire`` returned, or anything with such a
    ``token``); InvalidArgument naming ``handle`` for anything else."""
    token = getattr(handle, "token", None)
    if not isinstance(token, bytes):
        raise InvalidArgument(f"handle must be a lock or permit handle, got {handle!r}")
    return validate.arg("lock.release", "token", token, name="handle.token")  # type: ignore[no-any-return]


def lock_timeout(script: str, name: bytes, timeout: float | None) -> LockTimeout:
    """The ``LockTimeout`` a context manager raises when ``name`` was not granted in time."""
    return LockTimeout(f"{name!r} not granted within {timeout} s", script=script)


class EnteredHolds:
    """The holds taken by ``with`` / ``async with`` on one Lock or Semaphore object, a stack per
    thread (sync) or per task (asyncio): each exit releases what its own enter took, even when
    several threads or tasks enter one object at once (or a reentrant lock is entered nested).
    ``current`` names the caller (``threading.get_ident``, ``asyncio.current_task``)."""

    def __init__(self, current: Any) -> None:
        self._current = current
        self._guard = threading.Lock()
        self._stacks: dict[Any, list[Any]] = {}

    def enter(self, hold: H | None, script: str, name: bytes, timeout: float | None) -> H:
        """What ``__enter__`` answers: ``hold``, kept for the caller's exit; ``LockTimeout``
        (naming ``script``) if the acquire answered None."""
        if hold is None:
            raise lock_timeout(script, name, timeout)
        with self._guard:
            self._stacks.setdefault(self._current(), []).append(hold)
        return hold

    def pop(self) -> Any:
        """The caller's newest hold (a ``with`` block's exit always follows its enter)."""
        with self._guard:
            who = self._current()
            stack = self._stacks[who]
            hold = stack.pop()
            if not stack:
                del self._stacks[who]
            return hold


# ------------------------------------------------------------------------------------------
# Handles


@dataclass(frozen=True)
class Hold:
    """What a successful acquire got; immutable.

    Attributes:
        name: the lock (or semaphore) name.
        token: the owner token (the proof of ownership the scripts check).
        fence: the fencing token: strictly greater than any earlier grant of this lock (or
            semaphore) name, also across a failover (docs/guarantees.md, "Fencing tokens"). Pass
            it to the protected resource and have it refuse anything older than the newest it
            saw.
        deadline_ms: when the hold lapses, in ms of the server's clock (Unix time), as of the
            acquire (``extend`` and auto-renew move it on the server, not here).
        count: holds of this owner after the acquire (reentrant locks; else 1).
        acquired_ms: the server's clock when it was granted.
    """

    name: bytes
    token: bytes
    fence: int
    deadline_ms: int
    count: int
    acquired_ms: int


@dataclass(frozen=True)
class LockHandle(Hold):
    """A held lock; ``with handle:`` releases it at the end of the block."""

    _owner: Lock = field(repr=False, compare=False, kw_only=True)

    def release(self) -> ReleaseResult:
        """Same as ``lock.release(handle)``."""
        return self._owner.release(self)

    def __enter__(self) -> LockHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._owner.release(self)


@dataclass(frozen=True)
class PermitHandle(Hold):
    """A held semaphore permit; ``with handle:`` gives it back at the end of the block."""

    _owner: Semaphore = field(repr=False, compare=False, kw_only=True)

    def release(self) -> ReleaseResult:
        """Same as ``semaphore.release(handle)``."""
        return self._owner.release(self)

    def __enter__(self) -> PermitHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._owner.release(self)


# ------------------------------------------------------------------------------------------
# The loops (luasched.loops), shared by the sync and asyncio wrappers


def renew_loop(extend: Callable[[int], Call[ExtendResult]], ttl_ms: int) -> Loop[None]:
    """Extend one hold every ttl/3 (``extend(ttl_ms)`` is its extend call); returns when the
    hold is lost: extend answered not_owner/expired, or failed until the hold had lapsed."""
    give_up = time.monotonic() + ttl_ms / 1000.0
    while True:
        yield Sleep(ttl_ms / 3000.0)
        try:
            result: ExtendResult = yield Run(extend(ttl_ms))
        except Exception:
            if time.monotonic() >= give_up:  # the hold has lapsed by now
                return
            continue
        if not result.extended:
            return
        give_up = time.monotonic() + ttl_ms / 1000.0


class LockBase(Generic[RN]):
    """What ``Lock`` and ``AsyncLock`` share: the constructor (options checked before any I/O:
    InvalidArgument naming the option), the KEYS, the call builders and the acquire loop (no
    I/O; each wrapper drives the loop with its own I/O through ``runner``)."""

    def __init__(
        self,
        runner: RN,
        namespace: Namespace,
        name: str | bytes,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        fair: bool = False,
        reentrant: bool = False,
        auto_renew: bool = False,
        retry_ms: int = DEFAULT_RETRY_MS,
        wait_ttl_ms: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self._runner = runner
        self._namespace = namespace
        self.name = lock_name(name)
        self.ttl_ms = ttl_ms
        self.fair = fair
        self.reentrant = reentrant
        self.auto_renew = auto_renew
        self.retry_ms = retry_ms
        self.wait_ttl_ms = check_options(
            ttl_ms, retry_ms, wait_ttl_ms, fair=fair, reentrant=reentrant, auto_renew=auto_renew
        )
        self.timeout = check_timeout(timeout)
        self._token = new_token() if reentrant else None
        self._keys = LockKeys(namespace, self.name, reentrant)
        self.wake_key = self._keys.wake
        self._init_io()

    def _init_io(self) -> None:
        """The wrapper's own state (its renewers, who entered ``with``), set last."""
        raise NotImplementedError

    def _hold(self, token: bytes, result: AcquireResult) -> tuple[bytes, bytes, int, int, int, int]:
        """The ``Hold`` fields of a granted acquire (the handle adds its owner)."""
        return self.name, token, result.fence, result.deadline_ms, result.count, result.now_ms

    def _call(self, token: bytes, wait_ttl_ms: int) -> Call[AcquireResult]:
        request_id, keys = self._keys.attempt()
        return acquire_call(
            self._namespace,
            self.name,
            token,
            self.ttl_ms,
            reentrant=self.reentrant,
            fair=self.fair,
            wait_ttl_ms=wait_ttl_ms,
            request_id=request_id,
            keys=keys,
        )

    def _release_call(self, token: bytes) -> Call[ReleaseResult]:
        request_id, keys = self._keys.attempt()
        return release_call(self._namespace, self.name, token, request_id, keys)

    def _extend_call(self, token: bytes, ttl_ms: int | None = None) -> Call[ExtendResult]:
        return extend_call(
            self._namespace,
            self.name,
            token,
            self.ttl_ms if ttl_ms is None else ttl_ms,
            self._keys.plain,
        )

    def _acquire_loop(
        self, blocking: bool, deadline: float | None
    ) -> Loop[tuple[bytes, AcquireResult] | None]:
        """``acquire``: the owner token and the granted reply, or None (see ``Lock.acquire``).

        An attempt that failed (or was interrupted) while its script may have run is replayed
        and what it got given back; a wait that failed, or a timeout, gives the place back."""
        token = self._token or new_token()
        wake_lists = self._keys.wake_lists(token, self.fair)
        woken = False
        while True:
            call = self._call(token, place_ttl_ms(self, blocking, woken))
            try:
                result: AcquireResult = yield Run(call)
            except BaseException:
                yield Cleanup(self._undo(token, call))
                raise
            if result.acquired:
                return token, result
            pause = wait_ms(self.retry_ms, result.wait_ms, deadline) if blocking else None
            if pause is None:
                if blocking:
                    yield Cleanup(self._leave(token))  # give the waiter's place back
                return None
            try:
                popped = yield Wait(wake_lists, pause)
            except BaseException:
                yield Cleanup(self._leave(token))
                raise
            target = self._keys.pass_on(token, self.fair, popped)
            woken = popped is not None and target is None
            if target is not None:  # another waiter's turn: pass it on, then wait again
                yield Send(
                    pass_on_commands(
                        target,
                        to_bytes(popped[1]),
                        contract.limit("lock", "wake_max"),
                        contract.limit("lock", "wake_ttl_ms"),
                    )
                )

    def _undo(self, token: bytes, call: Call[AcquireResult]) -> Generator[Run, Any, None]:
        """After an interrupted attempt: replay it (same token / request id: answers what it
        did, or does it now), then give back what it got (a hold, or a waiter's place; the
        release never touches another owner's hold). Best effort: else the hold and the place
        lapse by themselves."""
        yield Run(call)
        yield Run(self._release_call(token))

    def _leave(self, token: bytes) -> Generator[Run, Any, None]:
        yield Run(self._release_call(token))  # best effort: else the place lapses by itself


class SemaphoreBase(Generic[RN]):
    """What ``Semaphore`` and ``AsyncSemaphore`` share: the constructor (options checked before
    any I/O), the calls and the acquire loop; each wrapper drives it through ``runner``."""

    def __init__(
        self,
        runner: RN,
        namespace: Namespace,
        name: str | bytes,
        permits: int,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        retry_ms: int = DEFAULT_RETRY_MS,
        timeout: float | None = None,
    ) -> None:
        validate.arg("lock.semaphore_acquire", "permits", permits)
        check_options(ttl_ms, retry_ms, None)
        self._runner = runner
        self._namespace = namespace
        self.name = lock_name(name)
        self.permits = permits
        self.ttl_ms = ttl_ms
        self.retry_ms = retry_ms
        self.timeout = check_timeout(timeout)
        self.wake_key = semaphore_keys(namespace, self.name, b"")[1]
        self._init_io()

    def _init_io(self) -> None:
        """The wrapper's own state (who entered ``with``), set last."""
        raise NotImplementedError

    def _hold(self, token: bytes, result: PermitResult) -> tuple[bytes, bytes, int, int, int, int]:
        """The ``Hold`` fields of a granted permit (its fencing token, one hold)."""
        return self.name, token, result.fence, result.deadline_ms, 1, result.now_ms

    def _release_call(self, token: bytes) -> Call[ReleaseResult]:
        return semaphore_release_call(self._namespace, self.name, token, new_request_id())

    def _extend_call(self, token: bytes, ttl_ms: int | None) -> Call[ExtendResult]:
        return semaphore_extend_call(
            self._namespace, self.name, token, self.ttl_ms if ttl_ms is None else ttl_ms
        )

    def _acquire_loop(
        self, blocking: bool, deadline: float | None
    ) -> Loop[tuple[bytes, PermitResult] | None]:
        """``acquire``: the holder token and the granted reply, or None."""
        token = new_token()
        while True:
            call = semaphore_acquire_call(
                self._namespace, self.name, token, self.permits, self.ttl_ms, new_request_id()
            )
            try:
                result: PermitResult = yield Run(call)
            except BaseException:
                yield Cleanup(self._undo(token, call))
                raise
            if result.acquired:
                return token, result
            pause = wait_ms(self.retry_ms, result.wait_ms, deadline) if blocking else None
            if pause is None:
                return None
            yield Wait((self.wake_key,), pause)

    def _undo(self, token: bytes, call: Call[PermitResult]) -> Generator[Run, Any, None]:
        """Replay an interrupted attempt and give back the permit it got (best effort: else
        the lease lapses by itself)."""
        replayed: PermitResult = yield Run(call)
        if replayed.acquired:
            yield Run(self._release_call(token))


# ------------------------------------------------------------------------------------------
# The sync wrappers


class _Stopped(Exception):
    """A renewer's sleep was interrupted by ``stop()``."""


class _Renewer:
    """Drives ``renew_loop`` for one hold in a daemon thread until stopped or the hold is lost.

    ``stop()`` returns only once the thread has ended, so no extend is sent after it.
    """

    def __init__(
        self, runner: ScriptRunner, extend: Callable[[int], Call[ExtendResult]], ttl_ms: int
    ) -> None:
        self._stopped = threading.Event()
        self.lost = threading.Event()
        loop = renew_loop(extend, ttl_ms)
        self._thread = threading.Thread(
            target=self._run, args=(loop, runner), name="luasched-renew", daemon=True
        )
        self._thread.start()

    def _sleep(self, seconds: float) -> None:
        if self._stopped.wait(seconds):
            raise _Stopped

    def _run(self, loop: Loop[None], runner: ScriptRunner) -> None:
        try:
            drive(loop, runner.run, runner.client, self._sleep)
        except _Stopped:
            return
        self.lost.set()

    def stop(self) -> None:
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()


class Lock(LockBase[ScriptRunner]):
    """A distributed lock named ``name`` in a namespace (``s.lock(name, ...)``).

    Every method is one script call (plus the waiting of ``acquire``), atomic on the server.
    ``reentrant=True``: this Lock object is one owner (one token for its lifetime) that may hold
    the lock several times and must release it as many times; otherwise every ``acquire`` is a
    new owner. ``fair=True``: waiters are granted in arrival order (do not mix fair and non-fair
    Lock objects on one name). ``auto_renew=True``: a daemon thread extends each hold every
    ``ttl_ms / 3`` until it is released or lost.

    ``with lock as handle:`` takes the lock, waiting up to ``timeout`` seconds (None: no limit;
    a negative, NaN or infinite one, a bool or a str raises InvalidArgument when the Lock is
    built), raises ``luasched.LockTimeout`` if it was not granted, and releases it at the end of
    the block; ``acquire()`` answers None instead of raising.
    """

    _renewers: dict[bytes, _Renewer]

    def _init_io(self) -> None:
        self._renewers = {}
        self._guard = threading.Lock()
        self._entered = EnteredHolds(threading.get_ident)

    def __enter__(self) -> LockHandle:
        handle = self.acquire(timeout=self.timeout)
        return self._entered.enter(handle, "lock.acquire", self.name, self.timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release(self._entered.pop())

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> LockHandle | None:
        """Take the lock; the handle, or None if not granted (``blocking=False``: one attempt;
        else at most ``timeout`` seconds, None: no limit; a negative, NaN or infinite timeout
        raises InvalidArgument before any attempt).

        Between attempts it blocks on the lock's wake list (fair: its own) for at most
        ``retry_ms`` (less if the hold lapses sooner); a waiter renews its place
        (``wait_ttl_ms``) at its attempts (see ``place_ttl_ms``) and gives it back when it
        gives up. Raises the client's errors (a hold the failed call may have taken is released
        first, best effort).
        """
        deadline = acquire_deadline(blocking, timeout)  # checked before any I/O
        got = drive(self._acquire_loop(blocking, deadline), self._runner.run, self._runner.client)
        if got is None:
            return None
        token, result = got
        if self.auto_renew:
            with self._guard:
                if token not in self._renewers:
                    extend = functools.partial(self._extend_call, token)
                    self._renewers[token] = _Renewer(self._runner, extend, self.ttl_ms)
        return LockHandle(*self._hold(token, result), _owner=self)

    def release(self, handle: Hold) -> ReleaseResult:
        """Give back one hold of ``handle``; the result says whether it was still held.

        Stops the auto-renew thread (and waits for it) once the last hold is gone. Never
        touches a hold of another owner.
        """
        result = self._runner.run(self._release_call(held_token(handle)))
        if (not result.released or result.count == 0) and self._renewers:
            self._stop_renewer(handle.token)
        return result

    def _stop_renewer(self, token: bytes) -> None:
        with self._guard:
            renewer = self._renewers.pop(token, None)
        if renewer is not None:
            renewer.stop()

    def extend(self, handle: Hold, ttl_ms: int | None = None) -> ExtendResult:
        """Move the hold's deadline to the server's now + ``ttl_ms`` (default: the lock's ttl),
        only while it is still held by ``handle``'s owner."""
        return self._runner.run(self._extend_call(held_token(handle), ttl_ms))

    def renewal_lost(self, handle: Hold) -> bool:
        """Whether auto-renew found the hold lost (extend answered not_owner/expired)."""
        with self._guard:
            renewer = self._renewers.get(handle.token)
        return renewer is not None and renewer.lost.is_set()


class Semaphore(SemaphoreBase[ScriptRunner]):
    """A counting semaphore of ``permits`` permits (``s.semaphore(name, permits, ...)``).

    Each permit has its own lease of ``ttl_ms``: a holder that crashed gives it back when its
    lease lapses. Every ``acquire`` is a new holder. Every caller of one name must use the same
    ``permits``. ``with semaphore as handle:`` takes a permit as ``with lock`` does (waiting up
    to ``timeout``, else ``luasched.LockTimeout``) and gives it back at the end of the block.
    """

    def _init_io(self) -> None:
        self._entered = EnteredHolds(threading.get_ident)

    def __enter__(self) -> PermitHandle:
        handle = self.acquire(timeout=self.timeout)
        return self._entered.enter(handle, "lock.semaphore_acquire", self.name, self.timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release(self._entered.pop())

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> PermitHandle | None:
        """Take a permit; the handle, or None if none was free in time (see ``Lock.acquire``)."""
        deadline = acquire_deadline(blocking, timeout)  # checked before any I/O
        got = drive(self._acquire_loop(blocking, deadline), self._runner.run, self._runner.client)
        if got is None:
            return None
        token, result = got
        return PermitHandle(*self._hold(token, result), _owner=self)

    def release(self, handle: Hold) -> ReleaseResult:
        """Give the permit back (``count`` of the result: live leases left)."""
        return self._runner.run(self._release_call(held_token(handle)))

    def extend(self, handle: Hold, ttl_ms: int | None = None) -> ExtendResult:
        """Move the lease to the server's now + ``ttl_ms`` while it is live."""
        return self._runner.run(self._extend_call(held_token(handle), ttl_ms))
