"""One definition per format: the lean paths and main() write and read the same bytes.

The task meta, the lock state, the request records and the length bounds that several templates
share are defined once (lua/include/*_limits.j2, the renderer's ``line_pattern`` /
``line_format`` / ``line_concat`` / ``msgpack`` / ``digits``; lua/README.md, "Formats"). Two kinds
of checks:

- on the templates: no template outside the definitions spells such a format by hand (a second
  spelling is what lets a lean path drift from main());
- on a real server: the rendered scripts' lean patterns and formats, taken out of their text,
  read and write what main()'s helpers (taken out of the same scripts) read and write, for
  values the test chooses; and the record bytes a lean path writes are what the server's
  ``cmsgpack.pack`` makes of the record.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from luasched.render import (
    MAX_SAFE_INTEGER,
    TemplateError,
    check_key_names_bound,
    check_single_definitions,
    decimal_digits,
    line_concat,
    line_format,
    line_pattern,
    msgpack_literal,
    render_all,
    safe_digits,
    templates_dir,
)

SCRIPTS = render_all()

#: The files that hold the one definition of each shared format and bound.
DEFINITIONS = {"include/queue_limits.j2", "include/lock_limits.j2", "include/pick_limits.j2"}

#: Hand spellings of a shared format or bound, each with what it would re-spell.
HAND_SPELLINGS = {
    r"\[RDLX\]": "the task meta's state letters (limits.meta_fields)",
    r"'[RDLX] '": "a task meta written by hand (line_concat(limits.meta_fields, ...))",
    r"%d\+\)? \(?(%-)?%d\+": "space-separated numeric fields (a meta or lock state pattern)",
    r"\(\[01\]\)|\[01\] \(": "the lock state's waited flag (limits.state_fields)",
    r"'[^'\n]*%[sd] [^'\n]*'": "a line format for string.format (line_format)",
    r"\.\. ' [01] ' \.\.": "a lock state written by hand (line_concat(limits.state_fields, ...))",
    r"'\\\d{2,3}": "msgpack bytes spelled out (the msgpack filter)",
    r"\[%w_%-\]": "the request id pattern (limits.request_id_pattern)",
    r"%\.17g": "the utilization score format (pick_limits.score_format)",
    r"9007199254740991|1125899906842624|879609302220[78]": "a limit spelled as digits",
    r"#\w+ *[<>]=? *\d{2,}\b": "a length bound spelled as digits (digits / safe_digits filters)",
}

#: Spellings the scan flags that are the one definition of their format (no other template
#: reads or writes it), as (file, text on the line).
ONE_PLACE = {
    # a message's echo of a value (show) and the shape check of arg_number: prelude only
    ("include/prelude.lua.j2", "#value > 40"),
    ("include/prelude.lua.j2", "#raw <= 32"),
    # a dispatched task's route: format_route and parse_route, next to each other
    ("include/dispatch.lua.j2", "string.format('%d %s %s'"),
}


def hand_spellings(directory: Path) -> list[str]:
    """Every line of a template under ``directory`` (definitions excepted) that spells a shared
    format or bound by hand, as ``file:line: what``."""
    found = []
    for path in sorted(directory.rglob("*.j2")):
        name = path.relative_to(directory).as_posix()
        if name in DEFINITIONS:
            continue
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if line.lstrip().startswith(("--@", "-- ", "{@#")) or line.strip() == "--":
                continue  # documentation (headers and comments) may describe a format
            if any(name == where and text in line for where, text in ONE_PLACE):
                continue
            for pattern, what in HAND_SPELLINGS.items():
                if re.search(pattern, line):
                    found.append(f"{name}:{number}: {what}: {line.strip()}")
    return found


def test_no_template_spells_a_shared_format_by_hand() -> None:
    assert hand_spellings(templates_dir()) == []


def test_the_scan_finds_the_spellings_it_looks_for(tmp_path: Path) -> None:
    """Each pattern of HAND_SPELLINGS catches the spelling it names (as main's templates had
    them), so the scan above cannot pass by matching nothing."""
    samples = [
        "priority, max_attempts = string.match(raw, '^[RDLX] (%-?%d+) (%d+) (%d+) %d+ %d+ ')",
        "'m' .. task_id, 'R ' .. priority .. ' ' .. attempts .. ' 0 0 ' .. now_ms .. ' ', 'seq'",
        "local fence, deadline = string.match(raw, '^(%d+) 1 (%d+) (%d+) 0 (.+)$')",
        "fence, count, deadline, owner = string.match(raw, '^(%d+) (%d+) (%d+) %d+ [01] (.+)$')",
        "local state = string.format('%d 1 %d %d 0 ', granted_fence, deadline_ms, now_ms)",
        "redis.call('SET', KEYS[1], fence .. ' 0 ' .. deadline .. ' ' .. granted .. ' 0 ' .. t)",
        "redis.call('SET', KEYS[8], '\\145\\163ack', 'PX', request_ttl)",
        "and string.find(request_id, '^[%w_%-]*$') then",
        "redis.call('ZADD', KEYS[1], 'XX', string.format('%.17g', load), index)",
        "and tonumber(token) <= 9007199254740991 then",
        "or #count_raw > 4 or #lease_raw > 10 or #wait_raw > 10",
    ]
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue" / "x.lua.j2").write_text("\n".join(samples) + "\n", "utf-8")
    found = hand_spellings(tmp_path)
    assert len(found) >= len(samples)
    assert {int(entry.split(":")[1]) for entry in found} == set(range(1, len(samples) + 1))
    assert {entry.split(": ")[1] for entry in found} == set(HAND_SPELLINGS.values())


META = [
    ["state", "[RDLX]", "%s"],
    ["priority", "%-?%d+", "%d"],
    ["max_attempts", "%d+", "%d"],
    ["attempts", "%d+", "%d"],
    ["token", "%d+", "%d"],
    ["at_ms", "%d+", "%d"],
    ["worker", ".*", None],
]


def test_line_format_helpers() -> None:
    everything = ["state", "priority", "max_attempts", "attempts", "token", "at_ms", "worker"]
    assert line_pattern(META, everything) == "'^([RDLX]) (%-?%d+) (%d+) (%d+) (%d+) (%d+) (.*)$'"
    assert line_pattern(META, ["token"], {"state": "L"}, whole=False) == (
        "'^L %-?%d+ %d+ %d+ (%d+) %d+ '"
    )
    assert line_format(META) == "'%s %d %d %d %d %d '"
    assert line_format(META, {"state": "L"}, last="token") == "'L %d %d %d %d'"
    assert line_format(META, first="at_ms") == "' %d '"
    assert (
        line_concat(
            META,
            {"priority": "p", "max_attempts": "m", "at_ms": "t"},
            {"state": "R", "attempts": 0, "token": 0},
        )
        == "'R ' .. p .. ' ' .. m .. ' 0 0 ' .. t .. ' '"
    )
    with pytest.raises(TemplateError, match="no field"):
        line_pattern(META, ["tokens"])
    with pytest.raises(TemplateError, match="give each field once"):
        line_concat(META, {"priority": "p"}, {"state": "R"})
    assert msgpack_literal(["enqueue", 1, "ready"]) == "'\\147\\167enqueue\\1\\165ready'"
    assert msgpack_literal([7, "2"]) == "'\\146\\7\\161\\50'"  # no digit right after an escape
    with pytest.raises(TemplateError, match="needs a form"):
        msgpack_literal([1000])
    assert decimal_digits(-512) == 4 and decimal_digits(86400000) == 8
    assert safe_digits(31536000000) == 10 and safe_digits(999) == 3 and safe_digits(1000) == 3
    assert safe_digits(MAX_SAFE_INTEGER) == 15


def test_each_helper_is_defined_by_one_include() -> None:
    """One name, one meaning: no two includes define a top-level function of the same name
    (a script with both would silently use the later one below it)."""
    owners: dict[str, list[str]] = {}
    for path in sorted((templates_dir() / "include").glob("*.lua.j2")):
        for name in re.findall(r"^local function (\w+)\(", path.read_text("utf-8"), re.M):
            owners.setdefault(name, []).append(path.name)
    assert {name: files for name, files in owners.items() if len(files) > 1} == {}


def test_the_render_refuses_a_name_defined_twice() -> None:
    check_single_definitions("local read = redis.call\nlocal function fail(code)\nend\n")
    with pytest.raises(TemplateError, match="'stored' is defined twice"):
        check_single_definitions("local a, stored = 1, 2\nlocal function stored(raw)\nend\n")


def test_the_render_refuses_a_key_name_no_local_binds() -> None:
    bound_first = (
        "local K_TASKS = KEYS[5]\nlocal function f()\n  return read('HGET', K_TASKS)\nend\n"
    )
    check_key_names_bound(bound_first)
    check_key_names_bound("-- K_TASKS in a comment\nlocal K_A, K_B = KEYS[1], KEYS[2]\n")
    with pytest.raises(TemplateError, match=":2: K_TASKS is used before a local binds it"):
        check_key_names_bound("local function f()\n  return read('HGET', K_TASKS)\nend\n")
    with pytest.raises(TemplateError, match="K_A is used before"):
        check_key_names_bound("local K_A = K_A or KEYS[1]\n")


# -- the rendered scripts, on a server ---------------------------------------------------------


def lean_part(name: str) -> str:
    """The text of a script's lean path: everything before the prelude."""
    text = SCRIPTS[name].text
    return text[: text.index("\nlocal SCRIPT_NAME = ")]


def block(name: str, function: str) -> str:
    """A top-level ``local function`` of a rendered script, whole."""
    text = SCRIPTS[name].text
    match = re.search(rf"^local function {function}\(.*?^end$", text, re.M | re.S)
    assert match, f"{name} has no function {function}"
    return match.group(0)


def literals(text: str, before: str) -> list[str]:
    """The Lua string literals right after each ``before`` (a regex) in ``text``."""
    return re.findall(before + r"\s*('(?:[^'\\\n]|\\.)*')", text)


def probe(r: Any, body: str, *args: str) -> Any:
    return r.eval(body, 0, *args)


METAS = [
    # state, priority, max_attempts, attempts, token, at_ms, worker
    ("R", 0, 1, 0, 0, 1796151477357, ""),
    ("L", -512, 1000000, 3, 9007199254740991, 1, "w 1 2 3 4 5 "),
    ("D", 511, 7, 6, 42, 31536000000, "a\x00b"),
    ("X", -1, 2, 2, 12, 0, "L 1 2 3 4 5 "),
    ("L", 17, 3, 1, 5, 1796151477357, ""),
]


@pytest.mark.parametrize("meta", METAS, ids=[f"{m[0]}{m[1]}" for m in METAS])
def test_lean_meta_patterns_read_what_format_meta_writes(r: Any, meta: tuple[Any, ...]) -> None:
    """queue.dequeue's and queue.ack's lean patterns, applied to format_meta's output (both
    taken from the rendered scripts), capture the fields main()'s parse_meta reads there."""
    lean = lean_part("queue.dequeue")
    take = literals(lean, r"attempts = string\.match\(raw,")
    held = literals(lean, r"not raw or string\.match\(raw,")
    ack = literals(lean_part("queue.ack"), r"string\.match\(raw,")
    assert len(take) == 2 and len(set(take)) == 1 and len(held) == len(ack) == 1
    body = "\n".join(
        [
            block("queue.enqueue", "format_meta"),
            "local meta = { state = ARGV[1], priority = tonumber(ARGV[2]),",
            "  max_attempts = tonumber(ARGV[3]), attempts = tonumber(ARGV[4]),",
            "  token = tonumber(ARGV[5]), at_ms = tonumber(ARGV[6]), worker = ARGV[7] }",
            "local raw = format_meta(meta)",
            "local function all(...) local out = { ... } return out end",
            "local function texts(list)",
            "  for i = 1, 7 do list[i] = list[i] or '' end",
            "  return list",
            "end",
            "return { raw,",
            *[f"  texts(all(string.match(raw, {pattern})))," for pattern in (take[0], held[0])],
            f"  texts(all(string.match(raw, {ack[0]}))) }}",
        ]
    )
    reply = probe(r, body, *[str(value) for value in meta])
    state, priority, max_attempts, attempts, token, at_ms, worker = meta
    expected = f"{state} {priority} {max_attempts} {attempts} {token} {at_ms} {worker}"
    assert reply[0] == expected.encode()
    taken, held_capture, ack_capture = (
        [value.decode() for value in entry if value != b""] for entry in reply[1:]
    )
    assert taken == [str(priority), str(max_attempts), str(attempts)]
    assert held_capture == ([str(token)] if state == "L" else [])
    assert ack_capture == ([str(token)] if state == "L" else [])


def test_lean_meta_formats_write_what_format_meta_writes(r: Any) -> None:
    """The metas queue.dequeue's lean path writes (one task; several, as head .. tail) equal
    format_meta's for the same lease."""
    lean = lean_part("queue.dequeue")
    one = literals(lean, r"local meta = string\.format\(")
    head = literals(lean, r"meta_args\[2 \* index\] = string\.format\(")
    tail = literals(lean, r"local tail = string\.format\(")
    assert len(one) == len(head) == len(tail) == 1
    body = "\n".join(
        [
            block("queue.dequeue", "format_meta"),
            "local p, m, a, t, d, w = -3, 5, 2, 77, 1796151477357, ARGV[1]",
            "local meta = { state = 'L', priority = p, max_attempts = m, attempts = a, token = t,",
            "  at_ms = d, worker = w }",
            f"return {{ format_meta(meta), string.format({one[0]}, p, m, a, t, d) .. w,",
            f"  string.format({head[0]}, p, m, a, t) .. string.format({tail[0]}, d) .. w }}",
        ]
    )
    written = probe(r, body, "worker 7\x00x")
    assert written == [b"L -3 5 2 77 1796151477357 worker 7\x00x"] * 3


def test_lean_records_are_what_cmsgpack_packs(r: Any) -> None:
    """The request records queue.enqueue's and queue.ack's lean paths write as literals are the
    bytes the server's cmsgpack.pack makes of the records main() writes."""
    enqueue = literals(lean_part("queue.enqueue"), r"state == 'ready' and")
    delayed = literals(lean_part("queue.enqueue"), r"\n\s*or")
    ack = literals(lean_part("queue.ack"), r"redis\.call\('SET', KEYS\[8\],")
    assert len(enqueue) == len(ack) == 1 and len(delayed) >= 1
    body = (
        f"return {{ {enqueue[0]} == cmsgpack.pack({{ 'enqueue', 1, 'ready' }}) and 1 or 0, "
        f"{delayed[-1]} == cmsgpack.pack({{ 'enqueue', 1, 'delayed' }}) and 1 or 0, "
        f"{ack[0]} == cmsgpack.pack({{ 'ack' }}) and 1 or 0 }}"
    )
    assert probe(r, body) == [1, 1, 1]


def test_lean_lock_records_are_what_record_reply_writes(r: Any) -> None:
    """The request records lock.acquire's and lock.release's lean paths write for a reentrant
    lock (string.format literals) are the lines main()'s record_reply writes for the same
    replies, which recorded_reply reads back."""
    acquired = literals(
        lean_part("lock.acquire"), r"redis\.call\('SET', KEYS\[5\], string\.format\("
    )
    released = literals(
        lean_part("lock.release"), r"redis\.call\('SET', KEYS\[5\], string\.format\("
    )
    assert len(acquired) == len(released) == 1
    record = block("lock.acquire", "record_reply").replace(
        "redis.call('SET', key, table.concat(fields, ' '), 'PX', REQUEST_TTL_MS)",
        "return table.concat(fields, ' ')",
    )
    assert "return table.concat" in record
    body = "\n".join(
        [
            block("lock.acquire", "decimal"),
            record,
            "local fence, deadline, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])",
            "return { record_reply(nil, 'r', { 'acquired', fence, deadline, 1, 0, 0, now }),",
            f"  string.format({acquired[0]}, fence, deadline, now),",
            "  record_reply(nil, 'r', { 'released', 0, now }),",
            f"  string.format({released[0]}, now) }}",
        ]
    )
    for fence, deadline, now in ((1, 2, 1), (9007199254740991, 1796151507357, 1796151477357)):
        reply = probe(r, body, str(fence), str(deadline), str(now))
        assert reply[0] == reply[1] == f"acquired {fence} {deadline} 1 0 0 {now}".encode()
        assert reply[2] == reply[3] == f"released 0 {now}".encode()


STATES = [
    # fence, count, deadline, granted, waited, owner
    (1, 1, 1796151477357, 1796151470000, 0, "tok"),
    (9007199254740990, 0, 5, 4, 0, "a b 1 0"),
    (12, 1, 1796151477357, 1796151470000, 1, "x"),
    (3, 2, 1796151477357, 1796151470000, 0, "1 1 1 0 y"),
]


@pytest.mark.parametrize("state", STATES, ids=[f"f{s[0]}c{s[1]}w{s[4]}" for s in STATES])
def test_lean_lock_patterns_read_what_write_state_writes(r: Any, state: tuple[Any, ...]) -> None:
    """lock.acquire's and lock.release's lean patterns, applied to the state main()'s
    write_state writes (taken from the rendered lock.acquire), capture what read_state reads;
    the lean grant's format and the lean release's concatenation write what write_state does."""
    acquire = literals(lean_part("lock.acquire"), r"string\.match\(raw,")
    release = literals(lean_part("lock.release"), r"string\.match\(raw,")
    grant = literals(lean_part("lock.acquire"), r"local state = string\.format\(")
    released = re.search(r"redis\.call\('SET', KEYS\[1\], (.*)\)\n", lean_part("lock.release"))
    assert len(acquire) == len(release) == len(grant) == 1 and released
    write_state = block("lock.acquire", "write_state").replace(
        "redis.call('SET', K_LOCK, ", "return ("
    )
    body = "\n".join(
        [
            block("lock.acquire", "decimal"),
            write_state,
            "local function all(...) local out = { ... } return out end",
            "local function texts(list)",
            "  for i = 1, 6 do list[i] = list[i] or '' end",
            "  return list",
            "end",
            "local raw = write_state({ fence = tonumber(ARGV[1]), count = tonumber(ARGV[2]),",
            "  deadline = tonumber(ARGV[3]), granted = tonumber(ARGV[4]), waited = ARGV[5] == '1',",
            "  owner = ARGV[6] })",
            "local token = ARGV[6]",
            f"local fence, deadline, granted = string.match(raw, {release[0]})",
            f"local lean_release = fence and ({released.group(1)}) or ''",
            "return { raw, texts(all(string.match(raw, " + acquire[0] + "))),",
            "  texts(all(string.match(raw, " + release[0] + "))),",
            f"  string.format({grant[0]}, ARGV[1], ARGV[3], ARGV[4]) .. token, lean_release }}",
        ]
    )
    reply = probe(r, body, *[str(value) for value in state])
    fence, count, deadline, granted, waited, owner = state
    raw = f"{fence} {count} {deadline} {granted} {waited} {owner}"
    assert reply[0] == raw.encode()
    assert [v.decode() for v in reply[1] if v != b""] == [
        str(fence),
        str(count),
        str(deadline),
        str(granted),
        owner,
    ]
    single = count == 1 and waited == 0
    expected_release = [str(fence), str(deadline), str(granted), owner] if single else []
    assert [v.decode() for v in reply[2] if v != b""] == expected_release
    assert reply[3] == f"{fence} 1 {deadline} {granted} 0 {owner}".encode()
    assert reply[4] == (f"{fence} 0 {deadline} {granted} 0 {owner}".encode() if single else b"")
