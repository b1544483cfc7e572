"""Templates -> rendered scripts and their manifest.

Every script is a Jinja2 template under ``lua/`` (shipped in the wheel as ``luasched/lua``).
Rendering takes trusted configuration only (``ScriptConfig``, include files, the CRC16 table):
nothing that varies per call ever enters a script, so each configuration yields one fixed text
and one SHA1.

Scripts are rendered once per version, not per process: the package carries the default
configuration's scripts, already rendered, with their manifest (``luasched/rendered/``, written
by ``make snapshots`` and checked by a test to equal a fresh render). ``render_all`` loads them
on first use, after checking the fingerprint stored beside them (a hash of every template file,
this module's source, the configuration and the version) against the templates installed with
the package: when they differ (a template edited in a source checkout), it renders afresh
instead, so it never serves stale scripts. Any other configuration is rendered, once per
process. Jinja2 is imported only when something is rendered.

Each template starts with a header of ``--@tag`` lines that is parsed into the manifest::

    --@script     slots.keyslot              name; must match the file (lua/slots/keyslot.lua.j2)
    --@summary    One line, more lines with  --@+ (appends to the previous tag)
    --@key        NAME TYPE  description      one per KEYS entry, in order (none: no line)
    --@arg        NAME[LO..HI] TYPE:RANGE description
                                              one per ARGV entry; [LO..HI] makes it repeat LO..HI
                                              times; TYPE is int:MIN..MAX, number:MIN..MAX,
                                              string:MINLEN..MAXLEN (bytes) or enum:a|b|c
    --@reply      SHAPE  description
    --@error      CODE  when it is raised         one per code (codes from luasched.errors)
    --@caught     CODE ...                     codes that shared code raises only inside pcall in
                                              this script: never answered (not in the manifest)
    --@complexity text
    --@since      6.2                          oldest server version the script supports
    --@flags      no-writes ...                Redis 7 script flags (used for Functions)

Every script with KEYS must declare CORRUPT (its run() answers it for a key of another type),
and gets the namespace check of include/keys.lua.j2, generated from its ``--@key`` patterns
(``key_kinds``) and placed right after the header, before any other code.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from luasched._version import __version__
from luasched.errors import ERROR_CODES

if TYPE_CHECKING:
    import jinja2

__all__ = [
    "MAX_BATCH_LIMIT",
    "MAX_KEY_BYTES_LIMIT",
    "ArgSpec",
    "FunctionsLibrary",
    "KeySpec",
    "LazyScripts",
    "RenderedScript",
    "ScriptConfig",
    "ScriptSpec",
    "TemplateError",
    "check_key_names_bound",
    "check_single_definitions",
    "drop_unused_functions",
    "export",
    "fingerprint",
    "function_name",
    "functions_library",
    "functions_of",
    "is_ready",
    "library_name",
    "library_of",
    "limits",
    "manifest",
    "render_all",
    "render_count",
    "templates_dir",
    "write_shipped",
]

MANIFEST_VERSION = 1
TEMPLATE_SUFFIX = ".lua.j2"
#: The file ``export`` writes the Redis Functions library to (next to the scripts).
FUNCTIONS_FILE = "luasched-functions.lua"
#: The manifest ``export`` writes next to the scripts.
MANIFEST_FILE = "manifest.json"
#: Where the package carries the default configuration's scripts, rendered (``write_shipped``).
SHIPPED_DIR = Path(__file__).resolve().parent / "rendered"
#: The file beside them that holds the fingerprint of what they were rendered from.
FINGERPRINT_FILE = "fingerprint"
KNOWN_FLAGS = frozenset(
    {"no-writes", "allow-oom", "allow-stale", "no-cluster", "allow-cross-slot-keys"}
)
ARG_TYPES = frozenset({"int", "number", "string", "enum"})
#: The largest ``ScriptConfig.max_batch`` (``unpack()`` fails at 8000 values).
MAX_BATCH_LIMIT = 7000
#: The largest ``ScriptConfig.max_key_bytes``.
MAX_KEY_BYTES_LIMIT = 1 << 20


class TemplateError(Exception):
    """A template or its header breaks the script contract (a bug in lua/, never user input)."""


@dataclass(frozen=True)
class ScriptConfig:
    """Trusted, per-deployment configuration rendered into the scripts.

    Changing a value changes the scripts' text and SHA1 (each configuration is its own set).
    """

    #: most items one call may carry (keys to hash, tasks to take...): bounds the work of a call.
    max_batch: int = 1000
    #: longest key ``slots.keyslot`` hashes, in bytes.
    max_key_bytes: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= MAX_BATCH_LIMIT:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH_LIMIT}")
        if not 1 <= self.max_key_bytes <= MAX_KEY_BYTES_LIMIT:
            raise ValueError(f"max_key_bytes must be 1..{MAX_KEY_BYTES_LIMIT}")


@dataclass(frozen=True)
class KeySpec:
    """One entry of KEYS: its name, Redis type, key name pattern and meaning.

    ``pattern`` is how the key is named, ``luasched:{ns}:`` followed by fixed parts and
    ``<placeholders>`` (e.g. ``luasched:{ns}:lock:<name>``); ``{ns}`` is the namespace in braces.
    """

    name: str
    type: str
    pattern: str
    description: str


@dataclass(frozen=True)
class ArgSpec:
    """One entry of ARGV (or a run of them, when ``count`` is set)."""

    name: str
    type: str
    description: str
    min: float | None = None  # int/number: smallest value; string: shortest length in bytes
    max: float | None = None  # int/number: largest value; string: longest length in bytes
    choices: tuple[str, ...] | None = None  # enum only
    count: tuple[int, int] | None = None  # repeated argument: how many times, at least..at most


@dataclass(frozen=True)
class ScriptSpec:
    """The contract of one script, parsed from its header."""

    name: str
    summary: str
    keys: tuple[KeySpec, ...]
    args: tuple[ArgSpec, ...]
    reply: str
    errors: tuple[tuple[str, str], ...]
    complexity: str
    since: str
    flags: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class RenderedScript:
    """A rendered script: its text, SHA1 (what SCRIPT LOAD returns) and contract."""

    name: str
    text: str
    sha1: str
    spec: ScriptSpec

    @property
    def file_name(self) -> str:
        """The file name used by ``export``: ``<name>.lua``."""
        return f"{self.name}.lua"


@functools.cache
def templates_dir() -> Path:
    """Where the templates are: inside the installed package, or ``lua/`` of a source checkout.
    Found once per process (a plain path lookup: no import machinery, which the first
    Schedulers of several threads would otherwise contend for)."""
    here = Path(__file__).resolve()
    packaged = here.parent / "lua"
    if packaged.is_dir():
        return packaged
    source = here.parents[2] / "lua"
    if source.is_dir():
        return source
    raise TemplateError(f"no templates: neither {packaged} nor {source} exists")


#: The limit files of lua/include/: ``<family>_limits.j2``, whose integer ``--% set`` lines are
#: the limits the scripts of that family render (``limits``).
LIMITS_SUFFIX = "_limits.j2"
_LIMIT = re.compile(r"^--% set ([a-z_][a-z0-9_]*) = (-?[0-9]+)$", re.M)


def limits(templates: Path | None = None) -> dict[str, dict[str, int]]:
    """The integer limits the templates render, by family: ``{"queue": {"wake_max": 16, ...},
    "lock": {...}, ...}`` from each ``include/<family>_limits.j2`` of ``templates`` (default
    ``templates_dir()``), read as text (no Jinja2). What the wrappers must agree on with the
    scripts (the bounds of the wake lists a waiter passes signals on to...) is read from here;
    the manifest carries the same table (``limits``). Cached per directory."""
    return _limits_of(templates or templates_dir())


@functools.cache
def _limits_of(templates: Path) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for path in sorted((templates / "include").glob(f"*{LIMITS_SUFFIX}")):
        family = path.name[: -len(LIMITS_SUFFIX)]
        text = path.read_text("utf-8")
        found[family] = {name: int(value) for name, value in _LIMIT.findall(text)}
    return found


def crc16_table() -> list[int]:
    """The 256-entry CRC-16/XMODEM table (polynomial 0x1021), from the stdlib implementation."""
    return [binascii.crc_hqx(bytes([byte]), 0) for byte in range(256)]


#: The largest integer the scripts handle (2^53 - 1: exact in Lua's doubles); the templates' one
#: spelling of it is ``{@ max_safe_integer @}``.
MAX_SAFE_INTEGER = (1 << 53) - 1
#: The longest decimal text the scripts convert with ``tonumber`` (a sign and 16 digits, or 17
#: digits with leading zeros): ``{@ max_decimal_bytes @}``; anything longer is refused unread.
MAX_DECIMAL_BYTES = 17


def lua_string(raw: bytes) -> str:
    """``raw`` as one single-quoted Lua string literal: letters, ``_`` and digits as themselves
    (a digit right after a decimal escape is escaped too, so ``\\1`` then ``2`` never reads as
    ``\\12``), every other byte as a decimal escape. ASCII only."""
    out: list[str] = []
    escaped = False
    for byte in raw:
        char = chr(byte)
        if (char.isascii() and (char.isalpha() or char == "_")) or (char.isdigit() and not escaped):
            out.append(char)
            escaped = False
        else:
            out.append(f"\\{byte}")
            escaped = True
    return "'" + "".join(out) + "'"


def _msgpack_bytes(value: object) -> bytes:
    """``value`` packed as Redis's ``cmsgpack.pack`` packs the same Lua value: the forms a
    request record uses (a short list of short strings and small non-negative integers);
    anything else raises TemplateError rather than guess another encoder's choice."""
    if isinstance(value, bool):
        raise TemplateError(f"msgpack: no booleans in a record ({value!r})")
    if isinstance(value, int) and 0 <= value <= 0x7F:
        return bytes([value])  # positive fixint
    if isinstance(value, str) and len(value.encode()) < 32:
        raw = value.encode()
        return bytes([0xA0 | len(raw)]) + raw  # fixstr
    if isinstance(value, (list, tuple)) and len(value) < 16:
        return bytes([0x90 | len(value)]) + b"".join(_msgpack_bytes(item) for item in value)
    raise TemplateError(f"msgpack: {value!r} needs a form this renderer does not write")


def msgpack_literal(value: object) -> str:
    """Jinja filter ``msgpack``: the Lua string literal of ``cmsgpack.pack(value)``'s bytes, so
    a lean path writes a fixed record without packing it (tests/test_formats.py checks the bytes
    against the server's cmsgpack)."""
    return lua_string(_msgpack_bytes(value))


def decimal_digits(value: int) -> int:
    """Jinja filter ``digits``: the length of ``value``'s decimal text, sign included (a check
    ``#raw <= limit|digits`` lets through every canonical decimal that may be within ``limit``;
    the value itself is compared only at that length)."""
    return len(str(int(value)))


def safe_digits(value: int) -> int:
    """Jinja filter ``safe_digits``: the most digits a decimal may have to be at most ``value``
    whatever its digits (10^n - 1 <= value), so a check ``#raw <= limit|safe_digits`` needs no
    comparison of the value itself."""
    if value < 9:
        raise TemplateError(f"safe_digits: {value} has no such length")
    return len(str(int(value) + 1)) - 1


def render_check(condition: bool, message: str) -> str:
    """Jinja global ``check``: fails the render (TemplateError) unless ``condition``; renders
    nothing. For a bound a template derives from a limit: a limit changed past what the bound
    assumes fails the render, not the script."""
    if not condition:
        raise TemplateError(f"render check failed: {message}")
    return ""


#: A line format as the templates give it: ``[name, lua_pattern, format]`` per field, the last
#: one the free text (``format`` None).
LineFields = Sequence[Sequence[Any]]


def _line_fields(
    fields: LineFields, fixed: Mapping[str, object], names: Sequence[str]
) -> tuple[list[tuple[str, str, str]], tuple[str, str]]:
    """The fixed fields of a line format as (name, pattern, format), and its free text field as
    (name, pattern), after checking that every name given is one of the format's fields."""
    rows = [(str(field[0]), str(field[1]), str(field[2])) for field in fields[:-1]]
    tail = (str(fields[-1][0]), str(fields[-1][1]))
    known = [name for name, _, _ in rows] + [tail[0]]
    unknown = (set(fixed) | set(names)) - set(known)
    if unknown:
        raise TemplateError(f"line format {known}: no field {sorted(unknown)}")
    return rows, tail


def line_pattern(
    fields: LineFields,
    capture: Sequence[str] = (),
    fixed: Mapping[str, object] | None = None,
    whole: bool = True,
) -> str:
    """Jinja global: the Lua pattern (a quoted literal) of a line format, captures in field
    order.

    A line format is a list of ``[name, lua_pattern, format]``: fields separated by one space,
    the last one free text after a space (``format`` None). ``capture`` names the fields to
    capture, ``fixed`` gives fields a literal value, and ``whole=False`` matches only up to the
    space before the free text (no anchor at the end)."""
    fixed = fixed or {}
    rows, (tail, tail_pattern) = _line_fields(fields, fixed, capture)
    parts = []
    for name, pattern, _ in rows:
        if name in fixed:
            parts.append(re.sub(r"(\W)", r"%\1", str(fixed[name])))
        elif name in capture:
            parts.append(f"({pattern})")
        else:
            parts.append(pattern)
    text = "^" + " ".join(parts) + " "
    if whole:
        text += (f"({tail_pattern})" if tail in capture else tail_pattern) + "$"
    elif tail in capture:
        raise TemplateError(f"line_pattern: {tail} is captured only with whole=True")
    return lua_string_text(text)


def line_format(
    fields: LineFields,
    fixed: Mapping[str, object] | None = None,
    first: str | None = None,
    last: str | None = None,
) -> str:
    """Jinja global: the ``string.format`` literal of a line format's fields ``first`` to
    ``last`` (default: all but the free text; its separator included after the last field), a
    literal for each ``fixed`` one; a leading space when ``first`` is not the first field. The
    free text is appended with ``..`` by the caller (Lua 5.1's ``%s`` stops at a zero byte)."""
    fixed = fixed or {}
    rows, _ = _line_fields(fields, fixed, [name for name in (first, last) if name])
    names = [name for name, _, _ in rows]
    start = names.index(first) if first else 0
    stop = names.index(last) + 1 if last else len(names)
    parts = [
        str(fixed[name]).replace("%", "%%") if name in fixed else conversion
        for name, _, conversion in rows[start:stop]
    ]
    text = (" " if start else "") + " ".join(parts) + (" " if stop == len(names) else "")
    return lua_string_text(text)


def line_concat(
    fields: LineFields,
    values: Mapping[str, str],
    fixed: Mapping[str, object] | None = None,
) -> str:
    """Jinja global: a Lua ``..`` expression writing a whole line, each field from ``values``
    (a Lua expression) or ``fixed`` (a literal, merged with the spaces around it into one
    string); the free text may be neither (then it is empty). Every other field must be given
    exactly once."""
    fixed = fixed or {}
    rows, (tail, _) = _line_fields(fields, fixed, list(values))
    names = [name for name, _, _ in rows]
    missing = [name for name in names if (name in values) == (name in fixed)]
    if missing or tail in fixed:
        raise TemplateError(f"line_concat: give each field once, as a value or fixed: {missing}")
    operands: list[str] = []
    literal = ""
    for name in [*names, tail]:
        if name in values:
            if literal:
                operands.append(lua_string_text(literal))
            operands.append(values[name])
            literal = ""
        elif name in fixed:
            literal += str(fixed[name])
        if name != tail:
            literal += " "
    if literal:
        operands.append(lua_string_text(literal))
    return " .. ".join(operands)


def lua_string_text(text: str) -> str:
    """Printable ASCII ``text`` (no quote, no backslash) as a single-quoted Lua literal."""
    if not text.isascii() or not text.isprintable() or "'" in text or "\\" in text:
        raise TemplateError(f"not a plain Lua literal: {text!r}")
    return f"'{text}'"


def _environment(directory: Path) -> jinja2.Environment:
    import jinja2  # here, not at the top: loading the shipped scripts needs no Jinja2

    # Delimiters chosen so that no Lua construct can open a tag: "{@" never occurs in Lua,
    # unlike "{{" (nested tables) or "{#" (length of a table); statements are whole lines
    # starting with "--%", which also keeps templates readable as Lua.
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        block_start_string="{@%",
        block_end_string="%@}",
        variable_start_string="{@",
        variable_end_string="@}",
        comment_start_string="{@#",
        comment_end_string="#@}",
        line_statement_prefix="--%",
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    # The one definition of each shared format and bound (docs: lua/README.md, "Formats").
    environment.filters.update(
        msgpack=msgpack_literal, digits=decimal_digits, safe_digits=safe_digits
    )
    environment.globals.update(
        max_safe_integer=MAX_SAFE_INTEGER,
        max_decimal_bytes=MAX_DECIMAL_BYTES,
        check=render_check,
        line_pattern=line_pattern,
        line_format=line_format,
        line_concat=line_concat,
    )
    return environment


def _template_names(directory: Path) -> list[str]:
    names = []
    for path in sorted(directory.rglob(f"*{TEMPLATE_SUFFIX}")):
        relative = path.relative_to(directory)
        if relative.parts[0] == "include":
            continue
        names.append(relative.as_posix())
    return names


def _script_name(template_name: str) -> str:
    return template_name[: -len(TEMPLATE_SUFFIX)].replace("/", ".")


_ARG = re.compile(
    r"^(?P<name>[a-z_][a-z0-9_]*)(?:\[(?P<low>\d+)\.\.(?P<high>\d+)\])?\s+"
    r"(?P<type>[a-z]+)(?::(?P<range>\S+))?\s+(?P<text>.+)$"
)
_KEY = re.compile(
    r"^(?P<name>[a-z_][a-z0-9_]*)\s+(?P<type>[a-z]+)\s+(?P<pattern>luasched:\{ns\}:\S+)"
    r"\s+--\s+(?P<text>.+)$"
)
_ERROR = re.compile(r"^(?P<code>[A-Z][A-Z0-9_]*)\s+(?P<text>.+)$")
# Without a leading \b (checked in _raised_codes): a pattern that starts with a literal is
# searched for that literal first, about 50 times faster over a long script.
_FAIL_CALL = re.compile(r"fail\('([A-Z][A-Z0-9_]*)'")


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TemplateError(f"{where}: {text!r} is not a number") from None
    return int(value) if value.is_integer() else value


def _parse_arg(text: str, where: str) -> ArgSpec:
    match = _ARG.match(text)
    if match is None:
        raise TemplateError(f"{where}: cannot parse @arg {text!r}")
    arg_type, bounds = match["type"], match["range"]
    if arg_type not in ARG_TYPES:
        raise TemplateError(f"{where}: unknown argument type {arg_type!r}")
    count = (int(match["low"]), int(match["high"])) if match["low"] is not None else None
    if arg_type == "enum":
        if not bounds:
            raise TemplateError(f"{where}: enum needs choices (enum:a|b)")
        return ArgSpec(
            match["name"], arg_type, match["text"], choices=tuple(bounds.split("|")), count=count
        )
    if not bounds or ".." not in bounds:
        raise TemplateError(f"{where}: {arg_type} needs a range ({arg_type}:MIN..MAX)")
    low, high = bounds.split("..", 1)
    return ArgSpec(
        match["name"],
        arg_type,
        match["text"],
        min=_number(low, where),
        max=_number(high, where),
        count=count,
    )


def parse_header(name: str, text: str) -> ScriptSpec:
    """Parse the ``--@`` header at the top of a rendered script into its contract."""
    tags: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.startswith("--@"):
            break
        tag, _, value = line[3:].partition(" ")
        value = value.strip()
        if tag == "+":
            if not tags:
                raise TemplateError(f"{name}: --@+ before any tag")
            previous_tag, previous = tags[-1]
            tags[-1] = (previous_tag, f"{previous} {value}")
        else:
            tags.append((tag, value))
    fields: dict[str, str] = {}
    keys: list[KeySpec] = []
    args: list[ArgSpec] = []
    errors: list[tuple[str, str]] = []
    caught: set[str] = set()
    for tag, value in tags:
        where = f"{name} @{tag}"
        if tag == "key":
            key = _KEY.match(value)
            if key is None:
                raise TemplateError(
                    f"{where}: expected 'NAME TYPE luasched:{{ns}}:PATTERN -- description', "
                    f"got {value!r}"
                )
            keys.append(KeySpec(key["name"], key["type"], key["pattern"], key["text"]))
        elif tag == "arg":
            args.append(_parse_arg(value, where))
        elif tag == "error":
            error = _ERROR.match(value)
            if error is None or error["code"] not in ERROR_CODES:
                raise TemplateError(f"{where}: unknown or malformed error {value!r}")
            errors.append((error["code"], error["text"]))
        elif tag == "caught":
            caught.update(value.split())
            if not caught <= ERROR_CODES.keys():
                raise TemplateError(f"{where}: unknown codes {sorted(caught - ERROR_CODES.keys())}")
        elif tag in {"script", "summary", "reply", "complexity", "since", "flags"}:
            if tag in fields:
                raise TemplateError(f"{where}: given twice")
            fields[tag] = value
        else:
            raise TemplateError(f"{where}: unknown tag")
    missing = {"script", "summary", "reply", "complexity", "since"} - fields.keys()
    if missing:
        raise TemplateError(f"{name}: header lacks {sorted(missing)}")
    if fields["script"] != name:
        raise TemplateError(f"{name}: header names it {fields['script']!r}")
    if any(arg.count is not None for arg in args[:-1]):
        raise TemplateError(f"{name}: only the last argument may repeat")
    flags = tuple(fields.get("flags", "").split())
    if not set(flags) <= KNOWN_FLAGS:
        raise TemplateError(f"{name}: unknown flags {sorted(set(flags) - KNOWN_FLAGS)}")
    if keys and not any(code == "CORRUPT" for code, _ in errors):
        # run() answers CORRUPT for a key of another type (prelude.lua.j2): every script that
        # takes KEYS can raise it, so its header says so.
        raise TemplateError(f"{name}: takes KEYS but does not declare CORRUPT")
    used = _raised_codes(text)
    declared = {code for code, _ in errors} | caught
    if used - declared:
        raise TemplateError(f"{name}: raises undeclared error codes {sorted(used - declared)}")
    return ScriptSpec(
        name=name,
        summary=fields["summary"],
        keys=tuple(keys),
        args=tuple(args),
        reply=fields["reply"],
        errors=tuple(errors),
        complexity=fields["complexity"],
        since=fields["since"],
        flags=flags,
    )


def _raised_codes(text: str) -> set[str]:
    """The codes of every ``fail('CODE'`` call in ``text`` (``fail`` a whole word)."""
    codes = set()
    for match in _FAIL_CALL.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if not (before.isalnum() or before == "_"):
            codes.add(match[1])
    return codes


_FUNCTION_START = re.compile(r"^local function ([A-Za-z_][A-Za-z0-9_]*)\(", re.M)


def drop_unused_functions(text: str, where: str = "script") -> str:
    """``text`` without the top-level ``local function`` blocks that nothing else names.

    Includes define more helpers than any one script uses, and Lua builds a closure for every
    ``local function`` on every call (about a thousand server instructions each, allocation and
    garbage collection included; docs/redis-notes.md), so an unused one is pure cost. A block runs
    from ``local function NAME(`` at column 0 to the next line that is exactly ``end``; it goes
    with the comment lines right above it (not ``--@``/``--%`` lines or ``-- ---`` rules). A name
    counts as used when it appears as a word outside its own block on a line that is not a
    comment (a trailing comment on a code line counts: the rule errs on keeping). Repeats until
    nothing more goes, so a helper used only by dropped helpers goes too. Raises TemplateError
    for a block without its closing ``end``.
    """
    lines = text.split("\n")
    while True:
        blocks: list[tuple[str, int, int]] = []
        for number, line in enumerate(lines):
            match = _FUNCTION_START.match(line)
            if not match:
                continue
            try:
                last = lines.index("end", number + 1)
            except ValueError:
                raise TemplateError(
                    f"{where}: local function {match.group(1)} has no closing 'end' at column 0"
                ) from None
            blocks.append((match.group(1), number, last))
        unused = []
        for name, first, last in blocks:
            word = re.compile(rf"\b{name}\b")
            outside = lines[:first] + lines[last + 1 :]
            if not any(word.search(line) for line in outside if not _is_comment(line)):
                unused.append((first, last))
        if not unused:
            return "\n".join(lines)
        for first, last in sorted(unused, reverse=True):
            while first > 0 and _is_doc_comment(lines[first - 1]):
                first -= 1
            if (
                first > 0
                and lines[first - 1] == ""
                and last + 1 < len(lines)
                and lines[last + 1] == ""
            ):
                last += 1
            del lines[first : last + 1]


_TOP_LEVEL_LOCAL = re.compile(
    r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*(?:, *[A-Za-z_][A-Za-z0-9_]*)*)", re.M
)


def check_single_definitions(text: str, where: str = "script") -> None:
    """Raise TemplateError when ``text`` defines a top-level local (``local NAME`` or ``local
    function NAME`` at column 0) twice: a second definition would silently shadow the first for
    the code below it, so each name has one meaning in a script (lua/README.md)."""
    seen: set[str] = set()
    for match in _TOP_LEVEL_LOCAL.finditer(text):
        for local in match.group(1).split(","):
            local = local.strip()
            if local in seen:
                raise TemplateError(f"{where}: top-level local {local!r} is defined twice")
            seen.add(local)


_KEY_NAME = re.compile(r"\bK_[A-Z][A-Z0-9_]*\b")


def check_key_names_bound(text: str, where: str = "script") -> None:
    """Raise TemplateError when code in ``text`` names a ``K_*`` key before a top-level
    ``local K_...`` binds it (an include used by a script that does not bind what it expects:
    in Lua an unbound name is a global, nil, and the call would go to the wrong key or fail
    late). Comment lines are not code."""
    bound: set[str] = set()
    for number, line in enumerate(text.split("\n"), 1):
        if _is_comment(line):
            continue
        match = _TOP_LEVEL_LOCAL.match(line)
        declared = {name.strip() for name in match.group(1).split(",")} if match else set()
        code = line.split("--", 1)[0]
        if match and "=" in code:
            code = code.split("=", 1)[1]  # the right-hand side uses names bound before
        for name in _KEY_NAME.findall(code):
            if name not in bound:
                raise TemplateError(f"{where}:{number}: {name} is used before a local binds it")
        bound |= {name for name in declared if name.startswith("K_")}


def _is_doc_comment(line: str) -> bool:
    return line.startswith("--") and not line.startswith(("--@", "--%", "-- ---"))


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("--")


def render_all(config: ScriptConfig | None = None) -> Mapping[str, RenderedScript]:
    """Every script for ``config`` (default ``ScriptConfig()``), rendered at most once per process.

    Returns a read-only mapping of script name (``"slots.keyslot"``) to ``RenderedScript``, in
    name order; the same object for equal configurations, whichever thread asks first. The
    default configuration is loaded from the scripts the package carries when their fingerprint
    matches the installed templates (no rendering, no Jinja2); otherwise, and for any other
    configuration, the templates are rendered. Thread-safe: the first call for a configuration
    takes a lock, so concurrent first calls wait for one load or render instead of each doing
    it; later calls take no lock. Raises TemplateError when a template breaks the contract.
    """
    config = config or ScriptConfig()
    found = _scripts.get(config)
    if found is not None:
        return found
    return _scripts_for(config, None, SHIPPED_DIR)


def is_ready(config: ScriptConfig | None = None) -> bool:
    """Whether ``render_all(config)`` would answer at once (already loaded or rendered)."""
    return (config or ScriptConfig()) in _scripts


def render_count() -> int:
    """How many times this process rendered the templates: at most once per configuration, and
    never for the default configuration of a package whose templates match its shipped scripts."""
    return _renders


#: Configuration -> its scripts, filled once per configuration under ``_lock``.
_scripts: dict[ScriptConfig, Mapping[str, RenderedScript]] = {}
_libraries: dict[ScriptConfig, FunctionsLibrary] = {}
#: Reentrant: the Functions library of a configuration is built from its scripts.
_lock = threading.RLock()
_renders = 0


def _scripts_for(
    config: ScriptConfig, templates: Path | None, shipped: Path
) -> Mapping[str, RenderedScript]:
    """The cached scripts of ``config``, else the shipped ones if they match ``templates``
    (default ``templates_dir()``), else a fresh render of ``templates``; cached once under the
    lock, which is taken before anything else is looked up: concurrent first calls wait for one
    load without doing any of its work themselves."""
    with _lock:
        found = _scripts.get(config)
        if found is None:
            directory = templates or templates_dir()
            found = _load_shipped(config, directory, shipped)
            if found is None:
                found = _render(config, directory)
            _scripts[config] = found
        return found


def fingerprint(config: ScriptConfig, templates: Path | None = None) -> str:
    """SHA-256 of everything the rendered scripts and their manifest are made from: luasched's
    version, ``config``, the source of this module and of ``luasched.errors`` (the renderer and
    the error codes), and every file under ``templates`` (default ``templates_dir()``) with its
    path. Equal fingerprints mean a fresh render would write the same files. Raises OSError
    when a file cannot be read."""
    from luasched import errors

    directory = templates or templates_dir()
    digest = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    part("version", __version__.encode())
    part("config", json.dumps(asdict(config), sort_keys=True).encode())
    part("render.py", _read(__file__))
    part("errors.py", _read(errors.__file__))
    for relative in _files(str(directory)):
        part(relative, _read(os.path.join(directory, relative)))
    return digest.hexdigest()


def _read(path: str | Path) -> bytes:
    """The bytes of the regular file ``path`` in four system calls (open, fstat, read, close;
    ``Path.read_bytes`` makes six or more). Each one lets another thread take the GIL, and the
    first Scheduler of a process reads ~130 files while the process's other threads start
    (docs/redis-notes.md). A read of a regular file returns less than asked only at its end, so
    one read of its size + 1 bytes reads it whole. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) <= size:
            return data
        chunks = [data]  # it grew since the fstat: read on to its end
        while chunks[-1]:
            chunks.append(os.read(fd, 1 << 16))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _files(directory: str) -> list[str]:
    """The regular files below ``directory``, as relative POSIX paths in the order of
    ``sorted(Path(directory).rglob("*"))`` (by path parts), found with ``os.scandir``, which
    tells files from folders without a system call per entry."""
    found: list[tuple[str, ...]] = []

    def walk(folder: str, parts: tuple[str, ...]) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    walk(entry.path, (*parts, entry.name))
                elif entry.is_file():
                    found.append((*parts, entry.name))

    walk(directory, ())
    return ["/".join(parts) for parts in sorted(found)]


def _load_shipped(
    config: ScriptConfig, templates: Path, shipped: Path
) -> Mapping[str, RenderedScript] | None:
    """The scripts in ``shipped`` if they were rendered from exactly ``templates`` with
    ``config`` (their stored fingerprint matches) and each file's SHA1 is the manifest's; None
    otherwise (then the caller renders)."""
    if config != ScriptConfig():
        return None
    try:
        stored = _read(shipped / FINGERPRINT_FILE).decode("ascii").strip()
        if stored != fingerprint(config, templates):
            return None
        index = json.loads(_read(shipped / MANIFEST_FILE).decode("utf-8"))
        scripts: dict[str, RenderedScript] = {}
        for name, entry in sorted(index["scripts"].items()):
            text = _read(shipped / entry["file"]).decode("utf-8")
            sha1 = hashlib.sha1(text.encode("utf-8")).hexdigest()
            if sha1 != entry["sha1"]:
                return None
            scripts[name] = RenderedScript(
                name=name, text=text, sha1=sha1, spec=parse_header(name, text)
            )
    except (OSError, ValueError, KeyError, TypeError, TemplateError):
        return None
    return _ReadOnly(scripts) if scripts else None


def _render(config: ScriptConfig, directory: Path) -> Mapping[str, RenderedScript]:
    """Render every template under ``directory`` for ``config`` (no cache; counted)."""
    global _renders
    _renders += 1
    environment = _environment(directory)
    context: dict[str, Any] = {
        "config": config,
        "crc16_table": _lua_bytes(crc16_table()),
    }
    scripts: dict[str, RenderedScript] = {}
    for template_name in _template_names(directory):
        name = _script_name(template_name)
        template = environment.get_template(template_name)
        # Twice: the header (parsed from the first rendering) says the layout's key types, which
        # every script with KEYS gets for its error path (prelude.lua.j2, run()), and the key
        # patterns its namespace check is generated from (keys.lua.j2, placed after the header).
        spec = parse_header(name, template.render(context, script_name=name, layout_types=""))
        layout_types = ", ".join(f"'{key.type}'" for key in spec.keys)
        text = template.render(context, script_name=name, layout_types=layout_types)
        text = _with_key_check(environment, name, spec, text)
        text = drop_unused_functions(text, name)
        check_single_definitions(text, name)
        check_key_names_bound(text, name)
        spec = parse_header(name, text)
        sha1 = hashlib.sha1(text.encode("utf-8")).hexdigest()
        scripts[name] = RenderedScript(name=name, text=text, sha1=sha1, spec=spec)
    if not scripts:
        raise TemplateError(f"no templates found in {directory}")
    return _ReadOnly(dict(sorted(scripts.items())))


class LazyScripts(Mapping[str, RenderedScript]):
    """``render_all(config)``, fetched on first access instead of when this object is made.

    ``luasched.asyncio`` holds its scripts this way, so that creating a Scheduler on the event
    loop does no work; its runner awaits ``render_all`` in a worker thread before its first
    call (``AsyncScriptRunner.ready``). Reading it before that loads or renders on the calling
    thread.
    """

    def __init__(self, config: ScriptConfig) -> None:
        self.config = config

    def resolved(self) -> Mapping[str, RenderedScript]:
        """The scripts themselves: ``render_all(self.config)``."""
        return render_all(self.config)

    def __getitem__(self, name: str) -> RenderedScript:
        return self.resolved()[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.resolved())

    def __len__(self) -> int:
        return len(self.resolved())


_KIND = re.compile(r"[a-z][a-z:_-]*")
_TAIL = re.compile(r"<([a-z_]+)>")


def key_kinds(spec: ScriptSpec) -> list[dict[str, Any]]:
    """How the namespace check (include/keys.lua.j2) compares each KEYS entry, from its pattern.

    ``kind`` is the fixed text after ``luasched:{ns}:`` up to the first ``<placeholder>``
    (``q:tasks:`` for ``luasched:{ns}:q:tasks:<queue>``). ``mode`` says what the key must be,
    with ``prefix`` the ``luasched:{<ns>}:`` of KEYS[1]:

    - ``exact`` (no placeholder): exactly prefix .. kind;
    - ``first`` (kind and one trailing placeholder, its first such key): prefix .. kind .. the
      rest, which becomes the placeholder's value (``tail`` names the Lua local holding it);
    - ``same`` (the same shape, a later key): prefix .. kind .. that same value (so every
      ``<queue>`` of one call names one queue);
    - ``kind`` (more placeholders, e.g. ``q:req:<request_id>:<queue>``): starts with
      prefix .. kind.

    ``source`` is the position of the key that gave the value (``first``/``same``).
    """
    checks: list[dict[str, Any]] = []
    first_of: dict[str, int] = {}
    for position, key in enumerate(spec.keys, 1):
        rest = key.pattern[len("luasched:{ns}:") :]
        kind, placeholder, tail = rest.partition("<")
        if not _KIND.fullmatch(kind):
            raise TemplateError(f"{spec.name}: key pattern {key.pattern!r} has no plain kind")
        check: dict[str, Any] = {"position": position, "kind": kind, "pattern": key.pattern}
        single = _TAIL.fullmatch("<" + tail) if placeholder else None
        if not placeholder:
            check["mode"] = "exact"
        elif single is None:
            check["mode"] = "kind"
        else:
            name = single.group(1)
            check["tail"] = f"tail_{name}"
            check["mode"] = "same" if name in first_of else "first"
            check["source"] = first_of.setdefault(name, position)
        checks.append(check)
    return checks


def _with_key_check(environment: jinja2.Environment, name: str, spec: ScriptSpec, text: str) -> str:
    """``text`` with the namespace check of ``spec``'s KEYS (include/keys.lua.j2) placed right
    after the ``--@`` header: it runs before anything else, lean paths included."""
    if not spec.keys:
        return text
    checks = key_kinds(spec)
    tails = sorted({check["tail"] for check in checks if "tail" in check})
    check = environment.get_template("include/keys.lua.j2").render(
        script_name=name, key_checks=checks, tails=tails
    )
    lines = text.split("\n")
    end = 0
    while end < len(lines) and lines[end].startswith("--@"):
        end += 1
    return "\n".join(lines[:end]) + "\n" + check.rstrip("\n") + "\n" + "\n".join(lines[end:])


class _ReadOnly(Mapping[str, RenderedScript]):
    """A mapping that cannot be changed (the cached scripts are shared by every caller)."""

    def __init__(self, items: dict[str, RenderedScript]) -> None:
        self._items = items

    def __getitem__(self, name: str) -> RenderedScript:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"no script named {name!r}; known: {sorted(self._items)}") from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _lua_bytes(values: list[int]) -> str:
    """16-bit values as one Lua string literal of big-endian byte pairs, ASCII only (escapes).

    One literal on one line: Lua 5.1 does not fold ``'a' .. 'b'`` at compile time, so a split
    literal would be concatenated again on every call.
    """
    raw = b"".join(value.to_bytes(2, "big") for value in values)
    return "'" + "".join(f"\\{byte}" for byte in raw) + "'"


def _arg_json(arg: ArgSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": arg.name, "type": arg.type}
    if arg.type == "string":
        entry["min_length"], entry["max_length"] = arg.min, arg.max
    elif arg.type == "enum":
        entry["choices"] = list(arg.choices or ())
    else:
        entry["min"], entry["max"] = arg.min, arg.max
    if arg.count is not None:
        entry["repeat"] = {"min": arg.count[0], "max": arg.count[1]}
    entry["description"] = arg.description
    return entry


def manifest(config: ScriptConfig | None = None) -> dict[str, Any]:
    """The manifest of every script for ``config``: enough to call any script from any language.

    The schema is documented in docs/manifest.md.
    """
    config = config or ScriptConfig()
    return _manifest_of(render_all(config), config, functions_of(config))


def _manifest_of(
    scripts: Mapping[str, RenderedScript], config: ScriptConfig, library: FunctionsLibrary
) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "luasched_version": __version__,
        "config": asdict(config),
        "error_format": "LUASCHED_<CODE> <script>: <detail>",
        "error_codes": dict(ERROR_CODES),
        "key_layout": {
            "prefix": "luasched:{ns}:",
            "hash_tag": "ns",
            "namespace": "1..128 bytes, no '{' or '}'; replaces ns in every key pattern",
        },
        "limits": limits(),
        "scripts": {
            name: {
                "file": script.file_name,
                "sha1": script.sha1,
                "summary": script.spec.summary,
                "keys": [asdict(key) for key in script.spec.keys],
                "argv": [_arg_json(arg) for arg in script.spec.args],
                "reply": script.spec.reply,
                "errors": [{"code": code, "when": text} for code, text in script.spec.errors],
                "complexity": script.spec.complexity,
                "min_server": script.spec.since,
                "flags": list(script.spec.flags),
            }
            for name, script in sorted(scripts.items())
        },
        "functions": {
            "file": FUNCTIONS_FILE,
            "library": library_name(),
            "functions": {name: function_name(name) for name in sorted(scripts)},
            "digest_function": library.digest_function,
            "digest": library.digest,
        },
    }


def export(directory: str | Path, config: ScriptConfig | None = None) -> list[Path]:
    """Write every script as ``<name>.lua``, the Functions library as ``luasched-functions.lua``
    and ``manifest.json`` into ``directory``.

    Creates the directory if needed; returns the written paths. The output is deterministic.
    """
    config = config or ScriptConfig()
    return _write(Path(directory), render_all(config), config, functions_of(config))


def _write(
    target: Path,
    scripts: Mapping[str, RenderedScript],
    config: ScriptConfig,
    library: FunctionsLibrary,
) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for script in scripts.values():
        path = target / script.file_name
        path.write_bytes(script.text.encode("utf-8"))
        written.append(path)
    path = target / FUNCTIONS_FILE
    path.write_bytes(library.text.encode("ascii"))
    written.append(path)
    path = target / MANIFEST_FILE
    data = _manifest_of(scripts, config, library)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", "utf-8")
    written.append(path)
    return written


def write_shipped(directory: Path | None = None) -> list[Path]:
    """Render the default configuration afresh from ``templates_dir()`` and write it where the
    package loads it from (default ``SHIPPED_DIR``): what ``export`` writes, plus the
    fingerprint file. Removes the directory's other files first (a script whose template is
    gone). ``make snapshots`` runs it; the result is reviewed and committed.
    """
    target = directory or SHIPPED_DIR
    config = ScriptConfig()
    templates = templates_dir()
    stamp = fingerprint(config, templates)
    scripts = _render(config, templates)
    if target.is_dir():
        for old in target.iterdir():
            if old.is_file():
                old.unlink()
    written = _write(target, scripts, config, library_of(scripts))
    path = target / FINGERPRINT_FILE
    path.write_text(stamp + "\n", "ascii")
    return [*written, path]


# ---------------------------------------------------------------------------------------------
# The Redis Functions library (Redis 7.0+ / Valkey): the same scripts, registered as functions.


def _version_suffix() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", __version__)


def library_name() -> str:
    """The library's name: ``luasched_<version>``, dots as underscores (``luasched_0_1_0``)."""
    return f"luasched_{_version_suffix()}"


def function_name(script_name: str) -> str:
    """The function a script is registered as: ``luasched_<area>_<op>_v<version>``.

    ``queue.dequeue`` of luasched 0.1.0 is ``luasched_queue_dequeue_v0_1_0``: letters, digits and
    underscores only; the ``luasched_`` prefix keeps it apart from other libraries' functions
    (function names are global on a server) and the version lets two releases coexist.
    """
    return f"luasched_{script_name.replace('.', '_')}_v{_version_suffix()}"


@dataclass(frozen=True)
class FunctionsLibrary:
    """The Functions library of one set of rendered scripts: its name, text and function names."""

    name: str
    text: str
    #: script name -> function name
    functions: Mapping[str, str]
    #: script name -> whether it is registered ``no-writes`` (callable with FCALL_RO)
    read_only: Mapping[str, bool]
    #: SHA1 of the library's text up to its digest function: ``FCALL_RO <digest_function> 0``
    #: answers it, so a client learns with one small call whether exactly this library is loaded.
    digest: str = ""
    digest_function: str = ""


_LIBRARY_HEADER = """\
-- luasched {version}: every luasched script as a Redis Functions library (Redis 7.0+, Valkey 8+).
-- Generated by `luasched functions`; do not edit. Load it with
-- FUNCTION LOAD REPLACE (`luasched install-functions --url URL` does it on every primary).
--
-- Each function's body is byte for byte the script of the same name (manifest.json: same SHA1),
-- wrapped as `function(KEYS, ARGV) <script> end`, so FCALL name numkeys KEYS... ARGV... answers
-- exactly what EVALSHA sha1 numkeys KEYS... ARGV... answers. Function flags are the scripts'
-- --@flags.
"""


def library_of(scripts: Mapping[str, RenderedScript]) -> FunctionsLibrary:
    """The Functions library registering every script of ``scripts`` (deterministic, ASCII).

    The first line is ``#!lua name=luasched_<version>``; then, per script in name order, a
    ``redis.register_function{function_name=..., callback=function(KEYS, ARGV) ... end,
    flags={...}}`` whose callback body is the script's text unchanged. Wrapping adds one function
    level, exactly as EVAL does (Redis compiles a script as the body of a function), so the
    script keeps Lua's limits (200 locals, 60 upvalues per function) and its top-level
    ``return run(main)``.
    """
    parts = [f"#!lua name={library_name()}\n", _LIBRARY_HEADER.format(version=__version__)]
    functions: dict[str, str] = {}
    read_only: dict[str, bool] = {}
    for name in sorted(scripts):
        script = scripts[name]
        if not script.text.isascii() or "\r" in script.text:
            raise TemplateError(f"{name}: a Functions library body must be ASCII without CR")
        functions[name] = function_name(name)
        read_only[name] = "no-writes" in script.spec.flags
        flags = "{ " + ", ".join(f"'{flag}'" for flag in script.spec.flags) + " }"
        flags = flags if script.spec.flags else "{}"
        body = script.text if script.text.endswith("\n") else script.text + "\n"
        parts.append(
            f"\n-- {name} (sha1 {script.sha1})\n"
            "redis.register_function{\n"
            f"  function_name = '{functions[name]}',\n"
            f"  flags = {flags},\n"
            "  callback = function(KEYS, ARGV)\n"
            f"{body}"
            "end,\n"
            "}\n"
        )
    digest = hashlib.sha1("".join(parts).encode("ascii")).hexdigest()
    digest_function = function_name("library.digest")
    parts.append(
        f"\n-- identity: FCALL_RO {digest_function} 0 answers the SHA1 of the text above\n"
        "redis.register_function{\n"
        f"  function_name = '{digest_function}',\n"
        "  flags = { 'no-writes', 'allow-stale' },\n"
        f"  callback = function() return '{digest}' end,\n"
        "}\n"
    )
    return FunctionsLibrary(
        name=library_name(),
        text="".join(parts),
        functions=functions,
        read_only=read_only,
        digest=digest,
        digest_function=digest_function,
    )


def _library(config: ScriptConfig) -> FunctionsLibrary:
    found = _libraries.get(config)
    if found is None:
        with _lock:
            found = _libraries.get(config)
            if found is None:
                found = _libraries[config] = library_of(render_all(config))
    return found


def functions_library(config: ScriptConfig | None = None) -> str:
    """The Redis Functions library text for ``config`` (what ``luasched functions`` prints)."""
    return _library(config or ScriptConfig()).text


def functions_of(config: ScriptConfig | None = None) -> FunctionsLibrary:
    """The Functions library for ``config`` with its function names (cached per config)."""
    return _library(config or ScriptConfig())


def _arg_cell(arg: dict[str, Any]) -> str:
    if arg["type"] == "string":
        kind = f"string, {arg['min_length']}..{arg['max_length']} bytes"
    elif arg["type"] == "enum":
        kind = "one of " + ", ".join(f"`{choice}`" for choice in arg["choices"])
    else:
        kind = f"{arg['type']}, {arg['min']}..{arg['max']}"
    if "repeat" in arg:
        kind += f"; repeated {arg['repeat']['min']}..{arg['repeat']['max']} times"
    return kind


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown(config: ScriptConfig | None = None) -> str:
    """``docs/scripts.md``: every script's contract, generated from the manifest."""
    data = manifest(config)
    lines = [
        "# Script reference",
        "",
        "Generated from the manifest by `make snapshots` (`luasched reference`); do not edit by",
        "hand. Call any script with `EVALSHA sha1 numkeys KEYS... ARGV...`; see",
        "[manifest.md](manifest.md) for the conventions (types, key patterns, errors).",
        "",
        "## Error codes",
        "",
        "Every error reply is `LUASCHED_<CODE> <script>: <detail>` and means no key changed.",
        "",
        "| code | meaning |",
        "|---|---|",
    ]
    lines += [f"| `{code}` | {_cell(text)} |" for code, text in sorted(data["error_codes"].items())]
    lines += ["", "## Scripts", ""]
    lines += [f"- [`{name}`](#{name.replace('.', '')})" for name in data["scripts"]]
    for name, entry in data["scripts"].items():
        lines += ["", f"### {name}", "", _cell(entry["summary"]), ""]
        lines += [
            f"SHA1 `{entry['sha1']}` · since {entry['min_server']} · "
            f"flags {', '.join(entry['flags']) or '(none)'} · complexity {entry['complexity']}",
            "",
        ]
        if entry["keys"]:
            lines += ["| KEYS | name | type | key | meaning |", "|---|---|---|---|---|"]
            for position, key in enumerate(entry["keys"], 1):
                lines.append(
                    f"| {position} | `{key['name']}` | {key['type']} | `{key['pattern']}` | "
                    f"{_cell(key['description'])} |"
                )
        else:
            lines.append("KEYS: none.")
        lines.append("")
        if entry["argv"]:
            lines += ["| ARGV | name | accepts | meaning |", "|---|---|---|---|"]
            for position, arg in enumerate(entry["argv"], 1):
                lines.append(
                    f"| {position} | `{arg['name']}` | {_cell(_arg_cell(arg))} | "
                    f"{_cell(arg['description'])} |"
                )
        else:
            lines.append("ARGV: none.")
        lines += ["", f"Reply: {_cell(entry['reply'])}", "", "Errors:", ""]
        lines += [f"- `{error['code']}`: {_cell(error['when'])}" for error in entry["errors"]]
    return "\n".join(lines) + "\n"
