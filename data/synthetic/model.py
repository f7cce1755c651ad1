"""The default click model of the synthetic data: Criteo's paper-mode shape, Zipf ids, first-order weights and
planted field-pair interactions (see :mod:`multiembed.data.synthetic`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Dict, List, Tuple

import numpy as np

from multiembed.data.presets import CRITEO_CAT_FIELDS, CRITEO_INT_FIELDS, preset

GENERATOR_VERSION = 1
CHUNK_ROWS = 131_072
PILOT_ROWS = 65_536
ROWS_PER_FILE = 4 * 1024 * 1024
FIELD_NAMES: Tuple[str, ...] = CRITEO_INT_FIELDS + CRITEO_CAT_FIELDS
NUM_INT_FIELDS = len(CRITEO_INT_FIELDS)
# Ids 0..3 of an integer field are the raw values 0, missing, 1 and 2 (paper tokens "-2", "NULL", "-1", "0");
# id j >= 4 is the log-bin k = j - 3 (token str(k), raw values v > 2 with int(ln(v)^2) == k).
_SPECIAL_INT_TOKENS = ("-2", "NULL", "-1", "0")
_SPECIAL_INT_VALUES = (0, None, 1, 2)
_FIRST_BIN_ID = len(_SPECIAL_INT_TOKENS)
# Integer fields are capped so that the largest bin's raw values fit int64 comfortably (exp(sqrt(1500)) ~ 7e16).
_MAX_INT_BINS = 1500


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic click model (everything that changes the data, except the row count).

    Attributes:
        seed: seeds every parameter and every row.
        scale: vocabulary sizes are Criteo Kaggle's times ``scale``.
        min_vocab: no field gets fewer than ``min(criteo_size, min_vocab)`` ids.
        zipf_exponent: exponent of the truncated Zipf distribution of each field's values.
        positive_rate: target mean of ``true_prob`` (the expected click rate).
        first_order_std: standard deviation of the first-order part of the logit over the data.
        interaction_std: standard deviation of the planted-interaction part of the logit over the data.
        num_pairs: number of planted interacting field pairs.
        rank: rank of the interaction factors.
    """

    seed: int = 0
    scale: float = 0.02
    min_vocab: int = 20
    zipf_exponent: float = 1.1
    positive_rate: float = 0.25
    first_order_std: float = 0.85
    interaction_std: float = 0.85
    num_pairs: int = 24
    rank: int = 4

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive number, got {self.scale}")
        if self.min_vocab < 1:
            raise ValueError(f"min_vocab must be >= 1, got {self.min_vocab}")
        if not self.zipf_exponent > 0:
            raise ValueError(f"zipf_exponent must be > 0, got {self.zipf_exponent}")
        if not 0 < self.positive_rate < 1:
            raise ValueError(f"positive_rate must be in (0, 1), got {self.positive_rate}")
        if self.first_order_std < 0 or self.interaction_std < 0:
            raise ValueError("first_order_std and interaction_std must be >= 0")
        max_pairs = len(FIELD_NAMES) * (len(FIELD_NAMES) - 1) // 2
        if not 0 <= self.num_pairs <= max_pairs:
            raise ValueError(f"num_pairs must be in [0, {max_pairs}], got {self.num_pairs}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


@dataclasses.dataclass
class SyntheticRows:
    """One chunk of generated rows (``n`` rows, 39 fields, 13 integer fields).

    Attributes:
        ids: ``[n, 39]`` int64, the id of every field in ``FIELD_NAMES`` order.
        raw_ints: ``[n, 13]`` int64 raw integer values (0 where missing).
        raw_missing: ``[n, 13]`` bool, True where the raw integer is missing (empty in the TSV).
        dense: ``[n, 13]`` float32, ``log(1 + max(raw, 0))``, 0 where missing.
        logit: ``[n]`` float64, the true logit.
        true_prob: ``[n]`` float32, ``sigmoid(logit)``.
        labels: ``[n]`` int8, drawn from ``Bernoulli(true_prob)``.
    """

    ids: np.ndarray
    raw_ints: np.ndarray
    raw_missing: np.ndarray
    dense: np.ndarray
    logit: np.ndarray
    true_prob: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def synthetic_vocab_sizes(scale: float, min_vocab: int = 20) -> Dict[str, int]:
    """Criteo Kaggle's paper-mode vocabulary sizes scaled by ``scale`` (see the module docstring for the rule)."""
    sizes: Dict[str, int] = {}
    for name, size in preset("criteo-kaggle").vocab_sizes.items():
        scaled = max(int(round(size * scale)), min(size, min_vocab))
        if name in CRITEO_INT_FIELDS:
            scaled = max(min(scaled, size, _MAX_INT_BINS + _FIRST_BIN_ID), _FIRST_BIN_ID + 1)
        sizes[name] = scaled
    return sizes


def _log_bin(value: int) -> int:
    # The paper's binning of a raw integer v > 2, exactly as its code computes it.
    return int(math.log(value) ** 2)


def _bin_bounds(num_bins: int) -> Tuple[np.ndarray, np.ndarray]:
    """``lo[k], hi[k]``: the smallest and largest integer v > 2 with int(ln(v)^2) == k, for k = 1..num_bins.

    Index 0 is unused. Every k >= 1 holds at least one integer (exp(sqrt(k + 1)) - exp(sqrt(k)) > 1).
    """
    starts = []
    for k in range(1, num_bins + 2):
        v = max(3, math.ceil(math.exp(math.sqrt(k))))
        # exp/sqrt round: walk to the exact first integer of bin k with the binning function itself.
        while v > 3 and _log_bin(v - 1) >= k:
            v -= 1
        while _log_bin(v) < k:
            v += 1
        starts.append(v)
    lo = np.zeros(num_bins + 1, dtype=np.int64)
    hi = np.zeros(num_bins + 1, dtype=np.int64)
    lo[1:] = starts[:-1]
    hi[1:] = np.asarray(starts[1:], dtype=np.int64) - 1
    return lo, hi


def zipf_cdf(size: int, exponent: float) -> np.ndarray:
    """The cumulative distribution of a Zipf(``exponent``) law truncated to ranks ``1..size``."""
    weights = np.arange(1, size + 1, dtype=np.float64) ** (-exponent)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return cdf


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, overflow-free (through ``tanh``)."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def solve_bias(centered_logits: np.ndarray, target_rate: float) -> float:
    """The bias b with mean(sigmoid(b + z)) == target_rate (bisection: the mean is increasing in b)."""
    low, high = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (low + high)
        if sigmoid(mid + centered_logits).mean() < target_rate:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


class SyntheticClickModel:
    """The generator's ground truth: vocabularies, value distributions and the label model.

    Args:
        config: the model parameters; everything is drawn from ``config.seed``.

    Example::

        >>> model = SyntheticClickModel(SyntheticConfig(seed=0))
        >>> rows = model.sample(np.random.default_rng(1), 1000)
        >>> rows.ids.shape, rows.dense.shape
        ((1000, 39), (1000, 13))
    """

    field_names: Tuple[str, ...] = FIELD_NAMES
    dense_fields: Tuple[str, ...] = CRITEO_INT_FIELDS

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.vocab_sizes: Dict[str, int] = synthetic_vocab_sizes(config.scale, config.min_vocab)
        sizes = [self.vocab_sizes[name] for name in FIELD_NAMES]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))

        self._cdfs = [zipf_cdf(size, config.zipf_exponent) for size in sizes]
        # Integer fields keep rank order (small raw values most frequent); categorical ranks are permuted.
        self._rank_to_id = [
            np.arange(size, dtype=np.int64) if i < NUM_INT_FIELDS else rng.permutation(size).astype(np.int64)
            for i, size in enumerate(sizes)
        ]
        max_bins = max(sizes[:NUM_INT_FIELDS]) - _FIRST_BIN_ID
        self._bin_lo, self._bin_hi = _bin_bounds(max_bins)

        total = int(self._offsets[-1])
        self._first_order = rng.standard_normal(total)
        self._factors = rng.standard_normal((total, config.rank)) / math.sqrt(config.rank)
        all_pairs = [(f, g) for f in range(len(FIELD_NAMES)) for g in range(f + 1, len(FIELD_NAMES))]
        chosen = np.sort(rng.choice(len(all_pairs), size=config.num_pairs, replace=False))
        self.pairs: List[Tuple[int, int]] = [all_pairs[i] for i in chosen]
        self._pair_weights = rng.choice([-1.0, 1.0], size=config.num_pairs) * rng.uniform(0.5, 1.5, config.num_pairs)

        self._first_order_scale = 1.0
        self._interaction_scale = 1.0
        self._center = 0.0
        self.bias = 0.0
        self._calibrate()

    # ----------------------------------------------------------------------------------------------- sampling
    def sample(self, rng: np.random.Generator, n: int) -> SyntheticRows:
        """Draws ``n`` i.i.d. rows.

        Args:
            rng: the random stream (the caller seeds it, e.g. by (seed, split, chunk)).
            n: number of rows.

        Returns:
            The rows, their true probabilities and labels.
        """
        ids = np.empty((n, len(FIELD_NAMES)), dtype=np.int64)
        for f, (cdf, rank_to_id) in enumerate(zip(self._cdfs, self._rank_to_id)):
            ranks = np.searchsorted(cdf, rng.random(n), side="right")
            np.minimum(ranks, cdf.shape[0] - 1, out=ranks)  # guards against cdf[-1] rounding below 1
            ids[:, f] = rank_to_id[ranks]
        raw_ints, raw_missing = self._raw_integers(rng, ids[:, :NUM_INT_FIELDS])
        dense = np.where(raw_missing, 0.0, np.log1p(np.maximum(raw_ints, 0))).astype(np.float32)
        logit = self._logit(ids)
        true_prob = sigmoid(logit).astype(np.float32)
        labels = (rng.random(n) < true_prob).astype(np.int8)
        return SyntheticRows(ids, raw_ints, raw_missing, dense, logit, true_prob, labels)

    def _raw_integers(self, rng: np.random.Generator, int_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Raw integer values whose paper binning gives ``int_ids`` (``[n, 13]``)."""
        bins = np.maximum(int_ids - (_FIRST_BIN_ID - 1), 0)  # log-bin k for ids >= 4, 0 otherwise
        lo = self._bin_lo[bins]
        width = self._bin_hi[bins] - lo + 1
        raw = lo + np.floor(rng.random(int_ids.shape) * width).astype(np.int64)
        for special_id, value in enumerate(_SPECIAL_INT_VALUES):
            raw[int_ids == special_id] = 0 if value is None else value
        return raw, int_ids == _SPECIAL_INT_VALUES.index(None)

    def logit_parts(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The first-order and interaction parts of the logit before calibration, ``[n]`` each.

        ``logit = bias + a * first_order + b * interaction - center`` with the calibrated scales ``a``, ``b``.

        Args:
            ids: ``[n, 39]`` int64 ids in ``FIELD_NAMES`` order.
        """
        flat = ids + self._offsets[:-1]
        first = self._first_order[flat].sum(axis=1)
        interaction = np.zeros(ids.shape[0])
        factor_rows: Dict[int, np.ndarray] = {}
        for (f, g), weight in zip(self.pairs, self._pair_weights):
            for field in (f, g):
                if field not in factor_rows:
                    factor_rows[field] = self._factors[flat[:, field]]
            interaction += weight * np.einsum("nr,nr->n", factor_rows[f], factor_rows[g])
        return first, interaction

    def _logit(self, ids: np.ndarray) -> np.ndarray:
        first, interaction = self.logit_parts(ids)
        return self.bias + self._first_order_scale * first + self._interaction_scale * interaction - self._center

    def _calibrate(self) -> None:
        """Sets the part scales and the bias from a pilot sample (see the module docstring)."""
        config = self.config
        pilot_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 99]))
        ids = np.empty((PILOT_ROWS, len(FIELD_NAMES)), dtype=np.int64)
        for f, (cdf, rank_to_id) in enumerate(zip(self._cdfs, self._rank_to_id)):
            ranks = np.minimum(np.searchsorted(cdf, pilot_rng.random(PILOT_ROWS), side="right"), cdf.shape[0] - 1)
            ids[:, f] = rank_to_id[ranks]
        first, interaction = self.logit_parts(ids)
        self._first_order_scale = config.first_order_std / max(float(first.std()), 1e-12)
        self._interaction_scale = config.interaction_std / max(float(interaction.std()), 1e-12) if self.pairs else 0.0
        centered = self._first_order_scale * first + self._interaction_scale * interaction
        self._center = float(centered.mean())
        self.bias = solve_bias(centered - self._center, config.positive_rate)

    # ----------------------------------------------------------------------------------------------- tokens
    def integer_tokens(self, field: str) -> List[str]:
        """The paper-binning token of every id of integer field ``field`` (index = id)."""
        size = self.vocab_sizes[field]
        return list(_SPECIAL_INT_TOKENS) + [str(k) for k in range(1, size - _FIRST_BIN_ID + 1)]

    def categorical_tokens(self, field: str) -> List[str]:
        """The raw 8-hex-digit token of every id of categorical field ``field`` (index = id)."""
        index = FIELD_NAMES.index(field)
        ids = np.arange(self.vocab_sizes[field], dtype=np.uint64)
        # Odd multiplier mod 2^32, then add and xor: a bijection of ids for each field.
        codes = (ids * np.uint64(0x9E3779B1) + np.uint64((index + 1) * 0x85EBCA77)) & np.uint64(0xFFFFFFFF)
        codes ^= np.uint64(0x5BD1E995)
        return [f"{int(c):08x}" for c in codes]

    # ----------------------------------------------------------------------------------------------- identity
    def describe(self) -> Dict[str, Any]:
        """The generator's parameters as JSON (recorded in metadata, digested into the vocabulary fingerprint)."""
        return {
            "generator": "multiembed.synthetic",
            "version": GENERATOR_VERSION,
            "config": dataclasses.asdict(self.config),
            "vocab_sizes": dict(self.vocab_sizes),
            "pairs": [[FIELD_NAMES[f], FIELD_NAMES[g]] for f, g in self.pairs],
            "bias": self.bias,
        }

    def fingerprint(self) -> str:
        """sha256 of the generator version, config and vocabulary sizes: equal fingerprints mean the same ids,
        the same tokens and the same label model."""
        identity = {
            "version": GENERATOR_VERSION,
            "config": dataclasses.asdict(self.config),
            "vocab_sizes": self.vocab_sizes,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
        return f"synthetic-v{GENERATOR_VERSION}-{digest[:32]}"
