"""glibc ``malloc`` tuning, in one place: keeping freed memory in the process instead of returning it to the kernel.

glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and unmaps it on free, so a loop that
allocates large temporaries page-faults (and the kernel zeroes) every 4 KiB of them again on every pass. Raising the
thresholds (or switching ``mmap`` off) makes the heap reuse those pages: speed changes, results do not. Settings are
process-wide. Used by ``convert`` (its column temporaries), by the commands that train (:func:`tune_allocator`)
and by the training benchmark (``--malloc``, :func:`apply_malloc_mode`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Sequence, Tuple

# <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


def set_malloc_options(settings: Sequence[Tuple[int, int]]) -> bool:
    """Applies ``mallopt(parameter, value)`` for each pair, in order.

    Returns:
        True when every setting was applied; False where the C library is not glibc on Linux (nothing changed) or
        glibc refused one (the ones before it stay applied).

    Example::

        >>> set_malloc_options([(M_TRIM_THRESHOLD, 1 << 30)]) in (True, False)
        True
    """
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


# The tuned settings (:func:`tune_allocator`): glibc refuses an mmap threshold above 32 MiB on 64-bit.
TUNED_MALLOC_OPTIONS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30))


def tune_allocator() -> bool:
    """Keeps freed blocks up to 32 MiB in glibc's heap instead of returning them to the kernel, for the processes
    that allocate and free the same temporaries over and over: ``convert`` (and its pool's workers) and the
    commands that train (``train``, ``days``, ``scale``; every rank).

    glibc maps each allocation above its mmap threshold with ``mmap`` and unmaps it on free, so every new one
    page-faults again (and the kernel zeroes it): for encoding, numpy temporaries of a few MB per column and chunk
    cost several times the numpy work itself (benchmarks/README.md, "Conversion: encoding and allocator choices");
    for training, a step's activations and gradients (dcnv2-me-4x, batch 2048, on CPU: about 60 -> 8 MB of page
    faults a step, as few as :func:`retain_freed_memory` leaves). Raising the mmap and trim thresholds makes the heap
    reuse those pages; blocks over 32 MiB still go back to the kernel, and peak memory is unchanged (the same
    temporaries are live at the peak). Speed only, never results. Process-wide.

    Returns:
        False (nothing changed) where the C library is not glibc or refuses the settings.
    """
    return set_malloc_options(TUNED_MALLOC_OPTIONS)


def retain_freed_memory() -> None:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel (the training benchmark's
    ``--malloc retain``).

    By default glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and unmaps it on free,
    so a training step that allocates hundreds of MB of activations, gradients and optimizer temporaries pays a
    page fault (and the kernel's zeroing) for every 4 KiB of them, every step: measured here, about 660 MB a step
    for the plain baseline (its dense embedding gradients and Adam temporaries) and 60 MB for the project. With
    ``mmap`` off and trimming off, the heap is reused after the first steps. It changes speed, not results, and it
    is process-wide (both contenders get it).

    Raises:
        OSError: not glibc, or ``mallopt`` refused.
    """
    if not set_malloc_options([(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 * 2**20)]):
        raise OSError("--malloc retain needs Linux glibc, and glibc accepting mallopt")


# The benchmark's ``--malloc`` modes: the process as started, a training process's settings, or no unmapping at all.
MALLOC_MODES = ("default", "train", "retain")


def apply_malloc_mode(mode: str) -> None:
    """Applies one of :data:`MALLOC_MODES` to this process.

    Raises:
        ValueError: an unknown mode.
        OSError: ``retain`` where the C library is not glibc or refuses it.
    """
    if mode not in MALLOC_MODES:
        raise ValueError(f"--malloc: expected one of {', '.join(MALLOC_MODES)}, got {mode!r}")
    if mode == "train":
        tune_allocator()
    elif mode == "retain":
        retain_freed_memory()
