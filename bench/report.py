"""Results as JSON (every round, medians, machine) and as the markdown report docs/bench.md.

The markdown is built from the JSON document alone, so ``python -m bench --report-from FILE``
can rebuild it without measuring again.
"""

from __future__ import annotations

import math
from typing import Any

from .engine import RowResult

TIMES = "\N{MULTIPLICATION SIGN}"
FLOOR = "EVALSHA return 1"
OWNER_SMALL = "slots.owner, 10 nodes"
OWNER_LARGE = "slots.owner, 10,000 nodes"
OWNER_LIMIT = 1.5
REBALANCE_PREFIX = "slots.rebalance"
#: The views of the slots.owner scaling: key -> (mode, metric, label).
SCALING_VIEWS = {
    "cpu_us_per_call_pipelined": ("pipelined", "cpu_us_per_op", "Redis CPU, pipelined"),
    "cpu_us_per_call": ("single", "cpu_us_per_op", "Redis CPU, 1 client (includes the I/O)"),
    "cmd_us_per_call_pipelined": ("pipelined", "cmd_us_per_op", "commandstats, pipelined"),
    "cmd_us_per_call": ("single", "cmd_us_per_op", "commandstats, 1 client"),
}
#: CPU time of the main thread with the I/O amortized: the server's own cost of the call, and
#: not inflated when the server thread is preempted (commandstats is wall-clock time).
SCALING_VERDICT = "cpu_us_per_call_pipelined"
#: Per group, the row the others are also compared with (besides the floor).
GROUP_REFERENCE = {"locks": "redis-py Lock acquire+release"}
GROUP_TITLES = {
    "floor": "Floors",
    "slots": "Hash slots (`slots.keyslot`)",
    "nodes": "Node registry and slot table (issue 3)",
    "locks": "Lock peers (for the comparison with luasched's lock)",
}


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0 or math.isnan(value):
        return None
    return value / reference


def row_document(row: RowResult) -> dict[str, Any]:
    case = row.case
    return {
        "name": case.name,
        "group": case.group,
        "unit": case.unit,
        "ops_per_call": case.ops_per_call,
        "note": case.note,
        "seconds": round(row.seconds, 3),
        "setup_seconds": round(row.setup_seconds, 3),
        "modes": {
            mode: {
                "median": {key: round(value, 3) for key, value in result.median.items()},
                "rounds": [round_.as_dict() for round_ in result.rounds],
            }
            for mode, result in row.modes.items()
        },
    }


def _median(row: dict[str, Any], mode: str, metric: str) -> float | None:
    found = row["modes"].get(mode)
    return None if found is None else found["median"].get(metric)


def add_derived(document: dict[str, Any]) -> None:
    """Ratios to the floor, the slots.owner scaling and the rebalance figures, in place."""
    rows: list[dict[str, Any]] = document["rows"]
    by_name = {row["name"]: row for row in rows}
    floor = by_name.get(FLOOR)
    floor_cpu = _median(floor, "single", "cpu_us_per_op") if floor else None
    floor_cmd = _median(floor, "single", "cmd_us_per_op") if floor else None
    document["floor"] = {"name": FLOOR, "cpu_us_per_op": floor_cpu, "cmd_us_per_op": floor_cmd}
    for row in rows:
        cpu = _median(row, "single", "cpu_us_per_op")
        cmd = _median(row, "single", "cmd_us_per_op")
        headline: dict[str, Any] = {
            "cpu_us_per_op": cpu,
            "cpu_ratio_to_floor": _round(_ratio(cpu, floor_cpu)),
            "cmd_us_per_op": cmd,
            "cmd_ratio_to_floor": _round(_ratio(cmd, floor_cmd)),
        }
        reference = by_name.get(GROUP_REFERENCE.get(row["group"], ""))
        if reference is not None:
            headline["reference"] = reference["name"]
            headline["cpu_ratio_to_reference"] = _round(
                _ratio(cpu, _median(reference, "single", "cpu_us_per_op"))
            )
            headline["single_ops_ratio_to_reference"] = _round(
                _ratio(
                    _median(row, "single", "ops_per_s"),
                    _median(reference, "single", "ops_per_s"),
                )
            )
        row["headline"] = headline
    small, large = by_name.get(OWNER_SMALL), by_name.get(OWNER_LARGE)
    if small and large:
        scaling: dict[str, Any] = {"rows": [OWNER_SMALL, OWNER_LARGE], "limit": OWNER_LIMIT}
        for key, (mode, metric, _label) in SCALING_VIEWS.items():
            low, high = _median(small, mode, metric), _median(large, mode, metric)
            scaling[key] = {"10": low, "10000": high, "ratio": _round(_ratio(high, low))}
        ratio = scaling[SCALING_VERDICT]["ratio"]
        scaling["verdict_on"] = SCALING_VERDICT
        scaling["within_limit"] = ratio is not None and ratio <= OWNER_LIMIT
        document["scaling"] = {"slots.owner": scaling}
    busy = document["meta"]["server"].get("busy_reply_threshold_ms")
    rebalance = {}
    for row in rows:
        if not row["name"].startswith(REBALANCE_PREFIX):
            continue
        cmd_ms = (_median(row, "single", "cmd_us_per_op") or math.nan) / 1000
        cpu_ms = (_median(row, "single", "cpu_us_per_op") or math.nan) / 1000
        rebalance[row["name"]] = {
            "cmd_ms_per_call": round(cmd_ms, 3),
            "cpu_ms_per_call": round(cpu_ms, 3),
            "busy_reply_threshold_ms": busy,
            "fraction_of_threshold": _round(cmd_ms / busy, 6) if busy else None,
        }
    if rebalance:
        document["rebalance"] = rebalance


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------- markdown


def _us(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{TIMES}"


def _rate(value: float | None) -> str:
    """Three significant digits with thousands separators (client rates are noisy)."""
    if value is None or math.isnan(value):
        return "—"
    return f"{float(f'{value:.3g}'):,.0f}"


def _count(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.0f}" if abs(value - round(value)) < 0.01 else f"{value:.2f}"


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    settings = document["settings"]
    server = meta["server"]
    machine = meta["machine"]
    cpu_source = meta["cpu_source"]
    clients = settings["clients"]
    batch = settings["batch"]
    lines = [
        "# luasched benchmarks",
        "",
        "Generated by `make bench` (bench/); do not edit by hand. Raw data, every round: "
        "[bench/results/latest.json](../bench/results/latest.json).",
        "",
        f"- **Command**: `{meta['command']}`",
        f"- **Date**: {meta['date']} (run took {meta['elapsed_s']:.0f} s)",
        f"- **Machine**: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['platform']}; load average {machine['loadavg_start']} at start, "
        f"{machine['loadavg_end']} at end (other jobs share this machine)",
        f"- **Server**: {server['name']} {server['version']} (`{server['binary']}`), "
        f'throwaway on {server["host"]}, `--save "" --appendonly no`',
        f"- **Client**: Python {machine['python']}, redis-py {machine['redis_py']}",
        f"- **Rounds**: {settings['rounds']} per mode (median shown), each up to "
        f"{settings['seconds']} s and {settings['max_calls']:,} calls",
        "",
        "## What is measured",
        "",
        f"- **Redis CPU µs/op**: {cpu_source}, read with `INFO cpu` before and after each "
        "round, divided by the logical operations done, with one client making one "
        "call per round trip. It includes reading the request and writing the reply (the "
        "system calls), so it is what one operation costs the server in practice. The headline.",
        f"- **{TIMES} floor**: that figure over the same figure for `EVALSHA` of `return 1`, "
        "measured in the same run on the same server: the ratio is what compares across "
        "machines.",
        f"- **CPU µs/op, pipelined**: the same, with {batch} calls per round trip (I/O amortized).",
        "- **cmdstats µs/op**: `INFO commandstats` time of the commands the client sent itself "
        "(a command run inside a script is counted once, inside EVALSHA), per operation: "
        "execution time without the I/O, measured as wall-clock time by the server (it grows "
        "when the server thread is preempted, CPU time does not). **commands/call**: "
        "commands the client sent per call (round trips, unless pipelined).",
        "- **ops/s**: client-observed logical operations per second (Python client, one process; "
        f"pipelined: {batch} calls per round trip; {clients} clients: {clients} processes, "
        "summed). Bounded by the Python client more than by the server.",
        "",
    ]
    floor = document.get("floor", {})
    if floor.get("cpu_us_per_op") is not None:
        lines += [
            f"Floor in this run: `EVALSHA return 1` costs {_us(floor['cpu_us_per_op'])} µs of "
            f"Redis CPU per call ({_us(floor['cmd_us_per_op'])} µs in commandstats).",
            "",
        ]
    groups: list[str] = []
    for row in document["rows"]:
        if row["group"] not in groups:
            groups.append(row["group"])
    for group in groups:
        rows = [row for row in document["rows"] if row["group"] == group]
        reference = GROUP_REFERENCE.get(group)
        has_reference = reference is not None and any(r["name"] == reference for r in rows)
        lines += [f"## {GROUP_TITLES.get(group, group)}", ""]
        header = (
            f"| row | per | Redis CPU µs/op | {TIMES} floor | CPU µs/op pipelined "
            "| cmdstats µs/op | commands/call | ops/s 1 client | ops/s pipelined "
            f"| ops/s {clients} clients |"
        )
        rule = "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
        if has_reference:
            header += f" {TIMES} {reference} |"
            rule += "--:|"
        lines += [header, rule]
        for row in rows:
            headline = row["headline"]
            cells = [
                row["name"],
                row["unit"],
                _us(headline["cpu_us_per_op"]),
                _x(headline["cpu_ratio_to_floor"]),
                _us(_median(row, "pipelined", "cpu_us_per_op")),
                _us(headline["cmd_us_per_op"]),
                _count(_median(row, "single", "commands_per_call")),
                _rate(_median(row, "single", "ops_per_s")),
                _rate(_median(row, "pipelined", "ops_per_s")),
                _rate(_median(row, "multi", "ops_per_s")),
            ]
            if has_reference:
                cells.append(_x(headline.get("cpu_ratio_to_reference")))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        notes = [f"- {row['name']}: {row['note']}" for row in rows if row["note"]]
        lines += [*notes, ""]
        if group == "locks":
            lines += [
                "One lock name per client: uncontended acquire + release (`cycle`), one cycle "
                "per loop; a cycle needs the acquire's reply, so there is no pipelined column. "
                "The CPU column is what each library makes the server do per cycle.",
                "",
            ]
        if group == "nodes":
            lines += _nodes_section(document)
    return "\n".join(lines).rstrip() + "\n"


def _nodes_section(document: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    scaling = document.get("scaling", {}).get("slots.owner")
    if scaling:
        verdict = "yes" if scaling["within_limit"] else "**no**"
        lines += [
            "### `slots.owner` scaling: 10 vs 10,000 registered nodes",
            "",
            "| server-side µs per call | 10 nodes | 10,000 nodes | ratio |",
            "|---|--:|--:|--:|",
        ]
        for key, (_mode, _metric, label) in SCALING_VIEWS.items():
            view = scaling.get(key)
            if view is None:
                continue
            lines.append(
                f"| {label} | {_us(view['10'])} | {_us(view['10000'])} | {_x(view['ratio'])} |"
            )
        lines += [
            "",
            f"Acceptance (issue 3), within {scaling['limit']}{TIMES} on the first line (the "
            f"server's CPU for the call, I/O amortized): {verdict}. Compare rows of one mode "
            "only: the same script costs more per call with one client (the server sleeps "
            "between calls and starts each on cold caches), and commandstats counts wall-clock "
            "time, which grows when other jobs preempt the server.",
            "",
        ]
    rebalance = document.get("rebalance", {})
    if rebalance:
        lines += [
            "### `slots.rebalance`: server-side time per call against the busy threshold",
            "",
            "| call | commandstats ms (wall) | Redis CPU ms | busy-reply-threshold "
            "| share of it (wall) |",
            "|---|--:|--:|--:|--:|",
        ]
        for name, figures in rebalance.items():
            share = figures["fraction_of_threshold"]
            lines.append(
                f"| {name} | {figures['cmd_ms_per_call']:.2f} | {figures['cpu_ms_per_call']:.2f} "
                f"| {figures['busy_reply_threshold_ms']} ms "
                f"| {'—' if share is None else f'{share * 100:.2f} %'} |"
            )
        lines.append("")
    return lines
