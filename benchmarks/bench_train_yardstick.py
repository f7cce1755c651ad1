"""The yardstick of the step's efficiency: the best GEMM rate this torch reaches on this machine in the same run, and
the step's ceiling at that rate.

The GEMMs a training step runs are recorded from a real step (:class:`GemmRecorder`, a ``TorchDispatchMode``
that sees every matrix product torch executes: ``mm``, ``addmm``, ``bmm``, ``baddbmm`` (in place too) and oneDNN's
linear), with their shapes, dtype and operand layouts. :class:`GemmYardstick` times each of those shapes and one square GEMM
(:data:`SQUARE_GEMM`) on every GEMM kernel torch offers here for each dtype (:func:`gemm_backends`: ``addmm``,
oneDNN's linear where it works, torch's batched ``bmm`` for the step's batched calls), in the throughput rounds, and
keeps each one's best time. The limit is the highest of those rates: no GEMM the step runs, on any kernel, was
measured faster than the yardstick (:func:`check_gemm_limit` refuses a record where one was).

Example::

    >>> with GemmRecorder() as recorder:
    ...     _ = torch.randn(8, 3) @ torch.randn(3, 5)
    >>> [(g.m, g.k, g.n, g.dtype) for g in recorder.gemms]
    [(8, 3, 5, 'float32')]
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from multiembed.benchmarks.bench_train_timing import timed, timed_call
from multiembed.models import cpu_fastpath

# The square GEMM every yardstick includes: [SQUARE_GEMM, SQUARE_GEMM] x [SQUARE_GEMM, SQUARE_GEMM].
SQUARE_GEMM = 2048
# A row is called until its calls in a round reach about this many FLOPs (at most MAX_CALLS_PER_ROUND times).
ROUND_FLOPS = 2e9
MAX_CALLS_PER_ROUND = 16
# The dtypes the yardstick times for each compute precision of the step (a bf16 step is measured against the
# faster of bf16 and fp32 GEMMs).
YARDSTICK_DTYPES: Dict[str, Tuple[str, ...]] = {"fp32": ("float32",), "bf16": ("float32", "bfloat16")}


@dataclasses.dataclass(frozen=True)
class GemmShape:
    """One GEMM signature: ``batch`` products ``[m, k] x [k, n]`` in ``dtype``.

    Attributes:
        m, k, n: the product's sizes.
        batch: 1 for a plain GEMM, the batch of a batched call.
        dtype: ``torch`` dtype name (``float32``, ``bfloat16``).
        a_transposed, b_transposed: the operand is the transpose of a contiguous matrix (column-major).
    """

    m: int
    k: int
    n: int
    batch: int = 1
    dtype: str = "float32"
    a_transposed: bool = False
    b_transposed: bool = False

    @property
    def flops(self) -> int:
        """``2 * batch * m * k * n``."""
        return 2 * self.batch * self.m * self.k * self.n

    def single(self) -> "GemmShape":
        """The same product without the batch."""
        return dataclasses.replace(self, batch=1)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _transposed(matrix: torch.Tensor) -> bool:
    """True where the last two dimensions of ``matrix`` are stored column-major (a transposed contiguous matrix)."""
    rows, cols = matrix.shape[-2:]
    return rows > 1 and cols > 1 and matrix.stride(-2) == 1 and matrix.stride(-1) >= rows


def _gemm_ops() -> Dict[Any, str]:
    """The matrix-product ops :class:`GemmRecorder` records, by overload packet."""
    aten = torch.ops.aten
    ops: Dict[Any, str] = {
        aten.mm: "mm", aten.addmm: "addmm", aten.addmm_: "addmm", aten.bmm: "bmm", aten.baddbmm: "baddbmm",
        aten.baddbmm_: "baddbmm",
    }
    try:
        ops[torch.ops.mkldnn._linear_pointwise] = "linear"
    except (AttributeError, RuntimeError):
        pass  # a build without oneDNN
    return ops


def gemm_shape(kind: str, args: Sequence[Any]) -> GemmShape:
    """The :class:`GemmShape` of one call of a :func:`_gemm_ops` op (``kind``) with positional ``args``."""
    if kind == "linear":  # x [..., k] @ weight[n, k]^T
        x, weight = args[0], args[1]
        return GemmShape(m=math.prod(x.shape[:-1]), k=x.shape[-1], n=weight.shape[0], dtype=str(x.dtype)[6:],
                         a_transposed=x.dim() == 2 and _transposed(x), b_transposed=not _transposed(weight))
    a, b = (args[0], args[1]) if kind in ("mm", "bmm") else (args[1], args[2])
    batch = a.shape[0] if kind in ("bmm", "baddbmm") else 1
    return GemmShape(m=a.shape[-2], k=a.shape[-1], n=b.shape[-1], batch=batch, dtype=str(a.dtype)[6:],
                     a_transposed=_transposed(a), b_transposed=_transposed(b))


class GemmRecorder(TorchDispatchMode):
    """Records every matrix product torch executes inside the ``with`` block (:attr:`gemms`: signature -> calls).

    Used on one real training step, so the yardstick covers exactly the GEMMs the step runs (the CPU fast path's
    padded widths included).
    """

    def __init__(self) -> None:
        super().__init__()
        self._ops = _gemm_ops()
        self.gemms: "collections.Counter[GemmShape]" = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kind = self._ops.get(func.overloadpacket)
        if kind is None:
            return func(*args, **(kwargs or {}))
        shape = gemm_shape(kind, args)
        self.gemms[shape] += 1
        return self._run_gemm(shape, lambda: func(*args, **(kwargs or {})))

    def _run_gemm(self, shape: GemmShape, call: Callable[[], Any]) -> Any:
        """Runs one recorded product (subclasses time it)."""
        return call()


class GemmTimer(GemmRecorder):
    """Times every matrix product torch executes inside the ``with`` block, call by call, and charges it to the phase
    ``phase()`` names at the call (:attr:`seconds` and :attr:`flops` per phase; :attr:`gemms` counts signatures as
    :class:`GemmRecorder` does).

    Each GEMM is timed as the step runs it: its kernel, its operands' layouts, the copies the kernel makes of a
    transposed operand, and the caches the step leaves. The other ops pass through untimed (the mode slows them, so
    steps run under it are kept out of every other figure).

    Example::

        >>> timer = GemmTimer(torch.device("cpu"), phase=lambda: "over_arch")
        >>> with timer:
        ...     _ = torch.randn(8, 3) @ torch.randn(3, 5)
        >>> timer.flops["over_arch"], timer.seconds["over_arch"] > 0
        (240, True)
    """

    def __init__(self, device: torch.device, phase: Callable[[], str] = lambda: "other") -> None:
        super().__init__()
        self._device = device
        self._phase = phase
        self.seconds: "collections.Counter[str]" = collections.Counter()
        self.flops: "collections.Counter[str]" = collections.Counter()

    def phase_of(self, phase: Callable[[], str]) -> None:
        """Charges the following GEMMs to the phase ``phase()`` names at each call."""
        self._phase = phase

    def _run_gemm(self, shape: GemmShape, call: Callable[[], Any]) -> Any:
        phase = self._phase()
        seconds, out = timed_call(call, self._device)
        self.seconds[phase] += seconds
        self.flops[phase] += shape.flops
        return out


def gemm_backends(dtype: torch.dtype, device: torch.device) -> Tuple[str, ...]:
    """The GEMM kernels torch offers for ``dtype`` on ``device``: ``addmm`` (``torch.mm``) everywhere, ``onednn``
    (oneDNN's linear, :func:`~multiembed.models.cpu_fastpath.working_onednn_linear`) on CPU where it works for
    ``dtype``, whether or not the CPU fast path chose it."""
    if device.type == "cpu" and cpu_fastpath.working_onednn_linear(dtype) is not None:
        return ("addmm", "onednn")
    return ("addmm",)


def _operand(rows: int, cols: int, transposed: bool, batch: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A random ``[batch, rows, cols]`` (``[rows, cols]`` for batch 0) operand in the given layout."""
    lead = (batch,) if batch else ()
    if transposed:
        return torch.randn(*lead, cols, rows, device=device).to(dtype).transpose(-2, -1)
    return torch.randn(*lead, rows, cols, device=device).to(dtype)


def gemm_call(shape: GemmShape, backend: str, device: torch.device) -> Callable[[], Any]:
    """One call of ``shape`` on ``backend`` (``addmm``, ``onednn`` or ``bmm``) on fresh random operands."""
    dtype = getattr(torch, shape.dtype)
    if backend == "bmm":
        a = _operand(shape.m, shape.k, shape.a_transposed, shape.batch, dtype, device)
        b = _operand(shape.k, shape.n, shape.b_transposed, shape.batch, dtype, device)
        return lambda: torch.bmm(a, b)
    if backend == "onednn":
        op = cpu_fastpath.working_onednn_linear(dtype)
        if op is None:
            raise ValueError(f"oneDNN's linear does not work for {shape.dtype} here")
        x = _operand(shape.m, shape.k, shape.a_transposed, 0, dtype, device).contiguous()
        weight = _operand(shape.n, shape.k, False, 0, dtype, device)
        return lambda: op(x, weight, None, "none", [], "")
    if backend != "addmm":
        raise ValueError(f"unknown GEMM backend {backend!r}")
    a = _operand(shape.m, shape.k, shape.a_transposed, 0, dtype, device)
    b = _operand(shape.k, shape.n, shape.b_transposed, 0, dtype, device)
    return lambda: torch.mm(a, b)


def timed_signature(shape: GemmShape, backend: str) -> GemmShape:
    """What ``backend`` times for a GEMM of the step: the batched call on ``bmm``, one product elsewhere (oneDNN's
    linear reads its input row-major and its weight as ``[n, k]``, whatever the step's layouts)."""
    if backend == "bmm":
        return shape
    if backend == "onednn":
        return dataclasses.replace(shape, batch=1, a_transposed=False, b_transposed=True)
    return shape.single()


@dataclasses.dataclass
class YardstickRow:
    """One timed GEMM of the yardstick: a shape on one backend, its calls per round and every call's seconds."""

    shape: GemmShape
    backend: str
    source: str
    call: Callable[[], Any]
    calls_per_round: int
    seconds: List[float] = dataclasses.field(default_factory=list)

    @property
    def flops(self) -> int:
        return self.shape.flops

    def summary(self, calls_in_step: int) -> Dict[str, Any]:
        best = min(self.seconds)
        return {
            **self.shape.as_dict(), "backend": self.backend, "source": self.source, "flops": self.flops,
            "calls_in_step": calls_in_step, "timed_calls": len(self.seconds), "best_ms": best * 1e3,
            "gflops": self.flops / best / 1e9,
        }


class GemmYardstick:
    """The step's GEMMs and a square GEMM on every backend, timed a round at a time (:meth:`run_round`).

    Args:
        step_gemms: the step's GEMM signatures and their calls per step (:class:`GemmRecorder`).
        precision: the step's compute precision (``fp32`` or ``bf16``): the dtypes timed
            (:data:`YARDSTICK_DTYPES`); each step shape is timed in each of them.
        device: where the GEMMs run.
        square: the square GEMM's size.

    Raises:
        ValueError: no GEMMs recorded, or an unknown precision.
    """

    def __init__(self, step_gemms: Mapping[GemmShape, int], precision: str, device: torch.device,
                 square: int = SQUARE_GEMM) -> None:
        if not step_gemms:
            raise ValueError("the step ran no GEMMs: nothing to measure its efficiency against")
        if precision not in YARDSTICK_DTYPES:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(YARDSTICK_DTYPES)}")
        self.device = device
        self.dtypes = YARDSTICK_DTYPES[precision]
        self.step_gemms = dict(step_gemms)
        self.backends = {dtype: gemm_backends(getattr(torch, dtype), device) for dtype in self.dtypes}
        self.rows: List[YardstickRow] = []
        seen = set()
        for dtype in self.dtypes:
            shapes = [(GemmShape(square, square, square, dtype=dtype), "square")]
            shapes += [(dataclasses.replace(shape, dtype=dtype), "step") for shape in self.step_gemms]
            for shape, source in shapes:
                if shape.flops == 0:
                    continue  # an empty product: nothing to time
                backends = self.backends[dtype] + (("bmm",) if shape.batch > 1 else ())
                for backend in backends:
                    timed_shape = timed_signature(shape, backend)
                    if (timed_shape, backend) in seen:
                        continue
                    seen.add((timed_shape, backend))
                    flops = timed_shape.flops
                    calls = max(1, min(MAX_CALLS_PER_ROUND, math.ceil(ROUND_FLOPS / flops)))
                    row = YardstickRow(timed_shape, backend, source, gemm_call(timed_shape, backend, device), calls)
                    row.call()  # warm-up, untimed
                    self.rows.append(row)
        self._rows_by_signature = {(row.shape, row.backend): row for row in self.rows}

    def run_round(self) -> float:
        """Times every row's calls once more (each call alone); returns the round's seconds."""
        total = 0.0
        for row in self.rows:
            for _ in range(row.calls_per_round):
                seconds = timed(row.call, self.device)
                row.seconds.append(seconds)
                total += seconds
        return total

    def best_call_ms(self, shape: GemmShape) -> float:
        """The fastest this run timed one call of the step's GEMM ``shape``: the best over every yardstick dtype and
        backend (a batched call as ``batch`` single products where the backend times those).

        Raises:
            RuntimeError: no round has run, or ``shape`` is not one of the step's GEMMs.
        """
        rows = self._rows_by_signature
        best = math.inf
        for dtype in self.dtypes:
            candidate = dataclasses.replace(shape, dtype=dtype)
            for backend in (*self.backends[dtype], "bmm"):
                row = rows.get((timed_signature(candidate, backend), backend))
                if row is None or not row.seconds:
                    continue
                per_call = min(row.seconds) * (1 if backend == "bmm" else shape.batch)
                best = min(best, per_call)
        if not math.isfinite(best):
            raise RuntimeError(f"the GEMM yardstick did not time {shape}")
        return best * 1e3

    def step_best_ms(self) -> float:
        """The step's GEMMs, each call at :meth:`best_call_ms` (ms per step)."""
        return sum(calls * self.best_call_ms(shape) for shape, calls in self.step_gemms.items())

    def result(self) -> Dict[str, Any]:
        """The limit (``gflops``: the highest rate of any row, each row at its best call) and every row.

        Raises:
            RuntimeError: no round has run.
        """
        if not all(row.seconds for row in self.rows):
            raise RuntimeError("the GEMM yardstick has not run a round")
        calls: Dict[Tuple[GemmShape, str], int] = collections.Counter()
        for shape, count in self.step_gemms.items():
            for dtype in self.dtypes:
                for backend in (*self.backends[dtype], "bmm"):
                    calls[(timed_signature(dataclasses.replace(shape, dtype=dtype), backend), backend)] += count
        rows = [row.summary(calls.get((row.shape, row.backend), 0)) for row in self.rows]
        best = max(rows, key=lambda row: row["gflops"])
        return {
            "gflops": best["gflops"],
            "best": best,
            "dtypes": list(self.dtypes),
            "backends": {dtype: list(backends) for dtype, backends in self.backends.items()},
            "rows": rows,
            "method": (
                "the highest GEMM rate measured in this run: every GEMM signature one real training step ran "
                "(recorded by a TorchDispatchMode, operand layouts kept) and a square "
                f"[{SQUARE_GEMM}]^3 GEMM, in {' and '.join(self.dtypes)}, on every kernel torch offers here "
                "(addmm; oneDNN's linear where it works; bmm for batched calls), each timed call by call in every "
                "throughput round and taken at its fastest call"
            ),
        }


def check_gemm_limit(limit: Mapping[str, Any], step_gemms: Iterable[Mapping[str, Any]]) -> None:
    """Refuses a yardstick that could flatter the step.

    Args:
        limit: :meth:`GemmYardstick.result`.
        step_gemms: the step's GEMM signatures (:meth:`GemmShape.as_dict` items, ``calls`` optional).

    Raises:
        ValueError: the limit is below a measured rate, or a GEMM the step runs (or the square GEMM) was not timed in
            every yardstick dtype on every backend.
    """
    rows = limit["rows"]
    for row in rows:
        if row["gflops"] > limit["gflops"]:
            raise ValueError(
                f"GEMM limit {limit['gflops']:.1f} GFLOP/s is below the measured {row['backend']} {row['dtype']} "
                f"[{row['m']}, {row['k']}] x [{row['k']}, {row['n']}] at {row['gflops']:.1f} GFLOP/s"
            )
    timed_rows = {(row["m"], row["k"], row["n"], row["dtype"], row["backend"]) for row in rows}
    wanted = [(SQUARE_GEMM, SQUARE_GEMM, SQUARE_GEMM)]
    wanted += [(int(g["m"]), int(g["k"]), int(g["n"])) for g in step_gemms if g["m"] * g["k"] * g["n"] > 0]
    for dtype in limit["dtypes"]:
        for backend in limit["backends"][dtype]:
            for m, k, n in wanted:
                if (m, k, n, dtype, backend) not in timed_rows:
                    raise ValueError(f"GEMM limit: [{m}, {k}] x [{k}, {n}] in {dtype} on {backend} was not timed")


def step_gemm_flops(step_gemms: Mapping[GemmShape, int]) -> int:
    """FLOPs of the GEMMs one step executed (padded widths included), from :class:`GemmRecorder`'s counts."""
    return sum(shape.flops * calls for shape, calls in step_gemms.items())


def ceiling(flops: float, limit_gflops: float, non_gemm_ms: float, step_ms: float) -> Dict[str, float]:
    """The step's ceiling: its GEMM FLOPs at the limit's rate plus its non-GEMM work at its best.

    Args:
        flops: the step's analytic GEMM FLOPs (per rank).
        limit_gflops: the GEMM limit (GFLOP/s).
        non_gemm_ms: the step's measured non-GEMM work at its best (ms).
        step_ms: the measured step (ms).

    Returns:
        ``gemm_ms``, ``non_gemm_ms``, ``ms`` (their sum) and ``step_share`` (``ms / step_ms``: the step's speed as a
        share of the ceiling's).

    Example::

        >>> ceiling(2e9, 100.0, 5.0, 50.0)["step_share"]
        0.5
    """
    if limit_gflops <= 0 or step_ms <= 0:
        raise ValueError(f"the GEMM limit and the step time must be positive, got {limit_gflops}, {step_ms}")
    gemm_ms = flops / (limit_gflops * 1e9) * 1e3
    total = gemm_ms + non_gemm_ms
    return {"gemm_ms": gemm_ms, "non_gemm_ms": non_gemm_ms, "ms": total, "step_share": total / step_ms}


# The phases whose GEMMs belong to the dense arches (their non-GEMM time is the dense element-wise work).
DENSE_PHASES: Tuple[str, ...] = ("interaction_fwd", "interaction_bwd", "over_arch")


def step_limits(breakdown_ms: Mapping[str, float], gemm_ms: Mapping[str, float], gemm_flops: Mapping[str, float],
                useful_flops: float, executed_flops: float, step_best_ms: float, limit_gflops: float,
                step_ms: float) -> Dict[str, Any]:
    """Where a step's time goes between the GEMM limit and the measured step, term by term and phase by phase.

    The step's time is split into: its useful (analytic) GEMM FLOPs at the limit; the padded widths' extra FLOPs at
    the limit; the loss of the step's GEMM shapes (each GEMM at the best this run timed for its shape, minus all of
    them at the limit); the loss inside the step (its GEMMs as it ran them, minus each at its best: operand layouts,
    the kernels' copies of transposed operands, caches); the dense arches' non-GEMM work (element-wise passes, layout
    copies, autograd); and the phases that run no GEMMs (lookups, fused table update, optimizer, communication,
    loader) and ``other``. The terms add up to the instrumented step.

    Args:
        breakdown_ms: ms per phase of the instrumented steps (:func:`~bench_train_phases.summarize`'s ``ms``).
        gemm_ms: ms per step of the GEMMs charged to each phase, as the step ran them (:class:`GemmTimer`).
        gemm_flops: FLOPs per step charged to each phase (:class:`GemmTimer`).
        useful_flops: the step's analytic GEMM FLOPs.
        executed_flops: the FLOPs of the GEMMs the step executed (padded widths included).
        step_best_ms: the step's GEMMs each at its best timed call (:meth:`GemmYardstick.step_best_ms`).
        limit_gflops: the GEMM limit.
        step_ms: the uninstrumented step's median (ms).

    Returns:
        ``terms_ms`` (the split above), ``sum_ms``, ``sum_vs_step``, ``phases`` (per phase: ``ms``, ``gemm_ms``,
        ``gemm_gflop``, ``gemm_gflops``, ``non_gemm_ms``), ``gemm_in_step_gflops`` (the step's GEMM rate as it ran
        them) and ``share_without_dense_non_gemm`` (the step's share of the GEMM limit if the dense arches' non-GEMM
        work took no time, everything else as measured).

    Example::

        >>> limits = step_limits({"interaction_fwd": 6.0, "lookup_fwd": 2.0}, {"interaction_fwd": 4.0},
        ...                      {"interaction_fwd": 3e9}, useful_flops=2e9, executed_flops=3e9, step_best_ms=3.5,
        ...                      limit_gflops=1000.0, step_ms=8.0)
        >>> {name: round(ms, 3) for name, ms in limits["terms_ms"].items()}  # doctest: +NORMALIZE_WHITESPACE
        {'gemm_useful_at_limit': 2.0, 'gemm_padding': 1.0, 'gemm_shapes': 0.5, 'gemm_in_step': 0.5,
         'dense_non_gemm': 2.0, 'non_gemm_phases': 2.0}
        >>> limits["sum_ms"], limits["share_without_dense_non_gemm"]
        (8.0, 0.3333333333333333)
    """
    if limit_gflops <= 0 or step_ms <= 0:
        raise ValueError(f"the GEMM limit and the step time must be positive, got {limit_gflops}, {step_ms}")
    unknown = sorted(set(gemm_ms) - set(breakdown_ms))
    if unknown:
        raise ValueError(f"GEMM time charged to phases the breakdown lacks: {', '.join(unknown)}")
    at_limit = 1e3 / (limit_gflops * 1e9)
    phases: Dict[str, Dict[str, float]] = {}
    for phase, ms in breakdown_ms.items():
        in_phase = float(gemm_ms.get(phase, 0.0))
        flops = float(gemm_flops.get(phase, 0.0))
        phases[phase] = {
            "ms": ms, "gemm_ms": in_phase, "gemm_gflop": flops / 1e9,
            "gemm_gflops": flops / in_phase / 1e6 if in_phase > 0 else 0.0, "non_gemm_ms": ms - in_phase,
        }
    gemm_in_step = sum(phase["gemm_ms"] for phase in phases.values())
    dense = sum(phases[phase]["non_gemm_ms"] for phase in DENSE_PHASES if phase in phases)
    terms = {
        "gemm_useful_at_limit": useful_flops * at_limit,
        "gemm_padding": (executed_flops - useful_flops) * at_limit,
        "gemm_shapes": step_best_ms - executed_flops * at_limit,
        "gemm_in_step": gemm_in_step - step_best_ms,
        "dense_non_gemm": dense,
        "non_gemm_phases": sum(phase["non_gemm_ms"] for name, phase in phases.items() if name not in DENSE_PHASES),
    }
    total = sum(terms.values())
    gemm_flops_total = sum(float(flops) for flops in gemm_flops.values())
    return {
        "terms_ms": terms,
        "sum_ms": total,
        "sum_vs_step": total / step_ms,
        "phases": phases,
        "gemm_in_step_gflops": gemm_flops_total / gemm_in_step / 1e6 if gemm_in_step > 0 else 0.0,
        "share_without_dense_non_gemm": terms["gemm_useful_at_limit"] / (total - dense),
    }


def record_step_gemms(run_one_step: Callable[[], Any]) -> Dict[GemmShape, int]:
    """The GEMM signatures and calls of one step (``run_one_step`` trains exactly one)."""
    with GemmRecorder() as recorder:
        run_one_step()
    return dict(recorder.gemms)


def step_gemm_rows(step_gemms: Mapping[GemmShape, int]) -> List[Dict[str, Any]]:
    """The step's GEMMs as JSON rows (signature and ``calls`` per step), most FLOPs first."""
    rows = [{**shape.as_dict(), "calls": calls, "flops": shape.flops * calls} for shape, calls in step_gemms.items()]
    return sorted(rows, key=lambda row: -row["flops"])


__all__ = [
    "DENSE_PHASES", "GemmRecorder", "GemmShape", "GemmTimer", "GemmYardstick", "SQUARE_GEMM", "ceiling",
    "check_gemm_limit", "gemm_backends", "gemm_call", "record_step_gemms", "step_gemm_flops", "step_gemm_rows",
    "step_limits",
]

