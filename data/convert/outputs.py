"""The output directory of a conversion: what may be written there, what a finished dataset there was made from,
the part files and manifests of each input, and the write errors.

Each input ``i`` owns ``{train,val,test}/part-<i>.parquet`` and its manifest ``.convert/part-<i>.json`` (written
last); ``metadata.json`` marks the dataset complete.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from multiembed.data.convert.options import ResolvedOptions
from multiembed.data.metadata import METADATA_FILE, SPLITS, DatasetError, DatasetMetadata, read_metadata
from multiembed.data.rawlog import SourceScan
from multiembed.data.vocab import VOCAB_FILE
from multiembed.runtime.locking import LOCK_FILE

STATE_DIR = ".convert"
_PART_NAME = re.compile(r"^part-(\d{5,})\.parquet$")
_TEMP_NAME = re.compile(r"^\.part-\d{5,}\.parquet\.tmp-\d+$")


class OutputError(OSError):
    """Writing the converted dataset failed (full disk, file-size limit, permissions); names the file."""


def part_path(split: str, index: int) -> str:
    """An input's output file of ``split``, relative to the dataset directory."""
    return f"{split}/part-{index:05d}.parquet"


OWN_ENTRIES = frozenset({METADATA_FILE, STATE_DIR, VOCAB_FILE, LOCK_FILE, *SPLITS})


def check_out_dir(out: Path, overwrite: bool) -> None:
    """``out`` is new, empty, a conversion in progress (``.convert/``), or with ``overwrite`` a multiembed dataset
    (``metadata.json``) holding nothing a producer does not write; anything else is refused untouched."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()} - {LOCK_FILE}
    unexpected = sorted(entries - OWN_ENTRIES)
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


def check_no_links(out: Path) -> None:
    """Refuses a symbolic link anywhere convert writes or deletes inside ``out`` (``out`` itself may be one)."""
    candidates = [out / name for name in sorted(OWN_ENTRIES)]
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


def clear_outputs(out: Path) -> None:
    """``--overwrite``: deletes what a producer wrote in ``out`` (metadata first, so it never looks complete)."""
    (out / METADATA_FILE).unlink(missing_ok=True)
    (out / VOCAB_FILE).unlink(missing_ok=True)
    remove_outputs(out, keep=())  # every part file and manifest (a synth dataset's part files included)


def read_finished(out: Path, overwrite: bool) -> Optional[DatasetMetadata]:
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


def option_differences(
    meta: DatasetMetadata, resolved: ResolvedOptions, vocab_fingerprint: Optional[str]
) -> List[str]:
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


def input_difference(meta: DatasetMetadata, out: Path, scans: Sequence[SourceScan]) -> Optional[str]:
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


def read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    """An input's manifest (``.convert/part-<index>.json``), None when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def manifest_is_complete(out: Path, manifest: Optional[Dict[str, Any]], part_key: str) -> bool:
    """Whether ``manifest`` is this run's (``part_key``) and names files that all exist."""
    if not manifest or manifest.get("part_key") != part_key:
        return False
    try:
        return all((out / entry["path"]).is_file() for entry in manifest["files"].values())
    except (KeyError, TypeError, AttributeError):
        return False


def remove_outputs(out: Path, keep: Iterable[int]) -> None:
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
