"""Converter on real rows from ../shared/data (Criteo Kaggle 200 rows, Criteo 1TB 1,000 rows, Avazu 9,999 rows).

Expected row counts, vocabulary sizes and ids are computed here with the csv module, dicts and math.log.
"""

from __future__ import annotations

import collections
import csv
import gzip
import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multiembed.cli import main
from multiembed.data.metadata import read_metadata
from multiembed.data.tokens import hash_token

KAGGLE = "criteo_dac_deepctr_sample_200.txt"
TERABYTE = "criteo_1tb_day0_head1k.txt"
AVAZU = "avazu_train_head10k.csv"
INT_NAMES = [f"I{i}" for i in range(1, 14)]
CAT_NAMES = [f"C{i}" for i in range(1, 27)]


def criteo_cells(path: Path) -> List[List[str]]:
    with open(path, newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t")]


def avazu_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def paper_token(cell: str) -> str:
    if cell == "":
        return "NULL"
    v = int(cell)
    return str(int(math.log(v) ** 2)) if v > 2 else str(v - 2)


def run_convert(*args: str) -> None:
    assert main(["convert", *args, "--quiet"]) == 0


def split_table(out: Path, split: str) -> pa.Table:
    meta = read_metadata(out)
    return pa.concat_tables([pq.read_table(out / f) for f in meta.splits[split].files])


def all_rows(out: Path) -> int:
    return sum(read_metadata(out).split_rows().values())


def test_kaggle_sample_paper_mode_vocab_equals_independent_count(shared_data, tmp_path):
    cells = criteo_cells(shared_data / KAGGLE)
    assert len(cells) == 200 and all(len(r) == 40 for r in cells)
    for min_count in (10, 1):
        out = tmp_path / f"min{min_count}"
        run_convert("criteo", str(shared_data / KAGGLE), "--out", str(out), "--min-count", str(min_count))
        meta = read_metadata(out)
        assert meta.rows_read == 200 and all_rows(out) == 200 and meta.skipped == {}
        assert meta.split_rows() == {"train": 160, "val": 20, "test": 20}
        expected = {}
        for j, name in enumerate(INT_NAMES):
            counts = collections.Counter(paper_token(r[1 + j]) for r in cells)
            expected[name] = sum(c >= min_count for c in counts.values()) + 1
        for j, name in enumerate(CAT_NAMES):
            counts = collections.Counter(r[14 + j] for r in cells)
            expected[name] = sum(c >= min_count for c in counts.values()) + 1
        assert meta.vocab_sizes == expected


def test_kaggle_sample_negative_and_empty_integers(shared_data, tmp_path):
    cells = criteo_cells(shared_data / KAGGLE)
    negatives = [r[2] for r in cells if r[2].startswith("-")]
    empties = sum(c == "" for r in cells for c in r[1:14])
    assert negatives and empties > 0  # the sample has both; the conversion must accept them
    out = tmp_path / "out"
    run_convert("criteo", str(shared_data / KAGGLE), "--out", str(out), "--min-count", "1", "--split", "0,0,1")
    table = split_table(out, "test")
    assert table.num_rows == 200
    for j, name in enumerate(INT_NAMES):
        dense = table.column("dense_" + name).to_numpy()
        expected = [math.log1p(max(int(r[1 + j]), 0)) if r[1 + j] else 0.0 for r in cells]
        np.testing.assert_allclose(dense, expected, rtol=1e-6)
    # Negative I2 values and empty cells are tokens of their own ("-3", "NULL"): equal tokens, equal ids.
    ids = table.column("I2").to_pylist()
    by_token: Dict[str, set] = collections.defaultdict(set)
    for r, token_id in zip(cells, ids):
        by_token[paper_token(r[2])].add(token_id)
    assert all(len(v) == 1 for v in by_token.values())
    assert len({next(iter(v)) for v in by_token.values()}) == len(by_token)
    assert {paper_token(v) for v in negatives} <= set(by_token)


def test_terabyte_sample_hashing_ids_equal_reference(shared_data, tmp_path):
    cells = criteo_cells(shared_data / TERABYTE)
    out = tmp_path / "out"
    run_convert("criteo-1tb", str(shared_data / TERABYTE), "--out", str(out), "--split", "0,0,1")
    meta = read_metadata(out)
    assert meta.rows_read == 1000 and meta.field_names == CAT_NAMES
    assert all(size == 40_000_000 for size in meta.vocab_sizes.values())
    table = split_table(out, "test")
    assert table.column("label").to_pylist() == [int(r[0]) for r in cells]
    for j, name in enumerate(CAT_NAMES):
        expected = [(hash_token(r[14 + j].encode()) >> 32) * 40_000_000 >> 32 for r in cells]
        assert table.column(name).to_pylist() == expected, name


def test_terabyte_sample_paper_mode_vocab_equals_independent_count(shared_data, tmp_path):
    cells = criteo_cells(shared_data / TERABYTE)
    out = tmp_path / "out"
    run_convert("criteo-1tb", str(shared_data / TERABYTE), "--out", str(out), "--mode", "paper", "--min-count", "3")
    meta = read_metadata(out)
    assert meta.split_rows() == {"train": 800, "val": 100, "test": 100}
    for j, name in enumerate(INT_NAMES + CAT_NAMES):
        column = [paper_token(r[1 + j]) if j < 13 else r[1 + j] for r in cells]
        kept = sum(c >= 3 for c in collections.Counter(column).values())
        assert meta.vocab_sizes[name] == kept + 1, name


def test_avazu_sample_vocab_and_rows(shared_data, tmp_path):
    rows = avazu_rows(shared_data / AVAZU)
    assert len(rows) == 9999
    out = tmp_path / "out"
    run_convert("avazu", str(shared_data / AVAZU), "--out", str(out))
    meta = read_metadata(out)
    header = list(rows[0].keys())
    assert meta.field_names == header[2:]  # id and click are not fields
    assert meta.split_rows() == {"train": 7999, "val": 1000, "test": 1000}
    assert meta.options["min_count"] == 4
    for name in meta.field_names:
        kept = sum(c >= 4 for c in collections.Counter(r[name] for r in rows).values())
        assert meta.vocab_sizes[name] == kept + 1, name
    labels = sorted(v for s in ("train", "val", "test") for v in split_table(out, s).column("label").to_pylist())
    assert labels == sorted(int(r["click"]) for r in rows)


def _variants(src: Path, tmp_path: Path) -> List[Path]:
    data = src.read_bytes()
    crlf = tmp_path / ("crlf_" + src.name)
    crlf.write_bytes(data.replace(b"\n", b"\r\n"))
    gz = tmp_path / ("gz_" + src.name + ".gz")
    gz.write_bytes(gzip.compress(data))
    crlf_gz = tmp_path / ("crlfgz_" + src.name + ".gz")
    crlf_gz.write_bytes(gzip.compress(data.replace(b"\n", b"\r\n")))
    return [crlf, gz, crlf_gz]


@pytest.mark.parametrize("dataset,name", [("criteo", KAGGLE), ("avazu", AVAZU)])
def test_crlf_and_gzip_variants_give_identical_output(shared_data, tmp_path, dataset, name):
    src = shared_data / name
    reference = tmp_path / "ref"
    run_convert(dataset, str(src), "--out", str(reference))
    for variant in _variants(src, tmp_path):
        out = tmp_path / ("out_" + variant.name)
        run_convert(dataset, str(variant), "--out", str(out))
        assert read_metadata(out).vocab_fingerprint == read_metadata(reference).vocab_fingerprint
        assert read_metadata(out).split_rows() == read_metadata(reference).split_rows()
        for split in ("train", "val", "test"):
            assert split_table(out, split).equals(split_table(reference, split)), (variant.name, split)


def test_avazu_vocab_from_round_trip_on_a_held_out_part(shared_data, tmp_path):
    lines = (shared_data / AVAZU).read_text().splitlines(keepends=True)
    first = tmp_path / "first.csv"
    first.write_text("".join(lines[:8001]))  # header + 8,000 rows
    held_out = tmp_path / "held_out.csv"
    held_out.write_text(lines[0] + "".join(lines[8001:]))  # header + 1,999 rows
    run_convert("avazu", str(first), "--out", str(tmp_path / "a"), "--split", "0,0,1")
    run_convert("avazu", str(held_out), "--out", str(tmp_path / "b"), "--vocab-from", str(tmp_path / "a"),
                "--split", "0,0,1")
    meta_a, meta_b = read_metadata(tmp_path / "a"), read_metadata(tmp_path / "b")
    assert meta_b.vocab_fingerprint == meta_a.vocab_fingerprint and meta_b.vocab_sizes == meta_a.vocab_sizes
    assert meta_b.split_rows() == {"train": 0, "val": 0, "test": 1999}
    first_rows = avazu_rows(first)
    held_rows = avazu_rows(held_out)
    table_a, table_b = split_table(tmp_path / "a", "test"), split_table(tmp_path / "b", "test")
    for name in meta_a.field_names:
        id_of = dict(zip((r[name] for r in first_rows), table_a.column(name).to_pylist()))
        expected = [id_of.get(r[name], 0) for r in held_rows]
        assert table_b.column(name).to_pylist() == expected, name
