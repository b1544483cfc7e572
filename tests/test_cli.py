"""The luasched command line: every subcommand, its usage errors (one line on stderr, no
traceback, exit status 2, run as the installed ``luasched`` command), its help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from luasched import Scheduler
from luasched.cli import main
from luasched.render import manifest, render_all

#: The console script pip installed next to this interpreter.
LUASCHED = Path(sys.executable).with_name("luasched")
ROOT = Path(__file__).resolve().parents[1]


def test_render_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "slots.keyslot"]) == 0
    assert capsys.readouterr().out == render_all()["slots.keyslot"].text


def test_render_unknown_script_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["render", "no.such"])
    assert stop.value.code == 2
    assert "no script named 'no.such'" in capsys.readouterr().err


def test_export_writes_scripts_and_manifest(tmp_path: Path) -> None:
    assert main(["export", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data == manifest()
    for entry in data["scripts"].values():
        assert (tmp_path / "out" / entry["file"]).read_text().startswith("--@script")


def test_configuration_flows_into_the_scripts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--max-batch", "50", "manifest"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["max_batch"] == 50
    assert data["scripts"]["slots.keyslot"]["argv"][0]["repeat"]["max"] == 50
    with pytest.raises(SystemExit):
        main(["--max-batch", "0", "list"])


def test_list_names_every_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(render_all())


def test_script_reference_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/scripts.md is generated from the manifest: regenerate it with `make snapshots`."""
    assert main(["reference"]) == 0
    generated = capsys.readouterr().out
    committed = (Path(__file__).resolve().parents[1] / "docs" / "scripts.md").read_text()
    assert generated == committed, "docs/scripts.md is stale: run `make snapshots`"
    for name in render_all():
        assert f"### {name}\n" in generated


def test_readme_lists_every_script() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name in render_all() if f"`{name}`" not in readme]
    assert not missing, f"README's script table lacks {missing}"


@pytest.mark.standalone_only
def test_readme_python_example_runs(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server.flush()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme[readme.index("## From Python") :].split("```python\n", 1)[1].split("```")[0]
    assert "redis.Redis()" in example
    code = example.replace("redis.Redis()", f"redis.Redis(port={server.port})")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()  # the first fencing token of the lock
    client = server.client()
    try:
        state = client.get(b"luasched:{orders}:lock:report")  # "<fence> <count> ..."
    finally:
        client.close()
    assert re.fullmatch(r"[1-9]\d*", printed) and state.split(b" ")[0] == printed.encode()


# --------------------------------------------------------------------------------------------
# luasched stats NAMESPACE: read-only counts of a namespace, checked against one set up here.


def _stats_json(server: Any, namespace: str, capsys: pytest.CaptureFixture[str]) -> Any:
    assert main(["stats", namespace, "--url", server.url, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _shop(r: Any) -> dict[str, Any]:
    """A namespace with 3 nodes (one dead), picks, two queues, locks and a semaphore; what the
    calls that built it answered (the expected figures come from those replies and raw reads,
    not from the stats code)."""
    import time

    from luasched import Scheduler
    from support.helpers import table_owners

    s = Scheduler(r, "shop")
    s.nodes.register("node-a", weight=3, capacity=10, ttl_ms=600_000)
    s.nodes.register("node-b", weight=1)
    s.nodes.register("node-c", weight=2, capacity=5, ttl_ms=1)
    time.sleep(0.01)  # node-c's heartbeat deadline passes: it is not live
    s.slots.rebalance()
    picks = [s.pick.least_loaded().node for _ in range(7)]
    emails = s.queue("emails")
    for number in range(5):
        emails.enqueue(f"e{number}", b"x")
    for number in range(2):
        emails.enqueue(f"later{number}", b"x", delay_ms=600_000)
    assert emails.dequeue("w1", 60_000) is not None
    assert emails.dequeue("w2", 60_000) is not None
    jobs = s.queue("jobs")
    jobs.enqueue("j1", b"x", max_attempts=1)
    lease = jobs.dequeue("w1", 60_000)
    assert lease is not None
    assert jobs.nack(lease, reason="boom").state == "dead"
    held = s.lock("orders", ttl_ms=30_000).acquire(blocking=False)
    assert held is not None
    again = s.lock("nested", ttl_ms=30_000, reentrant=True)
    first = again.acquire(blocking=False)
    assert first is not None
    assert again.acquire(blocking=False) is not None  # the same owner: a second hold
    gone = s.lock("gone", ttl_ms=30_000).acquire(blocking=False)
    assert gone is not None
    gone.release()
    pool = s.semaphore("pool", 3, ttl_ms=30_000)
    permits = [pool.acquire(blocking=False) for _ in range(2)]
    assert all(permits)
    owners = table_owners(r, s)
    return {
        "slots": {node: owners.count(node) for node in (b"node-a", b"node-b", b"node-c")},
        "unowned": owners.count(None),
        "loads": {node: picks.count(node) for node in (b"node-a", b"node-b", b"node-c")},
        "fence": held.fence,
        "nested_fence": first.fence,
    }


@pytest.mark.parametrize("output", ["json", "text"])
def test_stats_reports_the_namespace(
    server: Any, r: Any, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    from support.helpers import snapshot_ignoring_ttl as snapshot

    expected = _shop(r)
    before = snapshot(r, "shop")
    if output == "text":
        assert main(["stats", "shop", "--url", server.url]) == 0
        text = capsys.readouterr().out
        assert snapshot(r, "shop") == before
        assert "nodes: 3 (2 live)" in text
        assert "queues: 2" in text and "locks held: 2" in text
        assert "semaphores with permits out: 1" in text
        emails = next(line.split() for line in text.splitlines() if line.split()[:1] == ["emails"])
        assert emails[1:5] == ["3", "2", "2", "0"]
        return
    data = _stats_json(server, "shop", capsys)
    assert snapshot(r, "shop") == before  # read-only: every key byte-for-byte the same (TTLs
    # count down: only whether a key has one is compared)
    assert data["namespace"] == "shop" and data["truncated"] is False
    nodes = {node["node_id"]: node for node in data["nodes"]}
    assert sorted(nodes) == ["node-a", "node-b", "node-c"]
    for name, weight, capacity, live in (
        ("node-a", 3, 10, True),
        ("node-b", 1, None, True),
        ("node-c", 2, 5, False),
    ):
        node = nodes[name]
        assert (node["weight"], node["capacity"], node["live"]) == (weight, capacity, live)
        assert node["load"] == expected["loads"][name.encode()]
        assert node["slots"] == expected["slots"][name.encode()]
    assert nodes["node-c"]["slots"] == 0 and expected["unowned"] == 0
    assert data["unowned_slots"] == 0
    assert sum(node["load"] for node in data["nodes"]) == 7
    queues = {queue["name"]: queue for queue in data["queues"]}
    assert sorted(queues) == ["emails", "jobs"]
    counts = [(q["ready"], q["delayed"], q["leased"], q["dead"]) for q in queues.values()]
    assert counts == [(3, 2, 2, 0), (0, 0, 0, 1)]
    assert queues["emails"]["oldest_ready_age_ms"] >= 0
    assert queues["jobs"]["oldest_ready_age_ms"] is None
    locks = {lock["name"]: lock for lock in data["locks"]}
    assert sorted(locks) == ["nested", "orders"]  # "gone" was released
    assert (locks["orders"]["fence"], locks["orders"]["count"]) == (expected["fence"], 1)
    assert (locks["nested"]["fence"], locks["nested"]["count"]) == (expected["nested_fence"], 2)
    assert all(0 < lock["ttl_ms"] <= 30_000 for lock in data["locks"])
    assert data["semaphores"] == [{"name": "pool", "held": 2}]


def test_stats_reports_the_groups_of_a_queue(
    server: Any, r: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from support.helpers import snapshot_ignoring_ttl as snapshot

    q = Scheduler(r, "tenants").queue("jobs")
    for index in range(3):
        q.enqueue(f"a-{index}", group="tenant-a", request_id=b"")
    q.enqueue("b-0", group="tenant-b", request_id=b"")
    q.enqueue("plain", request_id=b"")
    q.set_group("tenant-a", weight=3, max_active=2)
    q.set_group("idle", paused=True)  # settings, no task
    q.set_rate(50, burst=4, group="tenant-b")
    assert q.dequeue("w", 60_000, request_id=b"") is not None
    before = snapshot(r, "tenants")
    data = _stats_json(server, "tenants", capsys)
    assert snapshot(r, "tenants") == before
    (queue,) = data["queues"]
    # 5 tasks, one leased: 4 ready, with or without a group.
    assert (queue["ready"], queue["leased"]) == (4, 1)
    groups = {group["group"]: group for group in queue["groups"]}
    assert sorted(groups) == ["idle", "tenant-a", "tenant-b"]
    ready = {name: group["ready"] + group["active"] for name, group in groups.items()}
    assert ready == {"idle": 0, "tenant-a": 3, "tenant-b": 1}
    assert (groups["tenant-a"]["weight"], groups["tenant-a"]["max_active"]) == (3, 2)
    assert groups["idle"]["paused"] is True
    assert (groups["tenant-b"]["per_second"], groups["tenant-b"]["burst"]) == (50.0, 4)
    assert main(["stats", "tenants", "--url", server.url]) == 0
    text = capsys.readouterr().out
    assert "groups of jobs: 3" in text
    row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["tenant-a"])
    assert row[3:6] == ["3", "2", "no"]


def test_stats_of_an_empty_namespace(
    server: Any, r: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _stats_json(server, "nothing-here", capsys)
    assert (data["nodes"], data["queues"], data["locks"], data["semaphores"]) == ([], [], [], [])
    assert data["unowned_slots"] == 16384 and data["keys_seen"] == 0


def test_stats_keeps_to_its_namespace(
    server: Any, r: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A namespace whose name is a SCAN pattern (``sh*p``) sees its own keys only."""
    from luasched import Scheduler

    _shop(r)
    Scheduler(r, "sh*p").queue("own").enqueue("t", b"x")
    Scheduler(r, "shop-2").queue("other").enqueue("t", b"x")
    data = _stats_json(server, "sh*p", capsys)
    assert [queue["name"] for queue in data["queues"]] == ["own"]
    assert (data["nodes"], data["locks"], data["semaphores"]) == ([], [], [])
    data = _stats_json(server, "shop", capsys)
    assert [queue["name"] for queue in data["queues"]] == ["emails", "jobs"]


def test_stats_scan_is_bounded(server: Any, r: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from luasched import Scheduler

    s = Scheduler(r, "many")
    with s.pipeline() as pipe:
        for number in range(3000):
            pipe.queue(f"q{number}").enqueue("t", b"x")
        pipe.execute()
    assert main(["stats", "many", "--url", server.url, "--json", "--max-scan", "1000"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["truncated"] is True
    assert 0 < len(data["queues"]) < 3000
    data = _stats_json(server, "many", capsys)
    assert data["truncated"] is False and len(data["queues"]) == 3000


def test_stats_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from luasched.testing import free_port

    with pytest.raises(SystemExit) as stop:  # a usage error, found before connecting
        main(["stats", "a{b", "--url", "redis://127.0.0.1:1/0"])
    assert stop.value.code == 2
    assert "must not contain" in capsys.readouterr().err
    assert main(["stats", "shop", "--url", f"redis://127.0.0.1:{free_port()}/0"]) == 1
    assert "luasched stats: failed: " in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The installed command: help, usage errors, server errors.


def run_cli(*args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """``luasched ARGS`` in a subprocess, with ``$REDIS_URL`` set to ``redis_url`` (or unset)."""
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    return subprocess.run(
        [str(LUASCHED), *args], capture_output=True, text=True, env=env, timeout=120
    )


def _subcommands() -> list[tuple[str, str]]:
    """(name, summary) of every subcommand, as ``luasched --help`` lists them."""
    listed = run_cli("--help")
    assert listed.returncode == 0 and listed.stderr == ""
    block = listed.stdout.split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    entries = re.findall(r"^ {4}(\S+)(?: +|\n +)(.+(?:\n {20,}.+)*)", block, re.M)
    return [(name, " ".join(summary.split())) for name, summary in entries]


def test_help_describes_every_subcommand() -> None:
    entries = _subcommands()
    names = [name for name, _ in entries]
    expected = ["export", "render", "list", "manifest", "reference", "functions"]
    expected += ["install-functions", "acl", "stats", "worker"]
    assert names == expected
    assert all(len(summary) > 15 for _, summary in entries), entries
    for name, summary in entries:
        own = run_cli(name, "--help")
        assert own.returncode == 0, (name, own.stderr)
        assert " ".join(own.stdout.split()).count(summary) == 1, (name, own.stdout)


def _file(tmp_path: Path) -> str:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return str(path)


#: (arguments, what the one line says); $REDIS_URL unset unless the case sets it.
USAGE_ERRORS: list[tuple[list[str], str]] = [
    ([], "the following arguments are required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["--max-batch", "0", "list"], "max_batch must be 1..7000"),
    (["--max-key-bytes", "x", "list"], "invalid int value: 'x'"),
    (["export"], "the following arguments are required: DIR"),
    (["export", "{file}"], "exists and is not a directory"),
    (["export", "{file}/sub"], "cannot write"),
    (["render"], "the following arguments are required: NAME"),
    (["render", "no.such"], "no script named 'no.such'"),
    (["list", "extra"], "unrecognized arguments: extra"),
    (["manifest", "extra"], "unrecognized arguments: extra"),
    (["reference", "--json"], "unrecognized arguments: --json"),
    (["functions", "extra"], "unrecognized arguments: extra"),
    (["install-functions"], "no server: pass --url URL or set REDIS_URL"),
    (["install-functions", "redis://127.0.0.1:1"], "unrecognized arguments: redis://"),
    (["install-functions", "--url", "http://x"], "--url: Redis URL must specify"),
    (["install-functions", "--url"], "argument --url: expected one argument"),
    (["acl"], "the following arguments are required: NAMESPACE"),
    (["acl", "a{b"], "must not contain"),
    (["acl", ""], "namespace must be 1 to 128 bytes"),
    (["acl", "x" * 129], "namespace must be 1 to 128 bytes"),
    (["acl", "a b"], "the default user name (pass --user)"),
    (["acl", "shop", "--user", ""], "--user: an ACL user name"),
    (["acl", "shop", "--user", "a b"], "--user: an ACL user name"),
    (["acl", "shop", "--password", "x"], "unrecognized arguments: --password"),
    (["stats"], "the following arguments are required: NAMESPACE"),
    (["stats", "shop"], "no server: pass --url URL or set REDIS_URL"),
    (["stats", "shop", "--url", "", "REDIS_URL=redis://127.0.0.1:1"], "no server: pass --url"),
    (["stats", "a}b", "--url", "redis://127.0.0.1:1"], "must not contain"),
    (["stats", "shop", "--url", "redis://127.0.0.1:1", "--max-scan", "0"], "--max-scan"),
    (["stats", "shop", "--max-scan", "many"], "invalid int value: 'many'"),
    (["stats", "shop", "--url", "localhost:6379"], "--url: Redis URL must specify"),
    (["stats", "shop", "REDIS_URL=nonsense"], "REDIS_URL: Redis URL must specify"),
    (["worker"], "the following arguments are required: MODULE:FUNCTION, --queue"),
    (["worker", "m:f", "--queue", "q"], "no server: pass --url URL or set REDIS_URL"),
    (["worker", "nocolon", "--queue", "q", "REDIS_URL=redis://127.0.0.1:1"], "MODULE:FUNCTION"),
    (["worker", "no_such_mod:f", "--queue", "q", "REDIS_URL=redis://127.0.0.1:1"], "cannot import"),
    (["worker", "json:nope", "--queue", "q", "REDIS_URL=redis://127.0.0.1:1"], "no function"),
    (
        ["worker", "json:dumps", "--queue", "q", "--asyncio", "REDIS_URL=redis://127.0.0.1:1"],
        "async",
    ),
    (
        [
            "worker",
            "json:dumps",
            "--queue",
            "q",
            "--node",
            "n",
            "--partitions",
            "2",
            "REDIS_URL=redis://127.0.0.1:1",
        ],
        "--node and --partitions",
    ),
    (
        [
            "worker",
            "json:dumps",
            "--queue",
            "q",
            "--concurrency",
            "0",
            "REDIS_URL=redis://127.0.0.1:1",
        ],
        "concurrency",
    ),
    (["stats", "shop", "--sentinel", "127.0.0.1", "--service", "m"], "--sentinel: expected HOST"),
    (["stats", "shop", "--sentinel", "127.0.0.1:1,:2", "--service", "m"], "--sentinel: expected"),
    (["stats", "shop", "--sentinel", "127.0.0.1:70000", "--service", "m"], "--sentinel: expected"),
    (["stats", "shop", "--sentinel", "127.0.0.1:1"], "--sentinel: needs --service NAME"),
    (
        ["install-functions", "--sentinel", "127.0.0.1:1", "--service", "m", "--url", "redis://x"],
        "--url and --sentinel: pass one of them",
    ),
    (["stats", "shop", "--url", "redis://127.0.0.1:1", "--service", "m"], "--service: only with"),
    (
        ["worker", "json:dumps", "--queue", "q", "--wait-replicas", "-1", "REDIS_URL=redis://x:1"],
        "wait_replicas must be an integer in 0..1000",
    ),
    (
        [
            "worker",
            "json:dumps",
            "--queue",
            "q",
            "--wait-timeout-ms",
            "-5",
            "REDIS_URL=redis://x:1",
        ],
        "wait_timeout_ms must be an integer in 0..3600000",
    ),
]


@pytest.mark.parametrize(
    ("args", "says"), USAGE_ERRORS, ids=[" ".join(args)[:60] or "-" for args, _ in USAGE_ERRORS]
)
def test_usage_error_is_one_line_and_status_2(tmp_path: Path, args: list[str], says: str) -> None:
    redis_url = None
    if args and args[-1].startswith("REDIS_URL="):
        redis_url = args.pop().split("=", 1)[1]
    args = [arg.replace("{file}", _file(tmp_path)) for arg in args]
    done = run_cli(*args, redis_url=redis_url)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.endswith("\n") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert re.match(r"luasched( [a-z-]+)?: error: ", done.stderr), done.stderr
    assert says in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["stats", "shop"], ["install-functions"]])
@pytest.mark.parametrize("how", ["--url", "REDIS_URL"])
def test_unreachable_server_is_one_line_and_status_1(command: list[str], how: str) -> None:
    from luasched.testing import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    flags = ["--url", url] if how == "--url" else []
    done = run_cli(*command, *flags, redis_url=None if flags else url)
    assert done.returncode == 1, done
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"luasched {command[0]}: failed: "), done.stderr
    assert "onnect" in done.stderr  # the connection error's own words


@pytest.mark.standalone_only
def test_stats_takes_its_server_from_redis_url(server: Any, r: Any) -> None:
    from luasched import Scheduler

    Scheduler(r, "env").queue("jobs").enqueue("t", b"x")
    done = run_cli("stats", "env", "--json", redis_url=server.url)
    assert done.returncode == 0, done.stderr
    assert [queue["name"] for queue in json.loads(done.stdout)["queues"]] == ["jobs"]


#: Commands any rule needs, known without the code under test: the wrapper's EVALSHA, SCRIPT
#: LOAD and BLPOP, and data commands the scripts issue (LLEN and ZRANK on rare paths only).
NEEDED = {"evalsha", "script|load", "blpop", "time", "hset", "zadd", "zrem", "llen", "zrank"}


def test_acl_prints_one_setuser_line() -> None:
    done = run_cli("acl", "sh*p")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.count("\n") == 1
    words = done.stdout.split()
    head = ["ACL", "SETUSER", "luasched-sh*p", "reset", "on", "resetchannels", "-@all"]
    assert words[:7] == head
    assert words[-1] == '"~luasched:{sh\\\\*p}:*"'  # redis-cli reads \\ as one backslash
    granted = {word[1:] for word in words[7:-1]}
    assert all(word.startswith("+") for word in words[7:-1])
    assert granted >= NEEDED
    assert not granted & {"fcall", "fcall_ro", "eval", "cluster|slots", "command", "config"}
    assert not granted & {"config|get", "info", "keys", "scan", "flushall", "acl", "script"}
    options = run_cli("acl", "shop", "--user", "app", "--functions", "--cluster").stdout.split()
    assert options[2] == "app" and options[-1] == "~luasched:{shop}:*"
    extra = {"fcall", "fcall_ro", "eval", "cluster|slots", "command"}
    assert {word[1:] for word in options if word.startswith("+")} == granted | extra
