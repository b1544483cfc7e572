"""Rendering, headers and the manifest: the contract every script is held to (no server needed)."""

from __future__ import annotations

import filecmp
import hashlib
import json
import re
from pathlib import Path

import pytest

from luasched import ERROR_CODES, Namespace, ScriptConfig
from luasched.render import (
    FINGERPRINT_FILE,
    SHIPPED_DIR,
    RenderedScript,
    TemplateError,
    crc16_table,
    drop_unused_functions,
    export,
    key_kinds,
    manifest,
    parse_header,
    render_all,
    templates_dir,
    write_shipped,
)

SCRIPTS = render_all()


def test_every_template_renders_to_a_named_script() -> None:
    names = sorted(
        path.relative_to(templates_dir()).as_posix()[: -len(".lua.j2")].replace("/", ".")
        for path in templates_dir().rglob("*.lua.j2")
        if not path.relative_to(templates_dir()).as_posix().startswith("include/")
    )
    assert sorted(SCRIPTS) == names
    assert "slots.keyslot" in SCRIPTS


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_obeys_the_contract(name: str) -> None:
    script = SCRIPTS[name]
    text = script.text
    assert script.sha1 == hashlib.sha1(text.encode()).hexdigest()
    assert text.isascii(), "scripts stay ASCII so every client computes the same SHA1"
    assert text.startswith(f"--@script     {name}\n") or text.startswith(f"--@script {name}\n")
    assert text.endswith("return run(main)\n")
    # No template syntax left, no forbidden calls.
    for leftover in ("{@", "@}", "--%"):
        assert leftover not in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    assert "math.random" not in code, "randomness comes from the client (ARGV)"
    assert not re.search(r"redis\.call\(\s*'(KEYS|SCAN)'", code, re.IGNORECASE)
    assert "ARG" in {code for code, _ in script.spec.errors}
    assert script.spec.since in {"6.2", "7.0"}


def test_rendering_happens_once_per_configuration() -> None:
    assert render_all() is render_all()
    assert render_all(ScriptConfig()) is render_all()
    other = render_all(ScriptConfig(max_batch=10))
    assert other is not render_all()
    assert other["slots.keyslot"].sha1 != SCRIPTS["slots.keyslot"].sha1
    assert "arg_count(1, 10)" in other["slots.keyslot"].text


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        ScriptConfig(max_batch=0)
    with pytest.raises(ValueError):
        ScriptConfig(max_batch=8000)


def test_crc16_table_matches_the_xmodem_polynomial() -> None:
    def reference(byte: int) -> int:
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        return crc & 0xFFFF

    assert crc16_table() == [reference(byte) for byte in range(256)]
    assert crc16_table()[1] == 0x1021


HEADER = """--@script     demo.one
--@summary    First line.
--@+          Second line.
--@key        ready zset  luasched:{ns}:q:<queue>:ready -- The ready set.
--@arg        lease_ms int:1..86400000  Lease length.
--@arg        mode enum:fifo|lifo  Order.
--@arg        item[1..5] string:1..64  Items.
--@reply      int  Something.
--@error      ARG  Bad input.
--@error      CORRUPT  A key of another type.
--@complexity O(1)
--@since      7.0
--@flags      no-writes
local x = 1
"""


def test_header_is_parsed_into_the_contract() -> None:
    spec = parse_header("demo.one", HEADER)
    assert spec.summary == "First line. Second line."
    assert [(key.name, key.type, key.pattern) for key in spec.keys] == [
        ("ready", "zset", "luasched:{ns}:q:<queue>:ready")
    ]
    assert spec.keys[0].description == "The ready set."
    lease, mode, item = spec.args
    assert (lease.type, lease.min, lease.max, lease.count) == ("int", 1, 86400000, None)
    assert mode.choices == ("fifo", "lifo")
    assert (item.type, item.min, item.max, item.count) == ("string", 1, 64, (1, 5))
    assert spec.errors == (("ARG", "Bad input."), ("CORRUPT", "A key of another type."))
    assert (spec.since, spec.flags) == ("7.0", ("no-writes",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--@script     demo.one", "--@script     demo.two"), "names it"),
        (("--@error      ARG  Bad input.", "--@error      NOPE  Bad."), "unknown or malformed"),
        (("--@since      7.0\n", ""), "lacks"),
        (("--@flags      no-writes", "--@flags      fly"), "unknown flags"),
        (("int:1..86400000", "int"), "needs a range"),
        (("enum:fifo|lifo", "float:1..2"), "unknown argument type"),
        (("local x = 1", "local x = fail('FULL', 'x')"), "undeclared error codes"),
        (("--@arg        lease_ms", "--@arg        lease_ms[1..2]"), "only the last"),
        (("--@complexity O(1)", "--@bogus O(1)"), "unknown tag"),
        (("luasched:{ns}:q:<queue>:ready -- ", ""), "expected 'NAME TYPE luasched:{ns}:PATTERN"),
        (("luasched:{ns}:q:", "other:{ns}:q:"), "expected 'NAME TYPE"),
        (("--@error      CORRUPT  A key of another type.\n", ""), "does not declare CORRUPT"),
        (("--@complexity", "--@caught     NOPE\n--@complexity"), "unknown codes"),
    ],
)
def test_header_mistakes_are_caught(change: tuple[str, str], message: str) -> None:
    broken = HEADER.replace(*change)
    assert broken != HEADER
    with pytest.raises(TemplateError, match=re.escape(message)):
        parse_header("demo.one", broken)


def test_caught_codes_may_be_raised_but_are_not_answered() -> None:
    raising = HEADER.replace("local x = 1", "local x = pcall(function() fail('FULL', 'x') end)")
    with pytest.raises(TemplateError, match="undeclared error codes"):
        parse_header("demo.one", raising)
    spec = parse_header(
        "demo.one", raising.replace("--@complexity", "--@caught     FULL\n--@complexity")
    )
    assert [code for code, _ in spec.errors] == ["ARG", "CORRUPT"]  # not in the manifest


def test_manifest_describes_every_script() -> None:
    data = manifest()
    assert data["manifest_version"] == 1
    assert data["error_codes"] == ERROR_CODES
    assert set(data["scripts"]) == set(SCRIPTS)
    keyslot = data["scripts"]["slots.keyslot"]
    assert keyslot["sha1"] == SCRIPTS["slots.keyslot"].sha1
    assert keyslot["keys"] == []
    assert keyslot["argv"] == [
        {
            "name": "key",
            "type": "string",
            "min_length": 0,
            "max_length": 4096,
            "repeat": {"min": 1, "max": 1000},
            "description": "A key to hash; any bytes.",
        }
    ]
    assert keyslot["errors"][0]["code"] == "ARG"
    json.dumps(data)  # serialisable as is


def test_the_shipped_scripts_equal_a_fresh_render(tmp_path: Path) -> None:
    """The package carries the default configuration's scripts (luasched/rendered/, the one
    reviewed copy); any change to a template or to the renderer must come with them rendered
    again: run `make snapshots` and review the diff (the SHA1 changes other languages see)."""
    fresh = tmp_path / "fresh"
    written = write_shipped(fresh)  # renders afresh, whatever this process has cached
    expected = sorted(path.name for path in SHIPPED_DIR.iterdir())
    assert sorted(path.name for path in written) == expected
    assert sorted(path.name for path in fresh.iterdir()) == expected
    assert FINGERPRINT_FILE in expected and "manifest.json" in expected
    _, mismatch, errors = filecmp.cmpfiles(SHIPPED_DIR, fresh, expected, shallow=False)
    assert (mismatch, errors) == ([], []), "scripts changed: run `make snapshots` and review"


def test_export_writes_the_shipped_files(tmp_path: Path) -> None:
    written = export(tmp_path)
    assert sorted(path.name for path in written) == sorted(
        [script.file_name for script in SCRIPTS.values()]
        + ["manifest.json", "luasched-functions.lua"]
    )
    expected = sorted(path.name for path in SHIPPED_DIR.iterdir() if path.name != FINGERPRINT_FILE)
    assert sorted(path.name for path in tmp_path.iterdir()) == expected
    _, mismatch, errors = filecmp.cmpfiles(SHIPPED_DIR, tmp_path, expected, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_every_key_names_its_pattern_in_the_namespace() -> None:
    for script in SCRIPTS.values():
        for key in script.spec.keys:
            assert key.pattern.startswith("luasched:{ns}:"), (script.name, key)


def test_registry_key_patterns_are_the_keys_python_builds() -> None:
    # For a namespace literally named "ns", each pattern is the key itself.
    registry = list(Namespace("ns").registry_keys)
    users = [
        s
        for s in SCRIPTS.values()
        if s.name.startswith("nodes.") or s.name.startswith(("slots.owner", "slots.rebalance"))
    ]
    assert len(users) >= 9
    for script in users:
        assert [key.pattern.encode() for key in script.spec.keys] == registry, script.name


def test_rendered_script_file_name() -> None:
    script = SCRIPTS["slots.keyslot"]
    assert isinstance(script, RenderedScript)
    assert script.file_name == "slots.keyslot.lua"


DEAD_CODE = """--@script x
-- ---------------------------------------------------------------------------------------------
-- an include header
-- ---------------------------------------------------------------------------------------------
local LIMIT = 3

-- Used by main.
local function used(value)
  return value + LIMIT
end

-- Used only by dead(): goes with it.
local function helper_of_dead(value)
  if value then
    return value
  end
end

-- Never called.
local function dead(value)
  return helper_of_dead(value)
end

local function main()
  return used(1)
end

return main()"""


def test_unused_functions_are_dropped_with_their_comments() -> None:
    text = drop_unused_functions(DEAD_CODE)
    assert "dead" not in text
    assert "Used only by" not in text and "Never called" not in text
    for kept in (
        "an include header",
        "local LIMIT = 3",
        "-- Used by main.",
        "local function used(",
        "local function main()",
        "return main()",
    ):
        assert kept in text
    assert "\n\n\n" not in text
    assert drop_unused_functions(text) == text


def test_a_function_without_its_closing_end_is_refused() -> None:
    with pytest.raises(TemplateError, match="no closing 'end'"):
        drop_unused_functions("local function broken()\n  return 1\n  end\nreturn broken()", "x")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_no_script_defines_a_function_it_never_calls(name: str) -> None:
    # Lua builds a closure for every top-level local function on every call of the script.
    text = SCRIPTS[name].text
    for defined in re.findall(r"^local function (\w+)\(", text, re.M):
        assert len(re.findall(rf"\b{defined}\b", text)) > 1, defined


def test_key_kinds_follow_the_patterns() -> None:
    spec = parse_header(
        "demo.one",
        HEADER.replace(
            "--@arg        lease_ms",
            "--@key        tasks hash  luasched:{ns}:q:tasks:<queue> -- Tasks.\n"
            "--@key        req string  luasched:{ns}:q:req:<request_id>:<queue> -- Record.\n"
            "--@key        index hash  luasched:{ns}:nodes:index -- Index.\n"
            "--@key        wake list  luasched:{ns}:q:wake:<queue> -- Wake.\n"
            "--@arg        lease_ms",
        ),
    )
    assert [(c["kind"], c["mode"], c.get("source")) for c in key_kinds(spec)] == [
        ("q:", "kind", None),  # q:<queue>:ready: the placeholder is not at the end
        ("q:tasks:", "first", 2),
        ("q:req:", "kind", None),
        ("nodes:index", "exact", None),
        ("q:wake:", "same", 2),
    ]
    with pytest.raises(TemplateError, match="no plain kind"):
        key_kinds(parse_header("demo.one", HEADER.replace("{ns}:q:<queue>", "{ns}:<queue>")))
