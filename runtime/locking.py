"""One job per directory: an exclusive, non-blocking lock on a lock file inside the directory.

``convert`` and ``synth`` hold it on their output directory for the whole job (the trainer can hold it on a run
directory); a second job on the same directory is refused at once with one line naming the holder::

    with exclusive_lock(Path(out), "conversion"):
        ...  # nobody else holds the lock of ``out`` here

Two mechanisms, chosen per call:

* ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``DIR/.multiembed.lock`` (local file systems, and NFS on Linux, which
  emulates flock with byte-range locks). The kernel releases the lock when the holder dies, however it dies.
  The file holds the holder's host and pid (for the message only) and is removed on release; a lock taken on a
  file that was removed meanwhile is retried on the new file, so two jobs never both hold one.
* Where the file system refuses flock (``ENOLCK``, ``EOPNOTSUPP``, ``ENOSYS``, ``EINVAL``): the lock file is
  created with ``O_CREAT | O_EXCL`` (atomic on every file system, NFSv3 and later included) and holds the host and
  pid; it is removed on release. A lock file left behind by a dead process of *this* host (its pid no longer runs)
  is taken over; one of another host is never guessed about: remove it by hand once that job is gone.

This module imports only the standard library and nothing of the package.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator, Optional, Tuple

LOCK_FILE = ".multiembed.lock"
# flock is not available on this file system: use the exclusive-create lock file instead.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_RETRIES = 20


class LockHeldError(OSError):
    """Another job holds the directory's lock; the message names the directory, the job and its host and pid."""


def _holder_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n"


def _read_holder(path: Path) -> Tuple[Optional[str], Optional[int]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return str(obj["host"]), int(obj["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _refusal(directory: Path, what: str, path: Path) -> LockHeldError:
    host, pid = _read_holder(path)
    holder = f"host {host}, pid {pid}" if host is not None else "holder not recorded yet"
    return LockHeldError(
        f"{directory}: another {what} is running in this directory ({holder}; lock file {path}); wait for it to "
        "finish or stop it"
    )


def pid_is_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # runs under another user
        return False
    return False


def _open_lock_file(path: Path) -> Tuple[Optional[int], bool]:
    """``(fd, created)`` of the lock file, ``(None, False)`` when it vanished between two calls (retry).

    ``O_NOFOLLOW``: never lock (and later write or remove) the target of a link planted under the lock's name.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                return os.open(path, flags), False
            except FileNotFoundError:
                return None, False
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(f"{path}: is a symbolic link; refusing to use it as a lock file") from None
        raise OSError(f"{path}: cannot create the lock file ({e.strerror or e})") from None


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.write(fd, _holder_text().encode())


def _take_over_dead_holder(path: Path) -> bool:
    """Removes a lock file whose holder was a process of this host that no longer runs; True when removed."""
    host, pid = _read_holder(path)
    if host == socket.gethostname() and pid is not None and pid != os.getpid() and pid_is_gone(pid):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    return False


@contextlib.contextmanager
def _held(path: Path, fd: int) -> Iterator[Path]:
    """The lock is ours (flock on ``fd``, or ``fd``'s file was created exclusively): record us, remove on release."""
    try:
        _write_holder(fd)
        yield path
    finally:
        # Removed while still locked: an opener that raced us locks a removed file, notices and retries.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def refuse_if_locked(directory: os.PathLike, what: str) -> None:
    """Refuses at once when another job holds ``directory``'s lock, touching nothing (no lock file is created or
    removed): for the checks a job runs on a directory before it takes the lock itself, so that what a running job
    is writing there (a temporary file) is named as that job rather than as a stranger's file.

    Raises:
        LockHeldError: another job holds the lock (the message names it, as :func:`exclusive_lock`'s does).
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file (or a link, which exclusive_lock refuses): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when fd is closed
    except BlockingIOError:
        raise _refusal(directory, what, path) from None
    except OSError as e:
        host, pid = _read_holder(path)
        if e.errno in _NO_FLOCK and host is not None and pid is not None:
            if host != socket.gethostname() or not pid_is_gone(pid):
                raise _refusal(directory, what, path) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(directory: os.PathLike, what: str) -> Iterator[Path]:
    """Holds the exclusive lock of ``directory`` (which must exist) for the ``with`` block.

    Args:
        directory: the directory the job owns (a dataset or run directory).
        what: the job, for the message (``"conversion"``, ``"synth"``, ``"training run"``).

    Yields:
        The lock file's path (``directory / LOCK_FILE``); it is removed on release.

    Raises:
        LockHeldError: another job holds the lock; the one-line message names ``directory``, ``what`` and the
            holder's host and pid.
        OSError: the lock file cannot be created (the message names it).
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    for _ in range(_RETRIES):
        fd, created = _open_lock_file(path)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            error = None
        except OSError as e:
            error = e
        if isinstance(error, BlockingIOError):
            os.close(fd)
            raise _refusal(directory, what, path)
        if error is not None and error.errno not in _NO_FLOCK:
            os.close(fd)
            raise OSError(f"{path}: cannot lock ({error.strerror or error})")
        if error is not None and not created:  # no flock here, and the exclusive creation (the lock) was not ours
            os.close(fd)
            if _take_over_dead_holder(path):
                continue
            raise _refusal(directory, what, path)
        if error is None:
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder removed on release: lock the current one instead
                os.close(fd)
                continue
        with _held(path, fd):
            yield path
        return
    raise _refusal(directory, what, path)
