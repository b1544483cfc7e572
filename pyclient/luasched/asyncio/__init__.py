"""The luasched API on ``redis.asyncio``: the same scripts, calls and results as ``luasched``.

This package holds no logic of its own: call building, reply parsing and NOSCRIPT recovery are
the sync package's functions; only the I/O is awaited.
"""

from luasched.asyncio.lock import AsyncLock, AsyncLockHandle, AsyncPermitHandle, AsyncSemaphore
from luasched.asyncio.scheduler import AsyncSchedulerPipeline, Scheduler
from luasched.asyncio.scripts import AsyncBatch, AsyncScriptRunner
from luasched.asyncio.sharded import AsyncShardedQueue
from luasched.asyncio.worker import Worker
from luasched.validate import preload

# Argument checks read the default scripts' manifest before a call is awaited: load it here, at
# import, so that no coroutine ever waits on it (a custom configuration still renders in a
# worker thread before its first call: AsyncScriptRunner.ready).
preload()

__all__ = [
    "AsyncBatch",
    "AsyncLock",
    "AsyncLockHandle",
    "AsyncPermitHandle",
    "AsyncSchedulerPipeline",
    "AsyncScriptRunner",
    "AsyncSemaphore",
    "AsyncShardedQueue",
    "Scheduler",
    "Worker",
]
