"""Synthetic click logs: Bayes metrics, difficulty, determinism, splits, the raw TSV and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from multiembed.cli import main
from multiembed.data.metadata import read_metadata
from multiembed.data.synthetic import FIELD_NAMES, SyntheticClickModel, SyntheticConfig, generate_dataset


def auc_by_counting(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC as the probability that a random positive outscores a random negative (ties count one half)."""
    labels = labels.astype(bool)
    negatives = np.sort(scores[~labels])
    positives = scores[labels]
    below = np.searchsorted(negatives, positives, side="left")
    not_above = np.searchsorted(negatives, positives, side="right")
    wins = below + 0.5 * (not_above - below)
    return float(wins.sum() / (positives.size * negatives.size))


def paper_bin(raw: str) -> str:
    """The paper's integer binning, written out independently of the generator."""
    if raw == "":
        return "NULL"
    value = int(raw)
    return str(int(math.log(value) ** 2)) if value > 2 else str(value - 2)


def read_split(data_dir: Path, split: str):
    meta = read_metadata(data_dir)
    table = pq.read_table([str(data_dir / f) for f in meta.splits[split].files])
    return {name: table.column(name).to_numpy() for name in table.column_names}


def columns(frame, names) -> np.ndarray:
    return np.stack([frame[name] for name in names], axis=1)


def frames_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bayes_metrics_in_metadata_match_stored_probabilities(tmp_path):
    meta = generate_dataset(tmp_path / "d", 6000, SyntheticConfig(seed=3), progress=False)
    on_disk = json.loads((tmp_path / "d" / "metadata.json").read_text())
    assert set(on_disk["bayes"]) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        frame = read_split(tmp_path / "d", split)
        labels = frame["label"]
        probs = frame["true_prob"].astype(np.float64)
        assert on_disk["bayes"][split]["auc"] == pytest.approx(auc_by_counting(labels, probs), abs=1e-12)
        expected_logloss = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
        assert on_disk["bayes"][split]["logloss"] == pytest.approx(expected_logloss, rel=1e-9)
    assert meta.bayes == on_disk["bayes"]


def test_default_difficulty_on_200k_rows():
    model = SyntheticClickModel(SyntheticConfig(seed=0))
    rows = model.sample(np.random.default_rng(12345), 200_000)
    positive_rate = rows.labels.mean()
    bayes_auc = auc_by_counting(rows.labels, rows.true_prob)
    assert 0.23 <= positive_rate <= 0.27
    assert 0.75 <= bayes_auc <= 0.80
    # The planted interactions carry signal a first-order model cannot see.
    first_order, interaction = model.logit_parts(rows.ids)
    assert auc_by_counting(rows.labels, first_order) < bayes_auc - 0.04
    assert auc_by_counting(rows.labels, interaction) > 0.6


@pytest.mark.parametrize("scale", [0.005, 0.2])
def test_difficulty_does_not_depend_on_scale(scale):
    model = SyntheticClickModel(SyntheticConfig(seed=1, scale=scale))
    rows = model.sample(np.random.default_rng(7), 100_000)
    assert 0.23 <= rows.labels.mean() <= 0.27
    assert 0.75 <= auc_by_counting(rows.labels, rows.true_prob) <= 0.80
    vocab = np.array([model.vocab_sizes[name] for name in FIELD_NAMES])
    assert (rows.ids >= 0).all() and (rows.ids < vocab).all()


def test_ids_follow_a_heavy_tailed_distribution():
    model = SyntheticClickModel(SyntheticConfig(seed=0))
    rows = model.sample(np.random.default_rng(0), 100_000)
    c3 = FIELD_NAMES.index("C3")
    counts = np.sort(np.bincount(rows.ids[:, c3], minlength=model.vocab_sizes["C3"]))[::-1]
    # Zipf(1.1): the most frequent value is far above the median one.
    assert counts[0] > 50 * max(counts[counts.size // 2], 1)


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate_dataset(tmp_path / name, 3000, SyntheticConfig(seed=seed), progress=False)
    a, b, c = (read_split(tmp_path / name, "train") for name in "abc")
    assert frames_equal(a, b)
    assert not frames_equal(a, c)
    meta_a, meta_b, meta_c = (read_metadata(tmp_path / name) for name in "abc")
    assert meta_a.vocab_fingerprint == meta_b.vocab_fingerprint != meta_c.vocab_fingerprint


def test_split_sizes_are_exact_and_files_complete(tmp_path):
    meta = generate_dataset(tmp_path / "d", 10_000, SyntheticConfig(seed=0), progress=False)
    assert meta.split_rows() == {"train": 8000, "val": 1000, "test": 1000}
    for split in ("train", "val", "test"):
        assert len(read_split(tmp_path / "d", split)["label"]) == meta.split_rows()[split]
    leftovers = [p.name for p in (tmp_path / "d").rglob(".*")]
    assert leftovers == []  # no temporary files left behind
    assert meta.dense_fields == [f"I{i}" for i in range(1, 14)]
    assert [f.name for f in meta.fields] == list(FIELD_NAMES)


def test_tsv_is_a_raw_criteo_log_of_the_same_rows(tmp_path):
    out, tsv = tmp_path / "d", tmp_path / "rows.tsv"
    assert main(["synth", "--rows", "400", "--out", str(out), "--tsv", str(tsv), "--seed", "2", "--no-progress"]) == 0
    lines = tsv.read_text().split("\n")
    assert lines[-1] == ""
    rows = [line.split("\t") for line in lines[:-1]]
    assert len(rows) == 400 and all(len(row) == 40 for row in rows)

    frames = [read_split(out, split) for split in ("train", "val", "test")]  # the TSV's row order
    ids = np.concatenate([columns(frame, FIELD_NAMES) for frame in frames])
    labels = np.concatenate([frame["label"] for frame in frames])
    dense = np.concatenate([columns(frame, [f"dense_I{i}" for i in range(1, 14)]) for frame in frames])
    assert [int(row[0]) for row in rows] == labels.tolist()
    model = SyntheticClickModel(SyntheticConfig(seed=2))
    for column, field in enumerate(FIELD_NAMES, start=1):
        tokens = [row[column] for row in rows]
        if field.startswith("I"):
            assert all(t == "" or t.lstrip("-").isdigit() for t in tokens)
            tokens = [paper_bin(t) for t in tokens]
            # The paper's binning of the raw integer gives exactly the id's documented bin.
            documented = model.integer_tokens(field)
            assert tokens == [documented[i] for i in ids[:, column - 1]]
        else:
            assert all(len(t) == 8 and int(t, 16) >= 0 for t in tokens)
        # One token per id and one id per token.
        pairs = set(zip(tokens, ids[:, column - 1].tolist()))
        assert len(pairs) == len({t for t, _ in pairs}) == len({i for _, i in pairs})
    raw_ints = np.array([[float(v) if v else np.nan for v in row[1:14]] for row in rows])
    expected_dense = np.where(np.isnan(raw_ints), 0.0, np.log1p(np.maximum(np.nan_to_num(raw_ints), 0)))
    np.testing.assert_allclose(dense, expected_dense, rtol=1e-6)


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert main(["synth", "--rows", "50", "--out", out, "--no-progress"]) == 0
    assert main(["synth", "--rows", "50", "--out", out, "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["synth", "--rows", "60", "--out", out, "--no-progress", "--force"]) == 0
    assert sum(read_metadata(out).split_rows().values()) == 60


def test_cli_rejects_bad_split(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--rows", "50", "--out", str(tmp_path / "d"), "--split", "8,1"])
    assert exit_info.value.code == 2
    assert "three" in capsys.readouterr().err


def test_convert_reads_the_tsv_back_to_the_same_rows(tmp_path):
    tsv = tmp_path / "rows.tsv.gz"
    assert main(["synth", "--rows", "500", "--out", str(tmp_path / "s"), "--tsv", str(tsv), "--no-progress"]) == 0
    args = ["convert", "criteo", str(tsv), "--out", str(tmp_path / "c"), "--min-count", "1", "--split", "0,0,1"]
    assert main(args + ["--quiet"]) == 0
    synthetic = [read_split(tmp_path / "s", split) for split in ("train", "val", "test")]
    converted = read_split(tmp_path / "c", "test")
    assert converted["label"].tolist() == np.concatenate([frame["label"] for frame in synthetic]).tolist()
    for field in FIELD_NAMES:
        ours = np.concatenate([frame[field] for frame in synthetic]).tolist()
        pairs = set(zip(ours, converted[field].tolist()))
        # The converter numbers the values its own way; the mapping between the two numberings is one-to-one.
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    for i in range(1, 14):
        ours = np.concatenate([frame[f"dense_I{i}"] for frame in synthetic])
        np.testing.assert_allclose(converted[f"dense_I{i}"], ours, rtol=1e-6)
