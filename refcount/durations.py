"""Durations as users type them: `90s`, `10m`, `1h`, `2d`, `0`, or plain seconds."""

from __future__ import annotations

import re
from datetime import timedelta

from refcount.errors import InvalidDuration

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_FORMAT = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


def parse_duration(text: str) -> timedelta:
    match = _FORMAT.fullmatch(text.strip())
    if match is None:
        raise InvalidDuration(f"{text!r}: invalid duration: use e.g. 30s, 10m, 1h, 2d or 0")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def parse_amount(text: str) -> int | timedelta:
    """A slice of work as users type it: a plain number of items (`50000`), or a
    duration with its unit (`90s`, `2m`)."""
    if text.strip().isdigit():
        return int(text)
    if _FORMAT.fullmatch(text.strip()) is None or text.strip()[-1:].isdigit():
        raise InvalidDuration(
            f"{text!r}: not a number of blobs nor a duration: use e.g. 50000 or 2m"
        )
    return parse_duration(text)
