"""A trained managed-collision remapping as a vocabulary: tokens -> the table rows a ``--vocab managed`` run gave
their keys (what an exported artifact serves with).

The run's managed-collision modules hold, per table, the sorted keys that own rows and their rows; a key without a
row is looked up in its bucket's fallback row. Rows are split in ``buckets`` equal row-wise shards (one per training
rank) and a key's bucket is ``key // ceil(MANAGED_ID_SPACE / buckets)``, the block TorchRec's row-wise input
distribution sends it to; the bucket's fallback row is its last row.

Example::

    >>> remap = RemappedVocabulary("criteo", ["C1"], 0, {"C1": np.array([7, 2**62])}, {"C1": np.array([0, 5])},
    ...                            table_rows=8, buckets=2)
    >>> remap.rows_of("C1", np.array([7, 2**62, 8, 2**62 + 1])).tolist()  # unseen: the fallback row of its bucket
    [0, 5, 3, 7]
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Sequence

import numpy as np

from multiembed.data.formats import MANAGED_MODE
from multiembed.data.metadata import DatasetError, atomic_write
from multiembed.data.vocab import MANAGED_ID_SPACE, ManagedVocabulary, managed_ids

REMAP_FILE = "remap.npz"


class RemappedVocabulary:
    """Managed mode's token keys -> trained table rows.

    Args:
        dataset: the raw format name.
        fields: the categorical fields in schema order.
        seed: hash seed of the token keys.
        keys: ``{field: sorted unique int64 managed ids that own rows}``.
        rows: ``{field: int64 rows of those keys}``, in ``[0, table_rows)``.
        table_rows: rows of every field's table.
        buckets: row-wise shards of every table (the training world size).

    ``fingerprint`` is the managed vocabulary's (the token -> key rule the training data was converted with);
    ``digest`` covers the remapping itself.

    Raises:
        ValueError: keys not sorted and unique, keys and rows of different lengths, rows out of range, or table rows
            that are not a multiple of the buckets.
    """

    mode = MANAGED_MODE

    def __init__(
        self,
        dataset: str,
        fields: Sequence[str],
        seed: int,
        keys: Mapping[str, np.ndarray],
        rows: Mapping[str, np.ndarray],
        table_rows: int,
        buckets: int,
    ) -> None:
        if buckets < 1 or table_rows < 2 * buckets or table_rows % buckets:
            raise ValueError(f"table_rows {table_rows} must be a multiple of buckets {buckets}, 2 rows per bucket or more")
        self.dataset, self.fields, self.seed = dataset, list(fields), int(seed)
        self.table_rows, self.buckets = int(table_rows), int(buckets)
        self._keys = {f: np.ascontiguousarray(keys[f], dtype=np.int64) for f in self.fields}
        self._rows = {f: np.ascontiguousarray(rows[f], dtype=np.int64) for f in self.fields}
        for f in self.fields:
            k, r = self._keys[f], self._rows[f]
            if k.shape != r.shape:
                raise ValueError(f"field {f}: {k.size} keys but {r.size} rows")
            if k.size > 1 and not (k[1:] > k[:-1]).all():
                raise ValueError(f"field {f}: keys must be sorted and unique")
            if r.size and not (0 <= int(r.min()) and int(r.max()) < self.table_rows):
                raise ValueError(f"field {f}: rows outside [0, {self.table_rows})")
        self.fingerprint = ManagedVocabulary(dataset, self.fields, seed).fingerprint
        digest = hashlib.sha256(json.dumps(self._header(), sort_keys=True).encode())
        for f in self.fields:
            digest.update(self._keys[f].astype("<i8").tobytes())
            digest.update(self._rows[f].astype("<i8").tobytes())
        self.digest = digest.hexdigest()

    def _header(self) -> Dict[str, object]:
        return {"dataset": self.dataset, "fields": self.fields, "seed": self.seed, "table_rows": self.table_rows,
                "buckets": self.buckets}

    @property
    def sizes(self) -> Dict[str, int]:
        return {f: self.table_rows for f in self.fields}

    def keys_with_rows(self, field: str) -> int:
        """How many keys of ``field`` own a row."""
        return int(self._keys[field].size)

    def fallback_rows(self, ids: np.ndarray) -> np.ndarray:
        """The fallback row of each managed id's bucket (int64, same shape)."""
        block = -(-MANAGED_ID_SPACE // self.buckets)
        bucket = np.asarray(ids, dtype=np.int64) // block
        return (bucket + 1) * (self.table_rows // self.buckets) - 1

    def rows_of(self, field: str, ids: np.ndarray) -> np.ndarray:
        """Table rows of managed ids ``[n]`` (int64) of ``field``."""
        ids = np.asarray(ids, dtype=np.int64)
        table = self._keys[field]
        out = self.fallback_rows(ids)
        if table.size:
            position = np.minimum(np.searchsorted(table, ids), table.size - 1)
            found = table[position] == ids
            out[found] = self._rows[field][position[found]]
        return out

    def encode(self, field: str, keys: np.ndarray) -> np.ndarray:
        """Table rows of token keys (uint64 ``[n]``)."""
        return self.rows_of(field, managed_ids(keys))

    def encode_fields(self, keys: np.ndarray) -> np.ndarray:
        """Table rows ``[n, F]`` of token keys ``[n, F]`` (column ``j`` holds field ``fields[j]``)."""
        ids = managed_ids(keys)
        return np.stack([self.rows_of(f, ids[:, j]) for j, f in enumerate(self.fields)], axis=1)

    def describe(self) -> Dict[str, object]:
        return {"mode": self.mode, "hash_seed": self.seed, "table_rows": self.table_rows, "buckets": self.buckets}

    def save(self, directory: os.PathLike) -> Path:
        """Writes ``DIR/remap.npz`` atomically (keys and rows per field, a JSON header with the digest)."""
        header = {**self._header(), "digest": self.digest}
        arrays = {f"keys_{i}": self._keys[f] for i, f in enumerate(self.fields)}
        arrays.update({f"rows_{i}": self._rows[f] for i, f in enumerate(self.fields)})
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        path = Path(directory) / REMAP_FILE
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, directory: os.PathLike) -> "RemappedVocabulary":
        """Reads ``DIR/remap.npz`` and checks it against the digest stored with it.

        Raises:
            DatasetError: missing, unreadable, malformed, or its contents do not give its digest (one line).
        """
        path = Path(directory) / REMAP_FILE
        if not path.is_file():
            raise DatasetError(f"{path}: missing (a managed-vocabulary artifact stores its remapping there)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                header = json.loads(bytes(npz["header"]).decode())
                fields = list(header["fields"])
                keys = {f: npz[f"keys_{i}"] for i, f in enumerate(fields)}
                rows = {f: npz[f"rows_{i}"] for i, f in enumerate(fields)}
            remap = cls(header["dataset"], fields, header["seed"], keys, rows, header["table_rows"], header["buckets"])
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{path}: not a readable remapping ({type(e).__name__}: {e})") from None
        if remap.digest != header.get("digest"):
            raise DatasetError(f"{path}: digest: the stored keys and rows give {remap.digest[:16]}..., the file records "
                               f"{str(header.get('digest'))[:16]}... (corrupted remapping)")
        return remap
