"""Where ``export`` and ``predict`` may write: never over what they did not create.

A file or directory that a multiembed job owns is recognised by its marker file: a converted dataset by its
``metadata.json`` (with a vocabulary fingerprint), a run directory by its ``config.json`` (with the run's options
and data), an export artifact by its ``manifest.json`` (of the artifact format). :func:`owning_directory` finds the
nearest such directory at or above a path (links resolved), so that

* ``predict --out`` is refused inside any of them, refused when it names the command's own input, and refused when
  it exists unless ``--overwrite`` is given (then only a regular file is replaced);
* ``export --out`` is refused inside a dataset, inside another artifact and inside a run's ``checkpoints/``.

Example::

    >>> owning_directory("/nonexistent/dir/pred.parquet") is None
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Tuple

from multiembed.data.metadata import METADATA_FILE
from multiembed.data.paths import is_within
from multiembed.serving.artifact import ARTIFACT_FORMAT, MANIFEST_FILE
from multiembed.training.checkpoint import CHECKPOINT_DIR
from multiembed.training.run_dir import CONFIG_FILE

DATASET = "a converted dataset"
RUN = "a training run directory"
ARTIFACT = "an export artifact"


def _json_object(path: Path) -> Optional[dict]:
    try:
        obj: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def directory_kind(directory: Path) -> Optional[str]:
    """What ``directory`` is to multiembed: :data:`DATASET`, :data:`RUN`, :data:`ARTIFACT`, or None (nothing)."""
    metadata = _json_object(directory / METADATA_FILE) if (directory / METADATA_FILE).is_file() else None
    if metadata is not None and "vocab_fingerprint" in metadata:
        return DATASET
    config = _json_object(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else None
    if config is not None and "options" in config and "data" in config:
        return RUN
    manifest = _json_object(directory / MANIFEST_FILE) if (directory / MANIFEST_FILE).is_file() else None
    if manifest is not None and manifest.get("format") == ARTIFACT_FORMAT:
        return ARTIFACT
    return None


def owning_directory(path: "str | os.PathLike") -> Optional[Tuple[Path, str]]:
    """The nearest directory holding ``path`` (resolved; ``path`` itself excluded) that is a dataset, a run or an
    artifact, with its kind (:func:`directory_kind`); None when no such directory holds it."""
    for directory in Path(path).resolve().parents:
        kind = directory_kind(directory)
        if kind is not None:
            return directory, kind
    return None


def check_prediction_out(out: "str | os.PathLike", overwrite: bool, inputs: Iterable["str | os.PathLike"]) -> None:
    """Refuses a ``predict --out`` that would write over what ``predict`` did not create.

    Args:
        out: the Parquet file to write.
        overwrite: ``--overwrite``: an existing regular file may be replaced.
        inputs: the command's inputs (the artifact directory, ``--data`` or ``--raw``): never written over, nor
            anything inside them.

    Raises:
        ValueError: (one line naming ``out``) ``out`` is an input or lies inside one, lies inside a dataset, a run
            directory or an artifact, is a directory or a symbolic link, or exists without ``overwrite``.
    """
    out = Path(out)
    for source in inputs:
        if is_within(out, source):
            raise ValueError(f"--out {out}: is the input {source} or inside it; write the predictions elsewhere")
    owner = owning_directory(out)
    if owner is not None:
        raise ValueError(f"--out {out}: lies inside {owner[1]} ({owner[0]}); write the predictions elsewhere")
    if out.is_symlink():
        raise ValueError(f"--out {out}: is a symbolic link; predict never writes through a link")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; --out names the Parquet file to write")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out}: exists and is not a regular file")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out}: already exists; choose a new --out (or --overwrite to replace it)")


def check_export_placement(out: "str | os.PathLike") -> None:
    """Refuses an ``export --out`` inside a dataset, inside another artifact or inside a run's ``checkpoints/``.

    Raises:
        ValueError: one line naming ``out`` and the directory it lies in.
    """
    out = Path(out)
    owner = owning_directory(out)
    if owner is None:
        return
    directory, kind = owner
    if kind == RUN and not is_within(out, directory / CHECKPOINT_DIR):
        return  # beside the run's own files, where retention and resuming never look
    where = f"{directory / CHECKPOINT_DIR}" if kind == RUN else f"{kind} ({directory})"
    raise ValueError(f"--out {out}: lies inside {where}; export the artifact elsewhere")
