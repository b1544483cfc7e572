"""The ``luasched`` command: the scripts for other languages, the Functions library, a
namespace's least-privilege ACL, what is in a namespace now, and a queue's worker.

Conventions, the same for every subcommand:

* a subcommand that talks to a server takes ``--url URL``, defaulting to ``$REDIS_URL``; with
  neither it is a usage error (no server is guessed);
* a usage error (bad argument, bad URL, unwritable export directory...) is one line on stderr,
  ``luasched <subcommand>: error: <what>``, and exit status 2; a server that fails or cannot be
  reached is one line too, exit status 1; success is 0. No traceback for any of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from luasched._version import __version__
from luasched.keys import Namespace
from luasched.render import (
    ScriptConfig,
    export,
    functions_library,
    manifest,
    reference_markdown,
    render_all,
)
from luasched.stats import DEFAULT_MAX_SCAN
from luasched.worker_cli import run_worker, worker_options

__all__ = ["main"]

#: The environment variable a server subcommand reads when ``--url`` is not given.
URL_VARIABLE = "REDIS_URL"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> tuple[_Parser, dict[str, _Parser]]:
    """The top-level parser and each subcommand's parser by name."""
    parser = _Parser(
        prog="luasched",
        description=(
            "Atomic scheduling on Redis: export the luasched Lua scripts for other languages, "
            "install them as a Redis Functions library, print a namespace's least-privilege ACL "
            "and report what a namespace holds. Subcommands that talk to a server take --url "
            f"(default: ${URL_VARIABLE})."
        ),
    )
    parser.add_argument("--version", action="version", version=f"luasched {__version__}")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=ScriptConfig.max_batch,
        help="most items one call may carry (default %(default)s)",
    )
    parser.add_argument(
        "--max-key-bytes",
        type=int,
        default=ScriptConfig.max_key_bytes,
        help="longest key slots.keyslot hashes (default %(default)s)",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    parsers: dict[str, _Parser] = {}

    def add(name: str, summary: str) -> _Parser:
        sub = commands.add_parser(name, help=summary, description=summary)
        parsers[name] = sub
        return sub

    add(
        "export", "write every script as NAME.lua, the Functions library and manifest.json into DIR"
    ).add_argument("directory", metavar="DIR", help="created if missing")
    add("render", "print one rendered script").add_argument(
        "name", metavar="NAME", help="a script name, e.g. slots.keyslot"
    )
    add("list", "list the scripts with their SHA1 and summary")
    add("manifest", "print manifest.json")
    add("reference", "print the script reference (docs/scripts.md)")
    add("functions", "print the Redis Functions library (Redis 7.0+ / Valkey)")
    install = add(
        "install-functions",
        "FUNCTION LOAD REPLACE the library on the server (every primary of a cluster)",
    )
    _add_url(install)
    acl = add(
        "acl",
        "print the ACL SETUSER line of a least-privileged user of NAMESPACE (needs no server)",
    )
    acl.add_argument("namespace", metavar="NAMESPACE")
    acl.add_argument("--user", help="the ACL user name (default: luasched-NAMESPACE)")
    acl.add_argument(
        "--functions",
        action="store_true",
        help="also allow FCALL/FCALL_RO, for the Functions library (Redis 7.0+)",
    )
    acl.add_argument(
        "--cluster",
        action="store_true",
        help="also allow what a Redis Cluster client needs (slot map, batches as EVAL)",
    )
    stats = add(
        "stats",
        "what is in a namespace now: nodes, slots, queues, locks (read-only, bounded SCAN)",
    )
    stats.add_argument("namespace", metavar="NAMESPACE")
    _add_url(stats)
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument(
        "--max-scan",
        type=int,
        default=DEFAULT_MAX_SCAN,
        help="examine at most this many keys with SCAN (default %(default)s)",
    )
    worker = add(
        "worker",
        "serve a queue with a handler (MODULE:FUNCTION) until SIGTERM/SIGINT, or with --burst "
        "until the queue is empty; exit status 0 after a clean drain",
    )
    worker_options(worker)
    _add_url(worker)
    return parser, parsers


def _add_url(parser: _Parser) -> None:
    parser.add_argument(
        "--url",
        help=f"the server, e.g. redis://127.0.0.1:6379/0 (default: ${URL_VARIABLE})",
    )
    parser.add_argument(
        "--sentinel",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="instead of --url: the sentinels to ask for the primary of --service",
    )
    parser.add_argument("--service", help="the service name the sentinels monitor (--sentinel)")


@dataclass(frozen=True)
class Server:
    """Where a server subcommand connects: the server at ``url``, or the primary the
    ``sentinels`` name ``service``."""

    url: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""

    def connect(self) -> Any:
        """A sync client (see ``connect``); close it yourself."""
        if self.sentinels:
            from luasched.ha import sentinel_client  # imports redis: not for `export`

            return sentinel_client(list(self.sentinels), self.service, None, None, asyncio=False)
        return connect(self.url)

    def connect_async(self) -> Any:
        """A ``redis.asyncio`` client of the same server (``RedisCluster`` for a cluster node:
        asks the server once, synchronously); close it yourself."""
        if self.sentinels:
            from luasched.ha import sentinel_client  # imports redis: not for `export`

            return sentinel_client(list(self.sentinels), self.service, None, None, asyncio=True)
        import redis.asyncio
        import redis.asyncio.cluster

        from luasched.scripts import is_cluster

        probe = connect(self.url)
        cluster = is_cluster(probe)
        probe.close()
        if cluster:
            return redis.asyncio.cluster.RedisCluster.from_url(self.url)
        return redis.asyncio.Redis.from_url(self.url)


def _sentinels(raw: str, parser: _Parser) -> tuple[tuple[str, int], ...]:
    """``HOST:PORT[,HOST:PORT...]`` -> ((host, port), ...); exits with status 2 when malformed."""
    found = []
    for part in raw.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--sentinel: expected HOST:PORT[,HOST:PORT...], got {raw!r}")
        found.append((host, int(port)))
    return tuple(found)


def _namespace(raw: str, parser: _Parser) -> Namespace:
    """The namespace named on the command line (its bytes as the OS gave them)."""
    try:
        return Namespace(os.fsencode(raw))
    except ValueError as error:
        parser.error(f"NAMESPACE: {error}")


def _server(options: argparse.Namespace, parser: _Parser) -> Server:
    """The server: ``--sentinel`` + ``--service``, else ``--url``, else ``$REDIS_URL``. Exits
    with status 2 when none is given, both are, or one is malformed."""
    if options.sentinel is None:
        if options.service is not None:
            parser.error("--service: only with --sentinel")
        return Server(url=_url(options, parser))
    if options.url is not None:
        parser.error("--url and --sentinel: pass one of them")
    if not options.service:
        parser.error("--sentinel: needs --service NAME (the name the sentinels monitor)")
    return Server(sentinels=_sentinels(options.sentinel, parser), service=options.service)


def _url(options: argparse.Namespace, parser: _Parser) -> str:
    """The server's URL: ``--url``, else ``$REDIS_URL``. Exits with status 2 when neither is
    given or the URL is malformed."""
    from redis.connection import parse_url

    given = options.url is not None
    url: str | None = options.url if given else os.environ.get(URL_VARIABLE)
    if not url:
        parser.error(f"no server: pass --url URL or set {URL_VARIABLE}")
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as error:
        parser.error(f"{'--url' if given else URL_VARIABLE}: {error}")
    return url


def connect(url: str) -> Any:
    """A client of the server at ``url``: ``RedisCluster`` when it is a cluster node, else
    ``Redis``; close it yourself. Raises ``redis.RedisError`` when the server cannot be reached."""
    import redis
    from redis.cluster import RedisCluster

    plain = redis.Redis.from_url(url)
    try:
        if plain.info("cluster").get("cluster_enabled") not in (1, "1"):
            return plain
    except BaseException:
        plain.close()
        raise
    plain.close()
    return RedisCluster.from_url(url)


def install_functions(server: Server | str, config: ScriptConfig) -> list[str]:
    """Load the Functions library on the server (a URL, or a ``Server``; on every primary when
    it is a cluster node); returns the addresses it was loaded on."""
    from luasched.scripts import ScriptRunner, is_cluster

    client = (server if isinstance(server, Server) else Server(url=server)).connect()
    try:
        ScriptRunner(client, render_all(config)).install_functions()
        if is_cluster(client):
            return [str(node.name) for node in client.get_primaries()]
        from luasched.ha import sentinel_pool

        pool = sentinel_pool(client)
        if pool is not None:
            host, port = pool.get_master_address()
            return [f"{host}:{port}"]
        kwargs = client.get_connection_kwargs()
        return [f"{kwargs.get('host')}:{kwargs.get('port')}"]
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 server error, 2 usage error).

    Usage errors exit (``SystemExit(2)``) after one line on stderr.
    """
    parser, parsers = _parser()
    options = parser.parse_args(argv)
    command: str = options.command
    sub = parsers[command]
    try:
        config = ScriptConfig(max_batch=options.max_batch, max_key_bytes=options.max_key_bytes)
    except ValueError as error:
        parser.error(str(error))
    if command == "export":
        return _export(options.directory, config, sub)
    if command == "acl":
        return _acl(options, config, sub)
    if command in ("install-functions", "stats"):
        return _server_command(options, config, sub)
    if command == "worker":
        return run_worker(options, _server(options, sub), config, sub.error)
    scripts = render_all(config)
    if command == "render":
        if options.name not in scripts:
            sub.error(f"no script named {options.name!r}; known: {', '.join(sorted(scripts))}")
        sys.stdout.write(scripts[options.name].text)
    elif command == "list":
        for name, script in sorted(scripts.items()):
            print(f"{name}\t{script.sha1}\t{script.spec.summary.split('. ')[0]}")
    elif command == "manifest":
        print(json.dumps(manifest(config), indent=2))
    elif command == "reference":
        sys.stdout.write(reference_markdown(config))
    elif command == "functions":
        sys.stdout.write(functions_library(config))
    return 0


def _export(directory: str, config: ScriptConfig, parser: _Parser) -> int:
    target = Path(directory)
    if target.exists() and not target.is_dir():
        parser.error(f"DIR: {directory!r} exists and is not a directory")
    try:
        paths = export(target, config)
    except OSError as error:
        parser.error(f"DIR: cannot write {error.filename or directory!r}: {error.strerror}")
    for path in paths:
        print(path)
    return 0


def _acl(options: argparse.Namespace, config: ScriptConfig, parser: _Parser) -> int:
    from luasched.acl import acl_rule, default_user, setuser_line

    namespace = _namespace(options.namespace, parser)
    user = options.user if options.user is not None else default_user(namespace)
    if not user or any(character.isspace() or character == "\0" for character in user):
        what = "--user" if options.user is not None else "the default user name (pass --user)"
        parser.error(f"{what}: an ACL user name is not empty and has no spaces, got {user!r}")
    rules = acl_rule(namespace, functions=options.functions, cluster=options.cluster, config=config)
    print(setuser_line(os.fsencode(user), rules))
    return 0


def _server_command(options: argparse.Namespace, config: ScriptConfig, parser: _Parser) -> int:
    """``install-functions`` and ``stats``: one line and status 1 when the server fails."""
    import redis

    from luasched.stats import namespace_stats, render_text

    namespace = None
    if options.command == "stats":
        if options.max_scan < 1:
            parser.error(f"--max-scan: must be at least 1, got {options.max_scan}")
        namespace = _namespace(options.namespace, parser)
    server = _server(options, parser)
    try:
        if namespace is None:
            name = functions_library(config).split("\n", 1)[0].split("name=", 1)[1]
            for node in install_functions(server, config):
                print(f"{node}\t{name}")
            return 0
        client = server.connect()
        try:
            stats = namespace_stats(client, namespace.name, options.max_scan, config)
        finally:
            client.close()
    except redis.RedisError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{parser.prog}: failed: {message}", file=sys.stderr)
        return 1
    if options.json:
        print(json.dumps(stats.as_dict(), indent=2))
    else:
        sys.stdout.write(render_text(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
