"""The control loops of luasched, written once, and their two drivers (sync and asyncio).

A loop (a lock or semaphore acquire, a blocking take of a queue, a hold's renewer) is a
generator that yields steps and gets each step's answer back:

* ``Run(call)``: run this script call (through the runner: EVALSHA, NOSCRIPT, ``RetryPolicy``);
  the answer is the parsed reply, or the call's exception thrown into the loop;
* ``Wait(keys, wait_ms)``: block on the wake lists ``keys`` for about ``wait_ms``
  (``luasched.blocking``: at least 2 ms, short of the socket timeout, never resent); the
  answer is BLPOP's reply, ``(list, signal)``, or None when no signal came;
* ``Send(commands)``: send these commands in one pipeline, best effort (a wake-up signal passed
  on: a hint, so its errors are swallowed); the answer is None;
* ``Sleep(seconds)``: sleep (a renewer's pace); the answer is None;
* ``Cleanup(loop)``: run this sub-loop of ``Run`` steps to its end, best effort (its errors are
  swallowed), and -- under asyncio -- even if the task is cancelled meanwhile (the cancellation
  is delivered once it is done).
* ``Do(fn, retry)``: call ``fn()`` -- a method of a wrapper (sync or asyncio) or of the client
  -- and, under asyncio, await what it answers; with a ``RetryPolicy``, through it
  (``retry.call`` / ``retry.call_async``). The answer is ``fn``'s, or its exception thrown
  into the loop. The loops built on wrappers (a sharded queue's rotation, reading a sharded
  layout) are written once with it.

The loop's return value is the call's result. ``drive`` runs a loop with blocking I/O;
``drive_async`` awaits the same steps on ``redis.asyncio`` and, if asked, also delivers a
cancellation that redis-py swallowed during a step (it checks ``Task.cancelling()`` after each
step) as a ``CancelledError`` thrown into the loop, so the loop's clean-up runs either way.
The loops decide nothing about locks or tasks (the scripts do); they only say what to call and
how long to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from luasched.blocking import wait_for_signal, wait_for_signal_async
from luasched.scripts import Call

if TYPE_CHECKING:
    from luasched.retry import RetryPolicy

__all__ = [
    "Cleanup",
    "Do",
    "Loop",
    "Run",
    "Send",
    "Sleep",
    "Step",
    "Wait",
    "drive",
    "drive_async",
    "no_calls",
]

R = TypeVar("R")


@dataclass(frozen=True)
class Run:
    """Run one script call; the loop gets its parsed reply (or its exception)."""

    call: Call[Any]


@dataclass(frozen=True)
class Wait:
    """Block on the lists ``keys`` for about ``wait_ms``; the loop gets BLPOP's reply or None."""

    keys: tuple[bytes, ...]
    wait_ms: float


@dataclass(frozen=True)
class Send:
    """Send ``commands`` in one pipeline (no transaction), best effort."""

    commands: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Sleep:
    """Sleep ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Cleanup:
    """Run ``loop`` (``Run`` steps) to its end, best effort, shielded from cancellation."""

    loop: Generator[Run, Any, None]


@dataclass(frozen=True)
class Do:
    """Call ``fn()`` (awaited under asyncio), through ``retry`` if given; answers its answer."""

    fn: Callable[[], Any]
    retry: RetryPolicy | None = None


Step = Run | Wait | Send | Sleep | Cleanup | Do
Loop = Generator[Step, Any, R]


def no_calls(call: Call[Any]) -> NoReturn:
    """The ``run`` to drive a loop with that makes no script call (only ``Do`` steps)."""
    raise TypeError(f"this loop makes no script call, yet it asked for {call.script}")


def drive(
    loop: Loop[R],
    run: Callable[[Call[Any]], Any],
    client: Any,
    sleep: Callable[[float], Any] = time.sleep,
) -> R:
    """Run ``loop`` with blocking I/O: ``run`` sends a call, ``client`` is the redis-py client
    the waits block on, ``sleep`` sleeps (a renewer passes one that its stop interrupts)."""
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = loop.send(answer) if error is None else loop.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        answer, error = None, None
        try:
            if isinstance(step, Run):
                answer = run(step.call)
            elif isinstance(step, Wait):
                answer = wait_for_signal(client, step.keys, step.wait_ms)
            elif isinstance(step, Send):
                with contextlib.suppress(Exception):
                    pipe = client.pipeline(transaction=False)
                    for command in step.commands:
                        pipe.execute_command(*command)
                    pipe.execute()
            elif isinstance(step, Sleep):
                sleep(step.seconds)
            elif isinstance(step, Do):
                answer = step.fn() if step.retry is None else step.retry.call(step.fn)
            else:
                with contextlib.suppress(Exception):
                    drive(step.loop, run, client, sleep)
        except BaseException as failed:  # thrown into the loop, which decides
            error = failed


def _cancel_requested() -> bool:
    """Whether the current task was asked to cancel, even if a library swallowed the
    CancelledError (seen with redis-py's blocking reads; Python 3.11+ can tell)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())


async def _shielded(cleanup: Awaitable[Any]) -> None:
    """Run ``cleanup`` to its end even if the calling task is cancelled (again) meanwhile."""
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task  # finish the clean-up, then let the cancellation through
        raise


AsyncRun = Callable[[Call[Any]], Awaitable[Any]]


async def _quietly(loop: Loop[Any], run: AsyncRun, client: Any) -> None:
    with contextlib.suppress(Exception):
        await drive_async(loop, run, client)


async def drive_async(
    loop: Loop[R], run: AsyncRun, client: Any, *, cancel_checks: bool = False
) -> R:
    """Async twin of ``drive``: ``run`` awaits a call, ``client`` is a ``redis.asyncio`` client.

    ``cancel_checks``: after each step, a cancellation of the task that redis-py swallowed is
    thrown into the loop as a ``CancelledError`` (the lock and semaphore loops then give back
    what the step got); without it, such a step's answer is used as if no cancel came."""
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = loop.send(answer) if error is None else loop.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        answer, error = None, None
        try:
            if isinstance(step, Run):
                answer = await run(step.call)
            elif isinstance(step, Wait):
                answer = await wait_for_signal_async(client, step.keys, step.wait_ms)
            elif isinstance(step, Send):
                with contextlib.suppress(Exception):
                    pipe = client.pipeline(transaction=False)
                    for command in step.commands:
                        pipe.execute_command(*command)
                    await pipe.execute()
            elif isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Do):
                retry = step.retry
                answer = await (step.fn() if retry is None else retry.call_async(step.fn))
            else:
                await _shielded(_quietly(step.loop, run, client))
                continue  # a clean-up is not interrupted by a cancellation it already met
            if cancel_checks and _cancel_requested():
                raise asyncio.CancelledError
        except BaseException as failed:  # thrown into the loop, which decides
            error = failed
