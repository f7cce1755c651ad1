"""Rank-sharded reader of a converted dataset's Parquet files, yielding TorchRec batches.

Each rank of a data-parallel job builds one :class:`ParquetBatchLoader` for the same split with its own ``rank``;
together the ranks read the split once, each a disjoint share:

* the split's rows are put in one global order: a permutation drawn from ``(seed, epoch)`` when ``shuffle``, the
  file order otherwise;
* under ``"drop"`` (training) global batch ``g`` is rows ``[g W B, (g + 1) W B)`` of that order and rank ``r`` takes
  its ``B`` rows of each, so a global batch holds the same rows on any number of ranks (a run resumed on another
  world size continues with exactly the rows it had left); under ``"pad"`` and ``"keep"`` (evaluation) rank ``r``
  takes a contiguous share of the order and cuts it into batches.

Last-batch policies (the split holds ``N`` rows, ``W`` ranks, batch size ``B``):

* ``"drop"`` (training): every rank yields ``N // (W * B)`` full batches; the ``N mod (W * B)`` rows at the end of
  the order are left out of that epoch (different rows each epoch when shuffling). The count is
  :attr:`ParquetBatchLoader.rows_dropped_per_epoch` and is logged at construction: never a silent drop.
* ``"pad"`` (evaluation): the split is cut into ``W`` contiguous shares as even as possible (sizes differ by at
  most one) and every rank yields ``ceil(ceil(N / W) / B)`` full batches; the rows a rank lacks are copies of one
  of its real rows with weight 0. Every row of the split is yielded exactly once with weight 1 across all ranks,
  and all ranks run the same number of steps, so collectives never hang. Weight the per-row metrics and losses by
  :attr:`WeightedBatch.weights`.
* ``"keep"`` (single process): like ``"pad"`` without padding: the last batch is smaller. With ``W > 1`` the ranks'
  batch counts may differ by one: only for ranks that run no collectives.

Memory: the loader holds its rows in memory as numpy arrays, read once at construction (row group by row group,
so the transient cost is one row group): without ``shuffle`` only this rank's share, with ``shuffle`` the whole
split (every epoch draws a new global permutation, so any row may come to any rank). The bound is, per row held,
4 bytes per one-hot field (8 if a vocabulary exceeds 2^31 ids), 4 per dense feature, 4 for the label, and for a
multi-hot field 8 per id plus 8; Criteo-shaped data (39 one-hot fields, 13 dense): 212 bytes a row, 170 MB for
the default synthetic train split of 800k rows, 7.8 GB for Criteo Kaggle's 36.7M training rows. Per epoch the
loader also keeps the rank's row order (8 bytes a row; 8 bytes per split row when shuffling).

Several datasets as one split: ``extra_data`` names datasets of the same id space whose ``split`` follows the first
dataset's, as if their files were listed after its own (row ``n`` of the combined split is row ``n`` of the first
dataset, then of the next, ...); shuffling draws one permutation over all of them. Nothing is copied or converted
again: retraining on several days of a log (:mod:`multiembed.analysis.days_study`) reads the days' own files.

Checks when opening (:class:`~multiembed.data.metadata.DatasetError`, naming file, row and field): missing
metadata or Parquet files, Parquet schemas or row counts that disagree with ``metadata.json``, missing values,
labels other than 0/1, ids outside ``[0, vocab_size)``. Rows are 1-based positions within their Parquet file.

Speed: batches are gathered with vectorised numpy (row-major storage: a batch gathers B contiguous rows, then one
transpose builds the key-major KJT values), no per-row Python. A background thread builds ``prefetch`` batches
ahead. ``benchmarks/bench_loader.py`` measures it.
"""

from __future__ import annotations

import multiembed.runtime.stack_check  # noqa: F401  (checks the TorchRec stack before any torchrec import)

import dataclasses
import itertools
import logging
import math
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, TypeVar

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.data.metadata import (
    DENSE_PREFIX,
    LABEL_COLUMN,
    DatasetError,
    DatasetMetadata,
    read_metadata,
)
from multiembed.data.parquet_io import check_dataset_files

LAST_BATCH_POLICIES = ("drop", "pad", "keep")


def check_loader_arguments(batch_size: int, rank: int, world_size: int, last_batch: str, prefetch: int) -> None:
    """The argument checks every split loader (Parquet or stream) makes at construction.

    Raises:
        ValueError: ``batch_size < 1``, ``rank`` outside ``[0, world_size)``, an unknown ``last_batch`` policy or a
            negative ``prefetch``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
    if last_batch not in LAST_BATCH_POLICIES:
        raise ValueError(f"last_batch must be one of {LAST_BATCH_POLICIES}, got {last_batch!r}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")


_INT32_MAX = np.iinfo(np.int32).max
_log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass
class WeightedBatch(Batch):
    """A TorchRec :class:`~torchrec.datasets.utils.Batch` with a weight per row.

    Attributes:
        dense_features: ``[B, num_dense]`` float32 (``[B, 0]`` when the loader uses no dense features).
        sparse_features: KJT with one key per field in metadata order, ``stride`` B, int64 values, int32 lengths.
        labels: ``[B]`` float32, 0 or 1.
        weights: ``[B]`` float32, 1 for a real row and 0 for a padding row (``last_batch="pad"``).

    Example::

        >>> batch = WeightedBatch(
        ...     dense_features=torch.zeros(2, 0),
        ...     sparse_features=KeyedJaggedTensor.from_lengths_sync(["C1"], torch.tensor([3, 1]), torch.tensor([1, 1])),
        ...     labels=torch.tensor([0.0, 1.0]),
        ...     weights=torch.tensor([1.0, 0.0]),
        ... )
        >>> batch.to(torch.device("cpu")).weights.tolist()
        [1.0, 0.0]
    """

    weights: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "WeightedBatch":
        return WeightedBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> "WeightedBatch":
        return WeightedBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
        )


@dataclasses.dataclass
class _RowStore:
    """Rows ``[first_row, first_row + n)`` of a split, in memory.

    Attributes:
        labels: ``[n]`` float32.
        dense: ``[n, num_dense]`` float32 (``[n, 0]`` without dense features).
        one_hot: ``[n, num_one_hot]`` int32 or int64, row-major: a batch gathers whole rows.
        multi_hot: per multi-hot field, ``(offsets [n + 1] int64, values int64)``.
    """

    first_row: int
    labels: np.ndarray
    dense: np.ndarray
    one_hot: np.ndarray
    multi_hot: Dict[str, Tuple[np.ndarray, np.ndarray]]


def _first_bad(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _column_numpy(table: pa.Table, name: str, path: Path, row_base: int) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        row = _first_bad(np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False)))
        raise DatasetError(f"{path}: row {row_base + row + 1}: field {name}: missing value")
    return column.to_numpy()


def _labels(table: pa.Table, path: Path, row_base: int) -> np.ndarray:
    """The label column of a slice (``row_base``: 0-based row in file), each checked to be 0 or 1."""
    label = _column_numpy(table, LABEL_COLUMN, path, row_base)
    bad = (label != 0) & (label != 1)
    if bad.any():
        row = _first_bad(bad)
        raise DatasetError(f"{path}: row {row_base + row + 1}: field {LABEL_COLUMN}: {label[row]} is not 0 or 1")
    return label


# Rows read by :func:`positive_rate` at most: enough for the rate to +-0.0003 (2 sd at a 25 % rate), 10 MB of labels.
POSITIVE_RATE_ROWS = 10_000_000


def positive_rate(data_dir: os.PathLike, meta: DatasetMetadata, split: str = "train",
                  max_rows: int = POSITIVE_RATE_ROWS) -> Tuple[float, int]:
    """The fraction of label 1 over the first ``max_rows`` rows of ``split`` (its files in order), and the rows read.

    Reads only the label column, checked as the loader checks it. On a split larger than ``max_rows`` it is the rate
    of its first rows: Criteo's files are in time order, so this is the rate of the earliest rows.

    Raises:
        DatasetError: the split is missing or empty, a file is unreadable, or a label is missing or not 0 or 1
            (naming the file and row).

    Example::

        >>> import tempfile
        >>> from multiembed.data.synthetic import generate_dataset
        >>> with tempfile.TemporaryDirectory() as d:
        ...     meta = generate_dataset(d, rows=2000, progress=False)
        ...     rate, rows = positive_rate(d, meta)
        >>> rows, 0.0 < rate < 1.0
        (1600, True)
    """
    if meta.stream is not None:
        raise DatasetError(f"{data_dir}: a stream dataset (rows drawn while training, no Parquet files); "
                           "multiembed.data.sources.split_positive_rate reads its recorded rate")
    files = meta.splits.get(split)
    if files is None or files.rows == 0:
        raise DatasetError(f"{data_dir}: split {split!r} has no rows (metadata.json)")
    positives = rows = 0
    for rel in files.files:
        path = Path(data_dir) / rel
        file_row = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 20, columns=[LABEL_COLUMN]):
                labels = _labels(pa.Table.from_batches([batch]).slice(0, max_rows - rows), path, file_row)
                positives += int(labels.sum(dtype=np.int64))
                rows += len(labels)
                file_row += batch.num_rows
                if rows >= max_rows:
                    return positives / rows, rows
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
    return positives / rows, rows


def _check_ids(ids: np.ndarray, vocab_size: int, path: Path, field: str, rows_of_ids: Callable[[int], int]) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        position = _first_bad(bad)
        raise DatasetError(
            f"{path}: row {rows_of_ids(position)}: field {field}: id {int(ids[position])} outside "
            f"[0, {vocab_size}) (vocab_size from metadata.json)"
        )


def _read_rows(data_dir: Path, meta: DatasetMetadata, split: str, lo: int, hi: int, use_dense: bool) -> _RowStore:
    """Reads and validates rows ``[lo, hi)`` of ``split`` (row groups outside the range are not read)."""
    n = hi - lo
    one_hot_fields = [f for f in meta.fields if not f.multi_hot]
    multi_hot_fields = [f for f in meta.fields if f.multi_hot]
    dense_names = list(meta.dense_fields) if use_dense else []
    id_dtype = np.int32 if all(f.vocab_size - 1 <= _INT32_MAX for f in one_hot_fields) else np.int64
    labels = np.empty(n, dtype=np.float32)
    dense = np.empty((n, len(dense_names)), dtype=np.float32)
    one_hot = np.empty((n, len(one_hot_fields)), dtype=id_dtype)
    multi_lengths: Dict[str, List[np.ndarray]] = {f.name: [] for f in multi_hot_fields}
    multi_values: Dict[str, List[np.ndarray]] = {f.name: [] for f in multi_hot_fields}
    columns = [LABEL_COLUMN] + [f.name for f in meta.fields] + [DENSE_PREFIX + d for d in dense_names]

    files = meta.splits[split]
    file_start = 0
    for rel, file_rows in zip(files.files, files.file_rows):
        file_lo, file_hi = max(lo - file_start, 0), min(hi - file_start, file_rows)
        if file_lo < file_hi:
            path = data_dir / rel
            parquet = pq.ParquetFile(path)
            group_start = 0
            for group in range(parquet.num_row_groups):
                group_rows = parquet.metadata.row_group(group).num_rows
                take_lo, take_hi = max(file_lo, group_start), min(file_hi, group_start + group_rows)
                if take_lo < take_hi:
                    table = parquet.read_row_group(group, columns=columns)
                    table = table.slice(take_lo - group_start, take_hi - take_lo)
                    out = slice(file_start + take_lo - lo, file_start + take_hi - lo)
                    _fill(table, path, take_lo, meta, one_hot_fields, multi_hot_fields, dense_names,
                          labels[out], dense[out], one_hot[out], multi_lengths, multi_values)
                group_start += group_rows
        file_start += file_rows

    multi_hot: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for field in multi_hot_fields:
        lengths = np.concatenate(multi_lengths[field.name]) if multi_lengths[field.name] else np.zeros(0, np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(multi_values[field.name]) if multi_values[field.name] else np.zeros(0, np.int64)
        multi_hot[field.name] = (offsets, values.astype(np.int64, copy=False))
    return _RowStore(first_row=lo, labels=labels, dense=dense, one_hot=one_hot, multi_hot=multi_hot)


def _concat_stores(parts: Sequence[_RowStore], first_row: int) -> _RowStore:
    """Rows of several stores, one after the other, as one store starting at ``first_row``."""
    if len(parts) == 1:
        return dataclasses.replace(parts[0], first_row=first_row)
    multi_hot: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for name in parts[0].multi_hot:
        offsets, values, shift = [np.zeros(1, dtype=np.int64)], [], 0
        for part in parts:
            part_offsets, part_values = part.multi_hot[name]
            offsets.append(part_offsets[1:] + shift)
            values.append(part_values)
            shift += int(part_offsets[-1])
        multi_hot[name] = (np.concatenate(offsets), np.concatenate(values))
    return _RowStore(
        first_row=first_row,
        labels=np.concatenate([p.labels for p in parts]),
        dense=np.concatenate([p.dense for p in parts]),
        one_hot=np.concatenate([p.one_hot for p in parts]),
        multi_hot=multi_hot,
    )


def _read_sources(
    sources: Sequence[Tuple[Path, DatasetMetadata]], split: str, lo: int, hi: int, use_dense: bool
) -> _RowStore:
    """Rows ``[lo, hi)`` of the split the sources form one after the other (:func:`_read_rows` on each share)."""
    parts: List[_RowStore] = []
    start = 0
    for data_dir, meta in sources:
        rows = meta.splits[split].rows
        take_lo, take_hi = max(lo - start, 0), min(hi - start, rows)
        if take_lo < take_hi:
            parts.append(_read_rows(data_dir, meta, split, take_lo, take_hi, use_dense))
        start += rows
    if not parts:  # an empty range: the arrays' shapes and types still come from the first source
        parts.append(_read_rows(sources[0][0], sources[0][1], split, 0, 0, use_dense))
    return _concat_stores(parts, lo)


def _same_layout(data_dir: Path, meta: DatasetMetadata, first_dir: Path, first: DatasetMetadata, split: str) -> None:
    """Refuses a dataset whose rows cannot join ``first``'s in one split (one line naming its metadata.json)."""
    where = data_dir / "metadata.json"
    if meta.vocab_fingerprint != first.vocab_fingerprint:
        raise DatasetError(
            f"{where}: vocab_fingerprint: another id space than {first_dir}; datasets read as one split share "
            "their vocabulary (the days of one log)"
        )
    if meta.fields != first.fields or list(meta.dense_fields) != list(first.dense_fields):
        raise DatasetError(f"{where}: fields: another schema than {first_dir}; datasets read as one split share it")
    if meta.splits.get(split) is None:
        raise DatasetError(
            f"{where}: splits: no split {split!r} (has {', '.join(meta.splits) or 'none'})"
        )


def _fill(table, path, row_base, meta, one_hot_fields, multi_hot_fields, dense_names,
          labels_out, dense_out, one_hot_out, multi_lengths, multi_values) -> None:
    """Validates one row-group slice and copies it into the output arrays (``row_base``: 0-based row in file)."""
    labels_out[:] = _labels(table, path, row_base)
    for i, name in enumerate(dense_names):
        dense_out[:, i] = _column_numpy(table, DENSE_PREFIX + name, path, row_base)
    for i, field in enumerate(one_hot_fields):
        ids = _column_numpy(table, field.name, path, row_base)
        _check_ids(ids, field.vocab_size, path, field.name, lambda p: row_base + p + 1)
        one_hot_out[:, i] = ids
    for field in multi_hot_fields:
        column = table.column(field.name).combine_chunks()
        if column.null_count:
            row = _first_bad(np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False)))
            raise DatasetError(f"{path}: row {row_base + row + 1}: field {field.name}: missing value")
        lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
        ends = np.cumsum(lengths)

        def row_of_value(position: int) -> int:
            return row_base + int(np.searchsorted(ends, position, side="right")) + 1

        flat = pc.list_flatten(column)
        if flat.null_count:
            position = _first_bad(np.asarray(pc.is_null(flat).to_numpy(zero_copy_only=False)))
            raise DatasetError(f"{path}: row {row_of_value(position)}: field {field.name}: missing id inside the list")
        values = flat.to_numpy()
        _check_ids(values, field.vocab_size, path, field.name, row_of_value)
        multi_lengths[field.name].append(lengths)
        multi_values[field.name].append(values)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def in_background(produce: Iterator[T], depth: int) -> Iterator[T]:
    """Runs ``produce`` in a thread, ``depth`` items ahead of the consumer.

    A thread (not a process): batch building is numpy work on arrays this process already holds, and a
    ``torch.utils.data.DataLoader`` worker would copy them and pickle every batch. Leaving the loop early stops the
    thread; an exception in the thread is raised in the consumer.
    """
    items: "queue.Queue[object]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in produce:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(error))

    thread = threading.Thread(target=work, name="multiembed-loader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


def keyed_features(
    keys: List[str], values: torch.Tensor, lengths: torch.Tensor, size: int, length_per_key: List[int]
) -> KeyedJaggedTensor:
    """A KJT of ``size`` rows whose ids per key are counted already: its per-key offsets follow from the counts,
    so nothing is synchronised from the lengths tensor (as ``KeyedJaggedTensor.from_lengths_sync`` would).

    Args:
        keys: the keys, in order.
        values: int64 ``[sum(length_per_key)]``, key-major.
        lengths: int32 ``[len(keys) * size]``, key-major.
        size: rows (the KJT's stride).
        length_per_key: ids per key.
    """
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=lengths,
        stride=size,
        length_per_key=length_per_key,
        offset_per_key=list(itertools.accumulate(length_per_key, initial=0)),
    )


class ParquetBatchLoader:
    """Reads one split of a converted dataset as :class:`WeightedBatch` es, this rank's share only.

    See the module docstring for the sharding, the last-batch policies and the memory bound.

    Args:
        data_dir: the dataset directory (``metadata.json`` + Parquet files).
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: rows per batch on this rank.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of data-parallel ranks reading the split.
        shuffle: draw a new global row permutation each epoch from ``(seed, epoch)``.
        seed: shuffling seed.
        last_batch: ``"drop"``, ``"pad"`` or ``"keep"``.
        use_dense: emit the dense features (``[B, 0]`` when False or when the dataset has none).
        prefetch: batches built ahead by a background thread (0: build in the caller's thread).
        extra_data: datasets of the same id space and schema whose ``split`` follows ``data_dir``'s, read with it as
            one split (see the module docstring).

    Attributes:
        metadata: the (first) dataset's metadata.
        keys: KJT keys, the field names in metadata order.
        num_dense: width of ``dense_features``.
        num_batches: batches this rank yields per epoch (the same on every rank for ``"drop"`` and ``"pad"``).
        num_rows: real (weight 1) rows this rank yields per epoch.
        rows_dropped_per_epoch: rows of the split left out of every epoch under ``"drop"`` (0 otherwise).

    Raises:
        ValueError: bad arguments.
        DatasetError: the dataset is missing, inconsistent or holds bad values (file, row and field named), or an
            ``extra_data`` dataset of another id space or schema.

    Example::

        >>> import tempfile
        >>> from multiembed.data.synthetic import SyntheticConfig, generate_dataset
        >>> out = tempfile.mkdtemp()
        >>> _ = generate_dataset(out, 1000, SyntheticConfig(seed=0), progress=False)
        >>> loader = ParquetBatchLoader(out, "train", batch_size=256, rank=0, world_size=2, last_batch="pad")
        >>> len(loader), loader.num_rows
        (2, 400)
        >>> batch = next(iter(loader))
        >>> batch.dense_features.shape, batch.sparse_features.stride(), len(batch.sparse_features.keys())
        (torch.Size([256, 13]), 256, 39)
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
        check_loader_arguments(batch_size, rank, world_size, last_batch, prefetch)
        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.last_batch = last_batch
        self.prefetch = prefetch

        self.metadata = read_metadata(self.data_dir)
        if self.metadata.stream is not None:
            raise DatasetError(
                f"{self.data_dir / 'metadata.json'}: source: a stream dataset (rows drawn while training, no Parquet "
                "files to read); train, evaluate and scale read it, commands that read Parquet files need "
                "multiembed synth without --stream"
            )
        if split not in self.metadata.splits:
            raise DatasetError(
                f"{self.data_dir / 'metadata.json'}: splits: no split {split!r} "
                f"(has {', '.join(self.metadata.splits) or 'none'})"
            )
        self._sources: List[Tuple[Path, DatasetMetadata]] = [(self.data_dir, self.metadata)]
        for extra in extra_data:
            meta = read_metadata(extra)
            _same_layout(Path(extra), meta, self.data_dir, self.metadata, split)
            self._sources.append((Path(extra), meta))
        for source_dir, source_meta in self._sources:
            try:
                check_dataset_files(source_dir, source_meta)
            except DatasetError as footer_error:
                self._raise_with_row(footer_error, source_dir, source_meta)
        self.keys: List[str] = self.metadata.field_names
        self._use_dense = use_dense and bool(self.metadata.dense_fields)
        self.num_dense = len(self.metadata.dense_fields) if self._use_dense else 0
        self._one_hot_fields = [f.name for f in self.metadata.fields if not f.multi_hot]
        self._all_one_hot = len(self._one_hot_fields) == len(self.keys)

        total = sum(meta.splits[split].rows for _, meta in self._sources)
        self._total_rows = total
        self._share_lo, self._share_hi, self.num_batches = self._plan(total)
        self.num_rows = (
            self.num_batches * batch_size if last_batch == "drop" else self._share_hi - self._share_lo
        )
        self.rows_dropped_per_epoch = total - world_size * self.num_rows if last_batch == "drop" else 0
        if self.rows_dropped_per_epoch and rank == 0:
            _log.warning(
                "%s split %r: last_batch='drop' leaves %d of %d rows out of every epoch (%d ranks x %d batches x %d)",
                self.data_dir, split, self.rows_dropped_per_epoch, total, world_size, self.num_batches, batch_size,
            )

        if shuffle or last_batch == "drop":
            # Any row may come to any rank: a new permutation every epoch, or (unshuffled "drop") every global batch
            # spread over all ranks.
            load_lo, load_hi = 0, total
        elif self.num_rows > 0:
            load_lo, load_hi = self._share_lo, self._share_hi
        else:
            # A rank with no rows of its own under "pad" still needs one real row to copy as padding.
            load_lo, load_hi = 0, min(total, 1 if self.num_batches else 0)
        self._store = _read_sources(self._sources, split, load_lo, load_hi, self._use_dense)

    def _raise_with_row(self, footer_error: DatasetError, data_dir: Path, meta: DatasetMetadata) -> None:
        """Re-raises a footer-check error, naming the first bad row when reading this split can locate it.

        The footer check (column statistics) names the file and column of an out-of-range id but not its row;
        reading the split's rows with the row-level checks of :func:`_read_rows` does. Only on this error path.
        """
        try:
            total = meta.splits[self.split].rows
            _read_rows(data_dir, meta, self.split, 0, total, use_dense=False)
        except DatasetError as located:
            raise located from None
        except Exception:  # noqa: BLE001 - unreadable in another way: the footer check's message says how
            pass
        raise footer_error

    def _plan(self, total: int) -> Tuple[int, int, int]:
        """This rank's share ``[lo, hi)`` of the epoch's row order and its batch count.

        Under ``"drop"`` the share is the first ``num_batches * world_size * batch_size`` rows of the order, of which
        this rank takes its slice of every global batch (:meth:`epoch_rows`).
        """
        batch, world, rank = self.batch_size, self.world_size, self.rank
        if self.last_batch == "drop":
            batches = total // (world * batch)
            return 0, batches * world * batch, batches
        base, extra = divmod(total, world)
        lo = rank * base + min(rank, extra)
        hi = lo + base + (1 if rank < extra else 0)
        if self.last_batch == "pad":
            return lo, hi, math.ceil(math.ceil(total / world) / batch)
        return lo, hi, math.ceil((hi - lo) / batch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[WeightedBatch]:
        return self.iter_epoch(0)

    def epoch_rows(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """The split rows (0-based, in file order) this rank yields in ``epoch``, padding included, and their weights.

        Returns:
            ``(rows, weights)``: int64 ``[num_batches * batch_size]`` (fewer under ``"keep"``) and float32 alike.
        """
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(self._total_rows)
            rows = order[self._share_lo : self._share_hi]
        else:
            rows = np.arange(self._share_lo, self._share_hi, dtype=np.int64)
        if self.last_batch == "drop":
            # Global batch g is rows [g * W * B, (g + 1) * W * B) of the order, whatever the world size W; rank r
            # takes its B rows of each. A global batch is thus the same rows on any number of ranks, so a run resumed
            # on another world size at global batch g trains on exactly the rows it had left.
            rows = rows.reshape(self.num_batches, self.world_size, self.batch_size)[:, self.rank, :].reshape(-1)
        weights = np.ones(rows.shape[0], dtype=np.float32)
        if self.last_batch == "pad":
            missing = self.num_batches * self.batch_size - rows.shape[0]
            if missing:
                filler = rows[0] if rows.shape[0] else self._store.first_row
                rows = np.concatenate([rows, np.full(missing, filler, dtype=np.int64)])
                weights = np.concatenate([weights, np.zeros(missing, dtype=np.float32)])
        return rows.astype(np.int64, copy=False), weights

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[WeightedBatch]:
        """Yields this rank's batches of ``epoch`` from batch ``start_batch`` on.

        Deterministic by ``(seed, epoch)``: ``iter_epoch(e, k)`` yields exactly the batches ``k, k + 1, ...`` of
        ``iter_epoch(e)``, so a run resumed from a checkpoint at (epoch, batch) sees the rows it would have seen.

        Raises:
            ValueError: ``start_batch`` outside ``[0, num_batches]``.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        rows, weights = self.epoch_rows(epoch)
        local = rows - self._store.first_row

        def produce() -> Iterator[WeightedBatch]:
            for b in range(start_batch, self.num_batches):
                part = slice(b * self.batch_size, (b + 1) * self.batch_size)
                yield self._make_batch(local[part], weights[part])

        return in_background(produce(), self.prefetch) if self.prefetch else produce()

    def _make_batch(self, local_rows: np.ndarray, weights: np.ndarray) -> WeightedBatch:
        store = self._store
        size = local_rows.shape[0]
        # Gather whole rows (contiguous in memory), then one transposing copy gives key-major values.
        one_hot = np.ascontiguousarray(np.take(store.one_hot, local_rows, axis=0).T, dtype=np.int64)
        if self._all_one_hot:
            values = torch.from_numpy(one_hot.reshape(-1))
            # numpy, not torch.ones: a torch fill may wake the intra-op thread pool, which costs milliseconds on a
            # busy machine; a fresh array per batch, since consumers may keep or modify a batch's tensors.
            lengths = torch.from_numpy(np.ones(size * len(self.keys), dtype=np.int32))
            length_per_key = [size] * len(self.keys)
        else:
            value_parts: List[np.ndarray] = []
            length_parts: List[np.ndarray] = []
            one_hot_index = {name: i for i, name in enumerate(self._one_hot_fields)}
            for key in self.keys:
                if key in one_hot_index:
                    value_parts.append(one_hot[one_hot_index[key]])
                    length_parts.append(np.ones(size, dtype=np.int32))
                else:
                    offsets, flat = store.multi_hot[key]
                    starts = offsets[local_rows]
                    counts = offsets[local_rows + 1] - starts
                    # Position of every id: its row's start plus its rank within the row.
                    first_out = np.cumsum(counts) - counts
                    positions = np.repeat(starts - first_out, counts) + np.arange(int(counts.sum()))
                    value_parts.append(flat[positions])
                    length_parts.append(counts.astype(np.int32))
            values = torch.from_numpy(np.concatenate(value_parts))
            lengths = torch.from_numpy(np.concatenate(length_parts))
            length_per_key = [int(part.sum()) for part in length_parts]
        sparse = keyed_features(self.keys, values, lengths, size, length_per_key)
        dense = (
            torch.from_numpy(np.take(store.dense, local_rows, axis=0))
            if self._use_dense
            else torch.zeros((size, 0), dtype=torch.float32)
        )
        return WeightedBatch(
            dense_features=dense,
            sparse_features=sparse,
            labels=torch.from_numpy(np.take(store.labels, local_rows)),
            weights=torch.from_numpy(np.ascontiguousarray(weights)),
        )
