"""refcount.layout: the store's names and path arithmetic, without touching a file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from refcount import layout, oci

pytestmark = pytest.mark.no_database

STORE = Path("/srv/oci")
H256 = "ab" * 32
H512 = "cd" * 64


def test_a_blob_path_is_built_below_blobs_and_its_algorithm() -> None:
    assert layout.blob_path(STORE, "sha256", H256) == STORE / "blobs" / "sha256" / H256
    assert layout.trashed_path(STORE, "sha512", H512) == (
        STORE / ".refcount" / "trash" / "sha512" / H512
    )


@pytest.mark.parametrize(
    ("algorithm", "encoded"),
    [
        ("sha256", "../../etc/passwd"),
        ("sha256", H256.upper()),
        ("sha256", H256[:-1]),
        ("sha512", H256),
        ("md5", "0" * 32),
        ("..", H256),
        ("", H256),
    ],
)
def test_no_path_is_built_from_a_name_that_is_not_a_digest(algorithm: str, encoded: str) -> None:
    with pytest.raises(ValueError, match="not a digest"):
        layout.blob_path(STORE, algorithm, encoded)
    with pytest.raises(ValueError, match="not a digest"):
        layout.trashed_path(STORE, algorithm, encoded)


def test_the_directories_to_a_blob_are_listed_parents_first() -> None:
    blob = layout.blob_path(STORE, "sha256", H256)
    assert layout.directories_to(STORE, blob) == (STORE / "blobs", STORE / "blobs" / "sha256")
    trashed = layout.trashed_path(STORE, "sha256", H256)
    assert layout.directories_to(STORE, trashed) == (
        STORE / ".refcount",
        STORE / ".refcount" / "trash",
        STORE / ".refcount" / "trash" / "sha256",
    )
    assert layout.directories_to(STORE, layout.index_path(STORE)) == ()


def test_the_algorithm_directories_are_those_of_the_digest_grammar() -> None:
    assert layout.algorithm_dirs(STORE) == tuple(
        STORE / "blobs" / algorithm for algorithm in layout.HEX_LENGTH
    )


def test_refcount_state_lives_in_its_own_directory() -> None:
    state = STORE / ".refcount"
    assert layout.state_dirs(STORE) == (state, state / "trash", state / "tmp")
    for path in (
        layout.default_database(STORE),
        layout.identity_path(STORE),
        layout.identity_temp(STORE, 42),
        layout.last_rewrite_path(STORE),
        layout.lock_path(STORE),
        layout.daemon_pid_path(STORE),
        layout.socket_path(STORE),
    ):
        assert path.parent == state, path
    assert layout.index_temp(STORE, 42) == state / "tmp" / "index.json.42"


def test_the_digest_pattern_is_the_one_oci_accepts() -> None:
    for digest in (f"sha256:{H256}", f"sha512:{H512}"):
        assert re.fullmatch(layout.DIGEST_PATTERN, digest)
        assert str(oci.Digest.parse(digest)) == digest
    for bad in (f"sha256:{H512}", f"sha512:{H256}", f"sha256:{H256.upper()}"):
        assert not re.fullmatch(layout.DIGEST_PATTERN, bad)


def test_salvage_finds_digests_of_every_algorithm_and_not_inside_longer_hex() -> None:
    data = f'{{"a":"sha256:{H256}","b":"sha512:{H512}","c":"sha256:{H256}ff"}}'.encode()
    found = [d.digest for d in oci.salvage([data[:50], data[50:]])]
    assert found == [f"sha256:{H256}", f"sha512:{H512}"]
