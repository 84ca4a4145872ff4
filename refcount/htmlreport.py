"""`du --html`: a `DuReport` as one self-contained HTML page.

`render(report, store=..., made_at=...)` is a pure function from the report to
the page's text; `Refcounter.write_du_html` writes it (atomically, through
`refcount.store`). The page holds everything it shows: inline CSS, a chart drawn
here as inline SVG, no script, no font, no image and no address of any kind, so
it reads the same offline, from a mail attachment or a CI artefact. A
Content-Security-Policy in the page forbids the browser any fetch besides.

Why a chart drawn by the program and not a charting library: horizontal stacked
bars are a few rectangles and lines, so SVG written here costs about a hundred
lines, while a library would be a dependency to vendor with its licence, and
JavaScript to run before anything is drawn.

What the page shows: the store's totals; one bar per tag, exclusive bytes then
shared bytes, in the report's order (largest exclusive first), the tags beyond
the first TOP_TAGS folded into one "N other tags" bar (their figures summed);
the problems `du` found; and a table with every figure (the first TABLE_ROWS
tags; `refcount --json du` has them all). Each bar has a `<title>` (a tooltip,
and what a screen reader says). The SVG scales with the window (viewBox), so the
page is readable from a 1366x768 laptop screen upwards.

Every text that comes from the store (tag names, digests, problems) goes
through `_text`, which escapes it for HTML and shows control characters as
`\\xNN`: a tag may hold `<`, `&` or quotes.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from refcount.reports import DuReport, TagUsage
from refcount.units import human_size, plural

TOP_TAGS = 25
"""Bars drawn one per tag; the rest are folded into one bar."""
TABLE_ROWS = 1000
"""Tags listed in the table (a page of 100k rows would not open quickly)."""
EXCLUSIVE_COLOUR = "#1f6fb4"
SHARED_COLOUR = "#f0a030"
BACKGROUND = "#ffffff"
ELLIPSIS = "\u2026"
WARNING_SIGN = "\u26a0 "
"""Put before the label of a bar whose image has a problem."""
LABEL_CHARS = 36
"""A longer tag name is cut in its bar's label (the tooltip and the table have it whole)."""

# The chart's coordinates (SVG user units; the page scales them to its width).
_WIDTH = 1000
_LABEL_RIGHT = 290  # labels end here, right-aligned
_BAR_X = 300
_BAR_WIDTH = 540
_ROW = 26
_BAR_HEIGHT = 18
_TOP = 28  # room for the scale's labels

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(value: str) -> str:
    """`value` safe as HTML text and as a quoted attribute value."""
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value), quote=True)


@dataclass(frozen=True)
class _Bar:
    label: str
    title: str
    exclusive: int
    shared: int
    flagged: bool


def _bars(tags: tuple[TagUsage, ...]) -> list[_Bar]:
    """One bar per tag, the first TOP_TAGS; the rest folded into one (unless only one is left)."""
    shown = tags if len(tags) <= TOP_TAGS + 1 else tags[:TOP_TAGS]
    bars = [
        _Bar(
            u.tag if len(u.tag) <= LABEL_CHARS else u.tag[: LABEL_CHARS - 1] + ELLIPSIS,
            f"{u.tag}: {human_size(u.total)}, exclusive {human_size(u.exclusive)}, "
            f"shared {human_size(u.shared)} (with {plural(u.shares_with, 'other tag')})"
            + (f"; {plural(len(u.problems), 'problem')}" if u.problems else ""),
            u.exclusive,
            u.shared,
            bool(u.problems),
        )
        for u in shown
    ]
    rest = tags[len(shown) :]
    if rest:
        exclusive = sum(u.exclusive for u in rest)
        shared = sum(u.shared for u in rest)
        label = plural(len(rest), "other tag")
        bars.append(
            _Bar(
                label,
                f"{label}, summed: exclusive {human_size(exclusive)}, shared {human_size(shared)}",
                exclusive,
                shared,
                any(u.problems for u in rest),
            )
        )
    return bars


def _chart(tags: tuple[TagUsage, ...]) -> str:
    bars = _bars(tags)
    if not bars:
        return '<p class="none">No tags: the store holds no tagged image.</p>'
    scale = max(max(b.exclusive + b.shared for b in bars), 1)
    height = _TOP + _ROW * len(bars) + 4
    parts = [
        f'<svg viewBox="0 0 {_WIDTH} {height}" role="img" aria-labelledby="chart-title">',
        '<title id="chart-title">Bytes per tag: exclusive, then shared</title>',
    ]
    for quarter in range(5):
        x = _BAR_X + _BAR_WIDTH * quarter / 4
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="{_TOP - 6}" x2="{x:.1f}" y2="{height}"/>'
            f'<text class="scale" x="{x:.1f}" y="{_TOP - 10}">'
            f"{_text(human_size(scale * quarter // 4))}</text>"
        )
    for row, bar in enumerate(bars):
        y = _TOP + _ROW * row
        middle = y + _BAR_HEIGHT / 2
        exclusive = _BAR_WIDTH * bar.exclusive / scale
        shared = _BAR_WIDTH * bar.shared / scale
        flag = ' class="flagged"' if bar.flagged else ""
        parts.append(
            f"<g{flag}><title>{_text(bar.title)}</title>"
            f'<text class="label" x="{_LABEL_RIGHT}" y="{middle:.1f}">'
            f"{WARNING_SIGN if bar.flagged else ''}{_text(bar.label)}</text>"
            f'<rect class="exclusive" x="{_BAR_X}" y="{y}" width="{exclusive:.2f}" '
            f'height="{_BAR_HEIGHT}"/>'
            f'<rect class="shared" x="{_BAR_X + exclusive:.2f}" y="{y}" width="{shared:.2f}" '
            f'height="{_BAR_HEIGHT}"/>'
            f'<text class="value" x="{_BAR_X + exclusive + shared + 6:.1f}" y="{middle:.1f}">'
            f"{_text(human_size(bar.exclusive + bar.shared))}</text></g>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _digest(digest: str) -> str:
    """`sha256:c59d3c0480cc`, the whole digest in its tooltip."""
    return f'<code title="{_text(digest)}">{_text(digest[:19])}</code>'


def _size_cell(size: int) -> str:
    return f'<td title="{size} bytes">{_text(human_size(size))}</td>'


NOT_COMPUTED = "not computed for a selection"
"""What a total that needs every image says on the page of `du REF...`."""


def _totals(report: DuReport) -> str:
    cards = [
        ("live", report.live, "bytes of the blobs the store's tags and entries hold"),
        ("shared", report.shared, "held by the images of two or more tags"),
        ("untagged only", report.untagged, "kept alive only by untagged entries"),
        ("quarantined", report.quarantined, "freed, waiting in .refcount/trash/"),
        ("orphaned", report.orphaned, "in blobs/, never referenced"),
        ("reclaimable now", report.reclaimable, "what gc would free now"),
    ]
    return "\n".join(
        f'<div class="card" title="{_text(why)}: {size} bytes"><span>{_text(name)}</span>'
        f"<b>{_text(human_size(size))}</b></div>"
        if size is not None
        else f'<div class="card" title="{_text(why)}: {NOT_COMPUTED}">'
        f"<span>{_text(name)}</span><b>{NOT_COMPUTED}</b></div>"
        for name, size, why in cards
    )


def _table(tags: tuple[TagUsage, ...]) -> str:
    rows = [
        "<tr>"
        f'<th scope="row">{_text(u.tag)}</th>'
        f"<td>{_digest(u.digest)}</td>"
        f"{_size_cell(u.total)}{_size_cell(u.exclusive)}{_size_cell(u.shared)}"
        f"<td>{u.shares_with}</td>"
        f"<td>{', '.join(f'{_text(d.kind)} {_digest(d.digest)}' for d in u.problems) or '-'}</td>"
        "</tr>"
        for u in tags[:TABLE_ROWS]
    ]
    if len(tags) > TABLE_ROWS:
        more = plural(len(tags) - TABLE_ROWS, "more tag")
        rows.append(f'<tr><td colspan="7">{more}: see <code>refcount --json du</code></td></tr>')
    return "\n".join(rows)


def _problems(tags: tuple[TagUsage, ...]) -> str:
    items = [
        f"<li><b>{_text(u.tag)}</b>: {_text(d.kind)} <code>{_text(d.digest)}</code>: "
        f"{_text(d.reason)}</li>"
        for u in tags
        for d in u.problems
    ]
    if not items:
        return ""
    listed = "\n".join(items)
    return f'<section class="problems"><h2>Problems</h2><ul>\n{listed}</ul></section>'


_STYLE = f"""
body {{ margin: 0; background: {BACKGROUND}; color: #1b1b1b;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }}
main {{ max-width: 1180px; margin: 0 auto; padding: 12px 24px 32px; }}
h1 {{ font-size: 1.45em; margin: 0.3em 0 0.1em; word-break: break-all; }}
h2 {{ font-size: 1.15em; margin: 1.1em 0 0.4em; }}
.made {{ color: #555; margin: 0 0 0.8em; }}
.totals {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 8px; }}
.card {{ border: 1px solid #d8d8d8; border-radius: 6px; padding: 6px 10px; }}
.card span {{ color: #555; font-size: 0.9em; }}
.card b {{ display: block; font-size: 1.3em; }}
.legend span {{ display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 1em;
  vertical-align: -0.1em; }}
svg {{ display: block; width: 100%; height: auto; }}
svg text {{ font-size: 13px; dominant-baseline: central; fill: #1b1b1b; }}
svg .label {{ text-anchor: end; }}
svg .scale {{ text-anchor: middle; fill: #666; font-size: 12px; }}
svg .grid {{ stroke: #e4e4e4; stroke-width: 1; }}
svg .exclusive {{ fill: {EXCLUSIVE_COLOUR}; }}
svg .shared {{ fill: {SHARED_COLOUR}; }}
svg .flagged .label {{ fill: #b00020; font-weight: bold; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.93em; }}
th, td {{ padding: 3px 8px; border-bottom: 1px solid #ececec; text-align: right;
  white-space: nowrap; }}
th[scope="row"], thead th:first-child {{ text-align: left; white-space: normal;
  overflow-wrap: anywhere; }}
td:last-child, thead th:last-child {{ text-align: left; }}
.problems {{ color: #b00020; }}
.problems code, td code {{ font-size: 0.9em; }}
"""


def render(report: DuReport, *, store: str, made_at: datetime) -> str:
    """The page for `report`, made at `made_at` (shown in UTC) from the store at `store`."""
    made = made_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    tags = report.tags
    exclusive = sum(u.exclusive for u in tags)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>refcount du: {_text(store)}</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<h1>Disk use of {_text(store)}</h1>
<p class="made">Made <time datetime="{made}">{made}</time> by <code>refcount du</code>,
from the reference counts (no blob was read): {plural(len(tags), "tag")},
{_text(human_size(exclusive))} exclusive to one tag.</p>
<section class="totals">
{_totals(report)}
</section>
<h2>Bytes per tag</h2>
<p class="legend"><span style="background: {EXCLUSIVE_COLOUR}"></span>exclusive
(what <code>delete tag</code> would free)<span style="background: {SHARED_COLOUR}"></span>shared
with other tags or entries</p>
{_chart(tags)}
{_problems(tags)}
<h2>Figures</h2>
<table>
<thead><tr><th scope="col">tag</th><th scope="col">digest</th><th scope="col">total</th>
<th scope="col">exclusive</th><th scope="col">shared</th><th scope="col">shares with</th>
<th scope="col">problems</th></tr></thead>
<tbody>
{_table(tags)}
</tbody>
</table>
</main>
</body>
</html>
"""
