"""Numeric precision of a model: the dense arches' compute dtype (``--precision``) and the tables' storage dtype
(``--table-dtype``).

``--precision bf16``
    The dense arches (set arch, over arch, dense arch: GEMMs and the element-wise work autocast lowers with them)
    run under ``torch.autocast(dtype=torch.bfloat16)`` on CPU and GPU; parameters stay fp32 (the master weights), so
    do the optimizers' states, the logits handed to the loss (cast back to fp32), the loss and the metrics. A CPU
    without native bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` False, e.g. AVX2-only machines, where a
    bf16 GEMM runs about 50x slower than fp32) is refused in one line naming its capability
    (:func:`check_precision`). On such a CPU the CPU fast path (:mod:`multiembed.models.cpu_fastpath`) runs under
    autocast too, in bf16: its GEMM Functions cast their inputs (activations and the fp32 master weights) to bf16
    once and return gradients that reach the parameters as fp32; BatchNorm keeps fp32 statistics and running
    averages. Elsewhere (``MULTIEMBED_FAST_PATH=0``, GPUs) the plain batched path runs under autocast.

``--table-dtype fp16``
    The embedding tables are stored in fp16 (``EmbeddingBagConfig.data_type``); FBGEMM's CPU and GPU kernels read
    them and return fp32 pooled embeddings (the sharded collection's ``output_dtype``, FP32 by default), and the
    fused optimizer updates the fp16 rows in place. There is **no fp32 master copy** of the tables: each update is
    rounded to fp16 (an update smaller than half an fp16 ulp of the weight is lost). bf16 tables are not offered:
    FBGEMM's CPU kernels raise NotImplementedError for them.

Example::

    >>> compute_dtype("bf16"), compute_dtype("fp32")
    (torch.bfloat16, None)
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

from multiembed.config.choices import Precision, TableDtype

PRECISIONS = Precision.values()
TABLE_DTYPES = TableDtype.values()


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()`` (e.g. ``AVX512``, ``AVX2``), ``unknown`` where it fails."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an older or unusual build: assume nothing about the CPU
        return "unknown"


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - a build without the private op: no native bf16 known
        return False


def check_precision(precision: str, device_type: str) -> None:
    """Refuses a precision this machine cannot run at speed.

    Args:
        precision: ``fp32`` or ``bf16``.
        device_type: ``cpu``, ``cuda`` or ``meta`` (``meta``: planning on paper, never refused).

    Raises:
        ValueError: an unknown precision, or ``bf16`` on a CPU without native bf16 (one line naming the CPU
            capability).
    """
    Precision.parse(precision, "--precision")
    if precision == "bf16" and device_type == "cpu" and not cpu_bf16_supported():
        raise ValueError(
            f"--precision bf16: this CPU has no native bf16 (torch CPU capability {cpu_capability()}, "
            "torch.ops.mkldnn._is_mkldnn_bf16_supported() is False; bf16 GEMMs would run far slower than fp32): "
            "use --precision fp32"
        )


def compute_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None: plain fp32).

    Raises:
        ValueError: an unknown precision.
    """
    Precision.parse(precision, "precision", noun="precision")
    return torch.bfloat16 if precision == "bf16" else None


def dense_autocast(precision: str, device_type: str) -> ContextManager[object]:
    """The context the dense arches run in: ``torch.autocast(device_type, bfloat16)`` for ``bf16``, else nothing.

    Args:
        precision: ``fp32`` or ``bf16``.
        device_type: the dense arches' device type (``meta`` is run without autocast).
    """
    dtype = compute_dtype(precision)
    if dtype is None or device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def table_data_type(table_dtype: str) -> "object":
    """TorchRec's ``DataType`` of a ``--table-dtype`` spelling.

    Raises:
        ValueError: an unknown table dtype.
    """
    from torchrec.modules.embedding_configs import DataType

    TableDtype.parse(table_dtype, "--table-dtype")
    return DataType.FP16 if table_dtype == "fp16" else DataType.FP32


__all__ = [
    "PRECISIONS",
    "TABLE_DTYPES",
    "check_precision",
    "compute_dtype",
    "cpu_bf16_supported",
    "cpu_capability",
    "dense_autocast",
    "table_data_type",
]
