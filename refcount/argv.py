"""Global options written after the command: `refcount tags --store L` is `refcount --store L tags`.

Click reads a group's options only before its command. Users write them where
habit puts them (`refcount tags --json`, `refcount delete tag a -v`), so the
command line is normalised first: the global options found after the command are
moved in front of it, in the order written (a later `--store` still wins).

Only options that no command defines are moved: `--grace` is a global option
and also gc's own, so after the command it stays where it is (the CLI's error
for it says where a global option goes). Nothing after `--` is touched, and the
value of a command's own option is never mistaken for a global option.

Standard library only, and the one place this is decided: `refcount.client`
normalises before it chooses between the daemon and this process, and
`refcount.cli` before Click parses, so both read a command line the same way.
`tests/test_cli.py` checks these names against the Typer app.
"""

from __future__ import annotations

from collections.abc import Sequence

GLOBAL_VALUE_OPTIONS = frozenset(
    {
        "--store",
        "--db",
        "--trash-ttl",
        "--grace",
        "--max-manifest",
        "--mass-free-threshold",
        "--extractor-timeout",
        "--root",
        "--repo",
    }
)
"""The global options that take a value."""
GLOBAL_FLAGS = frozenset({"--json", "--verbose", "--keep-referrers", "--keep-untagged"})
"""The global options that take none (and -v, -vv, ...)."""
COMMAND_VALUE_OPTIONS = frozenset(
    {
        *("--grace", "--debounce", "--resync", "--gc-interval", "--metrics-addr", "--log-format"),
        *("--tag", "--lease-ttl"),
        *("--slice", "--max-duration", "--verify-every", "--deep-every", "--deep-slice"),
        "--run-dir",
        "--prune-every",
        "--keep-last",
        "--older-than",
        "--unused-for",
        "--match",
        "--exclude",
        "--max-size",
        "--min-free",
        "--html",
    }
)
"""The options of commands that take a value."""
MOVABLE_VALUE_OPTIONS = GLOBAL_VALUE_OPTIONS - COMMAND_VALUE_OPTIONS


def is_global_flag(arg: str) -> bool:
    """A global option without a value: --json, -v, -vv, ..."""
    return arg in GLOBAL_FLAGS or (len(arg) > 1 and arg[0] == "-" and set(arg[1:]) == {"v"})


def split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the global options, the command and what follows it), with the global
    options written after the command moved to the first part.

    Without a command (`refcount`, `refcount --store`, `refcount -- tags`) the
    whole line is the first part, unchanged. Cost: one pass over argv.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return list(argv), []
        if arg in GLOBAL_VALUE_OPTIONS:  # --store DIR: DIR is no command
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            break
    if i >= len(argv):
        return list(argv), []
    found, rest = list(argv[:i]), [argv[i]]
    j = i + 1
    while j < len(argv):
        arg = argv[j]
        name, eq, _value = arg.partition("=")
        takes_value = not eq and j + 1 < len(argv)
        if arg == "--":
            rest += argv[j:]
            break
        if name in MOVABLE_VALUE_OPTIONS and (eq or takes_value):
            found += argv[j : j + (1 if eq else 2)]
            j += 1 if eq else 2
        elif is_global_flag(arg):
            found.append(arg)
            j += 1
        elif name in COMMAND_VALUE_OPTIONS and takes_value:
            rest += argv[j : j + 2]
            j += 2
        else:
            rest.append(arg)
            j += 1
    return found, rest


def asks_for_json(argv: Sequence[str]) -> bool:
    """Whether the command line has the global --json (before or after the command)."""
    found, _rest = split(argv)
    i = 0
    while i < len(found) and found[i] != "--":
        if found[i] in GLOBAL_VALUE_OPTIONS:  # --store --json: a directory named --json
            i += 2
            continue
        if found[i] == "--json":
            return True
        i += 1
    return False


def normalise(argv: Sequence[str]) -> list[str]:
    """argv with every global option in front of the command (see `split`)."""
    found, rest = split(argv)
    return found + rest


def is_delete(argv: Sequence[str]) -> bool:
    """Whether the command line is a `delete tag` or `delete manifest` (a daemon
    serves those beside other requests: they join its group commit)."""
    _found, command = split(argv)
    return command[:1] == ["delete"] and command[1:2] in (["tag"], ["manifest"])
