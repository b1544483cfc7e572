"""Fencing tokens never repeat or go back, even on a server that lost its last grants (issue 19):
lock fences, queue lease tokens (with and without groups) and node-queue lease tokens
(docs/guarantees.md, "Fencing tokens"; the rule is lua/include/fence.j2).

A promoted replica that missed the last writes holds the keys as they were before them. Each
test stands in for that with a rollback on one server: every key of the namespace is DUMPed,
more tokens are handed out, then the namespace is put back exactly as DUMPed (RESTORE, with the
TTLs it had) and tokens are handed out again. Every token after the rollback must be larger than
every token before it, those the rollback forgot included. On the old rule (the stored counter
+ 1) the first token after the rollback repeats the first forgotten one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.cluster

from luasched import Scheduler
from luasched.keys import Namespace
from luasched.lock import semaphore_acquire_call
from support.helpers import namespace_keys

Client = Any  # redis.Redis or RedisCluster
HOUR = 3_600_000
#: Grants before the snapshot, grants the rollback forgets, grants after it (per round).
BEFORE, FORGOTTEN, AFTER = 3, 5, 3


def primary_of(client: Client, namespace: Namespace) -> Any:
    """The connection that holds ``namespace`` (a cluster: its slot's primary)."""
    if isinstance(client, redis.cluster.RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(namespace.prefix))
    return client


def dump_namespace(client: Client, namespace: Namespace) -> dict[bytes, tuple[bytes, int]]:
    """Every key of ``namespace``: its DUMP and PTTL (-1: none), read in one MULTI."""
    keys = namespace_keys(client, namespace)
    pipe = primary_of(client, namespace).pipeline(transaction=True)
    for key in keys:
        pipe.dump(key)
        pipe.pttl(key)
    replies = pipe.execute()
    return {
        key: (dumped, int(ttl))
        for key, dumped, ttl in zip(keys, replies[0::2], replies[1::2], strict=True)
        if dumped is not None
    }


def roll_back(client: Client, namespace: Namespace, saved: dict[bytes, tuple[bytes, int]]) -> None:
    """Put every key of ``namespace`` back as ``dump_namespace`` saw it: keys made since are
    deleted, the others RESTOREd from their DUMP with the TTL they had then (none: none)."""
    keys = namespace_keys(client, namespace)
    pipe = primary_of(client, namespace).pipeline(transaction=True)
    if keys:
        pipe.delete(*keys)
    for key, (dumped, ttl) in saved.items():
        pipe.restore(key, max(ttl, 1) if ttl >= 0 else 0, dumped)
    pipe.execute()


def rolled_back_round(
    client: Client, namespace: Namespace, grant: Callable[[], list[int]]
) -> tuple[list[int], list[int], list[int]]:
    """``grant`` (one call's tokens) BEFORE times, a snapshot, FORGOTTEN more calls, the rollback,
    AFTER more calls: the tokens of each part."""
    before = [token for _ in range(BEFORE) for token in grant()]
    saved = dump_namespace(client, namespace)
    forgotten = [token for _ in range(FORGOTTEN) for token in grant()]
    roll_back(client, namespace, saved)
    after = [token for _ in range(AFTER) for token in grant()]
    return before, forgotten, after


def assert_never_back(before: list[int], forgotten: list[int], after: list[int]) -> None:
    """Each part strictly grows, and every token after the rollback is larger than every token
    handed out before it (the forgotten ones too): none repeats, none goes back."""
    for part in (before, forgotten, after):
        assert part and part == sorted(part) and len(set(part)) == len(part), part
    assert min(forgotten) > max(before)
    assert min(after) > max(before + forgotten), (before, forgotten, after)


@pytest.mark.parametrize("kind", ["plain", "fair", "reentrant"])
def test_lock_fences_never_repeat_after_a_rollback(r: Client, kind: str) -> None:
    """Plain locks take the lean path of lock.acquire, fair and reentrant ones main()."""
    s = Scheduler(r, "fence-lock")
    lock = s.lock("job", ttl_ms=60_000, fair=kind == "fair", reentrant=kind == "reentrant")

    def grant() -> list[int]:
        handle = lock.acquire(blocking=False)
        assert handle is not None
        assert lock.release(handle).released
        return [handle.fence]

    assert_never_back(*rolled_back_round(r, s.namespace, grant))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("path", ["lean", "main"])
def test_queue_lease_tokens_never_repeat_after_a_rollback(
    r: Client, path: str, grouped: bool
) -> None:
    """dequeue and dequeue_many, on the lean path (ready tasks only) or main() (a due delayed
    task to promote first); ``grouped``: the tasks in three groups (queue.group_dequeue).
    Tokens of one call are consecutive; a batch runs ahead of the clock by its size, and the
    next call still starts above it."""
    s = Scheduler(r, "fence-queue")
    q = s.queue("jobs")
    groups = [f"g{index}" for index in range(3)] if grouped else [None]
    for index in range(60):
        q.enqueue(f"t{index}", b"p", group=groups[index % len(groups)])
    calls = [0]

    def grant() -> list[int]:
        calls[0] += 1
        if path == "main":
            q.enqueue(f"due{calls[0]}", b"p", delay_ms=1, group=groups[0])
            time.sleep(0.003)  # due: the call promotes it first (main())
        many = calls[0] % 2 == 0
        leases = q.dequeue_many("w", 3, HOUR) if many else [q.dequeue("w", HOUR)]
        assert leases and all(lease is not None for lease in leases)
        tokens = [lease.token for lease in leases if lease is not None]
        assert tokens == list(range(tokens[0], tokens[0] + len(tokens)))
        return tokens

    assert_never_back(*rolled_back_round(r, s.namespace, grant))


def test_node_queue_lease_tokens_never_repeat_after_a_rollback(r: Client) -> None:
    s = Scheduler(r, "fence-node")
    s.nodes.register("a", weight=1, capacity=1_000, ttl_ms=HOUR)
    s.slots.rebalance()
    q = s.queue("jobs")
    for index in range(40):
        assert q.dispatch(f"t{index}", b"p", strategy="round_robin").node == b"a"
    node = q.for_node("a")
    calls = [0]

    def grant() -> list[int]:
        calls[0] += 1
        if calls[0] % 2 == 0:
            leases = node.dequeue_many("w", 2, HOUR)
        else:
            lease = node.dequeue("w", HOUR)
            leases = [] if lease is None else [lease]
        assert leases
        return [lease.token for lease in leases]

    assert_never_back(*rolled_back_round(r, s.namespace, grant))


def test_a_replay_answers_its_first_tokens_not_new_ones(r: Client) -> None:
    """A replayed request id answers the tokens of its first reply, later on the clock too
    (queue and node queue; lock replays: tests/test_lock.py)."""
    s = Scheduler(r, "fence-replay")
    s.nodes.register("a", weight=1, capacity=100, ttl_ms=HOUR)
    s.slots.rebalance()
    q = s.queue("jobs")
    for index in range(4):
        q.enqueue(f"t{index}", b"p")
        q.dispatch(f"d{index}", b"p", strategy="round_robin")
    first = q.dequeue_many("w", 2, HOUR, request_id="take-1")
    node_first = q.for_node("a").dequeue_many("w", 2, HOUR, request_id="take-2")
    assert len(first) == len(node_first) == 2
    time.sleep(0.005)
    assert q.dequeue_many("w", 2, HOUR, request_id="take-1") == first
    assert q.for_node("a").dequeue_many("w", 2, HOUR, request_id="take-2") == node_first


def test_semaphore_permit_tokens_never_repeat_after_a_rollback(r: Client) -> None:
    """Permits of a semaphore of 2: a grant, and a holder asking again (a new, larger token)."""
    s = Scheduler(r, "fence-sem")
    sem = s.semaphore("gpu", permits=2, ttl_ms=60_000)
    calls = [0]

    def grant() -> list[int]:
        calls[0] += 1
        permit = sem.acquire(blocking=False)
        assert permit is not None
        tokens = [permit.fence]
        if calls[0] % 2 == 0:  # the holder asks again: same permit, a new token
            again = s.runner.run(
                semaphore_acquire_call(s.namespace, b"gpu", permit.token, 2, 60_000)
            )
            assert again.acquired and again.holders == 1
            tokens.append(again.fence)
        assert sem.release(permit).released
        return tokens

    assert_never_back(*rolled_back_round(r, s.namespace, grant))


def test_semaphore_replies_carry_the_permit_token(r: Client) -> None:
    """The token of a grant is the one stored for the name; a full semaphore answers 0; a
    replayed request id answers the first token, not a new one."""
    s = Scheduler(r, "fence-sem")
    first = s.runner.run(semaphore_acquire_call(s.namespace, b"one", b"a", 1, 60_000, b"rid-1"))
    assert first.acquired and first.fence >= 1
    assert r.get(s.namespace.key("sem-fence", b"one")) == b"%d" % first.fence
    full = s.runner.run(semaphore_acquire_call(s.namespace, b"one", b"b", 1, 60_000))
    assert (full.status, full.fence) == ("full", 0)
    time.sleep(0.005)
    replayed = s.runner.run(semaphore_acquire_call(s.namespace, b"one", b"a", 1, 60_000, b"rid-1"))
    assert replayed == first
    assert r.get(s.namespace.key("sem-fence", b"one")) == b"%d" % first.fence
