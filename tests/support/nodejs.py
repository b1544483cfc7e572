"""Node.js for the cross-language tests: find node and the npm dependencies, run the driver.

``tests/node/driver.js`` (ioredis, through ``examples/node/luasched.js``) runs as one process per
scenario and answers one JSON request per line (see its header). A missing ``node`` or missing
``tests/node/node_modules`` fails the test with how to fix it; it is never a skip.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest

from support.servers import ServerHandle

TESTS_DIR = Path(__file__).resolve().parents[1]
NODE_DIR = TESTS_DIR / "node"
DRIVER = NODE_DIR / "driver.js"
NODE_MODULES = NODE_DIR / "node_modules"
REPLY_TIMEOUT_S = 60.0


def require_node() -> str:
    """The ``node`` binary, with the driver's npm dependencies installed; else the test fails."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node not found on the PATH: the Node.js tests need Node.js 18+ and npm "
            "(Debian: apt-get install nodejs npm; `.ci/run` installs them)",
            pytrace=False,
        )
    if not (NODE_MODULES / "ioredis" / "package.json").is_file():
        pytest.fail(
            f"{NODE_MODULES} has no ioredis: run `make node-deps` (npm ci --prefix tests/node); "
            "`make test` does it",
            pytrace=False,
        )
    return node


def node_env() -> dict[str, str]:
    """The environment for Node programs outside tests/node (examples/node): they find ioredis
    in tests/node/node_modules through NODE_PATH."""
    return {**os.environ, "NODE_PATH": str(NODE_MODULES)}


def connection_args(server: ServerHandle) -> list[str]:
    if server.is_cluster:
        return ["--cluster", ",".join(f"{server.host}:{port}" for port in server.ports)]
    return ["--url", server.url]


class NodeDriver:
    """One ``node driver.js`` process on ``server``, reading the scripts exported in
    ``scripts_dir``. ``request`` sends one JSON request and returns its reply; a failed request
    (``ok: false``) raises AssertionError unless ``expect_ok=False``. Stopped by ``close``."""

    def __init__(self, server: ServerHandle, scripts_dir: Path) -> None:
        node = require_node()
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        self._process = subprocess.Popen(
            [node, str(DRIVER), "--scripts", str(scripts_dir), *connection_args(server)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=NODE_DIR,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def request(self, op: str, *, expect_ok: bool = True, **fields: Any) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self._process.stdin.flush()
        try:
            line = self._lines.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(
                f"node driver: no reply to {op} in {REPLY_TIMEOUT_S:.0f}s; stderr:\n{self.stderr()}"
            ) from None
        if line is None:
            raise AssertionError(
                f"node driver exited ({self._process.wait()}) during {op}; stderr:\n{self.stderr()}"
            )
        reply: dict[str, Any] = json.loads(line)
        if expect_ok:
            assert reply["ok"], f"node driver: {op} failed: {reply}"
        return reply

    def call(self, script: str, places: dict[str, Any], args: dict[str, Any]) -> Any:
        """One script call from Node; its reply (strings and integers)."""
        return self.request("call", script=script, places=places, args=args)["reply"]

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            try:
                self._process.stdin.write('{"op": "quit"}\n')
                self._process.stdin.close()
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._reader.join(timeout=5)
        self._stderr.close()

    def __enter__(self) -> NodeDriver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
