"""A conversion from start to end: :func:`convert` takes the lock and runs a :class:`Conversion`, whose steps are
one method each (see :mod:`multiembed.data.convert` for what each step does)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

import pyarrow as pa

from multiembed.data.convert.count import count_vocabulary, load_vocabulary
from multiembed.data.convert.dataset import ConvertResult, build_metadata
from multiembed.data.convert.options import ConvertOptions, ResolvedOptions, resolve_options
from multiembed.data.convert.outputs import (
    STATE_DIR,
    OutputError,
    check_no_links,
    check_out_dir,
    clear_outputs,
    input_difference,
    manifest_is_complete,
    option_differences,
    read_finished,
    read_manifest,
    remove_outputs,
)
from multiembed.data.convert.stream import progress_bar
from multiembed.data.convert.write import convert_input
from multiembed.data.days import day_of
from multiembed.data.formats import HASHING_MODE, MANAGED_MODE, RawFormat, raw_format
from multiembed.data.metadata import (
    METADATA_FILE,
    DatasetError,
    DatasetMetadata,
    FieldSpec,
    atomic_write_text,
    read_metadata,
    write_metadata,
)
from multiembed.data.parquet_io import arrow_schema
from multiembed.data.rawlog import SourceScan, scan_source
from multiembed.data.splits import SplitCounts, by_file_counts, parse_split_weights, random_file_counts
from multiembed.data.vocab import VOCAB_FILE, CountedVocabulary, HashingVocabulary, ManagedVocabulary, Vocabulary
from multiembed.runtime.locking import exclusive_lock, refuse_if_locked

T = TypeVar("T")


def _digest(obj: Any) -> str:
    """A SHA-256 of ``obj``'s canonical JSON (the keys that say whether saved work can be reused)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def day_of_conversion(options: ConvertOptions, resolved: ResolvedOptions, fmt: RawFormat) -> Optional[Tuple[str, int]]:
    """``(sequence, index)`` of the day this conversion writes (``--first-day`` / ``--follows``), None for a plain
    dataset.

    Raises:
        ValueError: both options, or a day in paper mode (its vocabulary is frozen and cannot grow with later days).
            Hashing and managed mode days can follow each other only within one mode.
        DatasetError: ``--follows`` names no day dataset, or one of another schema or hash space (one line).
    """
    if options.first_day is None and options.follows is None:
        return None
    if options.first_day is not None and options.follows is not None:
        raise ValueError("--first-day and --follows exclude each other (a day starts a sequence or follows a day)")
    flag = "--first-day" if options.first_day is not None else "--follows"
    if resolved.mode not in (HASHING_MODE, MANAGED_MODE):
        raise ValueError(
            f"{flag}: a day sequence needs hashing mode (--hash-size N) or managed mode (--vocab managed); "
            f"{resolved.mode} mode's vocabulary is frozen at conversion and cannot grow with later days"
        )
    if options.first_day is not None:
        if not options.first_day.strip():
            raise ValueError("--first-day: give the day sequence a name")
        return options.first_day, 0
    assert options.follows is not None
    where = os.path.join(options.follows, METADATA_FILE)
    previous = read_metadata(options.follows)
    place = day_of(previous, where)
    if previous.field_names != list(fmt.fields(resolved.mode)) or previous.dense_fields != list(fmt.dense_fields):
        raise DatasetError(f"--follows {where}: day.schema: another schema ({previous.dataset}) than this {fmt.name} "
                           "conversion's")
    if previous.options.get("mode") != resolved.mode:
        raise DatasetError(
            f"--follows {where}: options.mode: the day was converted in {previous.options.get('mode')} mode, this "
            f"conversion is in {resolved.mode} mode; every day of a sequence keeps one mode"
        )
    if new_vocabulary(fmt, resolved).fingerprint != place.hash_space:
        raise DatasetError(
            f"--follows {where}: day.hash_space: another id space than this conversion's (the hash sizes or hash "
            "seed differ); every day of a sequence keeps its --hash-size / --hash-sizes"
        )
    return place.sequence, place.index + 1


def new_vocabulary(fmt: RawFormat, resolved: ResolvedOptions) -> Vocabulary:
    """The vocabulary of a hashing- or managed-mode conversion (nothing to count)."""
    if resolved.mode == MANAGED_MODE:
        return ManagedVocabulary(fmt.name, fmt.fields(MANAGED_MODE), resolved.hash_seed)
    assert resolved.mode == HASHING_MODE and resolved.hash_sizes is not None
    return HashingVocabulary(fmt.name, resolved.hash_sizes, resolved.hash_seed)


def convert(options: ConvertOptions, nodes: Optional["Coordinator"] = None) -> ConvertResult:
    """Converts raw logs into a dataset directory (see the module docstring).

    Args:
        options: what to convert, and how.
        nodes: the ranks of a job converting the inputs together
            (:class:`multiembed.data.convert.nodes.NodeGroup`); None: this process alone.

    Raises:
        ValueError: bad options.
        InputError: an input is missing, unreadable or malformed (``file:line: field: what``); under
            ``on_error="skip"`` bad rows are counted instead and only file-level problems raise.
        DatasetError: ``vocab_from`` is not a usable conversion.
        OutputError: the output cannot be written.
    """
    started = time.perf_counter()
    resolved = resolve_options(options)
    if nodes is not None and resolved.workers > 1:
        raise ValueError("--workers: each rank of a multi-node conversion converts one input at a time; run more "
                         "ranks per node (-j NODESxRANKS) instead")
    fmt = raw_format(resolved.dataset)
    source_vocab: Optional[Vocabulary] = None
    if resolved.vocab_from is not None:
        source_vocab, _ = load_vocabulary(resolved.vocab_from, fmt)
        resolved.mode = source_vocab.mode
        if isinstance(source_vocab, HashingVocabulary):
            resolved.hash_sizes = source_vocab.sizes
        elif isinstance(source_vocab, CountedVocabulary):
            resolved.min_count = source_vocab.min_count
        resolved.hash_seed = source_vocab.seed
    resolved.day = day_of_conversion(options, resolved, fmt)
    out = resolved.out
    if nodes is None:  # (a multi-node job's ranks share one lock, which its first rank takes: main_lock)
        refuse_if_locked(out, "conversion")  # a running conversion's temporary files are its own, named as such
    check_out_dir(out, resolved.overwrite)  # before the lock file is created: a refused directory stays untouched
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    with contextlib.ExitStack() as stack:
        if nodes is None:
            stack.enter_context(exclusive_lock(out, "conversion"))  # one per job: a pool's workers write under it
        else:
            stack.enter_context(nodes.bind(resolved, fmt).main_lock(out))  # type: ignore[attr-defined]
        if resolved.workers > 1 and len(resolved.inputs) > 1:
            from multiembed.data.convert.workers import ConvertPool

            with ConvertPool(resolved, fmt) as pool:
                return Conversion(resolved, fmt, source_vocab, pool).run(started)
        if resolved.threads_per_worker is not None:
            cpu_count, io_count = pa.cpu_count(), pa.io_thread_count()
            pa.set_cpu_count(resolved.threads_per_worker)
            pa.set_io_thread_count(resolved.threads_per_worker)
            stack.callback(pa.set_io_thread_count, io_count)
            stack.callback(pa.set_cpu_count, cpu_count)
        return Conversion(resolved, fmt, source_vocab, pool=nodes, nodes=nodes).run(started)
    raise AssertionError("unreachable")  # for type checkers: the with block always returns or raises


class Coordinator:
    """Who decides and who writes the shared files of a conversion: here one process does everything.

    :class:`multiembed.data.convert.nodes.NodeGroup` is the multi-node form: rank 0 decides (checks, clearing,
    the vocabulary, ``metadata.json``) and broadcasts the outcome, every rank converts its share of the inputs.
    """

    is_main = True

    def decide(self, decision: Callable[[], T]) -> T:
        """``decision()`` run by the main process, its value (or its exception) shared with every process."""
        return decision()

    def mine(self, indices: Sequence[int]) -> List[int]:
        """The input indices this process converts."""
        return list(indices)

    def gather(self, work: Callable[[], List[T]]) -> List[T]:
        """``work()`` run by every process, the lists concatenated (here: this process's); a failure on any
        process is raised on all."""
        return work()


class Conversion:
    """One conversion under the output directory's lock, one method per step.

    :meth:`run` calls the steps in order: check the output directory, scan the inputs, prepare the directory,
    assign the rows to splits, get the vocabulary, find the inputs already complete, encode the others, write
    ``metadata.json``. The decisions on shared files go through ``nodes`` (this process alone by default, or rank 0
    of a :class:`multiembed.data.convert.nodes.NodeGroup`); the scan, counting and encoding passes through ``pool``
    (a :class:`multiembed.data.convert.workers.ConvertPool` or the ``NodeGroup``), or here one input after another
    when it is None.

    Args:
        resolved: the checked options (``mode`` and the vocabulary options already those of ``source_vocab``).
        fmt: the raw format.
        source_vocab: ``--vocab-from``'s vocabulary, or None.
        pool: runs the passes over several inputs at once, or None.
        nodes: decides for a job of several processes (default: this one).
    """

    def __init__(
        self,
        resolved: ResolvedOptions,
        fmt: RawFormat,
        source_vocab: Optional[Vocabulary] = None,
        pool: Any = None,
        nodes: Optional[Coordinator] = None,
    ) -> None:
        self.resolved = resolved
        self.fmt = fmt
        self.out = resolved.out
        self.source_vocab = source_vocab
        self.pool = pool
        self.nodes = nodes or Coordinator()

    def run(self, started: float) -> ConvertResult:
        """Every step, in order; ``started`` is the ``time.perf_counter()`` the conversion began at."""
        nodes = self.nodes
        finished = nodes.decide(self.check_outputs)
        scans = self.scan()
        nodes.decide(lambda: self.prepare_outputs(finished, scans))
        counts = self.split_counts(scans)
        vocab, vocab_reused = self.vocabulary(scans)
        part_keys = self.part_keys(vocab, scans)
        manifests = nodes.decide(lambda: self.complete_parts(scans, part_keys))
        todo = [i for i, m in enumerate(manifests) if m is None]
        mine = nodes.mine(todo)
        for i, manifest in nodes.gather(lambda: self.convert_inputs(mine, scans, counts, vocab, part_keys)):
            manifests[i] = manifest
        metadata = nodes.decide(lambda: self.write_metadata(vocab, manifests, scans))
        return ConvertResult(
            metadata=metadata,
            out=self.out,
            converted=[scans[i].path for i in todo],
            reused=[scans[i].path for i in range(len(scans)) if i not in todo],
            vocab_reused=vocab_reused,
            seconds=time.perf_counter() - started,
            rows_converted=sum(scans[i].rows for i in todo),
        )

    def check_outputs(self) -> Optional[DatasetMetadata]:
        """Refuses an output directory this run may not write; returns the finished dataset there, if any."""
        out, resolved = self.out, self.resolved
        check_out_dir(out, resolved.overwrite)
        check_no_links(out)
        finished = read_finished(out, resolved.overwrite)
        if finished is not None and not resolved.overwrite:
            fingerprint = self.source_vocab.fingerprint if self.source_vocab else None
            differences = option_differences(finished, resolved, fingerprint)
            if differences:
                raise OutputError(
                    f"{out}: holds a finished dataset converted with other options ({'; '.join(differences)}); give "
                    "--overwrite to replace it, or choose another --out"
                )
        return finished

    def scan(self) -> List[SourceScan]:
        """Every input checked, its rows counted and its content hashed, in input order."""
        if self.pool is not None:
            return self.pool.scan(self.resolved.inputs)
        return [scan_source(path, self.fmt) for path in self.resolved.inputs]

    def prepare_outputs(self, finished: Optional[DatasetMetadata], scans: Sequence[SourceScan]) -> None:
        """Refuses a finished dataset of other inputs; clears the directory under ``overwrite``."""
        out = self.out
        if finished is not None and not self.resolved.overwrite:
            difference = input_difference(finished, out, scans)
            if difference is not None:
                raise OutputError(
                    f"{out}: holds a finished dataset converted from other inputs ({difference}); give --overwrite to "
                    "replace it, or choose another --out"
                )
        try:
            if self.resolved.overwrite:
                clear_outputs(out)
            (out / STATE_DIR).mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot prepare the output directory ({e.strerror or e})") from None

    def split_counts(self, scans: Sequence[SourceScan]) -> List[SplitCounts]:
        """Rows of each input per split (from every input's row count)."""
        file_rows = [scan.rows for scan in scans]
        if self.resolved.split_by_file:
            return by_file_counts(file_rows)
        assert self.resolved.split is not None
        return random_file_counts(file_rows, parse_split_weights(self.resolved.split), self.resolved.seed)

    def vocabulary(self, scans: Sequence[SourceScan]) -> Tuple[Vocabulary, bool]:
        """The vocabulary to encode with, and whether a saved one of an earlier run was reused."""
        if self.source_vocab is not None:
            if isinstance(self.source_vocab, CountedVocabulary):
                counted = self.source_vocab
                self.nodes.decide(lambda: self._copy_vocabulary(counted))
            return self.source_vocab, False
        if self.resolved.mode in (HASHING_MODE, MANAGED_MODE):
            return new_vocabulary(self.fmt, self.resolved), False
        return self._counted_vocabulary(scans)

    def _copy_vocabulary(self, counted: CountedVocabulary) -> None:
        """The dataset keeps its own copy of a ``--vocab-from`` vocabulary: it can be a source in turn."""
        saved = CountedVocabulary.saved_extra(self.out)
        if saved is None or saved.get("copied_from") != counted.fingerprint:
            self._save_vocabulary(counted, {"copied_from": counted.fingerprint})

    def _save_vocabulary(self, counted: CountedVocabulary, extra: Dict[str, Any]) -> str:
        try:
            counted.save(self.out, extra=extra)
        except OSError as e:
            raise OutputError(f"{self.out / VOCAB_FILE}: cannot write ({e})") from None
        return counted.fingerprint

    def _counted_vocabulary(self, scans: Sequence[SourceScan]) -> Tuple[CountedVocabulary, bool]:
        """Paper mode: the saved vocabulary of an earlier run with the same inputs and options, or a counting pass."""
        resolved = self.resolved
        vocab_key = _digest({"dataset": self.fmt.name, "min_count": resolved.min_count,
                             "hash_seed": resolved.hash_seed, "on_error": resolved.on_error,
                             "sources": [s.to_json() for s in scans]})

        def saved_vocabulary_matches() -> bool:
            saved = CountedVocabulary.saved_extra(self.out)
            return saved is not None and saved.get("vocab_key") == vocab_key

        if self.nodes.decide(saved_vocabulary_matches):
            return CountedVocabulary.load(self.out), True
        # A NodeGroup returns the merged vocabulary on its main rank only; the others load what it saved.
        if self.pool is not None:
            counted = self.pool.count_vocabulary(scans)
        else:
            counted = count_vocabulary(self.fmt, resolved, scans)
        fingerprint = self.nodes.decide(lambda: self._save_vocabulary(counted, {"vocab_key": vocab_key}))
        vocab = counted if counted is not None else CountedVocabulary.load(self.out)
        if vocab.fingerprint != fingerprint:
            raise DatasetError(f"{self.out / VOCAB_FILE}: changed while the conversion read it (fingerprint differs)")
        return vocab, False

    def part_keys(self, vocab: Vocabulary, scans: Sequence[SourceScan]) -> List[str]:
        """Per input, the key its manifest must hold to be reused: this run's options, vocabulary and inputs."""
        options_key = self.resolved.to_json()
        options_key["vocab_from"] = None  # the vocabulary's fingerprint below says what --vocab-from gave
        run_key = _digest({"options": options_key, "vocab": vocab.fingerprint,
                           "rows": [[os.path.abspath(s.path), s.rows] for s in scans]})
        return [_digest({"run": run_key, "index": i, "source": s.to_json()}) for i, s in enumerate(scans)]

    def complete_parts(self, scans: Sequence[SourceScan], part_keys: Sequence[str]) -> List[Optional[Dict[str, Any]]]:
        """The manifest of every input already complete (None for the others); removes stale outputs."""
        out = self.out
        found: List[Optional[Dict[str, Any]]] = []
        for i in range(len(scans)):
            manifest = read_manifest(out / STATE_DIR / f"part-{i:05d}.json")
            found.append(manifest if manifest_is_complete(out, manifest, part_keys[i]) else None)
        if any(m is None for m in found):
            # The dataset is about to change: it must not look complete until metadata.json is rewritten.
            (out / METADATA_FILE).unlink(missing_ok=True)
        remove_outputs(out, keep=[i for i, m in enumerate(found) if m is not None])
        return found

    def convert_inputs(
        self, mine: Sequence[int], scans: Sequence[SourceScan], counts: Sequence[SplitCounts], vocab: Vocabulary,
        part_keys: Sequence[str],
    ) -> List[Tuple[int, Dict[str, Any]]]:
        """Encodes the inputs ``mine``; writes each one's manifest as it completes and returns them."""
        resolved, state = self.resolved, self.out / STATE_DIR
        schema = arrow_schema([FieldSpec(name, 1) for name in vocab.fields], self.fmt.dense_fields)
        written: List[Tuple[int, Dict[str, Any]]] = []
        progress = resolved.progress and bool(mine) and self.nodes.is_main
        with progress_bar(sum(scans[i].rows for i in mine), "converting", progress) as bar:
            if self.pool is not None:
                # Each worker encodes whole inputs; their manifests are written here as they complete.
                converted: Iterable[Tuple[int, Dict[str, Any]]] = self.pool.convert_inputs(
                    mine, scans, counts, vocab, schema, bar)
            else:
                converted = ((i, convert_input(i, scans[i], counts[i], self.fmt, resolved, vocab, schema, bar))
                             for i in mine)
            for i, manifest in converted:
                manifest["part_key"] = part_keys[i]
                path = state / f"part-{i:05d}.json"
                try:
                    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
                except OSError as e:
                    raise OutputError(f"{path}: cannot write ({e})") from None
                written.append((i, manifest))
        return written

    def write_metadata(
        self, vocab: Vocabulary, manifests: Sequence[Optional[Dict[str, Any]]], scans: Sequence[SourceScan]
    ) -> DatasetMetadata:
        """Writes ``metadata.json`` (the dataset is complete from here on) and returns it."""
        metadata = build_metadata(self.fmt, self.resolved, vocab, [m for m in manifests if m is not None], scans)
        try:
            write_metadata(self.out, metadata)
        except OSError as e:
            raise OutputError(f"{self.out / METADATA_FILE}: cannot write ({e})") from None
        return metadata
