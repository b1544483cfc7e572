"""The least-privilege ACL of one namespace (``luasched acl NAMESPACE``).

Scripts run as the calling ACL user, so a user of luasched needs two kinds of commands:

* the **data commands the scripts issue** (``HSET``, ``ZADD``, ``TIME``...). They are not typed
  anywhere: ``script_commands`` reads them from the rendered scripts, so a script that starts
  issuing a new command changes the rule with it. A command is a quoted upper-case word that opens
  an argument list or a table, as the templates spell every call: ``redis.call('ZADD', ...``,
  ``redis.pcall('GET', ...``, the helpers ``read('ZCARD', ...``, ``first_write('HSET', ...``,
  ``write('ZREM', ...`` (which pass their arguments to ``redis.call``) and the tables of
  ``{ 'ZREM', key, members }`` a script runs in a loop; ``fail('CODE', ...)`` is the prelude's
  error helper, not a command. Option words (``'LIMIT'``, ``'WITHSCORES'``) never open a list;
* the **commands the Python wrapper sends itself** (``WRAPPER_COMMANDS``, and with
  ``--functions`` / ``--cluster`` their additions), each with the reason it is there.

The rule grants exactly these, on the namespace's keys only (``~luasched:{NS}:*``, glob characters
of the name escaped), and no Pub/Sub channel. It uses nothing 6.2 lacks (no selectors, no ``%R~``).

A narrower rule is not safer: a command refused inside a script aborts the script where it
stands, after any writes it already made (Redis has no rollback), which can leave a half-written
namespace; a refused ``redis.pcall`` comes back to the script as an error value it reads as data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from luasched.keys import Namespace, to_bytes
from luasched.render import RenderedScript, ScriptConfig, render_all

__all__ = [
    "CLUSTER_COMMANDS",
    "FUNCTIONS_COMMANDS",
    "WRAPPER_COMMANDS",
    "acl_commands",
    "acl_rule",
    "default_user",
    "reasons",
    "reasons_markdown",
    "script_commands",
    "setuser_line",
]

#: What the Python wrapper sends on every server, command -> why (ACL names: ``cmd|subcmd``).
WRAPPER_COMMANDS: dict[str, str] = {
    "evalsha": "every script call (single calls, and batches on a standalone server)",
    "script|load": "loads a script the server lacks (NOSCRIPT after a restart, failover or "
    "SCRIPT FLUSH) and Scheduler.load_scripts",
    "blpop": "blocking waits: dequeue with block_ms, blocking lock and semaphore acquire",
}

#: Added by ``--cluster``: what a ``RedisCluster`` client and the wrapper send on a cluster.
CLUSTER_COMMANDS: dict[str, str] = {
    "eval": "batches (pipelines): redis-py's ClusterPipeline refuses EVALSHA, so they send the "
    "script text",
    "cluster|slots": "redis-py's RedisCluster learns which primary serves which slot",
    "command": "redis-py's RedisCluster reads the command table to find each command's keys",
}

#: Added by ``--functions`` (Redis 7.0+ / Valkey): the calls through the Functions library.
FUNCTIONS_COMMANDS: dict[str, str] = {
    "fcall": "single calls of scripts that write, once the library is installed",
    "fcall_ro": "single calls of read-only scripts, and the once-per-Scheduler probe of the "
    "library's digest",
}

# A quoted upper-case word right after "(" or "{", with the name of the called function if any.
_OPENING_WORD = re.compile(
    r"""(?:(?P<function>[A-Za-z_][A-Za-z0-9_.]*)\s*)?[({]\s*(?P<quote>['"])"""
    r"""(?P<word>[A-Z][A-Z0-9_]*)(?P=quote)"""
)
#: Functions whose first argument is an upper-case word that is not a command.
_NOT_COMMANDS = frozenset({"fail"})


def _code_lines(text: str) -> str:
    """``text`` without its ``--`` comments (a ``--`` inside a string literal is kept)."""
    kept = []
    for line in text.splitlines():
        position = line.find("--")
        while position != -1:
            before = line[:position]
            if before.count("'") % 2 == 0 and before.count('"') % 2 == 0:
                line = before
                break
            position = line.find("--", position + 2)
        kept.append(line)
    return "\n".join(kept)


def script_commands(scripts: Mapping[str, RenderedScript] | None = None) -> dict[str, list[str]]:
    """Every command the rendered ``scripts`` (default: ``render_all()``) issue, lower case ->
    the sorted names of the scripts that issue it; sorted by command."""
    uses: dict[str, set[str]] = {}
    for name, script in (render_all() if scripts is None else scripts).items():
        for match in _OPENING_WORD.finditer(_code_lines(script.text)):
            if match["function"] not in _NOT_COMMANDS:
                uses.setdefault(match["word"].lower(), set()).add(name)
    return {command: sorted(uses[command]) for command in sorted(uses)}


def acl_commands(
    *, functions: bool = False, cluster: bool = False, config: ScriptConfig | None = None
) -> list[str]:
    """The commands a luasched user needs, sorted: the scripts' data commands, the wrapper's,
    and with ``functions`` / ``cluster`` their additions (the keys of ``reasons``)."""
    return list(reasons(functions=functions, cluster=cluster, config=config))


def _scripts_phrase(names: list[str], every: list[str]) -> str:
    """``names`` (script names) shortly: ``every queue.* script`` for a whole area, else the
    area once and the operations (``lock.acquire, release``)."""
    parts = []
    for area in sorted({name.split(".")[0] for name in names}):
        mine = [name.split(".", 1)[1] for name in names if name.startswith(area + ".")]
        all_of_area = [name for name in every if name.startswith(area + ".")]
        parts.append(
            f"every {area}.* script"
            if len(mine) == len(all_of_area)
            else f"{area}.{', '.join(mine)}"
        )
    return "; ".join(parts)


def reasons(
    *, functions: bool = False, cluster: bool = False, config: ScriptConfig | None = None
) -> dict[str, str]:
    """Why each command of ``acl_commands`` is granted, command -> reason, sorted."""
    scripts = render_all(config)
    why = {
        command: "run by the scripts, as the caller: " + _scripts_phrase(names, sorted(scripts))
        for command, names in script_commands(scripts).items()
    }
    for extra in (WRAPPER_COMMANDS, FUNCTIONS_COMMANDS if functions else {}):
        why.update({command: "the wrapper: " + reason for command, reason in extra.items()})
    if cluster:
        why.update(
            {command: "on a cluster: " + reason for command, reason in CLUSTER_COMMANDS.items()}
        )
    return {command: why[command] for command in sorted(why)}


def reasons_markdown(config: ScriptConfig | None = None) -> str:
    """The table of docs/acl.md: every command ``luasched acl --functions --cluster`` grants,
    and why."""
    rows = []
    for command, reason in reasons(functions=True, cluster=True, config=config).items():
        escaped = command.replace("|", "\\|")  # a | inside a table cell
        rows.append(f"| `{escaped}` | {reason} |")
    return "\n".join(["| command | why |", "|---|---|", *rows]) + "\n"


def default_user(namespace: Namespace) -> str:
    """``luasched-<namespace>``, the user name ``luasched acl`` takes without ``--user``."""
    return "luasched-" + namespace.name.decode("utf-8", "backslashreplace")


def acl_rule(
    namespace: Namespace,
    *,
    functions: bool = False,
    cluster: bool = False,
    config: ScriptConfig | None = None,
) -> list[bytes]:
    """The ``ACL SETUSER <user>`` rules (after the user name) of the least-privileged user of
    ``namespace``: ``reset on resetchannels -@all +<command>... ~luasched:{<ns>}:*``.

    No password: append ``>password`` (or ``#<sha256 hex>``) after them; until then nobody can
    log in as the user. Works on every server with ACLs (Redis 6.2+; ``functions`` needs 7.0+).
    """
    commands = acl_commands(functions=functions, cluster=cluster, config=config)
    return [
        b"reset",
        b"on",
        b"resetchannels",
        b"-@all",
        *(b"+" + command.encode() for command in commands),
        b"~" + namespace.key_pattern,
    ]


_PLAIN = re.compile(rb"[!#-&(-\[\]-~]+")  # printable, no space, quote or backslash


def _cli_word(word: bytes) -> str:
    """``word`` as redis-cli reads it: bare when plain, else double-quoted with escapes."""
    if _PLAIN.fullmatch(word):
        return word.decode("ascii")
    escaped = "".join(
        "\\" + chr(byte)
        if byte in b'"\\'
        else chr(byte)
        if 0x20 <= byte < 0x7F
        else f"\\x{byte:02x}"
        for byte in word
    )
    return f'"{escaped}"'


def setuser_line(user: str | bytes, rules: list[bytes]) -> str:
    """``ACL SETUSER <user> <rules...>`` as one redis-cli line (words quoted where needed)."""
    return " ".join(_cli_word(word) for word in (b"ACL", b"SETUSER", to_bytes(user), *rules))


def with_reasons_table(document: str) -> str:
    """``document`` (docs/acl.md's text) with its command table replaced by
    ``reasons_markdown()``: the table starts at the line ``| command | why |`` and runs to the
    last line that starts with ``|``. ``make snapshots`` writes it back."""
    lines = document.split("\n")
    start = lines.index("| command | why |")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = reasons_markdown().rstrip("\n").split("\n")
    return "\n".join(lines)
