"""The plain-PyTorch contenders (the paper's code and the savvy rewrite, :mod:`multiembed.benchmarks.paper_baseline`),
each trained in a process of its own driven over a pipe."""

from __future__ import annotations

import dataclasses
import math
import socket
import statistics
import subprocess
import sys
import traceback
from typing import Any, Dict, List, Mapping, Sequence

import torch
import torch.nn.functional as F

from multiembed.benchmarks import paper_baseline
from multiembed.benchmarks.bench_train_timing import median_time, page_faults, peak_rss_bytes, timed
from multiembed.benchmarks.bench_train_workload import BASELINE_KINDS, BenchBatch, make_batches
from multiembed.models import parse_model_name
from multiembed.runtime.malloc import retain_freed_memory


class BaselineRunner:
    """A plain-PyTorch ME-DCNv2 (:mod:`paper_baseline`): ``paper`` (dense tables, one dense Adam over everything, the
    paper's code) or ``savvy`` (sparse-gradient tables + ``SparseAdam``, fused dense Adam).

    Args:
        model_name: a ``dcnv2-me-*`` / ``dcnv2-se-*`` zoo name (K and d are read from it).
        vocab_sizes: ``{field: rows}``.
        device: where the model runs.
        hidden, dropout: as the project model.
        seed: initialisation seed.
        kind: ``paper`` or ``savvy`` (:data:`BASELINE_KINDS`).
    """

    def __init__(
        self, model_name: str, vocab_sizes: Mapping[str, int], device: torch.device, hidden: int = 400,
        dropout: float = 0.2, seed: int = 0, kind: str = "paper",
    ) -> None:
        if kind not in BASELINE_KINDS:
            raise ValueError(f"unknown baseline kind {kind!r}; expected one of {', '.join(BASELINE_KINDS)}")
        spec = parse_model_name(model_name)
        torch.manual_seed(seed)
        self.device = device
        self.kind = kind
        self.model = paper_baseline.PaperMultiDCNv2(
            list(vocab_sizes.values()), spec.num_sets, spec.set_dim, hidden=hidden, dropout=dropout,
            sparse=kind == "savvy",
        ).to(device)
        self.step = (paper_baseline.SavvyTrainStep if kind == "savvy" else paper_baseline.PaperTrainStep)(self.model)

    def run(self, batches: Sequence[BenchBatch], steps: int, offset: int = 0) -> float:
        def train() -> None:
            for i in range(steps):
                bench = batches[(offset + i) % len(batches)]
                loss = self.step(bench.ids, bench.batch.labels)
            if not math.isfinite(loss):
                raise RuntimeError("the baseline's loss is not finite")

        return timed(train, self.device)

    def breakdown(self, bench_batch: BenchBatch, reps: int) -> Dict[str, float]:
        """Median milliseconds of the baseline's sub-steps (same parts as the project's; no input dist)."""
        device, model, ids, labels = self.device, self.model, bench_batch.ids, bench_batch.batch.labels
        model.train()
        times: Dict[str, float] = {}
        lookups: List[torch.Tensor] = []
        times["embedding_fwd"] = median_time(
            lambda: lookups.__setitem__(slice(None), [e(ids).view(-1, model.input_dim) for e in model.embeddings]),
            device, reps,
        )
        backward_times = []
        for _ in range(reps):
            model.zero_grad()
            outs = [e(ids) for e in model.embeddings]
            backward_times.append(timed(lambda: torch.autograd.backward(outs, [torch.ones_like(o) for o in outs]),
                                         device))
        times["embedding_bwd"] = statistics.median(backward_times)
        leaves = [x.detach().requires_grad_() for x in lookups]
        forward_times, backward_times = [], []
        for _ in range(reps):
            box: List[torch.Tensor] = []
            forward_times.append(timed(lambda: box.append(torch.stack([cn(x) for cn, x in zip(model.cns, leaves)],
                                                                       dim=-1)), device))
            out = box[0]
            backward_times.append(timed(lambda: out.backward(torch.ones_like(out)), device))
        times["interaction_fwd"] = statistics.median(forward_times)
        times["interaction_bwd"] = statistics.median(backward_times)
        stacked = out.detach().requires_grad_()

        def over_step() -> None:
            F.binary_cross_entropy_with_logits(model.mlp(stacked.mean(dim=-1)).squeeze(1), labels).backward()

        times["over_arch"] = median_time(over_step, device, reps)
        optimizer_times = []
        for _ in range(reps):
            model.zero_grad()
            F.binary_cross_entropy_with_logits(model(ids), labels).backward()
            optimizer_times.append(timed(self.step.step_optimizers, device))
        times["optimizer"] = statistics.median(optimizer_times)
        model.zero_grad()
        return {key: value * 1e3 for key, value in times.items()}

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
        malloc: ``default`` or ``retain`` (:func:`retain_freed_memory`).
        kind: ``paper`` or ``savvy`` (:class:`BaselineRunner`).
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


def serve_baseline(fd: int) -> None:
    """Body of a baseline process: reads a :class:`BaselineSpec` and then commands from the socket ``fd``, answers each.

    Commands (tuples): ``("run", steps, offset)`` -> ``(seconds, minor page faults)``; ``("breakdown", reps)`` ->
    ms per part; ``("bytes",)`` -> :meth:`BaselineRunner.byte_counts`; ``("peak_rss",)`` -> bytes; ``("stop",)``.
    A failure is answered with ``("error", traceback text)`` and ends the process.
    """
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        spec: BaselineSpec = conn.recv()
        if spec.malloc == "retain":
            retain_freed_memory()
        torch.set_num_threads(spec.threads)
        device = torch.device(spec.device)
        batches = make_batches(spec.vocab_sizes, spec.batch_size, spec.batch_pool, spec.seed, spec.id_exponent, device)
        runner = BaselineRunner(spec.model_name, spec.vocab_sizes, device, spec.hidden, spec.dropout, spec.model_seed,
                                spec.kind)
        conn.send(("ready",))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "run":
                before = page_faults()
                seconds = runner.run(batches, command[1], command[2])
                conn.send(("ok", (seconds, page_faults() - before)))
            elif command[0] == "breakdown":
                conn.send(("ok", runner.breakdown(batches[0], command[1])))
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

    def breakdown(self, reps: int) -> Dict[str, float]:
        """:meth:`BaselineRunner.breakdown` on the first batch."""
        return self._call("breakdown", reps)

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
