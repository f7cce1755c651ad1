"""A drifting synthetic click log: ``synth --days D`` writes D day datasets that follow one another.

Every day is a dataset of its own (the layout of :mod:`multiembed.data.metadata`, its ``day`` record in
``metadata.json``: :mod:`multiembed.data.days`) drawn from the default click model
(:class:`~multiembed.data.synthetic.model.SyntheticClickModel`) as it stands that day:

* Id space: every categorical field keeps its table size (the *hash space*, the same every day); on a day only
  ``active_share`` of its ids are live, drawn Zipf over their popularity ranks. Integer fields (log-bins of raw
  values) do not churn.
* Churn: each day a share ``churn`` of every categorical field's live ids retires and as many ids take their
  popularity ranks: ids never live before first, then (once those run out) the longest-retired ones, as a hash
  space reuses its buckets.
* Popularity shift: each day ``popularity_shift x live ids`` random pairs of ranks swap their ids.
* Click-model drift: each day the first-order weights and the interaction factors move one step of a stationary
  AR(1) process, ``w <- sqrt(1 - drift) * w + sqrt(drift) * noise``, so their spread stays that of day 0 and the
  model of day ``k`` correlates ``(1 - drift) ** (k / 2)`` with day 0's. Scales and bias are day 0's.

Day ``k``'s model is a deterministic function of the configuration and ``k`` (each day's changes come from a stream
seeded by ``(seed, day)``), and its rows from ``(seed, day, split, chunk)``, so any day can be regenerated alone.
Each day records its Bayes-optimal AUC and log loss per split in its metadata, like every synthetic dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from multiembed.data.metadata import DatasetMetadata

if TYPE_CHECKING:
    from multiembed.data.synthetic.encoding import IdEncoding
from multiembed.data.synthetic.model import NUM_INT_FIELDS, SyntheticClickModel, SyntheticConfig, zipf_cdf

DAY_DIR_FORMAT = "day-{:03d}"


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """How the click log changes from one day to the next.

    Attributes:
        active_share: share of each categorical field's ids live on a day (the rest are free for new ids).
        churn: share of each categorical field's live ids that retire each day (as many new ids appear).
        popularity_shift: random rank swaps per day, as a share of the field's live ids.
        drift: share of the click model's weight variance renewed each day (0: a fixed click model).
    """

    active_share: float = 0.5
    churn: float = 0.05
    popularity_shift: float = 0.05
    drift: float = 0.02

    def __post_init__(self) -> None:
        if not 0 < self.active_share <= 1:
            raise ValueError(f"--active-share must be in (0, 1], got {self.active_share}")
        for name in ("churn", "popularity_shift", "drift"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")


class DriftingClickModel(SyntheticClickModel):
    """The default click model on day ``day`` of a drifting log (see the module docstring).

    Args:
        config: the click model of day 0.
        drift: how it changes each day.
        day: the day (0 = the first).

    Example::

        >>> day3 = DriftingClickModel(SyntheticConfig(seed=0, scale=0.001), DriftConfig(), day=3)
        >>> day3.sample(np.random.default_rng(1), 100).ids.shape
        (100, 39)
    """

    def __init__(self, config: SyntheticConfig, drift: DriftConfig, day: int) -> None:
        if day < 0:
            raise ValueError(f"day must be >= 0, got {day}")
        super().__init__(config)
        self.drift = drift
        for f in range(NUM_INT_FIELDS, len(self._rank_to_id)):
            size = self._rank_to_id[f].shape[0]
            live = max(1, int(round(size * drift.active_share)))
            self._rank_to_id[f] = self._rank_to_id[f][:live]
            self._cdfs[f] = zipf_cdf(live, config.zipf_exponent)
        # Day 0's scales and bias from day 0's live ids; later days keep them (the drift is stationary).
        self._calibrate()
        # Day on which each id last stopped being live (-1: never live), per categorical field; ids live on day 0
        # count as live since before it.
        self._retired_on = [np.full(self.vocab_sizes[name], -1, dtype=np.int64)
                            for name in self.field_names[NUM_INT_FIELDS:]]
        self._ever_live = [np.zeros(self.vocab_sizes[name], dtype=bool) for name in self.field_names[NUM_INT_FIELDS:]]
        for c, f in enumerate(range(NUM_INT_FIELDS, len(self._rank_to_id))):
            self._ever_live[c][self._rank_to_id[f]] = True
        self.day = 0
        for _ in range(day):
            self.advance()

    def advance(self) -> None:
        """Moves the model to the next day (``self.day`` grows by one)."""
        day = self.day + 1
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 7, day]))
        for c, f in enumerate(range(NUM_INT_FIELDS, len(self._rank_to_id))):
            ids = self._rank_to_id[f].copy()
            live = ids.shape[0]
            retiring = int(round(live * self.drift.churn))
            if retiring:
                ranks = np.sort(rng.choice(live, size=retiring, replace=False))
                free = np.ones(self.vocab_sizes[self.field_names[f]], dtype=bool)
                free[ids] = False
                candidates = np.flatnonzero(free)
                # Never-live ids first (in a seeded random order), then the longest-retired ones.
                order = np.lexsort((rng.random(candidates.shape[0]), self._retired_on[c][candidates],
                                    self._ever_live[c][candidates]))
                incoming = candidates[order][:retiring]
                self._retired_on[c][ids[ranks[: incoming.shape[0]]]] = day
                ids[ranks[: incoming.shape[0]]] = incoming
                self._ever_live[c][incoming] = True
            swaps = int(round(live * self.drift.popularity_shift))
            if swaps and live > 1:
                a = rng.integers(0, live, size=swaps)
                b = rng.integers(0, live, size=swaps)
                for i, j in zip(a.tolist(), b.tolist()):
                    ids[i], ids[j] = ids[j], ids[i]
            self._rank_to_id[f] = ids
        keep, renew = math.sqrt(1.0 - self.drift.drift), math.sqrt(self.drift.drift)
        self._first_order = keep * self._first_order + renew * rng.standard_normal(self._first_order.shape)
        self._factors = keep * self._factors + renew * rng.standard_normal(self._factors.shape) / math.sqrt(
            self.config.rank
        )
        self.day = day

    def live_ids(self, field: str) -> np.ndarray:
        """The ids of categorical ``field`` live on this day, by popularity rank (most frequent first)."""
        return self._rank_to_id[self.field_names.index(field)].copy()

    def sequence_identity(self) -> str:
        """A digest of everything the day sequence is drawn from (the click model of day 0 and the drift): equal
        for every day of one ``synth --days`` log, different for any other log."""
        identity = {"model": self.fingerprint(), "drift": dataclasses.asdict(self.drift)}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
        return f"synthetic-days-{digest[:32]}"

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "drift": dataclasses.asdict(self.drift), "day": self.day}


def day_dirs(out_dir: os.PathLike, days: int) -> List[Path]:
    """The directories ``synth --days`` writes: ``OUT/day-000`` ... in day order."""
    return [Path(out_dir) / DAY_DIR_FORMAT.format(k) for k in range(days)]


def generate_days(
    out_dir: os.PathLike,
    days: int,
    rows_per_day: int,
    config: SyntheticConfig = SyntheticConfig(),
    drift: DriftConfig = DriftConfig(),
    split: Sequence[float] = (8, 1, 1),
    force: bool = False,
    progress: bool = True,
    encoding: Optional["IdEncoding"] = None,
) -> List[DatasetMetadata]:
    """Writes ``days`` day datasets ``OUT/day-000`` ... of ``rows_per_day`` rows each.

    Args:
        out_dir: the directory that receives the day directories (created).
        days: number of days (>= 1).
        rows_per_day: rows of every day over its splits.
        config: the click model of day 0.
        drift: how it changes from day to day.
        split: train, val, test weights of every day.
        force: replace days already written.
        progress: a tqdm bar per day on stderr.
        encoding: write every day's ids as a hashing- or managed-mode conversion would
            (:mod:`multiembed.data.synthetic.encoding`); None: the native ids.

    Returns:
        The metadata of every day, in day order.

    Raises:
        ValueError: ``days`` < 1, or bad rows or split (one line).
        DatasetError: a day directory already holds a dataset and ``force`` is False.
    """
    from multiembed.data.synthetic.write import check_fits, generate_dataset

    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    check_fits(Path(out_dir), rows_per_day, config, days=days)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    metas: List[DatasetMetadata] = []
    model = DriftingClickModel(config, drift, day=0)
    for k, path in enumerate(day_dirs(out_dir, days)):
        if k:
            model.advance()
        metas.append(
            generate_dataset(
                path, rows_per_day, config, split=split, force=force, progress=progress, model=model,
                day=(model.sequence_identity(), k), encoding=encoding,
            )
        )
    return metas
