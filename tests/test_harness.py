"""The test servers themselves: right product and version, loopback only, cluster, flush."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

from luasched import Scheduler
from luasched.keys import Namespace
from support.helpers import digest_command, digests, namespace_keys
from support.servers import (
    CLUSTER_NODE_TIMEOUT_MS,
    EXPECTED_FULL_VERSION,
    SERVER_NAMES,
    SPECS,
    ServerHandle,
    parse_server_selection,
)
from support.twins import LAPSE_MARGIN_MS, QueueTwins

TESTS_DIR = Path(__file__).resolve().parent


def test_every_node_answers_ping(server: ServerHandle) -> None:
    assert server.host == "127.0.0.1"
    assert server.port == server.ports[0]
    assert server.url == f"redis://127.0.0.1:{server.port}"
    assert len(server.ports) == (3 if server.is_cluster else 1)
    for node in server.primaries():
        with node:
            assert node.ping() is True


def test_info_reports_expected_product_and_version(server: ServerHandle) -> None:
    expected = EXPECTED_FULL_VERSION[server.name]
    assert server.name.startswith(server.kind) or server.is_cluster
    for node in server.primaries():
        with node:
            info = node.info("server")
        if server.kind == "valkey":
            assert info.get("server_name") == "valkey"
            assert str(info["valkey_version"]) == expected
            assert str(info["redis_version"]) == "7.2.4"  # Valkey's compatibility claim
        else:
            assert info.get("server_name", "redis") != "valkey"
            assert "valkey_version" not in info
            assert str(info["redis_version"]) == expected
        major, minor = (int(part) for part in expected.split(".")[:2])
        assert server.version == (major, minor)
        mode = info.get("redis_mode", info.get("server_mode"))  # Valkey 8+: server_mode
        assert mode == ("cluster" if server.is_cluster else "standalone")


def test_every_node_binds_loopback_only_and_persists_nothing(server: ServerHandle) -> None:
    for port, node in zip(server.ports, server.primaries(), strict=True):
        with node:
            # redis-py decodes CONFIG GET replies whatever decode_responses says.
            assert node.config_get("bind") == {"bind": "127.0.0.1"}
            assert node.config_get("port") == {"port": str(port)}
            assert node.config_get("save") == {"save": ""}
            assert node.config_get("appendonly") == {"appendonly": "no"}
            enabled = node.config_get("cluster-enabled")["cluster-enabled"]
            assert enabled == ("yes" if server.is_cluster else "no")
            if server.is_cluster:
                timeout = node.config_get("cluster-node-timeout")["cluster-node-timeout"]
                assert int(timeout) == CLUSTER_NODE_TIMEOUT_MS


def test_standard_lua_libraries_are_present(server: ServerHandle) -> None:
    # The images hold only what `ldd` lists: prove the scripting engine is complete.
    script = (
        "return {cjson.encode({1, 2}), cmsgpack.pack(7), bit.band(7, 3), struct.pack('>I2', 1)}"
    )
    for node in server.primaries():
        with node:
            assert node.eval(script, 0) == [b"[1,2]", b"\x07", 3, b"\x00\x01"]


def test_clients_have_the_promised_types(server: ServerHandle) -> None:
    client = server.client()
    try:
        if server.is_cluster:
            assert isinstance(client, redis.cluster.RedisCluster)
        else:
            assert type(client) is redis.Redis
        client.set("harness:{t}:bytes", "v")
        assert client.get("harness:{t}:bytes") == b"v"  # decode_responses stays False
    finally:
        client.close()
    decoded = server.client(decode_responses=True)
    try:
        assert decoded.get("harness:{t}:bytes") == "v"
    finally:
        decoded.close()
    primaries = server.primaries()
    assert [p.connection_pool.connection_kwargs["port"] for p in primaries] == server.ports
    for p in primaries:
        assert type(p) is redis.Redis
        p.close()


def test_async_client_works(server: ServerHandle) -> None:
    async def roundtrip() -> bytes | None:
        client = server.async_client()
        if server.is_cluster:
            assert isinstance(client, redis.asyncio.cluster.RedisCluster)
        else:
            assert type(client) is redis.asyncio.Redis
        try:
            await client.set("harness:{t}:async", b"a")
            value: bytes | None = await client.get("harness:{t}:async")
            return value
        finally:
            await client.aclose()

    assert asyncio.run(roundtrip()) == b"a"


def test_flush_empties_keys_scripts_and_functions(server: ServerHandle) -> None:
    client = server.client()
    try:
        for i in range(64):  # untagged keys: on the cluster they land on every primary
            client.set(f"harness:flush:{i}", i)
    finally:
        client.close()
    sha = ""
    for node in server.primaries():
        with node:
            assert node.dbsize() > 0
            sha = node.script_load("return 'harness'")
            assert node.script_exists(sha) == [True]
            if server.version >= (7, 0):
                node.function_load(
                    "#!lua name=harnesslib\n"
                    "redis.register_function('harness_fn', function() return 1 end)"
                )
    server.flush()
    for node in server.primaries():
        with node:
            assert node.dbsize() == 0
            assert node.script_exists(sha) == [False]
            if server.version >= (7, 0):
                assert node.function_list() == []


def test_r_fixture_starts_empty(r: redis.Redis | redis.cluster.RedisCluster) -> None:
    assert r.get("harness:flush:0") is None
    r.set("harness:r", b"1")
    assert r.get("harness:r") == b"1"


@pytest.mark.cluster_only
def test_cluster_has_three_primaries_covering_every_slot(server: ServerHandle) -> None:
    assert server.is_cluster
    for node in server.primaries():
        with node:
            assert node.cluster("INFO")["cluster_state"] == "ok"
            ranges = node.execute_command("CLUSTER", "SLOTS")
            owners = {int(r[2][1]) for r in ranges}
            assert owners == set(server.ports)
            assert all(r[2][0] in (b"127.0.0.1", "127.0.0.1") for r in ranges)
            assert sum(int(r[1]) - int(r[0]) + 1 for r in ranges) == 16384
            nodes = node.execute_command("CLUSTER", "NODES").decode().splitlines()
            masters = [line for line in nodes if "master" in line.split()[2]]
            assert len(masters) == 3
            assert len(nodes) == 3  # no replicas
            # CRC16/XMODEM vectors with hash tags, as any Redis Cluster answers them.
            vectors = {
                "foo": 12182,
                "{foo}bar": 12182,
                "123456789": 12739,
                "{user1000}.following": 3443,
                "foo{}{bar}": 8363,
            }
            for key, slot in vectors.items():
                assert node.cluster("KEYSLOT", key) == slot


@pytest.mark.cluster_only
def test_cluster_client_reaches_every_node(
    server: ServerHandle, r: redis.cluster.RedisCluster
) -> None:
    assert sorted(n.port for n in r.get_primaries()) == sorted(server.ports)
    for i in range(32):
        r.set(f"spread:{i}", i)
    for node in server.primaries():
        with node:
            assert node.dbsize() > 0


@pytest.mark.standalone_only
def test_standalone_client_is_plain(server: ServerHandle, r: redis.Redis) -> None:
    assert not server.is_cluster
    assert server.primaries()[0].connection_pool.connection_kwargs["port"] == server.port
    assert r.dbsize() == 0


# --------------------------------------------------------------------------------------------
# Selection and parametrization (no server needed)


def test_server_selection_parsing() -> None:
    assert parse_server_selection(None) == list(SERVER_NAMES)
    assert parse_server_selection("all") == list(SERVER_NAMES)
    assert parse_server_selection(" cluster , redis-6.2,redis-6.2") == ["redis-6.2", "cluster"]
    with pytest.raises(ValueError, match=r"redis-9\.9"):
        parse_server_selection("redis-7.0,redis-9.9")
    assert set(SPECS) == {
        "redis-6.2", "redis-7.0", "redis-8.2", "valkey-8.1", "valkey-9.1", "cluster"
    }  # fmt: skip


@pytest.fixture
def harness_copy(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((TESTS_DIR / "conftest.py").read_text())
    support = pytester.mkpydir("support")
    (support / "servers.py").write_text((TESTS_DIR / "support" / "servers.py").read_text())
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            addopts = --strict-markers -p no:hypothesispytest -p no:cacheprovider
            markers =
                cluster_only: x
                standalone_only: x
            """
        )
    )
    pytester.makepyfile(
        test_gen=textwrap.dedent(
            """
            import pytest

            def test_any(server): pass

            def test_r(r): pass

            @pytest.mark.standalone_only
            def test_standalone(server): pass

            @pytest.mark.cluster_only
            def test_cluster(server): pass

            def test_no_server(): pass
            """
        )
    )
    return pytester


def test_parametrization_ids_and_markers(harness_copy: pytest.Pytester) -> None:
    result = harness_copy.runpytest("--collect-only", "-q", "--backend=local")
    ids = {line.strip() for line in result.outlines if "::" in line}
    expected = {f"test_gen.py::test_any[{n}]" for n in SERVER_NAMES}
    expected |= {f"test_gen.py::test_r[{n}]" for n in SERVER_NAMES}
    expected |= {f"test_gen.py::test_standalone[{n}]" for n in SERVER_NAMES if n != "cluster"}
    expected |= {"test_gen.py::test_cluster[cluster]", "test_gen.py::test_no_server"}
    assert ids == expected


def test_explicit_selection_deselects_tests_without_a_server(
    harness_copy: pytest.Pytester,
) -> None:
    result = harness_copy.runpytest(
        "--collect-only", "-q", "--backend=local", "--servers=redis-6.2"
    )
    ids = {line.strip() for line in result.outlines if "::" in line}
    assert "test_gen.py::test_standalone[redis-6.2]" in ids
    assert not any("test_cluster" in i for i in ids)
    result.stdout.fnmatch_lines(["*1 deselected*"])
    assert result.ret == 0


def test_unknown_server_is_a_usage_error(harness_copy: pytest.Pytester) -> None:
    result = harness_copy.runpytest("--collect-only", "--servers=redis-6.2,nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown server name(s) nope*"])


def test_twin_comparison_reports_exactly_the_keys_that_differ(
    r: redis.Redis | redis.cluster.RedisCluster,
) -> None:
    """The lean-path tests compare twin queues on the server (support/twins.py COMPARE_SCRIPT):
    it must see every kind of difference, and no difference where there is none."""
    s = Scheduler(r, "twins-check")
    twins = QueueTwins(r, s)
    conn = twins.conn
    for key in namespace_keys(conn, s.namespace):  # the fences QueueTwins may have set
        conn.delete(key)

    def pair(name: str, lean: list[tuple[object, ...]], full: list[tuple[object, ...]]) -> None:
        for queue, commands in ((b"lean", lean), (b"full", full)):
            key = s.namespace.key(name, queue)
            for command in commands:
                conn.execute_command(command[0], key, *command[1:])

    same = {
        "string": ([("SET", "v")], [("SET", "v")]),
        "hash-order": ([("HSET", "a", 1, "b", 2)], [("HSET", "b", 2, "a", 1)]),
        "zset": ([("ZADD", 1, "x", 2, "y")], [("ZADD", 2, "y", 1, "x")]),
        "list": ([("RPUSH", "a", "b")], [("RPUSH", "a", "b")]),
        "set-order": ([("SADD", "a", "b")], [("SADD", "b", "a")]),
        "ttls-close": ([("SET", "v", "PX", 60_000)], [("SET", "v", "PX", 60_010)]),
        "lapsing": ([("SET", "v", "PX", LAPSE_MARGIN_MS // 3)], []),
    }
    different = {
        "string-value": ([("SET", "v")], [("SET", "w")]),
        "hash-value": ([("HSET", "a", 1)], [("HSET", "a", 2)]),
        "hash-field": ([("HSET", "a", 1)], [("HSET", "a", 1, "b", 1)]),
        "zset-score": ([("ZADD", 1, "x")], [("ZADD", 2, "x")]),
        "list-order": ([("RPUSH", "a", "b")], [("RPUSH", "b", "a")]),
        "set-member": ([("SADD", "a")], [("SADD", "b")]),
        "missing": ([("SET", "v")], []),
        "type": ([("SET", "v")], [("RPUSH", "v")]),
        "ttl-one-side": ([("SET", "v", "PX", 60_000)], [("SET", "v")]),
        "ttls-apart": ([("SET", "v", "PX", 60_000)], [("SET", "v", "PX", 70_000)]),
    }
    for name, (lean, full) in {**same, **different}.items():
        pair(name, lean, full)
    reported = {name[len(s.namespace.prefix) :].decode() for name in twins.different_keys()}
    assert reported == set(different)
    with pytest.raises(AssertionError):
        twins.assert_same_keys("differences")
    for name in different:
        for queue in (b"lean", b"full"):
            conn.delete(s.namespace.key(name, queue))
    twins.assert_same_keys("none left")


def test_digests_tell_contents_apart_and_ignore_encodings(
    r: redis.Redis | redis.cluster.RedisCluster,
) -> None:
    """The fuzz and key-layout checks compare DIGEST_SCRIPT's digests: equal for equal contents
    (hash fields and set members in another order, a TTL's countdown), different for any other
    value, type or TTL presence, and DBSIZE beside them."""
    conn = QueueTwins(r, Scheduler(r, "digest-check")).conn  # the namespace's node
    space = Namespace("digest-check")

    def digest_of(commands: list[tuple[object, ...]]) -> bytes:
        key = space.key("k")
        conn.delete(key)
        for command in commands:
            conn.execute_command(command[0], key, *command[1:])
        found, size = digests([key], conn.execute_command(*digest_command([key])))
        assert size == conn.dbsize()
        return found[key]

    variants = {
        "string": [("SET", "v")],
        "string-ttl": [("SET", "v", "PX", 60_000)],
        "string-other": [("SET", "w")],
        "hash": [("HSET", "a", 1, "b", 2)],
        "hash-value": [("HSET", "a", 1, "b", 3)],
        "hash-pairs": [("HSET", "a", 2, "b", 1)],
        "list": [("RPUSH", "a", "b")],
        "list-order": [("RPUSH", "b", "a")],
        "set": [("SADD", "a", "b")],
        "set-other": [("SADD", "a", "c")],
        "zset": [("ZADD", 1, "a", 2, "b")],
        "zset-score": [("ZADD", 1, "a", 3, "b")],
        "absent": [],
    }
    found = {name: digest_of(commands) for name, commands in variants.items()}
    assert len(set(found.values())) == len(variants), found
    assert digest_of([("HSET", "b", 2), ("HSET", "a", 1)]) == found["hash"]
    assert digest_of([("SADD", "b", "a")]) == found["set"]
    assert digest_of([("SET", "v", "PX", 90_000)]) == found["string-ttl"]
    big = [
        ("HSET", *(f"f{i}" for i in range(600) for _ in range(2)))
    ]  # a hashtable, not a listpack
    small = [("HSET", f"f{i}", f"f{i}") for i in reversed(range(600))]
    assert digest_of(big) == digest_of(small)
