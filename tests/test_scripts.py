"""The registry: SCRIPT LOAD where scripts run, EVALSHA, NOSCRIPT recovery, batches, asyncio."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from redis.exceptions import ResponseError

import luasched.asyncio
from luasched import InvalidArgument, LuaschedError, Namespace, Scheduler, key_slot
from luasched.errors import error_from_response
from luasched.render import manifest, render_all


def noscript_errors(client: redis.Redis) -> int:
    """How many NOSCRIPT errors this server has answered (INFO errorstats, Redis 6.2+)."""
    stats = client.info("errorstats")
    entry = stats.get("errorstat_NOSCRIPT", {"count": 0})
    return int(entry["count"])


def test_script_load_answers_the_manifest_sha1_on_every_primary(server: Any) -> None:
    server.flush()
    scripts = manifest()["scripts"]
    for node in server.primaries():
        for name, script in render_all().items():
            assert node.script_load(script.text) == scripts[name]["sha1"]
        shas = [entry["sha1"] for entry in scripts.values()]
        assert all(node.script_exists(*shas))


def test_load_scripts_reaches_every_primary(r: Any, server: Any) -> None:
    s = Scheduler(r, "reg")
    loaded = s.load_scripts()
    assert loaded == {name: script.sha1 for name, script in render_all().items()}
    for node in server.primaries():
        assert all(node.script_exists(*loaded.values()))


def test_script_flush_between_two_calls_is_invisible(r: Any, server: Any) -> None:
    s = Scheduler(r, "reg")
    assert s.slots.keyslot("a") == key_slot("a")
    for node in server.primaries():
        node.script_flush()
        assert node.script_exists(s.scripts["slots.keyslot"].sha1) == [False]
    assert s.slots.keyslot("b") == key_slot("b")
    # The retry loaded it again where it ran.
    assert any(
        node.script_exists(s.scripts["slots.keyslot"].sha1)[0] for node in server.primaries()
    )


def test_pipeline_recovers_from_noscript(r: Any, server: Any) -> None:
    s = Scheduler(r, "reg")
    s.load_scripts()
    keys = [b"a", b"{b}c", b"\xff\x00"]
    with s.pipeline() as pipe:
        for key in keys:
            assert pipe.slots.keyslot(key) is None  # queued, not sent
        pipe.slots.keyslots(keys)
        assert len(pipe) == 4
        before = [noscript_errors(node) for node in server.primaries()]
        for node in server.primaries():
            node.script_flush()
        results = pipe.execute()
    assert results == [key_slot(key) for key in keys] + [[key_slot(key) for key in keys]]
    assert len(pipe) == 0
    after = [noscript_errors(node) for node in server.primaries()]
    if server.is_cluster:
        # Cluster batches send EVAL with the text: NOSCRIPT cannot happen there.
        assert after == before
    else:
        assert after[0] - before[0] == 4  # every call met NOSCRIPT once and was retried


def test_pipeline_reports_errors_in_place_or_raises(r: Any) -> None:
    s = Scheduler(r, "reg")
    pipe = s.pipeline()
    pipe.slots.keyslot("a")
    pipe.slots.keyslots([b"k"] * 1001)  # over max_batch: the script refuses it
    pipe.slots.keyslot("b")
    results = pipe.execute(raise_on_error=False)
    assert results[0] == key_slot("a") and results[2] == key_slot("b")
    assert isinstance(results[1], InvalidArgument)
    pipe.slots.keyslots([b"k"] * 1001)
    pipe.slots.keyslot("c")
    with pytest.raises(InvalidArgument):
        pipe.execute()
    assert pipe.execute() == []


def test_errors_that_are_not_luasched_pass_through(r: Any) -> None:
    s = Scheduler(r, "reg")
    with pytest.raises(KeyError, match="no script named"):
        s.runner.run(_unknown_call())


def _unknown_call() -> Any:
    from luasched.scripts import Call

    return Call("no.such", (), (), lambda reply: reply)


def test_error_reply_parsing() -> None:
    error = error_from_response(ResponseError("LUASCHED_ARG slots.keyslot: bad: really"))
    assert isinstance(error, InvalidArgument)
    assert (error.script, error.detail) == ("slots.keyslot", "bad: really")
    unknown = error_from_response(ResponseError("LUASCHED_LATER queue.x: later code"))
    assert type(unknown) is LuaschedError and unknown.code == "LATER"
    assert error_from_response(ResponseError("WRONGTYPE Operation against a key")) is None


@pytest.mark.parametrize("name", ["", "a{b", "c}d", "x" * 129])
def test_bad_namespaces_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        Namespace(name)


def test_namespace_keys_share_one_slot() -> None:
    namespace = Namespace("orders é")
    assert namespace.prefix == "luasched:{orders é}:".encode()
    assert namespace.key("q", "ready") == "luasched:{orders é}:q:ready".encode()
    assert key_slot(namespace.key("q", "ready")) == key_slot(namespace.key("x")) == namespace.slot


def test_asyncio_twin(server: Any) -> None:
    async def scenario() -> None:
        server.flush()
        client = server.async_client()
        try:
            s = luasched.asyncio.Scheduler(client, "reg")
            assert await s.slots.keyslot("foo") == 12182
            assert await s.slots.keyslots([b"a", b"b"]) == [key_slot("a"), key_slot("b")]
            for node in server.primaries():
                node.script_flush()
            assert await s.slots.keyslot("{user1000}.following") == 3443
            async with s.pipeline() as pipe:
                await pipe.slots.keyslot("x")
                await pipe.slots.keyslots([b"k"] * 1001)  # refused by the script
                for node in server.primaries():
                    node.script_flush()
                results = await pipe.execute(raise_on_error=False)
            assert results[0] == key_slot("x")
            assert isinstance(results[1], InvalidArgument)
            with pytest.raises(InvalidArgument):
                await s.slots.keyslots([b"k"] * 1001)
            loaded = await s.load_scripts()
            assert loaded["slots.keyslot"] == s.scripts["slots.keyslot"].sha1
        finally:
            await client.aclose()

    asyncio.run(scenario())
