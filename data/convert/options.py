"""The options of a conversion: what ``multiembed convert`` takes (:class:`ConvertOptions`) and the checked form with
every default filled in (:class:`ResolvedOptions`, what ``metadata.json`` records), from :func:`resolve_options`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from multiembed.data.formats import HASHING_MODE, MANAGED_MODE, MODES, PAPER_MODE, RawFormat, raw_format
from multiembed.data.parquet_io import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE
from multiembed.data.rawlog import DEFAULT_CHUNK_BYTES, ON_ERROR_CHOICES
from multiembed.data.splits import parse_split_weights
from multiembed.data.tokens import MAX_HASH_SIZE

DEFAULT_SPLIT = "8,1,1"
COMPRESSIONS = ("none", "snappy", "zstd", "lz4", "gzip")


@dataclasses.dataclass
class ConvertOptions:
    """Everything ``multiembed convert`` takes (``None`` means the format's default).

    Attributes:
        dataset: ``criteo``, ``criteo-1tb`` or ``avazu``.
        inputs: raw files (``.gz`` accepted), in order.
        out: output dataset directory.
        mode: ``paper``, ``hashing`` or ``managed`` (tokens kept as 63-bit keys for a managed-collision run);
            default: the format's (paper for criteo/avazu, hashing for criteo-1tb), or the mode ``min_count`` /
            ``hash_size`` imply.
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
        workers: input files converted at once, each by its own process (:mod:`multiembed.data.convert.workers`);
            1 (the default) converts them one after the other in this process. The output is the same either way.
        threads_per_worker: pyarrow's CPU and IO thread pools per worker (default: all cores / workers; with one
            worker, pyarrow's own default unless given).
        first_day: the dataset is day 0 of a day sequence of this name (hashing or managed mode;
            :mod:`multiembed.data.days`).
        follows: the dataset is the day after this day dataset (same sequence, schema and hash space).
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
    first_day: Optional[str] = None
    follows: Optional[str] = None


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
    day: Optional[Tuple[str, int]] = None  # (sequence, index): recorded as the dataset's day (data/days.py)

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
        mode = ""  # filled in from the source conversion by count.load_vocabulary
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
    if mode == MANAGED_MODE and (hashing_given or options.min_count is not None):
        raise ValueError("--vocab managed keeps every token's 64-bit hash: drop --min-count / --hash-size / "
                         "--hash-sizes (the training run's --table-rows sizes the tables)")
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
