"""Train / validation / test assignment of the rows of a conversion.

Random splits are exact: ``N`` rows and weights ``8,1,1`` put exactly ``split_sizes(N, (8, 1, 1))`` rows in each split
(10,000 rows give 8,000 / 1,000 / 1,000), and every arrangement of those labels over the rows is equally likely, as
with the paper's shuffle-then-slice. The draw is streamed: per input file a multivariate hypergeometric draw fixes
how many of its rows go to each split, and within a file every block of ``ASSIGN_BLOCK`` rows draws its share the same
way and shuffles it, so memory stays bounded whatever the file size and no permutation of all rows is ever held.
Everything is a function of the seed and the files' row counts, so a resumed conversion recomputes the same
assignment.

``--split-by-file`` follows TorchRec's Criteo 1TB convention instead: every input but the last is training data;
the last one (day 23) gives its first half to validation and its second half to test.
"""

from __future__ import annotations

from fractions import Fraction
from typing import List, Sequence, Tuple

import numpy as np

from multiembed.data.metadata import SPLITS

TRAIN, VAL, TEST = 0, 1, 2
# Rows drawn at a time inside a file.
ASSIGN_BLOCK = 1 << 16

SplitCounts = Tuple[int, int, int]


def parse_split_weights(text: str) -> Tuple[Fraction, Fraction, Fraction]:
    """Parses ``"8,1,1"`` (or ``"0.8,0.1,0.1"``) into three non-negative weights with a positive sum.

    Raises:
        ValueError: not three numbers, a negative or non-finite one, or all zero.
    """
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != len(SPLITS):
        raise ValueError(f"--split: expected three weights train,val,test (e.g. 8,1,1), got {text!r}")
    weights = []
    for name, part in zip(SPLITS, parts):
        try:
            weight = Fraction(part)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--split: {name} weight {part!r} is not a number") from None
        if weight < 0:
            raise ValueError(f"--split: {name} weight {part} is negative")
        weights.append(weight)
    if sum(weights) == 0:
        raise ValueError(f"--split: weights {text!r} sum to zero")
    return weights[0], weights[1], weights[2]


def split_sizes(rows: int, weights: Sequence[Fraction]) -> SplitCounts:
    """Rows per split for ``rows`` rows: the floors of the exact shares, then the rows left over go one each to the
    splits with the largest remainders (ties: train before val before test). A zero weight gets no row.

    Example::

        >>> split_sizes(10_000, (8, 1, 1)), split_sizes(7, (8, 1, 1)), split_sizes(5, (0, 0, 1))
        ((8000, 1000, 1000), (5, 1, 1), (0, 0, 5))
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    weights = [Fraction(w) for w in weights]
    total = sum(weights)
    shares = [rows * w / total for w in weights]
    sizes = [int(s) for s in shares]  # floor: shares are non-negative
    left = rows - sum(sizes)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - sizes[i]), i))
    for i in by_remainder[:left]:
        sizes[i] += 1
    return sizes[0], sizes[1], sizes[2]


def random_file_counts(file_rows: Sequence[int], weights: Sequence[Fraction], seed: int) -> List[SplitCounts]:
    """Splits each file's rows among train/val/test so that the totals are ``split_sizes(sum(file_rows))``.

    File ``i`` draws its counts from a multivariate hypergeometric distribution over the rows the files before it
    left, so the result is distributed as slicing one random permutation of all rows.
    """
    remaining = np.array(split_sizes(int(sum(file_rows)), weights), dtype=np.int64)
    rng = np.random.default_rng([seed, 0])
    counts: List[SplitCounts] = []
    for rows in file_rows:
        drawn = _draw(rng, remaining, rows)
        remaining -= drawn
        counts.append((int(drawn[0]), int(drawn[1]), int(drawn[2])))
    return counts


def by_file_counts(file_rows: Sequence[int]) -> List[SplitCounts]:
    """``--split-by-file``: all but the last file to train; the last file's first half to val, the rest to test."""
    if len(file_rows) < 2:
        raise ValueError("--split-by-file needs at least two inputs (training files, then the val/test file)")
    counts: List[SplitCounts] = [(int(rows), 0, 0) for rows in file_rows[:-1]]
    last = int(file_rows[-1])
    counts.append((0, last // 2, last - last // 2))
    return counts


def _draw(rng: np.random.Generator, remaining: np.ndarray, rows: int) -> np.ndarray:
    if rows == 0:
        return np.zeros(3, dtype=np.int64)
    if rows == int(remaining.sum()):
        return remaining.copy()
    # "marginals" draws in O(number of splits); the default "count" method would cost O(population).
    return rng.multivariate_hypergeometric(remaining, rows, method="marginals").astype(np.int64)


class SplitAssigner:
    """Streams the split of each row of one file, given how many of its rows go to each split.

    Args:
        counts: rows of this file per split (train, val, test).
        seed: the conversion's seed.
        file_index: position of the file among the inputs (each file draws from its own stream).
        ordered: lay the splits out in order (train rows, then val, then test) instead of at random: the
            ``--split-by-file`` halves.

    Example::

        >>> assigner = SplitAssigner((8, 1, 1), seed=0, file_index=0)
        >>> labels = np.concatenate([assigner.take(3), assigner.take(7)])
        >>> np.bincount(labels, minlength=3).tolist()
        [8, 1, 1]
    """

    def __init__(self, counts: SplitCounts, seed: int, file_index: int, ordered: bool = False) -> None:
        if any(c < 0 for c in counts):
            raise ValueError(f"split counts must be >= 0, got {counts}")
        self._remaining = np.array(counts, dtype=np.int64)
        self._rng = np.random.default_rng([seed, 1, file_index])
        self._ordered = ordered
        self._buffer = np.zeros(0, dtype=np.int8)
        self._position = 0

    @property
    def rows_left(self) -> int:
        return int(self._remaining.sum()) + len(self._buffer) - self._position

    def _refill(self) -> None:
        rows = min(ASSIGN_BLOCK, int(self._remaining.sum()))
        if self._ordered:
            drawn = np.zeros(3, dtype=np.int64)
            left = rows
            for split in range(3):
                drawn[split] = min(left, self._remaining[split])
                left -= drawn[split]
        else:
            drawn = _draw(self._rng, self._remaining, rows)
        self._remaining -= drawn
        block = np.repeat(np.arange(3, dtype=np.int8), drawn)
        if not self._ordered:
            self._rng.shuffle(block)
        self._buffer = np.concatenate([self._buffer[self._position :], block])
        self._position = 0

    def take(self, rows: int) -> np.ndarray:
        """The splits (0 train, 1 val, 2 test) of the next ``rows`` rows, int8 ``[rows]``.

        Raises:
            ValueError: more rows than the counts cover.
        """
        if rows > self.rows_left:
            raise ValueError(f"asked for {rows} rows, only {self.rows_left} left to assign")
        while len(self._buffer) - self._position < rows:
            self._refill()
        out = self._buffer[self._position : self._position + rows]
        self._position += rows
        return out
