"""Vectorised token functions of the converter: a stable 64-bit string hash, paper binning, dense transforms.

Every function works on whole Arrow / numpy columns (no Python loop per row), because conversion speed is bounded
by them once pyarrow has parsed the CSV.

The hash (``multiembed-hash64-v1``) is a fixed function of a token's bytes and a seed, identical across runs,
processes and machines (unlike Python's ``hash``, which is salted per process). pyarrow has no string hash kernel and
numpy none either, so it is built here from numpy integer ops on the Arrow string buffers: with ``n = len(b)``,
``w_k`` the little-endian 64-bit words of ``b`` zero-padded to a multiple of 8 bytes, and ``fmix64`` MurmurHash3's
64-bit finaliser (all arithmetic modulo 2**64)::

    K = 0x9E3779B97F4A7C15
    length_term(n) = fmix64(seed XOR n*K)
    P_k            = fmix64(seed + (k+1)*K) OR 1          # an odd multiplier per word position
    hash64(b)      = fmix64(length_term(n) + sum_k w_k * P_k)

Tokens of different lengths differ in ``length_term``; tokens of the same length that differ in one word differ in
the sum (``P_k`` is odd, so ``w -> w * P_k`` is a bijection); ``fmix64`` spreads the result over all bits, so the high
32 bits pick hash buckets (:func:`bucketize`). :func:`hash_token` is the one-token reference implementation.
"""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HASH_NAME = "multiembed-hash64-v1"
# The longest categorical token accepted (real Criteo / Avazu tokens have at most 20 bytes); a longer one is
# reported as a bad token: it is almost always a broken line, and it bounds the hash's work per token.
MAX_TOKEN_BYTES = 4096
# The largest table bucketize() maps into: it uses the hash's high 32 bits.
MAX_HASH_SIZE = 1 << 32
# Paper binning and the token of an empty integer cell.
NULL_TOKEN = "NULL"

_M64 = (1 << 64) - 1
_K = 0x9E3779B97F4A7C15
_C1 = 0xFF51AFD7ED558CCD
_C2 = 0xC4CEB9FE1A85EC53


def _fmix64_int(x: int) -> int:
    x &= _M64
    x ^= x >> 33
    x = (x * _C1) & _M64
    x ^= x >> 33
    x = (x * _C2) & _M64
    x ^= x >> 33
    return x


def hash_token(token: bytes, seed: int = 0) -> int:
    """``hash64`` of one token (the reference the vectorised :func:`hash_tokens` must equal).

    Example::

        >>> hash_token(b"05db9164") == hash_token(b"05db9164") != hash_token(b"05db9165")
        True
    """
    seed &= _M64
    n = len(token)
    acc = _fmix64_int(seed ^ ((n * _K) & _M64))
    padded = token + b"\0" * (-n % 8)
    for k in range(len(padded) // 8):
        word = int.from_bytes(padded[8 * k : 8 * k + 8], "little")
        multiplier = _fmix64_int(seed + (k + 1) * _K) | 1
        acc = (acc + word * multiplier) & _M64
    return _fmix64_int(acc)


_U33 = np.uint64(33)
_UC1 = np.uint64(_C1)
_UC2 = np.uint64(_C2)


def _fmix64_inplace(x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    np.right_shift(x, _U33, out=scratch)
    np.bitwise_xor(x, scratch, out=x)
    np.multiply(x, _UC1, out=x)
    np.right_shift(x, _U33, out=scratch)
    np.bitwise_xor(x, scratch, out=x)
    np.multiply(x, _UC2, out=x)
    np.right_shift(x, _U33, out=scratch)
    np.bitwise_xor(x, scratch, out=x)
    return x


# Byte masks keeping the first r bytes of a little-endian word, r = 0..8.
_TAIL_MASKS = np.array([(1 << (8 * r)) - 1 for r in range(8)] + [_M64], dtype=np.uint64)


class _SeedTables:
    """Per-seed constants: length terms for every accepted length and the per-word multipliers."""

    def __init__(self, seed: int) -> None:
        seed &= _M64
        self.length_terms = np.array(
            [_fmix64_int(seed ^ ((n * _K) & _M64)) for n in range(MAX_TOKEN_BYTES + 1)], dtype=np.uint64
        )
        words = (MAX_TOKEN_BYTES + 7) // 8
        self.multipliers = np.array(
            [_fmix64_int(seed + (k + 1) * _K) | 1 for k in range(words)], dtype=np.uint64
        )


_SEED_TABLES: dict = {}


def _seed_tables(seed: int) -> _SeedTables:
    tables = _SEED_TABLES.get(seed)
    if tables is None:
        tables = _SEED_TABLES[seed] = _SeedTables(seed)
    return tables


def string_offsets_and_data(array: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """Zero-copy views of a (large_)string/binary array's offsets (``len + 1``, absolute) and data bytes."""
    offset_type = np.int64 if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type) else np.int32
    _, offsets_buf, data_buf = array.buffers()[:3]
    itemsize = np.dtype(offset_type).itemsize
    offsets = np.frombuffer(offsets_buf, dtype=offset_type, count=len(array) + 1, offset=array.offset * itemsize)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return offsets, data


def token_lengths(array: pa.Array) -> np.ndarray:
    """Byte length of every token (null slots count as empty), shape ``[len(array)]``."""
    offsets, _ = string_offsets_and_data(array)
    return np.diff(offsets)


def hash_tokens(array: pa.Array, seed: int = 0) -> np.ndarray:
    """``hash64`` of every token of a string or binary array, vectorised.

    Null slots hash as the empty token (Arrow writes them with zero length).

    Args:
        array: ``pa.string()`` / ``pa.binary()`` (or large) array of tokens of at most ``MAX_TOKEN_BYTES`` bytes.
        seed: hash seed.

    Returns:
        uint64 array, shape ``[len(array)]``.

    Raises:
        ValueError: a token is longer than ``MAX_TOKEN_BYTES`` (callers check lengths first to name the row).
    """
    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([hash_tokens(chunk, seed) for chunk in array.chunks])
    offsets, data = string_offsets_and_data(array)
    if len(array) == 0:
        return np.zeros(0, dtype=np.uint64)
    # int64 positions: numpy gathers with them faster than with Arrow's int32 offsets.
    return hash_spans(data, offsets[:-1].astype(np.int64), np.diff(offsets), seed)


def hash_spans(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """``hash64`` of the tokens ``data[starts[i] : starts[i] + lengths[i]]``, vectorised (the core of
    :func:`hash_tokens`; tokens may lie anywhere in ``data``, e.g. the cells of raw lines between their delimiters).

    Args:
        data: uint8 ``[bytes]``.
        starts: int64 ``[n]`` first byte of every token.
        lengths: integer ``[n]`` byte length of every token, at most ``MAX_TOKEN_BYTES``.
        seed: hash seed.

    Returns:
        uint64 array, shape ``[n]``.

    Raises:
        ValueError: a token is longer than ``MAX_TOKEN_BYTES``.
    """
    n = len(starts)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    tables = _seed_tables(seed)
    longest = int(lengths.max())
    if longest > MAX_TOKEN_BYTES:
        raise ValueError(f"token of {longest} bytes (at most {MAX_TOKEN_BYTES} accepted)")
    # Eight zero bytes after the data let every word read start anywhere in it; the strided view reads the
    # (unaligned) 64-bit word starting at each byte.
    padded = np.empty(len(data) + 8, dtype=np.uint8)
    padded[: len(data)] = data
    padded[len(data) :] = 0
    words_at = np.ndarray(shape=(len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
    scratch = np.empty(n, dtype=np.uint64)

    acc = words_at[starts]
    acc &= np.take(_TAIL_MASKS, np.minimum(lengths, 8))
    acc *= tables.multipliers[0]
    acc += np.take(tables.length_terms, lengths)
    if longest > 8:
        # Longer tokens are rare: walk their further words on the shrinking subset that still has bytes left.
        rows = np.flatnonzero(lengths > 8)
        for k in range(1, (longest + 7) // 8):
            remaining = lengths[rows] - 8 * k
            keep = remaining > 0
            rows, remaining = rows[keep], remaining[keep]
            word = words_at[starts[rows] + 8 * k]
            word &= np.take(_TAIL_MASKS, np.minimum(remaining, 8))
            word *= tables.multipliers[k]
            acc[rows] += word
    return _fmix64_inplace(acc, scratch)


def bucketize(hashes: np.ndarray, size: Union[int, np.ndarray]) -> np.ndarray:
    """Maps 64-bit hashes to ids in ``[0, size)`` with the high 32 bits (``(h >> 32) * size >> 32``).

    A multiply-shift instead of ``h % size``: a 64-bit modulo costs several times more per value, and the high bits
    of ``fmix64`` output are as uniform as the low ones.

    Args:
        hashes: uint64, any shape.
        size: the table size, or one size per column of ``hashes`` (integer ``[F]`` for hashes ``[n, F]``).

    Returns:
        int64 array, same shape as ``hashes``.

    Raises:
        ValueError: a size outside ``[1, 2**32]``.
    """
    sizes = np.asarray(size)
    if sizes.size and not (1 <= int(sizes.min()) and int(sizes.max()) <= MAX_HASH_SIZE):
        raise ValueError(f"hash size must be in [1, {MAX_HASH_SIZE}], got {size}")
    high = hashes >> np.uint64(32)
    high *= sizes.astype(np.uint64)
    high >>= np.uint64(32)
    return high.view(np.int64)


def int_values_and_validity(array: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """int64 values (0 where null) and a validity mask of an int64 Arrow array (chunked arrays are combined)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    valid = np.ones(len(array), dtype=bool) if array.null_count == 0 else array.is_valid().to_numpy(zero_copy_only=False)
    values = array.fill_null(0).to_numpy() if array.null_count else array.to_numpy()
    return values, valid


def dense_log1p(column: Union[pa.Array, pa.ChunkedArray]) -> np.ndarray:
    """The dense feature of an int64 column: ``log(1 + max(x, 0))``, 0 for empty (null) cells; float32 ``[n]``.

    Nulls become 0 first, and log(1 + max(0, 0)) is 0, so empty cells need no separate mask.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = np.empty(len(column), dtype=np.float32)
    position = 0
    for chunk in chunks:
        values = chunk.fill_null(0).to_numpy() if chunk.null_count else chunk.to_numpy()
        log1p_clipped(values, out[position : position + len(values)])
        position += len(values)
    return out


def log1p_clipped(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = log(1 + max(values, 0))`` in float32 (the core of :func:`dense_log1p`; empty cells hold 0).

    Args:
        values: int64, any shape.
        out: float32 of the same shape, written in place.

    Returns:
        ``out``.
    """
    np.maximum(values, 0, out=out, casting="unsafe")
    np.log1p(out, out=out)
    return out


def paper_bins(values: np.ndarray) -> np.ndarray:
    """The paper's integer binning, vectorised: ``int(ln(v)**2)`` for ``v > 2``, else ``v - 2`` (int64 ``[n]``)."""
    big = values > 2
    logs = np.log(np.where(big, values, 3).astype(np.float64))
    bins = np.where(big, np.floor(logs * logs).astype(np.int64), values - 2)
    return bins


def paper_int_tokens(array: pa.Array) -> pa.Array:
    """The paper's token of every integer cell as a string array: ``"NULL"`` when empty, else the bin."""
    values, valid = int_values_and_validity(array)
    tokens = pa.array(paper_bins(values)).cast(pa.string())
    if valid.all():
        return tokens
    return pc.if_else(pa.array(valid), tokens, pa.scalar(NULL_TOKEN))


# Bins of v > 2 lie in [1, int(ln(2**63)**2)] = [1, 1907]; v - 2 for small and negative v is rarely below -1000.
_BIN_LOW, _BIN_HIGH = -1024, 1907
_BIN_KEY_TABLES: dict = {}


def _bin_key_table(seed: int) -> np.ndarray:
    table = _BIN_KEY_TABLES.get(seed)
    if table is None:
        table = np.array(
            [hash_token(str(b).encode(), seed) for b in range(_BIN_LOW, _BIN_HIGH + 1)] + [hash_token(b"NULL", seed)],
            dtype=np.uint64,
        )
        _BIN_KEY_TABLES[seed] = table
    return table


def paper_int_keys(array: Union[pa.Array, pa.ChunkedArray], seed: int = 0) -> np.ndarray:
    """``hash64`` of the paper token of every integer cell, equal to ``hash_tokens(paper_int_tokens(array))``."""
    values, valid = int_values_and_validity(array)
    return paper_value_keys(values, valid, seed)


def paper_value_keys(values: np.ndarray, valid: np.ndarray, seed: int = 0) -> np.ndarray:
    """``hash64`` of the paper token of integer cells given as values and a validity mask (the core of
    :func:`paper_int_keys`).

    The tokens of the usual bins are hashed once into a lookup table; only cells whose bin falls outside it (v - 2
    below -1024) are turned into strings and hashed.

    Args:
        values: int64 ``[n]`` (any value where not valid).
        valid: bool ``[n]``: False for an empty cell (token ``"NULL"``).
        seed: hash seed.

    Returns:
        uint64 ``[n]``.
    """
    bins = paper_bins(values)
    table = _bin_key_table(seed)
    index = bins - _BIN_LOW
    # Bins below the table wrap around to huge unsigned indices: one comparison finds both sides.
    outside = index.view(np.uint64) > np.uint64(_BIN_HIGH - _BIN_LOW)
    index[~valid] = len(table) - 1
    keys = np.take(table, index, mode="clip")
    outside &= valid
    if outside.any():
        keys[outside] = hash_tokens(pa.array(bins[outside]).cast(pa.string()), seed)
    return keys
