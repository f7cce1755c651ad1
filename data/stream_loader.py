"""Rank-sharded batches of a stream dataset (``multiembed synth --stream``): rows drawn from their index while
training reads them (:mod:`multiembed.data.synthetic.stream`), as the same :class:`~multiembed.data.loader.WeightedBatch`
es, batch counts and resume positions as :class:`~multiembed.data.loader.ParquetBatchLoader`.

Sharding (``W`` ranks, ``B`` rows a rank per batch, ``G = W B`` rows a global batch):

* ``"drop"`` (training): global batch ``g`` of epoch ``e`` is training positions ``[(e n + g) G, (e n + g + 1) G)``
  (``n`` = :attr:`StreamBatchLoader.num_batches` = ``rows.train // G``) and rank ``r`` takes its ``r``-th ``B`` of
  them: a global batch is the same rows on any number of ranks, every epoch trains new rows, and
  ``iter_epoch(e, k)`` starts exactly at batch ``k`` (a resumed run continues with the rows it had left).
* ``"pad"`` and ``"keep"`` (evaluation): as the Parquet loader, each rank a contiguous share of the split's rows,
  ``"pad"`` filling the last batches with zero-weight copies of a real row so all ranks run the same steps.

``shuffle`` and ``seed`` are accepted for the Parquet loader's signature and change nothing: the rows are i.i.d.
draws, and every training seed trains the same rows. A background thread draws ``prefetch`` batches ahead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from multiembed.data.loader import WeightedBatch, check_loader_arguments, in_background, keyed_features
from multiembed.data.metadata import SPLITS, DatasetError, DatasetMetadata, read_metadata
from multiembed.data.synthetic.stream import StreamGenerator, StreamRows, stream_generator


class StreamBatchLoader:
    """One split of a stream dataset as :class:`WeightedBatch` es, this rank's share only (module docstring).

    Args:
        data_dir: the stream dataset's directory (its ``metadata.json``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: rows per batch on this rank.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of data-parallel ranks reading the split.
        shuffle: accepted, no effect (rows are i.i.d.).
        seed: accepted, no effect.
        last_batch: ``"drop"``, ``"pad"`` or ``"keep"``.
        use_dense: emit the dense features (``[B, 0]`` when False or when the dataset has none).
        prefetch: batches drawn ahead by a background thread (0: in the caller's thread).
        extra_data: accepted for the Parquet loader's signature; a stream takes none (ValueError).

    Attributes:
        metadata: the dataset's metadata.
        keys: KJT keys, the field names in metadata order.
        num_dense: width of ``dense_features``.
        num_batches: batches this rank yields per epoch.
        num_rows: real (weight 1) rows this rank yields per epoch.
        rows_dropped_per_epoch: 0 (under ``"drop"`` an epoch is ``num_batches`` global batches of new rows; no row
            is left out, the next epoch goes on from the next position).

    Raises:
        ValueError: bad arguments.
        DatasetError: not a stream dataset, or one this version cannot rebuild (file named).

    Example::

        >>> import tempfile
        >>> from multiembed.data.synthetic import CollapseRegimeConfig
        >>> from multiembed.data.synthetic.stream import write_stream_dataset
        >>> out = tempfile.mkdtemp()
        >>> _ = write_stream_dataset(out, 1200, CollapseRegimeConfig(seed=0), split=(10, 1, 1))
        >>> loader = StreamBatchLoader(out, "train", batch_size=128, rank=1, world_size=2)
        >>> len(loader), loader.num_rows
        (3, 384)
        >>> batch = next(loader.iter_epoch(5))
        >>> batch.dense_features.shape, batch.sparse_features.stride(), len(batch.sparse_features.keys())
        (torch.Size([128, 0]), 128, 8)
    """

    def __init__(
        self,
        data_dir: os.PathLike,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle: bool = False,
        seed: int = 0,
        last_batch: str = "drop",
        use_dense: bool = True,
        prefetch: int = 2,
        extra_data: Sequence[os.PathLike] = (),
    ) -> None:
        if extra_data:
            raise ValueError(f"{data_dir}: a stream dataset trains on its own rows only; it takes no other datasets' "
                             "train splits (extra_data)")
        check_loader_arguments(batch_size, rank, world_size, last_batch, prefetch)
        if split not in SPLITS:
            raise DatasetError(f"{data_dir}: no split {split!r} (a stream has {', '.join(SPLITS)})")
        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.last_batch = last_batch
        self.prefetch = prefetch
        self.metadata: DatasetMetadata = read_metadata(self.data_dir)
        self.generator: StreamGenerator = stream_generator(self.metadata, self.data_dir)
        self.keys: List[str] = self.metadata.field_names
        self._use_dense = use_dense and bool(self.metadata.dense_fields)
        self.num_dense = len(self.metadata.dense_fields) if self._use_dense else 0
        layout = self.generator.layout
        self._split_lo, self._split_hi = layout.index_range(split)
        total = self._split_hi - self._split_lo
        global_batch = batch_size * world_size
        if last_batch == "drop":
            self.num_batches = total // global_batch
            self._share_lo, self._share_hi = 0, 0
            self.num_rows = self.num_batches * batch_size
        else:
            base, extra = divmod(total, world_size)
            self._share_lo = rank * base + min(rank, extra)
            self._share_hi = self._share_lo + base + (1 if rank < extra else 0)
            share = self._share_hi - self._share_lo
            self.num_batches = (
                math.ceil(math.ceil(total / world_size) / batch_size) if last_batch == "pad"
                else math.ceil(share / batch_size)
            )
            self.num_rows = share
        self.rows_dropped_per_epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[WeightedBatch]:
        return self.iter_epoch(0)

    def batch_indices(self, epoch: int, batch: int) -> Tuple[int, int, int]:
        """Batch ``batch`` of ``epoch`` on this rank as stream indices ``[lo, hi)`` and the zero-weight padding rows
        that follow them (``"pad"`` only; copies of the share's first row, or of the split's first row for a rank
        with no rows of its own)."""
        if self.last_batch == "drop":
            position = ((epoch * self.num_batches + batch) * self.world_size + self.rank) * self.batch_size
            lo = self.generator.layout.training_index(position)
            return lo, lo + self.batch_size, 0
        lo = self._share_lo + batch * self.batch_size
        hi = min(lo + self.batch_size, self._share_hi)
        lo = min(lo, hi)
        pad = self.batch_size - (hi - lo) if self.last_batch == "pad" else 0
        return self._split_lo + lo, self._split_lo + hi, pad

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[WeightedBatch]:
        """Yields this rank's batches of ``epoch`` from batch ``start_batch`` on: exactly the batches
        ``start_batch, start_batch + 1, ...`` of ``iter_epoch(epoch)``.

        Raises:
            ValueError: a negative ``epoch`` or ``start_batch`` outside ``[0, num_batches]``.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")

        def produce() -> Iterator[WeightedBatch]:
            last: Dict[int, StreamRows] = {}
            for b in range(start_batch, self.num_batches):
                lo, hi, pad = self.batch_indices(epoch, b)
                rows = self.generator.rows(lo, hi, last)
                weights = np.ones(hi - lo, dtype=np.float32)
                if pad:
                    filler_index = self._split_lo + (self._share_lo if self._share_hi > self._share_lo else 0)
                    filler = self.generator.rows(filler_index, filler_index + 1)
                    rows = StreamRows(*(np.concatenate([getattr(rows, name), np.repeat(getattr(filler, name), pad, 0)])
                                        for name in ("ids", "dense", "labels", "true_prob")))
                    weights = np.concatenate([weights, np.zeros(pad, dtype=np.float32)])
                yield self._make_batch(rows, weights)

        return in_background(produce(), self.prefetch) if self.prefetch else produce()

    def _make_batch(self, rows: StreamRows, weights: np.ndarray) -> WeightedBatch:
        size = len(rows)
        values = torch.from_numpy(np.ascontiguousarray(rows.ids.T, dtype=np.int64).reshape(-1))
        lengths = torch.from_numpy(np.ones(size * len(self.keys), dtype=np.int32))
        sparse = keyed_features(self.keys, values, lengths, size, [size] * len(self.keys))
        dense = (
            torch.from_numpy(np.ascontiguousarray(rows.dense, dtype=np.float32))
            if self._use_dense
            else torch.zeros((size, 0), dtype=torch.float32)
        )
        return WeightedBatch(
            dense_features=dense,
            sparse_features=sparse,
            labels=torch.from_numpy(rows.labels.astype(np.float32)),
            weights=torch.from_numpy(np.ascontiguousarray(weights)),
        )
