"""The encoding step: one input's rows encoded (:func:`multiembed.data.encode.encode_table`), assigned to splits and
written to its Parquet files, each renamed into place when complete."""

from __future__ import annotations

import collections
import concurrent.futures
from pathlib import Path
from typing import Any, Counter, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from multiembed.data.convert.options import ResolvedOptions
from multiembed.data.convert.outputs import OutputError, part_path
from multiembed.data.convert.stream import background_threads, parsed_chunks, prefetched
from multiembed.data.encode import encode_table
from multiembed.data.formats import RawFormat
from multiembed.data.metadata import SPLITS
from multiembed.data.parquet_io import SplitParquetWriter
from multiembed.data.rawlog import InputError, SourceScan, file_state
from multiembed.data.splits import SplitAssigner, SplitCounts
from multiembed.data.vocab import Vocabulary


class SplitWriters:
    """The three split outputs of one input, created on first use and written by one background thread (in the
    caller's thread when the conversion is held to one thread)."""

    def __init__(self, out: Path, index: int, schema: pa.Schema, resolved: ResolvedOptions) -> None:
        self._out = out
        self._index = index
        self._schema = schema
        self._resolved = resolved
        self._writers: Dict[str, SplitParquetWriter] = {}
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        if background_threads(resolved):
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-write")
        self._pending: Optional[concurrent.futures.Future] = None

    def _write_now(self, parts: List[Tuple[str, Dict[str, np.ndarray]]]) -> None:
        for split, columns in parts:
            writer = self._writers.get(split)
            path = self._out / part_path(split, self._index)
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
        """Waits for the batch in flight (its error raised here)."""
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
                raise OutputError(
                    f"{writer.path}: cannot write ({e}); is the disk full or a file-size limit set?"
                ) from None
        if self._pool is not None:
            self._pool.shutdown()
        return rows

    def abort(self) -> None:
        """Drops every unfinished output (nothing half-written is left under a final name)."""
        try:
            self.wait()
        except Exception:  # the conversion is failing already; the first error is the one reported
            pass
        for writer in self._writers.values():
            writer.abort()
        if self._pool is not None:
            self._pool.shutdown()


def convert_input(
    index: int,
    scan: SourceScan,
    counts: SplitCounts,
    fmt: RawFormat,
    resolved: ResolvedOptions,
    vocab: Vocabulary,
    schema: pa.Schema,
    bar: Any,
) -> Dict[str, Any]:
    """Encodes one input into its split outputs; returns its manifest (files, rows, skipped rows).

    The one encoding loop: one process, a pool worker and a rank of a multi-node job all encode through it, so an
    input's files depend only on the input, its index, the counts and the vocabulary.
    """
    assigner = SplitAssigner(counts, resolved.seed, index, ordered=resolved.split_by_file)
    writers = SplitWriters(resolved.out, index, schema, resolved)
    skipped: Counter[str] = collections.Counter()
    examples: List[str] = []
    lines = 0
    chunks = prefetched(parsed_chunks(scan.path, fmt, resolved.on_error, resolved.chunk_bytes),
                        background_threads(resolved))
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
        "files": {split: {"path": part_path(split, index), "rows": rows[split]} for split in SPLITS if split in rows},
        "skipped": dict(skipped),
        "skipped_examples": examples,
        "rows_read": lines,
    }
