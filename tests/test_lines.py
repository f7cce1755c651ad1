"""The per-line encoder (``multiembed.data.lines``) against the converter's chunked reader.

Every line of the real samples in ../shared/data (Criteo Kaggle, Criteo 1TB, Avazu; paper and hashing mode) gets
the ids, dense features and labels ``ChunkParser`` + ``encode_table`` give, whether encoded alone, in small
batches or all at once; crafted lines (bad ones, and valid ones in rarer spellings) are accepted, encoded or refused
with the converter's own message. The vocabularies' all-fields lookups equal their field-by-field ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pytest

from multiembed.data.encode import encode_table
from multiembed.data.formats import HASHING_MODE, PAPER_MODE, RawFormat, raw_format
from multiembed.data.lines import LineEncoder
from multiembed.data.rawlog import ChunkParser, InputError, RawChunk, iter_chunks, row_layout
from multiembed.data.tokens import hash_spans, hash_token
from multiembed.data.vocab import CountedVocabulary, HashingVocabulary, VocabularyCounter, Vocabulary, field_keys

SEED = 7
REAL = [("criteo_dac_train_head10k.txt", "criteo"), ("criteo_1tb_day0_head1k.txt", "criteo-1tb"),
        ("avazu_train_head10k.csv", "avazu")]


def _vocabulary(fmt: RawFormat, mode: str, tables: Sequence[pa.Table], min_count: int = 2) -> Vocabulary:
    """Paper mode: the tokens of ``tables`` seen ``min_count`` times; hashing mode: a different size per field."""
    fields = fmt.fields(mode)
    if mode == HASHING_MODE:
        return HashingVocabulary(fmt.name, {f: 1000 + 37 * i for i, f in enumerate(fields)}, SEED)
    counter = VocabularyCounter(fields)
    for table in tables:
        for field in fields:
            counter.add(field, field_keys(fmt, mode, table.column(field), field, SEED))
    return counter.finish(fmt.name, min_count, SEED)


def _chunked(path: Path, fmt: RawFormat, mode: str) -> Tuple[Vocabulary, Dict[str, np.ndarray]]:
    """The vocabulary of the file and its columns as the converter's chunked reader encodes them."""
    parser = ChunkParser(fmt, str(path))
    tables = [parser.parse(chunk).table for chunk in iter_chunks(path, fmt)]
    vocab = _vocabulary(fmt, mode, tables)
    parts = [encode_table(table, fmt, mode, vocab, SEED) for table in tables]
    return vocab, {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _assert_same(got: Dict[str, np.ndarray], expected: Dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name, column in expected.items():
        assert got[name].dtype == column.dtype, name
        # Bit for bit: the dense floats too.
        assert got[name].tobytes() == column.tobytes(), name


def _concat(parts: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


@pytest.mark.parametrize("mode", [PAPER_MODE, HASHING_MODE])
@pytest.mark.parametrize("name,format_name", REAL)
def test_every_real_line_encodes_as_the_converter_does(shared_data: Path, name: str, format_name: str,
                                                       mode: str) -> None:
    path = shared_data / name
    fmt = row_layout(path, raw_format(format_name))
    vocab, expected = _chunked(path, fmt, mode)
    lines = path.read_bytes().splitlines(keepends=True)[int(fmt.header):]
    assert len(lines) == len(expected[fmt.fields(mode)[0]]) >= 1000
    if mode == PAPER_MODE:  # the comparison covers kept tokens and the out-of-vocabulary id
        ids = np.stack([expected[f] for f in fmt.fields(mode)])
        assert (ids == 0).any() and (ids > 0).mean() > 0.5
    encoder = LineEncoder(fmt, mode, vocab, SEED, str(path))
    # Real lines take the vectorised path: that is what the comparison checks.
    assert all(encoder.is_plain(line) for line in lines)
    first = 1 + int(fmt.header)
    _assert_same(encoder.encode(lines, first).columns(), expected)
    _assert_same(_concat([encoder.encode([line], first + i).columns() for i, line in enumerate(lines)]), expected)
    sizes = [2, 3, 5, 8, 13, 64]
    batches, start = [], 0
    while start < len(lines):
        size = sizes[len(batches) % len(sizes)]
        batches.append(encoder.encode(lines[start : start + size], first + start).columns())
        start += size
    _assert_same(_concat(batches), expected)


# ------------------------------------------------------------------------------------------------------------------
# Crafted lines: each outcome (columns, kept rows and skips, or the error message) equals the converter's on the
# same lines as one chunk.

CRITEO_INTS = ["1", "-1", "", "20", "3", "1000", "0", "5", "", "2", "1", "", "7"]
CRITEO_CATS = ["68fd1e64", "80e26c9b", "", "1f89b562", "a73ee510", "3b08e48b", "7c6e0ff8", "0b153874", "a73ee510",
               "9f32b866", "b28479f6", "", "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c", "",
               "3a171ecb", "c5c50484", "e8b83407", "9727dd16", "25c83c98", "7e0ccccf", "de7995b8", "1f89b562"]


def _criteo(label: str = "0", ints: Sequence[str] = CRITEO_INTS, cats: Sequence[str] = CRITEO_CATS) -> bytes:
    return "\t".join([label, *ints, *cats]).encode()


def _criteo_with(index: int, cell: "str | bytes") -> bytes:
    cells = _criteo().split(b"\t")
    cells[index] = cell.encode() if isinstance(cell, str) else cell
    return b"\t".join(cells)


AVAZU_BASE = ("1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
              "ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79")


def _avazu_with(index: int, cell: str) -> bytes:
    cells = AVAZU_BASE.split(",")
    cells[index] = cell
    return ",".join(cells).encode()


CRITEO_LINES = {
    "plain": _criteo(),
    "crlf": _criteo() + b"\r",
    "label 1": _criteo("1"),
    "too few columns": b"\t".join(_criteo().split(b"\t")[:-1]),
    "too many columns": _criteo() + b"\tx",
    "empty line": b"",
    "spaces only": b"   ",
    "bad integer": _criteo_with(3, "abc"),
    "decimal integer": _criteo_with(3, "1.5"),
    "nan integer": _criteo_with(3, "nan"),
    "overflowing integer": _criteo_with(3, "99999999999999999999"),
    "19-digit integer": _criteo_with(3, "1000000000000000000"),
    "int64 max": _criteo_with(3, "9223372036854775807"),
    "int64 min": _criteo_with(3, "-9223372036854775808"),
    "leading zeros": _criteo_with(3, "007"),
    "minus zero": _criteo_with(3, "-0"),
    "plus sign": _criteo_with(3, "+5"),
    "spaced integer": _criteo_with(3, " 5 "),
    "hex integer": _criteo_with(3, "0x1f"),
    "very negative integer": _criteo_with(3, "-5000"),
    "bad label": _criteo("2"),
    "empty label": _criteo(""),
    "spaced label": _criteo(" 1"),
    "carriage return inside": _criteo_with(20, "ab\rcd"),
    "control character": _criteo_with(20, "ab\x01cd"),
    "DEL in a token": _criteo_with(20, "ab\x7fcd"),
    "invalid utf-8": _criteo_with(20, b"\xff\xfe"),
    "utf-8 token": _criteo_with(20, "caf\u00e9"),
    "token of 4096 bytes": _criteo_with(20, "a" * 4096),
    "token of 4097 bytes": _criteo_with(20, "a" * 4097),
    "token of 17 bytes": _criteo_with(20, "abcdefghijklmnopq"),
    "quote in a token": _criteo_with(20, 'a"b'),
    "space in a token": _criteo_with(20, "a b"),
}
AVAZU_LINES = {
    "plain": AVAZU_BASE.encode(),
    "crlf": AVAZU_BASE.encode() + b"\r",
    "quoted token": _avazu_with(3, '"1005"'),
    "doubled quote": _avazu_with(5, '"a""b"'),
    "unclosed quote": _avazu_with(5, '"abc'),
    "quoted label": _avazu_with(1, '"1"'),
    "tab in a token": _avazu_with(5, "a\tb"),
    "odd id": _avazu_with(0, "x y"),
    "too few columns": b",".join(AVAZU_BASE.encode().split(b",")[:-1]),
    "bad label": _avazu_with(1, "3"),
    "empty line": b"",
}


def _outcome_of_converter(fmt: RawFormat, mode: str, vocab: Vocabulary, lines: Sequence[bytes], first_line: int,
                          on_error: str) -> Tuple:
    parser = ChunkParser(fmt, "request", on_error)
    data = b"".join(line + b"\n" for line in lines)
    try:
        parsed = parser.parse(RawChunk(memoryview(data), first_line, 0, len(lines)))
    except InputError as e:
        return ("refused", str(e))
    rows = parsed.rows if parsed.rows is not None else np.arange(parsed.table.num_rows)
    return ("kept", encode_table(parsed.table, fmt, mode, vocab, SEED), rows.tolist(), dict(parsed.skipped))


def _outcome_of_lines(encoder: LineEncoder, lines: Sequence[bytes], first_line: int) -> Tuple:
    try:
        encoded = encoder.encode(lines, first_line)
    except InputError as e:
        return ("refused", str(e))
    return ("kept", encoded.columns(), encoded.rows.tolist(), dict(encoded.skipped))


def _assert_same_outcome(got: Tuple, expected: Tuple) -> None:
    assert got[0] == expected[0], (got[:1] + got[2:] if got[0] == "kept" else got, expected)
    if got[0] == "refused":
        assert got[1] == expected[1]
    else:
        _assert_same(got[1], expected[1])
        assert got[2:] == expected[2:]


def _crafted(format_name: str) -> Tuple[RawFormat, Dict[str, bytes]]:
    return (raw_format("criteo"), CRITEO_LINES) if format_name == "criteo" else (raw_format("avazu"), AVAZU_LINES)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize("mode", [PAPER_MODE, HASHING_MODE])
@pytest.mark.parametrize("format_name", ["criteo", "avazu"])
def test_crafted_lines_are_kept_encoded_or_refused_as_the_converter_does(format_name: str, mode: str,
                                                                         on_error: str) -> None:
    fmt, crafted = _crafted(format_name)
    plain = crafted["plain"]
    parser = ChunkParser(fmt, "vocab")
    vocab = _vocabulary(fmt, mode, [parser.parse(RawChunk(memoryview(plain + b"\n"), 1, 0, 1)).table], min_count=1)
    encoder = LineEncoder(fmt, mode, vocab, SEED, "request", on_error)
    refused = kept_odd = 0
    for name, line in crafted.items():
        expected = _outcome_of_converter(fmt, mode, vocab, [line], 5, on_error)
        _assert_same_outcome(_outcome_of_lines(encoder, [line], 5), expected)
        refused += expected[0] == "refused" or (expected[0] == "kept" and not expected[2])
        kept_odd += expected[0] == "kept" and bool(expected[2]) and not encoder.is_plain(line)
    assert refused >= 5 and kept_odd >= 3  # both sides of the fallback are exercised
    # Mixed in one request: the message names the first bad line's number; skip keeps the others in order.
    lines = list(crafted.values())
    for start in range(0, len(lines), 4):
        batch = [plain, *lines[start : start + 4], plain]
        _assert_same_outcome(_outcome_of_lines(encoder, batch, 10),
                             _outcome_of_converter(fmt, mode, vocab, batch, 10, on_error))


def test_crlf_and_str_lines_encode_like_their_plain_bytes() -> None:
    fmt = raw_format("criteo")
    vocab = _vocabulary(fmt, HASHING_MODE, [])
    encoder = LineEncoder(fmt, HASHING_MODE, vocab, SEED)
    line = _criteo("1")
    expected = encoder.encode([line]).columns()
    for variant in (line + b"\n", line + b"\r\n", line.decode(), line.decode() + "\n"):
        assert encoder.is_plain(variant)
        _assert_same(encoder.encode([variant]).columns(), expected)


def test_an_item_holding_a_newline_is_refused_in_one_line() -> None:
    fmt = raw_format("criteo")
    encoder = LineEncoder(fmt, HASHING_MODE, _vocabulary(fmt, HASHING_MODE, []), SEED, "request")
    with pytest.raises(InputError) as refused:
        encoder.encode([_criteo(), _criteo() + b"\n" + _criteo()], first_line=3)
    assert str(refused.value) == "request:4: line: holds a newline; pass one line per item"


def test_unlabelled_lines_have_no_labels_and_the_same_ids() -> None:
    fmt = raw_format("criteo")
    vocab = _vocabulary(fmt, PAPER_MODE, [ChunkParser(fmt, "v").parse(RawChunk(memoryview(_criteo() + b"\n"), 1, 0, 1)).table],
                        min_count=1)
    labelled = LineEncoder(fmt, PAPER_MODE, vocab, SEED).encode([_criteo("1")])
    unlabelled = LineEncoder(fmt.unlabelled(), PAPER_MODE, vocab, SEED).encode([_criteo("1").split(b"\t", 1)[1]])
    assert unlabelled.labels is None and labelled.labels.tolist() == [1]
    assert np.array_equal(unlabelled.ids, labelled.ids) and (labelled.ids > 0).all()
    assert unlabelled.dense.tobytes() == labelled.dense.tobytes()


def test_a_vocabulary_field_outside_the_format_is_refused() -> None:
    fmt = raw_format("criteo")
    with pytest.raises(ValueError, match="integer columns are categorical fields only in paper mode"):
        LineEncoder(fmt, HASHING_MODE, HashingVocabulary(fmt.name, {"I1": 10}), SEED)
    with pytest.raises(ValueError, match="are not columns of the criteo format"):
        LineEncoder(fmt, HASHING_MODE, HashingVocabulary(fmt.name, {"site_id": 10}), SEED)


# ------------------------------------------------------------------------------------------------------------------
# The vectorised pieces


def test_counted_encode_fields_equals_field_by_field_lookups() -> None:
    rng = np.random.default_rng(0)
    keys = {
        "a": np.unique(rng.integers(0, 2**63, 500, dtype=np.uint64) * np.uint64(2)),
        # Keys that differ only in their low bits share a tag: the lookup resolves them through the field.
        "b": np.array([8, 9, 10, 11, 64, 2**64 - 4, 2**64 - 3, 2**64 - 1], dtype=np.uint64),
        "empty": np.zeros(0, dtype=np.uint64),
    }
    vocab = CountedVocabulary("criteo", keys, min_count=1)
    queries = np.stack([
        np.concatenate([keys["a"][:50], keys["a"][:50] + np.uint64(1), rng.integers(0, 2**63, 20, dtype=np.uint64)]),
        np.resize(np.array([8, 9, 10, 11, 12, 64, 65, 2**64 - 1, 2**64 - 2, 2**64 - 3, 0], dtype=np.uint64), 120),
        rng.integers(0, 2**63, 120, dtype=np.uint64),
    ], axis=1)
    got = vocab.encode_fields(queries)
    expected = np.stack([vocab.encode(f, queries[:, j]) for j, f in enumerate(vocab.fields)], axis=1)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert (got[:, 0] > 0).sum() == 50 and set(got[:, 1].tolist()) == {0, 1, 2, 3, 4, 5, 7, 8}
    assert not got[:, 2].any()


def test_hashing_encode_fields_equals_field_by_field_lookups() -> None:
    vocab = HashingVocabulary("criteo-1tb", {"C1": 10, "C2": 1000, "C3": 2**32}, seed=3)
    keys = np.random.default_rng(1).integers(0, 2**64 - 1, (100, 3), dtype=np.uint64)
    expected = np.stack([vocab.encode(f, keys[:, j].copy()) for j, f in enumerate(vocab.fields)], axis=1)
    assert np.array_equal(vocab.encode_fields(keys), expected)


def test_hash_spans_equals_the_reference_hash_anywhere_in_a_buffer() -> None:
    tokens = [b"", b"a", b"68fd1e64", b"abcdefghi", b"x" * 17, "caf\u00e9".encode(), b"\t\t"]
    data = b"|".join(tokens)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    starts = np.cumsum(lengths + 1) - lengths - 1
    got = hash_spans(np.frombuffer(data, dtype=np.uint8), starts, lengths, SEED)
    assert got.tolist() == [hash_token(t, SEED) for t in tokens]
