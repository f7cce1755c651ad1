"""Writing a synthetic dataset: exact split sizes, rows drawn in seeded chunks, Parquet (and optionally a raw Criteo
TSV), and the Bayes-optimal metrics of every split in ``metadata.json``."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from multiembed.data.days import DAY_KEY, day_record
from multiembed.data.metadata import (
    DENSE_PREFIX,
    LABEL_COLUMN,
    METADATA_FILE,
    SPLITS,
    TRUE_PROB_COLUMN,
    DatasetError,
    DatasetMetadata,
    FieldSpec,
    SplitFiles,
    free_bytes,
    write_metadata,
)
from multiembed.data.metrics import log_loss, roc_auc
from multiembed.data.presets import CRITEO_CAT_FIELDS, CRITEO_INT_FIELDS
from multiembed.data.synthetic.model import (
    CHUNK_ROWS,
    FIELD_NAMES,
    NUM_INT_FIELDS,
    ROWS_PER_FILE,
    SyntheticClickModel,
    SyntheticConfig,
    SyntheticRows,
    synthetic_vocab_sizes,
)
from multiembed.data.synthetic.encoding import IdEncoding
from multiembed.data.synthetic.regime import AnyConfig, AnyModel, CollapseRegimeConfig, click_model
from multiembed.runtime.locking import exclusive_lock

# Marks the row streams of a day of a drifting log (followed by the day's index).
_DAY_STREAM = 1000


def split_counts(rows: int, weights: Sequence[float]) -> Dict[str, int]:
    """Exact split sizes: boundaries ``floor(rows * cumsum(weights) / sum(weights))``."""
    if len(weights) != len(SPLITS) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split must be {len(SPLITS)} non-negative weights with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    bounds = [0]
    acc = 0.0
    for w in weights[:-1]:
        acc += w
        bounds.append(int(math.floor(rows * acc / total + 1e-9)))
    bounds.append(rows)
    return {name: bounds[i + 1] - bounds[i] for i, name in enumerate(SPLITS)}


def _parquet_columns(
    rows: SyntheticRows, field_names: Sequence[str] = FIELD_NAMES, dense_fields: Sequence[str] = CRITEO_INT_FIELDS
) -> Dict[str, np.ndarray]:
    columns: Dict[str, np.ndarray] = {LABEL_COLUMN: rows.labels}
    columns.update({name: rows.ids[:, f] for f, name in enumerate(field_names)})
    columns.update({f"{DENSE_PREFIX}{name}": rows.dense[:, i] for i, name in enumerate(dense_fields)})
    columns[TRUE_PROB_COLUMN] = rows.true_prob
    return columns


class _TsvWriter:
    """Writes rows as raw Criteo TSV (label, 13 integers, 26 tokens; no header), ``.gz`` when the name ends so.

    pyarrow's CSV writer formats whole columns in C++, so writing millions of rows needs no per-row Python.
    """

    def __init__(self, path: Path, model: SyntheticClickModel) -> None:
        import pyarrow as pa
        import pyarrow.csv as pa_csv

        self.path = path
        self.tmp_path = path.with_name(f".{path.name}.tmp")
        self._token_arrays = [pa.array(model.categorical_tokens(name), pa.string()) for name in CRITEO_CAT_FIELDS]
        self._stream = pa.OSFile(str(self.tmp_path), "wb")
        self._sink = pa.CompressedOutputStream(self._stream, "gzip") if path.suffix == ".gz" else self._stream
        names = [LABEL_COLUMN] + list(FIELD_NAMES)
        self._schema = pa.schema(
            [pa.field(LABEL_COLUMN, pa.int8())]
            + [pa.field(n, pa.int64()) for n in CRITEO_INT_FIELDS]
            + [pa.field(n, pa.string()) for n in CRITEO_CAT_FIELDS]
        )
        assert self._schema.names == names
        options = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
        self._writer = pa_csv.CSVWriter(self._sink, self._schema, write_options=options)

    def write(self, rows: SyntheticRows) -> None:
        import pyarrow as pa

        columns = [pa.array(rows.labels)]
        columns += [pa.array(rows.raw_ints[:, i], mask=rows.raw_missing[:, i]) for i in range(NUM_INT_FIELDS)]
        columns += [
            tokens.take(pa.array(rows.ids[:, NUM_INT_FIELDS + c])) for c, tokens in enumerate(self._token_arrays)
        ]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema))

    def close(self) -> None:
        self._writer.close()
        if self._sink is not self._stream:
            self._sink.close()
        else:
            self._stream.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # noqa: BLE001 - cleaning up after an earlier error, which is what gets raised
            pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass


def _chunk_rng(
    seed: int, split_index: int, chunk_index: int, day: Optional[Tuple[str, int]] = None
) -> np.random.Generator:
    entropy = [seed, 1 + split_index, chunk_index] + ([_DAY_STREAM, day[1]] if day is not None else [])
    return np.random.default_rng(np.random.SeedSequence(entropy))


# A lower bound on the bytes a row takes on disk (Parquet, compressed: measured above 100 on small datasets), and the
# bytes the click model holds per id (its Zipf CDF, rank-to-id map, first-order weight and rank-r factors, float64 /
# int64, plus the temporaries of drawing them).
MIN_DISK_BYTES_PER_ROW = 16
MODEL_BYTES_PER_ID_BESIDES_RANK = 6 * 8


def check_fits(out: Path, rows: int, config: AnyConfig, days: int = 1) -> None:
    """Refuses, before anything is drawn or written, a dataset whose click model cannot fit in this machine's
    available memory or whose rows cannot fit on the disk of ``out``.

    Raises:
        ValueError: one line with both numbers.
    """
    if isinstance(config, SyntheticConfig):
        ids = sum(synthetic_vocab_sizes(config.scale, config.min_vocab).values())
        needed = ids * (MODEL_BYTES_PER_ID_BESIDES_RANK + 8 * config.rank)
        available = _available_memory()
        if available is not None and needed > available:
            raise ValueError(
                f"--scale {config.scale:g}: the click model of {ids:,} ids needs about {needed / 2**30:,.1f} GiB of "
                f"memory; {available / 2**30:,.1f} GiB is available (MemAvailable); use a smaller --scale"
            )
    free = free_bytes(out)
    at_least = rows * days * MIN_DISK_BYTES_PER_ROW
    if free is not None and at_least > free:
        raise ValueError(
            f"--rows {rows:,}: {rows * days:,} rows need at least {at_least / 2**30:,.1f} GiB on disk; {out} has "
            f"{free / 2**30:,.1f} GiB free"
        )


def _available_memory() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def generate_dataset(
    out_dir: os.PathLike,
    rows: int,
    config: AnyConfig = SyntheticConfig(),
    split: Sequence[float] = (8, 1, 1),
    tsv_path: Optional[os.PathLike] = None,
    force: bool = False,
    progress: bool = True,
    model: Optional[AnyModel] = None,
    day: Optional[Tuple[str, int]] = None,
    encoding: Optional[IdEncoding] = None,
) -> DatasetMetadata:
    """Generates a synthetic dataset directory (Parquet + ``metadata.json``, the layout of :mod:`.metadata`).

    Args:
        out_dir: output directory (created).
        rows: total rows over all splits.
        config: the click model's parameters: :class:`SyntheticConfig` (the default generator) or
            :class:`CollapseRegimeConfig` (``--regime collapse``).
        split: train, val, test weights.
        tsv_path: also write every row (train, then val, then test) as raw Criteo TSV here (default generator
            only).
        force: replace an existing dataset in ``out_dir``.
        progress: show a tqdm bar on stderr.
        model: the click model to draw from (default: ``click_model(config)``; a day of a drifting log passes
            its :class:`~multiembed.data.synthetic.days.DriftingClickModel`).
        day: ``(sequence, index)``: the dataset is day ``index`` of the log ``sequence``; its rows come from their
            own streams and its metadata records its place (:mod:`multiembed.data.days`).
        encoding: write the ids as a hashing- or managed-mode conversion would
            (:mod:`multiembed.data.synthetic.encoding`); None: the native ids.

    Returns:
        The metadata written, with the Bayes-optimal AUC and log loss of every split in ``bayes``.

    Raises:
        DatasetError: ``out_dir`` already holds a dataset and ``force`` is False.
        LockHeldError: another job (``synth``, ``convert``) is writing ``out_dir`` (:mod:`.locking`).
        ValueError: bad ``rows`` or ``split``, or ``tsv_path`` with the collapse regime.
    """
    from tqdm import tqdm

    from multiembed.data.parquet_io import SplitParquetWriter, arrow_schema

    if rows < 1:
        raise ValueError(f"--rows must be >= 1, got {rows}")
    counts = split_counts(rows, split)
    if tsv_path is not None and isinstance(config, CollapseRegimeConfig):
        raise ValueError("--tsv: the collapse regime has no raw Criteo form (its fields are not Criteo's)")
    if tsv_path is not None and encoding is not None:
        raise ValueError("--tsv and --vocab exclude each other: convert the TSV with the vocabulary mode instead")
    out = Path(out_dir)
    if (out / METADATA_FILE).exists() and not force:
        raise DatasetError(f"{out / METADATA_FILE}: a dataset already exists here (use --force to replace it)")
    if model is None:
        check_fits(out, rows, config)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "synth"):
        if (out / METADATA_FILE).exists() and not force:  # finished by a job that ran in between
            raise DatasetError(f"{out / METADATA_FILE}: a dataset already exists here (use --force to replace it)")
        if (out / METADATA_FILE).exists():
            # Removed first, so a run interrupted while replacing leaves no metadata pointing at half-new files.
            (out / METADATA_FILE).unlink()

        if model is None:
            model = click_model(config)
        fields = [
            FieldSpec(name=name, vocab_size=model.vocab_sizes[name] if encoding is None else
                      encoding.field_size(model.vocab_sizes[name]))
            for name in model.field_names
        ]
        schema = arrow_schema(fields, model.dense_fields, with_true_prob=True)
        writer = None
        tsv = _TsvWriter(Path(tsv_path), model) if tsv_path is not None else None  # type: ignore[arg-type]
        splits: Dict[str, SplitFiles] = {}
        bayes: Dict[str, Dict[str, float]] = {}
        bar = tqdm(total=rows, unit="rows", unit_scale=True, desc="synth", file=sys.stderr, disable=not progress)
        try:
            for split_index, name in enumerate(SPLITS):
                split_dir = out / name
                split_dir.mkdir(exist_ok=True)
                for stale in split_dir.glob("*.parquet"):
                    stale.unlink()
                files: List[str] = []
                file_rows: List[int] = []
                labels: List[np.ndarray] = []
                probs: List[np.ndarray] = []
                writer = None
                remaining = counts[name]
                chunk_index = 0
                while remaining > 0:
                    n = min(CHUNK_ROWS, remaining)
                    chunk = model.sample(_chunk_rng(config.seed, split_index, chunk_index, day), n)
                    if writer is None or writer.rows >= ROWS_PER_FILE:
                        if writer is not None:
                            writer.close()
                        file_name = f"part-{len(files):05d}.parquet"
                        writer = SplitParquetWriter(split_dir / file_name, schema, row_group_size=CHUNK_ROWS)
                        files.append(f"{name}/{file_name}")
                        file_rows.append(0)
                    columns = _parquet_columns(chunk, model.field_names, model.dense_fields)
                    if encoding is not None:
                        for f, field_name in enumerate(model.field_names):
                            columns[field_name] = encoding.encode(f, columns[field_name])
                    writer.write(columns)
                    file_rows[-1] += n
                    if tsv is not None:
                        tsv.write(chunk)
                    labels.append(chunk.labels)
                    probs.append(chunk.true_prob)
                    remaining -= n
                    chunk_index += 1
                    bar.update(n)
                if writer is not None:
                    writer.close()
                    writer = None
                splits[name] = SplitFiles(files=files, file_rows=file_rows)
                if labels:
                    y = np.concatenate(labels)
                    p = np.concatenate(probs)
                    both_classes = 0 < int(y.sum()) < y.shape[0]
                    bayes[name] = {
                        "auc": roc_auc(y, p) if both_classes else None,
                        "logloss": log_loss(y, p),
                        "positive_rate": float(y.mean()),
                    }
            if tsv is not None:
                tsv.close()
                tsv = None
        except BaseException:
            if writer is not None:
                writer.abort()
            if tsv is not None:
                tsv.abort()
            raise
        finally:
            bar.close()

        meta = DatasetMetadata(
            dataset="synthetic",
            fields=fields,
            dense_fields=list(model.dense_fields),
            splits=splits,
            vocab_fingerprint=model.fingerprint() if encoding is None else encoding.fingerprint(model.fingerprint()),
            rows_read=rows,
            options={
                "mode": "synthetic",
                "rows": rows,
                "split": list(split),
                # relative to the dataset directory, like every path its metadata names
                "tsv": os.path.relpath(os.path.abspath(tsv_path), os.path.abspath(out)) if tsv_path is not None else None,
                **dataclasses.asdict(config),
                **({"regime": "collapse"} if isinstance(config, CollapseRegimeConfig) else {}),
                **(encoding.describe() if encoding is not None else {}),
            },
            bayes=bayes,
            split_recipe={
                "producer": "synthetic",
                "rules": "synthetic-splits-v1",
                "rows": rows,
                "split": [float(w) for w in split],
                "seed": config.seed,
                "config": dataclasses.asdict(config),
                "model": model.fingerprint(),
                **({"sequence": day[0], "day": day[1]} if day is not None else {}),
            },
            extra={"generator": model.describe()},
        )
        if day is not None:
            meta.extra[DAY_KEY] = day_record(meta, day[0], day[1])
        write_metadata(out, meta)
        return meta
