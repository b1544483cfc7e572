"""The ``luasched`` command: render and export the scripts for other languages; ``stats``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

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

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luasched",
        description="Atomic scheduling on Redis: render and export the luasched Lua scripts.",
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export_parser = commands.add_parser(
        "export", help="write every script as NAME.lua and manifest.json into DIR"
    )
    export_parser.add_argument("directory", metavar="DIR")
    render_parser = commands.add_parser("render", help="print one rendered script")
    render_parser.add_argument("name", metavar="NAME", help="a script name, e.g. slots.keyslot")
    commands.add_parser("list", help="list the scripts with their SHA1 and summary")
    commands.add_parser("manifest", help="print manifest.json")
    commands.add_parser("reference", help="print the script reference (docs/scripts.md)")
    commands.add_parser(
        "functions", help="print the Redis Functions library (Redis 7.0+ / Valkey) on stdout"
    )
    install_parser = commands.add_parser(
        "install-functions",
        help="FUNCTION LOAD REPLACE the library on the server (every primary of a cluster)",
    )
    install_parser.add_argument("url", metavar="REDIS_URL", help="e.g. redis://127.0.0.1:6379/0")
    stats_parser = commands.add_parser(
        "stats",
        help="what is in a namespace now: nodes, slots, queues, locks (read-only, bounded SCAN)",
    )
    stats_parser.add_argument("namespace", metavar="NAMESPACE")
    stats_parser.add_argument(
        "--url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="the server (default: $REDIS_URL, else %(default)s)",
    )
    stats_parser.add_argument("--json", action="store_true", help="print JSON")
    stats_parser.add_argument(
        "--max-scan",
        type=int,
        default=DEFAULT_MAX_SCAN,
        help="examine at most this many keys with SCAN (default %(default)s)",
    )
    return parser


def install_functions(url: str, config: ScriptConfig) -> list[str]:
    """Load the Functions library on the server at ``url`` (on every primary when it is a
    cluster node); returns the addresses it was loaded on."""
    import redis
    from redis.cluster import RedisCluster

    from luasched.scripts import ScriptRunner

    plain = redis.Redis.from_url(url)
    try:
        clustered = plain.info("cluster").get("cluster_enabled") in (1, "1")
        if not clustered:
            ScriptRunner(plain, render_all(config)).install_functions()
            kwargs = plain.get_connection_kwargs()
            return [f"{kwargs.get('host')}:{kwargs.get('port')}"]
    finally:
        plain.close()
    cluster = RedisCluster.from_url(url)
    try:
        ScriptRunner(cluster, render_all(config)).install_functions()
        primaries = cast(Any, cluster).get_primaries()  # untyped in redis-py
        return [str(node.name) for node in primaries]
    finally:
        cluster.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 server error, 2 usage error)."""
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        config = ScriptConfig(max_batch=options.max_batch, max_key_bytes=options.max_key_bytes)
    except ValueError as error:
        parser.error(str(error))
    scripts = render_all(config)
    if options.command == "export":
        for path in export(options.directory, config):
            print(path)
    elif options.command == "render":
        if options.name not in scripts:
            parser.error(f"no script named {options.name!r}; known: {', '.join(sorted(scripts))}")
        sys.stdout.write(scripts[options.name].text)
    elif options.command == "list":
        for name, script in sorted(scripts.items()):
            print(f"{name}\t{script.sha1}\t{script.spec.summary.split('. ')[0]}")
    elif options.command == "manifest":
        print(json.dumps(manifest(config), indent=2))
    elif options.command == "reference":
        sys.stdout.write(reference_markdown(config))
    elif options.command == "functions":
        sys.stdout.write(functions_library(config))
    elif options.command == "install-functions":
        import redis

        try:
            nodes = install_functions(options.url, config)
        except redis.RedisError as error:
            print(f"luasched: install-functions failed: {error}", file=sys.stderr)
            return 1
        name = functions_library(config).split("\n", 1)[0].split("name=", 1)[1]
        for node in nodes:
            print(f"{node}\t{name}")
    elif options.command == "stats":
        return _stats(options, config)
    return 0


def _stats(options: argparse.Namespace, config: ScriptConfig) -> int:
    import redis
    from redis.cluster import RedisCluster

    from luasched.stats import namespace_stats, render_text

    if options.max_scan < 1:
        print("luasched: --max-scan must be at least 1", file=sys.stderr)
        return 2
    try:
        Namespace(options.namespace)
    except ValueError as error:
        print(f"luasched: {error}", file=sys.stderr)
        return 2
    client: Any = None
    try:
        client = redis.Redis.from_url(options.url)
        if client.info("cluster").get("cluster_enabled") in (1, "1"):
            client.close()
            client = RedisCluster.from_url(options.url)
        stats = namespace_stats(client, options.namespace, options.max_scan, config)
    except redis.RedisError as error:
        print(f"luasched: stats failed: {error}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    if options.json:
        print(json.dumps(stats.as_dict(), indent=2))
    else:
        sys.stdout.write(render_text(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
