"""Vocabularies: how a field's raw tokens become embedding-table ids.

Every token first becomes a 64-bit key, ``hash64`` of the token's bytes (:mod:`multiembed.data.tokens`); in paper
mode an integer cell's token is its bin as the paper's code writes it (``"NULL"``, ``"-3"``, ``"15"``).

* :class:`HashingVocabulary` (DLRM / MLPerf style): ``id = bucketize(key, size)``. Nothing to count and nothing to
  store: memory stays bounded whatever the input.
* :class:`ManagedVocabulary`: ``id = key >> 1``, the token's 63-bit key, kept whole. Nothing is counted or cut at
  conversion and no table size is chosen: a managed-collision training run maps keys to table rows as they arrive
  (:mod:`multiembed.models.managed`), so ids that appear only in later days still get rows of their own.
* :class:`CountedVocabulary` (the paper's): the keys seen at least ``min_count`` times, sorted; a kept key's id is
  ``1 + its rank``, every other token shares the out-of-vocabulary id 0. Built by :class:`VocabularyCounter`,
  whose memory grows with the number of distinct (field, token) pairs: 16 bytes each (key and count), plus sort
  scratch of about the same size for the largest field while it merges.

Distinct tokens could share a 64-bit key; with the ~3.4e7 distinct tokens of Criteo Kaggle the chance that any two
do is about 3e-5, and such a pair would only share an id.

A vocabulary's ``fingerprint`` is a SHA-256 over its mode, the hash, the dataset, the fields and every field's
key -> id map (paper mode) or table size (hashing mode; managed mode has neither): two conversions share it exactly when they encode every
token the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from multiembed.data.formats import HASHING_MODE, MANAGED_MODE, PAPER_MODE, RawFormat
from multiembed.data.metadata import DatasetError, atomic_write
from multiembed.data.tokens import HASH_NAME, bucketize, hash_tokens, paper_int_keys

VOCAB_FILE = "vocab.npz"
# Version of the token rules (paper binning, empty integer -> "NULL", hash64-v1): part of every fingerprint.
TOKEN_RULES = "paper-bins-v1"
OOV_ID = 0
# Managed mode's ids: ``[0, MANAGED_ID_SPACE)``. TorchRec's MCH modules mark an empty slot with the int64 maximum
# (which is MANAGED_ID_SPACE) and take ``2**63 - 1`` as their default input range, so no id may reach it.
MANAGED_ID_SPACE = (1 << 63) - 1


def field_keys(fmt: RawFormat, mode: str, column: pa.ChunkedArray, field: str, seed: int) -> np.ndarray:
    """The uint64 key of every cell of one field's column, ``[rows]``.

    Args:
        fmt: the raw format (tells integer from categorical columns).
        mode: ``paper`` or ``hashing``.
        column: the parsed column (int64 for integer columns, string for categorical ones).
        field: the field name.
        seed: hash seed.
    """
    if field in fmt.int_columns:
        if mode != PAPER_MODE:
            raise ValueError(f"field {field}: integer columns are categorical fields only in paper mode")
        return paper_int_keys(column, seed)
    return hash_tokens(column, seed)


def _digest(header: Mapping[str, object], arrays: Sequence[np.ndarray] = ()) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for array in arrays:
        h.update(np.ascontiguousarray(array, dtype="<u8").tobytes())
    return h.hexdigest()


class HashingVocabulary:
    """``id = bucketize(hash64(token), size)`` per field.

    Args:
        dataset: the raw format name (part of the fingerprint: Kaggle and 1TB tokens differ).
        sizes: ``{field: table size}`` in schema order, each in ``[1, 2**32]``.
        seed: hash seed.

    Example::

        >>> import pyarrow as pa
        >>> vocab = HashingVocabulary("criteo-1tb", {"C1": 100})
        >>> ids = vocab.encode("C1", hash_tokens(pa.array(["68fd1e64", ""])))
        >>> bool(((ids >= 0) & (ids < 100)).all())
        True
    """

    mode = HASHING_MODE

    def __init__(self, dataset: str, sizes: Mapping[str, int], seed: int = 0) -> None:
        for field, size in sizes.items():
            if not 1 <= int(size) <= 1 << 32:
                raise ValueError(f"hash size of {field} must be in [1, 2**32], got {size}")
        self.dataset = dataset
        self.fields = list(sizes)
        self._sizes = {f: int(s) for f, s in sizes.items()}
        self._size_array = np.array([self._sizes[f] for f in self.fields], dtype=np.int64)
        self.seed = seed
        self.fingerprint = _digest(
            {"mode": self.mode, "hash": HASH_NAME, "rules": TOKEN_RULES, "dataset": dataset, "seed": seed,
             "sizes": [[f, s] for f, s in self._sizes.items()]}
        )

    @property
    def sizes(self) -> Dict[str, int]:
        return dict(self._sizes)

    def encode(self, field: str, keys: np.ndarray) -> np.ndarray:
        """int64 ids in ``[0, size)`` of ``keys`` (uint64 ``[n]``)."""
        return bucketize(keys, self._sizes[field])

    def encode_fields(self, keys: np.ndarray) -> np.ndarray:
        """int64 ids ``[n, F]`` of keys ``[n, F]`` (uint64; column ``j`` holds field ``fields[j]``), equal to
        :meth:`encode` column by column, in one pass over every field."""
        return bucketize(keys, self._size_array)

    def describe(self) -> Dict[str, object]:
        return {"mode": self.mode, "hash": HASH_NAME, "hash_seed": self.seed}


class CountedVocabulary:
    """The paper's vocabulary: per field, the sorted keys of the tokens seen at least ``min_count`` times.

    Args:
        dataset: the raw format name.
        keys: ``{field: sorted unique uint64 keys}`` in schema order.
        min_count: the threshold the keys were chosen with.
        seed: hash seed of the keys.
        distinct: ``{field: distinct tokens counted}`` before the ``min_count`` cut (informative, not fingerprinted).

    Example::

        >>> import pyarrow as pa
        >>> counter = VocabularyCounter(["C1"])
        >>> counter.add("C1", hash_tokens(pa.array(["a", "a", "b"])))
        >>> vocab = counter.finish("criteo", min_count=2)
        >>> vocab.sizes, vocab.encode("C1", hash_tokens(pa.array(["a", "b", "c"]))).tolist()
        ({'C1': 2}, [1, 0, 0])
    """

    mode = PAPER_MODE

    def __init__(
        self,
        dataset: str,
        keys: Mapping[str, np.ndarray],
        min_count: int,
        seed: int = 0,
        distinct: Optional[Mapping[str, int]] = None,
    ) -> None:
        self.dataset = dataset
        self.distinct = dict(distinct or {})
        self.fields = list(keys)
        self.min_count = int(min_count)
        self.seed = seed
        self._keys = {f: np.ascontiguousarray(k, dtype=np.uint64) for f, k in keys.items()}
        for field, k in self._keys.items():
            if k.size > 1 and not (k[1:] > k[:-1]).all():
                raise ValueError(f"vocabulary keys of {field} must be sorted and unique")
        self.fingerprint = _digest(self._header(), [self._keys[f] for f in self.fields])
        self._index: Optional[_FieldIndex] = None

    def _header(self) -> Dict[str, object]:
        return {
            "mode": self.mode, "hash": HASH_NAME, "rules": TOKEN_RULES, "dataset": self.dataset, "seed": self.seed,
            "min_count": self.min_count, "fields": [[f, int(self._keys[f].size)] for f in self.fields],
        }

    @property
    def sizes(self) -> Dict[str, int]:
        """Ids each table needs: kept tokens plus the OOV id."""
        return {f: int(k.size) + 1 for f, k in self._keys.items()}

    def keys(self, field: str) -> np.ndarray:
        return self._keys[field]

    def encode(self, field: str, keys: np.ndarray) -> np.ndarray:
        """int64 ids of ``keys`` (uint64 ``[n]``): ``1 + rank`` of a kept key, ``OOV_ID`` otherwise."""
        table = self._keys[field]
        if table.size == 0:
            return np.zeros(keys.shape, dtype=np.int64)
        rank = np.searchsorted(table, keys)
        np.minimum(rank, table.size - 1, out=rank)
        found = table[rank] == keys
        ids = rank.astype(np.int64)
        ids += 1
        ids[~found] = OOV_ID
        return ids

    def encode_fields(self, keys: np.ndarray) -> np.ndarray:
        """int64 ids ``[n, F]`` of keys ``[n, F]`` (uint64; column ``j`` holds field ``fields[j]``), equal to
        :meth:`encode` column by column, with one search over every field's keys (:class:`_FieldIndex`, built on
        the first call: 16 bytes per kept key)."""
        if self._index is None:
            self._index = _FieldIndex([self._keys[f] for f in self.fields])
        ids, unresolved = self._index.lookup(keys)
        for row, column in zip(*np.nonzero(unresolved)):
            ids[row, column] = self.encode(self.fields[column], keys[row, column : column + 1])[0]
        return ids

    def describe(self) -> Dict[str, object]:
        return {"mode": self.mode, "hash": HASH_NAME, "hash_seed": self.seed, "min_count": self.min_count}

    def save(self, directory: os.PathLike, extra: Optional[Mapping[str, object]] = None) -> Path:
        """Writes ``DIR/vocab.npz`` atomically: one uint64 array per field and a JSON header (``extra`` included)."""
        directory = Path(directory)
        header = dict(self._header())
        header["fingerprint"] = self.fingerprint
        header["distinct"] = self.distinct
        header["extra"] = dict(extra or {})
        arrays = {f"field_{i}": self._keys[f] for i, f in enumerate(self.fields)}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        path = directory / VOCAB_FILE
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, directory: os.PathLike) -> "CountedVocabulary":
        """Reads ``DIR/vocab.npz`` and checks it against the fingerprint stored with it.

        Raises:
            DatasetError: missing, unreadable, malformed, or its keys do not give its recorded fingerprint.
        """
        path = Path(directory) / VOCAB_FILE
        if not path.is_file():
            raise DatasetError(f"{path}: missing (a paper-mode conversion stores its vocabulary there)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                header = json.loads(bytes(npz["header"]).decode())
                keys = {name: npz[f"field_{i}"] for i, (name, _) in enumerate(header["fields"])}
            vocab = cls(header["dataset"], keys, header["min_count"], header["seed"], header.get("distinct"))
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{path}: not a readable vocabulary ({type(e).__name__}: {e})") from None
        if vocab.fingerprint != header.get("fingerprint"):
            raise DatasetError(
                f"{path}: fingerprint: the stored keys give {vocab.fingerprint[:16]}..., the file records "
                f"{str(header.get('fingerprint'))[:16]}... (corrupted vocabulary)"
            )
        return vocab

    @staticmethod
    def saved_extra(directory: os.PathLike) -> Optional[Dict[str, object]]:
        """The ``extra`` a saved vocabulary was written with, or None when there is none readable."""
        path = Path(directory) / VOCAB_FILE
        try:
            with np.load(path, allow_pickle=False) as npz:
                return dict(json.loads(bytes(npz["header"]).decode()).get("extra", {}))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None


class _FieldIndex:
    """Every field's sorted keys in one array, searched for the keys of all fields at once.

    Field ``f``'s keys are tagged ``(f << (64 - b)) | (key >> b)``, with ``b`` bits for the field number: the tags
    of the concatenated fields are sorted, so one ``searchsorted`` of a query's tags finds where each (field, key)
    pair would be. Two keys of one field that differ only in their low ``b`` bits share a tag; a query that lands
    on such a run without hitting its key is left to the field's own search (``unresolved``).

    Args:
        keys: every field's sorted unique uint64 keys, in field order.
    """

    def __init__(self, keys: Sequence[np.ndarray]) -> None:
        bits = max(1, (len(keys) - 1).bit_length())
        sizes = np.array([k.size for k in keys], dtype=np.int64)
        self._shift = np.uint64(bits)
        self._tags = np.arange(len(keys), dtype=np.uint64) << np.uint64(64 - bits)
        self._keys = np.concatenate(list(keys)) if keys else np.zeros(0, dtype=np.uint64)
        self._tagged = np.repeat(self._tags, sizes) | (self._keys >> self._shift)
        # One before each field's first position: ``position - first`` is the id, the rank in the field plus one.
        self._first = np.cumsum(sizes) - sizes - 1

    def lookup(self, keys: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
        """``(ids, unresolved)`` of keys ``[n, F]``: int64 ids (``OOV_ID`` where not found) and a bool mask of the
        entries whose tag matched a run of keys without hitting theirs (their ids must come from the field)."""
        if self._keys.size == 0:
            return np.zeros(keys.shape, dtype=np.int64), np.zeros(keys.shape, dtype=bool)
        query = self._tags | (keys >> self._shift)
        position = np.searchsorted(self._tagged, query)
        np.minimum(position, self._keys.size - 1, out=position)
        same_tag = self._tagged[position] == query
        found = same_tag & (self._keys[position] == keys)
        ids = np.where(found, position - self._first, OOV_ID)
        return ids, same_tag & ~found


class ManagedVocabulary:
    """Managed mode: every token's id is its 63-bit key, ``min(hash64 >> 1, 2**63 - 2)``; no table size.

    Args:
        dataset: the raw format name.
        fields: the categorical fields in schema order.
        seed: hash seed.

    Example::

        >>> import pyarrow as pa
        >>> vocab = ManagedVocabulary("criteo", ["C1"])
        >>> ids = vocab.encode("C1", hash_tokens(pa.array(["68fd1e64", "68fd1e64", ""])))
        >>> bool(ids[0] == ids[1] != ids[2]), bool(((ids >= 0) & (ids < MANAGED_ID_SPACE)).all())
        (True, True)
    """

    mode = MANAGED_MODE

    def __init__(self, dataset: str, fields: Sequence[str], seed: int = 0) -> None:
        if not fields:
            raise ValueError("a managed vocabulary needs at least one field")
        self.dataset = dataset
        self.fields = list(fields)
        self.seed = seed
        self.fingerprint = _digest(
            {"mode": self.mode, "hash": HASH_NAME, "rules": TOKEN_RULES, "dataset": dataset, "seed": seed,
             "fields": self.fields, "id_space": MANAGED_ID_SPACE}
        )

    @property
    def sizes(self) -> Dict[str, int]:
        """The id space of every field (``MANAGED_ID_SPACE``), what ``metadata.json`` records as its size."""
        return {f: MANAGED_ID_SPACE for f in self.fields}

    def encode(self, field: str, keys: np.ndarray) -> np.ndarray:
        """int64 ids in ``[0, MANAGED_ID_SPACE)`` of ``keys`` (uint64 ``[n]``)."""
        return managed_ids(keys)

    def encode_fields(self, keys: np.ndarray) -> np.ndarray:
        """int64 ids ``[n, F]`` of keys ``[n, F]``, as :meth:`encode` column by column."""
        return managed_ids(keys)

    def describe(self) -> Dict[str, object]:
        return {"mode": self.mode, "hash": HASH_NAME, "hash_seed": self.seed}


def managed_ids(keys: np.ndarray) -> np.ndarray:
    """Managed mode's int64 ids of uint64 keys (any shape): the high 63 bits, below ``MANAGED_ID_SPACE``.

    Example::

        >>> managed_ids(np.array([0, 5, 2**64 - 1], dtype=np.uint64)).tolist()
        [0, 2, 9223372036854775806]
    """
    ids = (np.asarray(keys, dtype=np.uint64) >> np.uint64(1)).astype(np.int64)
    np.minimum(ids, MANAGED_ID_SPACE - 1, out=ids)
    return ids


# Any vocabulary: what the converter builds and the encoder reads.
Vocabulary = Union[HashingVocabulary, CountedVocabulary, ManagedVocabulary]


def _merge_counts(keys: np.ndarray, counts: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    if keys.size == 0:
        return keys, counts
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    counts = counts[order]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], np.add.reduceat(counts, starts)


class VocabularyCounter:
    """Counts every field's keys over a counting pass (paper mode), in bounded chunks of numpy work.

    Each added block is reduced to its unique keys and counts (sorted runs); pending runs are merged into the running
    totals once they reach a quarter of them, so a field holds at most about 1.25x its distinct keys (16 bytes each:
    key and count) between merges. The merge is a stable sort of sorted runs, which numpy's timsort does in about
    linear time.

    Args:
        fields: the fields to count, in schema order.
    """

    _MIN_PENDING = 1 << 22

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = list(fields)
        self._totals = {f: (np.zeros(0, np.uint64), np.zeros(0, np.int64)) for f in self.fields}
        self._pending: Dict[str, List[tuple]] = {f: [] for f in self.fields}
        self._pending_size = {f: 0 for f in self.fields}

    def add(self, field: str, keys: np.ndarray) -> None:
        """Counts one block of keys (uint64 ``[n]``) of ``field``."""
        if keys.size == 0:
            return
        unique, counts = np.unique(keys, return_counts=True)
        self._pending[field].append((unique, counts.astype(np.int64)))
        self._pending_size[field] += unique.size
        if self._pending_size[field] > max(self._MIN_PENDING, self._totals[field][0].size // 4):
            self._flush(field)

    def _flush(self, field: str) -> None:
        if not self._pending[field]:
            return
        keys = [self._totals[field][0]] + [k for k, _ in self._pending[field]]
        counts = [self._totals[field][1]] + [c for _, c in self._pending[field]]
        self._pending[field] = []
        self._pending_size[field] = 0
        self._totals[field] = _merge_counts(np.concatenate(keys), np.concatenate(counts))

    def add_counts(self, field: str, keys: np.ndarray, counts: np.ndarray) -> None:
        """Adds keys already counted elsewhere (sorted unique uint64 ``keys`` and int64 ``counts``, e.g. another
        counter's :meth:`totals`): the totals are the same as had those rows been added here."""
        if keys.size == 0:
            return
        self._pending[field].append((keys, counts.astype(np.int64, copy=False)))
        self._pending_size[field] += keys.size
        if self._pending_size[field] > max(self._MIN_PENDING, self._totals[field][0].size // 4):
            self._flush(field)

    def totals(self, field: str) -> "tuple[np.ndarray, np.ndarray]":
        """The sorted unique keys of ``field`` counted so far and their counts."""
        self._flush(field)
        return self._totals[field]

    def distinct(self, field: str) -> int:
        self._flush(field)
        return int(self._totals[field][0].size)

    def finish(self, dataset: str, min_count: int, seed: int = 0) -> CountedVocabulary:
        """The vocabulary of the keys counted at least ``min_count`` times (the counts are released)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        kept = {}
        distinct = {}
        for field in self.fields:
            self._flush(field)
            keys, counts = self._totals.pop(field)
            kept[field] = keys[counts >= min_count]
            distinct[field] = int(keys.size)
        return CountedVocabulary(dataset, kept, min_count, seed, distinct)
