"""The vocabulary step: paper mode's counting pass over the inputs, or the vocabulary of an earlier conversion
(``--vocab-from``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from multiembed.data.convert.options import ResolvedOptions
from multiembed.data.convert.stream import background_threads, parsed_chunks, prefetched, progress_bar
from multiembed.data.formats import HASHING_MODE, MANAGED_MODE, MODES, PAPER_MODE, RawFormat
from multiembed.data.metadata import METADATA_FILE, DatasetError, read_metadata
from multiembed.data.rawlog import SourceScan
from multiembed.data.vocab import (
    VOCAB_FILE,
    CountedVocabulary,
    HashingVocabulary,
    ManagedVocabulary,
    Vocabulary,
    VocabularyCounter,
    field_keys,
)


def count_tokens(
    fmt: RawFormat, resolved: ResolvedOptions, paths: Sequence[str], counter: VocabularyCounter, bar: Any
) -> None:
    """Paper mode's counting pass over the inputs ``paths``, into ``counter``; ``bar.update(lines)`` per chunk.
    The one counting loop: one process, a pool worker (:mod:`~multiembed.data.convert.workers`) and a rank of a
    multi-node job (:mod:`~multiembed.data.convert.nodes`) all count through it."""
    fields = list(fmt.fields(PAPER_MODE))
    for path in paths:
        chunks = prefetched(parsed_chunks(path, fmt, resolved.on_error, resolved.chunk_bytes),
                            background_threads(resolved))
        with contextlib.closing(chunks):
            for parsed in chunks:
                for field in fields:
                    keys = field_keys(fmt, PAPER_MODE, parsed.table.column(field), field, resolved.hash_seed)
                    counter.add(field, keys)
                bar.update(parsed.lines)


def count_vocabulary(fmt: RawFormat, resolved: ResolvedOptions, scans: Sequence[SourceScan]) -> CountedVocabulary:
    """Paper mode's vocabulary of ``scans``, counted in this process."""
    counter = VocabularyCounter(list(fmt.fields(PAPER_MODE)))
    with progress_bar(sum(s.rows for s in scans), "counting", resolved.progress) as bar:
        count_tokens(fmt, resolved, [s.path for s in scans], counter, bar)
    assert resolved.min_count is not None
    return counter.finish(fmt.name, resolved.min_count, resolved.hash_seed)


def load_vocabulary(source_dir: str, fmt: RawFormat) -> Tuple[Vocabulary, Dict[str, Any]]:
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
    elif mode == MANAGED_MODE:
        vocab = ManagedVocabulary(fmt.name, meta.field_names, seed)
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
