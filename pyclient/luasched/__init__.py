"""luasched: atomic scheduling decisions on Redis, made in server-side Lua scripts.

Start with ``Scheduler(redis_client, namespace)`` (``luasched.asyncio.Scheduler`` for
``redis.asyncio``). Every decision runs as one Lua script on the server, loaded once with
SCRIPT LOAD and called with EVALSHA; ``luasched export DIR`` writes the same scripts and a
manifest for clients in other languages.
"""

__version__ = "0.1.0"

from luasched.errors import ERROR_CODES, InvalidArgument, LuaschedError
from luasched.keys import Namespace, key_slot
from luasched.render import ScriptConfig
from luasched.scheduler import Scheduler, SchedulerPipeline

__all__ = [
    "ERROR_CODES",
    "InvalidArgument",
    "LuaschedError",
    "Namespace",
    "Scheduler",
    "SchedulerPipeline",
    "ScriptConfig",
    "__version__",
    "key_slot",
]
