"""What a ``--vocab managed`` run records about its managed-collision tables, and the checks of its checkpoints.

Per evaluation (``metrics.jsonl``) and per day (``days``): the share of lookups that fell on a fallback row (in
training since the last record, and in the evaluation), the rows that hold a key, and the rows assigned and evicted
at the eviction intervals (:mod:`multiembed.models.managed` counts them on every rank; the records sum the ranks).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from torch import nn

from multiembed.models.managed import COUNTERS, managed_counts

_RANK_KEY = re.compile(r"^rank(\d+)\.")


def _share(part: int, whole: int) -> Optional[float]:
    return part / whole if whole else None


def counts_record(counts: Dict[str, int]) -> Dict[str, Any]:
    """The ``managed_*`` fields of a metrics record from :func:`~multiembed.models.managed.managed_counts`.

    Example::

        >>> record = counts_record({"train_lookups": 10, "train_fallback": 2, "eval_lookups": 0, "eval_fallback": 0,
        ...                         "assigned": 5, "evictions": 1, "rows_in_use": 7, "rows": 8})
        >>> record["managed_train_fallback_share"], record["managed_eval_fallback_share"], record["managed_evictions"]
        (0.2, None, 1)
    """
    return {
        "managed_rows": counts["rows"],
        "managed_rows_in_use": counts["rows_in_use"],
        "managed_train_fallback_share": _share(counts["train_fallback"], counts["train_lookups"]),
        "managed_eval_fallback_share": _share(counts["eval_fallback"], counts["eval_lookups"]),
        "managed_assigned": counts["assigned"],
        "managed_evictions": counts["evictions"],
    }


class ManagedMonitor:
    """Reads the counters of a run's managed tables and keeps their totals over the run.

    Args:
        module: the (sharded) training module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.totals: Dict[str, int] = dict.fromkeys((*COUNTERS, "rows_in_use", "rows"), 0)

    def read(self) -> Dict[str, Any]:
        """The record of the counters since the last read (a collective: call it on every rank)."""
        counts = managed_counts(self.module)
        for key in COUNTERS:
            self.totals[key] += counts[key]
        self.totals["rows_in_use"], self.totals["rows"] = counts["rows_in_use"], counts["rows"]
        return counts_record(counts)

    def totals_record(self) -> Dict[str, Any]:
        """The record of everything counted over the run so far (rows as at the last read)."""
        return counts_record(self.totals)


def saved_world_size(entries: Iterable[str]) -> int:
    """The world size a checkpoint was written on: the number of ``rank<N>.`` entries (one per rank)."""
    return len({m.group(1) for m in map(_RANK_KEY.match, entries) if m})


def check_same_world_size(path: Path, entries: Iterable[str], world_size: int) -> None:
    """Refuses to resume managed tables on another world size than they were checkpointed on.

    Each rank's shard holds the remapping of the ids routed to its bucket, and the buckets follow the world size, so
    the state does not reshard.

    Raises:
        ValueError: the checkpoint was written on another world size (one line).
    """
    saved = saved_world_size(entries)
    if saved and saved != world_size:
        raise ValueError(
            f"{path}: managed tables were checkpointed on {saved} rank(s) and cannot resume on {world_size}: each "
            f"rank's remapping covers the ids of its bucket; resume on {saved} rank(s)"
        )
