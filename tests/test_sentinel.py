"""Redis Sentinel: the test topology, ``Scheduler.from_sentinel``, failover recovery and the
durable mode (``wait_replicas``), on one primary, two replicas and three sentinels.

Each test starts its own topology (``sentinel`` fixture: Docker with host networking, or local
processes) of Redis 7.0 and of Redis 8.2, and stops it at its end; they run only when the
version's matrix server is selected."""

from __future__ import annotations

import pytest
import redis

from support.servers import HOST, SentinelTopology

pytestmark = pytest.mark.sentinel


def test_the_topology_fails_over_and_takes_a_killed_primary_back(
    sentinel: SentinelTopology,
) -> None:
    first = sentinel.primary()
    assert first == sentinel.spec.ports[0]
    with redis.Redis(host=HOST, port=first) as node:
        node.set(b"k", b"v")
    sentinel.wait_replicas_synced()

    promoted = sentinel.failover()
    assert promoted != first and promoted in sentinel.spec.ports
    with redis.Redis(host=HOST, port=promoted) as node:
        assert node.info("replication")["role"] == "master"
        assert node.get(b"k") == b"v"
    sentinel.wait_replicas_synced(timeout=40)  # the old primary is reconfigured ~10 s later

    killed, heir = sentinel.kill_primary()
    assert killed == promoted and heir not in (killed,)
    sentinel.restart(killed)
    sentinel.wait_replicas_synced()
    with redis.Redis(host=HOST, port=killed) as node:
        assert node.info("replication")["role"] == "slave"
        assert node.get(b"k") == b"v"
