"""Extractor plug-ins: the children of media types refcount does not parse itself.

How the pieces fit together. A distribution registers an object under the
entry-point group `refcount.extractors` (GROUP). The object, or what calling it
returns when it is a class or a factory, has

    media_types: a collection of media-type strings it reads
    extract(data: bytes, media_type: str) -> iterable of Child (or digest strings)

`installed()` loads every entry point once per process into a `Registry`.
`refcount.core.expansion.expand` asks the registry about a blob of a type it
claims, on the blob's 0→1 transition (the ledger) and in every from-scratch
count (the scan), exactly where the built-in OCI parser is asked about a
manifest: so the edges an extractor names are recorded, counted and released
like any other, and verify recounts them the same way.

An extractor is someone else's code and is never trusted with data: a call
that raises, outlives its time limit, or returns something that is not a list
of valid digests and sizes is a *failure*, and `expand` then treats the blob as
damaged (it holds every digest its bytes mention; see `refcount.oci.salvage`).
A call runs on a worker thread so that the time limit can be kept; an
extractor that timed out is not called again in this process (its thread may
still be running), and every later blob of its types is damaged at once.

What cannot claim a type: a built-in manifest type (the OCI parser reads those)
and a type an earlier entry point (by name) already claimed. Both are shown by
`refcount plugins`, as is an entry point that does not load.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

from refcount.errors import InvalidDigest
from refcount.oci import MANIFEST_TYPES, Descriptor, check_digest
from refcount.reports import ExtractorInfo, PluginsReport

log = logging.getLogger("refcount.extractors")

GROUP = "refcount.extractors"
DEFAULT_TIMEOUT = 10.0
"""Seconds one extractor call may take before its blob is treated as damaged."""
EDGE_KIND = "extracted"
"""The kind of the edges an extractor names (`show` prints it)."""
OPAQUE = "application/octet-stream"
"""The type of a child an extractor gives none: opaque bytes, a leaf never read.

Not "unknown, look inside" as for an OCI descriptor without mediaType: a chunk
is data, and reading every chunk to see whether it is a manifest would cost a
read per chunk, and flag each chunk above --max-manifest as damaged."""


@dataclass(frozen=True)
class Child:
    """A blob that the extracted blob references: its digest, and what is known of it."""

    digest: str
    size: int | None = None
    media_type: str | None = None
    """Its type, when the format says; a manifest type or a type an extractor claims
    is read in turn. None: opaque bytes, never read (OPAQUE)."""


@runtime_checkable
class Extractor(Protocol):
    """What an entry point of the `refcount.extractors` group provides."""

    @property
    def media_types(self) -> Collection[str]: ...

    def extract(self, data: bytes, media_type: str) -> Iterable[Child | str]:
        """The blobs `data` (a whole blob of `media_type`) references. Raise on damage."""
        ...


@dataclass(frozen=True)
class Extracted:
    """One extractor call: the children it named validly, and why it failed if it did."""

    children: tuple[Descriptor, ...]
    problem: str | None = None


@dataclass
class _Plugin:
    info: ExtractorInfo
    extractor: Extractor | None
    disabled: str | None = None  # why it is no longer called in this process


@dataclass
class Registry:
    """The extractors of one process, by the media types they claim."""

    plugins: list[_Plugin] = field(default_factory=list)
    by_type: dict[str, _Plugin] = field(default_factory=dict)
    _runner: _Runner = field(default_factory=lambda: _Runner())

    @classmethod
    def of(cls, named: Iterable[tuple[str, object, metadata.Distribution | None]]) -> Registry:
        """A registry of (entry-point name, loaded object, its distribution), in name order."""
        registry = cls()
        for name, value, dist in sorted(named, key=lambda item: item[0]):
            registry._add(name, value, dist)
        return registry

    def _add(self, name: str, value: object, dist: metadata.Distribution | None) -> None:
        source = _source(dist)
        try:
            extractor = _instantiate(value)
        except Exception as exc:  # someone else's code: any failure is reported
            self._broken(name, source, f"cannot be used: {_describe(exc)}")
            return
        claimed, refused = [], []
        for media_type in sorted(set(extractor.media_types)):
            if media_type in MANIFEST_TYPES:
                refused.append(f"{media_type} (read by refcount itself)")
            elif media_type in self.by_type:
                refused.append(f"{media_type} (claimed by {self.by_type[media_type].info.name})")
            else:
                claimed.append(media_type)
        plugin = _Plugin(ExtractorInfo(name, *source, tuple(claimed), tuple(refused)), extractor)
        self.plugins.append(plugin)
        for media_type in claimed:
            self.by_type[media_type] = plugin

    def _broken(self, name: str, source: tuple[str | None, str | None], error: str) -> None:
        log.warning("extractor %s: %s", name, error)
        self.plugins.append(_Plugin(ExtractorInfo(name, *source, error=error), None))

    def handles(self, media_type: str | None) -> bool:
        return media_type is not None and media_type in self.by_type

    def extract(self, media_type: str, data: bytes, where: str, timeout: float) -> Extracted:
        """The children the extractor of `media_type` names in `data` (a blob `where`).

        Never raises for the extractor's sake: its failure is the `problem`, and
        what it named validly before failing is kept in `children`.
        """
        plugin = self.by_type[media_type]
        assert plugin.extractor is not None
        label = f"{where}: extractor {plugin.info.name}"
        if plugin.disabled:
            return Extracted((), f"{label}: {plugin.disabled}")
        outcome = self._runner.call(
            functools.partial(_listed, plugin.extractor, data, media_type), timeout
        )
        if outcome is _TIMED_OUT:
            plugin.disabled = f"timed out after {timeout:g}s once; not called again"
            log.error("%s: timed out after %gs; no longer called in this process", label, timeout)
            return Extracted((), f"{label}: timed out after {timeout:g}s")
        if isinstance(outcome, BaseException):
            return self._failed(label, (), f"raised {_describe(outcome)}")
        children, problems = _validated(outcome, where)
        if problems:
            return self._failed(label, children, "; ".join(problems))
        return Extracted(children)

    @staticmethod
    def _failed(label: str, children: tuple[Descriptor, ...], why: str) -> Extracted:
        log.warning("%s: %s", label, why)
        return Extracted(children, f"{label}: {why}")

    def report(self) -> PluginsReport:
        return PluginsReport(tuple(p.info for p in self.plugins))


@functools.cache
def installed() -> Registry:
    """The extractors of every installed distribution, loaded once per process."""
    return load(metadata.entry_points(group=GROUP))


def load(points: Iterable[metadata.EntryPoint]) -> Registry:
    """A registry of these entry points; one that does not load is listed with why."""
    named: list[tuple[str, object, metadata.Distribution | None]] = []
    broken: list[tuple[str, metadata.Distribution | None, str]] = []
    for point in points:
        try:
            named.append((point.name, point.load(), point.dist))
        except Exception as exc:  # an import error in someone else's package
            broken.append((point.name, point.dist, f"does not load: {_describe(exc)}"))
    registry = Registry.of(named)
    for name, dist, error in sorted(broken, key=lambda item: item[0]):
        registry._broken(name, _source(dist), error)
    return registry


def _source(dist: metadata.Distribution | None) -> tuple[str | None, str | None]:
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _instantiate(value: object) -> Extractor:
    """The entry point's object, or what calling it returns when it is a class or factory."""
    if isinstance(value, type) or (not isinstance(value, Extractor) and callable(value)):
        value = value()
    if not isinstance(value, Extractor):
        raise TypeError("has no media_types and extract()")
    types = value.media_types
    if isinstance(types, str) or not all(isinstance(t, str) for t in types):
        raise TypeError("media_types is not a collection of strings")
    return value


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _listed(extractor: Extractor, data: bytes, media_type: str) -> list[object]:
    """Run the extractor to the end (a generator too), inside the time limit."""
    return list(extractor.extract(data, media_type))


def _validated(items: list[object], where: str) -> tuple[tuple[Descriptor, ...], list[str]]:
    """The items that are sound children, and what was wrong with the others."""
    children: list[Descriptor] = []
    problems: list[str] = []
    for i, item in enumerate(items):
        child = Child(item) if isinstance(item, str) else item
        if not isinstance(child, Child):
            problems.append(f"item {i} is a {type(item).__name__}, not a Child or digest")
            continue
        try:
            digest = check_digest(child.digest)
        except InvalidDigest as exc:
            problems.append(f"item {i}: {exc}")
            continue
        size = child.size
        if size is not None and (type(size) is not int or size < 0):
            problems.append(f"item {i}: {digest}: size {size!r} is not a byte count")
            continue
        if child.media_type is not None and not isinstance(child.media_type, str):
            problems.append(f"item {i}: {digest}: media type {child.media_type!r} not a string")
            continue
        if digest == where:
            problems.append(f"item {i}: {digest} is the blob itself")
            continue
        children.append(Descriptor(digest, child.media_type or OPAQUE, size, kind=EDGE_KIND))
    return tuple(children), problems


class _TimedOut:
    pass


_TIMED_OUT = _TimedOut()


class _Runner:
    """Calls on one daemon worker thread, each waited for at most its time limit.

    A call that outlives its limit is abandoned with its thread (a daemon thread,
    so it never holds up the process's exit); the next call starts a new one, as
    does the first call in a forked child (which has no threads but its own).
    Calls are serialised: the daemon's threads share one runner.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        self._pid = 0  # the process whose thread reads self._jobs

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """`fn()`, the exception it raised, or _TIMED_OUT."""
        with self._lock:
            if self._jobs is None or self._pid != os.getpid():
                self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
                threading.Thread(
                    target=_work, args=(self._jobs,), name="refcount-extractor", daemon=True
                ).start()
            job = _Job(fn)
            self._jobs.put(job)
            if job.done.wait(timeout):
                return job.result
            self._jobs.put(None)  # should the call ever return, its thread ends
            self._jobs = None
            return _TIMED_OUT


@dataclass
class _Job:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        try:
            job.result = job.fn()
        except BaseException as exc:  # the caller reports it, whatever it is
            job.result = exc
        job.done.set()
