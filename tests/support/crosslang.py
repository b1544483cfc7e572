"""What the cross-language tests (test_node.py, test_redis_cli.py) share: the two call routes,
EVALSHA everywhere and FCALL on 7.0+ after ``luasched install-functions``, and the server's own
count of each command to check which route was taken."""

from __future__ import annotations

from luasched.cli import install_functions
from luasched.render import ScriptConfig
from support.servers import ROOT, ServerHandle

README_SECTION = "## One task from Python, redis-cli and Node"

#: CRC-16/XMODEM vectors, known independently of any code here: CLUSTER KEYSLOT answers these
#: on any Redis Cluster (tests/test_harness.py asks the test cluster).
SLOT_VECTORS = {
    "foo": 12182,
    "{foo}bar": 12182,
    "123456789": 12739,
    "{user1000}.following": 3443,
    "foo{}{bar}": 8363,
}
EVALSHA = "evalsha"
FCALL = "fcall"


def routes(server: ServerHandle) -> list[str]:
    """The routes a script call can take on ``server``: FCALL needs Redis 7.0+ / Valkey."""
    return [EVALSHA, FCALL] if server.version >= (7, 0) else [EVALSHA]


def use_route(server: ServerHandle, route: str) -> None:
    """Empty the server (keys, scripts, functions); for FCALL then install the Functions
    library the way ``luasched install-functions --url URL`` does (its code, in this process: an
    interpreter start per scenario would cost more than the scenario)."""
    server.flush()
    if route == FCALL:
        loaded = install_functions(server.url, ScriptConfig())
        assert len(loaded) == len(server.ports), loaded


def command_calls(server: ServerHandle) -> dict[str, int]:
    """``INFO commandstats`` calls of EVALSHA, FCALL and FCALL_RO, summed over the primaries."""
    totals = {"evalsha": 0, "fcall": 0, "fcall_ro": 0}
    for node in server.primaries():
        with node:
            stats = node.info("commandstats")
        for name in totals:
            totals[name] += int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
    return totals


def calls_since(server: ServerHandle, before: dict[str, int]) -> dict[str, int]:
    """How many EVALSHA / FCALL / FCALL_RO calls the server ran since ``before``."""
    return {name: count - before[name] for name, count in command_calls(server).items()}


def assert_route_taken(server: ServerHandle, route: str, before: dict[str, int]) -> None:
    """Every script call since ``before`` went through ``route``: EVALSHA and no FCALL, or
    FCALL (FCALL_RO) and no EVALSHA. (FCALL_RO also probes for the library, on both routes.)"""
    calls = calls_since(server, before)
    if route == EVALSHA:
        assert calls["evalsha"] > 0 and calls["fcall"] == 0, calls
    else:
        assert calls["fcall"] + calls["fcall_ro"] > 0 and calls["evalsha"] == 0, calls


def readme_block(language: str) -> str:
    """The ``language`` code block of the README's "One task from Python, redis-cli and Node"."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(README_SECTION) :]
    section = section[: section.index("\n## ", 1)]
    return section.split(f"```{language}\n", 1)[1].split("```")[0]
