"""The machine facts every benchmark JSON records: CPU model, torch's CPU capability, native bf16, GEMM backend.

Machines differ (some have ``avx512_bf16``, where a bf16 GEMM runs about 3x fp32; others are AVX2 only, where it
runs about 50x slower), so a figure means little without them.

Example::

    >>> facts = cpu_facts()
    >>> sorted(facts) == sorted(CPU_FACT_KEYS)
    True
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict, Tuple

CPU_FACT_KEYS: Tuple[str, ...] = (
    "cpu", "cpu_count", "cpu_capability", "mkldnn_bf16_supported", "gemm_backend",
)


def cpu_model_name() -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (``platform.processor()`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's address space (``VmHWM`` of ``/proc/self/status``).

    Not ``getrusage``'s ``ru_maxrss``: that is the maximum over the process's life, and a child starts with its
    parent's resident size at ``fork`` (kept across ``exec``), so a small child of a large parent reports the
    parent's size. ``VmHWM`` belongs to the address space, which ``exec`` replaces. ``ru_maxrss`` is the fallback
    where ``/proc`` is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def cpu_facts() -> Dict[str, Any]:
    """The CPU facts of this process's machine (imports torch).

    Returns:
        ``cpu`` (model name), ``cpu_count``, ``cpu_capability`` (``torch.backends.cpu.get_cpu_capability()``, e.g.
        ``AVX512`` or ``AVX2``), ``mkldnn_bf16_supported`` (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: native
        bf16 GEMMs) and ``gemm_backend`` (``{"float32": ..., "bfloat16": ...}``, the GEMM kernel the CPU fast path
        uses, :func:`multiembed.models.cpu_fastpath.gemm_backend`).
    """
    import torch

    from multiembed.models import cpu_fastpath
    from multiembed.models.precision import cpu_bf16_supported, cpu_capability

    return {
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": cpu_capability(),
        "mkldnn_bf16_supported": cpu_bf16_supported(),
        "gemm_backend": {
            "float32": cpu_fastpath.gemm_backend(torch.float32),
            "bfloat16": cpu_fastpath.gemm_backend(torch.bfloat16),
        },
    }
