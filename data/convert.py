"""Raw click logs (Criteo Kaggle, Criteo 1TB, Avazu) -> a converted dataset directory (Parquet + metadata.json).

One call of :func:`convert`:

1. checks the options (:func:`resolve_options`: no file twice, by device and inode), takes the output directory's
   lock (:mod:`multiembed.data.locking`: one job per directory), refuses a symbolic link inside it and a finished
   dataset of other options or inputs (unless ``overwrite``), and checks every input
   (:func:`multiembed.data.rawlog.scan_source`: a regular file, readable, not empty, complete gzip stream, header;
   data rows counted; size, mtime and a SHA-256 of every byte recorded in the same pass);
2. gets the vocabulary: ``--vocab-from DIR``'s, a hashing vocabulary (nothing to count), or in paper mode a counting
   pass over all inputs (saved as ``vocab.npz``; reused by a resumed run with the same inputs and options);
3. encodes each input in one streaming pass into ``{train,val,test}/part-<input index>.parquet``: chunks parsed by
   pyarrow in a background thread, tokens encoded with numpy in this one, Parquet written by a third; each output
   is renamed into place when complete and the input's manifest (``.convert/part-<index>.json``) written last;
4. writes ``metadata.json`` (the contract of :mod:`multiembed.data.metadata`) atomically.

A re-run with the same options skips every input whose manifest matches (same options, same row counts of all
inputs, same size, mtime and content hash of this input) and says so. Into a finished dataset (``metadata.json``)
a run with other options, or other inputs (neither the same paths nor files of the same content), is refused
unless ``overwrite`` is set; ``overwrite`` only ever replaces a multiembed dataset or conversion. ``metadata.json``
names every file relative to the dataset directory and records the ``split_recipe`` that
:func:`multiembed.data.metadata.split_identity` hashes; a ``--vocab-from`` conversion keeps a copy of the paper-mode
vocabulary, so it can be a ``--vocab-from`` source in turn. Memory in hashing mode is bounded by the chunk size and the Parquet
row groups, whatever the input size; paper mode's counting pass grows with the number of distinct tokens
(:mod:`multiembed.data.vocab`).

Example::

    >>> import tempfile, pathlib
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> row = "1\\t" + "\\t".join(["5"] * 13) + "\\t" + "\\t".join(["68fd1e64"] * 26) + "\\n"
    >>> _ = (tmp / "day_0").write_text(row * 10)
    >>> result = convert(ConvertOptions("criteo-1tb", [str(tmp / "day_0")], str(tmp / "out"), progress=False))
    >>> result.metadata.split_rows(), len(result.metadata.fields)
    ({'train': 8, 'val': 1, 'test': 1}, 26)
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Counter, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import pyarrow as pa

from multiembed.data.formats import HASHING_MODE, MODES, PAPER_MODE, RawFormat, raw_format
from multiembed.data.malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, set_malloc_options
from multiembed.data.locking import LOCK_FILE, exclusive_lock, refuse_if_locked
from multiembed.data.metadata import (
    DENSE_PREFIX,
    LABEL_COLUMN,
    METADATA_FILE,
    SPLITS,
    DatasetError,
    DatasetMetadata,
    FieldSpec,
    SplitFiles,
    atomic_write_text,
    read_metadata,
    write_metadata,
)
from multiembed.data.parquet_io import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE, SplitParquetWriter, arrow_schema
from multiembed.data.rawlog import (
    DEFAULT_CHUNK_BYTES,
    ON_ERROR_CHOICES,
    ChunkParser,
    InputError,
    ParsedChunk,
    SourceScan,
    file_state,
    iter_chunks,
    scan_source,
)
from multiembed.data.splits import (
    SplitAssigner,
    SplitCounts,
    by_file_counts,
    parse_split_weights,
    random_file_counts,
)
from multiembed.data.tokens import MAX_HASH_SIZE, dense_log1p
from multiembed.data.vocab import VOCAB_FILE, CountedVocabulary, HashingVocabulary, VocabularyCounter, field_keys

STATE_DIR = ".convert"
# Version of what assigns rows to splits (parsing rules, exact-count random or by-file assignment): part of every
# split identity, so a change of these rules never passes for the same split.
SPLIT_RULES = "exact-counts-v1"
DEFAULT_SPLIT = "8,1,1"
COMPRESSIONS = ("none", "snappy", "zstd", "lz4", "gzip")
_PART_NAME = re.compile(r"^part-(\d{5,})\.parquet$")
_TEMP_NAME = re.compile(r"^\.part-\d{5,}\.parquet\.tmp-\d+$")

Vocabulary = Union[HashingVocabulary, CountedVocabulary]


class OutputError(OSError):
    """Writing the converted dataset failed (full disk, file-size limit, permissions); names the file."""


@dataclasses.dataclass
class ConvertOptions:
    """Everything ``multiembed convert`` takes (``None`` means the format's default).

    Attributes:
        dataset: ``criteo``, ``criteo-1tb`` or ``avazu``.
        inputs: raw files (``.gz`` accepted), in order.
        out: output dataset directory.
        mode: ``paper`` or ``hashing``; default: the format's (paper for criteo/avazu, hashing for criteo-1tb), or
            the mode ``min_count`` / ``hash_size`` imply.
        min_count: paper mode: tokens seen fewer times share the OOV id (default 10 Criteo, 4 Avazu).
        hash_size: hashing mode: table size of every field (default 40M for criteo-1tb, the DLRM / MLPerf cap).
        hash_sizes: hashing mode: per-field sizes, ``"C1=1000,C3=5000"`` or ``"mlperf"`` (the MLPerf DLRM-DCNv2
            Criteo 1TB table sizes, 40M cap).
        vocab_from: encode with the vocabulary of this earlier conversion.
        split: ``"train,val,test"`` weights (default ``8,1,1``).
        split_by_file: all inputs but the last to train, the last one's halves to val and test.
        seed: split seed.
        on_error: ``fail`` (stop at the first bad row) or ``skip`` (drop, count and report bad rows).
        row_group_size: Parquet rows per row group.
        compression: Parquet codec.
        chunk_bytes: raw bytes parsed at a time.
        hash_seed: seed of the token hash.
        progress: show tqdm progress bars on stderr.
        overwrite: replace a finished dataset in ``out`` made from other inputs or options (refused otherwise);
            only a multiembed dataset directory is ever replaced.
        workers: input files converted at once, each by its own process (:mod:`multiembed.data.convert_workers`);
            1 (the default) converts them one after the other in this process. The output is the same either way.
        threads_per_worker: pyarrow's CPU and IO thread pools per worker (default: all cores / workers; with one
            worker, pyarrow's own default unless given).
    """

    dataset: str
    inputs: Sequence[str]
    out: str
    mode: Optional[str] = None
    min_count: Optional[int] = None
    hash_size: Optional[int] = None
    hash_sizes: Optional[str] = None
    vocab_from: Optional[str] = None
    split: Optional[str] = None
    split_by_file: bool = False
    seed: int = 0
    on_error: str = "fail"
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    compression: str = DEFAULT_COMPRESSION
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    hash_seed: int = 0
    progress: bool = True
    overwrite: bool = False
    workers: int = 1
    threads_per_worker: Optional[int] = None


@dataclasses.dataclass
class ResolvedOptions:
    """Checked options with every default filled in (what metadata.json records under ``options``)."""

    dataset: str
    inputs: List[str]
    out: Path
    mode: str
    min_count: Optional[int]
    hash_sizes: Optional[Dict[str, int]]
    vocab_from: Optional[str]
    split: Optional[str]
    split_by_file: bool
    seed: int
    on_error: str
    row_group_size: int
    compression: str
    chunk_bytes: int
    hash_seed: int
    progress: bool
    overwrite: bool = False
    workers: int = 1  # how, not what: neither is recorded in metadata.json
    threads_per_worker: Optional[int] = None

    def to_json(self, base: Optional[os.PathLike] = None) -> Dict[str, Any]:
        """The options as metadata.json records them; ``vocab_from`` relative to ``base`` (the dataset directory)
        when given, so a moved pair of datasets still names each other."""
        vocab_from = self.vocab_from
        if vocab_from is not None and base is not None:
            vocab_from = os.path.relpath(os.path.abspath(vocab_from), os.path.abspath(base))
        return {
            "dataset": self.dataset, "mode": self.mode, "min_count": self.min_count, "hash_sizes": self.hash_sizes,
            "hash_seed": self.hash_seed, "vocab_from": vocab_from, "split": self.split,
            "split_by_file": self.split_by_file, "seed": self.seed, "on_error": self.on_error,
            "row_group_size": self.row_group_size, "compression": self.compression,
        }


@dataclasses.dataclass
class ConvertResult:
    """What :func:`convert` did.

    Attributes:
        metadata: the metadata written to ``out/metadata.json``.
        out: the dataset directory.
        converted: inputs encoded by this run.
        reused: inputs whose complete outputs from an earlier run were kept.
        vocab_reused: paper mode: the counting pass was skipped because ``vocab.npz`` matched.
        seconds: wall time.
        rows_converted: data rows of the inputs encoded by this run.
    """

    metadata: DatasetMetadata
    out: Path
    converted: List[str]
    reused: List[str]
    vocab_reused: bool
    seconds: float
    rows_converted: int = 0


def _parse_int(text: str, what: str) -> int:
    try:
        value = int(str(text).replace("_", ""))
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an integer") from None
    return value


def _hash_sizes(fmt: RawFormat, base: Optional[int], spec: Optional[str]) -> Dict[str, int]:
    fields = fmt.fields(HASHING_MODE)
    sizes: Dict[str, int] = {}
    if spec is not None and spec.strip().lower() == "mlperf":
        if fmt.cat_columns != raw_format("criteo-1tb").cat_columns:
            raise ValueError(f"--hash-sizes mlperf: the MLPerf table sizes are Criteo's; {fmt.name} has other fields")
        from multiembed.data.presets import preset  # the published table sizes live with the other dataset shapes

        sizes.update(preset("criteo-1tb").vocab_sizes)
    elif spec is not None:
        for item in spec.split(","):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"--hash-sizes: expected FIELD=SIZE items or 'mlperf', got {item!r}")
            if name not in fields:
                raise ValueError(f"--hash-sizes: unknown field {name!r} (fields of {fmt.name}: {', '.join(fields)})")
            sizes[name] = _parse_int(value, f"--hash-sizes {name}")
    missing = [f for f in fields if f not in sizes]
    if missing:
        if base is None:
            raise ValueError(
                f"hashing mode needs a table size: give --hash-size N (or --hash-sizes for {', '.join(missing[:3])}...)"
            )
        sizes.update({f: base for f in missing})
    for name in fields:
        if not 1 <= sizes[name] <= MAX_HASH_SIZE:
            raise ValueError(f"hash size of {name} must be in [1, {MAX_HASH_SIZE}], got {sizes[name]}")
    return {f: sizes[f] for f in fields}


def resolve_options(options: ConvertOptions) -> ResolvedOptions:
    """Checks every option and fills in the format's defaults.

    Raises:
        ValueError: an unknown dataset, mode, split or codec; a non-positive count or size; options that exclude
            each other; no inputs, or one input given twice.
    """
    fmt = raw_format(options.dataset)
    inputs = [str(p) for p in options.inputs]
    if not inputs:
        raise ValueError("no input files given")
    seen: Dict[Tuple[Any, ...], str] = {}
    for path in inputs:
        try:
            st = os.stat(path)
            key: Tuple[Any, ...] = (st.st_dev, st.st_ino)  # one file under two names (hard or symbolic links)
        except OSError:
            key = (os.path.realpath(path),)  # missing or unreadable: reported by the input checks
        if key in seen:
            first = seen[key]
            same = "given twice as an input" if os.path.realpath(first) == os.path.realpath(path) else (
                f"the same file as input {first} (same device and inode: a hard link); its rows would be read twice")
            raise ValueError(f"{path}: {same}")
        seen[key] = path
    if options.on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR_CHOICES)}, got {options.on_error!r}")
    if options.mode is not None and options.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {options.mode!r}")
    if options.compression not in COMPRESSIONS:
        raise ValueError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {options.compression!r}")
    if options.row_group_size < 1:
        raise ValueError(f"--row-group-size must be >= 1, got {options.row_group_size}")
    if options.chunk_bytes < 1:
        raise ValueError(f"chunk size must be >= 1 byte, got {options.chunk_bytes}")
    if options.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {options.seed}")
    if options.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {options.workers}")
    if options.threads_per_worker is not None and options.threads_per_worker < 1:
        raise ValueError(f"--threads-per-worker must be >= 1, got {options.threads_per_worker}")
    if options.split_by_file and options.split is not None:
        raise ValueError("--split and --split-by-file exclude each other")
    split = None if options.split_by_file else (options.split if options.split is not None else DEFAULT_SPLIT)
    if split is not None:
        parse_split_weights(split)
    if options.split_by_file and len(inputs) < 2:
        raise ValueError("--split-by-file needs at least two inputs (training files, then the val/test file)")
    if options.min_count is not None and options.min_count < 1:
        raise ValueError(f"--min-count must be >= 1, got {options.min_count}")
    if options.hash_size is not None and not 1 <= options.hash_size <= MAX_HASH_SIZE:
        raise ValueError(f"--hash-size must be in [1, {MAX_HASH_SIZE}], got {options.hash_size}")

    hashing_given = options.hash_size is not None or options.hash_sizes is not None
    if options.vocab_from is not None:
        given = [name for name, value in (("--mode", options.mode), ("--min-count", options.min_count),
                                          ("--hash-size", options.hash_size), ("--hash-sizes", options.hash_sizes))
                 if value is not None]
        if given:
            raise ValueError(f"--vocab-from takes the vocabulary of {options.vocab_from}: drop {', '.join(given)}")
        mode = ""  # filled in from the source conversion by _load_vocabulary
    elif options.mode is not None:
        mode = options.mode
    elif hashing_given and options.min_count is not None:
        raise ValueError("--min-count (paper mode) and --hash-size/--hash-sizes (hashing mode) exclude each other")
    elif hashing_given:
        mode = HASHING_MODE
    elif options.min_count is not None:
        mode = PAPER_MODE
    else:
        mode = fmt.default_mode
    if mode == PAPER_MODE and hashing_given:
        raise ValueError("--hash-size/--hash-sizes apply to hashing mode, not paper mode")
    if mode == HASHING_MODE and options.min_count is not None:
        raise ValueError("--min-count applies to paper mode, not hashing mode")
    min_count = None
    hash_sizes = None
    if mode == PAPER_MODE:
        min_count = options.min_count if options.min_count is not None else fmt.default_min_count
    elif mode == HASHING_MODE:
        base = options.hash_size if options.hash_size is not None else fmt.default_hash_size
        hash_sizes = _hash_sizes(fmt, base, options.hash_sizes)
    return ResolvedOptions(
        dataset=fmt.name, inputs=inputs, out=Path(options.out), mode=mode, min_count=min_count,
        hash_sizes=hash_sizes, vocab_from=options.vocab_from, split=split, split_by_file=options.split_by_file,
        seed=options.seed, on_error=options.on_error, row_group_size=options.row_group_size,
        compression=options.compression, chunk_bytes=options.chunk_bytes, hash_seed=options.hash_seed,
        progress=options.progress, overwrite=options.overwrite, workers=options.workers,
        threads_per_worker=options.threads_per_worker,
    )


def _load_vocabulary(source_dir: str, fmt: RawFormat) -> Tuple[Vocabulary, Dict[str, Any]]:
    """The vocabulary of an earlier conversion and the options it was made with (``--vocab-from``)."""
    meta = read_metadata(source_dir)
    where = Path(source_dir) / METADATA_FILE
    if meta.dataset != fmt.name:
        raise DatasetError(f"{where}: dataset: {meta.dataset!r}, but this conversion reads {fmt.name!r} logs")
    mode = meta.options.get("mode")
    if mode not in MODES:
        raise DatasetError(f"{where}: options.mode: expected one of {MODES}, got {mode!r}")
    expected_fields = list(fmt.fields(mode))
    if meta.field_names != expected_fields:
        raise DatasetError(f"{where}: fields: {meta.field_names} are not the {fmt.name} {mode}-mode fields")
    seed = meta.options.get("hash_seed", 0)
    if not isinstance(seed, int):
        raise DatasetError(f"{where}: options.hash_seed: expected an integer, got {seed!r}")
    vocab: Vocabulary
    if mode == HASHING_MODE:
        vocab = HashingVocabulary(fmt.name, meta.vocab_sizes, seed)
    else:
        vocab = CountedVocabulary.load(source_dir)
        if vocab.sizes != meta.vocab_sizes:
            raise DatasetError(f"{where}: fields: vocabulary sizes disagree with {Path(source_dir) / VOCAB_FILE}")
    if vocab.fingerprint != meta.vocab_fingerprint:
        raise DatasetError(
            f"{where}: vocab_fingerprint: {meta.vocab_fingerprint[:16]}... recorded, the vocabulary gives "
            f"{vocab.fingerprint[:16]}..."
        )
    return vocab, meta.options


def tune_allocator() -> None:
    """Keeps freed memory in glibc's heap instead of returning it to the kernel after every chunk.

    Encoding allocates and frees numpy temporaries of a few MB per column and chunk; glibc maps each with ``mmap``
    and unmaps it on free, so every new one page-faults again, which measured about 4x the cost of the numpy work
    itself. Raising the mmap and trim thresholds makes the heap reuse those pages; peak memory is unchanged (the
    same temporaries are live at the peak). Process-wide, so only the ``convert`` command calls it; a no-op where
    the C library is not glibc.
    """
    # glibc refuses an mmap threshold above 32 MiB on 64-bit.
    set_malloc_options([(M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30)])


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" rows", unit_scale=True, file=sys.stderr, disable=not enabled,
                mininterval=0.5, smoothing=0.1, dynamic_ncols=True)


_T = TypeVar("_T")
_END = object()


def _background_threads(resolved: ResolvedOptions) -> bool:
    """Whether a conversion reads ahead and writes in threads of their own: not when it is held to one thread
    (``--threads-per-worker 1``), so that it uses one core and N such workers scale over N cores."""
    return resolved.threads_per_worker != 1


def _prefetched(items: Iterable[_T], background: bool = True) -> Iterator[_T]:
    """Yields ``items`` while a background thread already produces the next one (pyarrow and numpy release the
    GIL, so parsing the next chunk overlaps encoding this one); ``background=False``: in this thread, one by one."""
    if not background:
        yield from items
        return
    iterator = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-read") as pool:
        future = pool.submit(next, iterator, _END)
        while True:
            item = future.result()
            if item is _END:
                return
            future = pool.submit(next, iterator, _END)
            yield item  # type: ignore[misc]


def _parsed_chunks(path: str, fmt: RawFormat, on_error: str, chunk_bytes: int) -> Iterator[ParsedChunk]:
    parser = ChunkParser(fmt, path, on_error)
    for chunk in iter_chunks(path, fmt, chunk_bytes):
        yield parser.parse(chunk)


def _count_tokens(
    fmt: RawFormat, resolved: ResolvedOptions, paths: Sequence[str], counter: VocabularyCounter, bar: Any
) -> None:
    """Paper mode's counting pass over the inputs ``paths``, into ``counter``; ``bar.update(lines)`` per chunk.
    The one counting loop: one process, a pool worker (:mod:`~multiembed.data.convert_workers`) and a rank of a
    multi-node job (:mod:`~multiembed.data.convert_nodes`) all count through it."""
    fields = list(fmt.fields(PAPER_MODE))
    for path in paths:
        chunks = _prefetched(_parsed_chunks(path, fmt, resolved.on_error, resolved.chunk_bytes),
                             _background_threads(resolved))
        with contextlib.closing(chunks):
            for parsed in chunks:
                for field in fields:
                    keys = field_keys(fmt, PAPER_MODE, parsed.table.column(field), field, resolved.hash_seed)
                    counter.add(field, keys)
                bar.update(parsed.lines)


def _count_vocabulary(
    fmt: RawFormat, resolved: ResolvedOptions, scans: Sequence[SourceScan]
) -> CountedVocabulary:
    counter = VocabularyCounter(list(fmt.fields(PAPER_MODE)))
    with _progress(sum(s.rows for s in scans), "counting", resolved.progress) as bar:
        _count_tokens(fmt, resolved, [s.path for s in scans], counter, bar)
    assert resolved.min_count is not None
    return counter.finish(fmt.name, resolved.min_count, resolved.hash_seed)


def encode_table(table: pa.Table, fmt: RawFormat, mode: str, vocab: Vocabulary, hash_seed: int) -> Dict[str, np.ndarray]:
    """The output columns of parsed rows: ``label`` int8, one int64 id column per field, ``dense_<name>`` float32.

    Args:
        table: a parsed chunk's table (:class:`multiembed.data.rawlog.ParsedChunk`).
        fmt: its raw format.
        mode: vocabulary mode.
        vocab: the vocabulary.
        hash_seed: seed of the token hash.

    Returns:
        ``{column: array [rows]}`` in schema order.
    """
    columns: Dict[str, np.ndarray] = {
        LABEL_COLUMN: table.column(fmt.label_column).to_numpy().astype(np.int8, copy=False)
    }
    for field in vocab.fields:
        keys = field_keys(fmt, mode, table.column(field), field, hash_seed)
        columns[field] = vocab.encode(field, keys)
    for name in fmt.dense_fields:
        columns[DENSE_PREFIX + name] = dense_log1p(table.column(name))
    return columns


def _part_path(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


class _SplitWriters:
    """The three split outputs of one input, created on first use and written by one background thread (in the
    caller's thread when the conversion is held to one thread)."""

    def __init__(self, out: Path, index: int, schema: pa.Schema, resolved: ResolvedOptions) -> None:
        self._out = out
        self._index = index
        self._schema = schema
        self._resolved = resolved
        self._writers: Dict[str, SplitParquetWriter] = {}
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        if _background_threads(resolved):
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-write")
        self._pending: Optional[concurrent.futures.Future] = None

    def _write_now(self, parts: List[Tuple[str, Dict[str, np.ndarray]]]) -> None:
        for split, columns in parts:
            writer = self._writers.get(split)
            path = self._out / _part_path(split, self._index)
            try:
                if writer is None:
                    writer = self._writers[split] = SplitParquetWriter(
                        path, self._schema, row_group_size=self._resolved.row_group_size,
                        compression=self._resolved.compression,
                    )
                writer.write(columns)
            except OSError as e:
                raise OutputError(f"{path}: cannot write ({e}); is the disk full or a file-size limit set?") from None

    def write(self, parts: List[Tuple[str, Dict[str, np.ndarray]]]) -> None:
        """Queues rows for the split writers; waits for the previous batch first (one batch in flight)."""
        self.wait()
        if self._pool is None:
            self._write_now(parts)
        else:
            self._pending = self._pool.submit(self._write_now, parts)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> Dict[str, int]:
        """Completes every output (renamed into place); returns rows per split written."""
        self.wait()
        rows = {}
        for split, writer in self._writers.items():
            try:
                rows[split] = writer.close()
            except OSError as e:
                raise OutputError(f"{writer.path}: cannot write ({e}); is the disk full or a file-size limit set?") from None
        if self._pool is not None:
            self._pool.shutdown()
        return rows

    def abort(self) -> None:
        try:
            self.wait()
        except Exception:  # the conversion is failing already; the first error is the one reported
            pass
        for writer in self._writers.values():
            writer.abort()
        if self._pool is not None:
            self._pool.shutdown()


def _convert_input(
    index: int,
    scan: SourceScan,
    counts: SplitCounts,
    fmt: RawFormat,
    resolved: ResolvedOptions,
    vocab: Vocabulary,
    schema: pa.Schema,
    bar,
) -> Dict[str, Any]:
    """Encodes one input into its split outputs; returns its manifest (files, rows, skipped rows)."""
    assigner = SplitAssigner(counts, resolved.seed, index, ordered=resolved.split_by_file)
    writers = _SplitWriters(resolved.out, index, schema, resolved)
    skipped: Counter[str] = collections.Counter()
    examples: List[str] = []
    lines = 0
    chunks = _prefetched(_parsed_chunks(scan.path, fmt, resolved.on_error, resolved.chunk_bytes),
                         _background_threads(resolved))
    try:
        for parsed in chunks:
            columns = encode_table(parsed.table, fmt, resolved.mode, vocab, resolved.hash_seed)
            assignment = assigner.take(parsed.lines)
            if parsed.rows is not None:
                assignment = assignment[parsed.rows - parsed.first_row]
            parts = []
            for split_id, split in enumerate(SPLITS):
                chosen = np.flatnonzero(assignment == split_id)
                if chosen.size == len(assignment):
                    parts.append((split, columns))
                elif chosen.size:
                    parts.append((split, {name: values[chosen] for name, values in columns.items()}))
            writers.write(parts)
            skipped.update(parsed.skipped)
            examples.extend(parsed.examples[: max(0, 20 - len(examples))])
            lines += parsed.lines
            bar.update(parsed.lines)
        if lines != scan.rows or file_state(scan.path) != (scan.bytes, scan.mtime_ns):
            raise InputError(
                f"{scan.path}: {lines} data rows read, {scan.rows} counted before, size or modification time "
                "changed: the file changed while it was being converted"
            )
        rows = writers.close()
    except BaseException:
        chunks.close()  # stops the reading thread before the outputs are dropped
        writers.abort()
        raise
    return {
        "index": index,
        "source": scan.to_json(base=resolved.out),
        "files": {split: {"path": _part_path(split, index), "rows": rows[split]} for split in SPLITS if split in rows},
        "skipped": dict(skipped),
        "skipped_examples": examples,
        "rows_read": lines,
    }


_OWN_ENTRIES = frozenset({METADATA_FILE, STATE_DIR, VOCAB_FILE, LOCK_FILE, *SPLITS})


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """``out`` is new, empty, a conversion in progress (``.convert/``), or with ``overwrite`` a multiembed dataset
    (``metadata.json``) holding nothing a producer does not write; anything else is refused untouched."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()} - {LOCK_FILE}
    unexpected = sorted(entries - _OWN_ENTRIES)
    if entries and STATE_DIR not in entries:
        if overwrite and METADATA_FILE in entries and not unexpected:
            return  # a dataset another producer (synth) made: --overwrite may replace it
        if METADATA_FILE in entries and not unexpected:
            raise OutputError(
                f"{out}: holds a dataset that convert did not make here (no {STATE_DIR}/); give --overwrite to "
                "replace it, or choose another --out"
            )
        raise OutputError(
            f"{out}: not empty and not a conversion in progress (no {STATE_DIR}/) nor a multiembed dataset; choose "
            "an empty or new directory"
        )
    if unexpected:
        raise OutputError(f"{out}: holds files a conversion does not write ({', '.join(unexpected[:3])})")


def _check_no_links(out: Path) -> None:
    """Refuses a symbolic link anywhere convert writes or deletes inside ``out`` (``out`` itself may be one)."""
    candidates = [out / name for name in sorted(_OWN_ENTRIES)]
    for folder in (out / STATE_DIR, *(out / split for split in SPLITS)):
        if folder.is_dir() and not folder.is_symlink():
            candidates.extend(sorted(folder.iterdir()))
    for path in candidates:
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise OutputError(
                f"{path}: is a symbolic link (to {target}) inside the output directory; convert never writes or "
                "deletes through a link there: remove the link or choose another --out"
            )


def _clear_outputs(out: Path) -> None:
    """``--overwrite``: deletes what a producer wrote in ``out`` (metadata first, so it never looks complete)."""
    (out / METADATA_FILE).unlink(missing_ok=True)
    (out / VOCAB_FILE).unlink(missing_ok=True)
    _remove_outputs(out, keep=())  # every part file and manifest (a synth dataset's part files included)


def _read_finished(out: Path, overwrite: bool) -> Optional[DatasetMetadata]:
    """The metadata of a finished dataset in ``out`` (None when there is none)."""
    if not (out / METADATA_FILE).exists():
        return None
    try:
        return read_metadata(out)
    except DatasetError as e:
        if overwrite:
            return None
        raise OutputError(f"{e}; give --overwrite to replace this dataset, or choose another --out") from None


# The options that, when they differ, make another dataset (progress, chunk size: how, not what).
_COMPARED_OPTIONS = ("dataset", "mode", "min_count", "hash_sizes", "hash_seed", "split", "split_by_file", "seed",
                     "on_error", "row_group_size", "compression")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _option_differences(meta: DatasetMetadata, resolved: ResolvedOptions, vocab_fingerprint: Optional[str]) -> List[str]:
    """What differs between a finished dataset's recorded options and this run's (empty: the same)."""
    recorded = meta.options
    current = json.loads(json.dumps(resolved.to_json()))
    differences = [f"{key} {_short(recorded.get(key))} -> {_short(current.get(key))}"
                   for key in _COMPARED_OPTIONS if recorded.get(key) != current.get(key)]
    if (recorded.get("vocab_from") is None) != (resolved.vocab_from is None):
        differences.append("--vocab-from " + ("given" if resolved.vocab_from is not None else "not given"))
    elif vocab_fingerprint is not None and vocab_fingerprint != meta.vocab_fingerprint:
        differences.append(
            f"--vocab-from vocabulary {meta.vocab_fingerprint[:12]}... -> {vocab_fingerprint[:12]}..."
        )
    return differences


def _input_difference(meta: DatasetMetadata, out: Path, scans: Sequence[SourceScan]) -> Optional[str]:
    """How a finished dataset's inputs differ from this run's, or None when they are the same files (the same
    paths, whose changed content a resume re-converts, or files of the same content elsewhere)."""
    recorded = meta.sources
    if len(recorded) != len(scans):
        return f"{len(recorded)} input(s) converted there, {len(scans)} given"
    for i, (entry, scan) in enumerate(zip(recorded, scans)):
        path = os.path.normpath(os.path.join(os.path.abspath(out), str(entry.get("path"))))
        if path == os.path.abspath(scan.path):
            continue
        try:
            if os.path.samefile(path, scan.path):
                continue
        except OSError:
            pass
        if entry.get("sha256") == scan.sha256 and entry.get("bytes") == scan.bytes:
            continue
        return f"input {i + 1}: {path} was converted, {scan.path} given"
    return None


def _read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest_is_complete(out: Path, manifest: Optional[Dict[str, Any]], part_key: str) -> bool:
    if not manifest or manifest.get("part_key") != part_key:
        return False
    try:
        return all((out / entry["path"]).is_file() for entry in manifest["files"].values())
    except (KeyError, TypeError, AttributeError):
        return False


def _remove_outputs(out: Path, keep: Iterable[int]) -> None:
    """Deletes stale outputs: temporary files of killed runs and part files of any input index not in ``keep``."""
    keep = set(keep)
    for split in SPLITS:
        folder = out / split
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _PART_NAME.match(path.name)
            if _TEMP_NAME.match(path.name) or (match and int(match.group(1)) not in keep):
                path.unlink()
    for path in (out / STATE_DIR).glob("part-*.json"):
        match = re.match(r"^part-(\d+)\.json$", path.name)
        if match and int(match.group(1)) not in keep:
            path.unlink()


def split_recipe(fmt: RawFormat, resolved: ResolvedOptions, scans: Sequence[SourceScan]) -> Dict[str, Any]:
    """What decides which row lands in which split (metadata.json's ``split_recipe``, hashed by
    :func:`multiembed.data.metadata.split_identity`): the parsing and assignment rules, every input's content
    hash and rows in order, the split weights or ``--split-by-file``, the seed and ``--on-error``. Not the
    vocabulary or the Parquet layout."""
    return {
        "producer": "convert",
        "rules": SPLIT_RULES,
        "dataset": fmt.name,
        "split": resolved.split,
        "split_by_file": resolved.split_by_file,
        "seed": resolved.seed,
        "on_error": resolved.on_error,
        "inputs": [{"sha256": scan.sha256, "rows": scan.rows} for scan in scans],
    }


def _build_metadata(
    fmt: RawFormat, resolved: ResolvedOptions, vocab: Vocabulary, manifests: Sequence[Dict[str, Any]],
    scans: Sequence[SourceScan],
) -> DatasetMetadata:
    splits: Dict[str, SplitFiles] = {}
    for split in SPLITS:
        files, rows = [], []
        for manifest in manifests:
            entry = manifest["files"].get(split)
            if entry:
                files.append(entry["path"])
                rows.append(int(entry["rows"]))
        splits[split] = SplitFiles(files=files, file_rows=rows)
    skipped: Counter[str] = collections.Counter()
    examples: List[str] = []
    for manifest in manifests:
        skipped.update(manifest["skipped"])
        examples.extend(manifest["skipped_examples"][: max(0, 20 - len(examples))])
    options = resolved.to_json(base=resolved.out)
    options.update(vocab.describe())
    if resolved.vocab_from is not None:
        options["mode"] = vocab.mode
    sizes = vocab.sizes
    extra: Dict[str, Any] = {"skipped_examples": examples}
    if isinstance(vocab, CountedVocabulary):
        extra["vocab_file"] = VOCAB_FILE
        if vocab.distinct and resolved.vocab_from is None:
            # Paper mode's counting memory is about 16 bytes per distinct (field, token): recorded for sizing.
            extra["distinct_tokens"] = vocab.distinct
    return DatasetMetadata(
        dataset=fmt.name,
        fields=[FieldSpec(name, sizes[name]) for name in vocab.fields],
        dense_fields=list(fmt.dense_fields),
        splits=splits,
        vocab_fingerprint=vocab.fingerprint,
        skipped={k: int(v) for k, v in sorted(skipped.items())},
        rows_read=sum(int(m["rows_read"]) for m in manifests),
        sources=[m["source"] for m in manifests],
        options=options,
        split_recipe=split_recipe(fmt, resolved, scans),
        extra=extra,
    )


def convert(options: ConvertOptions, nodes: Optional["Coordinator"] = None) -> ConvertResult:
    """Converts raw logs into a dataset directory (see the module docstring).

    Args:
        options: what to convert, and how.
        nodes: the ranks of a job converting the inputs together
            (:class:`multiembed.data.convert_nodes.NodeGroup`); None: this process alone.

    Raises:
        ValueError: bad options.
        InputError: an input is missing, unreadable or malformed (``file:line: field: what``); under
            ``on_error="skip"`` bad rows are counted instead and only file-level problems raise.
        DatasetError: ``vocab_from`` is not a usable conversion.
        OutputError: the output cannot be written.
    """
    started = time.perf_counter()
    resolved = resolve_options(options)
    if nodes is not None and resolved.workers > 1:
        raise ValueError("--workers: each rank of a multi-node conversion converts one input at a time; run more "
                         "ranks per node (-j NODESxRANKS) instead")
    fmt = raw_format(resolved.dataset)
    source_vocab: Optional[Vocabulary] = None
    if resolved.vocab_from is not None:
        source_vocab, _ = _load_vocabulary(resolved.vocab_from, fmt)
        resolved.mode = source_vocab.mode
        if isinstance(source_vocab, HashingVocabulary):
            resolved.hash_sizes = source_vocab.sizes
        else:
            resolved.min_count = source_vocab.min_count
        resolved.hash_seed = source_vocab.seed
    out = resolved.out
    if nodes is None:  # (a multi-node job's ranks share one lock, which its first rank takes: main_lock)
        refuse_if_locked(out, "conversion")  # a running conversion's temporary files are its own, named as such
    _check_out_dir(out, resolved.overwrite)  # before the lock file is created: a refused directory stays untouched
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    with contextlib.ExitStack() as stack:
        if nodes is None:
            stack.enter_context(exclusive_lock(out, "conversion"))  # one per job: a pool's workers write under it
        else:
            stack.enter_context(nodes.bind(resolved, fmt).main_lock(out))  # type: ignore[attr-defined]
        if resolved.workers > 1 and len(resolved.inputs) > 1:
            from multiembed.data.convert_workers import ConvertPool

            with ConvertPool(resolved, fmt) as pool:
                return _convert_locked(resolved, fmt, source_vocab, started, pool)
        if resolved.threads_per_worker is not None:
            cpu_count, io_count = pa.cpu_count(), pa.io_thread_count()
            pa.set_cpu_count(resolved.threads_per_worker)
            pa.set_io_thread_count(resolved.threads_per_worker)
            stack.callback(pa.set_io_thread_count, io_count)
            stack.callback(pa.set_cpu_count, cpu_count)
        return _convert_locked(resolved, fmt, source_vocab, started, pool=nodes, nodes=nodes)
    raise AssertionError("unreachable")  # for type checkers: the with block always returns or raises


class Coordinator:
    """Who decides and who writes the shared files of a conversion: here one process does everything.

    :class:`multiembed.data.convert_nodes.NodeGroup` is the multi-node form: rank 0 decides (checks, clearing,
    the vocabulary, ``metadata.json``) and broadcasts the outcome, every rank converts its share of the inputs.
    """

    is_main = True

    def decide(self, decision: Callable[[], _T]) -> _T:
        """``decision()`` run by the main process, its value (or its exception) shared with every process."""
        return decision()

    def mine(self, indices: Sequence[int]) -> List[int]:
        """The input indices this process converts."""
        return list(indices)

    def gather(self, work: Callable[[], List[_T]]) -> List[_T]:
        """``work()`` run by every process, the lists concatenated (here: this process's); a failure on any
        process is raised on all."""
        return work()


def _convert_locked(
    resolved: ResolvedOptions, fmt: RawFormat, source_vocab: Optional[Vocabulary], started: float, pool: Any = None,
    nodes: Optional[Coordinator] = None,
) -> ConvertResult:
    """The conversion under the lock; ``pool`` (a :class:`multiembed.data.convert_workers.ConvertPool`, or the
    :class:`~multiembed.data.convert_nodes.NodeGroup` also given as ``nodes``) runs the scan, counting and encoding
    passes over several inputs at once, None runs them here one input after another. ``nodes`` decides for a job of
    several processes (default: this one)."""
    out = resolved.out
    nodes = nodes or Coordinator()

    def check_outputs() -> Optional[DatasetMetadata]:
        _check_out_dir(out, resolved.overwrite)
        _check_no_links(out)
        finished = _read_finished(out, resolved.overwrite)
        if finished is not None and not resolved.overwrite:
            differences = _option_differences(finished, resolved, source_vocab.fingerprint if source_vocab else None)
            if differences:
                raise OutputError(
                    f"{out}: holds a finished dataset converted with other options ({'; '.join(differences)}); give "
                    "--overwrite to replace it, or choose another --out"
                )
        return finished

    finished = nodes.decide(check_outputs)
    if pool is not None:
        scans = pool.scan(resolved.inputs)
    else:
        scans = [scan_source(path, fmt) for path in resolved.inputs]

    def prepare_outputs() -> None:
        if finished is not None and not resolved.overwrite:
            difference = _input_difference(finished, out, scans)
            if difference is not None:
                raise OutputError(
                    f"{out}: holds a finished dataset converted from other inputs ({difference}); give --overwrite to "
                    "replace it, or choose another --out"
                )
        try:
            if resolved.overwrite:
                _clear_outputs(out)
            (out / STATE_DIR).mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot prepare the output directory ({e.strerror or e})") from None

    nodes.decide(prepare_outputs)
    file_rows = [scan.rows for scan in scans]
    if resolved.split_by_file:
        counts = by_file_counts(file_rows)
    else:
        assert resolved.split is not None
        counts = random_file_counts(file_rows, parse_split_weights(resolved.split), resolved.seed)

    vocab_reused = False
    vocab: Vocabulary
    if source_vocab is not None:
        vocab = source_vocab
        if isinstance(vocab, CountedVocabulary):
            counted = vocab

            def copy_vocabulary() -> None:
                # The dataset keeps its own copy of the vocabulary: it can be a --vocab-from source in turn.
                saved = CountedVocabulary.saved_extra(out)
                if saved is None or saved.get("copied_from") != counted.fingerprint:
                    try:
                        counted.save(out, extra={"copied_from": counted.fingerprint})
                    except OSError as e:
                        raise OutputError(f"{out / VOCAB_FILE}: cannot write ({e})") from None

            nodes.decide(copy_vocabulary)
    elif resolved.mode == HASHING_MODE:
        assert resolved.hash_sizes is not None
        vocab = HashingVocabulary(fmt.name, resolved.hash_sizes, resolved.hash_seed)
    else:
        vocab_key = _digest({"dataset": fmt.name, "min_count": resolved.min_count, "hash_seed": resolved.hash_seed,
                             "on_error": resolved.on_error, "sources": [s.to_json() for s in scans]})

        def saved_vocabulary_matches() -> bool:
            saved = CountedVocabulary.saved_extra(out)
            return saved is not None and saved.get("vocab_key") == vocab_key

        vocab_reused = nodes.decide(saved_vocabulary_matches)
        if not vocab_reused:
            # A NodeGroup returns the merged vocabulary on its main rank only; the others load what it saved.
            counted_here = pool.count_vocabulary(scans) if pool is not None else _count_vocabulary(fmt, resolved, scans)

            def save_vocabulary() -> str:
                assert counted_here is not None
                try:
                    counted_here.save(out, extra={"vocab_key": vocab_key})
                except OSError as e:
                    raise OutputError(f"{out / VOCAB_FILE}: cannot write ({e})") from None
                return counted_here.fingerprint

            fingerprint = nodes.decide(save_vocabulary)
            vocab = counted_here if counted_here is not None else CountedVocabulary.load(out)
            if vocab.fingerprint != fingerprint:
                raise DatasetError(f"{out / VOCAB_FILE}: changed while the conversion read it (fingerprint differs)")
        else:
            vocab = CountedVocabulary.load(out)

    options_key = resolved.to_json()
    options_key["vocab_from"] = None  # the vocabulary's fingerprint below says what --vocab-from gave
    run_key = _digest({"options": options_key, "vocab": vocab.fingerprint,
                       "rows": [[os.path.abspath(s.path), s.rows] for s in scans]})
    state = out / STATE_DIR
    part_keys = [_digest({"run": run_key, "index": i, "source": s.to_json()}) for i, s in enumerate(scans)]

    def complete_parts() -> List[Optional[Dict[str, Any]]]:
        found: List[Optional[Dict[str, Any]]] = []
        for i in range(len(scans)):
            manifest = _read_manifest(state / f"part-{i:05d}.json")
            found.append(manifest if _manifest_is_complete(out, manifest, part_keys[i]) else None)
        if any(m is None for m in found):
            # The dataset is about to change: it must not look complete until metadata.json is rewritten.
            (out / METADATA_FILE).unlink(missing_ok=True)
        _remove_outputs(out, keep=[i for i, m in enumerate(found) if m is not None])
        return found

    manifests = nodes.decide(complete_parts)
    todo = [i for i, m in enumerate(manifests) if m is None]
    mine = nodes.mine(todo)

    schema = arrow_schema([FieldSpec(name, 1) for name in vocab.fields], fmt.dense_fields)

    def convert_mine() -> List[Tuple[int, Dict[str, Any]]]:
        written: List[Tuple[int, Dict[str, Any]]] = []
        progress = resolved.progress and bool(mine) and nodes.is_main
        with _progress(sum(scans[i].rows for i in mine), "converting", progress) as bar:
            if pool is not None:
                # Each worker encodes whole inputs; their manifests are written here as they complete.
                converted: Iterable[Tuple[int, Dict[str, Any]]] = pool.convert_inputs(
                    mine, scans, counts, vocab, schema, bar)
            else:
                converted = ((i, _convert_input(i, scans[i], counts[i], fmt, resolved, vocab, schema, bar))
                             for i in mine)
            for i, manifest in converted:
                manifest["part_key"] = part_keys[i]
                try:
                    atomic_write_text(state / f"part-{i:05d}.json", json.dumps(manifest, indent=1) + "\n")
                except OSError as e:
                    raise OutputError(f"{state / f'part-{i:05d}.json'}: cannot write ({e})") from None
                written.append((i, manifest))
        return written

    for i, manifest in nodes.gather(convert_mine):
        manifests[i] = manifest

    def write_dataset_metadata() -> DatasetMetadata:
        metadata = _build_metadata(fmt, resolved, vocab, [m for m in manifests if m is not None], scans)
        try:
            write_metadata(out, metadata)
        except OSError as e:
            raise OutputError(f"{out / METADATA_FILE}: cannot write ({e})") from None
        return metadata

    metadata = nodes.decide(write_dataset_metadata)
    return ConvertResult(
        metadata=metadata,
        out=out,
        converted=[scans[i].path for i in todo],
        reused=[scans[i].path for i in range(len(scans)) if i not in todo],
        vocab_reused=vocab_reused,
        seconds=time.perf_counter() - started,
        rows_converted=sum(scans[i].rows for i in todo),
    )


def summary_lines(result: ConvertResult) -> List[str]:
    """The human summary ``multiembed convert`` prints: splits, skipped rows by reason, vocabulary, reuse."""
    meta = result.metadata
    rows = meta.split_rows()
    lines = []
    for path in result.reused:
        lines.append(f"{path}: already converted (complete outputs kept), skipped")
    if result.vocab_reused:
        lines.append(f"{result.out / VOCAB_FILE}: vocabulary of an earlier run with the same inputs reused")
    rate = result.rows_converted / max(result.seconds, 1e-9)
    lines.append(
        f"{meta.dataset} -> {result.out}: {len(result.converted)} input(s) converted, {len(result.reused)} reused, "
        f"{result.seconds:.1f} s ({rate:,.0f} rows/s)"
    )
    lines.append(
        f"rows: train {rows['train']:,}, val {rows['val']:,}, test {rows['test']:,} (read {meta.rows_read:,}, "
        f"skipped {sum(meta.skipped.values()):,})"
    )
    if meta.skipped:
        lines.append("skipped rows by reason: " + ", ".join(f"{k} {v:,}" for k, v in meta.skipped.items()))
        for example in meta.extra.get("skipped_examples", [])[:5]:
            lines.append(f"  e.g. {example}")
    total = sum(f.vocab_size for f in meta.fields)
    lines.append(
        f"vocabulary: {meta.options.get('mode')} mode, {len(meta.fields)} fields, {total:,} ids, "
        f"fingerprint {meta.vocab_fingerprint[:16]}"
    )
    return lines
