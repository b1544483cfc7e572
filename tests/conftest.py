"""Fixtures shared by the whole suite: the test servers and clients on them.

Contract for tests:

- ``server``: a :class:`servers.ServerHandle`. Any test that asks for ``server`` (or ``r``) runs
  once per selected server, with the ids ``redis-6.2``, ``redis-7.0``, ``redis-8.2``,
  ``valkey-8.1``, ``valkey-9.1`` and ``cluster``. ``@pytest.mark.standalone_only`` drops the
  cluster, ``@pytest.mark.cluster_only`` keeps only the cluster (at generation time: nothing is
  reported as skipped).
- ``r``: ``server.flush()``, then a fresh sync client, closed after the test; on the cluster the
  session's one ``RedisCluster`` (making one costs tens of ms: COMMAND, CLUSTER SLOTS).
- ``replicated``: a ``servers.ReplicatedCluster`` (three primaries, each with a replica) started
  for this one test and stopped after it. Tests that ask for it are marked
  ``@pytest.mark.replicated_cluster`` and run only when ``cluster`` is among the selected servers
  (otherwise deselected, like the matrix).
- ``sentinel``: a ``servers.SentinelTopology`` (one primary, two replicas, three sentinels) of
  Redis 7.0 or 8.2, started for this one test and stopped after it. Tests that ask for it are
  marked ``@pytest.mark.sentinel`` and run once per version whose matrix server (``redis-7.0``,
  ``redis-8.2``) is selected (ids ``sentinel-redis-7.0``, ``sentinel-redis-8.2``).

Options (or environment variables):

- ``--backend=auto|docker|local`` (``LUASCHED_BACKEND``): auto uses Docker when ``docker info``
  works and ``docker-compose`` is installed, else local processes.
- ``--servers=all|NAME,NAME`` (``LUASCHED_SERVERS``): which servers to start and test on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
import redis
import redis.cluster

from support.servers import (
    COMPOSE_FILE,
    SENTINEL_TOPOLOGIES,
    SERVER_NAMES,
    SPECS,
    ReplicatedCluster,
    SentinelTopology,
    ServerHandle,
    ServerSpec,
    ServerStartError,
    check_images,
    check_ports_free,
    compose_services,
    create_cluster,
    docker_available,
    local_servers,
    parse_server_selection,
    ping,
    replicated_cluster,
    sentinel_topology,
)

pytest_plugins = ("pytester",)  # tests/test_harness.py checks the parametrization in a sandbox

BACKENDS = ("auto", "docker", "local")
SELECTED = pytest.StashKey[list[str]]()
EXPLICIT = pytest.StashKey[bool]()
BACKEND = pytest.StashKey[str]()
SERVER_OF = pytest.StashKey[dict[str, str]]()
OUTCOMES = pytest.StashKey[dict[str, Counter[str]]]()
SECONDS = pytest.StashKey[dict[str, float]]()
STARTUP = pytest.StashKey[dict[str, float]]()
SERVER_PROPERTY = "luasched_server"
#: The row of the per-server summary for tests that run on no matrix server (render, CLI, chaos...).
NO_SERVER = "(no server)"
UNSELECTED_MARK = "luasched_no_selected_server"
_CONFIG: dict[str, pytest.Config] = {}  # for hooks that are not given the config


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("luasched", "luasched test servers")
    group.addoption(
        "--backend",
        default=None,
        help="how to run the test servers: auto (default; docker if reachable), docker, local. "
        "Env: LUASCHED_BACKEND",
    )
    group.addoption(
        "--servers",
        default=None,
        help=f"'all' (default) or a comma list of: {', '.join(SERVER_NAMES)}. "
        "Env: LUASCHED_SERVERS",
    )


def _terminate_gracefully(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into a KeyboardInterrupt so pytest still tears the session fixtures down
    # (containers down, local servers killed) when a CI runner or `timeout` stops us.
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{UNSELECTED_MARK}: internal, a server test with no selected server to run on"
    )
    servers_opt = config.getoption("--servers")
    raw = servers_opt if servers_opt is not None else os.environ.get("LUASCHED_SERVERS")
    try:
        config.stash[SELECTED] = parse_server_selection(raw)
    except ValueError as exc:
        raise pytest.UsageError(f"--servers / LUASCHED_SERVERS: {exc}") from None
    config.stash[EXPLICIT] = raw is not None and raw.strip() not in ("", "all")

    backend = config.getoption("--backend") or os.environ.get("LUASCHED_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise pytest.UsageError(
            f"--backend / LUASCHED_BACKEND: {backend!r} is not one of {', '.join(BACKENDS)}"
        )
    config.stash[BACKEND] = backend
    config.stash[SERVER_OF] = {}
    config.stash[OUTCOMES] = defaultdict(Counter)
    config.stash[SECONDS] = defaultdict(float)
    config.stash[STARTUP] = {}
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, _terminate_gracefully)


def _resolve_backend(config: pytest.Config) -> str:
    backend = config.stash[BACKEND]
    if backend == "auto":
        usable = docker_available() and shutil.which("docker-compose") is not None
        backend = "docker" if usable else "local"
        config.stash[BACKEND] = backend
    return backend


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"luasched servers: {','.join(config.stash[SELECTED])} "
        f"(backend: {_resolve_backend(config)})"
    )


# --------------------------------------------------------------------------------------------
# Parametrization over the selected servers


#: Where a test marked one_server runs when it is selected (else: the first selected server).
ONE_SERVER = "redis-8.2"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sentinel" in metafunc.fixturenames:
        selected = metafunc.config.stash[SELECTED]
        versions = [name for name in SENTINEL_TOPOLOGIES if name in selected]
        ids = [SENTINEL_TOPOLOGIES[name].name for name in versions]
        if not versions:  # reported as deselected, like the matrix's
            marks = [getattr(pytest.mark, UNSELECTED_MARK)]
            param = pytest.param(None, id="no-selected-server", marks=marks)
            metafunc.parametrize("sentinel", [param], indirect=True)
            return
        metafunc.parametrize("sentinel", versions, indirect=True, ids=ids)
    if "server" not in metafunc.fixturenames:
        return
    config = metafunc.config
    names = list(config.stash[SELECTED])
    standalone_only = metafunc.definition.get_closest_marker("standalone_only") is not None
    cluster_only = metafunc.definition.get_closest_marker("cluster_only") is not None
    if standalone_only:
        names = [n for n in names if not SPECS[n].is_cluster]
    if cluster_only:
        names = [n for n in names if SPECS[n].is_cluster]
    if metafunc.definition.get_closest_marker("one_server") is not None and names:
        names = [ONE_SERVER if ONE_SERVER in names else names[0]]
    if names:
        metafunc.parametrize("server", names, indirect=True, ids=names)
        return
    marks = " and ".join(
        m for m, on in (("standalone_only", standalone_only), ("cluster_only", cluster_only)) if on
    )
    if not config.stash[EXPLICIT]:
        pytest.fail(
            f"{metafunc.definition.nodeid}: marked {marks or '(no marker)'}, which leaves no "
            "server to run it on",
            pytrace=False,
        )
    # The user picked servers with --servers: report the test as deselected, not skipped.
    metafunc.parametrize(
        "server",
        [pytest.param(None, id="no-selected-server", marks=getattr(pytest.mark, UNSELECTED_MARK))],
        indirect=True,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    server_of = config.stash[SERVER_OF]
    with_cluster = "cluster" in config.stash[SELECTED]
    for item in items:
        if item.get_closest_marker(UNSELECTED_MARK) is not None:
            drop.append(item)
            continue
        if item.get_closest_marker("replicated_cluster") is not None and not with_cluster:
            drop.append(item)
            continue
        keep.append(item)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("sentinel") is not None:
            item.user_properties.append((SERVER_PROPERTY, str(callspec.params["sentinel"])))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "server" in callspec.params:
            server_of[item.nodeid] = str(callspec.params["server"])
            # Reports carry user_properties to the xdist controller, which builds the summary.
            item.user_properties.append((SERVER_PROPERTY, server_of[item.nodeid]))
    if drop:
        config.hook.pytest_deselected(items=drop)
    # The longest tests first (marked slow; a stable sort keeps the order otherwise): xdist
    # hands tests out in this order, so they start early instead of ending the run on one worker.
    keep.sort(key=lambda item: item.get_closest_marker("slow") is None)
    items[:] = keep


# --------------------------------------------------------------------------------------------
# pytest-docker, compose v1


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return f"luasched{os.getpid()}"


@pytest.fixture(scope="session")
def docker_setup(pytestconfig: pytest.Config) -> list[str]:
    # compose v1 has no `up --wait`: readiness is checked with wait_until_responsive.
    services = compose_services(SPECS[n] for n in pytestconfig.stash[SELECTED])
    return [f"up -d {' '.join(services)}"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v"]


# --------------------------------------------------------------------------------------------
# The servers


@pytest.fixture(scope="session")
def luasched_servers(request: pytest.FixtureRequest) -> Iterator[dict[str, ServerHandle]]:
    """Start every selected server once per session; stop them all at its end."""
    config = request.config
    specs = [SPECS[name] for name in config.stash[SELECTED]]
    backend = _resolve_backend(config)
    started = time.monotonic()
    if backend == "docker":
        if shutil.which("docker-compose") is None:
            raise ServerStartError("--backend=docker needs docker-compose (apt-get install "
                                   "docker-compose) - or use --backend=local")  # fmt: skip
        check_images(specs)
        check_ports_free(specs)
        project = request.getfixturevalue("docker_compose_project_name")
        try:
            services = request.getfixturevalue("docker_services")
        except BaseException:
            # `up -d` failed halfway: pytest-docker only tears down after a successful setup.
            subprocess.run(
                ["docker-compose", "-f", str(COMPOSE_FILE), "-p", project, "down", "-v"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            raise
        ports = [port for spec in specs for port in spec.ports]
        services.wait_until_responsive(
            check=lambda: all(ping(port) for port in ports), timeout=30.0, pause=0.05
        )
        for spec in specs:
            if spec.is_cluster:
                create_cluster(spec.ports, replicas=spec.replicas)
        _record_startup(config, backend, time.monotonic() - started)
        yield from _handles(specs)
    else:
        with local_servers(specs):
            _record_startup(config, backend, time.monotonic() - started)
            yield from _handles(specs)


def _handles(specs: list[ServerSpec]) -> Iterator[dict[str, ServerHandle]]:
    """The handles of running servers; their kept clients are closed after the session."""
    handles = {spec.name: ServerHandle.from_spec(spec) for spec in specs}
    try:
        yield handles
    finally:
        for handle in handles.values():
            handle.close()


def _record_startup(config: pytest.Config, backend: str, seconds: float) -> None:
    """Note how long this process took to start its servers; an xdist worker also hands it to
    the controller (``workeroutput``), which prints one line per worker."""
    label = (
        f"{backend}, worker {os.environ['PYTEST_XDIST_WORKER']}" if _is_worker(config) else backend
    )
    config.stash[STARTUP][label] = seconds
    if _is_worker(config):
        config.workeroutput.setdefault("luasched_startup", {})[label] = seconds  # type: ignore[attr-defined]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.fixture
def server(request: pytest.FixtureRequest) -> ServerHandle:
    """The server this test instance runs on (parametrized by pytest_generate_tests)."""
    name = getattr(request, "param", None)
    if name is None:
        raise pytest.UsageError(
            "the `server` fixture is parametrized by tests/conftest.py; do not parametrize it "
            "yourself"
        )
    handles: dict[str, ServerHandle] = request.getfixturevalue("luasched_servers")
    return handles[name]


@pytest.fixture
def r(server: ServerHandle) -> Iterator[redis.Redis | redis.cluster.RedisCluster]:
    """An emptied server and a client on it: a fresh one on a standalone server (closed after
    the test), the session's kept one on the cluster (``ServerHandle.shared_client``)."""
    server.flush()
    client = server.shared_client()
    try:
        yield client
    finally:
        if not server.is_cluster:
            client.close()


@pytest.fixture
def replicated(request: pytest.FixtureRequest) -> Iterator[ReplicatedCluster]:
    """A fresh replicated cluster for one failover/resharding test, stopped after it."""
    if request.node.get_closest_marker("replicated_cluster") is None:
        raise pytest.UsageError("tests using `replicated` must be marked replicated_cluster")
    with replicated_cluster(_resolve_backend(request.config)) as cluster:
        yield cluster


@pytest.fixture
def sentinel(request: pytest.FixtureRequest) -> Iterator[SentinelTopology]:
    """A fresh Sentinel topology of one version (the test's parameter), stopped after it."""
    if request.node.get_closest_marker("sentinel") is None:
        raise pytest.UsageError("tests using `sentinel` must be marked sentinel")
    version = getattr(request, "param", None)
    if version is None:
        raise pytest.UsageError("the `sentinel` fixture is parametrized by tests/conftest.py")
    backend = _resolve_backend(request.config)
    with sentinel_topology(backend, SENTINEL_TOPOLOGIES[version]) as topology:
        yield topology


# --------------------------------------------------------------------------------------------
# Per-server summary


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count every test's outcome (and time) under the server it ran on, or ``NO_SERVER``.

    Counted the way pytest's closing line counts: a test is passed, failed, skipped, xfailed or
    xpassed by its call phase (or by its setup when that skipped or failed), and a failing
    setup or teardown is an error; so the table's total row always equals pytest's own summary.
    """
    config = _CONFIG.get("config")
    if config is None:
        return
    name = dict(report.user_properties).get(SERVER_PROPERTY, NO_SERVER)
    outcomes = config.stash[OUTCOMES][name]
    config.stash[SECONDS][name] += report.duration
    if hasattr(report, "wasxfail"):
        if report.when == "call" or report.skipped:
            outcomes["xfailed" if report.skipped else "xpassed"] += 1
    elif report.when == "call":
        outcomes[report.outcome] += 1
    elif report.failed:
        outcomes["error"] += 1
    elif report.skipped:
        outcomes["skipped"] += 1


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown when xdist is not loaded
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: collect each worker's server start-up time."""
    config = _CONFIG.get("config")
    startup = getattr(node, "workeroutput", {}).get("luasched_startup", {})
    if config is not None:
        config.stash[STARTUP].update(startup)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG["config"] = session.config


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    if _is_worker(config):
        return
    outcomes = config.stash[OUTCOMES]
    if not outcomes:
        return
    tr = terminalreporter
    tr.section("luasched: results per server")
    seen = {key for counts in outcomes.values() for key in counts}
    columns = ["passed", "failed", "error", "skipped"]
    columns += sorted(seen - set(columns))
    tr.write_line(f"{'server':<12}" + "".join(f"{c:>9}" for c in columns) + f"{'seconds':>10}")
    total: Counter[str] = Counter()
    rows = [n for n in SERVER_NAMES if n in config.stash[SELECTED] or n in outcomes]
    rows += [n for n in outcomes if n not in rows]
    for name in rows:
        counts = outcomes.get(name, Counter())
        total.update(counts)
        seconds = config.stash[SECONDS].get(name, 0.0)
        tr.write_line(
            f"{name:<12}" + "".join(f"{counts[c]:>9}" for c in columns) + f"{seconds:>10.1f}"
        )
    seconds = sum(config.stash[SECONDS].values())
    tr.write_line(
        f"{'total':<12}" + "".join(f"{total[c]:>9}" for c in columns) + f"{seconds:>10.1f}"
    )
    tr.write_line("(seconds: the tests' own setup + call + teardown time, summed over workers)")
    for label, seconds in sorted(config.stash[STARTUP].items()):
        tr.write_line(f"servers started in {seconds:.2f}s (backend: {label})")
