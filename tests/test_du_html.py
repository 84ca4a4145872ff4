"""`du --html FILE`: one self-contained page, drawn by a real browser, offline.

The browser is Debian's `chromium` (scripts/test.sh installs it), run headless
in a subprocess without a network: a screenshot proves the chart is drawn (the
bars' colours cover the areas their figures say), `--dump-dom` proves every tag
is in the page as text (a hostile tag name becomes no element), and the file
itself names nothing outside itself. Bad output paths are refused with one line
and exit 2, and nothing in the store or beside FILE changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import zlib
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import Cli
from storekit import OCI_MANIFEST, add_entry, add_image, blob_path, listing, write_blob

from refcount import htmlreport
from refcount.htmlreport import EXCLUSIVE_COLOUR, SHARED_COLOUR, TOP_TAGS
from refcount.reports import DuReport, TagUsage

BASE = b"B" * 60_000  # in every image
HOSTILE = "x\"'><script>alert(1)</script><img src=x onerror=alert(2)>&amp;"
EXCLUSIVE = {"web:1.0": 90_000, "web:2.0": 40_000, HOSTILE: 20_000}
WINDOW = (1366, 768)


@pytest.fixture
def images(store: Path, cli: Cli) -> Path:
    """Three images sharing BASE, one with a hostile tag name; indexed."""
    for tag, size in EXCLUSIVE.items():
        add_image(store, [BASE, tag.encode()[:1] * size], tag=tag)
    assert cli("--store", store, "init").code == 0
    return store


@pytest.fixture(scope="module")
def chromium() -> list[str]:
    """The command line of a headless Chromium with no network (skipped without one)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium)")
    offline: list[str] = []
    unshare = shutil.which("unshare")
    if unshare is not None and subprocess.run([unshare, "-n", "true"], check=False).returncode == 0:
        offline = [unshare, "-n"]  # a network namespace with no interface at all
    return [
        *offline,
        found,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        # No name resolves and every request goes to a port nobody listens on.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ]


def browse(chromium: list[str], page: Path, tmp_path: Path, *action: str) -> str:
    profile = tmp_path / "profile"
    done = subprocess.run(
        [*chromium, f"--user-data-dir={profile}", *action, page.absolute().as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def pixels(png: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB pixels of an 8-bit, non-interlaced PNG (stdlib only)."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[bytes, bytes] = {}
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        chunks[kind] = chunks.get(kind, b"") + data[at + 8 : at + 8 + length]
        at += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, interlace) == (8, 0) and colour in (2, 6), (depth, colour, interlace)
    step = 3 if colour == 2 else 4
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = width * step
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            left = line[i - step] if i >= step else 0
            up = previous[i]
            corner = previous[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                guess = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + guess) & 0xFF
        previous = line
        rows.append(bytes(b for j in range(0, stride, step) for b in line[j : j + 3]))
    return width, height, rows


def rgb(colour: str) -> bytes:
    return bytes.fromhex(colour.removeprefix("#"))


def count_colour(rows: list[bytes], colour: str) -> int:
    want = rgb(colour)
    return sum(1 for row in rows for x in range(0, len(row), 3) if row[x : x + 3] == want)


class Elements(HTMLParser):
    """The elements, attributes and text of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(name, value or "") for name, value in attrs]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Elements:
    elements = Elements()
    elements.feed(page)
    elements.close()
    return elements


@pytest.mark.tools
def test_the_chart_is_drawn_offline_in_a_browser(
    cli: Cli, images: Path, tmp_path: Path, chromium: list[str]
) -> None:
    page = tmp_path / "out" / "du.html"
    page.parent.mkdir()
    result = cli("--store", images, "--json", "du", "--html", page)
    assert result.code == 0, result.err
    report = result.json()
    assert f"wrote {page}" in result.err
    shot = tmp_path / "shot.png"
    browse(chromium, page, tmp_path, f"--screenshot={shot}")
    width, height, rows = pixels(shot)
    assert (width, height) == WINDOW
    # The bars are drawn in the two colours, each as wide as its figure: the areas
    # of the colours are in the proportion of the exclusive and shared bytes.
    exclusive = count_colour(rows, EXCLUSIVE_COLOUR)
    shared = count_colour(rows, SHARED_COLOUR)
    assert exclusive > 2000 and shared > 2000, (exclusive, shared)
    legend = count_colour(rows[: height // 3], EXCLUSIVE_COLOUR)  # the legend's swatch
    figures = sum(t["exclusive"] for t in report["tags"]) / sum(t["shared"] for t in report["tags"])
    drawn = (exclusive - legend) / (shared - count_colour(rows[: height // 3], SHARED_COLOUR))
    assert abs(drawn / figures - 1) < 0.05, (drawn, figures)


@pytest.mark.tools
def test_every_tag_is_text_in_the_dom_and_a_hostile_name_stays_text(
    cli: Cli, images: Path, tmp_path: Path, chromium: list[str]
) -> None:
    page = tmp_path / "du.html"
    assert cli("--store", images, "du", "--html", page).code == 0
    dom = parse(browse(chromium, page, tmp_path, "--dump-dom"))
    text = "".join(dom.text)
    for tag in EXCLUSIVE:
        assert tag in text, tag
    assert "script" not in dom.tags and "img" not in dom.tags
    assert "onerror" not in {name for name, _ in dom.attributes}


def test_the_page_references_nothing_outside_itself(cli: Cli, images: Path, tmp_path: Path) -> None:
    page = tmp_path / "du.html"
    assert cli("--store", images, "du", "--html", page).code == 0
    text = page.read_text(encoding="utf-8")
    elements = parse(text)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(elements.tags)
    for name, value in elements.attributes:
        if name in ("src", "href", "xlink:href", "action", "srcset", "poster"):
            assert value.startswith(("#", "data:")), (name, value)
    lowered = text.lower()
    assert "://" not in lowered and "http:" not in lowered and "https:" not in lowered
    assert not any(value.startswith("//") for _, value in elements.attributes)
    assert "@import" not in lowered
    assert "url(" not in lowered
    assert "default-src 'none'" in text  # the browser is told to fetch nothing either


def test_hostile_names_are_escaped_in_the_page() -> None:
    usage = TagUsage(HOSTILE, "sha256:" + "0" * 64, 10, 6, 4, 1)
    page = htmlreport.render(
        DuReport((usage,), 10, 4, 0, 0, 0, 0), store="/s<b>&", made_at=datetime.now(UTC)
    )
    assert HOSTILE not in page
    assert "<script>" not in page and "<img" not in page and "<b>&" not in page
    assert "x&quot;&#x27;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "/s&lt;b&gt;&amp;" in page
    control = htmlreport.render(
        DuReport((TagUsage("a\x00\x1b[31m", "sha256:" + "0" * 64, 1, 1, 0, 0),), 1, 0, 0, 0, 0, 0),
        store="/s",
        made_at=datetime.now(UTC),
    )
    assert "\x00" not in control and "\x1b" not in control
    assert "a\\x00\\x1b[31m" in control


def test_tags_beyond_the_first_ones_are_folded_into_one_bar() -> None:
    tags = tuple(
        TagUsage(f"t{i:02d}", "sha256:" + "0" * 64, 3000 - i, 1000 - i, 2000, 1) for i in range(40)
    )
    page = htmlreport.render(
        DuReport(tags, 1, 1, 0, 0, 0, 0), store="/s", made_at=datetime.now(UTC)
    )
    assert page.count('<rect class="exclusive"') == TOP_TAGS + 1
    rest = tags[TOP_TAGS:]
    assert f">{len(rest)} other tags</text>" in page
    summed = sum(u.exclusive for u in rest)
    assert f"{len(rest)} other tags, summed: exclusive {htmlreport.human_size(summed)}" in page
    assert ">t24</text>" in page and ">t25</text>" not in page
    assert all(f'<th scope="row">{u.tag}</th>' in page for u in tags)  # the table has them all
    one_more = tags[: TOP_TAGS + 1]
    page = htmlreport.render(
        DuReport(one_more, 1, 1, 0, 0, 0, 0), store="/s", made_at=datetime.now(UTC)
    )
    assert page.count('<rect class="exclusive"') == TOP_TAGS + 1 and ">t25</text>" in page


def test_the_page_says_when_it_was_made_and_what_the_totals_are(
    cli: Cli, images: Path, tmp_path: Path
) -> None:
    page = tmp_path / "du.html"
    before = datetime.now(UTC).replace(microsecond=0)
    assert cli("--store", images, "du", "web:1.0", "--html", page).code == 0
    text = page.read_text(encoding="utf-8")
    made = text.split('<time datetime="')[1].split('"')[0]
    assert before <= datetime.strptime(made, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert f"Disk use of {images}" in text
    report = cli("--store", images, "--json", "du", "web:1.0").json()
    for name in ("live", "quarantined", "orphaned", "reclaimable"):
        assert f'{report[name]} bytes"' in text, name
    # the totals that need every image are not computed for a selection
    assert (report["shared"], report["untagged"]) == (None, None)
    assert text.count("<b>not computed for a selection</b>") == 2
    elements = parse(text)
    rows = [value for name, value in elements.attributes if name == "scope" and value == "row"]
    assert len(rows) == 1  # only the tag asked for


def test_an_existing_file_is_replaced_whole_and_no_temp_is_left(
    cli: Cli, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    page = out / "du.html"
    page.write_text("old report")
    assert cli("--store", images, "du", "--html", page).code == 0
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(out)) == ["du.html"]


def test_options_after_the_file_are_still_read(cli: Cli, images: Path, tmp_path: Path) -> None:
    page = tmp_path / "du.html"
    result = cli("du", "--html", page, "--json", "--store", images)
    assert result.code == 0, result.err
    assert {t["tag"] for t in result.json()["tags"]} == set(EXCLUSIVE)
    assert page.is_file() and not (tmp_path / "--json").exists()


def test_the_daemons_path_is_not_taken_for_html(tmp_path: Path) -> None:
    from refcount import client

    assert client.daemon_argv(["--store", str(tmp_path), "du", "--html", "x.html"], {}) is None


@pytest.mark.parametrize(
    "where",
    [
        "missing-directory",
        "under-a-file",
        "a-directory",
        "a-symlink",
        "index.json",
        "blobs",
        "state",
    ],
)
def test_a_path_that_cannot_be_written_is_refused_and_nothing_changes(
    cli: Cli, images: Path, tmp_path: Path, where: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "file").write_text("a file")
    (out / "dir").mkdir()
    (out / "target").write_text("not to be touched")
    (out / "link.html").symlink_to(out / "target")
    blob = next((images / "blobs" / "sha256").iterdir())
    path = {
        "missing-directory": out / "nowhere" / "du.html",
        "under-a-file": out / "file" / "du.html",
        "a-directory": out / "dir",
        "a-symlink": out / "link.html",
        "index.json": images / "index.json",
        "blobs": blob,
        "state": images / ".refcount" / "du.html",
    }[where]
    before = listing(images), listing(out)
    result = cli("--store", images, "du", "--html", path)
    assert result.code == 2, result
    assert result.out == ""
    assert result.err.count("\n") == 1 and f"{path}: " in result.err, result.err
    assert (listing(images), listing(out)) == before


def test_an_unwritable_directory_is_refused(cli: Cli, images: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes in a read-only directory: the other refusals cover the path")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = cli("--store", images, "du", "--html", out / "du.html")
    finally:
        out.chmod(0o700)
    assert result.code == 2
    assert "Permission denied" in result.err
    assert os.listdir(out) == []


def test_problems_are_flagged_in_text_json_and_html(cli: Cli, store: Path, tmp_path: Path) -> None:
    """A layer deleted behind refcount's back and a manifest that is not JSON."""
    layer = b"L" * 5000
    add_image(store, [BASE, layer], tag="holed")
    add_image(store, [BASE], tag="fine")
    broken = write_blob(store, b'{"schemaVersion": 2, "layers": [oops', OCI_MANIFEST)
    add_entry(store, broken, "broken")
    cli("--store", store, "init")
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    blob_path(store, layer_digest).unlink()
    cli("--store", store, "sync")
    page = tmp_path / "du.html"
    before = listing(store)

    text = cli("--store", store, "du", "--html", page)
    assert text.code == 1
    problems = [line for line in text.out.splitlines() if line.startswith("problem ")]
    assert problems == [
        f"problem holed: missing {layer_digest}: referenced but not in blobs/: "
        "its bytes are counted but are not on disk",
        f"problem broken: damaged {broken['digest']}: invalid JSON (Expecting value: line 1 "
        "column 33 (char 32)): what it holds is unknown and left out of the figures; "
        "`delete tag` refuses this image",
    ]
    report = cli("--store", store, "--json", "du")
    assert report.code == 1
    found = {
        t["tag"]: [(p["kind"], p["digest"]) for p in t["problems"]] for t in report.json()["tags"]
    }
    assert found == {
        "holed": [("missing", layer_digest)],
        "broken": [("damaged", broken["digest"])],
        "fine": [],
    }
    html = page.read_text(encoding="utf-8")
    assert html.count('<g class="flagged">') == 2
    assert f"missing <code>{layer_digest}</code>" in html
    assert f"damaged <code>{broken['digest']}</code>" in html
    assert listing(store) == before  # du reads: nothing in the store changed
    assert cli("--store", store, "du", "fine").code == 0  # a sound image alone is no problem
    # named, each damaged image has the figures and problems `du` of all gives it
    every = {t["tag"]: t for t in report.json()["tags"]}
    for name in ("holed", "broken"):
        alone = cli("--store", store, "--json", "du", name)
        assert alone.code == 1
        assert alone.json()["tags"] == [every[name]]
    assert listing(store) == before


def test_a_store_without_tags_gets_a_page_without_a_chart() -> None:
    page = htmlreport.render(
        DuReport((), 0, 0, 0, 0, 512, 0), store="/s", made_at=datetime.now(UTC)
    )
    assert "No tags: the store holds no tagged image." in page
    assert "<svg" not in page and "<rect" not in page
    assert 'title="in blobs/, never referenced: 512 bytes"' in page
