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
