"""The collapse regime (``multiembed synth --regime collapse``): rich and tiny fields and planted pairs built from
the paper's interaction-collapse law, and :func:`click_model`, the model of either config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from multiembed.data.synthetic.model import (
    PILOT_ROWS,
    SyntheticClickModel,
    SyntheticConfig,
    SyntheticRows,
    sigmoid,
    solve_bias,
    zipf_cdf,
)

REGIMES: Tuple[str, ...] = ("default", "collapse")
COLLAPSE_GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RegimeField:
    """One field of the collapse regime.

    Attributes:
        name: the column name.
        vocab_size: number of ids.
        role: ``rich`` (many ids, high-rank interactions with the other rich fields), ``mid`` or ``tiny`` (a handful
            of ids: a low-information field).
        zipf_exponent: exponent of the truncated Zipf distribution of its ids (0: uniform).
    """

    name: str
    vocab_size: int
    role: str
    zipf_exponent: float


@dataclasses.dataclass(frozen=True)
class PlantedPair:
    """A planted field-pair interaction ``<U[x_a], V[x_b]>`` with its own rank-``rank`` factors (not shared with the
    field's other pairs, so a field's interactions need the sum of their ranks as embedding width).

    Attributes:
        a: the first field.
        b: the second field.
        rank: the rank of the pair's factors.
        group: the logit part it belongs to (``rich``, ``tiny`` or ``mid``; each part has its own calibrated std).
    """

    a: str
    b: str
    rank: int
    group: str


_RICH = ("rich0", "rich1", "rich2", "rich3")
_TINY = ("tiny0", "tiny1", "tiny2")
# Eight fields, three orders of magnitude of cardinality (design: README, "The collapse regime"). Eight, not more:
# SE DCNv2's full-rank cross layers cost (F * d)^2 per row, which at 10x (d = 100) bounds the study's budget.
COLLAPSE_FIELDS: Tuple[RegimeField, ...] = (
    RegimeField("rich0", 2000, "rich", 0.8),
    RegimeField("rich1", 1000, "rich", 0.8),
    RegimeField("rich2", 500, "rich", 0.8),
    RegimeField("rich3", 250, "rich", 0.8),
    RegimeField("mid0", 50, "mid", 1.0),
    RegimeField("tiny0", 2, "tiny", 0.0),
    RegimeField("tiny1", 3, "tiny", 0.0),
    RegimeField("tiny2", 5, "tiny", 0.0),
)
# Every pair of rich fields at rank 6 (18 per rich field), each rich field with two tiny fields at rank 2 (4 more:
# 22 in all, more than twice one set's width of 10), and the medium field with a tiny one.
COLLAPSE_PAIRS: Tuple[PlantedPair, ...] = (
    *(PlantedPair(a, b, 6, "rich") for i, a in enumerate(_RICH) for b in _RICH[i + 1:]),
    *(PlantedPair(_RICH[k], _TINY[(k + j) % len(_TINY)], 2, "tiny") for k in range(len(_RICH)) for j in (0, 1)),
    PlantedPair("mid0", "tiny0", 2, "mid"),
)


@dataclasses.dataclass(frozen=True)
class CollapseRegimeConfig:
    """Parameters of the collapse regime's label model (its fields and pairs are :data:`COLLAPSE_FIELDS` and
    :data:`COLLAPSE_PAIRS`, fixed by design).

    Attributes:
        seed: seeds every parameter and every row.
        positive_rate: target mean of ``true_prob``.
        first_order_std: std of the first-order part of the logit over the data.
        rich_std: std of the rich x rich interactions (the high-rank part a wider embedding can capture).
        tiny_std: std of the rich x tiny interactions (explicit interaction with low-information fields: the part
            the paper's interaction-collapse law says pulls the rich fields' embeddings into a low-dimensional
            subspace).
        mid_std: std of the medium pair's interaction.
    """

    seed: int = 0
    positive_rate: float = 0.25
    first_order_std: float = 0.6
    rich_std: float = 1.0
    tiny_std: float = 1.0
    mid_std: float = 0.4

    def __post_init__(self) -> None:
        if not 0 < self.positive_rate < 1:
            raise ValueError(f"positive_rate must be in (0, 1), got {self.positive_rate}")
        for name in ("first_order_std", "rich_std", "tiny_std", "mid_std"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class CollapseRegimeModel:
    """The ``--regime collapse`` click model: 8 categorical fields, no dense features, labels from
    ``logit = bias + a * sum_f w_f[x_f] + sum_{groups} c_group * sum_{pairs p in group} s_p <U_p[x_a], V_p[x_b]>``.

    Every planted pair has its *own* factors (the default generator shares one rank-4 factor per field across its
    pairs), so a field's interactions need the sum of its pairs' ranks as embedding width: 22 for each rich field.
    Each pair term is normalised to unit std on the pilot sample, signed and weighted by ``s_p`` in +-[0.5, 1.5];
    each group is then scaled to its configured std, the first-order part likewise, and the bias solved for
    ``positive_rate`` (as the default generator does).

    Args:
        config: the label model's parameters.

    Example::

        >>> model = CollapseRegimeModel(CollapseRegimeConfig(seed=0))
        >>> model.field_ranks()["rich0"], model.field_ranks()["tiny0"]
        (22, 8)
        >>> model.sample(np.random.default_rng(1), 5).ids.shape
        (5, 8)
    """

    field_names: Tuple[str, ...] = tuple(f.name for f in COLLAPSE_FIELDS)
    dense_fields: Tuple[str, ...] = ()

    def __init__(self, config: CollapseRegimeConfig) -> None:
        self.config = config
        self.fields = COLLAPSE_FIELDS
        self.pairs = COLLAPSE_PAIRS
        self.vocab_sizes: Dict[str, int] = {f.name: f.vocab_size for f in COLLAPSE_FIELDS}
        self._index = {name: i for i, name in enumerate(self.field_names)}
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 7]))
        self._cdfs = [zipf_cdf(f.vocab_size, f.zipf_exponent) for f in COLLAPSE_FIELDS]
        self._rank_to_id = [rng.permutation(f.vocab_size).astype(np.int64) for f in COLLAPSE_FIELDS]
        self._first_order = [rng.standard_normal(f.vocab_size) for f in COLLAPSE_FIELDS]
        self._factors: List[Tuple[np.ndarray, np.ndarray]] = []
        for pair in COLLAPSE_PAIRS:
            scale = 1.0 / math.sqrt(pair.rank)
            u = rng.standard_normal((self.vocab_sizes[pair.a], pair.rank)) * scale
            v = rng.standard_normal((self.vocab_sizes[pair.b], pair.rank)) * scale
            self._factors.append((u, v))
        self._pair_weights = rng.choice([-1.0, 1.0], size=len(COLLAPSE_PAIRS)) * rng.uniform(
            0.5, 1.5, len(COLLAPSE_PAIRS)
        )
        self._pair_norm = np.ones(len(COLLAPSE_PAIRS))
        self._scales: Dict[str, float] = {"first": 1.0, "rich": 1.0, "tiny": 1.0, "mid": 1.0}
        self._center = 0.0
        self.bias = 0.0
        self._calibrate()

    def field_ranks(self) -> Dict[str, int]:
        """Per field, the sum of the ranks of its planted interactions (the embedding width they need)."""
        ranks = {name: 0 for name in self.field_names}
        for pair in self.pairs:
            ranks[pair.a] += pair.rank
            ranks[pair.b] += pair.rank
        return ranks

    def id_probabilities(self, field: str) -> np.ndarray:
        """The probability of every id of ``field`` (index = id)."""
        i = self._index[field]
        cdf = self._cdfs[i]
        probs = np.diff(np.concatenate([[0.0], cdf]))
        out = np.empty_like(probs)
        out[self._rank_to_id[i]] = probs
        return out

    def min_expected_rows_per_id(self, rows: int) -> Dict[str, float]:
        """Per field, the expected number of rows of its rarest id among ``rows`` rows."""
        return {name: float(rows * self.id_probabilities(name).min()) for name in self.field_names}

    def _draw_ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ids = np.empty((n, len(self.field_names)), dtype=np.int64)
        for f, (cdf, rank_to_id) in enumerate(zip(self._cdfs, self._rank_to_id)):
            ranks = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), cdf.shape[0] - 1)
            ids[:, f] = rank_to_id[ranks]
        return ids

    def logit_parts(self, ids: np.ndarray) -> Dict[str, np.ndarray]:
        """The calibrated parts of the logit (``first``, ``rich``, ``tiny``, ``mid``), ``[n]`` each, before centring.

        Args:
            ids: ``[n, 8]`` int64 ids in :attr:`field_names` order.
        """
        n = ids.shape[0]
        parts = {"first": np.zeros(n), "rich": np.zeros(n), "tiny": np.zeros(n), "mid": np.zeros(n)}
        for f in range(len(self.field_names)):
            parts["first"] += self._first_order[f][ids[:, f]]
        for p, (pair, (u, v)) in enumerate(zip(self.pairs, self._factors)):
            term = np.einsum("nr,nr->n", u[ids[:, self._index[pair.a]]], v[ids[:, self._index[pair.b]]])
            parts[pair.group] += self._pair_weights[p] * self._pair_norm[p] * term
        return {name: self._scales[name] * value for name, value in parts.items()}

    def _logit(self, ids: np.ndarray) -> np.ndarray:
        return self.bias + sum(self.logit_parts(ids).values()) - self._center

    def _calibrate(self) -> None:
        config = self.config
        ids = self._draw_ids(np.random.default_rng(np.random.SeedSequence([config.seed, 99])), PILOT_ROWS)
        for p, (pair, (u, v)) in enumerate(zip(self.pairs, self._factors)):
            term = np.einsum("nr,nr->n", u[ids[:, self._index[pair.a]]], v[ids[:, self._index[pair.b]]])
            self._pair_norm[p] = 1.0 / max(float(term.std()), 1e-12)
        raw = self.logit_parts(ids)
        targets = {"first": config.first_order_std, "rich": config.rich_std, "tiny": config.tiny_std,
                   "mid": config.mid_std}
        self._scales = {name: targets[name] / max(float(raw[name].std()), 1e-12) for name in raw}
        centered = sum(self.logit_parts(ids).values())
        self._center = float(centered.mean())
        self.bias = solve_bias(centered - self._center, config.positive_rate)

    def sample(self, rng: np.random.Generator, n: int) -> SyntheticRows:
        """Draws ``n`` i.i.d. rows (no dense features: ``raw_ints`` and ``dense`` have 0 columns)."""
        ids = self._draw_ids(rng, n)
        logit = self._logit(ids)
        true_prob = sigmoid(logit).astype(np.float32)
        labels = (rng.random(n) < true_prob).astype(np.int8)
        return SyntheticRows(
            ids, np.zeros((n, 0), np.int64), np.zeros((n, 0), bool), np.zeros((n, 0), np.float32), logit, true_prob,
            labels,
        )

    def describe(self) -> Dict[str, Any]:
        """The generator's parameters as JSON (recorded in metadata)."""
        return {
            "generator": "multiembed.synthetic",
            "regime": "collapse",
            "version": COLLAPSE_GENERATOR_VERSION,
            "config": dataclasses.asdict(self.config),
            "fields": [dataclasses.asdict(f) for f in self.fields],
            "pairs": [dataclasses.asdict(p) for p in self.pairs],
            "field_ranks": self.field_ranks(),
            "bias": self.bias,
        }

    def fingerprint(self) -> str:
        """sha256 of the regime's version, config, fields and pairs."""
        identity = {
            "regime": "collapse",
            "version": COLLAPSE_GENERATOR_VERSION,
            "config": dataclasses.asdict(self.config),
            "fields": [dataclasses.asdict(f) for f in self.fields],
            "pairs": [dataclasses.asdict(p) for p in self.pairs],
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
        return f"synthetic-collapse-v{COLLAPSE_GENERATOR_VERSION}-{digest[:32]}"


AnyConfig = Union[SyntheticConfig, CollapseRegimeConfig]
AnyModel = Union[SyntheticClickModel, CollapseRegimeModel]


def click_model(config: AnyConfig) -> AnyModel:
    """The click model of ``config``: the default generator or the collapse regime."""
    if isinstance(config, CollapseRegimeConfig):
        return CollapseRegimeModel(config)
    return SyntheticClickModel(config)
