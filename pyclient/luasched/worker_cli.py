"""``luasched worker MODULE:FUNCTION --queue NAME ...``: a ``Worker`` (or, with ``--asyncio``,
a ``luasched.asyncio.Worker``) as a process.

It logs through ``logging`` (stderr), prints a one-line status every few seconds when stderr is
a terminal and a summary at exit. SIGTERM / SIGINT drain (a second one gives the leases back
now). Exit status: 0 after a clean drain (or a ``--burst`` run that emptied the queue), 1 when
unfinished leases had to be given back or the server failed, 2 for a usage error (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from luasched.render import ScriptConfig
from luasched.validate import DEFAULT_WAIT_TIMEOUT_MS

if TYPE_CHECKING:
    from luasched.cli import Server
    from luasched.worker import WorkerStats

__all__ = ["load_handler", "run_worker", "worker_options"]

#: Seconds between two status lines on a terminal.
STATUS_INTERVAL_S = 5.0


def worker_options(parser: argparse.ArgumentParser) -> None:
    """Add the ``worker`` subcommand's arguments to ``parser``."""
    parser.add_argument("handler", metavar="MODULE:FUNCTION", help="the handler, e.g. tasks:run")
    parser.add_argument("--queue", required=True, help="the queue's name")
    parser.add_argument("--namespace", default="luasched", help="default %(default)s")
    parser.add_argument("--node", help="serve this node's queue (q.for_node(NODE)); joins it")
    parser.add_argument(
        "--partitions", type=int, help="the queue is a sharded queue of this many partitions"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="default %(default)s")
    parser.add_argument("--batch", type=int, help="leases taken per call (default 16)")
    parser.add_argument(
        "--lease-ms", type=int, help="lease length, extended while a task runs (default 30000)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds in-flight tasks get to finish at shutdown (default 30)",
    )
    parser.add_argument("--asyncio", action="store_true", help="the handler is a coroutine")
    parser.add_argument(
        "--burst", action="store_true", help="exit once nothing is ready, delayed or leased"
    )
    parser.add_argument("--worker-id", help="default HOSTNAME-PID")
    parser.add_argument(
        "--wait-replicas",
        type=int,
        default=0,
        help="durable mode: each ack, nack, lease... returns once this many replicas hold it "
        "(WAIT); default 0 (off)",
    )
    parser.add_argument(
        "--wait-timeout-ms",
        type=int,
        default=DEFAULT_WAIT_TIMEOUT_MS,
        help="durable mode: how long one WAIT may block (default %(default)s)",
    )


def load_handler(spec: str, error: Callable[[str], NoReturn]) -> Callable[..., Any]:
    """The function ``MODULE:FUNCTION`` names (the current directory is importable)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        error(f"handler: expected MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as failed:
        error(f"handler: cannot import {module_name!r}: {failed}")
    handler = getattr(module, function_name, None)
    if not callable(handler):
        error(f"handler: {module_name!r} has no function {function_name!r}")
    return handler  # type: ignore[no-any-return]


def _status(stats: WorkerStats) -> None:
    sys.stderr.write("\r\x1b[K" + stats.line())
    sys.stderr.flush()


def _worker_kwargs(options: argparse.Namespace) -> dict[str, Any]:
    """The Worker's options from the command line (an option not given: the Worker's default)."""
    given = {
        "batch": options.batch,
        "lease_ms": options.lease_ms,
        "drain_timeout_s": options.drain_timeout,
    }
    return {
        **{name: value for name, value in given.items() if value is not None},
        "concurrency": options.concurrency,
        "burst": options.burst,
        "worker_id": options.worker_id,
        "status": _status if sys.stderr.isatty() else None,
        "status_interval_s": STATUS_INTERVAL_S,
    }


def _check_options(options: argparse.Namespace, error: Callable[[str], NoReturn]) -> None:
    """Check the Worker's options before connecting (a usage error, status 2)."""
    from luasched.errors import InvalidArgument
    from luasched.ha import durability
    from luasched.worker import (
        DEFAULT_BATCH,
        DEFAULT_DRAIN_TIMEOUT_S,
        DEFAULT_LEASE_MS,
        DEFAULT_NODE_TTL_MS,
        WorkerOptions,
    )

    defaults = {
        "batch": DEFAULT_BATCH,
        "lease_ms": DEFAULT_LEASE_MS,
        "drain_timeout_s": DEFAULT_DRAIN_TIMEOUT_S,
        "node_ttl_ms": DEFAULT_NODE_TTL_MS,
    }
    try:
        WorkerOptions.of(**{**defaults, **_worker_kwargs(options)})
        durability(None, options.wait_replicas, options.wait_timeout_ms)
    except InvalidArgument as failed:
        error(str(failed))


def run_worker(
    options: argparse.Namespace,
    server: Server,
    config: ScriptConfig,
    error: Callable[[str], NoReturn],
) -> int:
    """Run ``luasched worker``; the exit status."""
    import redis

    from luasched.errors import InvalidArgument
    from luasched.worker import log

    handler = load_handler(options.handler, error)
    if options.asyncio and not inspect.iscoroutinefunction(handler):
        error(f"handler: --asyncio needs an async function, {options.handler} is not one")
    if options.partitions is not None and options.node is not None:
        error("--node and --partitions: a node queue is not sharded")
    _check_options(options, error)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if options.asyncio:
            clean, stats = asyncio.run(_run_async(options, server, config, handler))
        else:
            clean, stats = _run_sync(options, server, config, handler)
    except InvalidArgument as failed:
        error(str(failed))
    except redis.RedisError as failed:
        message = " ".join(str(failed).split()) or type(failed).__name__
        print(f"luasched worker: failed: {message}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    log.info("summary: %s (%s)", stats.line(), "clean drain" if clean else "leases given back")
    return 0 if clean else 1


def _durable(options: argparse.Namespace) -> dict[str, Any]:
    """The Scheduler's durable-mode options from the flags (checked by the Scheduler)."""
    return {"wait_replicas": options.wait_replicas, "wait_timeout_ms": options.wait_timeout_ms}


def _run_sync(
    options: argparse.Namespace, server: Server, config: ScriptConfig, handler: Callable[..., Any]
) -> tuple[bool, WorkerStats]:
    from luasched.scheduler import Scheduler
    from luasched.worker import Worker

    client = server.connect()
    try:
        scheduler = Scheduler(client, options.namespace, config=config, **_durable(options))
        if options.partitions is not None:
            queue: Any = scheduler.sharded_queue(options.queue, options.partitions)
        else:
            queue = scheduler.queue(options.queue)
            if options.node is not None:
                queue = queue.for_node(options.node)
        worker = Worker(queue, handler, **_worker_kwargs(options))
        return worker.run(signals=True), worker.stats()
    finally:
        client.close()


async def _run_async(
    options: argparse.Namespace, server: Server, config: ScriptConfig, handler: Callable[..., Any]
) -> tuple[bool, WorkerStats]:
    from luasched.asyncio.scheduler import Scheduler
    from luasched.asyncio.worker import Worker as AsyncWorker

    client: Any = server.connect_async()
    try:
        scheduler = Scheduler(client, options.namespace, config=config, **_durable(options))
        if options.partitions is not None:
            queue: Any = await scheduler.sharded_queue(options.queue, options.partitions)
        else:
            queue = scheduler.queue(options.queue)
            if options.node is not None:
                queue = queue.for_node(options.node)
        worker = AsyncWorker(queue, handler, **_worker_kwargs(options))
        return await worker.run(signals=True), worker.stats()
    finally:
        await client.aclose()
