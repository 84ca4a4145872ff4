"""The use cases, one module each, behind the `Refcounter` facade.

How the pieces fit (each imports only those below it):

    refcounter  the facade: one short method per use case, the writing sequence
    grouping    several deletes in one transaction and one rewrite (group commit)
    opening     opening the database for reading or writing; the store's identity
    planner     delete: which entries go, what is freed, refusals, index.json rewrite
    push        push: plan from a source, stage under a lease, land in index.json
    reading     tags, show, stats
    sweep       gc: orphans past the grace period, trash past its TTL
    reconcile   catch up with index.json (and the mass-deletion valve); blob files
    journal     file actions after commit: settle, recover
    scan        the from-scratch count: verify's oracle, init's bulk build, repair
    ledger      one transaction's counts and the blob state machine
    expansion   a manifest's children, through a blob reader
    policy      Policy, Changes, progress, the clock
"""

from typing import TYPE_CHECKING

from refcount.core.grouping import DeleteRequest
from refcount.core.policy import Changes, Policy, Progress
from refcount.core.reconcile import sync_log
from refcount.core.refcounter import Refcounter, open, plugins

if TYPE_CHECKING:
    from refcount.core.retention import MinFree, PrunePolicy

__all__ = [
    "Changes",
    "DeleteRequest",
    "MinFree",
    "Policy",
    "Progress",
    "PrunePolicy",
    "Refcounter",
    "open",
    "plugins",
    "sync_log",
]


def __getattr__(name: str) -> object:
    """MinFree and PrunePolicy, loaded on first use (PEP 562): only prune needs the
    retention rules, and their frozen dataclasses cost every other command start-up."""
    if name not in ("MinFree", "PrunePolicy"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from refcount.core import retention

    value = getattr(retention, name)
    globals()[name] = value  # later lookups skip this function
    return value
