"""The step-time breakdown, measured inside real training steps.

A :class:`PhaseClock` charges the wall time of a step to one phase at a time: hooks switch the current phase at the
step's boundaries (module forward hooks, gradient hooks, wrapped pipeline and optimizer methods), and whatever no
hook claims is ``other``. The phases of a step therefore add up to its wall time, each moment counted once; work that
the autograd engine interleaves with another phase counts in the phase it interrupts.

Phases (:data:`PHASES`):
    ``loader``: fetching the next batches and copying them to the device (the pipeline's ``enqueue_batch`` and
    ``_wait_for_batch``); ``lookup_fwd``: the sparse arch's forward (the lookup and, in a sharded model, its output
    distribution); ``interaction_fwd``: the set interaction arch's forward; ``over_arch``: from the set arch's output
    to the loss (mean over sets, over arch, loss), then the backward down to the set arch's output;
    ``interaction_bwd``: the set arch's backward; ``lookup_bwd``: the sparse arch's backward, which runs the fused
    optimizer's row updates; ``optimizer``: ``zero_grad`` and the optimizer step (dense; the baselines' table
    optimizer too); ``communication``: the input distribution (the pipeline's ``start_sparse_data_dist`` and
    ``wait_sparse_data_dist``) and the rest of the backward after the lookup's (DDP's wait for the dense gradients'
    all-reduce); ``other``: the rest (pipeline bookkeeping, autograd overhead).

On a GPU each switch synchronises the device, which the timed throughput steps do not.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from multiembed.benchmarks.bench_train_timing import sync

PHASES: Tuple[str, ...] = (
    "loader", "lookup_fwd", "lookup_bwd", "interaction_fwd", "interaction_bwd", "over_arch", "optimizer",
    "communication", "other",
)
# The phases that run no GEMMs: the ceiling counts them at their best (bench_train_yardstick.ceiling).
NON_GEMM_PHASES: Tuple[str, ...] = ("loader", "lookup_fwd", "lookup_bwd", "optimizer", "communication")


class PhaseClock:
    """Wall time charged to one current phase at a time.

    Args:
        device: where the step runs (a GPU is synchronised at each switch).

    Example::

        >>> clock = PhaseClock(torch.device("cpu"))
        >>> clock.start()
        >>> previous = clock.switch("loader")
        >>> parts = clock.stop()
        >>> previous, sorted(parts) == sorted(PHASES), parts["lookup_fwd"]
        ('other', True, 0.0)
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current = "other"
        self._last: Optional[float] = None
        self._totals: Dict[str, float] = {}

    def start(self) -> None:
        """Starts a step in phase ``other``."""
        sync(self.device)
        self._totals = dict.fromkeys(PHASES, 0.0)
        self.current = "other"
        self._last = time.perf_counter()

    def switch(self, phase: str) -> str:
        """Charges the time since the last switch to the current phase, makes ``phase`` current; returns the
        previous phase. Does nothing (returns ``phase``) outside a step."""
        if self._last is None:
            return phase
        sync(self.device)
        now = time.perf_counter()
        self._totals[self.current] += now - self._last
        self._last = now
        previous, self.current = self.current, phase
        return previous

    def stop(self) -> Dict[str, float]:
        """Ends the step; returns seconds per phase (they add up to the step's wall time)."""
        self.switch("other")
        self._last = None
        return dict(self._totals)

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        """``fn`` charged to ``phase`` (the phase current before the call is current again after it)."""

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            previous = self.switch(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch(previous)

        return wrapped

    def on_grad(self, tensor: torch.Tensor, phase: str) -> None:
        """Switches to ``phase`` when the backward reaches ``tensor`` (just before its producer's backward runs)."""
        if not tensor.requires_grad:
            return

        def hook(_: torch.Tensor) -> None:
            self.switch(phase)

        tensor.register_hook(hook)

    def after_graph(self, tensor: torch.Tensor, phase: str) -> None:
        """Switches to ``phase`` once every backward node ``tensor`` depends on has run (the end of its branch)."""
        if tensor.grad_fn is None:
            return
        nodes: List[Any] = []
        seen = set()
        stack = [tensor.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            nodes.append(node)
            stack.extend(child for child, _ in node.next_functions)
        pending = [len(nodes)]

        def done(*_: Any) -> None:
            pending[0] -= 1
            if pending[0] == 0:
                self.switch(phase)

        for node in nodes:
            node.register_hook(done)


class StepTimer:
    """A context manager around one pipeline step: starts ``clock`` on entry; on a normal exit appends the step's
    seconds per phase to ``sink`` (a step left with an exception, e.g. the pipeline's ``StopIteration``, is not a
    step and is dropped)."""

    def __init__(self, clock: PhaseClock, sink: List[Dict[str, float]]) -> None:
        self.clock = clock
        self.sink = sink

    def __enter__(self) -> "StepTimer":
        self.clock.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        parts = self.clock.stop()
        if exc_type is None:
            self.sink.append(parts)


@contextlib.contextmanager
def patched(obj: Any, methods: Mapping[str, str], clock: PhaseClock) -> Iterator[None]:
    """``obj``'s methods named in ``methods`` charged to their phases (instance attributes) inside the block."""
    saved = {name: vars(obj)[name] for name in methods if name in vars(obj)}
    installed: List[str] = []
    try:
        for name, phase in methods.items():
            setattr(obj, name, clock.wrap(getattr(obj, name), phase))
            installed.append(name)
        yield
    finally:
        for name in installed:
            if name in saved:
                setattr(obj, name, saved[name])
            else:
                delattr(obj, name)


@contextlib.contextmanager
def module_hooks(hooks: Sequence[Tuple[nn.Module, Callable[..., Any], Callable[..., Any]]]) -> Iterator[None]:
    """Forward pre-hooks and hooks ``(module, pre_hook, hook)`` on the modules inside the block."""
    handles = []
    try:
        for module, pre_hook, hook in hooks:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def arch_hooks(clock: PhaseClock, module: nn.Module, forward_phase: str, after_phase: str, backward_phase: str,
               input_phase: Optional[str] = None) -> Tuple[nn.Module, Callable[..., Any], Callable[..., Any]]:
    """The hooks of one arch: ``forward_phase`` during its forward, ``after_phase`` after it; in backward,
    ``backward_phase`` from its output's gradient on, and ``input_phase`` (if given) from its input's gradient on."""

    def pre_hook(_: nn.Module, inputs: Tuple[Any, ...]) -> None:
        clock.switch(forward_phase)
        if input_phase is not None and inputs and isinstance(inputs[0], torch.Tensor):
            clock.on_grad(inputs[0], input_phase)

    def hook(_: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            clock.on_grad(output, backward_phase)
        clock.switch(after_phase)

    return module, pre_hook, hook


def summarize(steps: Sequence[Mapping[str, float]], step_ms: float) -> Dict[str, Any]:
    """The breakdown of instrumented steps against the uninstrumented step time.

    Args:
        steps: seconds per phase of each instrumented step (:meth:`PhaseClock.stop`).
        step_ms: the uninstrumented step's median (ms), from the throughput rounds.

    Returns:
        ``ms`` (mean ms per phase over the steps: they add up to ``step_ms_instrumented``), ``steps`` (how many),
        ``sum_vs_step`` (the sum over ``step_ms``), ``within_5_percent``, and ``non_gemm_best_ms`` (the smallest
        per-step sum of :data:`NON_GEMM_PHASES`).

    Raises:
        ValueError: no steps.
    """
    if not steps:
        raise ValueError("no instrumented steps to summarize")
    ms = {phase: 1e3 * sum(step[phase] for step in steps) / len(steps) for phase in PHASES}
    total = sum(ms.values())
    return {
        "ms": ms,
        "steps": len(steps),
        "step_ms_instrumented": total,
        "sum_vs_step": total / step_ms,
        "within_5_percent": abs(total / step_ms - 1.0) <= 0.05,
        "non_gemm_best_ms": 1e3 * min(sum(step[phase] for phase in NON_GEMM_PHASES) for step in steps),
    }
