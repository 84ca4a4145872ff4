"""Many repositories under one root (`refcount --root DIR`), as zot lays them out.

A root is a directory holding one OCI image layout per repository, nested names
included: `DIR/library/nginx/{oci-layout,index.json,blobs/}` is the repository
`library/nginx`. Each repository is a store of its own, with its own
`.refcount/` database and identity: a blob in two repositories is two files and
two counts, and nothing done to one repository reads or changes another's files.
This module is the thin layer above the single-store library: it finds the
repositories and runs one operation on each, collecting a `RootReport`; it never
opens a database itself.

How the walk finds repositories (`find`): a directory is a repository when it
holds a regular file `oci-layout`. The walk never follows a symbolic link (a
link to a directory is neither a repository nor walked into), never enters a
`blobs/` or `.refcount/` directory of a repository (nor any `.refcount` or
`.refcount-root` directory), goes at most MAX_DEPTH directories below the root,
and descends into a repository's other subdirectories too, so `a` and `a/b` may
both be repositories. The root itself is never a repository: a layout at DIR is
a `--store`. Names are the relative paths with `/`, sorted.

Where the counts live: by default each repository's own SQLite file in its
`.refcount/`. With a PostgreSQL `--db`, one database holds every repository of
the root, each in a schema of its own named by `schema_name` (`rc_`, the name
made readable, and 12 hex digits of the name's SHA-256: `library/nginx` is
`rc_library_nginx_` + 12 hex digits). The hash keeps names that read alike
apart (`a-b` and `a_b`, `App` and `app`) and the length within PostgreSQL's 63
bytes; the readable part is for whoever lists the schemas. The schema is still
a store's database in every other way: it records the repository's identity
and refuses another store (a second root pointed at the same database, or a
repository made again under a name whose schema outlived it).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from refcount.errors import InvalidStore, NotFound, RefcountError
from refcount.layout import BLOBS, OCI_LAYOUT, STATE_DIR
from refcount.reports import RepoResult, RootReport

MAX_DEPTH = 8
"""How many directories below the root a repository may be (`a/b/c` is 3)."""
ROOT_STATE_DIR = ".refcount-root"
"""Reserved for what refcount may keep for the root as a whole; never walked."""
_NEVER_WALKED = frozenset({STATE_DIR, ROOT_STATE_DIR})
MASS_REMOVAL = 0.5
"""The share of the watched repositories above which one walk that finds them
gone is taken for a root unmounted or being restored (`may_forget`)."""
SCHEMA_PREFIX = "rc_"
"""How every repository schema's name starts (`schema_name`)."""
_READABLE_LENGTH = 40
_HASH_DIGITS = 12


class NoRepositories(InvalidStore):
    """A --root that holds no OCI layout at all (exit 2)."""


class NoSuchRepository(InvalidStore):
    """A --repo that names no repository under the root (exit 2)."""


@dataclass(frozen=True)
class Repository:
    name: str
    """The path below the root, with `/` (`library/nginx`)."""
    path: Path

    @property
    def schema(self) -> str:
        """Its schema in a PostgreSQL database shared by the whole root."""
        return schema_name(self.name)

    def still_there(self) -> bool:
        """Whether it is a repository now (its `oci-layout` a regular file, not a link)."""
        try:
            return stat.S_ISREG(os.lstat(self.path / OCI_LAYOUT).st_mode)
        except OSError:
            return False


def may_forget(gone: int, watched: int) -> bool:
    """Whether `watch --root` may forget the databases of `gone` repositories (drop
    their schemas) that one walk no longer finds among `watched`. Not when more than
    MASS_REMOVAL of them, or every one, vanished at once: an unmounted or half-restored
    root looks like that, and its repositories come back to the counts they left."""
    return 0 < gone < watched and gone <= watched * MASS_REMOVAL


def schema_name(name: str) -> str:
    """The PostgreSQL schema of the repository `name` (see the module docstring):
    lowercase letters, digits and `_` only, so it is an identifier needing no quotes."""
    readable = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:_READABLE_LENGTH].rstrip("_")
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_DIGITS]
    return f"{SCHEMA_PREFIX}{readable}_{digest}" if readable else f"{SCHEMA_PREFIX}{digest}"


def find(root: Path, *, max_depth: int = MAX_DEPTH) -> list[Repository]:
    """Every repository under `root`, sorted by name (see the module docstring).

    Raises InvalidStore when `root` is not a directory (or a symbolic link).
    Directories that cannot be listed are skipped: they hold no repository this
    process could count. Cost: one `scandir` per directory walked; blobs/ is
    never listed.
    """
    try:
        mode = os.lstat(root).st_mode
    except OSError as exc:
        raise InvalidStore(f"--root {root}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(mode):
        raise InvalidStore(f"--root {root}: not a directory")
    found: list[Repository] = []
    pending: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while pending:
        path, parts = pending.pop()
        try:
            with os.scandir(path) as entries:
                children = list(entries)
        except OSError:
            continue
        is_layout = bool(parts) and any(
            e.name == OCI_LAYOUT and e.is_file(follow_symlinks=False) for e in children
        )
        if is_layout:
            found.append(Repository("/".join(parts), path))
        if len(parts) >= max_depth:
            continue
        for entry in children:
            if entry.name in _NEVER_WALKED or (is_layout and entry.name == BLOBS):
                continue
            if entry.is_dir(follow_symlinks=False):
                pending.append((Path(entry.path), (*parts, entry.name)))
    return sorted(found, key=lambda r: r.name)


def select(root: Path, repo: str | None) -> list[Repository]:
    """The repositories a command runs on: every one, or the one named `repo`.

    Raises NoRepositories for a root without any, NoSuchRepository for a name
    that is none of them (the message lists a few that exist).
    """
    repositories = find(root)
    if not repositories:
        raise NoRepositories(
            f"--root {root}: no repository (no directory with an {OCI_LAYOUT} file "
            f"within {MAX_DEPTH} levels)"
        )
    if repo is None:
        return repositories
    chosen = [r for r in repositories if r.name == repo.strip("/")]
    if not chosen:
        names = ", ".join(r.name for r in repositories[:5])
        more = ", ..." if len(repositories) > 5 else ""
        raise NoSuchRepository(f"--repo {repo!r}: no such repository under {root} ({names}{more})")
    return chosen


def each(
    root: Path, repositories: Iterable[Repository], run: Callable[[Repository], object]
) -> RootReport:
    """`run` on every repository in turn; a RefcountError in one is recorded as
    its result (message and exit code) and the others still run. Any other
    exception (a bug, an interruption) ends the whole command."""
    results = []
    for repository in repositories:
        try:
            results.append(RepoResult(repository.name, run(repository)))
        except RefcountError as exc:
            results.append(RepoResult(repository.name, None, str(exc), exc.exit_code))
    return RootReport(str(root), tuple(results))


def require_each(
    repositories: list[Repository], names: list[str], holds: Callable[[Repository], set[str]]
) -> dict[str, list[str]]:
    """For `delete tag` and `du REF` across a root: the names each repository
    holds (by repository name, in the order given), only repositories that hold
    one. Raises NotFound, before anything runs, naming the ones no repository holds."""
    held = {r.name: holds(r) for r in repositories}
    nowhere = [n for n in names if not any(n in h for h in held.values())]
    if nowhere:
        raise NotFound(
            ", ".join(repr(n) for n in nowhere) + f": in no repository of {len(held)}; "
            "nothing was changed"
        )
    return {
        name: [n for n in names if n in h] for name, h in held.items() if any(n in h for n in names)
    }


__all__ = [
    "MASS_REMOVAL",
    "MAX_DEPTH",
    "SCHEMA_PREFIX",
    "NoRepositories",
    "NoSuchRepository",
    "Repository",
    "each",
    "find",
    "may_forget",
    "require_each",
    "schema_name",
    "select",
]
