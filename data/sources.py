"""One entry point to a dataset's rows, whichever its source: Parquet files (``convert``, ``synth``) or a stream
drawn while training (``synth --stream``), told apart by ``metadata.json``'s ``source``.

The trainer and evaluation open splits through :func:`open_split` and read the train split's positive rate through
:func:`split_positive_rate`, so every command that trains or evaluates on ``--data`` takes either kind of dataset.
"""

from __future__ import annotations

import os
from typing import Any, Tuple, Union

from multiembed.data.loader import ParquetBatchLoader, positive_rate
from multiembed.data.metadata import DatasetMetadata, read_metadata
from multiembed.data.stream_loader import StreamBatchLoader
from multiembed.data.synthetic.stream import stream_positive_rate

SplitLoader = Union[ParquetBatchLoader, StreamBatchLoader]


def open_split(data_dir: os.PathLike, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
               **options: Any) -> SplitLoader:
    """The loader of ``split`` of ``data_dir`` for this rank: a :class:`ParquetBatchLoader` or, for a stream
    dataset, a :class:`StreamBatchLoader` (same arguments, batches, batch counts and resume positions).

    Raises:
        DatasetError: the dataset is missing or inconsistent (file named).

    Example::

        >>> import tempfile
        >>> from multiembed.data.synthetic import CollapseRegimeConfig
        >>> from multiembed.data.synthetic.stream import write_stream_dataset
        >>> out = tempfile.mkdtemp()
        >>> _ = write_stream_dataset(out, 1200, CollapseRegimeConfig(seed=0), split=(10, 1, 1))
        >>> type(open_split(out, "val", 64, last_batch="pad")).__name__
        'StreamBatchLoader'
    """
    kind = StreamBatchLoader if read_metadata(data_dir).stream is not None else ParquetBatchLoader
    return kind(data_dir, split, batch_size, rank, world_size, **options)


def split_positive_rate(data_dir: os.PathLike, meta: DatasetMetadata, split: str = "train") -> Tuple[float, int]:
    """The positive rate of ``split`` and the rows it was counted on: read from the Parquet labels
    (:func:`~multiembed.data.loader.positive_rate`), or the rate a stream recorded for its first training rows."""
    if meta.stream is not None and split == "train":
        return stream_positive_rate(meta)
    return positive_rate(data_dir, meta, split)
