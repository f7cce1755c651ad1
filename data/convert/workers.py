"""``multiembed convert --workers N``: several input files converted at once by a pool of processes.

:func:`multiembed.data.convert.convert` runs its three passes through a :class:`ConvertPool` when given more than
one worker and more than one input; each worker handles whole input files, exactly as one worker does:

1. the scan pass (rows counted, content hashed) of every input, in parallel: the split needs every file's row count
   before any row is assigned;
2. paper mode: every worker counts its files' tokens and sends back their sorted unique keys and counts; the parent
   merges them into the totals one file's counts at a time (the same totals, so the same vocabulary, as one pass);
3. the encoding pass: each worker writes its inputs' ``{train,val,test}/part-<index>.parquet`` with the same code
   (:func:`multiembed.data.convert.write.convert_input`), the parent writes each input's manifest as it completes and
   ``metadata.json`` last. The parent holds the output directory's lock throughout.

The output is the same as with one worker: every input's rows, their split and their Parquet files depend on the
input, its index and the counts only, never on which process wrote them. Each worker holds one input's chunks and
Parquet row groups at a time, as a single conversion does, so peak memory is about ``workers`` times one
conversion's (plus, in paper mode, the merged counts in the parent).

The pool spawns its processes (no fork of a process running pyarrow's and the reader's threads), so a Python script
calling :func:`~multiembed.data.convert.convert` with ``workers > 1`` needs the usual ``if __name__ == "__main__":``
guard; the ``multiembed`` command has it.

Errors: a worker's exception (``file:line: field: what is wrong``) comes back as the same exception; the first
failure stops the other workers at their next chunk and the error of the lowest input index is raised.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from multiembed.data.convert.count import count_tokens
from multiembed.data.convert.options import ResolvedOptions
from multiembed.data.convert.stream import progress_bar
from multiembed.data.convert.write import convert_input
from multiembed.data.formats import PAPER_MODE, RawFormat, raw_format
from multiembed.data.metadata import DatasetError
from multiembed.data.rawlog import SourceScan, scan_source
from multiembed.data.splits import SplitCounts
from multiembed.data.vocab import CountedVocabulary, Vocabulary, VocabularyCounter
from multiembed.runtime.malloc import tune_allocator

_POLL_SECONDS = 0.5


class WorkerError(OSError):
    """A conversion worker process died (killed, out of memory) instead of finishing or raising."""


class _Stopped(Exception):
    """Raised inside a worker whose work another worker's failure (or an interrupt) has cancelled."""


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# in the worker processes

_WORKER: Dict[str, Any] = {}


def _init_worker(resolved: ResolvedOptions, dataset: str, threads: int, stop: Any, progress: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, reported like a full disk (as cli/convert.py)
    tune_allocator()
    pa.set_cpu_count(threads)
    pa.set_io_thread_count(threads)
    _WORKER.update(resolved=resolved, fmt=raw_format(dataset), stop=stop, progress=progress, vocab=None)


class _WorkerBar:
    """The progress bar :func:`~multiembed.data.convert.write.convert_input` updates after every chunk: adds to the
    parent's shared counter and stops the worker when the parent asks."""

    def update(self, rows: int) -> None:
        progress = _WORKER["progress"]
        with progress.get_lock():
            progress.value += rows
        if _WORKER["stop"].is_set():
            raise _Stopped()


def _scan_task(path: str) -> SourceScan:
    return scan_source(path, _WORKER["fmt"])


def _count_task(path: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """One input's paper-mode counts: per field, its sorted unique keys and their counts."""
    fmt: RawFormat = _WORKER["fmt"]
    fields = list(fmt.fields(PAPER_MODE))
    counter = VocabularyCounter(fields)
    count_tokens(fmt, _WORKER["resolved"], [path], counter, _WorkerBar())
    return {field: counter.totals(field) for field in fields}


def _worker_vocab(vocab: Any) -> Vocabulary:
    """The vocabulary a task names: a hashing vocabulary travels with the task; a counted one is loaded once per
    worker from the dataset's own ``vocab.npz`` (written before the encoding pass) and checked by fingerprint."""
    if not (isinstance(vocab, tuple) and vocab[0] == "counted"):
        return vocab
    _, directory, fingerprint = vocab
    cached = _WORKER["vocab"]
    if cached is None or cached.fingerprint != fingerprint:
        cached = CountedVocabulary.load(directory)
        if cached.fingerprint != fingerprint:
            raise DatasetError(f"{directory}: vocab.npz changed during the conversion (fingerprint differs)")
        _WORKER["vocab"] = cached
    return cached


def _convert_task(index: int, scan: SourceScan, counts: SplitCounts, vocab: Any, schema: pa.Schema) -> Dict[str, Any]:
    return convert_input(index, scan, counts, _WORKER["fmt"], _WORKER["resolved"], _worker_vocab(vocab), schema,
                         _WorkerBar())


# ---------------------------------------------------------------------------------------------------------------
# in the parent


class ConvertPool:
    """A process pool converting whole input files, one per worker at a time (a context manager).

    Args:
        resolved: the conversion's options (``workers`` processes, at most one per input; ``threads_per_worker``
            pyarrow threads each, default all CPUs / workers).
        fmt: the raw format.
    """

    def __init__(self, resolved: ResolvedOptions, fmt: RawFormat) -> None:
        self._resolved = resolved
        self.workers = max(1, min(resolved.workers, len(resolved.inputs)))
        self.threads = resolved.threads_per_worker or max(1, available_cpus() // self.workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process running pyarrow and reader threads
        self._stop = context.Event()
        self._progress = context.Value("q", 0)
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=context, initializer=_init_worker,
            initargs=(resolved, fmt.name, self.threads, self._stop, self._progress),
        )

    def __enter__(self) -> "ConvertPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, calls: Sequence[Tuple[int, Callable[..., Any], Tuple[Any, ...]]], bar: Any = None
             ) -> Iterator[Tuple[int, Any]]:
        """Runs ``fn(*args)`` of every ``(index, fn, args)`` in the pool; yields ``(index, result)`` as they
        complete. After the first failure the other calls are cancelled or stopped at their next chunk (those that
        finish anyway are still yielded) and the failure of the lowest index is raised."""
        with self._progress.get_lock():
            self._progress.value = 0
        self._stop.clear()
        futures = {self._pool.submit(fn, *args): index for index, fn, args in calls}
        pending = set(futures)
        errors: Dict[int, BaseException] = {}
        shown = 0
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=_POLL_SECONDS,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                if bar is not None:
                    value = self._progress.value
                    bar.update(value - shown)
                    shown = value
                for future in sorted(done, key=futures.__getitem__):
                    if future.cancelled():
                        continue
                    error = future.exception()
                    if error is None:
                        yield futures[future], future.result()
                    elif isinstance(error, concurrent.futures.process.BrokenProcessPool):
                        path = self._resolved.inputs[futures[future]]
                        errors[futures[future]] = WorkerError(
                            f"{path}: the conversion worker died (killed, or out of memory?) before it finished; "
                            "convert again (complete inputs are kept), with fewer --workers if memory is short")
                    elif not isinstance(error, _Stopped):
                        errors[futures[future]] = error
                if errors and not self._stop.is_set():
                    self._stop.set()
                    for future in pending:
                        future.cancel()
        finally:
            if pending:  # interrupted (Ctrl-C) or abandoned: stop the workers, wait for their clean-up
                self._stop.set()
                for future in pending:
                    future.cancel()
                concurrent.futures.wait(pending)
        if errors:
            raise errors[min(errors)]

    def scan(self, paths: Sequence[str]) -> List[SourceScan]:
        """:func:`multiembed.data.rawlog.scan_source` of every input, in input order."""
        scans: List[Optional[SourceScan]] = [None] * len(paths)
        for index, scan in self._run([(i, _scan_task, (path,)) for i, path in enumerate(paths)]):
            scans[index] = scan
        return scans  # type: ignore[return-value]

    def count_vocabulary(self, scans: Sequence[SourceScan]) -> CountedVocabulary:
        """Paper mode's vocabulary: every input counted by a worker, the counts merged here."""
        fmt = raw_format(self._resolved.dataset)
        fields = list(fmt.fields(PAPER_MODE))
        counter = VocabularyCounter(fields)
        calls = [(i, _count_task, (scan.path,)) for i, scan in enumerate(scans)]
        with progress_bar(sum(s.rows for s in scans), "counting", self._resolved.progress) as bar:
            for _, totals in self._run(calls, bar):
                for field in fields:
                    counter.add_counts(field, *totals[field])
                del totals
        assert self._resolved.min_count is not None
        return counter.finish(fmt.name, self._resolved.min_count, self._resolved.hash_seed)

    def convert_inputs(
        self, todo: Sequence[int], scans: Sequence[SourceScan], counts: Sequence[SplitCounts], vocab: Vocabulary,
        schema: pa.Schema, bar: Any,
    ) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """Encodes the inputs ``todo``; yields ``(index, manifest)`` as each completes."""
        reference: Any = vocab
        if isinstance(vocab, CountedVocabulary):
            reference = ("counted", str(self._resolved.out), vocab.fingerprint)  # saved in --out before this pass
        calls = [(i, _convert_task, (i, scans[i], counts[i], reference, schema)) for i in todo]
        yield from self._run(calls, bar)
