"""Durations as users type them for --grace, --trash-ttl, --resync (refcount.durations).

The CLI's side (a bad value is one error line, exit 2) is in test_cli.py's table of bad
arguments; here is the parser itself.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from refcount.durations import InvalidDuration, parse_duration
from refcount.errors import RefcountError

pytestmark = pytest.mark.no_database


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("90s", timedelta(seconds=90), id="seconds"),
        pytest.param("10m", timedelta(minutes=10), id="minutes"),
        pytest.param("1h", timedelta(hours=1), id="hours"),
        pytest.param("2d", timedelta(days=2), id="days"),
        pytest.param("1.5h", timedelta(minutes=90), id="a fraction of a unit"),
        pytest.param("0.25s", timedelta(milliseconds=250), id="a fraction of a second"),
        pytest.param("0", timedelta(0), id="zero"),
        pytest.param("0m", timedelta(0), id="zero with a unit"),
        pytest.param("3600", timedelta(hours=1), id="plain seconds"),
        pytest.param("007", timedelta(seconds=7), id="leading zeros"),
        pytest.param(" 30m\n", timedelta(minutes=30), id="surrounding blanks"),
    ],
)
def test_a_duration_is_a_number_with_an_optional_unit(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("  ", id="blank"),
        pytest.param("soon", id="a word"),
        pytest.param("m", id="a unit alone"),
        pytest.param("-1s", id="negative"),
        pytest.param("+5m", id="a sign"),
        pytest.param("1w", id="weeks"),
        pytest.param("10M", id="an uppercase unit"),
        pytest.param("1 h", id="a blank before the unit"),
        pytest.param("1h30m", id="two units"),
        pytest.param("1.2.3", id="two dots"),
        pytest.param(".5h", id="no digit before the dot"),
        pytest.param("1e3", id="an exponent"),
        pytest.param("inf", id="infinity"),
        pytest.param("nan", id="not a number"),
    ],
)
def test_anything_else_raises_the_typed_error_naming_the_value(text: str) -> None:
    with pytest.raises(InvalidDuration) as caught:
        parse_duration(text)
    error = caught.value
    assert isinstance(error, RefcountError) and error.exit_code == 2  # a usage error
    message = str(error)
    assert message.startswith(f"{text!r}: invalid duration: ")
    assert "\n" not in message and "30s, 10m, 1h, 2d or 0" in message
