"""Rank-sharded Parquet loader: partitions, order, resume, padding, multi-hot, validation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

from multiembed.data.loader import ParquetBatchLoader, WeightedBatch
from multiembed.data.metadata import DatasetError, DatasetMetadata, FieldSpec, SplitFiles, write_metadata
from multiembed.data.parquet_io import arrow_schema, write_split_parquet

TAG_VOCAB = 5


def row_tags(row: int) -> List[int]:
    """The multi-hot ids of a row: 0 to 3 ids, empty lists included."""
    return [(row + j) % TAG_VOCAB for j in range(row % 4)]


def write_dataset(
    root: Path,
    file_rows: Sequence[int],
    *,
    row_group_size: int = 16,
    multi_hot: bool = False,
    corrupt: Optional[Dict] = None,
) -> Path:
    """A train split whose rows are identifiable: field ``rid`` holds the row's 0-based index in the split.

    Other columns are functions of ``rid`` so the test can recompute every value: ``C1 = rid % 7``, ``dense_x =
    rid / 2``, ``label = rid % 3 == 0``, ``tags = row_tags(rid)``. ``corrupt`` = {"file", "row", "field", "value"}
    overwrites one value before writing.
    """
    total = sum(file_rows)
    fields = [FieldSpec("rid", max(total, 1)), FieldSpec("C1", 7)]
    if multi_hot:
        fields.append(FieldSpec("tags", TAG_VOCAB, multi_hot=True))
    schema = arrow_schema(fields, ["x"])
    files, start = [], 0
    for index, rows in enumerate(file_rows):
        rid = np.arange(start, start + rows, dtype=np.int64)
        columns = {
            "label": (rid % 3 == 0).astype(np.int8),
            "rid": rid,
            "C1": rid % 7,
            "dense_x": (rid / 2).astype(np.float32),
        }
        if multi_hot:
            columns["tags"] = [row_tags(int(r)) for r in rid]
        if corrupt and corrupt["file"] == index:
            if corrupt["field"] == "tags":
                columns["tags"][corrupt["row"]] = [1, corrupt["value"]]
            else:
                columns[corrupt["field"]] = columns[corrupt["field"]].copy()
                columns[corrupt["field"]][corrupt["row"]] = corrupt["value"]
        name = f"train/part-{index:05d}.parquet"
        write_split_parquet(root / name, columns, schema, row_group_size=row_group_size)
        files.append(name)
        start += rows
    meta = DatasetMetadata(
        dataset="test",
        fields=fields,
        dense_fields=["x"],
        splits={"train": SplitFiles(files=files, file_rows=list(file_rows))},
        vocab_fingerprint="test",
    )
    write_metadata(root, meta)
    return root


def batch_rows(batch: WeightedBatch) -> np.ndarray:
    return batch.sparse_features["rid"].values().numpy()


def epoch_rows(loader: ParquetBatchLoader, epoch: int = 0, start_batch: int = 0):
    """(rids, weights, batch sizes) of one epoch of one rank."""
    rids, weights, sizes = [], [], []
    for batch in loader.iter_epoch(epoch, start_batch):
        rids.append(batch_rows(batch))
        weights.append(batch.weights.numpy())
        sizes.append(batch.labels.shape[0])
    if not rids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), sizes
    return np.concatenate(rids), np.concatenate(weights), sizes


@pytest.fixture
def dataset(tmp_path) -> Path:
    # 103 rows over 3 files and several row groups: no batch or rank count divides it.
    return write_dataset(tmp_path / "d", [40, 33, 30], row_group_size=16)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_drop_ranks_read_disjoint_equal_shares(dataset, world_size, shuffle):
    batch_size = 8
    loaders = [
        ParquetBatchLoader(dataset, "train", batch_size, rank, world_size, shuffle=shuffle, seed=3, last_batch="drop")
        for rank in range(world_size)
    ]
    expected_batches = 103 // (world_size * batch_size)
    assert [len(loader) for loader in loaders] == [expected_batches] * world_size
    for epoch in (0, 1):
        parts = [epoch_rows(loader, epoch) for loader in loaders]
        union = np.concatenate([rids for rids, _, _ in parts])
        assert len(np.unique(union)) == len(union)  # disjoint, no duplicates
        assert len(union) == expected_batches * world_size * batch_size
        assert loaders[0].rows_dropped_per_epoch == 103 - len(union)
        assert set(union) <= set(range(103))
        assert all(size == batch_size for _, _, sizes in parts for size in sizes)
        assert all((weights == 1).all() for _, weights, _ in parts)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_pad_yields_every_row_once_with_equal_batch_counts(dataset, world_size, shuffle):
    batch_size = 8
    loaders = [
        ParquetBatchLoader(dataset, "train", batch_size, rank, world_size, shuffle=shuffle, last_batch="pad")
        for rank in range(world_size)
    ]
    counts = {len(loader) for loader in loaders}
    assert counts == {-(-(-(-103 // world_size)) // batch_size)}  # ceil(ceil(103 / W) / B) on every rank
    real = []
    for loader in loaders:
        rids, weights, sizes = epoch_rows(loader)
        assert sizes == [batch_size] * len(loader)
        assert set(np.unique(weights)) <= {0.0, 1.0}
        own = rids[weights == 1]
        # Padding rows are copies of this rank's own real rows.
        assert set(rids[weights == 0]) <= set(own)
        assert loader.num_rows == len(own)
        real.append(own)
    union = np.concatenate(real)
    assert sorted(union.tolist()) == list(range(103))
    assert all(loader.rows_dropped_per_epoch == 0 for loader in loaders)


def test_pad_with_more_ranks_than_rows(tmp_path):
    data = write_dataset(tmp_path / "d", [2])
    loaders = [ParquetBatchLoader(data, "train", 4, rank, 3, last_batch="pad") for rank in range(3)]
    assert [len(loader) for loader in loaders] == [1, 1, 1]
    parts = [epoch_rows(loader) for loader in loaders]
    assert sorted(np.concatenate([rids[w == 1] for rids, w, _ in parts]).tolist()) == [0, 1]
    assert (parts[2][1] == 0).all() and parts[2][2] == [4]  # the empty rank still steps, with zero weights


def test_keep_yields_a_smaller_tail_batch(dataset):
    loader = ParquetBatchLoader(dataset, "train", 10, last_batch="keep")
    rids, weights, sizes = epoch_rows(loader)
    assert sizes == [10] * 10 + [3]
    assert rids.tolist() == list(range(103))
    assert (weights == 1).all()


def test_same_seed_same_order_new_epoch_new_order(dataset):
    def order(seed: int, epoch: int) -> List[int]:
        loader = ParquetBatchLoader(dataset, "train", 8, shuffle=True, seed=seed, last_batch="keep")
        return epoch_rows(loader, epoch)[0].tolist()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 1)) == list(range(103))
    unshuffled = ParquetBatchLoader(dataset, "train", 8, last_batch="keep")
    assert epoch_rows(unshuffled, 0)[0].tolist() == epoch_rows(unshuffled, 5)[0].tolist() == list(range(103))


@pytest.mark.parametrize("last_batch", ["drop", "pad"])
@pytest.mark.parametrize("start_batch", [1, 4, 6])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(dataset, last_batch, start_batch):
    loader = ParquetBatchLoader(dataset, "train", 8, 1, 2, shuffle=True, seed=9, last_batch=last_batch)
    full = list(loader.iter_epoch(2))
    resumed = list(loader.iter_epoch(2, start_batch=start_batch))
    assert len(resumed) == len(full) - start_batch
    for a, b in zip(full[start_batch:], resumed):
        assert np.array_equal(batch_rows(a), batch_rows(b))
        assert np.array_equal(a.weights.numpy(), b.weights.numpy())
        assert np.array_equal(a.dense_features.numpy(), b.dense_features.numpy())
    assert list(loader.iter_epoch(2, start_batch=len(loader))) == []
    with pytest.raises(ValueError, match="start_batch"):
        loader.iter_epoch(0, start_batch=len(loader) + 1)


def test_batch_contents_match_the_rows_written(dataset):
    loader = ParquetBatchLoader(dataset, "train", 16, shuffle=True, seed=4, last_batch="keep", prefetch=0)
    for batch in loader:
        rid = batch_rows(batch)
        kjt = batch.sparse_features
        assert kjt.keys() == ["rid", "C1"]
        assert kjt.stride() == len(rid)
        assert kjt.values().dtype.is_floating_point is False
        assert kjt["C1"].values().numpy().tolist() == (rid % 7).tolist()
        assert kjt.lengths().numpy().tolist() == [1] * (2 * len(rid))
        assert batch.dense_features.shape == (len(rid), 1)
        np.testing.assert_array_equal(batch.dense_features[:, 0].numpy(), (rid / 2).astype(np.float32))
        np.testing.assert_array_equal(batch.labels.numpy(), (rid % 3 == 0).astype(np.float32))
        assert batch.labels.dtype == batch.weights.dtype == batch.dense_features.dtype


def test_use_dense_false_gives_empty_dense_features(dataset):
    batch = next(iter(ParquetBatchLoader(dataset, "train", 8, use_dense=False)))
    assert tuple(batch.dense_features.shape) == (8, 0)
    assert ParquetBatchLoader(dataset, "train", 8, use_dense=False).num_dense == 0


@pytest.mark.parametrize("world_size", [1, 2])
def test_multi_hot_round_trip(tmp_path, world_size):
    data = write_dataset(tmp_path / "d", [21, 18], row_group_size=8, multi_hot=True)
    seen = []
    for rank in range(world_size):
        loader = ParquetBatchLoader(data, "train", 6, rank, world_size, shuffle=True, seed=1, last_batch="pad")
        for batch in loader:
            kjt = batch.sparse_features
            assert kjt.keys() == ["rid", "C1", "tags"]
            rids = kjt["rid"].values().numpy()
            tags = kjt["tags"]
            expected = [row_tags(int(r)) for r in rids]
            assert tags.lengths().numpy().tolist() == [len(t) for t in expected]
            assert tags.values().numpy().tolist() == [v for t in expected for v in t]
            assert kjt.length_per_key() == [len(rids), len(rids), sum(len(t) for t in expected)]
            seen.extend(rids[batch.weights.numpy() == 1].tolist())
    assert sorted(seen) == list(range(39))


@pytest.mark.parametrize(
    "corrupt, field, row",
    [
        ({"file": 1, "row": 4, "field": "C1", "value": 7}, "C1", 5),
        ({"file": 2, "row": 0, "field": "C1", "value": -1}, "C1", 1),
        ({"file": 1, "row": 9, "field": "tags", "value": TAG_VOCAB}, "tags", 10),
        ({"file": 0, "row": 2, "field": "label", "value": 2}, "label", 3),
    ],
)
def test_bad_values_name_file_row_and_field(tmp_path, corrupt, field, row):
    data = write_dataset(tmp_path / "d", [12, 12, 12], row_group_size=5, multi_hot=True, corrupt=corrupt)
    with pytest.raises(DatasetError) as error:
        ParquetBatchLoader(data, "train", 4, shuffle=True)
    message = str(error.value)
    assert f"part-{corrupt['file']:05d}.parquet" in message
    assert f"row {row}:" in message
    assert f"field {field}:" in message


def test_metadata_disagreeing_with_parquet_is_refused(dataset):
    meta_path = dataset / "metadata.json"
    text = meta_path.read_text()
    meta_path.write_text(text.replace('"name": "C1"', '"name": "C9"'))
    with pytest.raises(DatasetError, match="C9"):
        ParquetBatchLoader(dataset, "train", 4)
    meta_path.write_text(text)
    (dataset / "train" / "part-00001.parquet").unlink()
    with pytest.raises(DatasetError, match="part-00001.parquet"):
        ParquetBatchLoader(dataset, "train", 4)


def test_unknown_split_and_bad_arguments(dataset):
    with pytest.raises(DatasetError, match="val"):
        ParquetBatchLoader(dataset, "val", 4)
    with pytest.raises(ValueError, match="last_batch"):
        ParquetBatchLoader(dataset, "train", 4, last_batch="truncate")
    with pytest.raises(ValueError, match="rank"):
        ParquetBatchLoader(dataset, "train", 4, rank=2, world_size=2)
    with pytest.raises(DatasetError, match="no such dataset"):
        ParquetBatchLoader(dataset / "missing", "train", 4)


def test_prefetch_thread_stops_when_the_consumer_stops(dataset):
    loader = ParquetBatchLoader(dataset, "train", 4, prefetch=2, last_batch="keep")
    before = {t.ident for t in threading.enumerate()}
    iterator = loader.iter_epoch(0)
    next(iterator)
    assert any(t.name == "multiembed-loader-prefetch" for t in threading.enumerate())
    iterator.close()
    assert {t.ident for t in threading.enumerate()} == before
    # Prefetched and in-thread batches are the same.
    eager = ParquetBatchLoader(dataset, "train", 4, prefetch=0, last_batch="keep")
    assert [batch_rows(b).tolist() for b in loader] == [batch_rows(b).tolist() for b in eager]


def test_weighted_batch_moves_with_its_weights(dataset):
    batch = next(iter(ParquetBatchLoader(dataset, "train", 8, last_batch="pad")))
    moved = batch.to(batch.labels.device)
    assert isinstance(moved, WeightedBatch)
    assert moved.weights.tolist() == batch.weights.tolist()


def test_loads_synthetic_data(tmp_path):
    from multiembed.data.synthetic import FIELD_NAMES, SyntheticConfig, generate_dataset

    meta = generate_dataset(tmp_path / "s", 2000, SyntheticConfig(seed=0), progress=False)
    loader = ParquetBatchLoader(tmp_path / "s", "val", 64, last_batch="pad")
    batches = list(loader)
    assert sum(int(b.weights.sum()) for b in batches) == meta.split_rows()["val"] == 200
    assert batches[0].sparse_features.keys() == list(FIELD_NAMES)
    assert batches[0].dense_features.shape == (64, 13)
