"""README.md and docs/ as a user meets them in a clone of the repository.

- Every relative link of README.md and docs/*.md names a file (and a heading, for ``#anchor``)
  of the repository, and none leaves it; no file of the repository names a path outside it.
- README's Quick start is exactly the two commands ``make demo`` and ``make test``.
- Every README snippet runs as printed, in the README's order, on one server where the earlier
  snippets already ran (``test_readme_snippets_run_in_order_on_one_server``).
- README's benchmark figures are those of the generated docs/bench.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from luasched import Scheduler
from luasched.render import functions_library
from support.nodejs import node_env, require_node
from support.servers import ROOT, ServerHandle, find_redis_cli

README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: The folders and files that make up the repository's text (what a clone holds, minus tools).
REPOSITORY_TEXT = ["README.md", "Makefile", "pyproject.toml", "docs", "pyclient", "lua"]
REPOSITORY_TEXT += ["examples", "tests", "bench", ".ci"]
SKIPPED_DIRS = {"node_modules", "__pycache__", ".venv", "results"}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


# --------------------------------------------------------------------------------------------
# Links


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def without_code(text: str) -> str:
    """``text`` without fenced blocks and inline code spans (neither holds links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors of ``markdown``'s headings: lowercased, punctuation dropped but ``-``
    and ``_``, spaces to ``-``; a repeated heading gets ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", markdown.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_every_relative_link_resolves_inside_the_repository() -> None:
    checked = 0
    broken = []
    for markdown in markdown_files():
        for target in LINK.findall(without_code(markdown.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ...
                continue
            where = f"{markdown.relative_to(ROOT)}: {target}"
            path_part, _, anchor = target.partition("#")
            resolved = (markdown.parent / path_part).resolve() if path_part else markdown
            checked += 1
            if path_part.startswith("/") or not resolved.is_relative_to(ROOT):
                broken.append(f"{where} points outside the repository")
            elif not resolved.exists():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{where}: no heading with that anchor")
    assert checked > 20, checked  # the pattern found the links
    assert not broken, "\n".join(broken)


def test_no_file_names_a_path_outside_the_repository() -> None:
    """What a clone does not hold: a ``../``-relative path, in a link or in prose or code, that
    leaves the repository or names nothing in it (taken from the folder of the file that
    names it)."""
    relative = re.compile(r"(?:\.\./)+[A-Za-z_][\w.-]*(?:/[\w.-]+)*")
    found = []
    checked = 0
    for name in REPOSITORY_TEXT:
        top = ROOT / name
        files = [top] if top.is_file() else top.rglob("*")
        for path in files:
            if not path.is_file() or SKIPPED_DIRS & set(path.relative_to(ROOT).parts):
                continue
            if path.suffix in {".png", ".pyc"}:
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for match in relative.finditer(line):
                    checked += 1
                    named = (path.parent / match[0]).resolve()
                    if not named.is_relative_to(ROOT) or not named.exists():
                        found.append(f"{path.relative_to(ROOT)}:{number}: {match[0]}")
    assert checked > 0  # docs/manifest.md links ../examples/node/
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------------------------
# README snippets


@dataclass(frozen=True)
class Snippet:
    heading: str  # the closest "## " or "### " heading above it
    language: str
    code: str


def readme_snippets() -> list[Snippet]:
    text = README.read_text()
    snippets = []
    for match in FENCE.finditer(text):
        headings = re.findall(r"^##+ (.+)$", text[: match.start()], re.MULTILINE)
        snippets.append(Snippet(headings[-1], match[1], match[2]))
    return snippets


def test_quick_start_is_two_commands() -> None:
    (quick,) = [snippet for snippet in readme_snippets() if snippet.heading == "Quick start"]
    commands = [line.split("#")[0].strip() for line in quick.code.splitlines()]
    assert commands == ["make demo", "make test"]


#: What the snippets print, by section, when run in the README's order on one server: the
#: fencing tokens grow with each lease of queue "emails" of namespace "orders" (the first
#: Python snippet takes token 1, the one-task snippets 2 by Python and 3 by redis-cli).
#: What each Python snippet prints, line by line (regular expressions, whole lines). Fencing
#: tokens come from the server's clock (docs/guarantees.md): digits, compared with each other
#: by the test.
PRINTED = {
    "From Python": [r"[1-9]\d*"],  # the first fencing token of lock "report"
    "A worker in a few lines": [r"\[b'cat\.png', b'dog\.png'\] 2"],
    "One task from Python, redis-cli and Node": [r"b'task-1' b'hello' [1-9]\d*"],
}


@contextlib.contextmanager
def chdir(directory: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.mark.standalone_only
def test_readme_snippets_run_in_order_on_one_server(server: ServerHandle, tmp_path: Path) -> None:
    """Every README snippet as printed, in the README's order, on one emptied server and one
    working directory, each after the ones above it. The only changes point them at the test
    server: in Python, ``redis.Redis()`` becomes ``redis.Redis(port=<its port>)``, and all
    Python snippets share one global namespace (as one interpreter session); in the shell
    snippets (bash -euo pipefail), ``redis-cli`` on the PATH is the harness's with ``-h``/``-p``
    of the server, ``luasched`` is this environment's, ``REDIS_URL`` is the server's URL and the
    address ``127.0.0.1:6379`` written in a snippet becomes the server's. The Quick start runs
    the repository's own entry points (tests/test_demo.py, CI); the Functions section runs on
    7.0+ only, as its heading says; the Node snippet is an excerpt of
    examples/node/example.js (tests/test_node.py checks that), which runs in its place.

    Standalone only: on a cluster the redis-cli snippets load a script on the node redis-cli is
    connected to and call it where the key lives, and ``redis.Redis()`` is not a cluster client.
    """
    server.flush()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    wrapper = bin_dir / "redis-cli"
    wrapper.write_text(
        f'#!/bin/sh\nexec {find_redis_cli()} -h {server.host} -p {server.port} "$@"\n'
    )
    wrapper.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    shell_env = {**os.environ, "PATH": path, "REDIS_URL": server.url}
    address = f"{server.host}:{server.port}"
    python_globals: dict[str, object] = {}
    shell_out: dict[str, str] = {}
    python_out: dict[str, list[str]] = {}
    node_token = 0
    ran = []
    for snippet in readme_snippets():
        if snippet.heading == "Quick start":
            continue
        if "Redis 7.0+" in snippet.heading and server.version < (7, 0):
            continue
        if snippet.language == "python":
            assert "redis.Redis()" in snippet.code, snippet.heading
            code = snippet.code.replace("redis.Redis()", f"redis.Redis(port={server.port})")
            printed = io.StringIO()
            with chdir(work), contextlib.redirect_stdout(printed):
                exec(compile(code, f"README.md ({snippet.heading})", "exec"), python_globals)
            lines = printed.getvalue().splitlines()
            patterns = PRINTED[snippet.heading]
            assert len(lines) == len(patterns), (snippet.heading, lines)
            for line, pattern in zip(lines, patterns, strict=True):
                assert re.fullmatch(pattern, line), (snippet.heading, line)
            python_out[snippet.heading] = lines
        elif snippet.language == "sh":
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", snippet.code.replace("127.0.0.1:6379", address)],
                cwd=work,
                env=shell_env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, (snippet.heading, done.stdout, done.stderr)
            assert "LUASCHED_" not in done.stdout, (snippet.heading, done.stdout)
            shell_out[snippet.heading] = done.stdout
        elif snippet.language == "js":
            done = subprocess.run(
                [require_node(), str(ROOT / "examples" / "node" / "example.js")],
                cwd=work,  # its scripts: ./luasched-scripts, exported by the redis-cli snippet
                env={**node_env(), "REDIS_URL": server.url},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            leased = re.fullmatch(
                r"leased task-1: payload=hello attempt=1 token=([1-9]\d*)",
                done.stdout.splitlines()[1],
            )
            assert leased, done.stdout
            node_token = int(leased[1])
        else:
            pytest.fail(f"README snippet in {snippet.language!r} under {snippet.heading!r}")
        ran.append(snippet.heading)

    # The redis-cli calls answered what the README's comments say.
    assert shell_out["From any other language"].split()[-1] == "12182"
    if server.version >= (7, 0):
        assert shell_out["Redis Functions (Redis 7.0+, Valkey)"].split()[-1] == "12182"
    one_task = shell_out["One task from Python, redis-cli and Node"].split()
    assert one_task[:2] == ["1", "ready"], one_task  # enqueued
    assert one_task[2:6] == ["0", "task-1", "hello", "1"], one_task  # leased, attempt 1
    # The one-task leases (Python, redis-cli, Node): each token larger than the one before.
    python_token = int(python_out["One task from Python, redis-cli and Node"][0].split()[-1])
    cli_token = int(one_task[6])
    assert 0 < python_token < cli_token < node_token, (python_token, one_task, node_token)
    assert int(one_task[7]) > 0, one_task  # its deadline
    assert one_task[8:] == ["1"], one_task  # acked with that token
    # Four leases of task-1 (Python twice, redis-cli, Node), each acked: nothing left.
    client = server.client()
    try:
        stats = Scheduler(client, "orders").queue("emails").stats()
        assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0), stats
        assert client.hget(b"luasched:{orders}:q:tasks:emails", b"fence") == b"%d" % node_token
    finally:
        client.close()
    assert "What is in a namespace now: `luasched stats`" in ran, ran


def test_functions_library_needs_redis_cli_x() -> None:
    """docs/manifest.md loads the library with ``redis-cli -x`` because it is longer than one
    command-line argument may be on Linux (128 KiB)."""
    assert len(functions_library().encode()) > 128 * 1024


# --------------------------------------------------------------------------------------------
# README's benchmark summary


def tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table of ``markdown``: its header cells and its rows' cells."""
    found = []
    for block in re.findall(r"(?:^\|.*\|\n)+", markdown, re.MULTILINE):
        lines = [
            [cell.strip() for cell in line.strip()[1:-1].split("|")] for line in block.splitlines()
        ]
        found.append((lines[0], lines[2:]))
    return found


def test_readme_benchmark_figures_are_those_of_docs_bench_md() -> None:
    """README's Benchmarks section quotes rows of the generated docs/bench.md: each figure must
    be the one in the row of the same name and the column of the same header there, so a
    `make bench` that changes them fails here until README quotes the new run."""
    readme = README.read_text()
    section = readme[readme.index("\n## Benchmarks\n") + 1 :]
    if "\n## " in section:  # a section after it
        section = section[: section.index("\n## ")]
    assert "`make bench`" in section and "(docs/bench.md)" in section
    generated = tables((DOCS / "bench.md").read_text())
    quoted = tables(section)
    assert quoted, "README's Benchmarks section has no table"
    compared = 0
    for header, rows in quoted:
        for row in rows:
            sources = [
                (bench_header, bench_row)
                for bench_header, bench_rows in generated
                for bench_row in bench_rows
                if bench_row[0] == row[0] and set(header[1:]) <= set(bench_header)
            ]
            assert len(sources) == 1, f"{row[0]!r} with {header[1:]}: {len(sources)} rows match"
            bench_header, bench_row = sources[0]
            for column, value in zip(header[1:], row[1:], strict=True):
                assert value == bench_row[bench_header.index(column)], (row[0], column)
                compared += 1
    assert compared >= 10, compared
