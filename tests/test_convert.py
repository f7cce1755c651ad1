"""Converter: token hash, binning, splits, vocabularies and end-to-end conversions of small generated logs.

Expected values are computed here from the raw lines with plain Python (csv-free string splitting, dict counting,
math.log), independently of the vectorised code under test.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import os
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multiembed.cli import main
from multiembed.data.convert import ConvertOptions, convert
from multiembed.data.metadata import read_metadata
from multiembed.data.splits import SplitAssigner, random_file_counts, split_sizes
from multiembed.data.tokens import bucketize, hash_token, hash_tokens, paper_bins, paper_int_keys
from multiembed.data.vocab import VocabularyCounter

INT_NAMES = [f"I{i}" for i in range(1, 14)]
CAT_NAMES = [f"C{i}" for i in range(1, 27)]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def criteo_rows(n: int, seed: int, unique_c1: bool = True) -> List[List[str]]:
    """Random Criteo-shaped rows as lists of 40 cells. I13 holds the row's index (so an output row can be traced
    back to its raw line through ``dense_I13``); C1 is a unique row tag when ``unique_c1``."""
    rng = random.Random(seed)
    rows = []
    for r in range(n):
        label = str(rng.randint(0, 1))
        ints = ["" if rng.random() < 0.2 else str(rng.choice([-3, -1, 0, 1, 2, 3, 7, 50, 999, 123456])) for _ in INT_NAMES]
        ints[12] = str(r)
        cats = [("r%07d" % r) if (unique_c1 and j == 0) else ("" if rng.random() < 0.1 else "%08x" % rng.randrange(6 + 3 * j))
                for j in range(26)]
        rows.append([label] + ints + cats)
    return rows


def write_lines(path: Path, rows: Sequence[Sequence[str]], sep: str = "\t", newline: str = "\n",
                header: Optional[Sequence[str]] = None) -> Path:
    text = "".join(sep.join(r) + newline for r in ([header] if header else []) + list(rows))
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(text.encode())
    else:
        path.write_bytes(text.encode())
    return path


def read_split(out: Path, split: str) -> Optional[pa.Table]:
    meta = read_metadata(out)
    files = meta.splits[split].files
    if not files:
        return None
    return pa.concat_tables([pq.read_table(out / f) for f in files])


def read_all(out: Path) -> Dict[str, pa.Table]:
    return {s: t for s in ("train", "val", "test") if (t := read_split(out, s)) is not None}


def row_indices(table: pa.Table) -> List[int]:
    """The raw row index of every output row (criteo_rows puts it in I13)."""
    return np.rint(np.expm1(table.column("dense_I13").to_numpy().astype(np.float64))).astype(int).tolist()


def paper_token(cell: str) -> str:
    """The paper's binning of one integer cell, written out independently of the module."""
    if cell == "":
        return "NULL"
    v = int(cell)
    return str(int(math.log(v) ** 2)) if v > 2 else str(v - 2)


# ---------------------------------------------------------------------------------------------------------------
# hash and tokens


def _spec_hash(token: bytes, seed: int) -> int:
    """hash64 written from the formula in multiembed.data.tokens' docstring, without the module's helpers."""
    mask = (1 << 64) - 1

    def fmix(x: int) -> int:
        x &= mask
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & mask
        x ^= x >> 33
        x = (x * 0xC4CEB9FE1A85EC53) & mask
        return x ^ (x >> 33)

    k = 0x9E3779B97F4A7C15
    total = fmix(seed ^ (len(token) * k))
    padded = token + bytes(-len(token) % 8)
    for i in range(0, len(padded), 8):
        total += int.from_bytes(padded[i : i + 8], "little") * (fmix(seed + (i // 8 + 1) * k) | 1)
    return fmix(total)


def test_hash_matches_documented_formula_for_all_lengths_and_seeds():
    rng = random.Random(3)
    tokens = [bytes(rng.randrange(256) for _ in range(n)) for n in [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 64, 200, 4096]]
    tokens += [b"05db9164", b"", b"NULL", "é".encode()]
    for seed in (0, 1, 2**63 + 5):
        expected = [_spec_hash(t, seed) for t in tokens]
        assert hash_tokens(pa.array(tokens, pa.binary()), seed).tolist() == expected
        assert [hash_token(t, seed) for t in tokens] == expected


def test_hash_of_sliced_and_chunked_arrays_equals_whole():
    tokens = [("%x" % i) * (i % 5) for i in range(300)]
    whole = hash_tokens(pa.array(tokens))
    assert hash_tokens(pa.array(tokens).slice(100, 50)).tolist() == whole[100:150].tolist()
    chunked = pa.chunked_array([pa.array(tokens[:120]), pa.array(tokens[120:])])
    assert hash_tokens(chunked).tolist() == whole.tolist()
    assert hash_tokens(pa.array(tokens, pa.large_string())).tolist() == whole.tolist()


def test_hash_is_stable_across_processes():
    """Not Python's salted hash(): another interpreter with another PYTHONHASHSEED gives the same values."""
    tokens = ["68fd1e64", "", "a" * 20]
    code = (
        "import json, pyarrow as pa; from multiembed.data.tokens import hash_tokens; "
        f"print(json.dumps(hash_tokens(pa.array({tokens!r})).tolist()))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == hash_tokens(pa.array(tokens)).tolist()


def test_bucketize_is_in_range_and_spreads_evenly():
    hashes = hash_tokens(pa.array([str(i) for i in range(100_000)]))
    for size in (1, 7, 1000, 2**32):
        ids = bucketize(hashes.copy(), size)
        assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < size
    counts = np.bincount(bucketize(hashes.copy(), 10), minlength=10)
    # 10,000 expected per bucket, binomial sd ~95: 6 sd is far beyond chance for a good hash.
    assert np.abs(counts - 10_000).max() < 600
    with pytest.raises(ValueError):
        bucketize(hashes, 0)


def test_paper_bins_match_the_paper_formula():
    values = [-(2**62), -1000, -3, -2, -1, 0, 1, 2, 3, 4, 7, 8, 20, 55, 1000, 123456789, 2**62]
    got = paper_bins(np.array(values, dtype=np.int64)).tolist()
    assert [str(g) for g in got] == [paper_token(str(v)) for v in values]


def test_paper_int_keys_hash_the_paper_tokens():
    cells = ["", "-5000", "-1025", "-1022", "-3", "0", "2", "3", "9", "1000000", str(2**63 - 1), ""]
    column = pa.chunked_array([pa.array([int(c) if c else None for c in cells[:5]], pa.int64()),
                               pa.array([int(c) if c else None for c in cells[5:]], pa.int64())])
    expected = [hash_token(paper_token(c).encode(), 7) for c in cells]
    assert paper_int_keys(column, seed=7).tolist() == expected


def test_vocabulary_counter_merges_blocks_exactly(monkeypatch):
    """Many small blocks with frequent merges (threshold lowered) count exactly like a Counter."""
    monkeypatch.setattr(VocabularyCounter, "_MIN_PENDING", 8)
    rng = random.Random(11)
    tokens = [str(int(rng.paretovariate(1.0))) for _ in range(5000)]
    counter = VocabularyCounter(["C1"])
    position = 0
    while position < len(tokens):
        size = rng.randint(0, 300)
        counter.add("C1", hash_tokens(pa.array(tokens[position : position + size], pa.string())))
        position += size
    expected = collections.Counter(tokens)
    assert counter.distinct("C1") == len(expected)
    vocab = counter.finish("criteo", min_count=3)
    kept = sorted(hash_token(t.encode()) for t, c in expected.items() if c >= 3)
    assert vocab.keys("C1").tolist() == kept
    assert vocab.distinct == {"C1": len(expected)}


# ---------------------------------------------------------------------------------------------------------------
# splits


def test_split_sizes_exact_and_by_largest_remainder():
    assert split_sizes(10_000, (8, 1, 1)) == (8000, 1000, 1000)
    assert split_sizes(10, (0, 0, 1)) == (0, 0, 10)
    for rows in [0, 1, 2, 7, 99, 1001, 12345]:
        for weights in [(8, 1, 1), (1, 1, 1), (3, 0, 2), (Fraction(7, 10), Fraction(2, 10), Fraction(1, 10))]:
            sizes = split_sizes(rows, weights)
            assert sum(sizes) == rows
            total = sum(Fraction(w) for w in weights)
            for size, weight in zip(sizes, weights):
                exact = rows * Fraction(weight) / total
                assert abs(size - exact) < 1  # never more than one row off the exact share
                if weight == 0:
                    assert size == 0


def test_split_assigner_exact_counts_independent_of_take_sizes():
    counts = (8000, 1000, 1000)
    one_go = SplitAssigner(counts, seed=0, file_index=0).take(10_000)
    assert np.bincount(one_go, minlength=3).tolist() == list(counts)
    assigner = SplitAssigner(counts, seed=0, file_index=0)
    rng = random.Random(0)
    pieces, left = [], 10_000
    while left:
        take = min(left, rng.randint(1, 3000))
        pieces.append(assigner.take(take))
        left -= take
    assert np.array_equal(np.concatenate(pieces), one_go)
    other_seed = SplitAssigner(counts, seed=1, file_index=0).take(10_000)
    assert not np.array_equal(other_seed, one_go)
    with pytest.raises(ValueError):
        assigner.take(1)


def test_split_assigner_is_uniform_over_positions():
    """Each row is in val with probability 0.1: over 200 seeds the first and last 1,000 rows get their share."""
    firsts, lasts = [], []
    for seed in range(200):
        labels = SplitAssigner((800, 100, 100), seed=seed, file_index=0).take(1000)
        firsts.append(labels[:100] == 1)
        lasts.append(labels[-100:] == 1)
    assert abs(np.mean(firsts) - 0.1) < 0.02 and abs(np.mean(lasts) - 0.1) < 0.02


def test_random_file_counts_total_is_exact():
    rows = [3333, 1, 0, 6666]
    counts = random_file_counts(rows, (8, 1, 1), seed=4)
    assert [sum(c) for c in counts] == rows
    assert tuple(map(sum, zip(*counts))) == split_sizes(sum(rows), (8, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# end to end


def test_hashing_conversion_encodes_every_row_as_the_reference(tmp_path):
    rows = criteo_rows(500, seed=1)
    src = write_lines(tmp_path / "day_0", rows)
    size = 1000
    result = convert(ConvertOptions("criteo-1tb", [str(src)], str(tmp_path / "out"), hash_size=size,
                                    hash_sizes="C2=7", progress=False))
    meta = result.metadata
    assert meta.field_names == CAT_NAMES and meta.vocab_sizes["C2"] == 7 and meta.vocab_sizes["C3"] == size
    assert meta.dense_fields == INT_NAMES
    seen = []
    for split, table in read_all(tmp_path / "out").items():
        assert table.schema.field("label").type == pa.int8()
        assert all(table.schema.field(c).type == pa.int64() for c in CAT_NAMES)
        assert all(table.schema.field("dense_" + c).type == pa.float32() for c in INT_NAMES)
        data = table.to_pydict()
        for i, index in enumerate(row_indices(table)):
            row = rows[index]
            seen.append(index)
            assert data["label"][i] == int(row[0])
            for j, name in enumerate(CAT_NAMES):
                table_size = 7 if name == "C2" else size
                assert data[name][i] == (hash_token(row[14 + j].encode()) >> 32) * table_size >> 32
            for j, name in enumerate(INT_NAMES):
                cell = row[1 + j]
                expected = math.log1p(max(int(cell), 0)) if cell else 0.0
                assert data["dense_" + name][i] == pytest.approx(expected, rel=1e-6)
    assert sorted(seen) == list(range(500))
    assert meta.split_rows() == {"train": 400, "val": 50, "test": 50}


def test_paper_conversion_vocabulary_equals_independent_count(tmp_path):
    rows = criteo_rows(600, seed=2, unique_c1=False)
    src = write_lines(tmp_path / "train.txt", rows)
    min_count = 5
    result = convert(ConvertOptions("criteo", [str(src)], str(tmp_path / "out"), min_count=min_count, progress=False))
    meta = result.metadata
    assert meta.field_names == INT_NAMES + CAT_NAMES
    tokens_by_field = {name: [paper_token(r[1 + j]) for r in rows] for j, name in enumerate(INT_NAMES)}
    tokens_by_field.update({name: [r[14 + j] for r in rows] for j, name in enumerate(CAT_NAMES)})
    tables = read_all(tmp_path / "out")
    for name, tokens in tokens_by_field.items():
        counts = collections.Counter(tokens)
        kept = {t for t, c in counts.items() if c >= min_count}
        assert meta.vocab_sizes[name] == len(kept) + 1, name
        assert meta.extra["distinct_tokens"][name] == len(counts), name
        # kept tokens map one-to-one onto 1..size-1, every rarer token to the OOV id 0
        ids_of_token: Dict[str, set] = collections.defaultdict(set)
        for table in tables.values():
            for index, token_id in zip(row_indices(table), table.column(name).to_pylist()):
                ids_of_token[tokens[index]].add(token_id)
        for token, ids in ids_of_token.items():
            assert len(ids) == 1, (name, token, ids)
            assert (next(iter(ids)) == 0) == (token not in kept), (name, token)
        kept_ids = sorted(next(iter(ids_of_token[t])) for t in kept)
        assert kept_ids == list(range(1, len(kept) + 1))


def test_every_row_lands_in_exactly_one_split(tmp_path):
    rows = criteo_rows(1000, seed=3)
    src = write_lines(tmp_path / "day_0", rows)
    convert(ConvertOptions("criteo", [str(src)], str(tmp_path / "out"), min_count=1, progress=False))
    tables = read_all(tmp_path / "out")
    meta = read_metadata(tmp_path / "out")
    # min_count 1: every C1 tag is its own id, so ids identify rows
    ids = [i for t in tables.values() for i in t.column("C1").to_pylist()]
    assert sorted(ids) == list(range(1, 1001))
    assert meta.split_rows() == {"train": 800, "val": 100, "test": 100}
    assert meta.rows_read == 1000 and meta.skipped == {}


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    src = write_lines(tmp_path / "day_0", criteo_rows(300, seed=4))

    def val_ids(seed, name):
        convert(ConvertOptions("criteo", [str(src)], str(tmp_path / name), min_count=1, seed=seed, progress=False))
        return sorted(read_split(tmp_path / name, "val").column("C1").to_pylist())

    assert val_ids(0, "a") == val_ids(0, "b")
    assert val_ids(0, "a") != val_ids(1, "c")


def test_small_chunks_give_the_same_dataset(tmp_path):
    """Chunk boundaries (lines cut across reads) change nothing: 97-byte reads against the default."""
    src = write_lines(tmp_path / "day_0", criteo_rows(200, seed=5))
    convert(ConvertOptions("criteo", [str(src)], str(tmp_path / "big"), min_count=2, progress=False))
    convert(ConvertOptions("criteo", [str(src)], str(tmp_path / "small"), min_count=2, chunk_bytes=97, progress=False))
    for split in ("train", "val", "test"):
        assert read_split(tmp_path / "big", split).equals(read_split(tmp_path / "small", split))


def test_crlf_gzip_and_missing_final_newline_give_identical_output(tmp_path):
    rows = criteo_rows(150, seed=6)
    plain = write_lines(tmp_path / "a.txt", rows)
    crlf = write_lines(tmp_path / "b.txt", rows, newline="\r\n")
    gz = write_lines(tmp_path / "c.txt.gz", rows, newline="\r\n")
    no_final = tmp_path / "d.txt"
    no_final.write_bytes(plain.read_bytes().rstrip(b"\n"))
    outs = []
    for src in (plain, crlf, gz, no_final):
        out = tmp_path / ("out_" + src.name)
        convert(ConvertOptions("criteo", [str(src)], str(out), min_count=2, progress=False))
        outs.append(out)
    reference = read_all(outs[0])
    for out in outs[1:]:
        other = read_all(out)
        assert other.keys() == reference.keys()
        for split in reference:
            assert other[split].equals(reference[split])
        assert read_metadata(out).vocab_fingerprint == read_metadata(outs[0]).vocab_fingerprint


def test_multiple_inputs_one_output_per_input_and_exact_total_split(tmp_path):
    srcs = [write_lines(tmp_path / f"day_{i}", criteo_rows(n, seed=10 + i)) for i, n in enumerate([333, 1, 666])]
    result = convert(ConvertOptions("criteo-1tb", [str(s) for s in srcs], str(tmp_path / "out"), hash_size=100,
                                    progress=False))
    meta = result.metadata
    assert meta.split_rows() == {"train": 800, "val": 100, "test": 100}
    assert [s["rows"] for s in meta.sources] == [333, 1, 666]
    for split, files in meta.splits.items():
        for f in files.files:
            assert f.startswith(f"{split}/part-000")
    per_input = collections.Counter(int(f.split("-")[1][:5]) for files in meta.splits.values() for f, r in
                                    zip(files.files, files.file_rows) for _ in range(r))
    assert per_input == {0: 333, 1: 1, 2: 666}


def test_split_by_file_puts_last_input_halves_in_val_and_test(tmp_path):
    srcs = [write_lines(tmp_path / f"day_{i}", criteo_rows(n, seed=20 + i)) for i, n in enumerate([40, 30, 21])]
    result = convert(ConvertOptions("criteo-1tb", [str(s) for s in srcs], str(tmp_path / "out"), hash_size=50,
                                    split_by_file=True, progress=False))
    assert result.metadata.split_rows() == {"train": 70, "val": 10, "test": 11}
    val = read_split(tmp_path / "out", "val").column("C1").to_pylist()
    test = read_split(tmp_path / "out", "test").column("C1").to_pylist()
    last = [r[14] for r in criteo_rows(21, seed=22)]
    assert val == [(hash_token(t.encode()) >> 32) * 50 >> 32 for t in last[:10]]
    assert test == [(hash_token(t.encode()) >> 32) * 50 >> 32 for t in last[10:]]


def test_vocab_from_round_trip_encodes_like_the_source(tmp_path):
    rows = criteo_rows(400, seed=7, unique_c1=False)
    day0 = write_lines(tmp_path / "day_0", rows[:300])
    day1 = write_lines(tmp_path / "day_1", rows[300:])
    first = convert(ConvertOptions("criteo", [str(day0)], str(tmp_path / "a"), min_count=2, progress=False))
    second = convert(ConvertOptions("criteo", [str(day1)], str(tmp_path / "b"), vocab_from=str(tmp_path / "a"),
                                    split="0,0,1", progress=False))
    assert second.metadata.vocab_fingerprint == first.metadata.vocab_fingerprint
    assert second.metadata.vocab_sizes == first.metadata.vocab_sizes
    assert second.metadata.split_rows() == {"train": 0, "val": 0, "test": 100}
    assert second.metadata.options["mode"] == "paper" and second.metadata.options["min_count"] == 2
    # Every day_1 token gets the id day_0's conversion gave it, and OOV when day_0 did not keep it.
    id_in_day0: Dict[str, Dict[str, int]] = collections.defaultdict(dict)
    for table in read_all(tmp_path / "a").values():
        for j, name in enumerate(CAT_NAMES):
            for index, token_id in zip(row_indices(table), table.column(name).to_pylist()):
                id_in_day0[name][rows[index][14 + j]] = token_id
    test = read_split(tmp_path / "b", "test")
    assert row_indices(test) == list(range(300, 400))  # --split 0,0,1 keeps file order
    for j, name in enumerate(CAT_NAMES):
        for index, token_id in zip(range(300, 400), test.column(name).to_pylist()):
            assert token_id == id_in_day0[name].get(rows[index][14 + j], 0), (name, index)


def test_vocab_from_hashing_conversion(tmp_path):
    src = write_lines(tmp_path / "day_0", criteo_rows(50, seed=8))
    first = convert(ConvertOptions("criteo-1tb", [str(src)], str(tmp_path / "a"), hash_sizes="mlperf", progress=False))
    assert first.metadata.vocab_sizes["C6"] == 3 and first.metadata.vocab_sizes["C1"] == 40_000_000
    second = convert(ConvertOptions("criteo-1tb", [str(src)], str(tmp_path / "b"), vocab_from=str(tmp_path / "a"),
                                    split="0,0,1", progress=False))
    assert second.metadata.vocab_fingerprint == first.metadata.vocab_fingerprint
    merged = pa.concat_tables([t for t in read_all(tmp_path / "a").values()])
    test = read_split(tmp_path / "b", "test")
    assert sorted(test.column("C1").to_pylist()) == sorted(merged.column("C1").to_pylist())


def test_avazu_header_id_dropped_and_hour_is_a_token(tmp_path):
    header = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
              "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
              "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
    rng = random.Random(9)
    rows = [[str(10**18 + i), str(rng.randint(0, 1)), "141021%02d" % rng.randrange(3)] +
            ["%x" % rng.randrange(4) for _ in range(21)] for i in range(80)]
    src = write_lines(tmp_path / "train.csv", rows, sep=",", header=header)
    result = convert(ConvertOptions("avazu", [str(src)], str(tmp_path / "out"), min_count=1, progress=False))
    meta = result.metadata
    assert meta.field_names == header[2:] and meta.dense_fields == []
    assert meta.vocab_sizes["hour"] == len({r[2] for r in rows}) + 1
    labels = sorted(i for t in read_all(tmp_path / "out").values() for i in t.column("label").to_pylist())
    assert labels == sorted(int(r[1]) for r in rows)
    assert "id" not in read_split(tmp_path / "out", "train").column_names


def test_resume_skips_complete_inputs_and_redoes_changed_ones(tmp_path, capsys):
    srcs = [write_lines(tmp_path / f"day_{i}", criteo_rows(100, seed=30 + i)) for i in range(2)]
    args = ["convert", "criteo-1tb", *map(str, srcs), "--out", str(tmp_path / "out"), "--hash-size", "64", "--quiet"]
    assert main(args) == 0
    first = read_all(tmp_path / "out")
    part1 = tmp_path / "out" / "train" / "part-00001.parquet"
    stamp = part1.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("already converted") == 2
    assert part1.stat().st_mtime_ns == stamp
    # day_0 changes but keeps its row count: only its outputs are rewritten
    write_lines(srcs[0], criteo_rows(100, seed=99))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("already converted") == 1 and str(srcs[1]) in out
    assert part1.stat().st_mtime_ns == stamp
    second = read_all(tmp_path / "out")
    assert not second["train"].equals(first["train"])


def test_interrupted_run_leaves_no_partial_output_and_resumes(tmp_path, monkeypatch):
    import multiembed.data.convert.write as convert_module

    srcs = [write_lines(tmp_path / f"day_{i}", criteo_rows(60, seed=40 + i)) for i in range(2)]
    options = ConvertOptions("criteo-1tb", [str(s) for s in srcs], str(tmp_path / "out"), hash_size=64, progress=False)
    real = convert_module.encode_table
    calls = {"n": 0}

    def crash_on_second_input(table, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(table, *args, **kwargs)

    monkeypatch.setattr(convert_module, "encode_table", crash_on_second_input)
    with pytest.raises(KeyboardInterrupt):
        convert(options)
    out = tmp_path / "out"
    assert not (out / "metadata.json").exists()
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    assert (out / "train" / "part-00000.parquet").exists() and not (out / "train" / "part-00001.parquet").exists()
    monkeypatch.setattr(convert_module, "encode_table", real)
    result = convert(options)
    assert result.reused == [str(srcs[0])] and result.converted == [str(srcs[1])]
    assert result.metadata.split_rows() == {"train": 96, "val": 12, "test": 12}


def test_skip_mode_keeps_good_rows_intact(tmp_path):
    """Bad rows are dropped and counted; the good rows around them keep their values."""
    rows = criteo_rows(120, seed=50)
    lines = ["\t".join(r) for r in rows]
    lines[5] = "\t".join(rows[5][:-1])  # 39 columns
    lines[17] = "\t".join([rows[17][0], "1.5"] + rows[17][2:])  # I1 not an integer
    lines[40] = "\t".join(["2"] + rows[40][1:])  # label 2
    lines[77] = "\t".join(rows[77][:20] + ["ab\x01"] + rows[77][21:])  # control character in C7
    bad = {5, 17, 40, 77}
    src = tmp_path / "day_0"
    src.write_text("\n".join(lines) + "\n")
    result = convert(ConvertOptions("criteo", [str(src)], str(tmp_path / "out"), min_count=1, on_error="skip",
                                    progress=False))
    meta = result.metadata
    assert meta.skipped == {"bad_integer": 1, "bad_label": 1, "bad_token": 1, "column_count": 1}
    assert meta.rows_read == 120 and sum(meta.split_rows().values()) == 116
    assert [e.split(":")[1] for e in meta.extra["skipped_examples"]] == ["6", "18", "41", "78"]
    seen = []
    for table in read_all(tmp_path / "out").values():
        for index, label, dense in zip(row_indices(table), table.column("label").to_pylist(),
                                       table.column("dense_I4").to_pylist()):
            seen.append(index)
            assert label == int(rows[index][0])
            cell = rows[index][4]
            assert dense == pytest.approx(math.log1p(max(int(cell), 0)) if cell else 0.0, rel=1e-6)
    assert sorted(seen) == [i for i in range(120) if i not in bad]


def test_convert_and_inspect_do_not_import_torch(tmp_path):
    src = write_lines(tmp_path / "day_0", criteo_rows(20, seed=60))
    code = (
        "import sys; from multiembed.cli import main; "
        f"rc = main(['convert', 'criteo', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}, '--quiet']); "
        f"rc2 = main(['inspect', {str(tmp_path / 'out')!r}, '--json']); "
        "heavy = [m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules]; "
        "print('RESULT', rc, rc2, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "RESULT 0 0 []" in out.stdout, out.stdout + out.stderr
