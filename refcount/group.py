"""Group commit: requests that arrive while a batch is being written go together
into the next one.

How the pieces fit together: a `refcount watch` daemon serves each client's
`delete` on a thread of its own (`refcount.serve`). Each of those threads calls
`GroupCommit.submit` with its request and waits. The first to arrive while no
batch of its kind is in flight becomes the *leader*: it takes every request
queued so far (its own first) and runs them with the `run` callable it was
given, which applies them together (`Refcounter.delete_groups`: one
transaction and one rewrite of index.json). Requests that arrive meanwhile
queue up; when the batch ends, each member gets its own result and the first
of the queued requests leads the next batch with everything queued by then.
So under load a batch costs one rewrite however many clients it serves, and a
lone request runs at once, as it would without any of this.

Only requests with the same `key` are batched together (the CLI uses the
options that shape a delete: store, database, trash TTL, ...); different keys
never wait for each other here.

Cancelling: a request whose `cancelled()` is true while it is still queued is
withdrawn (`Withdrawn`): it never runs. Once a leader has taken it into a
batch it is carried out with the others, and its result is its own; what that
means to a client that left is the caller's to say (`refcount.cli`).

Standard library only; no knowledge of what a request is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")
S = TypeVar("S")

POLL = 0.05
"""Seconds between looks at `cancelled()` while a request waits for its batch."""


class Withdrawn(Exception):
    """The request was cancelled while queued: it did not run and never will."""


@dataclass(eq=False)
class _Item(Generic[R, S]):
    request: R
    cancelled: Callable[[], bool]
    taken: bool = False
    done: bool = False
    result: S | None = None
    error: BaseException | None = None


@dataclass
class _Queue(Generic[R, S]):
    waiting: list[_Item[R, S]] = field(default_factory=list)
    in_flight: bool = False


class GroupCommit(Generic[R, S]):
    """The leader/follower queues of one store's daemon; see the module docstring.

    `run(requests)` is called on the leader's thread with the requests of one
    batch in arrival order, and must return one result per request, in the same
    order. What it raises reaches every member of the batch.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[Hashable, _Queue[R, S]] = {}

    def submit(
        self,
        key: Hashable,
        request: R,
        run: Callable[[Sequence[R]], Sequence[S]],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> S:
        """Have `request` run in the next batch of `key`; returns its own result.

        Blocks until the batch it is in has run (leading it, when it is first in
        line once no batch of `key` is in flight). Raises Withdrawn when
        `cancelled()` turns true before a leader took the request.
        """
        item: _Item[R, S] = _Item(request, cancelled)
        with self._cond:
            queue = self._queues.setdefault(key, _Queue())
            queue.waiting.append(item)
            if queue.in_flight or queue.waiting[0] is not item:
                log.debug(
                    "group commit: queued for the next batch (%d waiting)", len(queue.waiting)
                )
            batch = self._wait_for_turn(queue, item)
        if batch is not None:
            self._lead(key, queue, batch, run)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]  # set with done, error None

    def _wait_for_turn(self, queue: _Queue[R, S], item: _Item[R, S]) -> list[_Item[R, S]] | None:
        """Under the lock: wait until `item` is done (None) or leads a batch (returned)."""
        while not item.done:
            if not item.taken and item.cancelled():
                queue.waiting.remove(item)
                self._cond.notify_all()  # the next in line may lead now
                if not queue.waiting and not queue.in_flight:
                    self._queues = {k: q for k, q in self._queues.items() if q is not queue}
                log.debug("group commit: a queued request was withdrawn; it does not run")
                raise Withdrawn
            if not queue.in_flight and queue.waiting and queue.waiting[0] is item:
                batch = self._take(queue)
                if batch is None:
                    raise Withdrawn
                return batch
            self._cond.wait(POLL)
        return None

    def _take(self, queue: _Queue[R, S]) -> list[_Item[R, S]] | None:
        """Under the lock: everything queued (but what was cancelled meanwhile, the
        caller's own request included) is the next batch; None when that is nothing."""
        batch = [i for i in queue.waiting if not i.cancelled()]
        for dropped in (i for i in queue.waiting if i not in batch):
            dropped.error = Withdrawn()
            dropped.done = True
        queue.waiting = []
        if not batch:
            return None
        queue.in_flight = True
        for member in batch:
            member.taken = True
        return batch

    def _lead(
        self,
        key: Hashable,
        queue: _Queue[R, S],
        batch: list[_Item[R, S]],
        run: Callable[[Sequence[R]], Sequence[S]],
    ) -> None:
        results: Sequence[S] = ()
        failure: BaseException | None = None
        try:
            results = run([m.request for m in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"group commit: {len(results)} results for {len(batch)}")
        except BaseException as exc:  # every member learns it, then the leader re-raises
            failure = exc
        with self._cond:
            for i, member in enumerate(batch):
                if failure is not None:
                    member.error = failure
                else:
                    member.result = results[i]
                member.done = True
            queue.in_flight = False
            if not queue.waiting:
                self._queues.pop(key, None)
            self._cond.notify_all()
