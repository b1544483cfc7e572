"""The shared argument checks (lua/include/prelude.lua.j2), exercised on every server.

Each case runs a tiny script made of the real prelude plus one check, with EVAL.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from luasched.render import _environment, templates_dir


def script(body: str) -> str:
    source = (
        '--% include "include/prelude.lua.j2"\nlocal function main()\n'
        + body
        + "\nend\nreturn run(main)\n"
    )
    return (
        _environment(templates_dir())
        .from_string(source)
        .render(script_name="test.prelude", layout_types="")
    )


def call(client: Any, body: str, *args: bytes | str, keys: tuple[bytes, ...] = ()) -> Any:
    # Keys (if any) share one hash tag so the call also runs on the cluster.
    return client.eval(script(body), len(keys), *keys, *args)


INT = "return arg_int(1, 'n', -1000, 1000)"


@pytest.mark.parametrize(
    ("raw", "value"), [("0", 0), ("-12", -12), ("42", 42), ("007", 7), ("1000", 1000)]
)
def test_arg_int_accepts_plain_decimals(r: Any, raw: str, value: int) -> None:
    assert call(r, INT, raw) == value


@pytest.mark.parametrize(
    "raw", ["0x10", " 5", "5 ", "1e3", "inf", "nan", "", "1.5", "+5", "--1", "5a", "\x005"]
)
def test_arg_int_refuses_what_tonumber_would_take(r: Any, raw: str) -> None:
    with pytest.raises(
        redis.ResponseError, match=r"^LUASCHED_ARG test\.prelude: n must be an integer, got "
    ):
        call(r, INT, raw)


def test_arg_int_range_and_size(r: Any) -> None:
    with pytest.raises(redis.ResponseError, match="n must be between -1000 and 1000, got 1001"):
        call(r, INT, "1001")
    with pytest.raises(redis.ResponseError, match="must be an integer"):
        call(r, INT, "123456789012345678")  # longer than any integer below 2^53
    with pytest.raises(redis.ResponseError, match=r"must be an integer, got \(missing\)"):
        call(r, INT)
    big = "return arg_int(1, 'n', 0, MAX_SAFE_INTEGER)"
    assert call(r, big, "9007199254740991") == 9007199254740991
    with pytest.raises(
        redis.ResponseError, match="between 0 and 9007199254740991, got 9007199254740992"
    ):
        call(r, big, "9007199254740992")


NUMBER = "return tostring(arg_number(1, 'x', -10, 10))"


@pytest.mark.parametrize(
    ("raw", "value"), [("1", "1"), ("-0.5", "-0.5"), ("2.5e0", "2.5"), (".5", "0.5"), ("10", "10")]
)
def test_arg_number_accepts_finite_decimals(r: Any, raw: str, value: str) -> None:
    assert call(r, NUMBER, raw) == value.encode()


@pytest.mark.parametrize(
    "raw", ["inf", "-inf", "nan", "0x1", "1e999", "11", " 1", "", "1e", "e5", "1..2"]
)
def test_arg_number_refuses_the_rest(r: Any, raw: str) -> None:
    with pytest.raises(redis.ResponseError, match="x must be a number between -10 and 10"):
        call(r, NUMBER, raw)


def test_arg_string_bounds(r: Any) -> None:
    body = "return arg_string(1, 's', 1, 3)"
    assert call(r, body, b"\x00{}") == b"\x00{}"
    with pytest.raises(redis.ResponseError, match="s must be 1 to 3 bytes long, got 0 bytes"):
        call(r, body, b"")
    with pytest.raises(redis.ResponseError, match="s must be 1 to 3 bytes long, got 4 bytes"):
        call(r, body, b"abcd")
    with pytest.raises(redis.ResponseError, match="got nothing"):
        call(r, body)


def test_arg_enum(r: Any) -> None:
    body = "return arg_enum(1, 'mode', {'fifo', 'lifo'})"
    assert call(r, body, "lifo") == b"lifo"
    with pytest.raises(redis.ResponseError, match=r'mode must be one of fifo\|lifo, got "FIFO"'):
        call(r, body, "FIFO")


def test_counts(r: Any) -> None:
    body = "key_count(1)\nreturn arg_count(1, 2)"
    key = (b"{t}k",)
    assert call(r, body, "a", keys=key) == 1
    assert call(r, body, "a", "b", keys=key) == 2
    with pytest.raises(redis.ResponseError, match="expected 1 to 2 arguments, got 3"):
        call(r, body, "a", "b", "c", keys=key)
    with pytest.raises(redis.ResponseError, match=r"expected 1 key\(s\), got 0"):
        call(r, body, "a")
    with pytest.raises(redis.ResponseError, match=r"expected 2 argument\(s\), got 1"):
        call(r, "return arg_count(2, 2)", "a")


def test_details_are_short_and_printable(r: Any) -> None:
    with pytest.raises(redis.ResponseError) as error:
        call(r, INT, b"\r\n\x00" + b"z" * 100)
    message = str(error.value)
    assert message.endswith('got "???' + "z" * 37 + '"...')
    assert "\n" not in message and "\r" not in message


def test_other_errors_propagate_unchanged(r: Any) -> None:
    with pytest.raises(redis.ResponseError) as error:
        call(r, "return redis.call('NOSUCHCOMMAND')")
    assert "LUASCHED_" not in str(error.value)
    assert "nknown" in str(error.value)  # "Unknown Redis command" / "unknown command"


def test_failure_after_validation_reports_the_code_not_a_lua_trace(r: Any) -> None:
    with pytest.raises(redis.ResponseError) as error:
        call(r, "fail('ARG', 'custom detail')")
    assert str(error.value) == "LUASCHED_ARG test.prelude: custom detail"
