"""A synthetic dataset drawn while training (``multiembed synth --stream``): rows are a function of their index, so
no Parquet is written and a training run never sees a row twice.

Every row of a stream has a global *index*; row ``i`` is row ``i mod B`` of block ``i // B`` (``B`` =
``block_rows``), and block ``k`` is ``model.sample(rng(seed, k), B)``: a pure function of the click model's seed
and the index, whatever reads it, in whatever order, on whatever number of ranks. The index space is laid out as::

    [0, V)                      validation rows (V = rows.val)
    [V, V + T)                  test rows       (T = rows.test)
    [V + T, ...)                training rows: training position p is index V + T + p

Training positions grow without end: epoch ``e`` of a loader with ``n`` global batches of ``G`` rows trains
positions ``[e n G, (e + 1) n G)`` (``rows.train`` is the rows of one epoch, rounded down to whole global batches),
so every epoch draws new rows and no training position ever reaches a validation or test index. The training seed
plays no part: every run of a study trains on the same rows, as runs on a Parquet split do (there the seed orders
the rows; here rows are i.i.d., so order carries nothing).

``metadata.json`` records ``"source": "stream"`` and a ``stream`` object: the generator (regime and config, which
:func:`stream_model` rebuilds and checks against the vocabulary fingerprint), ``block_rows``, the rows of every split,
and the positive rate of the first training rows; ``bayes`` holds the Bayes-optimal AUC and log loss of the
validation and test rows, as for a Parquet synthetic dataset.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from multiembed.data.metadata import (
    METADATA_FILE,
    SPLITS,
    STREAM_SOURCE,
    DatasetError,
    DatasetMetadata,
    FieldSpec,
    write_metadata,
)
from multiembed.data.metrics import log_loss, roc_auc
from multiembed.data.synthetic.model import SyntheticConfig, SyntheticRows
from multiembed.data.synthetic.regime import AnyConfig, AnyModel, CollapseRegimeConfig, click_model
from multiembed.data.synthetic.write import split_counts
from multiembed.runtime.locking import exclusive_lock

STREAM_VERSION = 1
BLOCK_ROWS = 4096
# Training rows whose labels give the recorded positive rate (the logit's prior bias, --output-bias prior).
POSITIVE_RATE_ROWS = 1 << 20
# Marks the block streams of a stream dataset (the Parquet writer's splits use 1-3, a day's rows 1000).
_STREAM_TAG = 2000
# Validation and test blocks kept in memory per process (each evaluation reads them again): 1M rows at most.
_EVAL_BLOCKS_KEPT = 256


@dataclasses.dataclass(frozen=True)
class StreamRows:
    """Consecutive rows of a stream.

    Attributes:
        ids: ``[n, F]`` int64, one column per field in metadata order.
        dense: ``[n, num_dense]`` float32 (``[n, 0]`` for the collapse regime).
        labels: ``[n]`` int8, 0 or 1.
        true_prob: ``[n]`` float32, the probability each label was drawn from.
    """

    ids: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    true_prob: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _rows_of(sample: SyntheticRows) -> StreamRows:
    return StreamRows(sample.ids, sample.dense, sample.labels, sample.true_prob)


def _concat(parts: Sequence[StreamRows]) -> StreamRows:
    if len(parts) == 1:
        return parts[0]
    return StreamRows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(StreamRows)))


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """Where each split lies in a stream's index space (module docstring).

    Attributes:
        rows: rows per split (``train``: the rows of one epoch).
        block_rows: rows per generated block.

    Example::

        >>> layout = StreamLayout({"train": 1000, "val": 100, "test": 50}, block_rows=64)
        >>> layout.index_range("val"), layout.index_range("test"), layout.training_index(0)
        ((0, 100), (100, 150), 150)
    """

    rows: Mapping[str, int]
    block_rows: int = BLOCK_ROWS

    def __post_init__(self) -> None:
        if set(self.rows) != set(SPLITS) or any(int(self.rows[s]) < 0 for s in SPLITS):
            raise ValueError(f"rows: expected a non-negative count for each of {SPLITS}, got {dict(self.rows)}")
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows}")

    @property
    def train_start(self) -> int:
        """The index of training position 0 (after every validation and test row)."""
        return int(self.rows["val"]) + int(self.rows["test"])

    def index_range(self, split: str) -> Tuple[int, int]:
        """``[lo, hi)`` of ``split``'s rows in the index space (``train``: the first epoch's positions)."""
        if split == "val":
            return 0, int(self.rows["val"])
        if split == "test":
            return int(self.rows["val"]), self.train_start
        if split == "train":
            return self.train_start, self.train_start + int(self.rows["train"])
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def training_index(self, position: int) -> int:
        """The index of training position ``position`` (>= 0; any epoch)."""
        if position < 0:
            raise ValueError(f"a training position is >= 0, got {position}")
        return self.train_start + position


class StreamGenerator:
    """Draws the rows of a stream from their indices (module docstring): deterministic in the click model's seed.

    Thread-safe: the click model is read-only and the cache of validation and test blocks has a lock.

    Args:
        model: the click model (its ``config.seed`` seeds every block).
        layout: the index space.

    Example::

        >>> gen = StreamGenerator(click_model(CollapseRegimeConfig(seed=0)),
        ...                       StreamLayout({"train": 1000, "val": 100, "test": 100}, block_rows=64))
        >>> rows = gen.rows(90, 130)
        >>> rows.ids.shape, bool((gen.rows(100, 130).ids == rows.ids[10:]).all())
        ((40, 8), True)
    """

    def __init__(self, model: AnyModel, layout: StreamLayout) -> None:
        self.model = model
        self.layout = layout
        self.seed = int(model.config.seed)
        self._kept: "collections.OrderedDict[int, StreamRows]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def block(self, k: int) -> StreamRows:
        """Rows ``[k B, (k + 1) B)``."""
        if k < 0:
            raise ValueError(f"block index must be >= 0, got {k}")
        keep = (k + 1) * self.layout.block_rows <= self.layout.train_start
        if keep:
            with self._lock:
                if k in self._kept:
                    self._kept.move_to_end(k)
                    return self._kept[k]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _STREAM_TAG, k]))
        rows = _rows_of(self.model.sample(rng, self.layout.block_rows))
        if keep:
            with self._lock:
                self._kept[k] = rows
                while len(self._kept) > _EVAL_BLOCKS_KEPT:
                    self._kept.popitem(last=False)
        return rows

    def rows(self, lo: int, hi: int, last: Optional[Dict[int, StreamRows]] = None) -> StreamRows:
        """Rows of indices ``[lo, hi)``.

        Args:
            lo: first index (>= 0).
            hi: end index (>= ``lo``).
            last: a caller's one-entry cache of the last block it drew (a reader going forward draws each block once).
        """
        if not 0 <= lo <= hi:
            raise ValueError(f"expected 0 <= lo <= hi, got [{lo}, {hi})")
        size = self.layout.block_rows
        parts = []
        blocks = range(lo // size, (hi - 1) // size + 1) if hi > lo else range(0)
        for k in blocks:
            if last is not None and k in last:
                block = last[k]
            else:
                block = self.block(k)
                if last is not None:
                    last.clear()
                    last[k] = block
            start, stop = max(lo - k * size, 0), min(hi - k * size, size)
            parts.append(StreamRows(block.ids[start:stop], block.dense[start:stop], block.labels[start:stop],
                                    block.true_prob[start:stop]))
        if not parts:
            empty = self.block(0)
            return StreamRows(empty.ids[:0], empty.dense[:0], empty.labels[:0], empty.true_prob[:0])
        return _concat(parts)

    def split(self, name: str) -> StreamRows:
        """Every row of split ``name`` (``train``: the first epoch's)."""
        return self.rows(*self.layout.index_range(name))


def _config_record(config: AnyConfig) -> Dict[str, Any]:
    regime = "collapse" if isinstance(config, CollapseRegimeConfig) else "default"
    return {"regime": regime, "config": dataclasses.asdict(config)}


def _config_of(record: Mapping[str, Any], where: str) -> AnyConfig:
    try:
        kind = CollapseRegimeConfig if record["regime"] == "collapse" else SyntheticConfig
        if record["regime"] not in ("collapse", "default"):
            raise ValueError(f"unknown regime {record['regime']!r}")
        return kind(**record["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{where}: stream: not a generator this version can rebuild ({e})") from None


@functools.lru_cache(maxsize=4)
def _cached_generator(record_json: str, fingerprint: str, where: str) -> StreamGenerator:
    record = json.loads(record_json)
    model = click_model(_config_of(record, where))
    if model.fingerprint() != fingerprint:
        raise DatasetError(
            f"{where}: vocab_fingerprint {fingerprint} is not the one this version's generator gives "
            f"({model.fingerprint()}); write the stream again with this version's multiembed synth --stream"
        )
    version = record.get("version")
    if version != STREAM_VERSION:
        raise DatasetError(f"{where}: stream.version: expected {STREAM_VERSION}, got {version!r}")
    try:
        layout = StreamLayout({s: int(record["rows"][s]) for s in SPLITS}, block_rows=int(record["block_rows"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{where}: stream: malformed ({e})") from None
    return StreamGenerator(model, layout)


def stream_generator(meta: DatasetMetadata, data_dir: os.PathLike = ".") -> StreamGenerator:
    """The generator of a stream dataset's metadata (built once per process and metadata).

    Raises:
        DatasetError: not a stream dataset, or a generator this version cannot rebuild exactly (naming the file).
    """
    where = str(Path(data_dir) / METADATA_FILE)
    if meta.stream is None:
        raise DatasetError(f"{where}: source: not a stream dataset (its rows are in Parquet files)")
    record = json.dumps(meta.stream, sort_keys=True)
    return _cached_generator(record, meta.vocab_fingerprint, where)


def _bayes(rows: StreamRows) -> Dict[str, Optional[float]]:
    y, p = rows.labels, rows.true_prob
    both = 0 < int(y.sum()) < y.shape[0]
    return {"auc": roc_auc(y, p) if both else None, "logloss": log_loss(y, p), "positive_rate": float(y.mean())}


def write_stream_dataset(
    out_dir: os.PathLike,
    rows: int,
    config: AnyConfig = CollapseRegimeConfig(),
    split: Sequence[float] = (8, 1, 1),
    force: bool = False,
    block_rows: int = BLOCK_ROWS,
) -> DatasetMetadata:
    """Writes a stream dataset's ``metadata.json`` (no Parquet): ``rows`` split by ``split`` into the rows of one
    training epoch, the validation rows and the test rows.

    The validation and test rows are drawn once here for their Bayes-optimal metrics, and the first
    :data:`POSITIVE_RATE_ROWS` training rows (at most an epoch) for the positive rate.

    Args:
        out_dir: the dataset directory (created).
        rows: rows over the three splits (train's share: one epoch; every epoch draws new rows).
        config: the click model's parameters.
        split: train, val, test weights.
        force: replace a dataset already in ``out_dir`` (metadata only: a stream dataset writes no other file).
        block_rows: rows per generated block.

    Returns:
        The metadata written.

    Raises:
        DatasetError: ``out_dir`` holds a dataset and ``force`` is False.
        ValueError: bad ``rows``, ``split`` or ``block_rows``, or a split without rows.

    Example::

        >>> import tempfile
        >>> meta = write_stream_dataset(tempfile.mkdtemp(), 1200, CollapseRegimeConfig(seed=0), split=(10, 1, 1))
        >>> meta.source, meta.split_rows()
        ('stream', {'train': 1000, 'val': 100, 'test': 100})
    """
    if rows < 1:
        raise ValueError(f"--rows must be >= 1, got {rows}")
    counts = split_counts(rows, split)
    empty = [name for name in SPLITS if counts[name] == 0]
    if empty:
        raise ValueError(f"--stream: --rows {rows} and --split {','.join(str(w) for w in split)} give no "
                         f"{', '.join(empty)} rows; a stream needs train, val and test rows")
    layout = StreamLayout(counts, block_rows=block_rows)
    model = click_model(config)
    generator = StreamGenerator(model, layout)
    out = Path(out_dir)
    if (out / METADATA_FILE).exists() and not force:
        raise DatasetError(f"{out / METADATA_FILE}: a dataset already exists here (use --force to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "synth"):
        if (out / METADATA_FILE).exists() and not force:
            raise DatasetError(f"{out / METADATA_FILE}: a dataset already exists here (use --force to replace it)")
        bayes = {name: _bayes(generator.split(name)) for name in ("val", "test")}
        start = layout.training_index(0)
        first = generator.rows(start, start + min(POSITIVE_RATE_ROWS, counts["train"]))
        stream = {
            "version": STREAM_VERSION,
            **_config_record(config),
            "block_rows": block_rows,
            "rows": dict(counts),
            "train_positive_rate": {"rate": float(first.labels.mean()), "rows": len(first)},
        }
        meta = DatasetMetadata(
            dataset="synthetic",
            fields=[FieldSpec(name=name, vocab_size=model.vocab_sizes[name]) for name in model.field_names],
            dense_fields=list(model.dense_fields),
            splits={},
            vocab_fingerprint=model.fingerprint(),
            rows_read=0,
            options={"mode": "synthetic", "stream": True, "rows": rows, "split": list(split),
                     **dataclasses.asdict(config),
                     **({"regime": "collapse"} if isinstance(config, CollapseRegimeConfig) else {})},
            bayes=bayes,
            # What puts a row in a split: the validation and test rows and the block size (the epoch's length does
            # not: streams differing only in it hold the same rows in the same splits, so they share this identity).
            split_recipe={
                "producer": "synthetic-stream",
                "rules": f"synthetic-stream-v{STREAM_VERSION}",
                "held_out_rows": {"val": counts["val"], "test": counts["test"]},
                "block_rows": block_rows,
                "seed": config.seed,
                "config": dataclasses.asdict(config),
                "model": model.fingerprint(),
            },
            stream=stream,
            extra={"generator": model.describe()},
        )
        write_metadata(out, meta)
    return meta


def stream_positive_rate(meta: DatasetMetadata) -> Tuple[float, int]:
    """The positive rate a stream dataset recorded for its first training rows, and how many rows it counted."""
    if meta.stream is None:
        raise DatasetError("stream_positive_rate: not a stream dataset")
    record = meta.stream["train_positive_rate"]
    return float(record["rate"]), int(record["rows"])


__all__ = [
    "BLOCK_ROWS",
    "STREAM_SOURCE",
    "STREAM_VERSION",
    "StreamGenerator",
    "StreamLayout",
    "StreamRows",
    "stream_generator",
    "stream_positive_rate",
    "write_stream_dataset",
]
