"""A synthetic log's ids written as a hashing- or managed-mode conversion would write them (``synth --vocab``).

The generator draws ids ``[0, vocab_size)`` per field, one id per distinct token, which is a paper-mode vocabulary
with nothing cut. To compare vocabularies on the same rows (docs/managed.md), each id ``i`` of field number ``f`` is
given a 64-bit key ``fmix64(seed + (f << 40) + i)`` (distinct for every (field, id) pair) and then encoded as
``convert`` encodes a token's key:

* ``hashing``: ``bucketize(key, table_rows)``, ids ``[0, table_rows)``, colliding ids share a row;
* ``managed``: the key's high 63 bits (:func:`multiembed.data.vocab.managed_ids`), for a ``train --vocab managed``
  run whose managed-collision modules assign the rows.

Labels, dense features, ``true_prob`` and the Bayes-optimal metrics are those of the native ids: only the id columns
change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

import numpy as np

from multiembed.data.formats import HASHING_MODE, MANAGED_MODE
from multiembed.data.tokens import MAX_HASH_SIZE, bucketize
from multiembed.data.vocab import MANAGED_ID_SPACE, managed_ids

ENCODINGS = (HASHING_MODE, MANAGED_MODE)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, element-wise on uint64 (wrapping arithmetic)."""
    x = x.copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return x & _M64


@dataclasses.dataclass(frozen=True)
class IdEncoding:
    """How ``synth --vocab`` writes a field's native ids.

    Attributes:
        mode: ``hashing`` or ``managed``.
        table_rows: hashing mode: rows of every field's table (ids ``[0, table_rows)``); None in managed mode.
        seed: the key seed.

    Example::

        >>> enc = IdEncoding("hashing", table_rows=10)
        >>> ids = enc.encode(0, np.arange(1000))
        >>> int(ids.min()) >= 0 and int(ids.max()) < 10, enc.field_size(1000)
        (True, 10)
        >>> IdEncoding("managed").field_size(1000) == MANAGED_ID_SPACE
        True
    """

    mode: str
    table_rows: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ENCODINGS:
            raise ValueError(f"--vocab: expected one of {', '.join(ENCODINGS)}, got {self.mode!r}")
        if self.mode == HASHING_MODE and (self.table_rows is None or not 1 <= self.table_rows <= MAX_HASH_SIZE):
            raise ValueError(f"--vocab hashing needs --hash-size N in [1, {MAX_HASH_SIZE}], got {self.table_rows}")
        if self.mode == MANAGED_MODE and self.table_rows is not None:
            raise ValueError("--hash-size applies to --vocab hashing; managed mode has no table size at conversion")

    def keys(self, field_index: int, ids: np.ndarray) -> np.ndarray:
        """uint64 keys ``[n]`` of native ids ``[n]`` of field number ``field_index``."""
        base = np.uint64((self.seed + (field_index << 40)) & 0xFFFFFFFFFFFFFFFF)
        with np.errstate(over="ignore"):
            return _fmix64(np.asarray(ids, dtype=np.int64).astype(np.uint64) + base)

    def encode(self, field_index: int, ids: np.ndarray) -> np.ndarray:
        """int64 ids ``[n]`` written for native ids ``[n]`` of field number ``field_index``."""
        keys = self.keys(field_index, ids)
        if self.mode == HASHING_MODE:
            assert self.table_rows is not None
            return bucketize(keys, self.table_rows)
        return managed_ids(keys)

    def field_size(self, native_size: int) -> int:
        """The ``vocab_size`` metadata records for a field of ``native_size`` native ids."""
        return int(self.table_rows) if self.mode == HASHING_MODE else MANAGED_ID_SPACE  # type: ignore[arg-type]

    def fingerprint(self, native: str) -> str:
        """The vocabulary fingerprint of data encoded from the native fingerprint ``native``."""
        record = {"encoding": dataclasses.asdict(self), "native": native, "rules": "synthetic-id-keys-v1"}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """What ``metadata.json`` records under ``options``."""
        out = {"mode": self.mode, "hash_seed": self.seed}
        if self.mode == HASHING_MODE:
            out["table_rows"] = self.table_rows
        return out
