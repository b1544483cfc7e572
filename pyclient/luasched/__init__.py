"""luasched: atomic scheduling decisions on Redis, made in server-side Lua scripts.

Start with ``Scheduler(redis_client, namespace)`` (``luasched.asyncio.Scheduler`` for
``redis.asyncio``). Every decision runs as one Lua script on the server, loaded once with
SCRIPT LOAD and called with EVALSHA; ``luasched export DIR`` writes the same scripts and a
manifest for clients in other languages.
"""

__version__ = "0.1.0"

from luasched.errors import (
    ERROR_CODES,
    AllNodesFull,
    CorruptState,
    InvalidArgument,
    LockTimeout,
    LuaschedError,
    NoNode,
    RegistryFull,
    ScanLimitReached,
    StaleLease,
    TooManyNodes,
    UnknownNode,
)
from luasched.keys import Namespace, key_slot
from luasched.lock import Lock, LockHandle, PermitHandle, Semaphore
from luasched.nodes import NodeInfo, NodeList, Removal, SweepResult
from luasched.pick import Picked
from luasched.queue import Enqueued, Lease, Nacked, Queue, QueueStats
from luasched.render import ScriptConfig
from luasched.retry import RetryPolicy
from luasched.scheduler import Scheduler, SchedulerPipeline
from luasched.sharded import PartitionLease, ShardedQueue, ShardedStats
from luasched.slots import Owner, Rebalance

__all__ = [
    "ERROR_CODES",
    "AllNodesFull",
    "CorruptState",
    "Enqueued",
    "InvalidArgument",
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
    "Owner",
    "PartitionLease",
    "PermitHandle",
    "Picked",
    "Queue",
    "QueueStats",
    "Rebalance",
    "RegistryFull",
    "Removal",
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
    "__version__",
    "key_slot",
]
