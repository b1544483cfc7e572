"""The script registry: load scripts where they run, call them with EVALSHA, recover from NOSCRIPT.

Single calls go through redis-py's own ``Script`` objects (EVALSHA; on ``NOSCRIPT`` -- after
``SCRIPT FLUSH``, a restart or a failover -- ``SCRIPT LOAD`` and retry once). On a
``RedisCluster`` the call is routed by its first key and ``SCRIPT LOAD`` reaches every primary.

Batches close the two gaps redis-py leaves:

* a plain pipeline that meets ``NOSCRIPT`` raises it; ``Batch`` instead loads the missing
  scripts and sends again exactly the calls that got ``NOSCRIPT`` (those never ran, so nothing
  runs twice), in their original order. The retried calls run after the rest of the batch: a
  batch is not a transaction, each call is atomic on its own;
* ``ClusterPipeline`` refuses ``EVALSHA``; on a cluster a batch sends ``EVAL`` with the script
  text instead (routed and redirected by redis-py; no ``NOSCRIPT`` possible).

Everything but the I/O lives in module functions shared with ``luasched.asyncio``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError

from luasched.errors import error_from_response
from luasched.render import RenderedScript

__all__ = ["Batch", "Call", "ScriptRunner"]

T = TypeVar("T")
Arg = bytes | str | int | float
SyncClient = redis.Redis | RedisCluster


@dataclass(frozen=True)
class Call(Generic[T]):
    """One script call: which script, its KEYS and ARGV, and how to read its reply."""

    script: str
    keys: tuple[bytes, ...]
    args: tuple[Arg, ...]
    parse: Callable[[Any], T]


def translate(error: BaseException) -> BaseException:
    """The luasched exception for a ``LUASCHED_*`` error reply; any other error as it was."""
    if isinstance(error, ResponseError):
        mapped = error_from_response(error)
        if mapped is not None:
            return mapped
    return error


def command(call: Call[Any], script: RenderedScript, *, by_text: bool) -> tuple[Arg, ...]:
    """The Redis command for ``call``: EVALSHA, or EVAL with the text (``by_text``)."""
    head: tuple[Arg, ...] = ("EVAL", script.text) if by_text else ("EVALSHA", script.sha1)
    return (*head, len(call.keys), *call.keys, *call.args)


def noscript_indexes(replies: Sequence[Any]) -> list[int]:
    """Positions of the replies that are NOSCRIPT errors (those calls did not run)."""
    return [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


def finish(calls: Sequence[Call[Any]], replies: Sequence[Any], raise_on_error: bool) -> list[Any]:
    """Parse each reply with its call; errors become luasched exceptions.

    With ``raise_on_error`` the first error is raised once every reply was read; otherwise
    errors stand in the list in place of their results.
    """
    results: list[Any] = []
    first_error: BaseException | None = None
    for call, reply in zip(calls, replies, strict=True):
        if isinstance(reply, BaseException):
            error = translate(reply)
            first_error = first_error or error
            results.append(error)
        else:
            results.append(call.parse(reply))
    if raise_on_error and first_error is not None:
        raise first_error
    return results


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (sync or asyncio)."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    return isinstance(client, (RedisCluster, AsyncRedisCluster))


class ScriptRunner:
    """Runs luasched scripts on one redis-py client (``Redis`` or ``RedisCluster``).

    Thread-safe as far as the client is. ``run`` is atomic per call (one script execution);
    a reply lost to a connection error may still have been executed: scripts that change state
    take a request id for that reason.
    """

    def __init__(self, client: SyncClient, scripts: Mapping[str, RenderedScript]) -> None:
        self.client = client
        self.scripts = scripts
        self._handles: dict[str, Script] = {}

    def _handle(self, name: str) -> Script:
        handle = self._handles.get(name)
        if handle is None:
            # Bytes, so the SHA1 redis-py computes is ours whatever the client's encoding.
            handle = self.client.register_script(self.scripts[name].text.encode("utf-8"))
            self._handles[name] = handle
        return handle

    def run(self, call: Call[T]) -> T:
        """Run one call: EVALSHA, on NOSCRIPT load and retry once; parse the reply.

        Raises the mapped ``LuaschedError`` for a ``LUASCHED_*`` error reply.
        """
        try:
            reply = self._handle(call.script)(keys=call.keys, args=call.args)
        except ResponseError as error:
            raise translate(error) from None
        return call.parse(reply)

    def load(self) -> dict[str, str]:
        """``SCRIPT LOAD`` every script (on every primary of a cluster); name -> SHA1.

        Raises RuntimeError if a server answers another SHA1 than the manifest's.
        """
        loaded = {}
        for name, script in self.scripts.items():
            sha1 = self.client.script_load(script.text.encode("utf-8"))
            sha1 = sha1.decode() if isinstance(sha1, bytes) else str(sha1)
            if sha1 != script.sha1:
                raise RuntimeError(f"{name}: server answered SHA1 {sha1}, expected {script.sha1}")
            loaded[name] = sha1
        return loaded

    def batch(self) -> Batch:
        """A new, empty batch of calls on this runner's client."""
        return Batch(self)


class Batch:
    """Calls sent together in one pipeline (non-transactional), with NOSCRIPT recovery."""

    def __init__(self, runner: ScriptRunner) -> None:
        self._runner = runner
        self._calls: list[Call[Any]] = []

    def __len__(self) -> int:
        return len(self._calls)

    def run(self, call: Call[T]) -> T:
        """Queue ``call``; its result comes from ``execute``. Returns None (typed as T)."""
        self._calls.append(call)
        return cast(T, None)

    def _send(self, calls: Sequence[Call[Any]]) -> list[Any]:
        client = self._runner.client
        by_text = is_cluster(client)
        pipe = client.pipeline(transaction=False) if not by_text else client.pipeline()
        for call in calls:
            pipe.execute_command(*command(call, self._runner.scripts[call.script], by_text=by_text))
        return list(pipe.execute(raise_on_error=False))

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued call; return their results in order and empty the batch.

        Calls that met NOSCRIPT are retried once after loading their scripts. With
        ``raise_on_error`` the first error is raised after all calls ran; otherwise the
        exceptions stand in the list.
        """
        calls, self._calls = self._calls, []
        if not calls:
            return []
        replies = self._send(calls)
        retry = noscript_indexes(replies)
        if retry:
            for name in sorted({calls[index].script for index in retry}):
                self._runner.client.script_load(self._runner.scripts[name].text.encode("utf-8"))
            for index, reply in zip(
                retry, self._send([calls[index] for index in retry]), strict=True
            ):
                replies[index] = reply
        return finish(calls, replies, raise_on_error)
