"""PNG plots of the scaling series (docs/bench-*.png), drawn from the JSON document alone.

``python -m bench`` draws them after a run, ``--report-from FILE`` again from a stored run.
matplotlib (the ``bench`` extra) draws off-screen (Agg); without it no plot is drawn and the
report says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .report import FLOOR

#: file name -> (title, x-axis label, [(series label, row name pattern with one number)]).
PLOTS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "bench-queue-scaling.png": (
        "queue.dequeue: server CPU per call vs tasks queued",
        "tasks queued",
        [("queue.dequeue", r"queue\.dequeue, ([\d,]+) queued")],
    ),
    "bench-nodes-scaling.png": (
        "picks and slot lookups: server CPU per call vs registered nodes",
        "registered nodes",
        [
            ("slots.owner", r"slots\.owner, ([\d,]+) nodes"),
            ("pick.least_loaded", r"pick\.least_loaded, ([\d,]+) nodes"),
            ("pick.two_choices", r"pick\.two_choices, ([\d,]+) nodes"),
            ("pick.weighted", r"pick\.weighted, ([\d,]+) nodes"),
            ("pick.least_recent", r"pick\.least_recent, ([\d,]+) nodes"),
        ],
    ),
}
#: The two views drawn: (mode, label, line style).
VIEWS = [("pipelined", "pipelined (I/O amortized)", "-"), ("single", "1 client", ":")]


def series(document: dict[str, Any], pattern: str, mode: str) -> list[tuple[int, float]]:
    """(size, median Redis CPU µs per call) of the rows matching ``pattern``, by size."""
    points = []
    for row in document["rows"]:
        found = re.fullmatch(pattern, row["name"])
        result = row["modes"].get(mode)
        if found is None or result is None:
            continue
        value = result["median"].get("cpu_us_per_op")
        if value is not None:
            points.append((int(found.group(1).replace(",", "")), float(value)))
    return sorted(points)


def draw(document: dict[str, Any], directory: Path) -> list[str]:
    """Write the plots that have at least two points into ``directory``; their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    meta = document["meta"]
    server = meta["server"]
    written = []
    for name, (title, xlabel, specs) in PLOTS.items():
        figure, axes = plt.subplots(figsize=(10, 4.5), dpi=100)
        drawn = 0
        for index, (label, pattern) in enumerate(specs):
            color = f"C{index}"
            for mode, view, style in VIEWS:
                points = series(document, pattern, mode)
                if len(points) < 2:
                    continue
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, style, marker="o", color=color, label=f"{label}, {view}")
                drawn += 1
        if not drawn:
            plt.close(figure)
            continue
        floor = next((row for row in document["rows"] if row["name"] == FLOOR), None)
        for mode, view, style in VIEWS if floor is not None else []:
            result = floor["modes"].get(mode)
            if result is not None:
                axes.axhline(
                    result["median"]["cpu_us_per_op"],
                    linestyle=style,
                    color="gray",
                    linewidth=1,
                    label=f"floor ({FLOOR}), {view}",
                )
        axes.set_xscale("log")
        axes.set_ylim(bottom=0)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("Redis main-thread CPU, µs per call")
        axes.set_title(title, fontsize=11)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figure.text(
            0.01,
            0.01,
            f"{server['name']} {server['version']}, {meta['date']}, "
            f"`{meta['command']}` (medians; other jobs share the machine)",
            fontsize=6,
            color="gray",
        )
        figure.tight_layout(rect=(0, 0.03, 1, 1))
        directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(directory / name)
        plt.close(figure)
        written.append(name)
    return written
