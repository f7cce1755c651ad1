"""The converted-dataset contract: directory layout and ``metadata.json``.

Every producer (``convert``, ``synth``) writes and every consumer (loader, trainer, ``inspect``) reads a
dataset directory laid out as::

    DIR/
      metadata.json                 # written last, atomically: its presence means the dataset is complete
      train/part-00000.parquet      # one or more Parquet files per split
      val/part-00000.parquet
      test/part-00000.parquet

Parquet columns (one row per impression):

* ``label``: int8, 0 or 1.
* one column per categorical field, named as the field (``C1``..``C26``, ``I1``..``I13`` in paper mode): int64 ids
  in ``[0, vocab_size)`` for one-hot fields, ``list<int64>`` for multi-hot fields.
* ``dense_<name>`` float32 columns for raw dense features (Criteo: ``log(1 + max(x, 0))`` of I1..I13), optional.
* ``true_prob`` float32, only in synthetic data: the probability the generator drew the label from.

A *stream* dataset (``multiembed synth --stream``) has no Parquet files: its ``metadata.json`` says
``"source": "stream"`` and its ``"stream"`` object holds the click model and the rows of every split, and the rows are
drawn from their index while training reads them (:mod:`multiembed.data.synthetic.stream`). Its ``splits`` is empty;
:meth:`DatasetMetadata.split_rows` reads the rows from the stream object.

Every split file ``metadata.json`` names must lie inside the dataset directory (no absolute path, no ``..``, no
symbolic link that leads out); :func:`read_metadata` refuses metadata that names one outside.

This module only knows JSON and the file system: it imports neither pyarrow nor torch, so ``inspect`` stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional

from multiembed.data.paths import escape_reason

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SPLITS = ("train", "val", "test")
LABEL_COLUMN = "label"
TRUE_PROB_COLUMN = "true_prob"
DENSE_PREFIX = "dense_"
# ``metadata.json``'s ``source``: Parquet files listed under ``splits`` (the default when absent), or rows drawn from
# their index by the generator the ``stream`` object describes.
PARQUET_SOURCE = "parquet"
STREAM_SOURCE = "stream"
SOURCES = (PARQUET_SOURCE, STREAM_SOURCE)


class DatasetError(ValueError):
    """A dataset directory or its metadata is missing, malformed or inconsistent.

    The message names the file (and the field) so the CLI can print it as one line.
    """


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One categorical field: its column name, the number of ids its table needs (OOV included), multi-hotness."""

    name: str
    vocab_size: int
    multi_hot: bool = False


@dataclasses.dataclass(frozen=True)
class SplitFiles:
    """The Parquet files of one split (paths relative to the dataset directory) and their row counts."""

    files: List[str]
    file_rows: List[int]

    @property
    def rows(self) -> int:
        return sum(self.file_rows)


@dataclasses.dataclass
class DatasetMetadata:
    """The parsed ``metadata.json`` of a converted dataset.

    Attributes:
        dataset: ``"criteo"``, ``"criteo-1tb"``, ``"avazu"`` or ``"synthetic"``.
        fields: categorical fields in schema order (the order tables and KJT keys use).
        dense_fields: names of the dense features (columns ``dense_<name>``), possibly empty.
        splits: ``{"train"|"val"|"test": SplitFiles}``.
        vocab_fingerprint: a digest of the vocabulary (mode, options, every field's token -> id map or hash
            function); a model trained on one fingerprint refuses data with another.
        skipped: rows skipped under ``--on-error skip``, by reason (empty when none).
        rows_read: data rows read from the sources (skipped rows included).
        sources: ``[{"path", "bytes", "mtime_ns", "sha256", "fingerprint", "rows"}]``; ``path`` relative to the
            dataset directory (older datasets: absolute; ``mtime_ns`` and ``sha256`` absent).
        options: every option the producer ran with (``seed``: the split seed; paths relative to the dataset
            directory).
        bayes: synthetic data only: ``{split: {"auc": float, "logloss": float}}`` of the true probabilities.
        split_recipe: what decides which row lands in which split (producer, rules, seed, split weights, every
            input's content hash and rows, or the generator's parameters); hashed by :func:`split_identity`.
            ``None`` in metadata written before it was recorded (unknown).
        stream: a stream dataset's generator and rows per split (``"source": "stream"`` in the file; None for
            Parquet data): ``{"rows": {split: int}, ...}``, read by :mod:`multiembed.data.synthetic.stream`.
        extra: anything else a producer recorded (kept on round trips).

    Every path a dataset's metadata names is relative to the dataset directory, so a moved directory still loads.
    """

    dataset: str
    fields: List[FieldSpec]
    dense_fields: List[str]
    splits: Dict[str, SplitFiles]
    vocab_fingerprint: str
    skipped: Dict[str, int] = dataclasses.field(default_factory=dict)
    rows_read: int = 0
    sources: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    bayes: Optional[Dict[str, Dict[str, float]]] = None
    split_recipe: Optional[Dict[str, Any]] = None
    stream: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def field_names(self) -> List[str]:
        return [f.name for f in self.fields]

    @property
    def vocab_sizes(self) -> Dict[str, int]:
        """``{field: vocab_size}`` in schema order."""
        return {f.name: f.vocab_size for f in self.fields}

    @property
    def source(self) -> str:
        """``"stream"`` for rows drawn while training, ``"parquet"`` for rows in files."""
        return STREAM_SOURCE if self.stream is not None else PARQUET_SOURCE

    def split_rows(self) -> Dict[str, int]:
        """Rows per split (a stream's ``train``: the rows of one epoch)."""
        if self.stream is not None:
            return {name: int(self.stream["rows"].get(name, 0)) for name in SPLITS}
        return {name: self.splits[name].rows if name in self.splits else 0 for name in SPLITS}

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "fields": [dataclasses.asdict(f) for f in self.fields],
            "dense_fields": list(self.dense_fields),
            "splits": {
                name: {"rows": s.rows, "files": [{"path": p, "rows": r} for p, r in zip(s.files, s.file_rows)]}
                for name, s in self.splits.items()
            },
            "vocab_fingerprint": self.vocab_fingerprint,
            "skipped": dict(self.skipped),
            "rows_read": self.rows_read,
            "sources": list(self.sources),
            "options": dict(self.options),
        }
        if self.bayes is not None:
            out["bayes"] = self.bayes
        if self.split_recipe is not None:
            out["split_recipe"] = dict(self.split_recipe)
        if self.stream is not None:
            out["source"] = STREAM_SOURCE
            out["stream"] = dict(self.stream)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = METADATA_FILE) -> "DatasetMetadata":
        """Parses and validates a metadata object; every problem names ``where`` and the offending field."""
        if not isinstance(obj, Mapping):
            raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetError(f"{where}: format_version: expected {FORMAT_VERSION}, got {version!r}")
        for key in ("dataset", "fields", "splits", "vocab_fingerprint"):
            if key not in obj:
                raise DatasetError(f"{where}: {key}: missing")
        fields: List[FieldSpec] = []
        if not isinstance(obj["fields"], list) or not obj["fields"]:
            raise DatasetError(f"{where}: fields: expected a non-empty list")
        for i, f in enumerate(obj["fields"]):
            try:
                spec = FieldSpec(name=str(f["name"]), vocab_size=int(f["vocab_size"]), multi_hot=bool(f.get("multi_hot", False)))
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{where}: fields[{i}]: malformed ({e})") from None
            if spec.vocab_size < 1:
                raise DatasetError(f"{where}: fields[{i}] ({spec.name}): vocab_size must be >= 1, got {spec.vocab_size}")
            fields.append(spec)
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise DatasetError(f"{where}: fields: duplicate field names")
        splits: Dict[str, SplitFiles] = {}
        if not isinstance(obj["splits"], Mapping):
            raise DatasetError(f"{where}: splits: expected an object")
        for name, s in obj["splits"].items():
            if name not in SPLITS:
                raise DatasetError(f"{where}: splits: unknown split {name!r} (expected one of {SPLITS})")
            try:
                files = [str(e["path"]) for e in s["files"]]
                rows = [int(e["rows"]) for e in s["files"]]
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{where}: splits.{name}.files: malformed ({e})") from None
            if any(r < 0 for r in rows):
                raise DatasetError(f"{where}: splits.{name}.files: negative row count")
            if "rows" in s and _as_int(s["rows"], f"{where}: splits.{name}.rows") != sum(rows):
                raise DatasetError(
                    f"{where}: splits.{name}.rows: {s['rows']} disagrees with the sum of its files' rows ({sum(rows)})"
                )
            splits[name] = SplitFiles(files=files, file_rows=rows)
        known = {
            "format_version", "dataset", "fields", "dense_fields", "splits", "vocab_fingerprint", "skipped",
            "rows_read", "sources", "options", "bayes", "split_recipe", "source", "stream",
        }
        stream = _parse_stream(obj, where)
        recipe = obj.get("split_recipe")
        if recipe is not None and not isinstance(recipe, Mapping):
            raise DatasetError(f"{where}: split_recipe: expected an object, got {type(recipe).__name__}")
        for key, kind in (("dense_fields", list), ("skipped", Mapping), ("sources", list), ("options", Mapping)):
            if key in obj and not isinstance(obj[key], kind):
                raise DatasetError(f"{where}: {key}: expected a JSON {'list' if kind is list else 'object'}")
        return cls(
            dataset=str(obj["dataset"]),
            fields=fields,
            dense_fields=[str(d) for d in obj.get("dense_fields", [])],
            splits=splits,
            vocab_fingerprint=str(obj["vocab_fingerprint"]),
            skipped={str(k): _as_int(v, f"{where}: skipped.{k}") for k, v in obj.get("skipped", {}).items()},
            rows_read=_as_int(obj.get("rows_read", 0), f"{where}: rows_read"),
            sources=list(obj.get("sources", [])),
            options=dict(obj.get("options", {})),
            bayes=obj.get("bayes"),
            split_recipe=dict(recipe) if recipe is not None else None,
            stream=stream,
            extra={k: v for k, v in obj.items() if k not in known},
        )


def _as_int(value: Any, where: str) -> int:
    """``value`` as an integer (a JSON number or a string of digits); a DatasetError naming ``where`` otherwise."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: expected an integer, got {value!r}") from None


def _parse_stream(obj: Mapping[str, Any], where: str) -> Optional[Dict[str, Any]]:
    """The ``stream`` object of a stream dataset's metadata (None for Parquet data), its rows per split checked."""
    source = obj.get("source", PARQUET_SOURCE)
    if source not in SOURCES:
        raise DatasetError(f"{where}: source: expected one of {', '.join(SOURCES)}, got {source!r}")
    if source == PARQUET_SOURCE:
        if "stream" in obj:
            raise DatasetError(f"{where}: stream: present but source is {PARQUET_SOURCE!r}")
        return None
    stream = obj.get("stream")
    if not isinstance(stream, Mapping):
        raise DatasetError(f"{where}: stream: expected an object (source is {STREAM_SOURCE!r})")
    rows = stream.get("rows")
    if not isinstance(rows, Mapping) or set(rows) != set(SPLITS):
        raise DatasetError(f"{where}: stream.rows: expected rows for each of {', '.join(SPLITS)}")
    for name in SPLITS:
        value = rows[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DatasetError(f"{where}: stream.rows.{name}: expected a non-negative integer, got {value!r}")
    if obj.get("splits"):
        raise DatasetError(f"{where}: splits: a stream dataset lists no files (source is {STREAM_SOURCE!r})")
    return dict(stream)


def split_identity(meta: DatasetMetadata) -> Optional[str]:
    """A SHA-256 hex digest of what decides which row lands in which split, or None when unknown.

    Two datasets share it exactly when they put the same rows into the same splits: the same producer and rules,
    split seed, split weights (or ``--split-by-file``), ``--on-error`` and inputs of the same content in the same
    order (converted data), or the same generator parameters, seed, row count and weights (synthetic data). The
    vocabulary, the Parquet layout and the file names play no part (a copy or a moved dataset keeps it; the
    vocabulary has its own check, ``vocab_fingerprint``). Metadata written before ``split_recipe`` was recorded
    gives None: the split is unknown, not different.

    A consumer that must not evaluate on rows a model was trained on compares this value with the one recorded
    for its training data (and decides what an unknown value means). Note that a held-out dataset converted from
    other inputs (``--vocab-from`` with ``--split 0,0,1``) has another identity by design.
    """
    if meta.split_recipe is None:
        return None
    text = json.dumps(meta.split_recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks: the checksum of checkpoint and artifact manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def free_bytes(path: os.PathLike) -> Optional[int]:
    """Bytes free for this user on the file system holding ``path`` (its nearest existing parent); None when
    unknown."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        stats = os.statvfs(where)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def write_failure(path: os.PathLike, error: BaseException) -> OSError:
    """The one-line error of a write to ``path`` that failed (a full disk, a quota, a file-size limit, an I/O
    error): ``<path>: cannot write (<reason>); <n> bytes free on its file system``.

    Example::

        >>> str(write_failure("/nonexistent/x", OSError(28, "No space left on device"))).split(";")[0]
        '/nonexistent/x: cannot write (No space left on device)'
    """
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).strip()
    reason = (reason.splitlines() or [type(error).__name__])[0][:200]
    free = free_bytes(path)
    where = f"{free:,} bytes free on its file system" if free is not None else "free space unknown"
    return OSError(f"{path}: cannot write ({reason}); {where}")


class _RecordingFile:
    """A binary file that remembers the ``OSError`` its ``write`` raised: writers that call ``write`` from C++
    (``torch.save``) replace it with their own error ("unexpected pos"), which would hide a full disk."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def atomic_write(path: os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Publishes a file written by ``write(binary_file)`` through a temporary file in the same directory and
    ``os.replace``: a reader never sees a half-written file, only the old content or the new one.

    Raises:
        OSError: the write failed (:func:`write_failure`: one line naming ``path`` and the free bytes); the
            temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the published file the mode a plain open() would (0666 less umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        recording: Optional[_RecordingFile] = None
        with os.fdopen(fd, "wb") as f:
            recording = _RecordingFile(f)
            write(recording)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        failed = recording.error if recording is not None and recording.error is not None else e
        if isinstance(failed, OSError) and failed.errno is not None:
            raise write_failure(path, failed) from None
        raise


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_metadata(data_dir: os.PathLike, meta: DatasetMetadata) -> Path:
    """Writes ``DIR/metadata.json`` atomically (last step of a conversion: it marks the dataset complete)."""
    path = Path(data_dir) / METADATA_FILE
    atomic_write_text(path, json.dumps(meta.to_json(), indent=2, sort_keys=False) + "\n")
    return path


def read_metadata(data_dir: os.PathLike) -> DatasetMetadata:
    """Reads and validates ``DIR/metadata.json``.

    Raises:
        DatasetError: the directory or file is missing, unreadable, not JSON, or inconsistent; the message names
            the file and the field.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DatasetError(f"{data_dir}: no such dataset directory")
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: not a directory (expected a converted dataset directory)")
    path = data_dir / METADATA_FILE
    if not path.exists():
        raise DatasetError(f"{path}: missing (not a converted dataset, or its conversion did not finish)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: unreadable ({e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    meta = DatasetMetadata.from_json(obj, where=str(path))
    check_files_inside(meta, data_dir, str(path))
    return meta


def check_files_inside(meta: DatasetMetadata, data_dir: os.PathLike, where: str = METADATA_FILE) -> None:
    """Refuses metadata naming a split file outside ``data_dir``: an absolute path, a ``..`` part, or a symbolic
    link that leads out (a copied dataset whose ``test`` split points at another dataset's training rows would
    evaluate those rows as test rows).

    Raises:
        DatasetError: ``where: splits.<split>.files[<i>].path: '<name>' <why>`` (one line).
    """
    for name, split in meta.splits.items():
        for i, file in enumerate(split.files):
            reason = escape_reason(file, data_dir)
            if reason is not None:
                raise DatasetError(
                    f"{where}: splits.{name}.files[{i}].path: {file!r} {reason}; every file a dataset names must lie "
                    "inside its directory"
                )
