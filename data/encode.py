"""Parsed raw rows -> the dataset's columns: the one encoding shared by the converter and ``multiembed predict``.

Serving encodes raw logs exactly as conversion did through :func:`encode_table`, without importing the converter.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import pyarrow as pa

from multiembed.data.formats import RawFormat
from multiembed.data.metadata import DENSE_PREFIX, LABEL_COLUMN
from multiembed.data.tokens import dense_log1p
from multiembed.data.vocab import Vocabulary, field_keys


def encode_table(
    table: pa.Table, fmt: RawFormat, mode: str, vocab: Vocabulary, hash_seed: int
) -> Dict[str, np.ndarray]:
    """The output columns of parsed rows: ``label`` int8 (absent in the unlabelled layout), one int64 id column per
    field, ``dense_<name>`` float32.

    Args:
        table: a parsed chunk's table (:class:`multiembed.data.rawlog.ParsedChunk`).
        fmt: its raw format.
        mode: vocabulary mode.
        vocab: the vocabulary.
        hash_seed: seed of the token hash.

    Returns:
        ``{column: array [rows]}`` in schema order.
    """
    columns: Dict[str, np.ndarray] = {}
    if fmt.label_column is not None:
        columns[LABEL_COLUMN] = table.column(fmt.label_column).to_numpy().astype(np.int8, copy=False)
    for field in vocab.fields:
        keys = field_keys(fmt, mode, table.column(field), field, hash_seed)
        columns[field] = vocab.encode(field, keys)
    for name in fmt.dense_fields:
        columns[DENSE_PREFIX + name] = dense_log1p(table.column(name))
    return columns
