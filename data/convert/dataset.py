"""The last step: the dataset's ``metadata.json`` from the inputs' manifests; what a conversion did
(:class:`ConvertResult`) and the summary ``convert`` prints."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any, Counter, Dict, List, Sequence

from multiembed.data.convert.options import ResolvedOptions
from multiembed.data.days import DAY_KEY, day_record
from multiembed.data.formats import RawFormat
from multiembed.data.metadata import SPLITS, DatasetMetadata, FieldSpec, SplitFiles
from multiembed.data.rawlog import SourceScan
from multiembed.data.vocab import VOCAB_FILE, CountedVocabulary, Vocabulary

# Version of what assigns rows to splits (parsing rules, exact-count random or by-file assignment): part of every
# split identity, so a change of these rules never passes for the same split.
SPLIT_RULES = "exact-counts-v1"


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


def build_metadata(
    fmt: RawFormat, resolved: ResolvedOptions, vocab: Vocabulary, manifests: Sequence[Dict[str, Any]],
    scans: Sequence[SourceScan],
) -> DatasetMetadata:
    """``metadata.json`` of the dataset made from ``manifests`` (one per input, in input order)."""
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
    metadata = DatasetMetadata(
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
    if resolved.day is not None:
        metadata.extra[DAY_KEY] = day_record(metadata, *resolved.day)
    return metadata


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
    ids = "63-bit token keys (rows assigned in training)" if meta.options.get("mode") == "managed" else f"{total:,} ids"
    lines.append(
        f"vocabulary: {meta.options.get('mode')} mode, {len(meta.fields)} fields, {ids}, "
        f"fingerprint {meta.vocab_fingerprint[:16]}"
    )
    return lines
