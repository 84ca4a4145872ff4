"""A prune policy from values: the command line's flags, or `.refcount/policy.toml`.

Both go through `build`, so a value means the same wherever it is written:

    keep_last  = 3                   # an integer, 0 or more
    older_than = "30d"               # a duration (refcount.durations)
    unused_for = "90d"               # a duration: not touched nor pushed for that long
    match      = ["web:*"]           # a glob or a list of globs
    exclude    = "web:stable"
    untagged   = true
    max_size   = "10G"               # a size (refcount.units.parse_size) or bytes
    min_free   = "15%"               # a size, bytes, or a percentage of the filesystem

A file that is not TOML, a key that is not one of these, or a value of the wrong
kind is InvalidPolicy: one line naming the file, the line, and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from datetime import timedelta

from refcount.core.retention import MinFree, PrunePolicy
from refcount.durations import parse_duration
from refcount.errors import InvalidDuration, InvalidPolicy, InvalidSize
from refcount.units import parse_percent, parse_size

KEYS = (
    "keep_last",
    "older_than",
    "unused_for",
    "match",
    "exclude",
    "untagged",
    "max_size",
    "min_free",
)


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidPolicy(f"{name}: {value!r}: not a whole number, 0 or more")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidPolicy(f"{name}: {value!r}: not a string")
    return value


def _globs(value: object, name: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(g, str) and g for g in items):
        raise InvalidPolicy(f"{name}: {value!r}: not a glob or a list of globs")
    return tuple(items)


def _size(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidSize(f"{name} {value}: invalid size: must not be negative")
        return value
    return parse_size(_text(value, name), name)


def _min_free(value: object, name: str) -> MinFree:
    if isinstance(value, str) and value.strip().endswith("%"):
        return MinFree(fraction=parse_percent(value, name))
    return MinFree(bytes=_size(value, name))


def _duration(value: object, name: str) -> timedelta:
    text = _text(value, name)
    if text.strip().startswith("-"):
        raise InvalidDuration(f"{name} {text!r}: invalid duration: must not be negative")
    try:
        return parse_duration(text)
    except InvalidDuration as exc:
        raise InvalidDuration(f"{name} {exc}") from None


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidPolicy(f"{name}: {value!r}: not true or false")
    return value


_PARSE: dict[str, Callable[[object, str], object]] = {
    "keep_last": _count,
    "older_than": _duration,
    "unused_for": _duration,
    "match": _globs,
    "exclude": _globs,
    "untagged": _bool,
    "max_size": _size,
    "min_free": _min_free,
}


def build(values: Mapping[str, object], name_of: Callable[[str], str]) -> PrunePolicy:
    """A PrunePolicy from `values` (keys from KEYS; None values are absent).
    `name_of(key)` is how an error names the key (`--keep-last`, `FILE:3: keep_last`)."""
    fields: dict[str, object] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key not in _PARSE:
            raise InvalidPolicy(f"{name_of(key)}: unknown key; use one of {', '.join(KEYS)}")
        fields[key] = _PARSE[key](value, name_of(key))
    return PrunePolicy(**fields)  # type: ignore[arg-type]


def parse(data: bytes, where: str) -> PrunePolicy:
    """The policy in a policy.toml's bytes; `where` is the file's name for errors."""
    try:
        values = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidPolicy(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"at line (\d+)", str(exc))
        line = f":{at.group(1)}" if at else ""
        raise InvalidPolicy(f"{where}{line}: not TOML: {exc}") from None
    text = data.decode("utf-8")

    def name_of(key: str) -> str:
        found = re.search(rf"^[ \t]*\[?[ \t]*[\"']?{re.escape(key)}\b", text, re.MULTILINE)
        line = f":{text.count(chr(10), 0, found.start()) + 1}" if found else ""
        return f"{where}{line}: {key}"

    try:
        return build(values, name_of)
    except (InvalidDuration, InvalidSize) as exc:
        raise InvalidPolicy(str(exc)) from None
