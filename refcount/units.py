"""Numbers as text reads them: sizes in binary units (`492 KiB`), counted nouns (`1 blob`);
and sizes as users type them (`10G`, `500MiB`, `2GB`, `1048576`).

Text output and log lines only: JSON reports keep exact integers.
"""

from __future__ import annotations

import re

from refcount.errors import InvalidSize

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(size: int | None) -> str:
    """`503 B` (exact under 1 KiB), `1.2 MiB` (one decimal under 10), `492 KiB`; `?` unknown."""
    if size is None:
        return "?"
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        text = f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
        if float(text) < 1024 or unit == _UNITS[-1]:
            return f"{text} {unit}"
    raise AssertionError("unreachable")


def plural(count: int, singular: str, plural: str | None = None) -> str:
    """`1 blob`, `2 blobs`, `0 blobs`; `plural` when adding an s is wrong (`entries`)."""
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgtp]?)(i?)(b?))", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from `1048576`, `512K`, `500MiB`, `10G`, `2GB`, `1.5TiB` (case-insensitive).

    A bare letter (`K`, `M`, `G`, `T`, `P`) and the IEC forms (`KiB`, `GiB`...) are
    binary, as every size refcount prints is; the SI forms with a `B` and no `i`
    (`KB`, `MB`, `GB`...) are decimal (10**9 for `GB`), as disk vendors and df -H
    count. `B` alone, or no suffix, is bytes. Fractions round down to a whole
    byte. Negative or malformed: InvalidSize (exit 2).
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None or (match.group(3) and not match.group(2)):
        raise InvalidSize(
            f"{what} {text!r}: invalid size: "
            "use bytes or e.g. 500MiB, 10G, 2GB (G = GiB, GB = 10^9)"
        )
    number, prefix, binary, byte = match.groups()
    prefix = prefix.lower()
    decimal = prefix and byte and not binary
    factor = 1000 ** " kmgtp".index(prefix) if decimal else _BINARY[prefix]
    return int(float(number) * factor)


def parse_percent(text: str, what: str = "percentage") -> float:
    """A fraction from `15%` (0.15); InvalidSize unless 0% to 100%."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text.strip())
    if match is None or float(match.group(1)) > 100:
        raise InvalidSize(f"{what} {text!r}: invalid percentage: use 0% to 100%")
    return float(match.group(1)) / 100
