"""`make demo` (examples/demo.py) runs to its summary on a throwaway server of its own: every
dispatched task acknowledged exactly once, a worker killed mid-lease, its tasks delivered again
on live nodes, moved there by the live workers' own dequeues (no supervisor)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def figure(output: str, label: str) -> int:
    """The first integer after ``label`` at the start of a summary line."""
    found = re.search(rf"^  {re.escape(label)}\s+(-?\d+)", output, re.MULTILINE)
    assert found, (label, output[-2000:])
    return int(found[1])


@pytest.mark.slow
def test_demo_runs_to_its_summary() -> None:
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, (out[-3000:], done.stderr[-3000:])
    assert "started " in out and "(stopped at the end)" in out
    assert "\nsummary:\n" in out
    # Not a TTY here: periodic lines instead of the refreshing table.
    assert "\x1b[" not in out and len(re.findall(r"^t=\s*\d+\.\ds acked=", out, re.M)) >= 2
    total = 3000
    assert figure(out, "tasks dispatched") == total
    acked = re.search(
        r"^  tasks acknowledged\s+(\d+) \(distinct task ids acked: (\d+)\)", out, re.M
    )
    assert acked and (int(acked[1]), int(acked[2])) == (total, total)
    left = re.search(
        r"ready (\d+), leased (\d+), delayed (\d+), dead (\d+); load left on nodes (\d+)", out
    )
    assert left and [int(value) for value in left.groups()] == [0, 0, 0, 0, 0]
    assert re.search(r"node-c worker\s+killed by SIGKILL at t=\d+\.\ds \(exit code -9\)", out)
    assert figure(out, "redelivered") >= 1
    assert figure(out, "healed") >= 1  # the killed worker held a lease: a live node ran it
    seconds = re.search(r"^  time\s+(\d+\.\d) s", out, re.M)
    assert seconds  # how long it took is reported, not asserted (a loaded machine is slower)
    assert "every task done exactly once: yes" in out
