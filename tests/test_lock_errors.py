"""Every error of every lock.* script, and "bad input leaves every key untouched" (DUMP)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from luasched import CorruptState, InvalidArgument, Namespace, Scheduler
from luasched.lock import (
    acquire_call,
    lock_keys,
    new_token,
    semaphore_acquire_call,
    semaphore_keys,
)
from luasched.render import render_all
from support.helpers import namespace_keys, snapshot

NS = "lkerr"
TOKEN = b"t" * 16
LOCK = lock_keys(Namespace(NS), b"e", b"rid")
SEM = semaphore_keys(Namespace(NS), b"e", b"rid")
GOOD = {
    "lock.acquire": (LOCK, [TOKEN, b"1000", b"0", b"0", b"0", b""]),
    "lock.release": (LOCK, [TOKEN, b""]),
    "lock.extend": (LOCK, [TOKEN, b"1000"]),
    "lock.semaphore_acquire": (SEM, [TOKEN, b"2", b"1000", b""]),
    "lock.semaphore_release": (SEM, [TOKEN, b""]),
    "lock.semaphore_extend": (SEM, [TOKEN, b"1000"]),
}


def changed(script: str, position: int | None, value: bytes | None, keys: int = 0) -> Any:
    """The good call of ``script`` with ARGV[position] replaced (None: removed), or with the
    last ``keys`` KEYS dropped."""
    key_list, args = GOOD[script]
    args = list(args)
    if position is not None:
        if value is None:
            del args[position]
        else:
            args[position] = value
    return (list(key_list[: len(key_list) - keys]), args)


ARG_CASES = [
    ("lock.acquire", changed("lock.acquire", None, None, keys=1), "expected 5 key(s), got 4"),
    ("lock.acquire", changed("lock.acquire", 5, None), "expected 6 argument(s), got 5"),
    ("lock.acquire", changed("lock.acquire", 0, b""), "token must be 1 to 256 bytes long"),
    ("lock.acquire", changed("lock.acquire", 0, b"x" * 257), "token must be 1 to 256 bytes"),
    ("lock.acquire", changed("lock.acquire", 1, b"0"), "ttl_ms must be between 1 and"),
    ("lock.acquire", changed("lock.acquire", 1, b"1e3"), "ttl_ms must be an integer"),
    ("lock.acquire", changed("lock.acquire", 1, b"31536000001"), "ttl_ms must be between"),
    ("lock.acquire", changed("lock.acquire", 2, b"2"), "reentrant must be one of 0|1"),
    ("lock.acquire", changed("lock.acquire", 3, b"yes"), "fair must be one of 0|1"),
    ("lock.acquire", changed("lock.acquire", 4, b"-1"), "wait_ttl_ms must be between 0"),
    ("lock.acquire", changed("lock.acquire", 5, b"r" * 65), "request_id must be 0 to 64"),
    ("lock.release", changed("lock.release", None, None, keys=5), "expected 5 key(s), got 0"),
    ("lock.release", changed("lock.release", 1, None), "expected 2 argument(s), got 1"),
    ("lock.release", changed("lock.release", 0, b""), "token must be 1 to 256 bytes"),
    ("lock.release", changed("lock.release", 1, b"r" * 65), "request_id must be 0 to 64"),
    ("lock.extend", changed("lock.extend", 1, b"0"), "ttl_ms must be between 1 and"),
    ("lock.extend", changed("lock.extend", 1, b" 5"), "ttl_ms must be an integer"),
    ("lock.extend", changed("lock.extend", 0, b"x" * 300), "token must be 1 to 256 bytes"),
    ("lock.extend", changed("lock.extend", None, None, keys=1), "expected 5 key(s), got 4"),
    ("lock.semaphore_acquire", changed("lock.semaphore_acquire", 1, b"0"), "permits must be"),
    ("lock.semaphore_acquire", changed("lock.semaphore_acquire", 1, b"1000001"), "permits must"),
    ("lock.semaphore_acquire", changed("lock.semaphore_acquire", 2, b"0x10"), "ttl_ms must be an"),
    ("lock.semaphore_acquire", changed("lock.semaphore_acquire", 3, b"r" * 65), "request_id must"),
    ("lock.semaphore_acquire", changed("lock.semaphore_acquire", 3, None), "expected 4 argument"),
    (
        "lock.semaphore_acquire",
        changed("lock.semaphore_acquire", None, None, keys=1),
        "expected 4 key",
    ),
    ("lock.semaphore_release", changed("lock.semaphore_release", 0, b""), "token must be 1 to 256"),
    ("lock.semaphore_release", changed("lock.semaphore_release", 1, b"r" * 65), "request_id must"),
    (
        "lock.semaphore_release",
        changed("lock.semaphore_release", None, None, keys=3),
        "expected 4 key",
    ),
    (
        "lock.semaphore_extend",
        changed("lock.semaphore_extend", 1, b"x"),
        "ttl_ms must be an integer",
    ),
    ("lock.semaphore_extend", changed("lock.semaphore_extend", 1, None), "expected 2 argument"),
]


def populate(r: Any) -> Scheduler:
    """Some live state in every key a lock script touches, so a stray write would show."""
    s = Scheduler(r, NS)
    s.runner.run(acquire_call(s.namespace, b"e", new_token(), 60_000))
    s.runner.run(acquire_call(s.namespace, b"e", new_token(), 60_000, wait_ttl_ms=60_000))
    for _ in range(2):
        s.runner.run(semaphore_acquire_call(s.namespace, b"e", new_token(), 2, 60_000))
    r.set(LOCK[4], b"acquired 1 2 3 4 5 6")
    r.lpush(LOCK[3], b"1")
    r.zadd(LOCK[1], {b"q": 1})
    persist(r)
    return s


def persist(r: Any) -> None:
    """Drop every TTL (snapshot() compares PTTLs, which tick): a script that sets one shows."""
    for key in namespace_keys(r, NS):
        r.persist(key)


def run_raw(r: Any, script: str, keys: list[bytes], args: list[bytes]) -> None:
    r.eval(render_all()[script].text, len(keys), *keys, *args)


@pytest.mark.parametrize(("script", "call", "detail"), ARG_CASES)
def test_bad_input_is_refused_and_changes_nothing(
    r: Any, script: str, call: Any, detail: str
) -> None:
    populate(r)
    before = snapshot(r, NS)
    keys, args = call
    with pytest.raises(redis.ResponseError) as raised:
        run_raw(r, script, keys, args)
    assert str(raised.value).startswith(f"LUASCHED_ARG {script}: {detail}")
    assert snapshot(r, NS) == before


CORRUPT_CASES = [
    # (script, ARGV, which key to break and how); LOCK = lock, queue, places, wake, request
    ("lock.acquire", [TOKEN, b"1000", b"0", b"0", b"0", b""], 0, "string"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"0", b"0", b""], 0, "hash"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"0", b"0", b""], 0, "text"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"0", b"0", b""], 0, "shape"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"0", b"0", b""], 0, "long"),
    ("lock.acquire", [TOKEN, b"1000", b"1", b"0", b"0", b""], 0, "shape"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"1", b"0", b""], 0, "hash"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"0", b"0", b"rid"], 4, "hash"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"1", b"500", b""], 1, "string"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"1", b"500", b""], 2, "string"),
    ("lock.acquire", [TOKEN, b"1000", b"0", b"0", b"500", b""], 2, "string"),
    ("lock.release", [TOKEN, b""], 0, "string"),
    ("lock.release", [TOKEN, b""], 0, "hash"),
    ("lock.release", [TOKEN, b""], 1, "string"),
    ("lock.release", [TOKEN, b""], 2, "string"),
    ("lock.release", [TOKEN, b"rid"], 4, "text"),
    ("lock.extend", [TOKEN, b"1000"], 0, "string"),
    ("lock.extend", [TOKEN, b"1000"], 0, "shape"),
]


def break_key(r: Any, key: bytes, how: str) -> None:
    r.delete(key)
    if how == "string":
        r.set(key, b"not a lock")
    elif how == "hash":
        r.hset(key, b"field", b"value")
    elif how == "text":
        r.set(key, b"12 monkeys")
    elif how == "shape":
        r.set(key, b"1 1 99 2 7 " + TOKEN)  # waited is not 0 or 1
    elif how == "long":
        r.set(key, b"12345678901234567 0 1 1 0 x")  # a fence of 17 digits


@pytest.mark.parametrize(("script", "args", "key_index", "how"), CORRUPT_CASES)
def test_corrupt_keys_are_refused_and_nothing_changes(
    r: Any, script: str, args: list[bytes], key_index: int, how: str
) -> None:
    break_key(r, LOCK[key_index], how)
    if script == "lock.release" and key_index != 0:
        # The caller holds it and a waiter was refused meanwhile: the release reads the waiters.
        r.set(LOCK[0], b"1 1 %d 1 1 " % (1 << 50) + TOKEN)
    if script == "lock.acquire" and key_index == 2:  # a waiter: the lock is held by another
        r.set(LOCK[0], b"1 1 %d 1 0 o" % (1 << 50))
    before = snapshot(r, NS)
    with pytest.raises(redis.ResponseError) as raised:
        run_raw(r, script, list(LOCK), args)
    assert str(raised.value).startswith(f"LUASCHED_CORRUPT {script}: ")
    assert snapshot(r, NS) == before


def test_wake_list_of_another_type_is_refused_before_the_release(r: Any) -> None:
    s = Scheduler(r, NS)
    holder, waiter = new_token(), new_token()
    s.runner.run(acquire_call(s.namespace, b"e", holder, 60_000))
    s.runner.run(acquire_call(s.namespace, b"e", waiter, 60_000, wait_ttl_ms=60_000))
    r.set(LOCK[3], b"not a list")
    persist(r)
    before = snapshot(r, NS)
    with pytest.raises(CorruptState):
        s.lock("e").release(type("H", (), {"token": holder})())  # type: ignore[arg-type]
    assert snapshot(r, NS) == before


@pytest.mark.parametrize(
    "script", ["lock.semaphore_acquire", "lock.semaphore_release", "lock.semaphore_extend"]
)
def test_semaphore_corrupt_keys(r: Any, script: str) -> None:
    r.set(SEM[0], b"not a zset")
    before = snapshot(r, NS)
    with pytest.raises(redis.ResponseError) as raised:
        run_raw(r, script, list(SEM), GOOD[script][1])
    assert str(raised.value).startswith(f"LUASCHED_CORRUPT {script}: ")
    assert snapshot(r, NS) == before
    # The wake list of a semaphore, checked before a release writes anything.
    r.delete(SEM[0])
    s = Scheduler(r, NS)
    sem = s.semaphore("e", 2)
    handle = sem.acquire()
    assert handle is not None
    r.set(SEM[1], b"not a list")
    persist(r)
    before = snapshot(r, NS)
    with pytest.raises(CorruptState):
        sem.release(handle)
    assert snapshot(r, NS) == before


def test_typed_exceptions_through_the_wrapper(r: Any) -> None:
    s = Scheduler(r, NS)
    with pytest.raises(InvalidArgument) as raised:
        s.runner.run(acquire_call(s.namespace, b"e", b"", 1000))
    assert (raised.value.code, raised.value.script) == ("ARG", "lock.acquire")
    with pytest.raises(ValueError):
        s.lock("e", ttl_ms=0)
    with pytest.raises(ValueError):
        s.semaphore("e", 0)


@pytest.mark.parametrize("stored", [b"not a number", b"1e9", b"hash"])
def test_semaphore_fence_key_of_another_shape_is_corrupt_and_changes_nothing(
    r: Any, stored: bytes
) -> None:
    """lock.semaphore_acquire reads the fence key before its first write: a value that is not a
    plain decimal, or a key of another type, is CORRUPT, for a new permit and a holder's again."""
    s = Scheduler(r, NS)
    sem = s.semaphore("e", 2)
    held = sem.acquire(blocking=False)
    assert held is not None
    if stored == b"hash":
        r.delete(SEM[2])
        r.hset(SEM[2], "f", "v")
    else:
        r.set(SEM[2], stored)
    persist(r)
    before = snapshot(r, NS)
    with pytest.raises(CorruptState):
        sem.acquire(blocking=False)
    with pytest.raises(CorruptState):
        s.runner.run(semaphore_acquire_call(s.namespace, b"e", held.token, 2, 60_000))
    assert snapshot(r, NS) == before
