"""luasched demo: the script engine at work on a throwaway server (or on $REDIS_URL).

Run with `make demo`. Without REDIS_URL it starts redis-server (or valkey-server) from the PATH
or from .tools/servers on a free 127.0.0.1 port, with no persistence, and stops it at the end
(luasched.testing.ThrowawayServer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import redis

import luasched
from luasched import InvalidArgument, Scheduler, key_slot
from luasched.render import manifest
from luasched.testing import ThrowawayServer, find_server_binary

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def throwaway_server() -> Iterator[redis.Redis]:
    url = os.environ.get("REDIS_URL")
    if url:
        print(f"using REDIS_URL={url}")
        yield redis.Redis.from_url(url)
        return
    with ThrowawayServer(find_server_binary(ROOT)) as server:
        print(f"started {server.binary} on 127.0.0.1:{server.port} (stopped at the end)")
        client = server.client()
        try:
            yield client
        finally:
            client.close()


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
