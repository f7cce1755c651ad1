"""Stream datasets (``multiembed synth --stream``): rows drawn from their index while training reads them.

Determinism, world-size independence, validation and test rows that no training index reaches, exact resume
mid-epoch, the metadata contract, and training / evaluating / resuming through the commands that take ``--data``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

from multiembed.cli import main as cli_main
from multiembed.data.loader import ParquetBatchLoader, WeightedBatch
from multiembed.data.metadata import DatasetError, read_metadata
from multiembed.data.sources import open_split, split_positive_rate
from multiembed.data.stream_loader import StreamBatchLoader
from multiembed.data.synthetic import CollapseRegimeConfig, SyntheticConfig, click_model
from multiembed.data.synthetic.stream import StreamGenerator, StreamLayout, write_stream_dataset

# 1,200 training rows an epoch, 300 validation and 300 test rows; blocks of 64 rows, so batches straddle blocks.
ROWS, SPLIT, BLOCK = 1800, (4, 1, 1), 64


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "data"
    write_stream_dataset(out, ROWS, CollapseRegimeConfig(seed=3), split=SPLIT, block_rows=BLOCK)
    return out


def batch_arrays(batch: WeightedBatch) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``([B, F] ids, [B] labels, [B] weights)`` of a batch."""
    kjt = batch.sparse_features
    ids = np.stack([kjt[key].values().numpy() for key in kjt.keys()], axis=1)
    return ids, batch.labels.numpy(), batch.weights.numpy()


def epoch_batches(loader: StreamBatchLoader, epoch: int, start: int = 0) -> List[Tuple[np.ndarray, ...]]:
    return [batch_arrays(b) for b in loader.iter_epoch(epoch, start)]


def test_rows_are_a_function_of_seed_and_index(stream: Path) -> None:
    meta = read_metadata(stream)
    layout = StreamLayout(meta.stream["rows"], block_rows=BLOCK)
    first = StreamGenerator(click_model(CollapseRegimeConfig(seed=3)), layout)
    again = StreamGenerator(click_model(CollapseRegimeConfig(seed=3)), layout)
    other = StreamGenerator(click_model(CollapseRegimeConfig(seed=4)), layout)
    # The same rows whichever ranges they are read in (block boundaries at multiples of 64).
    whole = first.rows(500, 900)
    pieces = [again.rows(lo, min(lo + 37, 900)) for lo in range(500, 900, 37)]
    assert np.array_equal(whole.ids, np.concatenate([p.ids for p in pieces]))
    assert np.array_equal(whole.labels, np.concatenate([p.labels for p in pieces]))
    assert not np.array_equal(whole.ids, other.rows(500, 900).ids)
    # Two loaders of the same data yield the same batches.
    a = StreamBatchLoader(stream, "train", 100, prefetch=0)
    b = StreamBatchLoader(stream, "train", 100, prefetch=2)
    for x, y in zip(epoch_batches(a, 1), epoch_batches(b, 1)):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))


def test_one_rank_and_two_ranks_train_the_same_global_batches(stream: Path) -> None:
    one = StreamBatchLoader(stream, "train", 200, rank=0, world_size=1)
    ranks = [StreamBatchLoader(stream, "train", 100, rank=r, world_size=2) for r in (0, 1)]
    assert one.num_batches == ranks[0].num_batches == ranks[1].num_batches == 6
    for epoch in (0, 2):
        single = epoch_batches(one, epoch)
        split = [epoch_batches(loader, epoch) for loader in ranks]
        for g, (ids, labels, _) in enumerate(single):
            assert np.array_equal(ids, np.concatenate([split[0][g][0], split[1][g][0]]))
            assert np.array_equal(labels, np.concatenate([split[0][g][1], split[1][g][1]]))


def test_training_never_reaches_a_validation_or_test_index_and_never_repeats_a_row(stream: Path) -> None:
    val = StreamBatchLoader(stream, "val", 64, last_batch="pad")
    test = StreamBatchLoader(stream, "test", 64, last_batch="pad")
    held_out = set()
    for loader in (val, test):
        for b in range(loader.num_batches):
            lo, hi, _ = loader.batch_indices(0, b)
            held_out.update(range(lo, hi))
    assert held_out == set(range(600))  # validation [0, 300), test [300, 600)
    trained: List[int] = []
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            loader = StreamBatchLoader(stream, "train", 40, rank=rank, world_size=world_size)
            indices = [i for epoch in range(4) for b in range(loader.num_batches)
                       for i in range(*loader.batch_indices(epoch, b)[:2])]
            assert min(indices) >= 600
            if world_size == 1:
                trained = indices
    assert len(trained) == len(set(trained)) == 4 * 1200  # every epoch draws new rows
    assert not held_out & set(trained)


def test_resume_mid_epoch_yields_the_rows_left(stream: Path) -> None:
    loader = StreamBatchLoader(stream, "train", 128, rank=1, world_size=2)
    whole = epoch_batches(loader, 3)
    resumed = epoch_batches(StreamBatchLoader(stream, "train", 128, rank=1, world_size=2), 3, start=2)
    assert len(resumed) == len(whole) - 2
    for x, y in zip(whole[2:], resumed):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))
    with pytest.raises(ValueError, match="start_batch"):
        loader.iter_epoch(0, loader.num_batches + 1)


def test_evaluation_reads_every_held_out_row_once_over_ranks(stream: Path) -> None:
    meta = read_metadata(stream)
    generator = StreamGenerator(click_model(CollapseRegimeConfig(seed=3)), StreamLayout(meta.stream["rows"], BLOCK))
    expected = generator.rows(300, 600)
    got_ids, got_labels = [], []
    counts = set()
    for rank in range(3):
        loader = StreamBatchLoader(stream, "test", 32, rank=rank, world_size=3, last_batch="pad")
        counts.add(loader.num_batches)
        for ids, labels, weights in epoch_batches(loader, 0):
            got_ids.append(ids[weights == 1])
            got_labels.append(labels[weights == 1])
    assert counts == {4}  # every rank runs the same steps
    assert np.array_equal(np.concatenate(got_ids), expected.ids)
    assert np.array_equal(np.concatenate(got_labels), expected.labels.astype(np.float32))


def test_metadata_records_the_stream_and_the_bayes_metrics(stream: Path, capsys) -> None:
    meta = read_metadata(stream)
    record = json.loads((stream / "metadata.json").read_text())
    assert record["source"] == "stream" and record["splits"] == {}
    assert meta.split_rows() == {"train": 1200, "val": 300, "test": 300}
    assert not list(stream.glob("**/*.parquet"))
    for split in ("val", "test"):
        assert 0.6 < meta.bayes[split]["auc"] < 1.0
    rate, rows = split_positive_rate(stream, meta)
    assert rows == 1200 and 0.1 < rate < 0.4
    assert isinstance(open_split(stream, "val", 64, last_batch="pad"), StreamBatchLoader)
    capsys.readouterr()
    assert cli_main(["inspect", str(stream), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"] == "stream" and shown["splits"] == meta.split_rows()


def test_parquet_readers_refuse_a_stream_in_one_line(stream: Path) -> None:
    with pytest.raises(DatasetError, match="a stream dataset") as error:
        ParquetBatchLoader(stream, "train", 64)
    assert "\n" not in str(error.value)


def test_metadata_naming_an_unknown_source_or_a_stream_with_files_is_refused(stream: Path, tmp_path: Path) -> None:
    record = json.loads((stream / "metadata.json").read_text())
    for change, message in (({"source": "kafka"}, "source: expected one of"),
                            ({"splits": {"train": {"files": [{"path": "x.parquet", "rows": 1}]}}}, "lists no files"),
                            ({"stream": {"rows": {"train": 1}}}, "stream.rows")):
        (tmp_path / "metadata.json").write_text(json.dumps({**record, **change}))
        with pytest.raises(DatasetError, match=message):
            read_metadata(tmp_path)


def test_a_stream_of_the_default_generator_carries_dense_features(tmp_path: Path) -> None:
    write_stream_dataset(tmp_path, 600, SyntheticConfig(seed=1, scale=0.001), split=(4, 1, 1), block_rows=50)
    batch = next(iter(StreamBatchLoader(tmp_path, "train", 16)))
    assert batch.dense_features.shape == (16, 13) and len(batch.sparse_features.keys()) == 39


def test_synth_stream_cli_writes_the_stream_and_refuses_file_options(tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    assert cli_main(["synth", "--regime", "collapse", "--stream", "--rows", "1200", "--split", "10,1,1",
                     "--out", str(out), "--no-progress"]) == 0
    assert "source: stream" in capsys.readouterr().err
    assert read_metadata(out).split_rows() == {"train": 1000, "val": 100, "test": 100}
    assert cli_main(["synth", "--regime", "collapse", "--stream", "--rows", "1200", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["synth", "--stream", "--days", "2", "--out", str(tmp_path / "d")]) == 2
    assert "--stream: --days" in capsys.readouterr().err
    assert cli_main(["synth", "--regime", "collapse", "--stream", "--rows", "20", "--split", "1,0,1",
                     "--out", str(tmp_path / "e")]) == 2
    assert "no val rows" in capsys.readouterr().err


def _train(data: Path, out: Path, max_steps: int, *extra: str) -> int:
    return cli_main(["train", "--data", str(data), "--out", str(out), "--model", "dcnv2-se-2x", "--batch-size", "100",
                     "--hidden", "16", "--epochs", "3", "--max-steps", str(max_steps), "--eval-every", "4",
                     "--patience", "0", "--ia-every", "0", "--device", "cpu", "--no-progress", *extra])


def test_train_evaluate_and_resume_on_a_stream(stream: Path, tmp_path: Path, capsys) -> None:
    """Twelve steps of 100 rows (past the first epoch of 1,200 rows), straight or stopped at step 4 and resumed:
    the same result; ``evaluate`` reproduces the test metrics."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(stream, straight, 16) == 0
    assert _train(stream, resumed, 4) == 0
    assert _train(stream, resumed, 16, "--resume") == 0
    one, two = (json.loads((run / "summary.json").read_text()) for run in (straight, resumed))
    assert one["steps"] == two["steps"] == 16 and one["epochs_run"] == pytest.approx(16 / 12, abs=1e-3)
    assert one["test_rows"] == 300 and one["bayes_test_auc"] == read_metadata(stream).bayes["test"]["auc"]
    assert two["test_auc"] == pytest.approx(one["test_auc"], abs=1e-6)
    assert two["val_auc"] == pytest.approx(one["val_auc"], abs=1e-6)
    capsys.readouterr()
    assert cli_main(["evaluate", str(straight), "--data", str(stream), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_auc"] == pytest.approx(one["test_auc"], abs=1e-6)
    # A stream of the same rows with a longer epoch holds the same splits; one with other held-out rows does not.
    longer, other = tmp_path / "longer", tmp_path / "other"
    write_stream_dataset(longer, 2600, CollapseRegimeConfig(seed=3), split=(2000, 300, 300), block_rows=BLOCK)
    write_stream_dataset(other, 1800, CollapseRegimeConfig(seed=3), split=(1200, 400, 200), block_rows=BLOCK)
    assert cli_main(["evaluate", str(straight), "--data", str(longer), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_auc"] == pytest.approx(one["test_auc"], abs=1e-6)
    assert cli_main(["evaluate", str(straight), "--data", str(other), "--device", "cpu"]) == 2
    assert "splits its rows differently" in capsys.readouterr().err


def test_fresh_rows_preset_trains_every_run_on_one_epoch_of_new_rows() -> None:
    """The fresh-rows preset: collapse's model, no early stopping, and a step budget that is exactly its data's epoch."""
    from multiembed.config.presets import PRESETS

    preset = PRESETS["fresh-rows"]
    words = preset.data_hint.split()
    assert "--stream" in words and words[words.index("--regime") + 1] == "collapse"
    train, val, test = (int(w) for w in words[words.index("--split") + 1].split(","))
    assert int(words[words.index("--rows") + 1]) == train + val + test
    assert preset.train["max_steps"] * preset.train["batch_size"] == train and preset.train["epochs"] == 1
    assert preset.train["patience"] == 0
    collapse = PRESETS["collapse"].train
    assert {k: preset.train[k] for k in ("batch_size", "hidden", "output_bias")} == {
        k: collapse[k] for k in ("batch_size", "hidden", "output_bias")}
