"""Async twin of ``luasched.scripts``: same behaviour, awaited I/O."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from luasched.ha import (
    REDISCOVER_ERRORS,
    Durability,
    asks_for_primary,
    changes_state,
)
from luasched.render import LazyScripts, is_ready
from luasched.scripts import (
    BatchBase,
    Call,
    RunnerBase,
    checked_sha1,
    command,
    noscript_indexes,
    translate,
)

__all__ = ["AsyncBatch", "AsyncScriptRunner"]

T = TypeVar("T")
AsyncClient = redis.asyncio.Redis | RedisCluster


class AsyncScriptRunner(RunnerBase[AsyncClient, AsyncScript]):
    """Runs luasched scripts on one ``redis.asyncio`` client (``Redis`` or ``RedisCluster``).

    Same guarantees as ``luasched.scripts.ScriptRunner``. ``scripts`` may be a ``LazyScripts``:
    every call awaits ``ready()`` first, so the scripts are loaded or rendered in a worker
    thread, never on the event loop.
    """

    #: Whether ``ready`` still has to check the scripts (a ``LazyScripts`` may need loading).
    _pending = True

    async def ready(self) -> None:
        """Make the scripts ready without blocking the event loop: a ``LazyScripts`` not yet
        loaded or rendered in this process is, in a worker thread (``asyncio.to_thread``); once
        per process and configuration (``render_all`` is thread-safe). Then a no-op."""
        if self._pending:
            scripts = self.scripts
            if isinstance(scripts, LazyScripts) and not is_ready(scripts.config):
                await asyncio.to_thread(scripts.resolved)
            self._pending = False

    async def _probe(self) -> None:
        replies: list[Any] = []
        for options in self._targets():
            try:
                command = self.route.probe_command()
                replies.append(await self._execute(*command, **options))
            except redis.RedisError as error:
                replies.append(error)
        self.route.probed(replies)

    async def uses_functions(self) -> bool:
        """Whether single calls go through FCALL now (probes the server(s) once if needed)."""
        await self.ready()
        if self.route.needs_probe():
            await self._probe()
        return bool(self.route.installed)

    async def run(self, call: Call[T]) -> T:
        """Run one call: FCALL if the library is installed, else EVALSHA, on NOSCRIPT load and
        retry once; parse the reply (see ``luasched.scripts.ScriptRunner.run``); sent again on
        a failover's or resharding's errors, as ``self.retry`` says."""
        await self.ready()
        return await self.retry.call_async(lambda: self._attempt(call))

    async def _attempt(self, call: Call[T]) -> T:
        try:
            return await self._run_once(call)
        except Exception as error:
            if self._sentinel is not None and asks_for_primary(error):
                await self.rediscover()
            raise

    async def rediscover(self) -> None:
        """Ask the sentinels for the primary (see ``ScriptRunner.rediscover``)."""
        with contextlib.suppress(*REDISCOVER_ERRORS):
            await self._sentinel.get_master_address()  # type: ignore[union-attr]

    async def _with_wait(self, *command: Any) -> tuple[Any, Any]:
        assert self.durability is not None
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command(*command)
        pipe.execute_command(*self.durability.command)
        reply, acked = await pipe.execute(raise_on_error=False)
        return reply, acked

    async def _run_durable(self, call: Call[T], durability: Durability) -> T:
        script = self.scripts[call.script]
        fcall = self.route.fcall(call) if await self.uses_functions() else None
        if fcall is not None:
            reply, acked = await self._with_wait(*fcall)
            if not (isinstance(reply, ResponseError) and self.route.fall_back(reply)):
                return durability.result(call, script, reply, acked)  # type: ignore[no-any-return]
        evalsha = command(call, script, by_text=False)
        reply, acked = await self._with_wait(*evalsha)
        if isinstance(reply, NoScriptError):  # never ran: load it and send again, once
            await self.client.script_load(script.text.encode("utf-8"))
            reply, acked = await self._with_wait(*evalsha)
        return durability.result(call, script, reply, acked)  # type: ignore[no-any-return]

    async def _run_once(self, call: Call[T]) -> T:
        if self.durability is not None and changes_state(self.scripts[call.script]):
            return await self._run_durable(call, self.durability)
        if await self.uses_functions():
            fcall = self.route.fcall(call)
            if fcall is not None:
                try:
                    return call.parse(await self._execute(*fcall))
                except ResponseError as error:
                    if not self.route.fall_back(error):
                        raise translate(error) from None
        try:
            reply = await self._handle(call.script)(keys=call.keys, args=call.args)
        except ResponseError as error:
            raise translate(error) from None
        return call.parse(reply)

    async def load(self) -> dict[str, str]:
        """``SCRIPT LOAD`` every script (every primary of a cluster); name -> SHA1."""
        await self.ready()
        loaded = {}
        for name, script in self.scripts.items():
            reply = await self.client.script_load(script.text.encode("utf-8"))
            loaded[name] = checked_sha1(name, script, reply)
        return loaded

    async def install_functions(self) -> str:
        """``FUNCTION LOAD REPLACE`` the library on every primary; returns the library name."""
        await self.ready()
        library = self.route.library
        for options in self._targets():
            await self._execute("FUNCTION", "LOAD", "REPLACE", library.text, **options)
        self.route.reset()
        return library.name

    def batch(self) -> AsyncBatch:
        """A new, empty batch of calls on this runner's client (EVALSHA / EVAL, never FCALL)."""
        return AsyncBatch(self)


class AsyncBatch(BatchBase[AsyncScriptRunner]):
    """Async twin of ``luasched.scripts.Batch``."""

    async def run(self, call: Call[T]) -> T:
        """Queue ``call``; its result comes from ``execute``. Returns None (typed as T)."""
        self._calls.append(call)
        return None  # type: ignore[return-value]

    async def _send(self, calls: Sequence[Call[Any]]) -> list[Any]:
        pipe, waited = self._pipeline(calls)
        return self._replies(list(await pipe.execute(raise_on_error=False)), waited)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued call; results in order (see ``luasched.scripts.Batch.execute``)."""
        calls, self._calls = self._calls, []
        if not calls:
            return []
        await self._runner.ready()
        replies = await self._send(calls)
        retry = noscript_indexes(replies)
        if retry:
            for text in self._reload(calls, retry):
                await self._runner.client.script_load(text)
            resent = await self._send([calls[index] for index in retry])
            for index, reply in zip(retry, resent, strict=True):
                replies[index] = reply
        return self._finish(calls, replies, raise_on_error)
