"""What a directory is to multiembed, and where a command may write its outputs: never over what it did not
create.

A directory that a multiembed job owns is recognised by its marker file: a converted dataset by its
``metadata.json`` (with a vocabulary fingerprint), a run directory by its ``config.json`` (with the run's options
and data), an export artifact by its ``manifest.json`` (of the artifact format). :func:`owning_directory` finds the
nearest such directory above a path (links resolved). On that:

* :func:`check_directory_out` refuses a directory output (``synth``, ``scale``, ``days``, ``analyze``, ``paper``
  ``--out``, ``predict --compile-cache``) that is a dataset, a run or an artifact the command does not make, or lies
  inside one;
* :func:`check_file_out` refuses a single output file (``plan --json``, ``synth --tsv``, ``bench --json``) inside a
  dataset, a run or an artifact, through a symbolic link, or over an existing file the command did not write.

The marker names are the ones :mod:`multiembed.training.run_dir`, :mod:`multiembed.training.checkpoint` and
:mod:`multiembed.serving.artifact` define (a test pins them equal); this module imports no torch, so the torch-free
commands (``synth``) place their outputs with it too.

Example::

    >>> owning_directory("/nonexistent/dir/pred.parquet") is None
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Collection, Optional, Tuple

from multiembed.data.metadata import METADATA_FILE
from multiembed.data.paths import is_within

DATASET = "a converted dataset"
RUN = "a training run directory"
ARTIFACT = "an export artifact"
# Marker files and folders of the other kinds (defined where those are written; equal, as a test checks).
RUN_CONFIG = "config.json"
RUN_CHECKPOINTS = "checkpoints"
ARTIFACT_MANIFEST = "manifest.json"
ARTIFACT_FORMAT = "multiembed-serving-v1"


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
    config = _json_object(directory / RUN_CONFIG) if (directory / RUN_CONFIG).is_file() else None
    if config is not None and "options" in config and "data" in config:
        return RUN
    manifest = _json_object(directory / ARTIFACT_MANIFEST) if (directory / ARTIFACT_MANIFEST).is_file() else None
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


def check_directory_out(
    out: "str | os.PathLike", flag: str, may_be: Collection[str] = (), beside_run: bool = False
) -> None:
    """Refuses a directory output that is, or lies inside, a dataset, a run or an artifact the command does not
    make.

    Args:
        out: the directory about to be written (created when missing).
        flag: how the message names it (``--out``, ``--compile-cache``).
        may_be: the kinds ``out`` itself may be (``synth``: :data:`DATASET`, which it replaces only with
            ``--force``; ``analyze``: :data:`RUN`, its report beside the run's files).
        beside_run: ``out`` may lie inside a run directory, outside its ``checkpoints/`` (a report).

    Raises:
        ValueError: one line naming ``out`` and what it is or lies in.

    Example::

        >>> check_directory_out("/nonexistent/report", "--out")
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: exists and is not a directory")
    kind = directory_kind(out) if out.is_dir() else None
    if kind is not None and kind not in may_be:
        raise ValueError(f"{flag} {out}: is {kind}; write elsewhere")
    owner = owning_directory(out)
    if owner is None:
        return
    directory, kind = owner
    if beside_run and kind == RUN and not is_within(out, directory / RUN_CHECKPOINTS):
        return
    where = f"{directory / RUN_CHECKPOINTS}" if kind == RUN and beside_run else f"{kind} ({directory})"
    raise ValueError(f"{flag} {out}: lies inside {where}; write elsewhere")


def check_file_out(
    out: "str | os.PathLike",
    flag: str,
    replaceable: Optional[Callable[[Path], bool]] = None,
    what: str = "",
    overwrite: bool = False,
    overwrite_flag: Optional[str] = None,
) -> None:
    """Refuses a single output file that would write over what the command did not create.

    Args:
        out: the file about to be written (atomically: a temporary file, then a rename).
        flag: how the message names it (``--json``, ``--tsv``).
        replaceable: whether an existing file is one this command wrote (then it is replaced).
        what: what such a file is, for the message (``"a plan summary"``).
        overwrite: any existing regular file may be replaced (the command's ``overwrite_flag`` was given).
        overwrite_flag: the command's option that replaces an existing file (``"--force"``), for the message.

    Raises:
        ValueError: one line naming ``out``: it lies inside a dataset, a run or an artifact, is a symbolic link or
            not a regular file, or exists and is neither replaceable nor covered by ``overwrite``.

    Example::

        >>> check_file_out("/nonexistent/plan.json", "--json")
    """
    out = Path(out)
    owner = owning_directory(out)
    if owner is not None:
        raise ValueError(f"{flag} {out}: lies inside {owner[1]} ({owner[0]}); write it elsewhere")
    if out.is_symlink():
        raise ValueError(f"{flag} {out}: is a symbolic link; never written through")
    if out.is_dir():
        raise ValueError(f"{flag} {out}: is a directory; {flag} names the file to write")
    if out.exists() and not out.is_file():
        raise ValueError(f"{flag} {out}: exists and is not a regular file")
    if out.exists() and not overwrite and not (replaceable is not None and replaceable(out)):
        kind = f" and is not {what}" if what else ""
        hint = f" (or {overwrite_flag} to replace it)" if overwrite_flag else ""
        raise ValueError(f"{flag} {out}: already exists{kind}; choose a new {flag}{hint}")


def json_with_keys(*keys: str) -> Callable[[Path], bool]:
    """A ``replaceable`` test for :func:`check_file_out`: the file is a JSON object holding every one of ``keys``.

    Example::

        >>> json_with_keys("request")(Path("/nonexistent.json"))
        False
    """

    def test(path: Path) -> bool:
        obj = _json_object(path)
        return obj is not None and all(key in obj for key in keys)

    return test
