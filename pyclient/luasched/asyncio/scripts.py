"""Async twin of ``luasched.scripts``: same behaviour, awaited I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from luasched.render import RenderedScript
from luasched.scripts import Call, command, finish, is_cluster, noscript_indexes, translate

__all__ = ["AsyncBatch", "AsyncScriptRunner"]

T = TypeVar("T")
AsyncClient = redis.asyncio.Redis | RedisCluster


class AsyncScriptRunner:
    """Runs luasched scripts on one ``redis.asyncio`` client (``Redis`` or ``RedisCluster``).

    Same guarantees as ``luasched.scripts.ScriptRunner``.
    """

    def __init__(self, client: AsyncClient, scripts: Mapping[str, RenderedScript]) -> None:
        self.client = client
        self.scripts = scripts
        self._handles: dict[str, AsyncScript] = {}

    def _handle(self, name: str) -> AsyncScript:
        handle = self._handles.get(name)
        if handle is None:
            handle = self.client.register_script(self.scripts[name].text.encode("utf-8"))
            self._handles[name] = handle
        return handle

    async def run(self, call: Call[T]) -> T:
        """Run one call: EVALSHA, on NOSCRIPT load and retry once; parse the reply."""
        try:
            reply = await self._handle(call.script)(keys=call.keys, args=call.args)
        except ResponseError as error:
            raise translate(error) from None
        return call.parse(reply)

    async def load(self) -> dict[str, str]:
        """``SCRIPT LOAD`` every script (every primary of a cluster); name -> SHA1."""
        loaded = {}
        for name, script in self.scripts.items():
            sha1 = await self.client.script_load(script.text.encode("utf-8"))
            sha1 = sha1.decode() if isinstance(sha1, bytes) else str(sha1)
            if sha1 != script.sha1:
                raise RuntimeError(f"{name}: server answered SHA1 {sha1}, expected {script.sha1}")
            loaded[name] = sha1
        return loaded

    def batch(self) -> AsyncBatch:
        """A new, empty batch of calls on this runner's client."""
        return AsyncBatch(self)


class AsyncBatch:
    """Async twin of ``luasched.scripts.Batch``."""

    def __init__(self, runner: AsyncScriptRunner) -> None:
        self._runner = runner
        self._calls: list[Call[Any]] = []

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, call: Call[T]) -> T:
        """Queue ``call``; its result comes from ``execute``. Returns None (typed as T)."""
        self._calls.append(call)
        return None  # type: ignore[return-value]

    async def _send(self, calls: Sequence[Call[Any]]) -> list[Any]:
        client = self._runner.client
        by_text = is_cluster(client)
        pipe = client.pipeline(transaction=False) if not by_text else client.pipeline()
        for call in calls:
            pipe.execute_command(*command(call, self._runner.scripts[call.script], by_text=by_text))
        return list(await pipe.execute(raise_on_error=False))

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued call; results in order (see ``luasched.scripts.Batch.execute``)."""
        calls, self._calls = self._calls, []
        if not calls:
            return []
        replies = await self._send(calls)
        retry = noscript_indexes(replies)
        if retry:
            for name in sorted({calls[index].script for index in retry}):
                text = self._runner.scripts[name].text.encode("utf-8")
                await self._runner.client.script_load(text)
            for index, reply in zip(
                retry, await self._send([calls[index] for index in retry]), strict=True
            ):
                replies[index] = reply
        return finish(calls, replies, raise_on_error)
