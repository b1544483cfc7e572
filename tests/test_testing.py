"""luasched.testing: the throwaway server used by the demo and the benchmarks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from luasched.testing import ThrowawayServer, find_server_binary

ROOT = Path(__file__).resolve().parents[1]


def test_throwaway_server_starts_on_loopback_and_leaves_nothing() -> None:
    binary = find_server_binary(ROOT)
    with ThrowawayServer(binary) as server:
        client = server.client()
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
        directory, process, port = server.directory, server.process, server.port
        assert directory is not None and directory.is_dir()
        assert server.info()["port"] == port
        client.close()
    assert process is not None and process.poll() is not None  # stopped
    assert not directory.exists()  # cleaned up
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=0.5).ping()


def test_find_server_binary_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUASCHED_SERVER", "/opt/somewhere/redis-server")
    assert find_server_binary() == Path("/opt/somewhere/redis-server")
    monkeypatch.delenv("LUASCHED_SERVER")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="make servers"):
        find_server_binary(ROOT / "no-such-dir")
    assert find_server_binary(ROOT).is_file()  # .tools/servers, installed by `make servers`


def test_a_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="not found"), ThrowawayServer("/no/such/binary"):
        pass


def test_a_crash_restart_keeps_what_an_always_synced_aof_holds() -> None:
    binary = find_server_binary(ROOT)
    with ThrowawayServer(binary, ["--appendfsync", "always"], persistent=True) as server:
        client = server.client()
        client.set("kept", b"1")
        client.close()
        port, directory, before = server.port, server.directory, server.process
        assert before is not None
        began = time.monotonic()
        server.restart(crash=True, down_for_s=0.3)
        assert time.monotonic() - began >= 0.3
        assert before.returncode == -9  # killed, not shut down
        assert (server.port, server.directory) == (port, directory)
        client = server.client()
        assert client.get("kept") == b"1"
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        client.close()


def test_a_launcher_runs_the_server_under_it() -> None:
    """``launcher`` prefixes the command (bench's callgrind group runs the server under
    valgrind): here ``nice -n 7``, which the server's own process then shows."""
    binary = find_server_binary(ROOT)
    with ThrowawayServer(binary, launcher=["nice", "-n", "7"], ready_timeout_s=30.0) as server:
        assert server.client().ping()
        assert server.process is not None
        stat = Path(f"/proc/{server.process.pid}/stat").read_text()
        niceness = int(stat.rsplit(")", 1)[1].split()[16])
        assert niceness == 7
