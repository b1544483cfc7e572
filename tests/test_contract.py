"""The Python wrappers send exactly the KEYS each script's manifest entry declares, and use the
manifest's enum choices and limits: nothing of the scripts' layout is typed twice.

The expected KEYS are built here from ``manifest()``'s key patterns by plain text substitution
(``{ns}`` and each ``<placeholder>``), independently of ``luasched.contract``, for one call of
every script that takes KEYS; a new script with KEYS fails the coverage test until a call of it
is added below. No server is needed: a Call is what would be sent.
"""

from __future__ import annotations

import random
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from luasched import dispatch, lock, nodes, pick, queue, slots
from luasched.keys import REGISTRY_KEYS, Namespace
from luasched.leases import Lease
from luasched.render import manifest, templates_dir
from luasched.scripts import Call

SCRIPTS: dict[str, dict[str, Any]] = manifest()["scripts"]
NS = Namespace("contract")
QUEUE = b"jobs"
RID = b"rid-7"
LOCK = b"report"
RNG = random.Random(7)
PLACES = {"queue": QUEUE, "request_id": RID, "name": LOCK}


def expected_keys(script: str, request_id: bytes) -> tuple[bytes, ...]:
    """The KEYS of ``script`` by its manifest patterns: ``{ns}`` -> ``{contract}``, each
    ``<placeholder>`` -> its value (``request_id`` as given)."""
    places = {**PLACES, "request_id": request_id}
    out = []
    for key in SCRIPTS[script]["keys"]:
        pattern: str = key["pattern"]
        assert pattern.startswith("luasched:{ns}:"), pattern
        rest = pattern[len("luasched:{ns}:") :].encode()
        filled = re.sub(rb"<([a-z_]+)>", lambda match: places[match[1].decode()], rest)
        out.append(b"luasched:{contract}:" + filled)
    return tuple(out)


QUEUE_KEYS = queue.QueueKeys.of(NS, QUEUE)
DISPATCH_KEYS = dispatch.DispatchKeys.of(NS, QUEUE)
GROUP_KEYS = queue.GroupKeys.of(NS, QUEUE)
LEASE = Lease(b"t", b"", 1, 3, 0, QUEUE_KEYS.tasks)
NODE_LEASE = Lease(b"t", b"", 1, 3, 0, DISPATCH_KEYS.tasks)

#: One call of every script that takes KEYS, and the request id its KEYS carry (b"": none).
CALLS: list[tuple[Callable[[], Call[Any]], bytes]] = [
    (lambda: queue.enqueue_call(QUEUE_KEYS, "t", b"p", request_id=RID), RID),
    (lambda: queue.dequeue_call(QUEUE_KEYS, "w", 1, 1000, request_id=RID), RID),
    (lambda: queue.ack_call(QUEUE_KEYS, LEASE, request_id=RID), RID),
    (lambda: queue.nack_call(QUEUE_KEYS, LEASE, request_id=RID), RID),
    (lambda: queue.extend_call(QUEUE_KEYS, LEASE, 1000), b""),
    (lambda: queue.requeue_dead_call(QUEUE_KEYS, "t"), b""),
    (lambda: queue.stats_call(QUEUE_KEYS), b""),
    (lambda: queue.enqueue_call(GROUP_KEYS, "t", b"p", request_id=RID, group="g"), RID),
    (lambda: queue.dequeue_call(GROUP_KEYS, "w", 1, 1000, request_id=RID), RID),
    (lambda: queue.ack_call(GROUP_KEYS, LEASE, request_id=RID, script="queue.group_ack"), RID),
    (lambda: queue.nack_call(GROUP_KEYS, LEASE, request_id=RID, script="queue.group_nack"), RID),
    (lambda: queue.requeue_dead_call(GROUP_KEYS, "t"), b""),
    (lambda: queue.set_group_call(GROUP_KEYS, "g", weight=2), b""),
    (lambda: queue.set_limits_call(GROUP_KEYS, max_active=3), b""),
    (lambda: queue.set_rate_call(GROUP_KEYS, 10, 2, "g"), b""),
    (lambda: queue.group_stats_call(GROUP_KEYS, ["g"]), b""),
    (lambda: dispatch.dispatch_call(DISPATCH_KEYS, "t", b"", RNG, request_id=RID), RID),
    (lambda: dispatch.node_dequeue_call(DISPATCH_KEYS, "n", "w", 1, 1000, request_id=RID), RID),
    (lambda: dispatch.node_ack_call(DISPATCH_KEYS, NODE_LEASE, request_id=RID), RID),
    (lambda: dispatch.node_nack_call(DISPATCH_KEYS, NODE_LEASE, request_id=RID), RID),
    (lambda: dispatch.node_extend_call(DISPATCH_KEYS, NODE_LEASE, 1000), b""),
    (lambda: dispatch.redispatch_call(DISPATCH_KEYS, "n", RNG), b""),
    (lambda: dispatch.dispatch_requeue_dead_call(DISPATCH_KEYS, "t", RNG), b""),
    (lambda: dispatch.dispatch_stats_call(DISPATCH_KEYS, ["n"]), b""),
    (lambda: lock.acquire_call(NS, LOCK, b"tok", 1000, request_id=RID), RID),
    (lambda: lock.release_call(NS, LOCK, b"tok", RID), RID),
    (lambda: lock.extend_call(NS, LOCK, b"tok", 1000), b""),
    (lambda: lock.semaphore_acquire_call(NS, LOCK, b"tok", 2, 1000, RID), RID),
    (lambda: lock.semaphore_release_call(NS, LOCK, b"tok", RID), RID),
    (lambda: lock.semaphore_extend_call(NS, LOCK, b"tok", 1000), b""),
    (lambda: pick.least_loaded_call(NS, RNG), b""),
    (lambda: pick.two_choices_call(NS, RNG), b""),
    (lambda: pick.release_call(NS, "n"), b""),
    (lambda: pick.round_robin_call(NS), b""),
    (lambda: pick.weighted_call(NS, RNG), b""),
    (lambda: pick.smooth_weighted_call(NS), b""),
    (lambda: pick.least_recent_call(NS), b""),
    (lambda: slots.owner_call(NS, "k"), b""),
    (lambda: slots.owners_call(NS, ["k"]), b""),
    (lambda: slots.owner_of_slot_call(NS, 1), b""),
    (lambda: slots.rebalance_call(NS), b""),
    (lambda: nodes.register_call(NS, "n"), b""),
    (lambda: nodes.heartbeat_call(NS, "n", 1000), b""),
    (lambda: nodes.drain_call(NS, "n"), b""),
    (lambda: nodes.remove_call(NS, "n"), b""),
    (lambda: nodes.list_call(NS), b""),
    (lambda: nodes.sweep_call(NS), b""),
]


@pytest.mark.parametrize(("make", "request_id"), CALLS, ids=[make().script for make, _ in CALLS])
def test_a_call_sends_the_keys_of_its_scripts_manifest(
    make: Callable[[], Call[Any]], request_id: bytes
) -> None:
    call = make()
    assert call.keys == expected_keys(call.script, request_id), call.script


def test_every_script_with_keys_has_a_call_above() -> None:
    covered = {make().script for make, _ in CALLS}
    assert covered == {name for name, entry in SCRIPTS.items() if entry["keys"]}


def test_a_call_without_a_request_id_sends_the_empty_request_key() -> None:
    call = queue.enqueue_call(QUEUE_KEYS, "t", b"p", request_id=b"")
    assert call.keys == expected_keys("queue.enqueue", b"")
    assert call.keys[-1] == b"luasched:{contract}:q:req::jobs"


def test_the_strategy_type_names_the_manifests_choices() -> None:
    choices = next(
        arg["choices"] for arg in SCRIPTS["queue.dispatch"]["argv"] if arg["name"] == "strategy"
    )
    assert typing.get_args(dispatch.Strategy) == tuple(choices)
    assert tuple(choices) == dispatch.STRATEGIES
    assert tuple(choices) == queue.STRATEGIES


def test_the_key_name_tables_are_the_manifests() -> None:
    def names(script: str) -> tuple[str, ...]:
        return tuple(key["pattern"][len("luasched:{ns}:") :] for key in SCRIPTS[script]["keys"])

    assert REGISTRY_KEYS == names("nodes.register") == names("slots.owner")
    assert {name: names(name) for name in SCRIPTS if name.startswith("pick.")} == pick.PICK_KEYS
    assert (
        tuple(pattern.split(":")[1] for pattern in names("queue.dequeue")[:-1])
        == queue.QUEUE_KEY_KINDS
    )
    dispatch_names = names("queue.dispatch")
    assert (
        tuple(pattern.split(":")[1] for pattern in dispatch_names[:6])
        == dispatch.DISPATCH_KEY_KINDS
    )
    assert (
        tuple(pattern for pattern in dispatch_names if "<" not in pattern)
        == dispatch.DISPATCH_REGISTRY_KEYS
    )


def _template_limit(family: str, name: str) -> int:
    text = (Path(templates_dir()) / "include" / f"{family}_limits.j2").read_text()
    match = re.search(rf"^--% set {name} = (-?\d+)$", text, re.M)
    assert match is not None, (family, name)
    return int(match[1])


def test_the_wake_list_bounds_are_the_templates() -> None:
    assert _template_limit("queue", "wake_max") == queue.WAKE_MAX
    assert _template_limit("queue", "wake_ttl_ms") == queue.WAKE_TTL_MS
    assert _template_limit("lock", "wake_max") == lock.LOCK_WAKE_MAX
    assert _template_limit("lock", "wake_ttl_ms") == lock.LOCK_WAKE_TTL_MS
    assert manifest()["limits"]["queue"]["wake_max"] == _template_limit("queue", "wake_max")


def test_a_queue_name_is_the_tail_of_every_queue_key() -> None:
    keys = queue.QueueKeys.of(NS, b"a:b{c}")
    assert keys.with_request(b"x") == tuple(
        key.replace(b":jobs", b":a:b{c}") for key in expected_keys("queue.stats", b"x")
    )
