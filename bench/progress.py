"""The progress display of ``python -m bench`` (on stderr).

On a terminal, one status line is rewritten in place: the current row (its number of all),
its mode and round, the time elapsed and an estimate of the time left; finished rows print
their result line above it. Not on a terminal (a log, CI), the status line is printed once when
each row starts, so the log shows where a run was when it stopped.

The estimate: every step (row, contention row, queue peer) has a planned length from the
settings (``estimate``); the time left is the planned length of the steps not done yet, scaled by
how the finished steps compared with their plan.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, plan: list[float], stream: TextIO = sys.stderr) -> None:
        self.plan = plan
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.perf_counter()
        self.index = -1
        self.label = ""
        self.step_started = self.started
        self.done_planned = 0.0
        self.done_actual = 0.0
        self._shown = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        """Planned seconds of the steps not finished, scaled by how the finished ones went."""
        scale = 1.0
        if self.done_planned > 0:
            scale = min(3.0, max(0.3, self.done_actual / self.done_planned))
        current = 0.0
        if 0 <= self.index < len(self.plan):
            spent = time.perf_counter() - self.step_started
            current = max(0.0, self.plan[self.index] * scale - spent)
        rest = sum(self.plan[self.index + 1 :]) * scale
        return current + rest

    def step(self, label: str) -> None:
        """The next step starts (``label``: its group and name)."""
        if self.index >= 0:
            self._finish_step()
        self.index += 1
        self.label = label
        self.step_started = time.perf_counter()
        self._status("", force=True)

    def phase(self, mode: str, number: int, total: int) -> None:
        """The current step enters ``mode``, round ``number`` of ``total``."""
        self._status(f"{mode} round {number}/{total}" if total > 1 else mode)

    def line(self, text: str) -> None:
        """A permanent line (a finished row's result)."""
        self._clear()
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.index >= 0:
            self._finish_step()
        self._clear()

    def _finish_step(self) -> None:
        if 0 <= self.index < len(self.plan):
            self.done_planned += self.plan[self.index]
            self.done_actual += time.perf_counter() - self.step_started

    def _status(self, detail: str, force: bool = False) -> None:
        if not self.live and not force:
            return
        total = len(self.plan)
        text = (
            f"[{self.index + 1:>2}/{total}] {self.label}"
            + (f" · {detail}" if detail else "")
            + f" · {clock(self.elapsed())} elapsed, ~{clock(self.left())} left"
        )
        if self.live:
            width = 160
            self.stream.write("\r\x1b[K" + text[:width])
            self.stream.flush()
            self._shown = True
        else:
            print(f"-> {text}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.live and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
