"""The raw click-log formats ``convert`` reads: Criteo Kaggle, Criteo 1TB and Avazu.

A :class:`RawFormat` says how a file is laid out (delimiter, header, which column is the label, which are integers
and which categorical tokens) and what a conversion does by default (vocabulary mode, minimum count, hash size).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

CRITEO_INT_COLUMNS: Tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT_COLUMNS: Tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
AVAZU_HEADER: Tuple[str, ...] = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)

PAPER_MODE = "paper"
HASHING_MODE = "hashing"
# Managed mode keeps every token as its 63-bit key (no vocabulary pass, no table size): the training run's
# managed-collision modules map keys to rows (docs/managed.md).
MANAGED_MODE = "managed"
MODES = (PAPER_MODE, HASHING_MODE, MANAGED_MODE)

# DLRM / MLPerf cap every hashed table at 40M rows.
MLPERF_HASH_CAP = 40_000_000


@dataclasses.dataclass(frozen=True)
class RawFormat:
    """Layout of one raw click-log format and its conversion defaults.

    Attributes:
        name: the ``convert`` argument (``criteo``, ``criteo-1tb``, ``avazu``).
        columns: every column of a row, in file order.
        delimiter: the one-byte field separator.
        header: True when the first line of every file is the header (it must equal ``columns``).
        label_column: the 0/1 click column; None in the layout of unlabelled rows (:meth:`unlabelled`).
        int_columns: integer columns (Criteo ``I1..I13``): dense features in both modes, binned categorical
            fields in paper mode.
        cat_columns: categorical token columns.
        dropped_columns: read but not converted (Avazu ``id``).
        default_mode: ``paper`` or ``hashing``.
        default_min_count: paper mode's threshold (values seen fewer times share the OOV id).
        default_hash_size: hashing mode's table size per field.
        quoted: fields may be quoted in the standard CSV way (``"1005"``, ``"a""b"``): the quotes are removed
            before a cell is read as a label or a token (Avazu); otherwise a ``"`` is an ordinary character.
    """

    name: str
    columns: Tuple[str, ...]
    delimiter: str
    header: bool
    label_column: Optional[str]
    int_columns: Tuple[str, ...]
    cat_columns: Tuple[str, ...]
    dropped_columns: Tuple[str, ...]
    default_mode: str
    default_min_count: int
    default_hash_size: Optional[int]
    quoted: bool = False

    def __post_init__(self) -> None:
        label = (self.label_column,) if self.label_column is not None else ()
        named = label + self.int_columns + self.cat_columns + self.dropped_columns
        if sorted(named) != sorted(self.columns):
            raise ValueError(f"format {self.name}: label, integer, categorical and dropped columns must cover columns")
        if len(self.delimiter) != 1:
            raise ValueError(f"format {self.name}: delimiter must be one character")
        if self.default_mode not in MODES:
            raise ValueError(f"format {self.name}: default_mode must be one of {MODES}")

    def fields(self, mode: str) -> Tuple[str, ...]:
        """Categorical fields of the converted data in schema order.

        Paper mode turns the integer columns into binned categorical fields first (39 fields for Criteo, as the
        paper); hashing and managed modes keep them as dense features only (26 fields for Criteo, as DLRM /
        MLPerf).
        """
        if mode == PAPER_MODE:
            return self.int_columns + self.cat_columns
        if mode in (HASHING_MODE, MANAGED_MODE):
            return self.cat_columns
        raise ValueError(f"unknown vocabulary mode {mode!r}; expected one of {MODES}")

    @property
    def dense_fields(self) -> Tuple[str, ...]:
        """Dense features (columns ``dense_<name>``): ``log(1 + max(x, 0))`` of every integer column."""
        return self.int_columns

    @property
    def num_columns(self) -> int:
        return len(self.columns)

    def unlabelled(self) -> "RawFormat":
        """The same format without its label column: rows to predict (Criteo Kaggle ``test.txt``, 39 columns;
        Avazu ``test`` without ``click``).

        Example::

            >>> raw_format("criteo").unlabelled().num_columns, raw_format("avazu").unlabelled().columns[:2]
            (39, ('id', 'hour'))
        """
        if self.label_column is None:
            return self
        columns = tuple(c for c in self.columns if c != self.label_column)
        return dataclasses.replace(self, columns=columns, label_column=None)


def _criteo(name: str, default_mode: str, default_hash_size: Optional[int]) -> RawFormat:
    return RawFormat(
        name=name,
        columns=("label",) + CRITEO_INT_COLUMNS + CRITEO_CAT_COLUMNS,
        delimiter="\t",
        header=False,
        label_column="label",
        int_columns=CRITEO_INT_COLUMNS,
        cat_columns=CRITEO_CAT_COLUMNS,
        dropped_columns=(),
        default_mode=default_mode,
        default_min_count=10,
        default_hash_size=default_hash_size,
    )


FORMATS: Dict[str, RawFormat] = {
    "criteo": _criteo("criteo", PAPER_MODE, None),
    "criteo-1tb": _criteo("criteo-1tb", HASHING_MODE, MLPERF_HASH_CAP),
    "avazu": RawFormat(
        name="avazu",
        columns=AVAZU_HEADER,
        delimiter=",",
        header=True,
        label_column="click",
        int_columns=(),
        # `hour` stays a categorical token, as the paper's code keeps it.
        cat_columns=AVAZU_HEADER[2:],
        dropped_columns=("id",),
        default_mode=PAPER_MODE,
        default_min_count=4,
        default_hash_size=None,
        quoted=True,
    ),
}


def raw_format(name: str) -> RawFormat:
    """Returns the format called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).

    Example::

        >>> len(raw_format("criteo").fields("paper")), len(raw_format("avazu").fields("paper"))
        (39, 22)
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown raw format {name!r}; expected one of {', '.join(FORMATS)}") from None
