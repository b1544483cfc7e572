"""Durable mode (``wait_replicas``) and the failover errors a primary answers (``NOREPLICAS``)
on the matrix servers. A standalone matrix server has no replica, so every ``WAIT`` answers 0:
what a call does when too few replicas acknowledge it is checked here; the Sentinel tests
(tests/test_sentinel.py) check it with real replicas and failovers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import luasched
from luasched import InvalidArgument, NotReplicated, RetryPolicy, Scheduler, UnknownNode
from luasched.asyncio import Scheduler as AsyncScheduler
from luasched.retry import NO_RETRY, NoReplicasError
from support.helpers import snapshot

Client = Any
#: Two sends, no wait between them: the resend of the same call is what is checked.
TWO_SENDS = RetryPolicy(attempts=2, base_ms=0, max_ms=0)


@pytest.mark.standalone_only
def test_a_call_no_replica_acknowledged_raises_not_replicated_after_resending_it_once(
    r: Client,
) -> None:
    s = Scheduler(r, "dur", wait_replicas=1, wait_timeout_ms=10, retry=TWO_SENDS)
    q = s.queue("jobs")
    with pytest.raises(NotReplicated) as raised:
        q.enqueue(b"t1", b"payload", request_id=b"req-1")
    error = raised.value
    assert isinstance(error, luasched.LuaschedError)
    assert (error.acked, error.wanted, error.request_id) == (0, 1, b"req-1")
    assert error.code == "NOTREPLICATED" and error.script == "queue.enqueue"
    # It ran on the primary, once (the resend with the same request id replayed the record).
    stats = Scheduler(r, "dur").queue("jobs").stats()
    assert stats.ready == 1
    # The caller sends it again with the same request id: still one task, the first answer.
    plain = Scheduler(r, "dur").queue("jobs")
    again = plain.enqueue(b"t1", b"payload", request_id=b"req-1")
    assert again.created is True
    assert plain.stats().ready == 1


@pytest.mark.standalone_only
def test_reads_and_refused_calls_send_no_wait(r: Client) -> None:
    s = Scheduler(r, "dur", wait_replicas=1, wait_timeout_ms=10, retry=NO_RETRY)
    q = s.queue("jobs")
    assert q.stats().ready == 0  # queue.stats is no-writes: no WAIT, no NotReplicated
    assert s.slots.keyslot("a") == luasched.key_slot("a")
    with pytest.raises(UnknownNode):  # the script refused: its own error, not NotReplicated
        s.nodes.heartbeat(b"nobody", 1000)
    before = r.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)
    q.stats()
    assert r.info("commandstats").get("cmdstat_wait", {}).get("calls", 0) == before


@pytest.mark.standalone_only
def test_a_batch_reports_not_replicated_for_its_writing_calls_only(r: Client) -> None:
    s = Scheduler(r, "dur", wait_replicas=1, wait_timeout_ms=10)
    with s.pipeline() as pipe:
        pipe.queue("jobs").enqueue(b"t1", b"x", request_id=b"r1")
        pipe.queue("jobs").stats()
        enqueued, stats = pipe.execute(raise_on_error=False)
    assert isinstance(enqueued, NotReplicated) and enqueued.request_id == b"r1"
    assert stats.ready == 1


@pytest.mark.standalone_only
def test_the_asyncio_twin_raises_not_replicated_too(server: Any, r: Client) -> None:
    async def main() -> NotReplicated:
        client = server.async_client()
        try:
            s = AsyncScheduler(client, "dur", wait_replicas=2, wait_timeout_ms=10, retry=TWO_SENDS)
            with pytest.raises(NotReplicated) as raised:
                await s.queue("jobs").enqueue(b"t1", b"x", request_id=b"req-a")
            return raised.value
        finally:
            await client.aclose()

    error = asyncio.run(main())
    assert (error.acked, error.wanted, error.request_id) == (0, 2, b"req-a")
    assert Scheduler(r, "dur").queue("jobs").stats().ready == 1


@pytest.mark.standalone_only
def test_wait_replicas_zero_is_the_plain_mode(r: Client) -> None:
    s = Scheduler(r, "dur", wait_replicas=0, retry=NO_RETRY)
    assert s.durability is None
    assert s.queue("jobs").enqueue(b"t1", b"x").created is True


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"wait_replicas": -1}, "wait_replicas"),
        ({"wait_replicas": 1.0}, "wait_replicas"),
        ({"wait_replicas": True}, "wait_replicas"),
        ({"wait_replicas": 1, "wait_timeout_ms": -1}, "wait_timeout_ms"),
        ({"wait_replicas": 1, "wait_timeout_ms": "5"}, "wait_timeout_ms"),
    ],
)
def test_bad_durable_options_are_refused_naming_them(options: dict[str, Any], named: str) -> None:
    client = redis.Redis(port=1)  # never connected: the check comes first
    with pytest.raises(InvalidArgument, match=rf"^LUASCHED_ARG {named} must be"):
        Scheduler(client, "dur", **options)


@pytest.mark.cluster_only
def test_durable_mode_is_refused_on_a_cluster(r: Client) -> None:
    with pytest.raises(InvalidArgument, match="wait_replicas: durable mode needs a standalone"):
        Scheduler(r, "dur", wait_replicas=1)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (([], "mymaster"), "sentinels"),
        (([("127.0.0.1", "26379")], "mymaster"), "sentinels"),
        (([("127.0.0.1", 26379, 1)], "mymaster"), "sentinels"),
        (("127.0.0.1:26379", "mymaster"), "sentinels"),
        (([("127.0.0.1", 26379)], ""), "service_name"),
        (([("127.0.0.1", 26379)], b"mymaster"), "service_name"),
    ],
)
def test_bad_sentinel_arguments_are_refused_naming_them(args: tuple[Any, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"^LUASCHED_ARG {named} must be"):
        Scheduler.from_sentinel(args[0], args[1], "ns")
    with pytest.raises(InvalidArgument, match=rf"^LUASCHED_ARG {named} must be"):
        AsyncScheduler.from_sentinel(args[0], args[1], "ns")


@pytest.fixture
def needs_a_replica(r: Client) -> Iterator[Client]:
    """The server refuses writes while fewer than one replica is connected (NOREPLICAS);
    its setting is put back after the test."""
    r.config_set("min-replicas-to-write", 1)
    try:
        yield r
    finally:
        r.config_set("min-replicas-to-write", 0)


@pytest.mark.standalone_only
def test_noreplicas_is_a_typed_transient_error_and_nothing_was_written(
    needs_a_replica: Client, server: Any
) -> None:
    s = Scheduler(needs_a_replica, "dur", retry=NO_RETRY)
    q = s.queue("jobs")
    if server.version < (7, 0):  # 6.2 checks min-replicas-to-write for commands, not scripts
        assert q.enqueue(b"t1", b"x").created is True
        return
    before = snapshot(needs_a_replica, s.namespace)
    with pytest.raises(NoReplicasError):
        q.enqueue(b"t1", b"x")
    assert snapshot(needs_a_replica, s.namespace) == before
    assert luasched.retry.is_transient(NoReplicasError("NOREPLICAS x"))


@pytest.mark.standalone_only
def test_a_call_refused_with_noreplicas_is_sent_again_until_the_primary_takes_writes(
    needs_a_replica: Client, server: Any
) -> None:
    s = Scheduler(needs_a_replica, "dur", retry=RetryPolicy(attempts=200, base_ms=20, max_ms=20))
    refused = threading.Event()

    def refusals(admin: redis.Redis) -> int:
        return int(admin.info("errorstats").get("errorstat_NOREPLICAS", {}).get("count", 0))

    with redis.Redis(port=server.port) as admin:
        before = refusals(admin)  # the count is the server's since its start

    def allow_writes_once_refused() -> None:
        with redis.Redis(port=server.port) as admin:
            for _ in range(1000):  # at most ~10 s
                if refusals(admin) > before or refused.is_set():
                    break
                time.sleep(0.01)
            admin.config_set("min-replicas-to-write", 0)

    helper = threading.Thread(target=allow_writes_once_refused)
    helper.start()
    try:
        assert s.queue("jobs").enqueue(b"t1", b"x", request_id=b"r1").created is True
    finally:
        refused.set()
        helper.join(10)
    if server.version >= (7, 0):  # the call was refused at least once, then sent again
        with redis.Redis(port=server.port) as admin:
            assert refusals(admin) > before
    assert Scheduler(needs_a_replica, "dur").queue("jobs").stats().ready == 1


def _calls(r: Client, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.standalone_only
def test_durable_calls_take_the_functions_path_when_the_library_is_installed(
    r: Client, server: Any
) -> None:
    s = Scheduler(r, "dur", wait_replicas=1, wait_timeout_ms=10, retry=NO_RETRY)
    q = s.queue("jobs")
    if server.version >= (7, 0):
        s.install_functions()
        command = "fcall"
    else:  # no Functions before 7.0: EVALSHA, as without durable mode
        s.load_scripts()
        command = "evalsha"
    before, waits = _calls(r, command), _calls(r, "wait")
    with pytest.raises(NotReplicated):
        q.enqueue(b"t1", b"x", request_id=b"rf")
    assert (_calls(r, command) - before, _calls(r, "wait") - waits) == (1, 1)
    assert Scheduler(r, "dur").queue("jobs").stats().ready == 1


@pytest.mark.standalone_only
def test_a_durable_call_whose_script_was_flushed_is_loaded_and_sent_again(r: Client) -> None:
    s = Scheduler(r, "dur", wait_replicas=1, wait_timeout_ms=10, retry=NO_RETRY)
    q = s.queue("jobs")
    r.script_flush()
    with pytest.raises(NotReplicated):  # NOSCRIPT, loaded, sent again: it ran once
        q.enqueue(b"t1", b"x", request_id=b"rn")
    assert Scheduler(r, "dur").queue("jobs").stats().ready == 1


@pytest.mark.standalone_only
def test_the_asyncio_batch_reports_not_replicated_for_its_writing_calls(
    server: Any, r: Client
) -> None:
    async def main() -> list[Any]:
        client = server.async_client()
        try:
            s = AsyncScheduler(client, "dur", wait_replicas=1, wait_timeout_ms=10)
            async with s.pipeline() as pipe:
                await pipe.queue("jobs").enqueue(b"t1", b"x", request_id=b"ra")
                await pipe.queue("jobs").stats()
                return await pipe.execute(raise_on_error=False)
        finally:
            await client.aclose()

    enqueued, stats = asyncio.run(main())
    assert isinstance(enqueued, NotReplicated) and enqueued.request_id == b"ra"
    assert stats.ready == 1
