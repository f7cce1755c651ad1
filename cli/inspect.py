"""``multiembed inspect DIR [--json]``: the summary of a converted (or synthetic) dataset.

``--json`` prints one JSON object on stdout whose keys ``splits`` ({"train", "val", "test": rows}), ``vocab_sizes``
({field: size} in schema order) and ``skipped`` ({reason: rows}, empty when none) are always present, plus
``bayes_auc`` ({split: auc}) for synthetic data. By default the Parquet files' footers are checked against
metadata.json too (columns, types, row counts); ``--no-check`` reads metadata.json only.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "inspect",
        help="summarise a converted dataset directory",
        description=(
            "Prints the summary of a dataset directory written by convert or synth: rows per split, vocabulary "
            "sizes, skipped rows by reason, sources and options (and the Bayes-optimal AUC of synthetic data). "
            "Checks that the Parquet files agree with metadata.json unless --no-check is given."
        ),
    )
    p.add_argument("dir", metavar="DIR", help="dataset directory (holds metadata.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-check", action="store_true", help="do not open the Parquet files (metadata.json only)")
    p.set_defaults(func=run)


def summary(meta) -> Dict[str, Any]:
    """The ``--json`` object of a :class:`multiembed.data.metadata.DatasetMetadata`."""
    out: Dict[str, Any] = {
        "dataset": meta.dataset,
        "splits": meta.split_rows(),
        "vocab_sizes": meta.vocab_sizes,
        "skipped": dict(meta.skipped),
        "rows_read": meta.rows_read,
        "dense_fields": list(meta.dense_fields),
        "vocab_fingerprint": meta.vocab_fingerprint,
        "source": meta.source,
    }
    if meta.bayes is not None:
        out["bayes_auc"] = {split: float(values["auc"]) for split, values in meta.bayes.items()}
    return out


def _text(meta, info: Dict[str, Any], directory: str) -> List[str]:
    rows = info["splits"]
    mode = meta.options.get("mode", "-")
    lines = [
        f"{directory}: {meta.dataset} ({mode} mode), {len(meta.fields)} categorical fields, "
        f"{len(meta.dense_fields)} dense features",
        f"rows: train {rows['train']:,}, val {rows['val']:,}, test {rows['test']:,} "
        f"(read {meta.rows_read:,}, skipped {sum(meta.skipped.values()):,})",
    ]
    if meta.stream is not None:
        lines.append("source: stream (no Parquet files: rows drawn from their index while training; train is one "
                     "epoch, and every epoch draws new rows)")
    if meta.skipped:
        lines.append("skipped by reason: " + ", ".join(f"{k} {v:,}" for k, v in meta.skipped.items()))
    total = sum(info["vocab_sizes"].values())
    lines.append(f"vocabulary: {total:,} ids, fingerprint {meta.vocab_fingerprint}")
    lines.append("  " + ", ".join(f"{name} {size:,}" for name, size in info["vocab_sizes"].items()))
    if "bayes_auc" in info:
        lines.append("Bayes-optimal AUC: " + ", ".join(f"{s} {auc:.4f}" for s, auc in info["bayes_auc"].items()))
    for source in meta.sources:
        lines.append(f"source: {source.get('path')} ({source.get('bytes', 0):,} bytes, {source.get('rows', 0):,} rows)")
    return lines


def run(args: argparse.Namespace) -> int:
    from multiembed.data.metadata import read_metadata

    meta = read_metadata(args.dir)
    if not args.no_check:
        from multiembed.data.parquet_io import check_dataset_files

        check_dataset_files(args.dir, meta)
    info = summary(meta)
    if args.json:
        print(json.dumps(info))
    else:
        print("\n".join(_text(meta, info, args.dir)))
    return 0
