"""Async twin of ``luasched.worker.Worker``: the same loop (``worker_loop``), driven on asyncio.

Handlers are coroutine functions (``async def handler(job)``), ``concurrency`` of them run as
tasks at once. A lease found lost cancels its handler's task (``asyncio.CancelledError`` inside
the handler), and the runtime never acks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from luasched.scripts import Call
from luasched.worker import (
    Calls,
    Cancel,
    Collect,
    Job,
    Remaining,
    Start,
    Steps,
    Take,
    Withdraw,
    WorkerBase,
    WorkerLoop,
    log,
    remaining,
    runner_groups,
    take_failed,
    withdraw,
)

__all__ = ["Worker", "send_calls_async"]


async def send_calls_async(calls: tuple[tuple[Any, Call[Any]], ...]) -> list[Any]:
    """Run ``calls`` (asyncio runners): one pipeline per runner; each result or exception."""
    results: list[Any] = [None] * len(calls)
    for indexes in runner_groups(calls):
        batch = calls[indexes[0]][0].batch()
        for index in indexes:
            await batch.run(calls[index][1])
        try:
            replies = await batch.execute(raise_on_error=False)
        except Exception as error:  # the whole pipeline failed (connection lost...)
            replies = [error] * len(indexes)
        for index, reply in zip(indexes, replies, strict=True):
            results[index] = reply
    return results


class Worker(WorkerBase):
    """Serve an ``AsyncQueue``, its node queue (``q.for_node(node)``) or an
    ``AsyncShardedQueue`` with ``await handler(job)``; see ``luasched.worker.Worker`` for the
    options, outcomes and guarantees. ``await run()`` serves until ``stop()``."""

    def __init__(
        self, queue: Any, handler: Callable[[Job], Awaitable[Any]], **options: Any
    ) -> None:
        super().__init__(queue, handler, **options)
        self._done: asyncio.Queue[tuple[Job, BaseException | None] | None] | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._loop_of: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None

    def _wake(self) -> None:
        done, loop = self._done, self._loop_of
        if done is None or loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            done.put_nowait(None)
        else:
            loop.call_soon_threadsafe(done.put_nowait, None)

    async def _handle(self, job: Job) -> None:
        """Run the handler on ``job`` once a slot is free (at most ``concurrency`` run); its
        outcome (None or the exception, a cancellation too) always goes to the loop."""
        assert self._done is not None and self._slots is not None
        outcome: BaseException | None = None
        try:
            async with self._slots:
                if not job.lost:  # else given back (or lost) while it waited for a slot
                    job.started = True
                    await self.handler(job)
        except BaseException as error:  # the outcome, whatever it is
            outcome = error
        finally:
            self._tasks.pop(id(job), None)
            self._done.put_nowait((job, outcome))

    async def _collect(self, timeout_s: float) -> list[tuple[Job, BaseException | None]]:
        assert self._done is not None
        pending: list[Any] = []
        with contextlib.suppress(asyncio.TimeoutError):
            pending.append(await asyncio.wait_for(self._done.get(), timeout_s))
        while not self._done.empty():
            pending.append(self._done.get_nowait())
        return [entry for entry in pending if entry is not None]

    async def run(self, *, signals: bool = False) -> bool:
        """Serve until stopped; True after a clean drain (False: leases were given back).

        ``signals``: SIGTERM and SIGINT stop the worker (the second one: now) while it runs
        (``loop.add_signal_handler``; removed at the end)."""
        self._loop_of = asyncio.get_running_loop()
        self._done = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.options.concurrency)
        installed: list[signal.Signals] = []
        if signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._loop_of.add_signal_handler(signum, self.stop)
                installed.append(signum)
        try:
            return await self._drive(self._loop())
        finally:
            for signum in installed:
                self._loop_of.remove_signal_handler(signum)
            for task in list(self._tasks.values()):
                task.cancel()
            log.info("worker stopped: %s", self._stats.line())

    async def _drive(self, loop: WorkerLoop) -> bool:
        steps = Steps(loop)
        for step in steps:
            if isinstance(step, Take):
                try:
                    steps.answer = await self._take(step)
                except Exception as error:  # after the runner's own retries: try again soon
                    await asyncio.sleep(take_failed(error))
                    steps.answer = []
            elif isinstance(step, Calls):
                steps.answer = await send_calls_async(step.calls)
            elif isinstance(step, Start):
                self._tasks[id(step.job)] = asyncio.ensure_future(self._handle(step.job))
            elif isinstance(step, Collect):
                steps.answer = await self._collect(step.timeout_s)
            elif isinstance(step, Cancel):
                task = self._tasks.get(id(step.job))
                if task is not None:
                    task.cancel()
            elif isinstance(step, Withdraw):  # one thread: nothing runs between the two
                steps.answer = withdraw(step.jobs)
            elif isinstance(step, Remaining):
                steps.answer = remaining(await self.queue.stats())
        return steps.result
