"""`make demo` (examples/demo.py) runs to its summary on a throwaway server of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert done.returncode == 0, done.stderr
    assert "started " in done.stdout and "(stopped at the end)" in done.stdout
    assert "NOSCRIPT -> reloaded -> retried once" in done.stdout
    assert "bad input -> InvalidArgument code=ARG" in done.stdout
    assert "summary:" in done.stdout
