"""Numbers as text reads them: sizes in binary units (`492 KiB`), counted nouns (`1 blob`).

Text output and log lines only: JSON reports keep exact integers.
"""

from __future__ import annotations

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
