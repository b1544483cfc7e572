"""luasched: atomic scheduling decisions on Redis, made in server-side Lua scripts.

Start with ``Scheduler(redis_client, namespace)`` (``luasched.asyncio.Scheduler`` for
``redis.asyncio``). Every decision runs as one Lua script on the server, loaded once with
SCRIPT LOAD and called with EVALSHA; ``luasched export DIR`` writes the same scripts and a
manifest for clients in other languages.
"""

import importlib
from typing import TYPE_CHECKING

from luasched._version import __version__

if TYPE_CHECKING:
    from luasched.errors import (
        ERROR_CODES,
        AllNodesFull,
        CorruptState,
        GroupedQueue,
        InvalidArgument,
        LockTimeout,
        LuaschedError,
        NoNode,
        NotReplicated,
        RegistryFull,
        ScanLimitReached,
        StaleLease,
        TooManyNodes,
        UnknownNode,
    )
    from luasched.keys import Namespace, key_slot
    from luasched.leases import Lease, Nacked
    from luasched.lock import Lock, LockHandle, PermitHandle, Semaphore
    from luasched.nodes import NodeInfo, NodeList, Removal, SweepResult
    from luasched.pick import Picked
    from luasched.queue import Enqueued, Queue, QueueStats
    from luasched.render import ScriptConfig
    from luasched.retry import RetryPolicy
    from luasched.scheduler import Scheduler, SchedulerPipeline
    from luasched.sharded import PartitionLease, ShardedQueue, ShardedStats
    from luasched.slots import Owner, Rebalance
    from luasched.worker import Fail, Job, Retry, Worker, WorkerStats

#: Public name -> the module that defines it, imported on first use (PEP 562): importing
#: ``luasched`` alone (as ``luasched export`` does) loads neither redis nor the wrappers.
_LAZY = {
    "ERROR_CODES": "luasched.errors",
    "AllNodesFull": "luasched.errors",
    "CorruptState": "luasched.errors",
    "GroupedQueue": "luasched.errors",
    "InvalidArgument": "luasched.errors",
    "LockTimeout": "luasched.errors",
    "LuaschedError": "luasched.errors",
    "NoNode": "luasched.errors",
    "NotReplicated": "luasched.errors",
    "RegistryFull": "luasched.errors",
    "ScanLimitReached": "luasched.errors",
    "StaleLease": "luasched.errors",
    "TooManyNodes": "luasched.errors",
    "UnknownNode": "luasched.errors",
    "Namespace": "luasched.keys",
    "key_slot": "luasched.keys",
    "Lock": "luasched.lock",
    "LockHandle": "luasched.lock",
    "PermitHandle": "luasched.lock",
    "Semaphore": "luasched.lock",
    "NodeInfo": "luasched.nodes",
    "NodeList": "luasched.nodes",
    "Removal": "luasched.nodes",
    "SweepResult": "luasched.nodes",
    "Picked": "luasched.pick",
    "Enqueued": "luasched.queue",
    "Lease": "luasched.leases",
    "Nacked": "luasched.leases",
    "Queue": "luasched.queue",
    "QueueStats": "luasched.queue",
    "ScriptConfig": "luasched.render",
    "RetryPolicy": "luasched.retry",
    "Scheduler": "luasched.scheduler",
    "SchedulerPipeline": "luasched.scheduler",
    "PartitionLease": "luasched.sharded",
    "ShardedQueue": "luasched.sharded",
    "ShardedStats": "luasched.sharded",
    "Owner": "luasched.slots",
    "Rebalance": "luasched.slots",
    "Fail": "luasched.worker",
    "Job": "luasched.worker",
    "Retry": "luasched.worker",
    "Worker": "luasched.worker",
    "WorkerStats": "luasched.worker",
}

__all__ = [
    "ERROR_CODES",
    "AllNodesFull",
    "CorruptState",
    "Enqueued",
    "Fail",
    "GroupedQueue",
    "InvalidArgument",
    "Job",
    "Lease",
    "Lock",
    "LockHandle",
    "LockTimeout",
    "LuaschedError",
    "Nacked",
    "Namespace",
    "NoNode",
    "NodeInfo",
    "NodeList",
    "NotReplicated",
    "Owner",
    "PartitionLease",
    "PermitHandle",
    "Picked",
    "Queue",
    "QueueStats",
    "Rebalance",
    "RegistryFull",
    "Removal",
    "Retry",
    "RetryPolicy",
    "ScanLimitReached",
    "Scheduler",
    "SchedulerPipeline",
    "ScriptConfig",
    "Semaphore",
    "ShardedQueue",
    "ShardedStats",
    "StaleLease",
    "SweepResult",
    "TooManyNodes",
    "UnknownNode",
    "Worker",
    "WorkerStats",
    "__version__",
    "key_slot",
]


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (then cached in this module)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'luasched' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
