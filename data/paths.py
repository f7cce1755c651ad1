"""Where a path lies, once symbolic links and ``..`` are resolved: the containment checks of every writer and of
every reader of paths that a file names.

A writer refuses an output that is, or lies inside, a directory it must not write into (``scale --out`` inside its
``--data``, ``export --out`` inside a run's ``checkpoints/``); a reader refuses a path named by a file (a dataset's
``metadata.json``) that leaves the directory it belongs to. Both ask :func:`is_within` of resolved paths, so a link
or a ``..`` that leads elsewhere is seen for where it leads.

This module imports only the standard library and nothing of the package.

Example::

    >>> is_within("/data/set/train/part-0.parquet", "/data/set")
    True
    >>> is_within("/data/set/../other/part-0.parquet", "/data/set")
    False
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Optional


def is_within(path: "str | os.PathLike", directory: "str | os.PathLike") -> bool:
    """Whether ``path`` is ``directory`` or lies inside it, both resolved (symbolic links followed, ``..`` removed;
    parts that do not exist yet are taken as written)."""
    resolved, root = Path(path).resolve(), Path(directory).resolve()
    return resolved == root or root in resolved.parents


def refuse_within(path: "str | os.PathLike", directory: "str | os.PathLike", what: str) -> None:
    """Refuses ``path`` when it is ``directory`` or lies inside it.

    Args:
        path: the output about to be written (``--out``).
        directory: the directory it must stay out of.
        what: how the message names the two, e.g. ``"scale --out {path} is inside --data {directory}"`` with
            ``{path}`` and ``{directory}`` filled in.

    Raises:
        ValueError: ``path`` is or lies inside ``directory`` (one line, from ``what``).
    """
    if is_within(path, directory):
        raise ValueError(what.format(path=path, directory=directory))


def escape_reason(name: str, directory: "str | os.PathLike") -> Optional[str]:
    """Why the relative file name ``name`` (as a file inside ``directory`` records it) does not stay inside
    ``directory``: empty, a NUL character, an absolute path, a ``..`` part, or a symbolic link on the way that leads
    out. None: it stays.

    Example::

        >>> escape_reason("train/part-00000.parquet", "/data/set") is None
        True
        >>> escape_reason("../other/train/part-00000.parquet", "/data/set")
        "has a '..' part"
    """
    if not name:
        return "is empty"
    if "\0" in name:
        return "holds a NUL character"
    if os.path.isabs(name) or PurePosixPath(name).is_absolute() or name.startswith("\\"):
        return "is an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "has a '..' part"
    if not is_within(Path(directory) / name, directory):
        return f"leads out of the directory through a symbolic link (to {Path(directory, name).resolve()})"
    return None
