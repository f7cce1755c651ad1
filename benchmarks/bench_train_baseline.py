"""The plain-PyTorch contenders (the paper's code and the savvy rewrite, eager and compiled,
:mod:`multiembed.benchmarks.paper_baseline`), each trained in a process of its own driven over a pipe."""

from __future__ import annotations

import dataclasses
import math
import socket
import subprocess
import sys
import traceback
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from multiembed.benchmarks import paper_baseline
from multiembed.benchmarks.bench_train_phases import PhaseClock, arch_hooks, module_hooks, patched
from multiembed.benchmarks.bench_train_timing import page_faults, peak_rss_bytes, timed
from multiembed.benchmarks.bench_train_workload import BASELINE_KINDS, BenchBatch, make_batches
from multiembed.models import parse_model_name
from multiembed.runtime.malloc import apply_malloc_mode


class BaselineRunner:
    """A plain-PyTorch ME-DCNv2 (:mod:`paper_baseline`): ``paper`` (dense tables, one dense Adam over everything, the
    paper's code), ``savvy`` (sparse-gradient tables + a sparse table optimizer, fused dense Adam) or
    ``savvy_compiled`` (the savvy step with its dense part under ``torch.compile``).

    Args:
        model_name: a ``dcnv2-me-*`` / ``dcnv2-se-*`` zoo name (K and d are read from it).
        vocab_sizes: ``{field: rows}``.
        device: where the model runs.
        hidden, dropout: as the project model.
        seed: initialisation seed.
        kind: one of :data:`BASELINE_KINDS`.
        table_optimizer, table_lr, lr, weight_decay: the savvy kinds' table optimizer
            (:data:`~multiembed.benchmarks.paper_baseline.SAVVY_TABLE_OPTIMIZERS`) and learning rates (the package
            run's, so that both train alike); the paper's code keeps its own Adam (lr 1e-3, weight decay 1e-6).

    Raises:
        ValueError: an unknown kind or table optimizer.
    """

    def __init__(
        self, model_name: str, vocab_sizes: Mapping[str, int], device: torch.device, hidden: int = 400,
        dropout: float = 0.2, seed: int = 0, kind: str = "paper", table_optimizer: str = "adam",
        table_lr: float = 1e-3, lr: float = 1e-3, weight_decay: float = 1e-6,
    ) -> None:
        if kind not in BASELINE_KINDS:
            raise ValueError(f"unknown baseline kind {kind!r}; expected one of {', '.join(BASELINE_KINDS)}")
        spec = parse_model_name(model_name)
        torch.manual_seed(seed)
        self.device = device
        self.kind = kind
        savvy = kind != "paper"
        self.model = paper_baseline.PaperMultiDCNv2(
            list(vocab_sizes.values()), spec.num_sets, spec.set_dim, hidden=hidden, dropout=dropout, sparse=savvy,
        ).to(device)
        if savvy:
            self.step: paper_baseline.PaperTrainStep = paper_baseline.SavvyTrainStep(
                self.model, lr=lr, weight_decay=weight_decay, table_optimizer=table_optimizer, table_lr=table_lr,
                compile=kind == "savvy_compiled",
            )
        else:
            self.step = paper_baseline.PaperTrainStep(self.model)

    def run(self, batches: Sequence[BenchBatch], steps: int, offset: int = 0,
            phases: Optional[List[Dict[str, float]]] = None) -> float:
        """Trains ``steps`` steps (batches ``offset``, ``offset + 1``, ...); returns the wall seconds. With
        ``phases`` (not for ``savvy_compiled``: hooks inside a compiled region recompile it), each step is timed
        phase by phase (:mod:`bench_train_phases`) and its seconds per phase appended there."""
        clock = PhaseClock(self.device)

        def train() -> None:
            loss = math.nan
            for i in range(steps):
                bench = batches[(offset + i) % len(batches)]
                if phases is not None:
                    clock.start()
                loss = self.step(bench.ids, bench.batch.labels)
                if phases is not None:
                    phases.append(clock.stop())
            if not math.isfinite(loss):
                raise RuntimeError("the baseline's loss is not finite")

        if phases is None:
            return timed(train, self.device)
        if self.kind == "savvy_compiled":
            raise ValueError("the compiled baseline is not timed phase by phase (hooks would recompile it)")
        model = self.model
        hooks = [arch_hooks(clock, e, "lookup_fwd", "other", "lookup_bwd") for e in model.embeddings]
        hooks += [arch_hooks(clock, cn, "interaction_fwd", "over_arch", "interaction_bwd") for cn in model.cns]
        with module_hooks(hooks), patched(self.step, {"step_optimizers": "optimizer"}, clock), \
                patched(model, {"zero_grad": "optimizer"}, clock):
            return timed(train, self.device)

    def byte_counts(self) -> Dict[str, int]:
        model = self.model
        return {
            "embedding_param_bytes": sum(p.numel() * p.element_size() for p in model.embeddings.parameters()),
            "dense_param_bytes": sum(
                p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embeddings.")
            ),
            "optimizer_state_bytes": self.step.optimizer_state_bytes(),
        }


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """What a baseline process needs to build the baseline and the same batches as the harness (picklable).

    Attributes:
        model_name: a ``dcnv2-me-*`` / ``dcnv2-se-*`` zoo name.
        vocab_sizes: ``{field: rows}``.
        batch_size, batch_pool, seed, id_exponent: as :func:`make_batches` (the harness's own arguments).
        device: ``cpu`` or ``cuda:N``.
        hidden, dropout, model_seed: as :class:`BaselineRunner`.
        threads: torch intra-op threads (the harness's count).
        malloc: one of :data:`~multiembed.runtime.malloc.MALLOC_MODES` (:func:`apply_malloc_mode`).
        kind: one of :data:`BASELINE_KINDS` (:class:`BaselineRunner`).
        table_optimizer, table_lr, lr, weight_decay: the savvy kinds' optimizers (:class:`BaselineRunner`).
    """

    model_name: str
    vocab_sizes: Dict[str, int]
    batch_size: int
    batch_pool: int
    seed: int
    id_exponent: float
    device: str
    hidden: int
    dropout: float
    model_seed: int
    threads: int
    malloc: str
    kind: str = "paper"
    table_optimizer: str = "adam"
    table_lr: float = 1e-3
    lr: float = 1e-3
    weight_decay: float = 1e-6


def serve_baseline(fd: int) -> None:
    """Body of a baseline process: reads a :class:`BaselineSpec` and then commands from the socket ``fd``, answers each.

    Commands (tuples): ``("run", steps, offset)`` -> ``(seconds, minor page faults)``; ``("phases", steps,
    offset)`` -> seconds per phase of each step (:meth:`BaselineRunner.run`); ``("bytes",)`` -> :meth:`BaselineRunner.byte_counts`; ``("peak_rss",)`` -> bytes; ``("stop",)``.
    A failure is answered with ``("error", traceback text)`` and ends the process.
    """
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        spec: BaselineSpec = conn.recv()
        apply_malloc_mode(spec.malloc)
        torch.set_num_threads(spec.threads)
        device = torch.device(spec.device)
        batches = make_batches(spec.vocab_sizes, spec.batch_size, spec.batch_pool, spec.seed, spec.id_exponent, device)
        runner = BaselineRunner(spec.model_name, spec.vocab_sizes, device, spec.hidden, spec.dropout, spec.model_seed,
                                spec.kind, spec.table_optimizer, spec.table_lr, spec.lr, spec.weight_decay)
        conn.send(("ready",))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "run":
                before = page_faults()
                seconds = runner.run(batches, command[1], command[2])
                conn.send(("ok", (seconds, page_faults() - before)))
            elif command[0] == "phases":
                steps: List[Dict[str, float]] = []
                runner.run(batches, command[1], command[2], phases=steps)
                conn.send(("ok", steps))
            elif command[0] == "bytes":
                conn.send(("ok", runner.byte_counts()))
            elif command[0] == "peak_rss":
                conn.send(("ok", peak_rss_bytes()))
            else:
                raise ValueError(f"unknown command {command!r}")
    except EOFError:
        pass  # the harness went away: nothing to answer
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise
    finally:
        conn.close()


class BaselineProcess:
    """:class:`BaselineRunner` in a child process of its own, driven over a socket (see the module docstring for why).

    The child builds the baseline and the same batches (same generator seed) itself, so only commands and numbers
    cross the pipe. Call :meth:`close` when done (``run_benchmark`` does, also on errors).

    Args:
        spec: the baseline and batches to build.

    Raises:
        RuntimeError: the child failed (its traceback is in the message) or exited.
    """

    def __init__(self, spec: BaselineSpec) -> None:
        from multiprocessing.connection import Connection

        parent, child = socket.socketpair()
        code = (
            "import sys; from multiembed.benchmarks.bench_train_baseline import serve_baseline; "
            "serve_baseline(int(sys.argv[1]))"
        )
        self._process = subprocess.Popen([sys.executable, "-c", code, str(child.fileno())], pass_fds=(child.fileno(),))
        child.close()
        self._conn = Connection(parent.detach())
        self.page_faults = 0
        self._conn.send(spec)
        self._receive()

    def _receive(self) -> Any:
        try:
            reply = self._conn.recv()
        except EOFError:
            code = self._process.wait()
            raise RuntimeError(f"the baseline process exited (code {code}) without answering") from None
        if reply[0] == "error":
            self._process.wait()
            raise RuntimeError(f"the baseline process failed:\n{reply[1]}")
        return reply[1] if len(reply) > 1 else None

    def _call(self, *command: Any) -> Any:
        self._conn.send(command)
        return self._receive()

    def run(self, steps: int, offset: int = 0) -> float:
        """Trains ``steps`` baseline steps (batches ``offset``, ``offset + 1``, ...); returns the wall seconds."""
        seconds, faults = self._call("run", steps, offset)
        self.page_faults += faults
        return seconds

    def phases(self, steps: int, offset: int = 0) -> List[Dict[str, float]]:
        """Trains ``steps`` steps timed phase by phase; seconds per phase of each (:meth:`BaselineRunner.run`)."""
        return self._call("phases", steps, offset)

    def byte_counts(self) -> Dict[str, int]:
        return self._call("bytes")

    def peak_rss_bytes(self) -> int:
        """Peak resident set size of the baseline process."""
        return self._call("peak_rss")

    def close(self) -> None:
        """Stops the child (idempotent)."""
        if self._process.poll() is None:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._conn.close()
