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
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

from luasched.asyncio.scripts import AsyncScriptRunner
from luasched.lock import (
    EnteredHolds,
    ExtendResult,
    Hold,
    LockBase,
    ReleaseResult,
    SemaphoreBase,
    acquire_deadline,
    held_token,
    renew_loop,
)
from luasched.loops import Loop, drive_async
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
    """Drives ``renew_loop`` for one hold in a task until stopped or the hold is lost."""

    def __init__(
        self, runner: AsyncScriptRunner, extend: Callable[[int], Call[ExtendResult]], ttl_ms: int
    ) -> None:
        self.lost = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(runner, extend, ttl_ms))

    async def _run(
        self, runner: AsyncScriptRunner, extend: Callable[[int], Call[ExtendResult]], ttl_ms: int
    ) -> None:
        await drive_async(renew_loop(extend, ttl_ms), runner.run, runner.client)
        self.lost.set()

    async def stop(self) -> None:
        """Cancel the task and wait for it to end: no extend is sent after this returns."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


#: What an acquire loop answers (a token and the granted reply, or None).
G = TypeVar("G")


async def _acquire(runner: AsyncScriptRunner, loop: Loop[G]) -> G:
    """Drive an acquire ``loop`` (a lock's or a semaphore's) on ``runner``, delivering a
    cancellation that redis-py swallowed (``drive_async``'s ``cancel_checks``), so the loop's
    clean-up (giving a fair waiter's place back) runs either way."""
    return await drive_async(loop, runner.run, runner.client, cancel_checks=True)


class AsyncLock(LockBase[AsyncScriptRunner]):
    """Async twin of ``luasched.lock.Lock`` (``s.lock(name, ...)`` on ``luasched.asyncio``).

    ``async with lock as handle:`` takes the lock, waiting up to ``timeout`` seconds (None: no
    limit), raises ``luasched.LockTimeout`` if it was not granted, and releases it at the end.
    """

    _renewers: dict[bytes, _AsyncRenewer]

    def _init_io(self) -> None:
        self._renewers = {}
        self._entered = EnteredHolds(asyncio.current_task)

    async def __aenter__(self) -> AsyncLockHandle:
        handle = await self.acquire(timeout=self.timeout)
        return self._entered.enter(handle, "lock.acquire", self.name, self.timeout)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.release(self._entered.pop())

    async def acquire(
        self, blocking: bool = True, timeout: float | None = None
    ) -> AsyncLockHandle | None:
        """Take the lock; see ``luasched.lock.Lock.acquire``. Safe to cancel."""
        deadline = acquire_deadline(blocking, timeout)  # checked before any I/O
        got = await _acquire(self._runner, self._acquire_loop(blocking, deadline))
        if got is None:
            return None
        token, result = got
        if self.auto_renew and token not in self._renewers:
            extend = functools.partial(self._extend_call, token)
            self._renewers[token] = _AsyncRenewer(self._runner, extend, self.ttl_ms)
        return AsyncLockHandle(*self._hold(token, result), _owner=self)

    async def release(self, handle: Hold) -> ReleaseResult:
        """Give back one hold; see ``luasched.lock.Lock.release``."""
        result = await self._runner.run(self._release_call(held_token(handle)))
        if not result.released or result.count == 0:
            renewer = self._renewers.pop(handle.token, None)
            if renewer is not None:
                await renewer.stop()
        return result

    async def extend(self, handle: Hold, ttl_ms: int | None = None) -> ExtendResult:
        """Move the deadline; see ``luasched.lock.Lock.extend``."""
        return await self._runner.run(self._extend_call(held_token(handle), ttl_ms))

    def renewal_lost(self, handle: Hold) -> bool:
        """Whether auto-renew found the hold lost."""
        renewer = self._renewers.get(handle.token)
        return renewer is not None and renewer.lost.is_set()


class AsyncSemaphore(SemaphoreBase[AsyncScriptRunner]):
    """Async twin of ``luasched.lock.Semaphore`` (``async with semaphore as handle:`` as for
    ``AsyncLock``)."""

    def _init_io(self) -> None:
        self._entered = EnteredHolds(asyncio.current_task)

    async def __aenter__(self) -> AsyncPermitHandle:
        handle = await self.acquire(timeout=self.timeout)
        return self._entered.enter(handle, "lock.semaphore_acquire", self.name, self.timeout)

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
        deadline = acquire_deadline(blocking, timeout)  # checked before any I/O
        got = await _acquire(self._runner, self._acquire_loop(blocking, deadline))
        if got is None:
            return None
        token, result = got
        return AsyncPermitHandle(*self._hold(token, result), _owner=self)

    async def release(self, handle: Hold) -> ReleaseResult:
        """Give the permit back."""
        return await self._runner.run(self._release_call(held_token(handle)))

    async def extend(self, handle: Hold, ttl_ms: int | None = None) -> ExtendResult:
        """Move the lease while it is live."""
        return await self._runner.run(self._extend_call(held_token(handle), ttl_ms))
