"""slots.keyslot on every server: agrees with CLUSTER KEYSLOT and with luasched.key_slot."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import redis

from luasched import InvalidArgument, Scheduler, key_slot
from luasched.render import render_all
from support.helpers import snapshot

# Known independently of our code: CLUSTER KEYSLOT answers these on any Redis Cluster
# (tests/test_harness.py asks the test cluster).
VECTORS = {
    b"foo": 12182,
    b"{foo}bar": 12182,
    b"123456789": 12739,
    b"{user1000}.following": 3443,
    b"foo{}{bar}": 8363,
    b"": 0,
}


def random_keys(count: int, seed: int) -> list[bytes]:
    """Binary, UTF-8 and brace-heavy keys, with braces in every position."""
    rng = random.Random(seed)
    keys: list[bytes] = []
    alphabet = "ab{}{}é漢\x00 \n"
    while len(keys) < count:
        kind = len(keys) % 4
        length = rng.randint(0, 24)
        if kind == 0:
            keys.append(rng.randbytes(length))
        elif kind == 1:
            keys.append("".join(rng.choice(alphabet) for _ in range(length)).encode())
        elif kind == 2:
            base = bytearray(rng.randbytes(length))
            for position in rng.sample(range(length + 1), min(2, length + 1)):
                base.insert(position, rng.choice(b"{}"))
            keys.append(bytes(base))
        else:
            chars = [chr(rng.randint(32, 0x2FFF)) for _ in range(length)]
            keys.append("".join(chars).encode("utf-8", "surrogatepass"))
    return keys


def chunks(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def test_python_key_slot_matches_published_vectors() -> None:
    for key, slot in VECTORS.items():
        assert key_slot(key) == slot
        assert key_slot(key.decode()) == slot


def test_published_vectors(r: redis.Redis) -> None:
    s = Scheduler(r, "ks")
    for key, slot in VECTORS.items():
        assert s.slots.keyslot(key) == slot
    assert s.slots.keyslots(list(VECTORS)) == list(VECTORS.values())
    assert s.slots.keyslot("{user1000}.following") == 3443  # str is sent as UTF-8


def test_ten_thousand_random_keys_agree_with_python(r: redis.Redis) -> None:
    s = Scheduler(r, "ks")
    keys = random_keys(10_000, seed=20261122)
    assert len(set(keys)) > 9_000
    lua = [slot for chunk in chunks(keys, 1000) for slot in s.slots.keyslots(chunk)]
    assert lua == [key_slot(key) for key in keys]
    assert len(set(lua)) > 5_000  # spread over the slot space, not a constant


@pytest.mark.cluster_only
def test_ten_thousand_random_keys_agree_with_cluster_keyslot(server) -> None:  # type: ignore[no-untyped-def]
    client = server.client()
    s = Scheduler(client, "ks")
    keys = random_keys(10_000, seed=7)
    node = server.primaries()[0]
    pipe = node.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("CLUSTER KEYSLOT", key)
    expected = [int(slot) for slot in pipe.execute()]
    lua = [slot for chunk in chunks(keys, 1000) for slot in s.slots.keyslots(chunk)]
    assert lua == expected
    assert [key_slot(key) for key in keys] == expected
    client.close()


def test_longest_key_and_largest_batch_are_accepted(r: redis.Redis) -> None:
    s = Scheduler(r, "ks")
    config = s.config
    long_key = b"x" * config.max_key_bytes
    assert s.slots.keyslot(long_key) == key_slot(long_key)
    batch = [b"k%d" % index for index in range(config.max_batch)]
    assert s.slots.keyslots(batch) == [key_slot(key) for key in batch]


@pytest.mark.parametrize(
    ("keys", "args", "detail"),
    [
        ((), (), "expected 1 to 1000 arguments, got 0"),
        ((), tuple(b"k" for _ in range(1001)), "expected 1 to 1000 arguments, got 1001"),
        ((), (b"x" * 4097,), "key #1 must be 0 to 4096 bytes long, got 4097 bytes"),
        ((), (b"ok", b"y" * 5000), "key #2 must be 0 to 4096 bytes long, got 5000 bytes"),
        ((b"luasched:{ks}:extra",), (b"a",), "expected 0 key(s), got 1"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    r: redis.Redis, keys: tuple[bytes, ...], args: tuple[bytes, ...], detail: str
) -> None:
    s = Scheduler(r, "ks")
    r.set(s.namespace.key("marker"), b"\x00value")
    r.hset(s.namespace.key("table"), mapping={b"a": 1, b"b": b"{x}"})
    before = snapshot(r, s.namespace)
    script = render_all()["slots.keyslot"]
    with pytest.raises(redis.ResponseError) as raw:
        r.eval(script.text, len(keys), *keys, *args)
    assert str(raw.value) == f"LUASCHED_ARG slots.keyslot: {detail}"
    if args and not keys:  # the same through the wrapper, as a typed exception
        with pytest.raises(InvalidArgument) as typed:
            s.slots.keyslots(list(args))
        assert (typed.value.code, typed.value.script, typed.value.detail) == (
            "ARG",
            "slots.keyslot",
            detail,
        )
    if not args:  # the wrapper refuses an empty list itself, before any I/O
        with pytest.raises(InvalidArgument, match=r"keys must hold 1\.\.7000 items, got 0"):
            s.slots.keyslots([])
    assert snapshot(r, s.namespace) == before


def test_a_single_key_is_not_mistaken_for_a_list(r: redis.Redis) -> None:
    s = Scheduler(r, "ks")
    with pytest.raises(InvalidArgument, match="keys must be an iterable"):
        s.slots.keyslots(b"abc")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="key must be bytes or str"):
        s.slots.keyslot(42)  # type: ignore[arg-type]
