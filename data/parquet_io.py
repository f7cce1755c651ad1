"""Writing and checking the Parquet files of a converted dataset (the layout ``metadata.py`` describes).

Shared by every producer (``convert``, ``synth``): one function builds the Arrow schema from the field specs, one
streaming writer and one one-shot function write a split's Parquet file under a temporary name and rename it when
it is complete, so a reader never sees half a file. ``check_dataset_files`` verifies that the Parquet files on disk
agree with ``metadata.json`` (columns, types, row counts) by reading only their footers.

pyarrow is imported at module level: import this module only inside a command's ``run`` (never from the CLI's
top level), so ``multiembed --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from multiembed.data.metadata import (
    DENSE_PREFIX,
    LABEL_COLUMN,
    TRUE_PROB_COLUMN,
    DatasetError,
    DatasetMetadata,
    FieldSpec,
)

# 128 Ki rows per row group: a loader batch (a few thousand rows) never spans more than two row groups, and a row
# group of Criteo's 39 id columns stays around 40 MB uncompressed, so a reader can hold one per worker.
DEFAULT_ROW_GROUP_SIZE = 1 << 17
# One-hot id columns are DELTA_BINARY_PACKED (bit-packed to the width of the ids, e.g. 27 bits for 40M-row tables
# instead of 64) and pages are not compressed: about half the size of plain encoding, and faster to write and read
# than snappy-compressed pages. No dictionary pages: building them costs more than the rest of the write. The
# measurements are in benchmarks/README.md ("Conversion: encoding and allocator choices").
DEFAULT_COMPRESSION = "none"
DEFAULT_USE_DICTIONARY = False
DEFAULT_ID_ENCODING = "DELTA_BINARY_PACKED"

ArrayLike = Union[np.ndarray, pa.Array, pa.ChunkedArray, Sequence[Any]]


def arrow_schema(
    fields: Sequence[FieldSpec],
    dense_fields: Sequence[str] = (),
    *,
    with_true_prob: bool = False,
) -> pa.Schema:
    """The Arrow schema of a converted dataset, in the contract's column order.

    Columns: ``label`` (int8), one per categorical field (int64, or list<int64> when multi-hot), ``dense_<name>``
    (float32) per dense feature, and ``true_prob`` (float32) for synthetic data.

    Args:
        fields: categorical fields in schema order.
        dense_fields: names of the dense features (without the ``dense_`` prefix).
        with_true_prob: add the synthetic generator's ``true_prob`` column.

    Example::

        >>> from multiembed.data.metadata import FieldSpec
        >>> arrow_schema([FieldSpec("C1", 10)], ["I1"]).names
        ['label', 'C1', 'dense_I1']
    """
    columns = [pa.field(LABEL_COLUMN, pa.int8(), nullable=False)]
    for spec in fields:
        id_type = pa.list_(pa.int64()) if spec.multi_hot else pa.int64()
        columns.append(pa.field(spec.name, id_type, nullable=False))
    columns.extend(pa.field(DENSE_PREFIX + name, pa.float32(), nullable=False) for name in dense_fields)
    if with_true_prob:
        columns.append(pa.field(TRUE_PROB_COLUMN, pa.float32(), nullable=False))
    return pa.schema(columns)


def _to_arrow(values: ArrayLike, field: pa.Field) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if values.type == field.type else values.cast(field.type)
    if isinstance(values, np.ndarray) and not pa.types.is_list(field.type):
        # Zero-copy when the dtype already matches; otherwise numpy casts (ids and labels are integral already).
        return pa.array(np.ascontiguousarray(values, dtype=field.type.to_pandas_dtype()), type=field.type)
    return pa.array(values, type=field.type)


def record_batch(columns: Mapping[str, ArrayLike], schema: pa.Schema) -> pa.RecordBatch:
    """Builds a record batch of ``schema`` from ``{column: values}``; every schema column must be given.

    Raises:
        ValueError: a column is missing, unexpected, or the lengths differ.
    """
    missing = [name for name in schema.names if name not in columns]
    extra = [name for name in columns if name not in schema.names]
    if missing or extra:
        raise ValueError(f"columns do not match the schema: missing {missing}, unexpected {extra}")
    arrays = [_to_arrow(columns[f.name], f) for f in schema]
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _id_encodings(schema: pa.Schema, encoding: Optional[str]) -> Optional[dict]:
    if encoding is None:
        return None
    ids = {f.name: encoding for f in schema if f.name != LABEL_COLUMN and f.type == pa.int64()}
    return ids or None


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class SplitParquetWriter:
    """Streams record batches into one Parquet file, visible under its final name only once closed.

    Rows are written under ``.<name>.tmp-<pid>`` in the same directory and renamed by ``close()``; leaving a
    ``with`` block through an exception (or calling ``abort()``) deletes the temporary file instead.

    Args:
        path: the final file name (its directory is created if needed).
        schema: from :func:`arrow_schema`.
        row_group_size: rows per Parquet row group.
        compression: Parquet codec.
        use_dictionary: write dictionary-encoded pages.
        id_encoding: Parquet encoding of the one-hot int64 id columns (``None``: pyarrow's default); ignored with
            ``use_dictionary``.

    Example::

        >>> import tempfile, numpy as np
        >>> from multiembed.data.metadata import FieldSpec
        >>> schema = arrow_schema([FieldSpec("C1", 4)])
        >>> out = Path(tempfile.mkdtemp()) / "train" / "part-00000.parquet"
        >>> with SplitParquetWriter(out, schema) as writer:
        ...     writer.write({"label": np.array([0, 1], np.int8), "C1": np.array([3, 0])})
        >>> writer.rows, out.exists()
        (2, True)
    """

    def __init__(
        self,
        path: os.PathLike,
        schema: pa.Schema,
        *,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
        compression: str = DEFAULT_COMPRESSION,
        use_dictionary: bool = DEFAULT_USE_DICTIONARY,
        id_encoding: Optional[str] = DEFAULT_ID_ENCODING,
    ) -> None:
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.path = Path(path)
        self.schema = schema
        self.row_group_size = row_group_size
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temporary_name(self.path)
        self._writer: Optional[pq.ParquetWriter] = pq.ParquetWriter(
            self._tmp, schema, compression=compression, use_dictionary=use_dictionary,
            column_encoding=_id_encodings(schema, id_encoding) if not use_dictionary else None,
        )
        self._pending: list = []
        self._pending_rows = 0

    def write(self, columns: Union[Mapping[str, ArrayLike], pa.RecordBatch]) -> None:
        """Appends rows; ``columns`` holds every schema column (numpy or Arrow arrays of equal length)."""
        if self._writer is None:
            raise ValueError(f"{self.path}: writer already closed")
        batch = columns if isinstance(columns, pa.RecordBatch) else record_batch(columns, self.schema)
        if batch.num_rows == 0:
            return
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        # Buffer until a whole row group is ready, so row groups have their full size whatever the caller's batches.
        while self._pending_rows >= self.row_group_size:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            head = table.slice(0, self.row_group_size)
            self._writer.write_table(head, row_group_size=self.row_group_size)
            rest = table.slice(self.row_group_size)
            self._pending = rest.to_batches()
            self._pending_rows = rest.num_rows
        self.rows += batch.num_rows

    def close(self) -> int:
        """Flushes, renames the temporary file to its final name and returns the number of rows written."""
        if self._writer is None:
            return self.rows
        try:
            if self._pending_rows:
                table = pa.Table.from_batches(self._pending, schema=self.schema)
                self._writer.write_table(table, row_group_size=self.row_group_size)
            self._writer.close()
            self._writer = None
            _fsync(self._tmp)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._pending = []
        return self.rows

    def abort(self) -> None:
        """Drops everything written so far (the final name is never created)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the file is being thrown away: a failure to flush it does not matter
                pass
            self._writer = None
        self._pending = []
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "SplitParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_split_parquet(
    path: os.PathLike,
    columns: Mapping[str, ArrayLike],
    schema: pa.Schema,
    *,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    compression: str = DEFAULT_COMPRESSION,
    use_dictionary: bool = DEFAULT_USE_DICTIONARY,
    id_encoding: Optional[str] = DEFAULT_ID_ENCODING,
) -> int:
    """Writes one complete Parquet file atomically (temporary name, then rename); returns its row count.

    Args:
        path: final file name, e.g. ``DIR/train/part-00000.parquet``.
        columns: ``{column: values}`` for every column of ``schema`` (numpy arrays, Arrow arrays or lists).
        schema: from :func:`arrow_schema`.
        row_group_size: rows per row group.
        compression: Parquet codec.
        use_dictionary: write dictionary-encoded pages.
        id_encoding: Parquet encoding of the one-hot int64 id columns.
    """
    with SplitParquetWriter(
        path, schema, row_group_size=row_group_size, compression=compression, use_dictionary=use_dictionary,
        id_encoding=id_encoding,
    ) as writer:
        writer.write(columns)
    return writer.rows


def check_dataset_files(data_dir: os.PathLike, meta: DatasetMetadata) -> None:
    """Checks every Parquet file listed in ``meta`` against it, reading only the files' footers.

    Each file must exist and be a Parquet file whose columns include ``label``, every field and every dense
    feature with the contract's types, and whose row count equals the one ``metadata.json`` records. Where the
    footer has column statistics, labels must lie in [0, 1] and one-hot ids in ``[0, vocab_size)``.

    Raises:
        DatasetError: naming the file and the column (or count) that disagrees.
    """
    data_dir = Path(data_dir)
    expected = arrow_schema(meta.fields, meta.dense_fields)
    bounds = {LABEL_COLUMN: (0, 1)}
    bounds.update({f.name: (0, f.vocab_size - 1) for f in meta.fields if not f.multi_hot})
    for split, files in meta.splits.items():
        for rel, rows in zip(files.files, files.file_rows):
            path = data_dir / rel
            try:
                parquet = pq.ParquetFile(path)
            except FileNotFoundError:
                raise DatasetError(f"{path}: missing (listed in metadata.json under splits.{split})") from None
            except (OSError, pa.ArrowException) as e:
                raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
            actual = parquet.schema_arrow
            for field in expected:
                index = actual.get_field_index(field.name)
                if index < 0:
                    raise DatasetError(f"{path}: column {field.name}: missing (metadata.json lists it)")
                if actual.field(index).type != field.type:
                    raise DatasetError(
                        f"{path}: column {field.name}: type {actual.field(index).type}, metadata.json implies {field.type}"
                    )
            if parquet.metadata.num_rows != rows:
                raise DatasetError(
                    f"{path}: {parquet.metadata.num_rows} rows, metadata.json says {rows} (splits.{split})"
                )
            _check_statistics(path, parquet, bounds)


def _check_statistics(path: Path, parquet: pq.ParquetFile, bounds: Mapping[str, tuple]) -> None:
    metadata = parquet.metadata
    names = parquet.schema_arrow.names
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            name = chunk.path_in_schema
            if name not in bounds or name not in names:
                continue
            stats = chunk.statistics
            if stats is None or not stats.has_min_max:
                continue
            low, high = bounds[name]
            if stats.min < low or stats.max > high:
                what = "labels" if name == LABEL_COLUMN else "ids"
                raise DatasetError(
                    f"{path}: column {name}: {what} span [{stats.min}, {stats.max}] in row group {group}, outside "
                    f"[{low}, {high}]" + ("" if name == LABEL_COLUMN else f" (metadata.json: vocab_size {high + 1})")
                )
