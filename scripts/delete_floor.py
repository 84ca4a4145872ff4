"""The floor of one delete on an OCI layout: what any tool must do to remove a tag durably.

    python3 -S scripts/delete_floor.py DIR TAG

DIR holds a scratch `index.json` (a copy of a store's, made by scripts/bench.py).
This process reads it, cuts out the entry tagged TAG, writes the rest to a
temporary file in DIR, fsyncs it, renames it over `DIR/index.json`, fsyncs DIR,
and commits one row to the SQLite database `DIR/floor.db` in WAL mode (the
journal and synchronous settings refcount's own database uses). It prints
nothing and exits 0; a TAG it cannot find is exit 1.

No tool can delete a tag from an OCI layout for less: the index is one file,
so it is read and rewritten whole, and a delete that survives a crash needs
the fsyncs and a commit of its own record. The entry is cut out of the bytes
as they are, without parsing the rest (refcount keeps each entry's byte span,
so it need not parse either). Standard library only, so `python3 -S` runs it
with no site-packages at all: the interpreter's own start is part of the floor.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys

REF_NAME = b'"org.opencontainers.image.ref.name":'


def cut_entry(data: bytes, tag: str) -> bytes | None:
    """`data` (a compact image index) without the manifests[] entry tagged `tag` and
    one comma beside it; None when no entry carries that tag.

    The entry is the object two levels of braces around the annotation (annotations,
    then the descriptor). Cost: a search of the file, then a scan of the entry alone.
    """
    at = data.find(REF_NAME + json.dumps(tag).encode() + b"}")
    if at < 0:
        return None
    start, depth = at, 0
    while depth < 2:  # back to the descriptor's opening brace
        start -= 1
        if data[start] == ord("}"):
            depth -= 1
        elif data[start] == ord("{"):
            depth += 1
    end, depth = at, 2
    while depth > 0:  # on to its closing brace
        if data[end] == ord("{"):
            depth += 1
        elif data[end] == ord("}"):
            depth -= 1
        end += 1
    if data[end : end + 1] == b",":
        end += 1
    elif data[start - 1 : start] == b",":
        start -= 1
    return data[:start] + data[end:]


def replace_durably(directory: str, data: bytes) -> None:
    """Write `data` to a temporary file in `directory`, fsync, rename over index.json,
    fsync the directory."""
    temp = os.path.join(directory, ".index.json.floor-tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, os.path.join(directory, "index.json"))
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def record(directory: str, tag: str) -> None:
    """Commit one row to DIR/floor.db (WAL, synchronous=NORMAL, as refcount's database)."""
    db = sqlite3.connect(os.path.join(directory, "floor.db"), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS deletes (tag TEXT NOT NULL)")
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO deletes (tag) VALUES (?)", (tag,))
        db.execute("COMMIT")
    finally:
        db.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: delete_floor.py DIR TAG", file=sys.stderr)
        return 2
    directory, tag = argv
    with open(os.path.join(directory, "index.json"), "rb") as f:
        data = f.read()
    rest = cut_entry(data, tag)
    if rest is None:
        print(f"delete_floor.py: {directory}/index.json: no entry tagged {tag!r}", file=sys.stderr)
        return 1
    replace_durably(directory, rest)
    record(directory, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
