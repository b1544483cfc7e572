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

Redis Functions (7.0+ / Valkey): when the luasched library (``luasched install-functions``) is
installed on the node(s), single calls go through ``FCALL`` (``FCALL_RO`` for ``no-writes``
scripts) instead of ``EVALSHA``. A function's body is the script's text unchanged, so replies and
effects are the same. ``FunctionsRoute`` decides which path a call takes:

* ``use_functions=None`` (auto): once per runner, ``FCALL_RO luasched_library_digest_v<version> 0``
  on every primary (the library's own digest function: a 40-byte answer); FCALL only if every
  primary answers exactly this runner's library digest (a library of another luasched version
  or configuration is never used). Any error (6.2 has no FCALL; no such function; an ACL that
  refuses it) means EVALSHA.
* ``use_functions=True``: FCALL without probing; ``False``: always EVALSHA (the 6.2 behaviour).
* An FCALL answered ``Function not found`` (``FUNCTION FLUSH``, a new primary) never ran: the
  call is sent again with EVALSHA and the cached answer is forgotten (the next call probes again).

Batches (pipelines) keep EVALSHA / EVAL with the text: a pipeline cannot fall back call by call.

Everything but the I/O lives in module functions shared with ``luasched.asyncio``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import redis
from redis.cluster import RedisCluster
from redis.commands.core import AsyncScript, Script
from redis.exceptions import NoScriptError, ResponseError

from luasched.errors import error_from_response
from luasched.ha import (
    REDISCOVER_ERRORS,
    Durability,
    asks_for_primary,
    changes_state,
    sentinel_pool,
)
from luasched.render import FunctionsLibrary, RenderedScript, library_of
from luasched.retry import NoReplicasError, RetryPolicy, no_replicas

if TYPE_CHECKING:
    from luasched.asyncio.scripts import AsyncClient, AsyncScriptRunner

__all__ = ["Batch", "Call", "FunctionsRoute", "Runner", "ScriptRunner"]

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


class Runner(Protocol):
    """Something that runs a call: a ``ScriptRunner``, or a ``Batch`` that queues it (what
    every sync wrapper -- ``Queue``, ``Slots``, ``Nodes``... -- runs its calls through)."""

    def run(self, call: Call[T]) -> T: ...


def translate(error: BaseException) -> BaseException:
    """The luasched exception for a ``LUASCHED_*`` error reply, ``NoReplicasError`` for a
    ``NOREPLICAS`` reply; any other error as it was."""
    if isinstance(error, ResponseError):
        mapped = error_from_response(error)
        if mapped is not None:
            return mapped
        if no_replicas(error) and not isinstance(error, NoReplicasError):
            return NoReplicasError(*error.args)
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


def wait_after(
    calls: Sequence[Call[Any]],
    scripts: Mapping[str, RenderedScript],
    durability: Durability | None,
) -> Durability | None:
    """``durability`` when a batch of ``calls`` needs a closing ``WAIT`` (one of them can
    change state), else None."""
    if durability is None:
        return None
    if any(changes_state(scripts[call.script]) for call in calls):
        return durability
    return None


def fcall_command(call: Call[Any], library: FunctionsLibrary) -> tuple[Arg, ...]:
    """The FCALL (FCALL_RO for a ``no-writes`` script) command for ``call``."""
    head = "FCALL_RO" if library.read_only[call.script] else "FCALL"
    return (head, library.functions[call.script], len(call.keys), *call.keys, *call.args)


def function_missing(error: BaseException) -> bool:
    """Whether an FCALL error says the function is not there (the call did not run)."""
    return isinstance(error, ResponseError) and str(error).startswith("Function not found")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def library_installed(reply: Any, library: FunctionsLibrary) -> bool:
    """Whether a ``FUNCTION LIST LIBRARYNAME <name> WITHCODE`` reply holds ``library`` exactly.

    redis-py answers a list of dicts (RESP2 gives flat lists: both are read). A library of the
    same name with any other text (another version, configuration or an edited copy) is not it.
    """
    if not isinstance(reply, list):
        return False
    for entry in reply:
        if isinstance(entry, list):
            entry = dict(zip(entry[::2], entry[1::2], strict=False))
        if not isinstance(entry, dict):
            continue
        fields = {_text(key): value for key, value in entry.items()}
        if _text(fields.get("library_name")) == library.name:
            return _text(fields.get("library_code")) == library.text
    return False


class FunctionsRoute:
    """Which path single calls take, FCALL or EVALSHA: the decision, without I/O.

    Shared by the sync and asyncio runners, which do the I/O it asks for: ``needs_probe`` ->
    send ``probe_command`` to every primary and pass the replies (or exceptions) to ``probed``;
    then ``fcall(call)`` is the FCALL command to send, or None for EVALSHA; after an FCALL error,
    ``fall_back(error)`` says whether to send the call again with EVALSHA (it also forgets).
    """

    def __init__(self, scripts: Mapping[str, RenderedScript], use_functions: bool | None) -> None:
        self._scripts = scripts
        self.use_functions = use_functions
        self._library: FunctionsLibrary | None = None
        #: None: not known yet; True/False: the library is (not) installed on every primary.
        self.installed: bool | None = None if use_functions is None else use_functions

    @property
    def library(self) -> FunctionsLibrary:
        """The library of this runner's scripts (rendered on first use)."""
        if self._library is None:
            self._library = library_of(self._scripts)
        return self._library

    def needs_probe(self) -> bool:
        return self.installed is None

    def probe_command(self) -> tuple[str, ...]:
        """``FCALL_RO <digest function> 0``: a 40-byte answer, whatever the library's size."""
        return ("FCALL_RO", self.library.digest_function, "0")

    def probed(self, replies: Sequence[Any]) -> None:
        """Record the probe replies of every primary (an exception stands for an error: no
        FCALL on 6.2, no such function, or refused by an ACL)."""
        self.installed = bool(replies) and all(
            not isinstance(reply, BaseException) and _text(reply) == self.library.digest
            for reply in replies
        )

    def fcall(self, call: Call[Any]) -> tuple[Arg, ...] | None:
        """The FCALL command for ``call``, or None to use EVALSHA."""
        if not self.installed:
            return None
        return fcall_command(call, self.library)

    def fall_back(self, error: BaseException) -> bool:
        """After an FCALL error: True (and forget what was detected) if the function is gone."""
        if not function_missing(error):
            return False
        if self.use_functions is None:
            self.installed = None
        return True

    def reset(self) -> None:
        """Forget what was detected (after installing or removing the library)."""
        if self.use_functions is None:
            self.installed = None


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (sync or asyncio)."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    return isinstance(client, (RedisCluster, AsyncRedisCluster))


C = TypeVar("C", bound="SyncClient | AsyncClient")
H = TypeVar("H", bound="Script | AsyncScript")


def checked_sha1(name: str, script: RenderedScript, reply: Any) -> str:
    """The SHA1 a ``SCRIPT LOAD`` of ``script`` answered; RuntimeError if it is not the
    manifest's."""
    sha1 = reply.decode() if isinstance(reply, bytes) else str(reply)
    if sha1 != script.sha1:
        raise RuntimeError(f"{name}: server answered SHA1 {sha1}, expected {script.sha1}")
    return sha1


class RunnerBase(Generic[C, H]):
    """What ``ScriptRunner`` and ``AsyncScriptRunner`` share: the client, the scripts, the
    redis-py ``Script`` handles, the FCALL route, the retry policy and the primaries to address
    (no I/O here; each runner sends, or awaits, what these give)."""

    def __init__(
        self,
        client: C,
        scripts: Mapping[str, RenderedScript],
        *,
        use_functions: bool | None = None,
        retry: RetryPolicy | None = None,
        durability: Durability | None = None,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self._handles: dict[str, H] = {}
        self.route = FunctionsRoute(scripts, use_functions)
        self.retry = retry or RetryPolicy()
        self.durability = durability
        self._sentinel = sentinel_pool(client)

    def _handle(self, name: str) -> H:
        handle = self._handles.get(name)
        if handle is None:
            # Bytes, so the SHA1 redis-py computes is ours whatever the client's encoding.
            text = self.scripts[name].text.encode("utf-8")
            handle = self._handles[name] = cast(H, self.client.register_script(text))
        return handle

    def _targets(self) -> list[dict[str, Any]]:
        """The options that address each primary (one empty set of options off a cluster)."""
        client: Any = self.client  # redis-py's cluster methods are untyped
        if not is_cluster(client):
            return [{}]
        return [{"target_nodes": node} for node in client.get_primaries()]

    def _execute(self, *command: Arg, **options: Any) -> Any:
        """``execute_command`` (awaitable on an asyncio client)."""
        client: Any = self.client
        return client.execute_command(*command, **options)


class ScriptRunner(RunnerBase[SyncClient, Script]):
    """Runs luasched scripts on one redis-py client (``Redis`` or ``RedisCluster``).

    Thread-safe as far as the client is. ``run`` is atomic per call (one script execution);
    a reply lost to a connection error may still have been executed: scripts that change state
    take a request id for that reason. ``retry`` (default ``RetryPolicy()``) sends a call again,
    bounded and with backoff, on the errors of a failover or resharding (``luasched.retry``).
    ``durability`` (durable mode, ``luasched.ha``): a ``WAIT`` follows every call that can
    change state in the same round trip. On a Sentinel-managed client, an error that says the
    primary moved makes the runner ask the sentinels before the call is sent again.
    """

    def _probe(self) -> None:
        replies: list[Any] = []
        for options in self._targets():
            try:
                replies.append(self._execute(*self.route.probe_command(), **options))
            except redis.RedisError as error:
                replies.append(error)
        self.route.probed(replies)

    def uses_functions(self) -> bool:
        """Whether single calls go through FCALL now (probes the server(s) once if needed)."""
        if self.route.needs_probe():
            self._probe()
        return bool(self.route.installed)

    def run(self, call: Call[T]) -> T:
        """Run one call: FCALL if the library is installed (see ``FunctionsRoute``), else
        EVALSHA, on NOSCRIPT load and retry once; parse the reply. The same call is sent again
        on a failover's or resharding's errors, as ``self.retry`` says.

        Raises the mapped ``LuaschedError`` for a ``LUASCHED_*`` error reply; in durable mode
        ``NotReplicated`` once the policy's resends ran out.
        """
        return self.retry.call(lambda: self._attempt(call))

    def _attempt(self, call: Call[T]) -> T:
        try:
            return self._run_once(call)
        except Exception as error:
            if self._sentinel is not None and asks_for_primary(error):
                self.rediscover()
            raise

    def rediscover(self) -> None:
        """Ask the sentinels for the primary; when it moved, the pool drops its connections
        to the old one (idle ones now, busy ones when released). Errors are left to the call."""
        with contextlib.suppress(*REDISCOVER_ERRORS):
            self._sentinel.get_master_address()  # type: ignore[union-attr]

    def _with_wait(self, *command: Arg) -> tuple[Any, Any]:
        """``command`` then ``WAIT`` in one pipeline: (its reply, WAIT's reply), errors as
        values."""
        assert self.durability is not None
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command(*command)
        pipe.execute_command(*self.durability.command)
        reply, acked = pipe.execute(raise_on_error=False)
        return reply, acked

    def _run_durable(self, call: Call[T], durability: Durability) -> T:
        script = self.scripts[call.script]
        fcall = self.route.fcall(call) if self.uses_functions() else None
        if fcall is not None:
            reply, acked = self._with_wait(*fcall)
            if not (isinstance(reply, ResponseError) and self.route.fall_back(reply)):
                return cast(T, durability.result(call, script, reply, acked))
        evalsha = command(call, script, by_text=False)
        reply, acked = self._with_wait(*evalsha)
        if isinstance(reply, NoScriptError):  # never ran: load it and send again, once
            self.client.script_load(script.text.encode("utf-8"))
            reply, acked = self._with_wait(*evalsha)
        return cast(T, durability.result(call, script, reply, acked))

    def _run_once(self, call: Call[T]) -> T:
        if self.durability is not None and changes_state(self.scripts[call.script]):
            return self._run_durable(call, self.durability)
        if self.uses_functions():
            fcall = self.route.fcall(call)
            if fcall is not None:
                try:
                    return call.parse(self._execute(*fcall))
                except ResponseError as error:
                    if not self.route.fall_back(error):
                        raise translate(error) from None
        try:
            reply = self._handle(call.script)(keys=call.keys, args=call.args)
        except ResponseError as error:
            raise translate(error) from None
        return call.parse(reply)

    def load(self) -> dict[str, str]:
        """``SCRIPT LOAD`` every script (on every primary of a cluster); name -> SHA1.

        Raises RuntimeError if a server answers another SHA1 than the manifest's.
        """
        return {
            name: checked_sha1(name, script, self.client.script_load(script.text.encode("utf-8")))
            for name, script in self.scripts.items()
        }

    def install_functions(self) -> str:
        """``FUNCTION LOAD REPLACE`` the library on every primary; returns the library name.

        Functions are persisted (RDB/AOF) and replicated, unlike ``SCRIPT LOAD``. Redis 7.0+.
        """
        library = self.route.library
        for options in self._targets():
            self._execute("FUNCTION", "LOAD", "REPLACE", library.text, **options)
        self.route.reset()
        return library.name

    def batch(self) -> Batch:
        """A new, empty batch of calls on this runner's client (EVALSHA / EVAL, never FCALL)."""
        return Batch(self)


R = TypeVar("R", bound="ScriptRunner | AsyncScriptRunner")


class BatchBase(Generic[R]):
    """What ``Batch`` and ``AsyncBatch`` share: the queued calls, the pipeline that sends them
    (EVALSHA; EVAL with the text on a cluster) and what a NOSCRIPT retry loads."""

    def __init__(self, runner: R) -> None:
        self._runner = runner
        self._calls: list[Call[Any]] = []
        self._acked: Any = None  # the last WAIT's reply (durable mode)

    def __len__(self) -> int:
        return len(self._calls)

    def _pipeline(self, calls: Sequence[Call[Any]]) -> tuple[Any, bool]:
        """A pipeline (no transaction) holding ``calls``, not sent yet, and whether a ``WAIT``
        closes it (durable mode, when one of the calls can change state)."""
        client: Any = self._runner.client
        by_text = is_cluster(client)
        pipe = client.pipeline(transaction=False) if not by_text else client.pipeline()
        for call in calls:
            pipe.execute_command(*command(call, self._runner.scripts[call.script], by_text=by_text))
        waits = wait_after(calls, self._runner.scripts, self._runner.durability)
        if waits is not None:
            pipe.execute_command(*waits.command)
        return pipe, waits is not None

    def _replies(self, replies: list[Any], waited: bool) -> list[Any]:
        """The calls' replies of a sent ``_pipeline``; the closing ``WAIT``'s goes to
        ``_acked``."""
        if waited:
            self._acked = replies.pop()
        return replies

    def _finish(
        self, calls: Sequence[Call[Any]], replies: list[Any], raise_on_error: bool
    ) -> list[Any]:
        """The batch's results (``finish``); in durable mode, when the closing ``WAIT`` fell
        short, each state-changing call's result is a ``NotReplicated``."""
        durability = wait_after(calls, self._runner.scripts, self._runner.durability)
        if durability is not None:
            replies = durability.mark(calls, self._runner.scripts, replies, self._acked)
        return finish(calls, replies, raise_on_error)

    def _reload(self, calls: Sequence[Call[Any]], retry: Sequence[int]) -> list[bytes]:
        """The texts to ``SCRIPT LOAD`` before the calls at ``retry`` (they met NOSCRIPT) are
        sent again: each script once, in name order."""
        names = sorted({calls[index].script for index in retry})
        return [self._runner.scripts[name].text.encode("utf-8") for name in names]


class Batch(BatchBase[ScriptRunner]):
    """Calls sent together in one pipeline (non-transactional), with NOSCRIPT recovery."""

    def run(self, call: Call[T]) -> T:
        """Queue ``call``; its result comes from ``execute``. Returns None (typed as T)."""
        self._calls.append(call)
        return cast(T, None)

    def _send(self, calls: Sequence[Call[Any]]) -> list[Any]:
        pipe, waited = self._pipeline(calls)
        return self._replies(list(pipe.execute(raise_on_error=False)), waited)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued call; return their results in order and empty the batch.

        Calls that met NOSCRIPT are retried once after loading their scripts. With
        ``raise_on_error`` the first error is raised after all calls ran; otherwise the
        exceptions stand in the list. Durable mode: one ``WAIT`` ends the pipeline (after the
        resent calls too); when it falls short, each state-changing call's result is a
        ``NotReplicated`` (not resent here: a batch has no retry policy).
        """
        calls, self._calls = self._calls, []
        if not calls:
            return []
        replies = self._send(calls)
        retry = noscript_indexes(replies)
        if retry:
            for text in self._reload(calls, retry):
                self._runner.client.script_load(text)
            resent = self._send([calls[index] for index in retry])
            for index, reply in zip(retry, resent, strict=True):
                replies[index] = reply
        return self._finish(calls, replies, raise_on_error)
