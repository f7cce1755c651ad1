"""Result tables as CSV: one typed row per run (a ``dict`` of column -> int, float or str), written and read back
exactly (floats in full precision), so that every report and figure can be rebuilt from the committed CSV alone.

Used by the scaling study (``scaling.csv``) and the days study (``days_study.csv``).

Example::

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.csv")
    >>> _ = write_typed_csv([{"mode": "se", "seed": 0, "auc": 0.75}], ("mode", "seed", "auc"), path)
    >>> read_typed_csv(path, ("mode", "seed", "auc"), int_columns={"seed"}, str_columns={"mode"})
    [{'mode': 'se', 'seed': 0, 'auc': 0.75}]
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import AbstractSet, Any, Dict, Iterable, List, Sequence, Union

from multiembed.data.metadata import atomic_write_text

Row = Dict[str, Any]
PathLike = Union[str, os.PathLike]


def format_typed_csv(rows: Iterable[Row], columns: Sequence[str]) -> str:
    """The CSV text: a header of ``columns``, one line per row (floats as ``repr``: read back exactly).

    Raises:
        ValueError: a row with a column not in ``columns``.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: repr(row[c]) if isinstance(row[c], float) else row[c] for c in columns})
    return buffer.getvalue()


def write_typed_csv(rows: Iterable[Row], columns: Sequence[str], path: PathLike) -> Path:
    """Writes :func:`format_typed_csv` to ``path`` atomically (never read back half-written)."""
    path = Path(path)
    atomic_write_text(path, format_typed_csv(rows, columns))
    return path


def read_typed_csv(
    path: PathLike, columns: Sequence[str], *, int_columns: AbstractSet[str], str_columns: AbstractSet[str]
) -> List[Row]:
    """Reads a CSV written by :func:`write_typed_csv` back into typed rows (columns not named int or str are floats).

    Raises:
        ValueError: a header other than ``columns``, or a value that does not parse (the message names the file,
            the line and the column).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != tuple(columns):
            raise ValueError(f"{path}: header {reader.fieldnames} is not {list(columns)}")
        rows: List[Row] = []
        for line, raw in enumerate(reader, start=2):
            row: Row = {}
            for column in columns:
                text = raw[column]
                try:
                    if column in str_columns:
                        row[column] = text
                    else:
                        row[column] = int(text) if column in int_columns else float(text)
                except (TypeError, ValueError):
                    raise ValueError(f"{path}: line {line}, column {column!r}: cannot parse {text!r}") from None
            rows.append(row)
    return rows
