"""A conversion shared by the ranks of a job: each node converts its share of the input files into one dataset.

``multiembed convert`` under ``torchrun`` (the torchx ``convert`` component: ``-j 24x1`` converts Criteo 1TB's 24 day
files on 24 nodes) builds a :class:`NodeGroup`, and :func:`multiembed.data.convert.convert` then runs its passes as
one job over a shared ``--out``:

1. rank 0 takes the output directory's lock and makes every decision that reads or changes shared state (the checks
   of ``--out``, clearing it under ``--overwrite``, which inputs are already complete), broadcasting the outcome;
2. scan: every rank scans its share of the inputs (input ``i`` belongs to rank ``i mod world``); the scans are
   gathered, so every rank assigns rows to splits from every file's row count;
3. paper mode: every rank counts its share's tokens and writes the sorted keys and counts to
   ``.state/counts-rank-NNNNN.npz``; rank 0 merges them one rank at a time (the same totals as one pass), saves
   ``vocab.npz`` and removes the count files; the other ranks load the saved vocabulary;
4. every rank encodes its share of the inputs still to convert (round-robin over them) with the same code as one
   process, writing each input's Parquet files and manifest; rank 0 writes ``metadata.json`` last, after every rank
   has finished.

The output is the same as one process's: an input's rows, splits and files depend only on the input, its index, the
counts and the vocabulary (test). Memory per rank is one conversion's (one input's chunks and row groups at a time);
rank 0 also holds the merged counts in paper mode.

Coordination uses ``torch.distributed`` over gloo (CPU; the collectives carry only scans, decisions and manifests):
every exchange also carries each rank's error, so a failure on one rank (``file:line: field: what``) is raised on
every rank instead of leaving the others waiting; the lowest rank's error wins. The process group's timeout is long
(:data:`COLLECTIVE_TIMEOUT`) because ranks wait for each other across whole-file passes.
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, TypeVar

import numpy as np
import pyarrow as pa
import torch.distributed as dist

from multiembed.data.convert.count import count_tokens
from multiembed.data.convert.options import ResolvedOptions
from multiembed.data.convert.outputs import STATE_DIR, OutputError
from multiembed.data.convert.run import Coordinator
from multiembed.data.convert.stream import progress_bar
from multiembed.data.convert.write import convert_input
from multiembed.data.formats import PAPER_MODE, RawFormat
from multiembed.data.metadata import DatasetError, atomic_write
from multiembed.data.rawlog import InputError, SourceScan, scan_source
from multiembed.data.splits import SplitCounts
from multiembed.data.vocab import CountedVocabulary, Vocabulary, VocabularyCounter
from multiembed.runtime.locking import LockHeldError, exclusive_lock

_T = TypeVar("_T")

# Ranks wait for each other across whole passes over day-sized files.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)

# Errors re-raised on every rank as the same class (with the failing rank's message); anything else as RuntimeError.
_KNOWN_ERRORS: Tuple[Type[BaseException], ...] = (
    InputError, OutputError, DatasetError, LockHeldError, ValueError, FileNotFoundError, PermissionError, OSError,
)


def _portable(error: BaseException) -> Tuple[str, str]:
    """An error as (class name, message): what every rank can rebuild, whatever the exception's constructor."""
    for cls in _KNOWN_ERRORS:
        if isinstance(error, cls):
            return cls.__name__, str(error)
    return "RuntimeError", f"{type(error).__name__}: {error}"


def _rebuilt(portable: Tuple[str, str]) -> BaseException:
    name, message = portable
    classes = {cls.__name__: cls for cls in _KNOWN_ERRORS}
    return classes.get(name, RuntimeError)(message)


def init_node_group() -> "NodeGroup":
    """The job's :class:`NodeGroup` from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...),
    over gloo with :data:`COLLECTIVE_TIMEOUT`."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return NodeGroup()


class NodeGroup(Coordinator):
    """The ranks of a job converting one dataset together (see the module docstring).

    Args:
        group: the process group (default: the default group, which must be initialised).

    Example::

        # under torchrun, e.g. `torchx run ./torchx_components.py:convert criteo day_0 day_1 --out DATA -j 2x1`
        from multiembed.data.convert import ConvertOptions, convert
        from multiembed.data.convert.nodes import init_node_group

        nodes = init_node_group()
        convert(ConvertOptions(dataset="criteo", inputs=["day_0", "day_1"], out="DATA"), nodes=nodes)
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        if not dist.is_initialized():
            raise ValueError("NodeGroup: torch.distributed is not initialised (run under torchrun, or init_node_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.is_main = self.rank == 0
        self.resolved: Optional[ResolvedOptions] = None
        self.fmt: Optional[RawFormat] = None

    def bind(self, resolved: ResolvedOptions, fmt: RawFormat) -> "NodeGroup":
        """Attaches the conversion's options (called by ``convert``)."""
        self.resolved, self.fmt = resolved, fmt
        return self

    # ------------------------------------------------------------------------------------------- coordination
    def _exchange(self, work: Callable[[], _T]) -> List[_T]:
        """``work()`` on every rank; every rank's value, or the lowest failing rank's error raised on all."""
        try:
            outcome: Tuple[Optional[Tuple[str, str]], Any] = (None, work())
        except Exception as error:  # noqa: BLE001  (carried to every rank, then raised)
            outcome = (_portable(error), None)
        outcomes: List[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, outcome, group=self.group)
        for error, _ in outcomes:
            if error is not None:
                raise _rebuilt(error)
        return [value for _, value in outcomes]

    def decide(self, decision: Callable[[], _T]) -> _T:
        outcome: List[Any] = [None]
        if self.is_main:
            try:
                outcome = [(None, decision())]
            except Exception as error:  # noqa: BLE001
                outcome = [(_portable(error), None)]
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        error, value = outcome[0]
        if error is not None:
            raise _rebuilt(error)
        return value

    def mine(self, indices: Sequence[int]) -> List[int]:
        return list(indices)[self.rank :: self.world_size]

    def gather(self, work: Callable[[], List[_T]]) -> List[_T]:  # type: ignore[override]
        return [item for items in self._exchange(work) for item in items]

    @contextlib.contextmanager
    def main_lock(self, out: Path) -> Iterator[None]:
        """Rank 0 holds ``out``'s conversion lock for the block (another job holding it fails every rank)."""
        with contextlib.ExitStack() as stack:
            def take_lock() -> None:
                stack.enter_context(exclusive_lock(out, "conversion"))

            self.decide(take_lock)
            yield

    # -------------------------------------------------------------------------------------------- the passes
    def _options(self) -> Tuple[ResolvedOptions, RawFormat]:
        if self.resolved is None or self.fmt is None:
            raise ValueError("NodeGroup: bind() the conversion's options first")
        return self.resolved, self.fmt

    def scan(self, paths: Sequence[str]) -> List[SourceScan]:
        """Every input's scan, each rank scanning its share (input ``i`` on rank ``i mod world``)."""
        _, fmt = self._options()
        share = range(self.rank, len(paths), self.world_size)
        scanned = self._exchange(lambda: [(i, scan_source(paths[i], fmt)) for i in share])
        scans: List[Optional[SourceScan]] = [None] * len(paths)
        for pairs in scanned:
            for i, scan in pairs:
                scans[i] = scan
        return scans  # type: ignore[return-value]

    def count_vocabulary(self, scans: Sequence[SourceScan]) -> Optional[CountedVocabulary]:
        """Paper mode's vocabulary: each rank counts its share into a count file, rank 0 merges them.

        Returns:
            the vocabulary on rank 0, None on the others (they load it once rank 0 has saved it).
        """
        resolved, fmt = self._options()
        fields = list(fmt.fields(PAPER_MODE))
        state = resolved.out / STATE_DIR
        path = state / f"counts-rank-{self.rank:05d}.npz"
        share = [scans[i] for i in range(self.rank, len(scans), self.world_size)]

        def count_share() -> str:
            counter = VocabularyCounter(fields)
            with progress_bar(sum(s.rows for s in share), "counting", resolved.progress and self.is_main) as bar:
                count_tokens(fmt, resolved, [s.path for s in share], counter, bar)
            atomic_write(path, lambda handle: np.savez(handle, **{
                f"{f}.{part}": array for f in fields for part, array in zip(("keys", "counts"), counter.totals(f))}))
            return path.name

        names = self._exchange(count_share)
        merged: List[CountedVocabulary] = []

        def merge() -> None:
            # On rank 0 only, but inside a collective: a failure here reaches every rank; the vocabulary itself
            # stays on rank 0 (the others load it once saved).
            counter = VocabularyCounter(fields)
            for name in names:
                with np.load(state / name) as saved:
                    for f in fields:
                        counter.add_counts(f, saved[f"{f}.keys"], saved[f"{f}.counts"])
            assert resolved.min_count is not None
            merged.append(counter.finish(fmt.name, resolved.min_count, resolved.hash_seed))
            for name in names:
                (state / name).unlink(missing_ok=True)

        self.decide(merge)
        return merged[0] if merged else None

    def convert_inputs(
        self, todo: Sequence[int], scans: Sequence[SourceScan], counts: Sequence[SplitCounts], vocab: Vocabulary,
        schema: pa.Schema, bar: Any,
    ) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """Encodes this rank's inputs ``todo`` (already its share); yields ``(index, manifest)`` as each completes."""
        resolved, fmt = self._options()
        for i in todo:
            yield i, convert_input(i, scans[i], counts[i], fmt, resolved, vocab, schema, bar)

