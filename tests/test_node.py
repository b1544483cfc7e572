"""Node.js (ioredis) and Python drive the same namespace with the same scripts.

The Node side is ``tests/node/driver.js`` on ``examples/node/luasched.js``: it reads only what
``luasched export`` wrote (manifest + script files), builds key names from the manifest's key
patterns and calls scripts by name (EVALSHA with the manifest's SHA1, SCRIPT LOAD and one retry
on NOSCRIPT; FCALL when the Functions library is installed). Every scenario runs through EVALSHA,
and on 7.0+ again through FCALL after ``luasched install-functions``; the server's command
counts show which route was taken. One Node process per scenario.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from luasched import Scheduler, key_slot
from luasched.keys import Namespace
from luasched.lock import lock_keys, semaphore_keys
from luasched.queue import QueueKeys
from luasched.render import export, manifest
from support import nodejs
from support.crosslang import (
    SLOT_VECTORS,
    assert_route_taken,
    command_calls,
    readme_block,
    routes,
    use_route,
)
from support.helpers import render_key
from support.nodejs import NodeDriver, node_env, require_node
from support.servers import ROOT, ServerHandle

NS = "xlang"
TASKS = 60  # per direction; each a dequeue + ack round trip
WORKERS = 4
LEASE_MS = 30_000
ONCE = {"request_id": "", "request_ttl_ms": 60_000}


@pytest.fixture(scope="module")
def scripts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``luasched export DIR`` writes: the only thing the Node side reads."""
    directory = tmp_path_factory.mktemp("exported")
    export(directory)
    return directory


def each_route(
    server: ServerHandle, scripts_dir: Path, scenario: Callable[[NodeDriver, str], None]
) -> None:
    """Run ``scenario(node, route)`` once per route on an emptied server (one Node process; it
    detects the library again for each route), and check afterwards that every script call
    took that route."""
    with NodeDriver(server, scripts_dir) as node:
        for route in routes(server):
            use_route(server, route)
            node.request("reset")
            before = command_calls(server)
            scenario(node, route)
            assert_route_taken(server, route, before)


def take_all(server: ServerHandle, queue: str, worker: str) -> list[dict[str, Any]]:
    """A Python worker: dequeue + ack until nothing is ready; what it took."""
    client = server.client()
    try:
        q = Scheduler(client, NS).queue(queue)
        taken = []
        while (lease := q.dequeue(worker, LEASE_MS)) is not None:
            assert q.ack(lease)
            taken.append(
                {
                    "task_id": lease.task_id.decode(),
                    "payload": lease.payload.decode(),
                    "token": lease.token,
                    "worker": worker,
                }
            )
        return taken
    finally:
        client.close()


def python_workers(server: ServerHandle, queue: str, count: int) -> list[dict[str, Any]]:
    """``count`` Python workers (threads, one client each) draining ``queue`` together."""
    results: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = take_all(server, queue, f"py-{index}")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    return [item for result in results for item in result]


def assert_each_once(taken: list[dict[str, Any]], tasks: dict[str, str]) -> None:
    """Every task was taken and acked exactly once, with its payload, each lease with its own
    fencing token (no token handed out twice)."""
    ids = [item["task_id"] for item in taken]
    assert sorted(ids) == sorted(tasks), f"taken {len(ids)} of {len(tasks)}"
    assert len(set(ids)) == len(ids), "a task was taken twice"
    assert all(item["payload"] == tasks[item["task_id"]] for item in taken)
    tokens = [int(item["token"]) for item in taken]
    assert len(set(tokens)) == len(tokens) and min(tokens) >= 1, "a token was handed out twice"


def assert_queue_empty(server: ServerHandle, queue: str) -> None:
    client = server.client()
    try:
        stats = Scheduler(client, NS).queue(queue).stats()
    finally:
        client.close()
    assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0), stats


def test_node_enqueues_python_workers_take_each_once(
    server: ServerHandle, scripts_dir: Path
) -> None:
    def scenario(node: NodeDriver, route: str) -> None:
        tasks = {f"node-task-{i}": f"from node {i} ({route})" for i in range(TASKS)}
        enqueued = node.request("enqueue", ns=NS, queue="jobs", tasks=list(tasks.items()))
        assert enqueued["replies"] == [[1, "ready"]] * TASKS
        assert enqueued["route"] == route
        taken = python_workers(server, "jobs", WORKERS)
        assert_each_once(taken, tasks)
        assert_queue_empty(server, "jobs")

    each_route(server, scripts_dir, scenario)


def test_python_enqueues_node_workers_take_each_once(
    server: ServerHandle, scripts_dir: Path
) -> None:
    def scenario(node: NodeDriver, route: str) -> None:
        client = server.client()
        try:
            q = Scheduler(client, NS).queue("jobs")
            tasks = {f"py-task-{i}": f"from python {i} ({route})" for i in range(TASKS)}
            for task_id, payload in tasks.items():
                assert q.enqueue(task_id, payload).created
        finally:
            client.close()
        worked = node.request("work", ns=NS, queue="jobs", workers=WORKERS, lease_ms=LEASE_MS)
        assert worked["routes"] == [route]
        assert_each_once(worked["taken"], tasks)
        assert {item["worker"] for item in worked["taken"]} <= {f"node-{i}" for i in range(WORKERS)}
        assert_queue_empty(server, "jobs")

    each_route(server, scripts_dir, scenario)


def test_node_and_python_workers_race_for_one_queue(
    server: ServerHandle, scripts_dir: Path
) -> None:
    def scenario(node: NodeDriver, route: str) -> None:
        node.request("hello")  # the Node process is up before the race starts
        client = server.client()
        try:
            q = Scheduler(client, NS).queue("race")
            tasks = {f"task-{i}": f"payload {i}" for i in range(2 * TASKS)}
            for task_id, payload in tasks.items():
                q.enqueue(task_id, payload)
        finally:
            client.close()
        from_python: list[dict[str, Any]] = []
        racer = threading.Thread(
            target=lambda: from_python.extend(python_workers(server, "race", 2))
        )
        racer.start()
        worked = node.request("work", ns=NS, queue="race", workers=2, lease_ms=LEASE_MS)
        racer.join(timeout=60)
        assert not racer.is_alive()
        assert_each_once(from_python + worked["taken"], tasks)
        assert_queue_empty(server, "race")

    each_route(server, scripts_dir, scenario)


def test_python_dispatches_node_workers_take_from_their_node_queue(
    server: ServerHandle, scripts_dir: Path
) -> None:
    """Python dispatches to two nodes (queue.dispatch, round robin); a Node worker per node takes
    its node's tasks (queue.node_dequeue) and acks them (queue.node_ack): each node's worker gets
    exactly the tasks dispatched to its node, each once, and the loads go back to zero."""

    def scenario(node: NodeDriver, route: str) -> None:
        client = server.client()
        try:
            s = Scheduler(client, NS)
            for name in ("n1", "n2"):
                s.nodes.register(name, capacity=1000)
            q = s.queue("dispatched")
            sent: dict[str, dict[str, str]] = {"n1": {}, "n2": {}}
            for i in range(TASKS):
                task_id, payload = f"d-{i}", f"for a node {i} ({route})"
                placed = q.dispatch(task_id, payload, strategy="round_robin")
                assert placed.created
                sent[placed.node.decode()][task_id] = payload
            assert all(sent.values())  # round robin used both nodes
            places = {"ns": NS, "queue": "dispatched"}
            for name, tasks in sent.items():
                taken = []
                while True:
                    reply = node.request(
                        "call",
                        script="queue.node_dequeue",
                        places=places,
                        args={
                            "node_id": name,
                            "worker_id": f"node-{name}",
                            "count": 7,
                            "lease_ms": LEASE_MS,
                            **ONCE,
                        },
                    )["reply"]
                    if len(reply) == 1:
                        break
                    for at in range(1, len(reply), 5):
                        task_id, payload, _, token = reply[at : at + 4]
                        acked = node.request(
                            "call",
                            script="queue.node_ack",
                            places=places,
                            args={"task_id": task_id, "token": token, **ONCE},
                        )
                        assert acked["reply"] == 1
                        taken.append({"task_id": task_id, "payload": payload, "token": token})
                assert sorted(item["task_id"] for item in taken) == sorted(tasks)
                assert all(item["payload"] == tasks[item["task_id"]] for item in taken)
            stats = q.dispatch_stats(["n1", "n2"])
            assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)
            assert {name: counts.load for name, counts in stats.nodes.items()} == {
                b"n1": 0,
                b"n2": 0,
            }
        finally:
            client.close()

    each_route(server, scripts_dir, scenario)


def test_binary_payloads_cross_both_ways(server: ServerHandle, scripts_dir: Path) -> None:
    to_node, to_python = bytes(range(256)), bytes(range(255, -1, -1)) + b"\r\n\x00"

    def scenario(node: NodeDriver, route: str) -> None:
        client = server.client()
        try:
            q = Scheduler(client, NS).queue("bin")
            assert q.enqueue("py-bin", to_node).created
            taken = node.request("take_hex", ns=NS, queue="bin")
            assert (taken["task_id"], taken["payload_hex"]) == ("py-bin", to_node.hex())
            assert taken["route"] == route
            sent = node.request(
                "enqueue_hex", ns=NS, queue="bin", task_id="node-bin", payload_hex=to_python.hex()
            )
            assert sent["reply"] == [1, "ready"]
            lease = q.dequeue("py", LEASE_MS)
            assert lease is not None and (lease.task_id, lease.payload) == (b"node-bin", to_python)
            assert q.ack(lease)
        finally:
            client.close()
        assert_queue_empty(server, "bin")

    each_route(server, scripts_dir, scenario)


def node_acquire(node: NodeDriver, token: str) -> list[Any]:
    return list(
        node.call(
            "lock.acquire",
            {"ns": NS, "name": "report"},
            {
                "token": token,
                "ttl_ms": 10_000,
                "reentrant": 0,
                "fair": 0,
                "wait_ttl_ms": 0,
                "request_id": "",
            },
        )
    )


def node_release(node: NodeDriver, token: str) -> list[Any]:
    return list(
        node.call("lock.release", {"ns": NS, "name": "report"}, {"token": token, "request_id": ""})
    )


def test_lock_held_from_node_blocks_python_fences_keep_growing(
    server: ServerHandle, scripts_dir: Path
) -> None:
    def scenario(node: NodeDriver, route: str) -> None:
        client = server.client()
        try:
            lock = Scheduler(client, NS).lock("report", ttl_ms=10_000, retry_ms=50)
            status, fence_node, *_ = node_acquire(node, "node-owner-1")
            assert status == "acquired"
            assert lock.acquire(blocking=False) is None  # Node holds it

            # A blocking acquire from Python waits until Node releases.
            got: list[Any] = []
            waiter = threading.Thread(target=lambda: got.append(lock.acquire(timeout=20)))
            started = time.monotonic()
            waiter.start()
            time.sleep(0.3)
            assert waiter.is_alive() and not got, "Python acquired a lock Node holds"
            assert node_release(node, "node-owner-1")[:2] == ["released", 0]
            waiter.join(timeout=20)
            waited = time.monotonic() - started
            assert got and got[0] is not None, "Python did not get the lock Node released"
            handle = got[0]
            assert waited >= 0.3
            assert handle.fence > fence_node

            # Python holds it: Node is refused, and Node cannot release Python's hold.
            status, fence, _deadline, count, wait_ms, *_ = node_acquire(node, "node-owner-2")
            assert (status, fence, count) == ("held", 0, 0) and wait_ms >= 1
            assert node_release(node, "node-owner-2")[:2] == ["not_owner", 0]
            assert handle.release().released

            status, fence_after, *_ = node_acquire(node, "node-owner-3")
            assert status == "acquired" and fence_after > handle.fence > fence_node
            assert node_release(node, "node-owner-3")[:2] == ["released", 0]
        finally:
            client.close()

    each_route(server, scripts_dir, scenario)


def keyslot_inputs() -> list[str]:
    names = [f"user:{i}" for i in range(200)] + [f"{{tag{i}}}:x" for i in range(50)]
    return [*SLOT_VECTORS, *names, "", "{}", "{}{x}", "a{b}c{d}", "ключ", "{ключ}😀"]


def test_keyslot_from_node_equals_python(server: ServerHandle, scripts_dir: Path) -> None:
    keys = keyslot_inputs()

    def scenario(node: NodeDriver, route: str) -> None:
        answer = node.request("call", script="slots.keyslot", places={"ns": NS}, args={"key": keys})
        assert answer["route"] == route
        client = server.client()
        try:
            from_python = Scheduler(client, NS).slots.keyslots(keys)
        finally:
            client.close()
        assert answer["reply"] == list(from_python) == [key_slot(key) for key in keys]
        assert {key: answer["reply"][keys.index(key)] for key in SLOT_VECTORS} == SLOT_VECTORS

    each_route(server, scripts_dir, scenario)


@pytest.mark.standalone_only
def test_node_client_answers_luasched_errors_with_their_code(
    server: ServerHandle, scripts_dir: Path
) -> None:
    def scenario(node: NodeDriver, route: str) -> None:
        bad = node.request(
            "call",
            expect_ok=False,
            script="queue.enqueue",
            places={"ns": NS, "queue": "jobs"},
            args={"task_id": "t", "payload": "", "priority": 512, "delay_ms": 0}
            | {"max_attempts": 3, **ONCE},
        )
        assert not bad["ok"] and bad["code"] == "ARG", bad
        assert bad["error"].startswith("LUASCHED_ARG queue.enqueue: "), bad
        # A stale ack (no such lease) is STALE, as in Python.
        stale = node.request(
            "call",
            expect_ok=False,
            script="queue.ack",
            places={"ns": NS, "queue": "jobs"},
            args={"task_id": "nope", "token": 7, **ONCE},
        )
        assert not stale["ok"] and stale["code"] == "STALE", stale

    each_route(server, scripts_dir, scenario)


@pytest.mark.standalone_only
def test_node_reloads_after_script_flush(server: ServerHandle, scripts_dir: Path) -> None:
    require_node()
    server.flush()  # no script loaded, no functions: EVALSHA -> NOSCRIPT -> SCRIPT LOAD -> retry
    with NodeDriver(server, scripts_dir) as node:
        for _ in range(2):
            answer = node.request(
                "call", script="slots.keyslot", places={"ns": NS}, args={"key": ["foo"]}
            )
            assert answer == {"ok": True, "reply": [12182], "route": "evalsha"}
            with server.primaries()[0] as primary:
                sha = manifest()["scripts"]["slots.keyslot"]["sha1"]
                assert primary.script_exists(sha) == [True]
                primary.script_flush()


def test_node_builds_the_keys_python_builds(server: ServerHandle, scripts_dir: Path) -> None:
    require_node()
    namespace = Namespace(NS)
    places = {"ns": NS, "queue": "jobs", "name": "report", "request_id": "rid-1"}
    expected = {
        "queue.dequeue": QueueKeys.of(namespace, "jobs").with_request(b"rid-1"),
        "lock.acquire": lock_keys(namespace, "report", b"rid-1"),
        "lock.semaphore_acquire": semaphore_keys(namespace, "report", b"rid-1"),
        "slots.owner": namespace.registry_keys,
    }
    scripts = manifest()["scripts"]
    with NodeDriver(server, scripts_dir) as node:
        for script, keys in expected.items():
            built = node.request("keys", script=script, places=places)["keys"]
            assert built == [key.decode() for key in keys], script
        # And every script's keys are its manifest patterns, placeholders filled.
        values = {name: value.encode() for name, value in places.items() if name != "ns"}
        for script, entry in scripts.items():
            built = node.request("keys", script=script, places=places)["keys"]
            assert built == [
                render_key(key["pattern"], namespace, values).decode() for key in entry["keys"]
            ], script


@pytest.mark.standalone_only
def test_node_example_from_the_readme_runs(server: ServerHandle, scripts_dir: Path) -> None:
    """examples/node/example.js (the README's Node snippet) on a real server, by both routes."""
    node = require_node()
    # The README's Node block is this file's code: each of its lines, in order.
    example = (ROOT / "examples" / "node" / "example.js").read_text().splitlines()
    position = 0
    for line in readme_block("js").splitlines():
        stripped = [text.strip() for text in example[position:]]
        assert line.strip() in stripped, f"README line not in example.js (in order): {line}"
        position += stripped.index(line.strip()) + 1
    for route in routes(server):
        use_route(server, route)
        done = subprocess.run(
            [node, str(ROOT / "examples" / "node" / "example.js")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**node_env(), "REDIS_URL": server.url, "LUASCHED_SCRIPTS": str(scripts_dir)},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 3, lines
        assert lines[0] == "enqueued task-1: created=1 state=ready"
        leased = re.fullmatch(r"leased task-1: payload=hello attempt=1 token=([1-9]\d*)", lines[1])
        assert leased, lines
        assert lines[2] == f"acked task-1 (via {route})"
        client = server.client()
        try:
            stats = Scheduler(client, "orders").queue("emails").stats()
            assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)
            assert client.hget(b"luasched:{orders}:q:tasks:emails", b"fence") == leased[1].encode()
        finally:
            client.close()


def test_missing_node_or_node_modules_fails_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without node, or without the npm dependencies, the Node tests fail (never skip) and say
    what to install."""
    monkeypatch.setattr(nodejs, "NODE_MODULES", tmp_path / "node_modules")
    with pytest.raises(pytest.fail.Exception, match=r"make node-deps"):
        require_node()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"node not found.*apt-get install nodejs npm"):
        require_node()
