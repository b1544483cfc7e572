"""redis-cli drives the same namespace as Python, the way docs/manifest.md tells users to.

Only what ``luasched export`` wrote is used: each script file is loaded with ``SCRIPT LOAD`` on
every primary (the SHA1 it answers must be the manifest's), called with ``EVALSHA`` and KEYS
built from the manifest's key patterns; on 7.0+ the exported Functions library is loaded with
``FUNCTION LOAD REPLACE`` and the same calls go through ``FCALL`` / ``FCALL_RO``. The redis-cli
is the harness's (``servers.find_redis_cli``: the 6.2 one from the wheel, else the PATH's).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from luasched import Scheduler, key_slot
from luasched.keys import Namespace
from luasched.render import export
from support.crosslang import (
    EVALSHA,
    FCALL,
    SLOT_VECTORS,
    assert_route_taken,
    command_calls,
    readme_block,
    routes,
)
from support.helpers import render_key
from support.servers import ServerHandle, find_redis_cli

NS = Namespace("cli")


@pytest.fixture(scope="module")
def scripts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("exported")
    export(directory)
    return directory


class Cli:
    """redis-cli on one test server, with the exported scripts of ``scripts_dir``."""

    def __init__(self, server: ServerHandle, scripts_dir: Path, route: str) -> None:
        self.server = server
        self.dir = scripts_dir
        self.route = route
        self.manifest: dict[str, Any] = json.loads((scripts_dir / "manifest.json").read_text())
        self.binary = find_redis_cli()
        self.loaded: set[str] = set()

    def run(
        self, *args: str | bytes, port: int | None = None, last_from: Path | None = None
    ) -> list[str]:
        """One command; its reply lines (redis-cli's raw output: one line per element; an error
        reply is its message). ``-c`` follows cluster redirections. ``last_from``: the file
        whose bytes are the last argument (``redis-cli -x ... < FILE``; the library is too long
        for one command-line argument)."""
        command: list[str | bytes] = [self.binary, "-h", self.server.host]
        command += ["-p", str(port or self.server.port)]
        if self.server.is_cluster and port is None:
            command.append("-c")
        if last_from is not None:
            command.append("-x")
        done = subprocess.run(
            [*command, *args],
            input=b"" if last_from is None else last_from.read_bytes(),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.decode().rstrip("\n").split("\n")

    def load(self, script: str) -> None:
        """Make ``script`` callable by this route on every primary: SCRIPT LOAD its file (the
        answer must be the manifest's SHA1), or FUNCTION LOAD REPLACE the library (once)."""
        if script in self.loaded:
            return
        for port in self.server.ports:
            if self.route == FCALL:
                library = self.manifest["functions"]
                text = self.dir / library["file"]
                reply = self.run("FUNCTION", "LOAD", "REPLACE", port=port, last_from=text)
                assert reply == [library["library"]], reply
            else:
                entry = self.manifest["scripts"][script]
                reply = self.run("SCRIPT", "LOAD", port=port, last_from=self.dir / entry["file"])
                assert reply == [entry["sha1"]], reply
        self.loaded |= set(self.manifest["scripts"]) if self.route == FCALL else {script}

    def keys(self, script: str, **places: bytes) -> list[bytes]:
        """The KEYS of ``script`` in namespace NS, from the manifest's key patterns."""
        entry = self.manifest["scripts"][script]
        return [render_key(key["pattern"], NS, places) for key in entry["keys"]]

    def call(self, script: str, places: Mapping[str, bytes], args: Mapping[str, Any]) -> list[str]:
        """EVALSHA <manifest sha1> (or FCALL[_RO] <function>) with ARGV in the manifest's order;
        the script (or the library) is loaded first, once."""
        self.load(script)
        entry = self.manifest["scripts"][script]
        argv: list[str] = []
        for spec in entry["argv"]:
            value = args[spec["name"]]
            argv += [str(item) for item in value] if spec.get("repeat") else [str(value)]
        keys = self.keys(script, **places)
        if self.route == FCALL:
            head = "FCALL_RO" if "no-writes" in entry["flags"] else "FCALL"
            target = self.manifest["functions"]["functions"][script]
        else:
            head, target = "EVALSHA", entry["sha1"]
        return self.run(head, target, str(len(keys)), *keys, *argv)


def each_route(server: ServerHandle, scripts_dir: Path, scenario: Callable[[Cli], None]) -> None:
    """``scenario(cli)`` on an emptied server per route (scripts, or the library, loaded with
    redis-cli); every script call must have taken that route."""
    for route in routes(server):
        server.flush()
        cli = Cli(server, scripts_dir, route)
        before = command_calls(server)
        scenario(cli)
        assert_route_taken(server, route, before)


def test_noscript_until_loaded_then_the_manifest_sha_answers(
    server: ServerHandle, scripts_dir: Path
) -> None:
    server.flush()
    cli = Cli(server, scripts_dir, EVALSHA)
    sha1 = cli.manifest["scripts"]["slots.keyslot"]["sha1"]
    assert cli.run("EVALSHA", sha1, "0", "foo")[0].startswith("NOSCRIPT")
    assert cli.call("slots.keyslot", {}, {"key": ["foo"]}) == ["12182"]  # SCRIPT LOAD first
    assert cli.run("EVALSHA", sha1, "0", "foo") == ["12182"]


def test_keyslot_from_redis_cli_equals_python(server: ServerHandle, scripts_dir: Path) -> None:
    keys = [*SLOT_VECTORS, "user:42", "{orders}:q:ready:emails", "a{b}c", "ключ"]

    def scenario(cli: Cli) -> None:
        reply = [int(slot) for slot in cli.call("slots.keyslot", {}, {"key": keys})]
        client = server.client()
        try:
            from_python = Scheduler(client, NS.name).slots.keyslots(keys)
        finally:
            client.close()
        assert reply == list(from_python) == [key_slot(key) for key in keys]
        assert {key: reply[keys.index(key)] for key in SLOT_VECTORS} == SLOT_VECTORS

    each_route(server, scripts_dir, scenario)


def test_enqueue_from_redis_cli_python_dequeues(server: ServerHandle, scripts_dir: Path) -> None:
    def scenario(cli: Cli) -> None:
        jobs = {"queue": b"jobs", "request_id": b""}
        enqueue: dict[str, Any] = {"task_id": "cli-task"}
        enqueue |= {"payload": f"hello from redis-cli ({cli.route})"}
        enqueue |= {"priority": 5, "delay_ms": 0, "max_attempts": 3}
        enqueue |= {"request_id": "", "request_ttl_ms": 60_000}
        assert cli.call("queue.enqueue", jobs, enqueue) == ["1", "ready"]
        # Again: idempotent by task id, nothing changes.
        assert cli.call("queue.enqueue", jobs, enqueue) == ["0", "ready"]
        client = server.client()
        try:
            q = Scheduler(client, NS.name).queue("jobs")
            lease = q.dequeue("py-worker", 30_000)
            assert lease is not None
            assert (lease.task_id, lease.payload, lease.attempt) == (
                b"cli-task",
                enqueue["payload"].encode(),
                1,
            )
            assert q.dequeue("py-worker", 30_000) is None
            # A wrong token from redis-cli is refused; the right one finishes the task.
            ack = {"task_id": "cli-task", "request_id": "", "request_ttl_ms": 60_000}
            refused = cli.call("queue.ack", jobs, {**ack, "token": lease.token + 1})
            assert refused[0].startswith("LUASCHED_STALE queue.ack: "), refused
            assert cli.call("queue.ack", jobs, {**ack, "token": lease.token}) == ["1"]
            stats = q.stats()
            assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)
        finally:
            client.close()

    each_route(server, scripts_dir, scenario)


def test_lock_acquired_from_redis_cli_refuses_python(
    server: ServerHandle, scripts_dir: Path
) -> None:
    def scenario(cli: Cli) -> None:
        report = {"name": b"report", "request_id": b""}
        acquire = {"token": "cli-owner", "ttl_ms": 10_000, "reentrant": 0, "fair": 0}
        acquire |= {"wait_ttl_ms": 0, "request_id": ""}
        status, fence, *_ = cli.call("lock.acquire", report, acquire)
        assert status == "acquired", (status, fence)
        client = server.client()
        try:
            lock = Scheduler(client, NS.name).lock("report", ttl_ms=10_000)
            assert lock.acquire(blocking=False) is None  # redis-cli holds it
            released = cli.call("lock.release", report, {"token": "cli-owner", "request_id": ""})
            assert released[:2] == ["released", "0"]
            handle = lock.acquire(blocking=False)
            assert handle is not None and handle.fence > int(fence)
            # Now Python holds it: redis-cli is refused, and cannot release it.
            assert cli.call("lock.acquire", report, {**acquire, "token": "cli-2"})[0] == "held"
            refused = cli.call("lock.release", report, {"token": "cli-2", "request_id": ""})
            assert refused[:2] == ["not_owner", "0"]
            assert handle.release().released
        finally:
            client.close()

    each_route(server, scripts_dir, scenario)


def queue_is_empty_after_one_task(server: ServerHandle, token: int) -> None:
    """The README's task went through namespace "orders", queue "emails": one lease (its fencing
    token `token`, the queue's last), acked, nothing left."""
    client = server.client()
    try:
        stats = Scheduler(client, "orders").queue("emails").stats()
        assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0), stats
        assert client.hget(b"luasched:{orders}:q:tasks:emails", b"fence") == b"%d" % token
    finally:
        client.close()


@pytest.mark.standalone_only
def test_readme_one_task_from_python_runs(
    server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    server.flush()
    code = readme_block("python")
    assert "redis.Redis()" in code
    code = code.replace("redis.Redis()", f"redis.Redis(port={server.port})")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert re.fullmatch(r"b'task-1' b'hello' [1-9]\d*", printed), printed
    queue_is_empty_after_one_task(server, int(printed.split()[-1]))


@pytest.mark.standalone_only
def test_readme_one_task_from_redis_cli_runs(server: ServerHandle, tmp_path: Path) -> None:
    """The README's bash snippet as written, with `redis-cli` pointed at the test server and
    `luasched` from this environment."""
    server.flush()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "redis-cli"
    wrapper.write_text(
        f'#!/bin/sh\nexec {find_redis_cli()} -h {server.host} -p {server.port} "$@"\n'
    )
    wrapper.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block("sh")],
        cwd=tmp_path,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[:6] == ["1", "ready", "0", "task-1", "hello", "1"], done.stdout
    assert int(lines[6]) > 0 and int(lines[7]) > 0 and lines[8:] == ["1"], done.stdout
    queue_is_empty_after_one_task(server, int(lines[6]))
