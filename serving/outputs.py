"""Where commands may write: never over what they did not create.

A file or directory that a multiembed job owns is recognised by its marker file: a converted dataset by its
``metadata.json`` (with a vocabulary fingerprint), a run directory by its ``config.json`` (with the run's options
and data), an export artifact by its ``manifest.json`` (of the artifact format). :func:`owning_directory` finds the
nearest such directory at or above a path (links resolved), so that

* ``predict --out`` is refused inside any of them, refused when it names the command's own input, and refused when
  it exists unless ``--overwrite`` is given (then only a regular file is replaced);
* ``export --out`` is refused inside a dataset, inside another artifact and inside a run's ``checkpoints/``;
* every other command's outputs are placed by :mod:`multiembed.data.owners` (torch-free, so ``synth`` uses it too).

Example::

    >>> owning_directory("/nonexistent/dir/pred.parquet") is None
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from multiembed.data.owners import (
    ARTIFACT, DATASET, RUN, RUN_CHECKPOINTS, check_file_out, directory_kind, owning_directory,
)
from multiembed.data.paths import is_within

__all__ = ["ARTIFACT", "DATASET", "RUN", "check_export_placement", "check_prediction_out", "directory_kind",
           "owning_directory"]


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
    check_file_out(out, "--out", overwrite=overwrite, overwrite_flag="--overwrite")


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
    if kind == RUN and not is_within(out, directory / RUN_CHECKPOINTS):
        return  # beside the run's own files, where retention and resuming never look
    where = f"{directory / RUN_CHECKPOINTS}" if kind == RUN else f"{kind} ({directory})"
    raise ValueError(f"--out {out}: lies inside {where}; export the artifact elsewhere")
