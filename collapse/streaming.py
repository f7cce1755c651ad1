"""Collapse metrics of embedding tables streamed shard by shard: :func:`collapse_from_sharded` (a collective over a
process group) and :func:`collapse_from_tables` (whole tables in one process).

IA is computed per field on that field's ``[D_i, d]`` table, for ME once per embedding set, and (the figure comparable
with SE of the same size) on the field's sets concatenated ``[D_i, K*d]``; for full-rank DCNv2, also per pair of
fields through the first cross layer (sub-embeddings). Rows are L2-normalised first by default
(``row_normalized=True``, the authors' analysis); every result records which one it used, and zero rows are counted
(``zero_rows``), never dropped silently.

Every row of every analysed matrix is fed once, on one rank, into float64 Gram accumulators
(:mod:`multiembed.collapse.spectrum`), which are then summed with one ``all_reduce``; a set whose columns are split
over ranks (column-wise sharding that does not align with the set, or the concatenation of sets held on different
ranks) has its rows assembled on one rank chunk by chunk (:mod:`multiembed.collapse.shards`). Memory bound per rank:
``O(chunk_rows * w)`` for the one chunk in flight (``w`` the widest analysed matrix, ``K*d`` with concatenation) plus
``O(d^2)`` per (field, set), ``O((K*d)^2)`` per field for the concatenation and ``O(F * d^2)`` per (field, set) for
DCNv2 sub-embeddings; never a whole table.

Nothing here imports the trainer or the sharding package: the distributed entry point takes plain local shards
(a tensor and its row/column offsets in the table) and the model's ``table_layout``.

Example::

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from multiembed.collapse import LocalShard, collapse_from_sharded, collapse_from_tables
    >>> table = torch.randn(100, 12)  # one field, SE with d=10 stored as 12
    >>> layout = [SimpleNamespace(table_name="t", field="a", set_index=0, col_start=0, col_stop=10)]
    >>> whole = collapse_from_tables({"t": table}, layout)
    >>> # outside torch.distributed, the shards of every rank can be passed together (e.g. a checkpoint's)
    >>> split = collapse_from_sharded([LocalShard("t", table[:40]), LocalShard("t", table[40:], 40)], layout)
    >>> abs(whole.sets[0]["a"] - split.sets[0]["a"]) < 1e-9
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from multiembed.collapse.result import CollapseResult
from multiembed.collapse.shards import (
    EmbeddingSliceLike,
    LocalShard,
    all_reduce_accumulators,
    Collectives,
    Piece,
    ShardInfo,
    stream_unit,
    table_geometry,
    TableGeometry,
    Unit,
)
from multiembed.collapse.spectrum import GramAccumulator, ProjectedGramAccumulator, GramState, information_abundance

DEFAULT_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class _Layout:
    """The validated table layout: fields in model order, ``K`` sets of width ``d``, (field, set) -> columns."""

    fields: List[str]
    num_sets: int
    dim: int
    slots: Dict[Tuple[str, int], Piece]

    def key(self) -> Tuple[Any, ...]:
        return tuple(sorted((f, k, p.table_name, p.col_start, p.col_stop) for (f, k), p in self.slots.items()))


def _parse_layout(table_layout: Sequence[EmbeddingSliceLike]) -> _Layout:
    if not table_layout:
        raise ValueError("table_layout is empty")
    fields: List[str] = []
    slots: Dict[Tuple[str, int], Piece] = {}
    widths = set()
    for s in table_layout:
        if s.col_stop <= s.col_start or s.col_start < 0:
            raise ValueError(
                f"table_layout: field {s.field!r} set {s.set_index}: bad columns [{s.col_start}, {s.col_stop})"
            )
        key = (s.field, int(s.set_index))
        if key in slots:
            raise ValueError(f"table_layout: field {s.field!r} set {s.set_index} appears twice")
        slots[key] = Piece(s.table_name, int(s.col_start), int(s.col_stop))
        widths.add(s.col_stop - s.col_start)
        if s.field not in fields:
            fields.append(s.field)
    if len(widths) != 1:
        raise ValueError(f"table_layout: every set must have the same width, got widths {sorted(widths)}")
    num_sets = 1 + max(k for _, k in slots)
    for field in fields:
        missing = [k for k in range(num_sets) if (field, k) not in slots]
        if missing:
            raise ValueError(f"table_layout: field {field!r} lacks sets {missing} (the model has {num_sets} sets)")
    return _Layout(fields, num_sets, widths.pop(), slots)


def _vocab_sizes(layout: _Layout, geometry: Mapping[str, TableGeometry]) -> Dict[str, int]:
    """field -> rows, checking that every (field, set) fits a table that some rank holds."""
    vocab_sizes: Dict[str, int] = {}
    for (field, k), piece in layout.slots.items():
        if piece.table_name not in geometry:
            raise ValueError(f"table {piece.table_name!r} (field {field!r}, set {k}) has no shard on any rank")
        table = geometry[piece.table_name]
        if piece.col_stop > table.num_cols:
            raise ValueError(
                f"field {field!r} set {k}: columns [{piece.col_start}, {piece.col_stop}) exceed table "
                f"{piece.table_name!r} width {table.num_cols}"
            )
        if vocab_sizes.setdefault(field, table.num_rows) != table.num_rows:
            raise ValueError(
                f"field {field!r}: its sets' tables have different row counts "
                f"({vocab_sizes[field]} and {table.num_rows})"
            )
    return vocab_sizes


def _cross_maps(
    layout: _Layout, cross_weights: Sequence[torch.Tensor], cross_fields: Sequence[str], device: torch.device
) -> Dict[Tuple[str, int], torch.Tensor]:
    """(field i, set k) -> ``[F', d, d]``, map ``j`` being ``W_{i->j}``, block ``(j, i)`` of set ``k``'s weight."""
    unknown = [f for f in cross_fields if f not in layout.fields]
    if unknown:
        raise ValueError(f"cross_fields {unknown} are not in the table layout")
    if len(cross_weights) != layout.num_sets:
        raise ValueError(f"cross_weights: expected one weight per set ({layout.num_sets}), got {len(cross_weights)}")
    d, num_fields = layout.dim, len(cross_fields)
    maps = {}
    for k, weight in enumerate(cross_weights):
        if tuple(weight.shape) != (num_fields * d, num_fields * d):
            raise ValueError(
                f"cross_weights[{k}]: expected [{num_fields * d}, {num_fields * d}] ({num_fields} fields x d={d}), "
                f"got {tuple(weight.shape)}"
            )
        w = weight.detach().to(device, torch.float64)
        for i, field in enumerate(cross_fields):
            maps[(field, k)] = w[:, i * d : (i + 1) * d].reshape(num_fields, d, d)
    return maps


def random_table_chunk(
    seed: int, field_index: int, chunk_index: int, rows: int, dim: int, bound: float
) -> torch.Tensor:
    # One generator per (seed, field, chunk): the random table is the same whatever the number of ranks.
    state = np.random.SeedSequence([seed, field_index, chunk_index]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state >> 1))
    return torch.empty(rows, dim, dtype=torch.float64).uniform_(-bound, bound, generator=generator)

def _ia_and_spectrum(acc: GramAccumulator, what: str) -> Tuple[float, List[float]]:
    s = acc.singular_values()
    if float(s[0]) <= 0:
        raise ValueError(f"{what}: the table is all zero ({acc.num_rows} rows), its information abundance is undefined")
    return information_abundance(s), (s / s[0]).tolist()


def _sub_embedding_matrices(
    sub_acc: Mapping[Tuple[str, int], ProjectedGramAccumulator], cross_fields: Sequence[str], num_sets: int
) -> List[Dict[str, Any]]:
    matrices = []
    for k in range(num_sets):
        rows = []
        for source in cross_fields:
            spectra = sub_acc[(source, k)].singular_values()
            row = []
            for j, target in enumerate(cross_fields):
                if float(spectra[j, 0]) <= 0:
                    raise ValueError(
                        f"set {k}: field {source!r} seen by field {target!r} through the first cross layer is all "
                        "zero; its information abundance is undefined"
                    )
                row.append(information_abundance(spectra[j]))
            rows.append(row)
        matrices.append({"fields": list(cross_fields), "ia": rows})
    return matrices


def collapse_from_sharded(
    local_shards: Sequence[LocalShard],
    table_layout: Sequence[EmbeddingSliceLike],
    *,
    group: Optional[dist.ProcessGroup] = None,
    row_normalized: bool = True,
    concat: bool = True,
    random_init_seed: Optional[int] = 0,
    cross_weights: Optional[Sequence[torch.Tensor]] = None,
    cross_fields: Optional[Sequence[str]] = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: Optional[torch.device] = None,
    progress: bool = False,
) -> CollapseResult:
    """Collapse metrics of embedding tables sharded over the ranks of a process group; every rank gets the result.

    A collective: every rank of ``group`` must call it with the same ``table_layout`` and options, each passing the
    shards it holds (possibly none). Every table entry must be held by exactly one rank (pass replicated tables from
    one rank only, see :func:`local_shards_from_tensors`). Row chunks whose rows a single rank holds in full width are
    processed there without communication; chunks whose columns are split over ranks are reduced to one of their
    holders, which assembles the full rows. All Gram matrices are then summed with one float64 ``all_reduce`` and every
    rank computes the same eigenvalues. Memory: see the module docstring.

    Args:
        local_shards: this rank's blocks of the tables.
        table_layout: where each (field, set) lives (the model's ``sparse_arch.table_layout``).
        group: the process group (default: the default group when ``torch.distributed`` is initialised; without
            an initialised process group the call runs in this process alone, ``local_shards`` then being every
            block of every table, e.g. a checkpoint's shards, assembled exactly as across ranks).
        row_normalized: L2-normalise rows before the spectra (the paper's analysis).
        concat: for ``K > 1`` sets, also the IA of each field's sets concatenated.
        random_init_seed: compute the IA of a uniform random ``[D_i, d]`` table per field with this seed; None skips.
            The bound is the xavier-uniform ``sqrt(6 / (sum_i D_i + d))``; IA is scale invariant, so only the
            uniform shape matters.
        cross_weights: DCNv2 only, one first-cross-layer weight ``[F'*d, F'*d]`` per set (set order), acting on the
            concatenation of ``cross_fields``' embeddings (slice off any dense block first).
        cross_fields: the field order of the cross input (default: the layout's field order).
        chunk_rows: rows per streamed chunk (memory ``O(chunk_rows * K*d)``).
        device: where chunks and Grams live (default: CUDA with an nccl group, else CPU).
        progress: show a progress bar (stderr) on this rank.

    Returns:
        the :class:`CollapseResult`, identical on every rank.

    Raises:
        ValueError: for an inconsistent layout, overlapping or missing shards, ranks that disagree on the layout,
            cross weights of the wrong shape, or an all-zero matrix (IA undefined; the message names field and set).
    """
    distributed = dist.is_available() and dist.is_initialized()
    return _analyze(
        Collectives(group, distributed), local_shards, table_layout, row_normalized=row_normalized, concat=concat,
        random_init_seed=random_init_seed, cross_weights=cross_weights, cross_fields=cross_fields,
        chunk_rows=chunk_rows, device=device, progress=progress,
    )


def _analyze(
    comm: Collectives,
    local_shards: Sequence[LocalShard],
    table_layout: Sequence[EmbeddingSliceLike],
    *,
    row_normalized: bool,
    concat: bool,
    random_init_seed: Optional[int],
    cross_weights: Optional[Sequence[torch.Tensor]],
    cross_fields: Optional[Sequence[str]],
    chunk_rows: int,
    device: Optional[torch.device],
    progress: bool,
) -> CollapseResult:
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if device is None:
        nccl = comm.distributed and dist.get_backend(comm.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    layout = _parse_layout(table_layout)
    fields, num_sets, dim = layout.fields, layout.num_sets, layout.dim
    cross_fields = list(cross_fields) if cross_fields is not None else list(fields)

    options_key = (layout.key(), row_normalized, concat, random_init_seed, chunk_rows, cross_weights is not None)
    infos = [
        ShardInfo(comm.rank, s.table_name, s.row_offset, s.tensor.shape[0], s.col_offset, s.tensor.shape[1])
        for s in local_shards
    ]
    gathered = comm.all_gather_object(((*options_key, tuple(cross_fields)), infos))
    for other_rank, (other_key, _) in enumerate(gathered):
        if other_key != gathered[comm.rank][0]:
            raise ValueError(
                f"collapse_from_sharded: rank {other_rank} passed a different table_layout or options than rank "
                f"{comm.rank}"
            )
    geometry = table_geometry([info for _, rank_infos in gathered for info in rank_infos])
    vocab_sizes = _vocab_sizes(layout, geometry)
    maps = _cross_maps(layout, cross_weights, cross_fields, device) if cross_weights is not None else {}

    units: List[Unit] = []
    set_acc: Dict[Tuple[str, int], GramAccumulator] = {}
    sub_acc: Dict[Tuple[str, int], ProjectedGramAccumulator] = {}
    concat_acc: Dict[str, GramAccumulator] = {}
    for field in fields:
        for k in range(num_sets):
            set_acc[(field, k)] = GramAccumulator(dim, row_normalized, device)
            sinks: List[GramState] = [set_acc[(field, k)]]
            if (field, k) in maps:
                sub_acc[(field, k)] = ProjectedGramAccumulator(maps[(field, k)], row_normalized, device)
                sinks.append(sub_acc[(field, k)])
            units.append(Unit([layout.slots[(field, k)]], vocab_sizes[field], dim, sinks))
        if concat and num_sets > 1:
            concat_acc[field] = GramAccumulator(num_sets * dim, row_normalized, device)
            pieces = [dataclasses.replace(layout.slots[(field, k)], unit_col=k * dim) for k in range(num_sets)]
            units.append(Unit(pieces, vocab_sizes[field], num_sets * dim, [concat_acc[field]]))
    random_acc: Dict[str, GramAccumulator] = {}
    if random_init_seed is not None:
        random_acc = {field: GramAccumulator(dim, row_normalized, device) for field in fields}

    total_rows = sum(u.num_rows for u in units) + (sum(vocab_sizes.values()) if random_acc else 0)
    with tqdm(total=total_rows, desc="collapse analysis", unit="row", unit_scale=True, disable=not progress) as bar:
        for unit in units:
            stream_unit(unit, comm, local_shards, geometry, chunk_rows, device, bar)
        # xavier-uniform bound of the paper's code; IA is scale invariant, so only the uniform shape matters.
        bound = math.sqrt(6.0 / (sum(vocab_sizes.values()) + dim))
        for field_index, (field, acc) in enumerate(random_acc.items()):
            for chunk_index, start in enumerate(range(0, vocab_sizes[field], chunk_rows)):
                rows = min(chunk_rows, vocab_sizes[field] - start)
                if chunk_index % comm.world_size == comm.rank:  # chunks dealt round-robin over the ranks
                    acc.add(random_table_chunk(random_init_seed, field_index, chunk_index, rows, dim, bound))
                bar.update(rows)
    all_reduce_accumulators([*set_acc.values(), *sub_acc.values(), *concat_acc.values(), *random_acc.values()], comm)

    sets: List[Dict[str, float]] = [{} for _ in range(num_sets)]
    spectra: List[Dict[str, List[float]]] = [{} for _ in range(num_sets)]
    for field in fields:
        for k in range(num_sets):
            sets[k][field], spectra[k][field] = _ia_and_spectrum(set_acc[(field, k)], f"field {field!r} set {k}")
    concat_ia = {f: _ia_and_spectrum(a, f"field {f!r} (sets concatenated)") for f, a in concat_acc.items()}
    return CollapseResult(
        row_normalized=row_normalized,
        dim=dim,
        fields=fields,
        vocab_sizes=vocab_sizes,
        sets=sets,
        spectra=spectra,
        concat={f: v[0] for f, v in concat_ia.items()} if concat_acc else None,
        concat_spectra={f: v[1] for f, v in concat_ia.items()} if concat_acc else None,
        random_init={f: _ia_and_spectrum(a, f"random table of field {f!r}")[0] for f, a in random_acc.items()}
        if random_acc
        else None,
        random_init_seed=random_init_seed if random_acc else None,
        sub_embedding=_sub_embedding_matrices(sub_acc, cross_fields, num_sets) if sub_acc else None,
        zero_rows=[{f: set_acc[(f, k)].zero_rows for f in fields} for k in range(num_sets)],
    )


_DEFAULT_OPTIONS: Dict[str, Any] = dict(
    row_normalized=True, concat=True, random_init_seed=0, cross_weights=None, cross_fields=None,
    chunk_rows=DEFAULT_CHUNK_ROWS, device=None, progress=False,
)


def collapse_from_tables(
    tables: Mapping[str, torch.Tensor],
    table_layout: Sequence[EmbeddingSliceLike],
    **options: Any,
) -> CollapseResult:
    """Collapse metrics of whole tables in one process (a checkpoint loaded unsharded, a model on one device).

    Args:
        tables: table name -> ``[D, stored width]`` weight.
        table_layout: where each (field, set) lives.
        **options: as for :func:`collapse_from_sharded` (except ``group``).

    Returns:
        the :class:`CollapseResult`.

    Example::

        >>> import torch
        >>> from types import SimpleNamespace
        >>> from multiembed.collapse import collapse_from_tables
        >>> tables = {"t_a": torch.randn(100, 24), "t_b": torch.randn(50, 24)}  # fused: 2 sets of d=10 stored as 12
        >>> layout = [SimpleNamespace(table_name=t, field=f, set_index=k, col_start=12 * k, col_stop=12 * k + 10)
        ...           for t, f in (("t_a", "a"), ("t_b", "b")) for k in range(2)]
        >>> result = collapse_from_tables(tables, layout)
        >>> 1.0 <= result.sets[0]["a"] <= 10.0, 1.0 <= result.concat["a"] <= 20.0  # d = 10, K * d = 20
        (True, True)
    """
    if "group" in options:
        raise ValueError("collapse_from_tables runs in one process; use collapse_from_sharded for a process group")
    shards = [LocalShard(name, weight) for name, weight in tables.items()]
    return _analyze(Collectives(None, distributed=False), shards, table_layout, **{**_DEFAULT_OPTIONS, **options})
