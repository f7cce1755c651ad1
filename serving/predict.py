"""Predictions from an artifact: a converted dataset's split, or raw Criteo / Avazu lines.

Raw lines go through the converter's own steps (:mod:`multiembed.data.rawlog` parses them in chunks,
:func:`multiembed.data.encode.encode_table` turns tokens into ids and integers into dense features) with the
vocabulary the artifact carries, so a served model sees exactly the features it was trained on; a token the
vocabulary does not hold gets the out-of-vocabulary id (paper mode) or its hash bucket (hashing mode). A few lines
at a time (a served request, a chunk of at most :data:`LINE_ENCODER_MAX_LINES` lines) go through
:class:`multiembed.data.lines.LineEncoder` instead, which gives the same ids and refusals without the chunked
reader's set-up; :class:`RawLineEncoder` is that path for a server: raw lines in, ``(dense, KJT)`` out. A converted
dataset must have the artifact's vocabulary fingerprint.

Example::

    >>> from multiembed.serving import load_artifact
    >>> artifact = load_artifact("runs/me4x.int8")  # doctest: +SKIP
    >>> result = predict_raw(artifact, "day_23.tsv")  # doctest: +SKIP
    >>> result.metrics()["auc"]  # doctest: +SKIP
    >>> encoder = RawLineEncoder(artifact)  # doctest: +SKIP
    >>> probs = artifact.predict(*encoder.features([line]))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.data.encode import encode_table
from multiembed.data.formats import HASHING_MODE, MANAGED_MODE, RawFormat, raw_format
from multiembed.data.lines import EncodedLines, LineEncoder
from multiembed.data.loader import ParquetBatchLoader, keyed_features
from multiembed.data.metadata import DENSE_PREFIX, LABEL_COLUMN, atomic_write, read_metadata
from multiembed.data.metrics import log_loss, roc_auc
from multiembed.data.rawlog import (
    ON_ERROR_CHOICES, ChunkParser, RawChunk, is_unlabelled_line, iter_chunks, row_layout, scan_source,
)
from multiembed.data.metadata import DatasetError
from multiembed.data.remap import RemappedVocabulary
from multiembed.data.vocab import CountedVocabulary, HashingVocabulary
from multiembed.serving.artifact import RAW_PREPROCESSING, ArtifactError, ServingArtifact

DEFAULT_BATCH_SIZE = 4096
# A chunk of at most this many lines is encoded by LineEncoder, a longer one by the chunked reader: measured on
# Criteo and Avazu lines, LineEncoder is 1.5-2.5x faster at 128 lines, about level at 256-512, slower beyond
# (docs/serving.md).
LINE_ENCODER_MAX_LINES = 128
Vocabulary = Union[HashingVocabulary, CountedVocabulary]


@dataclasses.dataclass
class Predictions:
    """Predictions of a pass, in input order.

    Attributes:
        logits: float32 ``[N]``.
        labels: int8 ``[N]`` (the data's labels), or None for unlabelled rows.
        rows: int64 ``[N]``: the row of each prediction (index in the split; data row of a raw file, 0-based).
        skipped: raw rows skipped under ``on_error="skip"``, by reason.
    """

    logits: np.ndarray
    labels: Optional[np.ndarray]
    rows: np.ndarray
    skipped: Dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def probs(self) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-self.logits.astype(np.float64)))).astype(np.float32)

    def metrics(self) -> Dict[str, Optional[float]]:
        """``{"rows", "auc", "logloss"}``: AUC (exact, ties at mid-rank; None unless the labels hold both classes)
        and log loss (nats); ``{"rows"}`` only for unlabelled rows."""
        out: Dict[str, Optional[float]] = {"rows": int(self.logits.shape[0])}
        if self.labels is None:
            return out
        out.update({"auc": None, "logloss": None})
        if self.labels.size:
            out["logloss"] = log_loss(self.labels, self.probs)
            if 0 < int(self.labels.sum()) < self.labels.size:
                out["auc"] = roc_auc(self.labels, self.logits)
        return out

    def write_parquet(self, path: "str | os.PathLike") -> Path:
        """Writes ``row`` (int64), ``logit``, ``prob`` (float32) and ``label`` (int8, when known) atomically."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path}: is a directory; --out names the Parquet file to write")
        columns = {"row": pa.array(self.rows, pa.int64()), "logit": pa.array(self.logits, pa.float32()),
                   "prob": pa.array(self.probs, pa.float32())}
        if self.labels is not None:
            columns[LABEL_COLUMN] = pa.array(self.labels, pa.int8())
        table = pa.table(columns)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: pq.write_table(table, f))
        return path


def _run(artifact: ServingArtifact, batches: Iterator[Tuple[torch.Tensor, KeyedJaggedTensor]]) -> np.ndarray:
    parts: List[np.ndarray] = []
    with torch.inference_mode():
        for dense, sparse in batches:
            parts.append(artifact.model(dense, sparse).float().numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def predict_dataset(
    artifact: ServingArtifact, data_dir: "str | os.PathLike", split: str = "test", batch_size: int = DEFAULT_BATCH_SIZE
) -> Predictions:
    """Predicts every row of ``split`` of a converted dataset, in order.

    Raises:
        ValueError: another vocabulary fingerprint or schema, no such split, or unreadable data.
    """
    manifest = artifact.manifest
    meta = read_metadata(data_dir)
    if meta.vocab_fingerprint != manifest.vocab_fingerprint:
        raise ValueError(
            f"{data_dir}: vocabulary fingerprint {meta.vocab_fingerprint[:16]}... differs from the artifact's "
            f"({manifest.vocab_fingerprint[:16]}...) in {artifact.directory / 'manifest.json'}; convert the data with "
            "--vocab-from the training data's directory"
        )
    if meta.field_names != manifest.fields:
        raise ValueError(f"{data_dir}: fields {meta.field_names[:3]}... are not the artifact's {manifest.fields[:3]}...")
    if manifest.dense_fields and list(meta.dense_fields) != manifest.dense_fields:
        raise ValueError(f"{data_dir}: dense fields {meta.dense_fields} are not the artifact's {manifest.dense_fields}")
    if meta.split_rows().get(split, 0) == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no rows")
    loader = ParquetBatchLoader(data_dir, split, batch_size, shuffle=False, last_batch="keep",
                                use_dense=bool(manifest.dense_fields), prefetch=2)
    labels: List[np.ndarray] = []

    remap = artifact_remapping(artifact) if manifest.preprocessing.get("remap") else None

    def batches() -> Iterator[Tuple[torch.Tensor, KeyedJaggedTensor]]:
        for batch in loader:
            labels.append(batch.labels.numpy().astype(np.int8))
            sparse = batch.sparse_features
            yield batch.dense_features, sparse if remap is None else remap_features(remap, sparse)

    logits = _run(artifact, batches())
    return Predictions(logits, np.concatenate(labels), np.arange(logits.shape[0], dtype=np.int64))


def artifact_vocabulary(artifact: ServingArtifact) -> Tuple[RawFormat, str, int, Vocabulary]:
    """The raw format, vocabulary mode, hash seed and vocabulary the artifact's training data was converted with.

    Raises:
        ArtifactError: the artifact records no raw preprocessing (synthetic training data), or its vocabulary does
            not give the recorded fingerprint.
    """
    manifest, spec = artifact.manifest, artifact.manifest.preprocessing
    if spec.get("kind") != RAW_PREPROCESSING:
        raise ArtifactError(f"{artifact.directory}: no raw-row preprocessing ({spec.get('reason', spec.get('kind'))}); "
                            "use --data")
    fmt = raw_format(str(spec["format"]))
    mode, seed = str(spec["mode"]), int(spec.get("hash_seed", 0))
    vocab: Vocabulary
    if mode == HASHING_MODE:
        vocab = HashingVocabulary(fmt.name, {str(f): int(n) for f, n in spec["hash_sizes"]}, seed)
    elif mode == MANAGED_MODE:
        vocab = artifact_remapping(artifact)
    else:
        vocab = CountedVocabulary.load(artifact.directory)
    if vocab.fingerprint != manifest.vocab_fingerprint:
        raise ArtifactError(f"{artifact.directory}: the stored vocabulary gives fingerprint {vocab.fingerprint[:16]}..., "
                            f"the manifest records {manifest.vocab_fingerprint[:16]}...")
    if list(vocab.fields) != manifest.fields:
        raise ArtifactError(f"{artifact.directory}: the vocabulary's fields are not the model's")
    return fmt, mode, seed, vocab


def artifact_remapping(artifact: ServingArtifact) -> RemappedVocabulary:
    """The trained remapping of a managed-vocabulary artifact (raw keys -> rows; unseen keys: a fallback row).

    Raises:
        ArtifactError: missing, unreadable or corrupted ``remap.npz``, or of other fields than the model's.
    """
    try:
        remap = RemappedVocabulary.load(artifact.directory)
    except DatasetError as e:
        raise ArtifactError(str(e)) from None
    if remap.fields != artifact.manifest.fields:
        raise ArtifactError(f"{artifact.directory}: the remapping's fields are not the model's")
    return remap


def remap_features(remap: RemappedVocabulary, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A batch of raw managed keys (a managed dataset's Parquet ids) -> the same batch with the trained rows."""
    values = features.values().numpy()
    out = np.empty_like(values)
    start = 0
    for key, length in zip(features.keys(), features.length_per_key()):
        out[start : start + length] = remap.rows_of(key, values[start : start + length])
        start += length
    return KeyedJaggedTensor(keys=features.keys(), values=torch.from_numpy(out), lengths=features.lengths(),
                             stride=features.stride())


def model_inputs(
    fields: List[str], ids: np.ndarray, dense: np.ndarray
) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
    """Ids and dense features -> the model's inputs.

    Args:
        fields: the KJT's keys (the artifact's fields).
        ids: int64 ``[F, n]``: a row of ids per field, in ``fields`` order.
        dense: float32 ``[n, num_dense]`` (``[n, 0]`` without dense features).

    Returns:
        ``(dense [n, num_dense], KJT)`` with one id per field and row.
    """
    size = ids.shape[1]
    values = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1))
    # As the loader builds its batches: numpy ones (a torch fill may wake the intra-op pool), per-key counts known.
    lengths = torch.from_numpy(np.ones(values.shape[0], dtype=np.int32))
    sparse = keyed_features(fields, values, lengths, size, [size] * len(fields))
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)), sparse


def encode_rows(
    columns: Dict[str, np.ndarray], fields: List[str], dense_fields: List[str]
) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
    """Encoded columns (:func:`~multiembed.data.encode.encode_table`) -> ``(dense [n, num_dense], KJT)``."""
    n = columns[fields[0]].shape[0]
    ids = np.stack([columns[f] for f in fields])
    if dense_fields:
        dense = np.stack([columns[DENSE_PREFIX + f] for f in dense_fields], axis=1)
    else:
        dense = np.zeros((n, 0), dtype=np.float32)
    return model_inputs(fields, ids, dense)


class RawLineEncoder:
    """Raw lines -> an artifact's model inputs ``(dense, KJT)``, a few lines at a time (a served request), with
    exactly the ids, dense features and refusals of ``convert`` and ``predict --raw``
    (:class:`~multiembed.data.lines.LineEncoder`). Build one per artifact and call :meth:`features` per request.

    Args:
        artifact: the loaded artifact (trained on converted raw data).
        labelled: whether the lines hold the label column; None: the first line of each call decides by its number
            of columns, as ``predict --raw`` decides for a file without a header.
        source: what messages name as the file (``source:line: field: what``).
        on_error: ``fail`` raises at the first bad line; ``skip`` drops and counts bad lines.

    Raises:
        ArtifactError: the artifact has no raw preprocessing, or its vocabulary or dense fields do not match its
            manifest.
        ValueError: an unknown ``on_error``.

    Example::

        >>> artifact = load_artifact("runs/me4x.int8")  # doctest: +SKIP
        >>> encoder = RawLineEncoder(artifact)  # doctest: +SKIP
        >>> probs = artifact.predict(*encoder.features([b"0\\t1\\t5\\t..."]))  # doctest: +SKIP
    """

    def __init__(
        self, artifact: ServingArtifact, labelled: Optional[bool] = None, source: str = "<lines>",
        on_error: str = "fail",
    ) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        self.format, self.mode, self.hash_seed, self.vocab = artifact_vocabulary(artifact)
        self.labelled, self.source, self.on_error = labelled, source, on_error
        manifest = artifact.manifest
        self.fields = manifest.fields
        missing = [f for f in manifest.dense_fields if f not in self.format.int_columns]
        if missing:
            raise ArtifactError(f"{artifact.directory}: dense fields {missing[:3]} are not integer columns of "
                                f"{self.format.name}")
        columns = [self.format.int_columns.index(f) for f in manifest.dense_fields]
        self._dense_columns = None if columns == list(range(len(self.format.int_columns))) else columns
        self._encoders: Dict[bool, LineEncoder] = {}

    def layout_encoder(self, labelled: bool) -> LineEncoder:
        """The line encoder of the labelled or the unlabelled layout (built on first use)."""
        encoder = self._encoders.get(labelled)
        if encoder is None:
            layout = self.format if labelled else self.format.unlabelled()
            encoder = self._encoders[labelled] = LineEncoder(layout, self.mode, self.vocab, self.hash_seed,
                                                             self.source, self.on_error)
        return encoder

    def encode(self, lines: Sequence[Union[bytes, str]], first_line: int = 1) -> EncodedLines:
        """The ids, dense features and labels of ``lines`` (one line per item, line ending optional).

        Raises:
            InputError: a bad line under ``on_error="fail"``: ``source:line: field: what``, the converter's message.
        """
        labelled = self.labelled
        if labelled is None:
            first = lines[0] if len(lines) else b""
            first = first.encode("utf-8", "surrogatepass") if isinstance(first, str) else first
            labelled = not is_unlabelled_line(self.format, first)
        return self.layout_encoder(labelled).encode(lines, first_line)

    def features(
        self, lines: Sequence[Union[bytes, str]], first_line: int = 1
    ) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
        """``(dense [n, num_dense], KJT)`` of the kept lines, the inputs of ``artifact.predict`` /
        ``artifact.model`` (see :meth:`encode`)."""
        return self.model_inputs(self.encode(lines, first_line))

    def model_inputs(self, encoded: EncodedLines) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
        """``(dense [n, num_dense], KJT)`` of encoded lines."""
        dense = encoded.dense if self._dense_columns is None else encoded.dense[:, self._dense_columns]
        return model_inputs(self.fields, encoded.ids.T, dense)


def predict_raw(
    artifact: ServingArtifact,
    path: "str | os.PathLike",
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_error: str = "fail",
) -> Predictions:
    """Predicts every line of a raw Criteo / Avazu file (the format the artifact's training data was converted
    from; ``.gz`` allowed), through the converter's tokenisation and the artifact's vocabulary.

    Rows without the label column (Criteo Kaggle ``test.txt``: 39 columns; Avazu ``test`` without ``click``) are
    predicted too, told apart by the file's first line (:func:`~multiembed.data.rawlog.row_layout`); their
    predictions have no labels.

    Args:
        artifact: the loaded artifact.
        path: the raw file.
        batch_size: rows per model call.
        on_error: ``fail`` stops at the first bad line (``file:line: field: what``); ``skip`` drops and counts them.

    Raises:
        ArtifactError: the artifact has no raw preprocessing.
        ValueError: a bad line (``fail``), an unreadable file.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    encoder = RawLineEncoder(artifact, source=str(path), on_error=on_error)
    fmt = row_layout(path, encoder.format)
    scan_source(path, fmt)  # a regular, readable, non-empty file with the format's header
    lines = encoder.layout_encoder(fmt.label_column is not None)
    parser = ChunkParser(fmt, str(path), on_error)
    manifest = artifact.manifest
    labels: List[np.ndarray] = []
    rows: List[np.ndarray] = []
    skipped: Dict[str, int] = {}

    def encoded_chunks() -> Iterator[Tuple[np.ndarray, Dict[str, int], Iterator[Dict[str, np.ndarray]]]]:
        """``(rows, skipped, columns of each batch)`` of every chunk: a short one line by line, a long one through
        the chunked reader."""
        for chunk in iter_chunks(path, fmt):
            if chunk.lines <= LINE_ENCODER_MAX_LINES:
                encoded = lines.encode(_chunk_lines(chunk), chunk.first_line)
                yield chunk.first_row + encoded.rows, encoded.skipped, _slices(encoded.columns(), batch_size)
                continue
            parsed = parser.parse(chunk)
            n = parsed.table.num_rows
            kept = parsed.rows if parsed.rows is not None else parsed.first_row + np.arange(n, dtype=np.int64)
            yield kept, parsed.skipped, (
                encode_table(parsed.table.slice(start, batch_size), fmt, encoder.mode, encoder.vocab, encoder.hash_seed)
                for start in range(0, n, batch_size)
            )

    def batches() -> Iterator[Tuple[torch.Tensor, KeyedJaggedTensor]]:
        for kept, chunk_skipped, chunk_batches in encoded_chunks():
            for reason, count in chunk_skipped.items():
                skipped[reason] = skipped.get(reason, 0) + count
            rows.append(kept)
            for columns in chunk_batches:
                if LABEL_COLUMN in columns:
                    labels.append(columns[LABEL_COLUMN])
                yield encode_rows(columns, manifest.fields, manifest.dense_fields)

    logits = _run(artifact, batches())
    labelled = fmt.label_column is not None
    return Predictions(
        logits,
        (np.concatenate(labels) if labels else np.zeros(0, dtype=np.int8)) if labelled else None,
        np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
        skipped,
    )


def _chunk_lines(chunk: RawChunk) -> List[bytes]:
    """The lines of a chunk, without their newlines."""
    lines = bytes(chunk.data).split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _slices(columns: Dict[str, np.ndarray], size: int) -> Iterator[Dict[str, np.ndarray]]:
    """``columns`` in batches of ``size`` rows."""
    n = next(iter(columns.values())).shape[0] if columns else 0
    for start in range(0, n, size):
        yield {name: column[start : start + size] for name, column in columns.items()}
