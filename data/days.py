"""Days as data: a dataset that is one day (or any time partition) of a sequence, and the checks a day sequence
passes before anything trains on it.

A day dataset's ``metadata.json`` holds a ``day`` record::

    "day": {"sequence": "<id of the log it belongs to>", "index": 3,
            "schema": "<digest of field names, multi-hotness and dense fields>",
            "hash_space": "<the id space: vocab_fingerprint>"}

Days of one sequence share their schema and their id space (the same id means the same thing every day, so one
model's tables serve them all); a later day is written without touching the earlier ones. A sequence given to the
production loop (``multiembed days``) must be consecutive days of one sequence, in order, with one schema and one
hash space; anything else is refused in one line naming the day's directory and the field. A paper-mode vocabulary
(frozen at conversion: ids the first files never saw map to OOV forever) cannot follow a drifting log and is refused
as a day.

This module knows JSON only (no pyarrow, no torch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence, Tuple

from multiembed.data.metadata import METADATA_FILE, DatasetError, DatasetMetadata, atomic_write, read_metadata

if TYPE_CHECKING:
    import numpy as np

DAY_KEY = "day"


@dataclasses.dataclass(frozen=True)
class DayPlace:
    """Where a day dataset sits in its sequence.

    Attributes:
        sequence: the identity of the log the day belongs to (equal for every day of one log).
        index: the day's position (0 = the first day).
        schema: :func:`schema_identity` of the day's metadata.
        hash_space: the id space (the dataset's ``vocab_fingerprint``): equal ids mean equal things.
    """

    sequence: str
    index: int
    schema: str
    hash_space: str

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def schema_identity(meta: DatasetMetadata) -> str:
    """A digest of a dataset's schema: field names and multi-hotness in order, and dense fields (not sizes)."""
    schema = {"fields": [[f.name, f.multi_hot] for f in meta.fields], "dense": list(meta.dense_fields)}
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def day_record(meta: DatasetMetadata, sequence: str, index: int) -> Dict[str, Any]:
    """The ``day`` record of day ``index`` of ``sequence`` whose metadata is ``meta`` (fields, dense fields and
    vocabulary fingerprint already set)."""
    if index < 0:
        raise ValueError(f"a day's index must be >= 0, got {index}")
    return DayPlace(
        sequence=sequence, index=index, schema=schema_identity(meta), hash_space=meta.vocab_fingerprint
    ).to_json()


def day_of(meta: DatasetMetadata, where: str) -> DayPlace:
    """The :class:`DayPlace` a dataset's metadata records.

    Raises:
        DatasetError: not a day dataset, a paper-mode vocabulary, or a malformed record (one line naming
            ``where``).
    """
    if meta.options.get("mode") == "paper":
        raise DatasetError(
            f"{where}: options.mode: paper mode's vocabulary is frozen at conversion and cannot follow a day "
            "sequence (ids it never saw stay OOV); convert each day in hashing or managed mode"
        )
    record = meta.extra.get(DAY_KEY)
    if record is None:
        raise DatasetError(
            f"{where}: {DAY_KEY}: missing; not a day of a sequence (days are written by multiembed synth --days and "
            "convert --first-day / --follows)"
        )
    if not isinstance(record, Mapping):
        raise DatasetError(f"{where}: {DAY_KEY}: expected an object, got {type(record).__name__}")
    try:
        place = DayPlace(
            sequence=str(record["sequence"]), index=int(record["index"]), schema=str(record["schema"]),
            hash_space=str(record["hash_space"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{where}: {DAY_KEY}: malformed ({e!r})") from None
    if place.index < 0:
        raise DatasetError(f"{where}: {DAY_KEY}.index: must be >= 0, got {place.index}")
    if place.schema != schema_identity(meta):
        raise DatasetError(f"{where}: {DAY_KEY}.schema: does not match the dataset's own fields")
    if place.hash_space != meta.vocab_fingerprint:
        raise DatasetError(f"{where}: {DAY_KEY}.hash_space: does not match the dataset's vocab_fingerprint")
    return place


def check_sequence(places: Sequence[Tuple[str, DatasetMetadata, DayPlace]]) -> None:
    """Refuses a list of days that is not consecutive days of one sequence with one schema and one id space.

    Args:
        places: ``(directory, metadata, place)`` of every day, in the order given.

    Raises:
        DatasetError: one line naming the first day that does not follow, and why.
    """
    if not places:
        raise DatasetError("no days given")
    first_dir, first_meta, first = places[0]
    for (prev_dir, _, prev), (path, meta, place) in zip(places, places[1:]):
        where = os.path.join(path, METADATA_FILE)
        if place.sequence != first.sequence:
            raise DatasetError(
                f"{where}: {DAY_KEY}.sequence: {place.sequence!r} is another log than {first_dir} ({first.sequence!r})"
            )
        if place.schema != first.schema or meta.field_names != first_meta.field_names:
            raise DatasetError(
                f"{where}: {DAY_KEY}.schema: another schema than {first_dir} (fields or dense fields differ)"
            )
        if place.hash_space != first.hash_space or meta.vocab_sizes != first_meta.vocab_sizes:
            raise DatasetError(
                f"{where}: {DAY_KEY}.hash_space: another id space than {first_dir} (vocabulary fingerprint or table "
                "sizes differ)"
            )
        if place.index != prev.index + 1:
            raise DatasetError(
                f"{where}: {DAY_KEY}.index: day {place.index} given after day {prev.index} ({prev_dir}); days must be "
                "consecutive and in order"
            )


def read_days(paths: Sequence[os.PathLike]) -> List[Tuple[str, DatasetMetadata, DayPlace]]:
    """Reads every day's metadata and checks the sequence (:func:`day_of`, :func:`check_sequence`).

    Raises:
        DatasetError: a day that is missing, malformed or does not follow (one line).
    """
    places = []
    for path in paths:
        meta = read_metadata(path)
        places.append((str(path), meta, day_of(meta, os.path.join(str(path), METADATA_FILE))))
    check_sequence(places)
    return places


def day_ids(data_dir: os.PathLike, meta: DatasetMetadata) -> Dict[str, "np.ndarray"]:
    """The distinct ids of every categorical field over every split of a day, ``{field: sorted int64 array}``.

    Reads the field columns only, one file at a time (multi-hot lists flattened).
    """
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    found: Dict[str, List["np.ndarray"]] = {f.name: [] for f in meta.fields}
    for split in meta.splits.values():
        for file in split.files:
            table = pq.read_table(os.path.join(os.fspath(data_dir), file), columns=meta.field_names)
            for f in meta.fields:
                column = table.column(f.name)
                if f.multi_hot:
                    column = pc.list_flatten(column)
                found[f.name].append(np.unique(column.to_numpy()))
    return {
        name: np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        for name, parts in found.items()
    }


# Fields whose id space is larger than this keep the sorted ids seen (managed mode's 63-bit keys) instead of a mask.
MASK_LIMIT = 1 << 32


class IdHistory:
    """The ids seen so far in a day sequence, per field: a boolean mask the size of the field's table, or, for an id
    space over :data:`MASK_LIMIT` (managed mode's 63-bit token keys), the sorted distinct ids seen.

    Example::

        >>> import numpy as np
        >>> history = IdHistory({"C1": 4, "C2": 2**63 - 1})
        >>> history.add({"C1": np.array([0, 2]), "C2": np.array([7, 2**40])})
        {'C1': 2, 'C2': 2}
        >>> history.add({"C1": np.array([2, 3]), "C2": np.array([7, 9])})
        {'C1': 1, 'C2': 1}
    """

    def __init__(self, vocab_sizes: Mapping[str, int]) -> None:
        import numpy as np

        self._sizes = dict(vocab_sizes)
        self._seen = {name: np.zeros(size, dtype=bool) for name, size in vocab_sizes.items() if size <= MASK_LIMIT}
        self._keys = {name: np.zeros(0, dtype=np.int64) for name, size in vocab_sizes.items() if size > MASK_LIMIT}

    def save(self, path: os.PathLike) -> None:
        """Writes the history atomically (``.npz``: one bit per id, ``np.packbits`` of a field's mask, or a field's
        sorted int64 ids)."""
        import numpy as np

        arrays = {name: np.packbits(seen) for name, seen in self._seen.items()}
        arrays.update(self._keys)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: os.PathLike, vocab_sizes: Mapping[str, int]) -> "IdHistory":
        """The history :meth:`save` wrote for tables of ``vocab_sizes``.

        Raises:
            DatasetError: unreadable, or of other fields or table sizes (one line naming ``path``).
        """
        import numpy as np

        history = cls(vocab_sizes)
        try:
            with np.load(path, allow_pickle=False) as saved:
                if sorted(saved.files) != sorted(vocab_sizes):
                    raise DatasetError(f"{path}: holds ids of other fields than the days given")
                for name, size in vocab_sizes.items():
                    if name in history._keys:
                        history._keys[name] = np.asarray(saved[name], dtype=np.int64)
                    else:
                        history._seen[name] = np.unpackbits(saved[name], count=size).astype(bool)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: unreadable ({e})") from None
        return history

    def add(self, ids: Mapping[str, "np.ndarray"]) -> Dict[str, int]:
        """Records a day's distinct ids; returns how many of each field were never seen before."""
        import numpy as np

        new: Dict[str, int] = {}
        for name, values in ids.items():
            if name in self._keys:
                distinct = np.unique(np.asarray(values, dtype=np.int64))
                known = self._keys[name]
                new[name] = int(distinct.size - np.isin(distinct, known, assume_unique=True).sum())
                self._keys[name] = np.union1d(known, distinct)
                continue
            seen = self._seen[name]
            new[name] = int((~seen[values]).sum())
            seen[values] = True
        return new
