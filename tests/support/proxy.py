"""A loopback TCP proxy that loses replies: the server executes a command, the client never hears.

``with ReplyDroppingProxy(server_port) as proxy: redis.Redis(port=proxy.port)``

It listens on 127.0.0.1 (a port picked by the OS) and opens one upstream connection to
127.0.0.1:``upstream_port`` per client connection. Each connection is served in lock step: read
one whole RESP command from the client, send it to the server, read the server's whole reply,
then pass it on -- unless the command matches a rule armed with ``drop_reply_of``: then the
reply is thrown away and both connections are closed, after the server executed the command.
To the client that is a connection error with the command's effect already applied, which is
what redis-py answers by reconnecting and sending the command again (its ``Retry``).

RESP2 and RESP3 (redis-py 8 says HELLO 3 on connect). Pipelines work (commands are taken one at
a time from the stream); pub/sub and MONITOR do not (they are not request/reply). Tests only.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

HOST = "127.0.0.1"

Command = list[bytes]
Matcher = Callable[[Command], bool]


class _Closed(Exception):
    """The peer closed its side."""


class _Reader:
    """Whole RESP values out of a socket (buffered)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _Closed
        self.buffer += chunk

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            self._fill()

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size + 2:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[: size + 2]
        return data

    def value(self) -> tuple[bytes, list[bytes]]:
        """One RESP2/RESP3 value: its raw bytes and, for an array of bulk strings (a command),
        its elements."""
        line = self._line()
        raw = [line + b"\r\n"]
        elements: list[bytes] = []
        kind, rest = line[:1], line[1:]
        if kind in b"$!=":  # bulk string, blob error, verbatim string
            size = int(rest)
            if size >= 0:
                data = self._exactly(size)
                raw.append(data + b"\r\n")
                elements.append(data)
        elif kind in b"*~>%|":  # array, set, push; map and attribute hold key-value pairs
            count = max(0, int(rest)) * (2 if kind in b"%|" else 1)
            for _ in range(count):
                item, inner = self.value()
                raw.append(item)
                elements.append(inner[0] if len(inner) == 1 else item)
            if kind == b"|":  # an attribute precedes the value it describes
                item, _ = self.value()
                raw.append(item)
        elif kind not in (b"+", b"-", b":", b"_", b"#", b",", b"("):
            # An inline command (e.g. typed by hand): its words are the command.
            elements = line.split()
        return b"".join(raw), elements


@dataclass
class _Rule:
    match: Matcher
    skip: int  # matching commands to let through first
    times: int  # replies to drop after that


class ReplyDroppingProxy:
    """A proxy to 127.0.0.1:``upstream_port`` that can drop chosen replies (see the module)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._rules: list[_Rule] = []
        self._sockets: set[socket.socket] = set()
        self._servers: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: Every command forwarded (its elements), in the order the server got them.
        self.commands: list[Command] = []
        #: The commands whose reply was dropped (executed by the server, never answered).
        self.dropped: list[Command] = []

    def drop_reply_of(self, match: Matcher, *, skip: int = 0, times: int = 1) -> None:
        """Drop the replies of the next ``times`` commands ``match`` accepts, after letting
        ``skip`` of them through (``skip=2``: the 3rd matching command loses its reply)."""
        with self._guard:
            self._rules.append(_Rule(match, skip, times))

    def count(self, match: Matcher) -> int:
        """How many forwarded commands ``match`` accepts."""
        with self._guard:
            return sum(1 for command in self.commands if match(command))

    def _should_drop(self, command: Command) -> bool:
        with self._guard:
            self.commands.append(command)
            for rule in self._rules:
                if rule.times > 0 and rule.match(command):
                    if rule.skip > 0:
                        rule.skip -= 1
                        return False
                    rule.times -= 1
                    self.dropped.append(command)
                    return True
            return False

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(16)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._guard:
                self._servers.append(server)
            server.start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((HOST, self.upstream_port), timeout=5)
        except OSError:
            client.close()  # the client sees the server as down
            return
        upstream.settimeout(None)
        with self._guard:
            self._sockets.update((client, upstream))
        from_client, from_server = _Reader(client), _Reader(upstream)
        try:
            while True:
                raw, command = from_client.value()
                upstream.sendall(raw)
                reply, _ = from_server.value()  # the server has executed the command
                if self._should_drop(command):
                    return
                client.sendall(reply)
        except (_Closed, OSError):
            return
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._guard:
                self._sockets.difference_update((client, upstream))

    def stop(self) -> None:
        """Close the listener and every connection; wait for the proxy's threads."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._guard:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
        with self._guard:
            servers = list(self._servers)
        for server in servers:
            server.join(5)

    def __enter__(self) -> ReplyDroppingProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
