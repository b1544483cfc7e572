"""Bounded work (issue 9, item 5; tests/support/bounded.py): 1,000,000 expired leases and 20,000 due
delayed tasks, and each dequeue call reclaims exactly 16 leases and promotes exactly 16 tasks (its
bounds) at a cost that does not depend on the backlog: the median server time per call under
1 ms and no more than twice (+ 100 us) that of 10,000 of each. `make chaos` runs the full
version (1,000,000 of each, all of them moved).

Once per session on a throwaway server of its own (the fill takes ~200 MB for a few seconds),
with the binary of redis-7.0 when selected, else of the first standalone server selected.
"""

from __future__ import annotations

from typing import Any

import pytest

from support import bounded
from test_chaos import chosen_binary

LIMIT = 16  # lua/include/queue_limits.j2: reclaim_limit, promote_limit


@pytest.mark.slow
def test_a_million_expired_leases_are_reclaimed_in_bounded_slices(
    luasched_servers: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    binary = chosen_binary(luasched_servers)
    large = bounded.measure(binary, 1_000_000, 300, cpu_batches=4, delayed=20_000)
    small = bounded.measure(
        binary, bounded.BASELINE_BACKLOG, bounded.BASELINE_CALLS, delayed=bounded.BASELINE_BACKLOG
    )
    with capsys.disabled():
        print("\n" + "\n".join(bounded.report([large, small])))
    assert large.calls == 501  # 300 timed, 200 for the CPU figure, the warm-up
    assert large.reclaimed == large.promoted == LIMIT * 501  # exactly the bound, every call
    assert large.leased_after == 1_000_000 - LIMIT * 501 + 501  # each call leased one task
    assert large.ready_after == 2 * LIMIT * 501 - 501
    assert small.reclaimed == small.promoted == LIMIT * 300
    assert len(large.usec) == 300 and min(large.usec) > 0  # every timed call was seen
    assert bounded.check(large, small) == []
