"""Async twin of ``luasched.lock``: the same scripts, calls and results, awaited.

Cancellation is safe: a cancelled ``acquire`` never leaves a hold or a fair queue place behind.
If the cancellation hits while the acquire script may have run, a shielded clean-up replays the
same attempt (same token / request id: it answers what the first attempt did, or does it now) and
releases what it got; a cancellation during the wait between attempts leaves the fair queue.
The clean-up runs to its end even if the task is cancelled again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from luasched.asyncio.scripts import AsyncScriptRunner
from luasched.blocking import wait_for_signal_async
from luasched.keys import Namespace, to_bytes
from luasched.lock import (
    DEFAULT_RETRY_MS,
    DEFAULT_TTL_MS,
    AcquireResult,
    EnteredHolds,
    ExtendResult,
    Hold,
    LockKeys,
    PermitResult,
    ReleaseResult,
    acquire_call,
    check_options,
    extend_call,
    lock_timeout,
    new_request_id,
    new_token,
    place_ttl_ms,
    release_call,
    semaphore_acquire_call,
    semaphore_extend_call,
    semaphore_keys,
    semaphore_release_call,
    wait_ms,
)
from luasched.scripts import Call

__all__ = ["AsyncLock", "AsyncLockHandle", "AsyncPermitHandle", "AsyncSemaphore"]


@dataclass(frozen=True)
class AsyncLockHandle(Hold):
    """A held lock; ``async with handle:`` releases it at the end of the block."""

    _owner: AsyncLock = field(repr=False, compare=False, kw_only=True)

    async def release(self) -> ReleaseResult:
        """Same as ``await lock.release(handle)``."""
        return await self._owner.release(self)

    async def __aenter__(self) -> AsyncLockHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._owner.release(self)


@dataclass(frozen=True)
class AsyncPermitHandle(Hold):
    """A held permit; ``async with handle:`` gives it back at the end of the block."""

    _owner: AsyncSemaphore = field(repr=False, compare=False, kw_only=True)

    async def release(self) -> ReleaseResult:
        """Same as ``await semaphore.release(handle)``."""
        return await self._owner.release(self)

    async def __aenter__(self) -> AsyncPermitHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._owner.release(self)


class _AsyncRenewer:
    """Extends one hold every ttl/3 in a task until stopped or the hold is lost."""

    def __init__(self, extend: Any, ttl_ms: int) -> None:
        self._extend = extend
        self._ttl_ms = ttl_ms
        self.lost = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        give_up = time.monotonic() + self._ttl_ms / 1000.0
        while True:
            await asyncio.sleep(self._ttl_ms / 3000.0)
            try:
                result = await self._extend(self._ttl_ms)
            except Exception:
                if time.monotonic() >= give_up:
                    self.lost.set()
                    return
                continue
            if not result.extended:
                self.lost.set()
                return
            give_up = time.monotonic() + self._ttl_ms / 1000.0

    async def stop(self) -> None:
        """Cancel the task and wait for it to end: no extend is sent after this returns."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _cancel_requested() -> bool:
    """Whether the current task was asked to cancel, even if a library swallowed the
    CancelledError (seen with redis-py's blocking reads; Python 3.11+ can tell)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())


async def _shielded(cleanup: Any) -> None:
    """Run ``cleanup`` to its end even if the calling task is cancelled (again) meanwhile."""
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task  # finish the clean-up, then let the cancellation through
        raise


class AsyncLock:
    """Async twin of ``luasched.lock.Lock`` (``s.lock(name, ...)`` on ``luasched.asyncio``).

    ``async with lock as handle:`` takes the lock, waiting up to ``timeout`` seconds (None: no
    limit), raises ``luasched.LockTimeout`` if it was not granted, and releases it at the end.
    """

    def __init__(
        self,
        runner: AsyncScriptRunner,
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
        self.name = to_bytes(name)
        self.ttl_ms = ttl_ms
        self.fair = fair
        self.reentrant = reentrant
        self.auto_renew = auto_renew
        self.retry_ms = retry_ms
        self.wait_ttl_ms = check_options(ttl_ms, retry_ms, wait_ttl_ms)
        self._token = new_token() if reentrant else None
        self._renewers: dict[bytes, _AsyncRenewer] = {}
        self._keys = LockKeys(namespace, self.name, reentrant)
        self.wake_key = self._keys.plain[3]
        self.timeout = timeout
        self._entered = EnteredHolds(asyncio.current_task)

    async def __aenter__(self) -> AsyncLockHandle:
        handle = await self.acquire(timeout=self.timeout)
        if handle is None:
            raise lock_timeout("lock.acquire", self.name, self.timeout)
        self._entered.push(handle)
        return handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.release(self._entered.pop())

    def _release_call(self, token: bytes) -> Call[ReleaseResult]:
        request_id, keys = self._keys.attempt()
        return release_call(self._namespace, self.name, token, request_id, keys)

    async def acquire(
        self, blocking: bool = True, timeout: float | None = None
    ) -> AsyncLockHandle | None:
        """Take the lock; see ``luasched.lock.Lock.acquire``. Safe to cancel."""
        token = self._token or new_token()
        deadline = None if timeout is None else time.monotonic() + timeout
        wake_key = self._keys.wake_key(token, self.fair)
        woken = False
        while True:
            request_id, keys = self._keys.attempt()
            call = acquire_call(
                self._namespace,
                self.name,
                token,
                self.ttl_ms,
                reentrant=self.reentrant,
                fair=self.fair,
                wait_ttl_ms=place_ttl_ms(self, blocking, woken),
                request_id=request_id,
                keys=keys,
            )
            try:
                result = await self._runner.run(call)
            except BaseException:
                await _shielded(self._undo(token, call))
                raise
            if _cancel_requested():
                await _shielded(self._undo(token, call))
                raise asyncio.CancelledError
            if result.acquired:
                return self._handle(token, result)
            pause = wait_ms(self.retry_ms, result.wait_ms, deadline) if blocking else None
            if pause is None:
                if blocking:
                    await _shielded(self._leave(token))
                return None
            try:
                woken = await wait_for_signal_async(self._runner.client, wake_key, pause)
            except BaseException:
                await _shielded(self._leave(token))
                raise
            if _cancel_requested():
                await _shielded(self._leave(token))
                raise asyncio.CancelledError

    def _handle(self, token: bytes, result: AcquireResult) -> AsyncLockHandle:
        if self.auto_renew and token not in self._renewers:

            async def extend(ttl_ms: int) -> ExtendResult:
                return await self._runner.run(
                    extend_call(self._namespace, self.name, token, ttl_ms, self._keys.plain)
                )

            self._renewers[token] = _AsyncRenewer(extend, self.ttl_ms)
        return AsyncLockHandle(
            self.name,
            token,
            result.fence,
            result.deadline_ms,
            result.count,
            result.now_ms,
            _owner=self,
        )

    async def _undo(self, token: bytes, call: Call[AcquireResult]) -> None:
        with contextlib.suppress(Exception):
            await self._runner.run(call)  # answers what the attempt did, or does it now
            await self._runner.run(self._release_call(token))

    async def _leave(self, token: bytes) -> None:
        with contextlib.suppress(Exception):
            await self._runner.run(self._release_call(token))

    async def release(self, handle: Hold) -> ReleaseResult:
        """Give back one hold; see ``luasched.lock.Lock.release``."""
        result = await self._runner.run(self._release_call(handle.token))
        if not result.released or result.count == 0:
            renewer = self._renewers.pop(handle.token, None)
            if renewer is not None:
                await renewer.stop()
        return result

    async def extend(self, handle: Hold, ttl_ms: int | None = None) -> ExtendResult:
        """Move the deadline; see ``luasched.lock.Lock.extend``."""
        return await self._runner.run(
            extend_call(
                self._namespace, self.name, handle.token, ttl_ms or self.ttl_ms, self._keys.plain
            )
        )

    def renewal_lost(self, handle: Hold) -> bool:
        """Whether auto-renew found the hold lost."""
        renewer = self._renewers.get(handle.token)
        return renewer is not None and renewer.lost.is_set()


class AsyncSemaphore:
    """Async twin of ``luasched.lock.Semaphore`` (``async with semaphore as handle:`` as for
    ``AsyncLock``)."""

    def __init__(
        self,
        runner: AsyncScriptRunner,
        namespace: Namespace,
        name: str | bytes,
        permits: int,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        retry_ms: int = DEFAULT_RETRY_MS,
        timeout: float | None = None,
    ) -> None:
        if permits < 1:
            raise ValueError("permits must be at least 1")
        check_options(ttl_ms, retry_ms, None)
        self._runner = runner
        self._namespace = namespace
        self.name = to_bytes(name)
        self.permits = permits
        self.ttl_ms = ttl_ms
        self.retry_ms = retry_ms
        self.wake_key = semaphore_keys(namespace, self.name, b"")[1]
        self.timeout = timeout
        self._entered = EnteredHolds(asyncio.current_task)

    async def __aenter__(self) -> AsyncPermitHandle:
        handle = await self.acquire(timeout=self.timeout)
        if handle is None:
            raise lock_timeout("lock.semaphore_acquire", self.name, self.timeout)
        self._entered.push(handle)
        return handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.release(self._entered.pop())

    async def acquire(
        self, blocking: bool = True, timeout: float | None = None
    ) -> AsyncPermitHandle | None:
        """Take a permit; see ``luasched.lock.Semaphore.acquire``. Safe to cancel."""
        token = new_token()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            call = semaphore_acquire_call(
                self._namespace, self.name, token, self.permits, self.ttl_ms, new_request_id()
            )
            try:
                result = await self._runner.run(call)
            except BaseException:
                await _shielded(self._undo(token, call))
                raise
            if result.acquired:
                return AsyncPermitHandle(
                    self.name, token, 0, result.deadline_ms, 1, result.now_ms, _owner=self
                )
            pause = wait_ms(self.retry_ms, result.wait_ms, deadline) if blocking else None
            if pause is None:
                return None
            await wait_for_signal_async(self._runner.client, self.wake_key, pause)

    async def _undo(self, token: bytes, call: Call[PermitResult]) -> None:
        with contextlib.suppress(Exception):
            if (await self._runner.run(call)).acquired:
                await self._runner.run(
                    semaphore_release_call(self._namespace, self.name, token, new_request_id())
                )

    async def release(self, handle: Hold) -> ReleaseResult:
        """Give the permit back."""
        return await self._runner.run(
            semaphore_release_call(self._namespace, self.name, handle.token, new_request_id())
        )

    async def extend(self, handle: Hold, ttl_ms: int | None = None) -> ExtendResult:
        """Move the lease while it is live."""
        return await self._runner.run(
            semaphore_extend_call(self._namespace, self.name, handle.token, ttl_ms or self.ttl_ms)
        )
