"""Embedding-collapse metrics: information abundance (IA), singular-value spectra and sub-embedding IA.

Information abundance of a matrix ``E`` with singular values ``s_1 >= ... >= s_d`` is ``IA(E) = sum(s) / s_1``, so
``1 <= IA <= d`` (Guo et al., ICML 2024). It is computed per field on that field's ``[D_i, d]`` table, for ME once per
embedding set, and (the figure comparable with SE of the same size) on the field's sets concatenated ``[D_i, K*d]``.

Row normalisation: the authors' analysis code L2-normalises every row before the SVD, and so does this module by
default (``row_normalized=True``); ``row_normalized=False`` gives the raw spectrum. Every result records which one it
used. Zero rows (all entries 0) cannot be normalised: they are left at zero, so they add nothing to the spectrum in
either mode (as they add nothing to the raw SVD), and they are counted (``zero_rows``) and reported, never dropped
silently.

Exact without gathering a table: the singular values of ``E`` are the square roots of the eigenvalues of the ``d x d``
Gram matrix ``E^T E = sum_r e_r e_r^T``, a sum over rows. :class:`GramAccumulator` adds row chunks in float64, so a
table is streamed chunk by chunk and row shards on different ranks simply add their Grams (one ``all_reduce``). A
set whose columns are split over ranks (column-wise sharding that does not align with the set, or the concatenation
of sets held on different ranks) needs the cross terms ``E_p^T E_q`` between column blocks ``p`` and ``q`` held by
different ranks: these cannot be formed from per-rank Grams (nor from per-row norms), so for such row ranges the
ranks send their column pieces of one row chunk to one rank, which assembles the full-width rows, normalises them
and accumulates. Memory bound per rank: ``O(chunk_rows * w)`` for the one chunk in flight (``w`` the widest analysed
unit, ``K*d`` with concatenation) plus ``O(d^2)`` per (field, set), ``O((K*d)^2)`` per field for the concatenation
and ``O(F * d^2)`` per (field, set) for DCNv2 sub-embeddings; never a whole table.

Nothing here imports the trainer or the sharding package: the distributed entry point takes plain local shards
(a tensor and its row/column offsets in the table) and the model's ``table_layout``.

Example::

    import torch
    from multiembed.models.collapse import information_abundance, singular_values

    table = torch.randn(1000, 10)
    ia = information_abundance(singular_values(table))  # close to 10 for a random table
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

DEFAULT_CHUNK_ROWS = 65536


# --------------------------------------------------------------------------------------------------------------------
# Pure matrix functions
# --------------------------------------------------------------------------------------------------------------------


def information_abundance(singular_values: Union[torch.Tensor, Sequence[float]]) -> float:
    """``sum(s) / max(s)`` of a vector of singular values.

    Args:
        singular_values: the non-negative singular values ``[d]`` of one matrix, in any order.

    Returns:
        the information abundance, between 1 and the number of values.

    Raises:
        ValueError: when the vector is empty, has a negative or non-finite entry, or is all zero (the IA of an
            all-zero matrix is undefined).
    """
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("information_abundance: no singular values given")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"information_abundance: singular values must be finite and >= 0, got {s.tolist()}")
    top = s.max()
    if top <= 0:
        raise ValueError("information_abundance: all singular values are 0 (all-zero matrix), IA is undefined")
    return float(s.sum() / top)


def normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """L2-normalises every row (last dimension); zero rows stay zero.

    Args:
        rows: ``[..., d]``.

    Returns:
        ``[..., d]`` in the same dtype, every non-zero row of unit norm.
    """
    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return rows / torch.where(norms > 0, norms, torch.ones_like(norms))


def singular_values(embeddings: torch.Tensor, row_normalized: bool = True) -> torch.Tensor:
    """Singular values of a whole table by a direct float64 SVD (the reference for the streamed Gram route).

    Args:
        embeddings: ``[n, d]``.
        row_normalized: L2-normalise every row first (zero rows stay zero).

    Returns:
        ``[min(n, d)]`` float64, descending. (The Gram route returns ``d`` values; the extra ones are 0 and change
        no IA.)
    """
    if embeddings.dim() != 2:
        raise ValueError(f"singular_values: expected a 2-D [n, d] matrix, got shape {tuple(embeddings.shape)}")
    x = embeddings.detach().to(torch.float64)
    if row_normalized:
        x = normalize_rows(x)
    return torch.linalg.svdvals(x)


def singular_values_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Singular values of ``E`` from its Gram matrix ``E^T E``.

    Args:
        gram: ``[..., d, d]`` symmetric positive semi-definite.

    Returns:
        ``[..., d]`` float64, descending. Eigenvalues that rounding pushed below 0 are clamped to 0; a singular value
        ``s`` comes back with absolute error about ``sqrt(eps) * s_max``, far below what moves an IA.
    """
    eigenvalues = torch.linalg.eigvalsh(gram.to(torch.float64))
    return eigenvalues.clamp_min(0.0).sqrt().flip(-1)


# --------------------------------------------------------------------------------------------------------------------
# Streamed Gram accumulators
# --------------------------------------------------------------------------------------------------------------------


def _inverse_or_zero(values: torch.Tensor) -> torch.Tensor:
    """``1 / v`` where ``v > 0``, else 0 (zero rows stay zero instead of becoming NaN)."""
    return torch.where(values > 0, values.reciprocal(), torch.zeros((), dtype=values.dtype, device=values.device))


class _GramState:
    """Float64 Gram matrices plus row counters, flattenable into one buffer for a single ``all_reduce``."""

    def __init__(self, gram_shape: Tuple[int, ...], row_normalized: bool, device: Optional[torch.device]) -> None:
        self.row_normalized = row_normalized
        self.gram = torch.zeros(gram_shape, dtype=torch.float64, device=device)
        self.num_rows = 0
        self.zero_rows = 0

    def _prepare(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        if rows.dim() != 2 or rows.shape[1] != width:
            raise ValueError(f"{type(self).__name__}.add: expected rows of shape [n, {width}], got {tuple(rows.shape)}")
        x = rows.detach().to(device=self.gram.device, dtype=torch.float64)
        self.num_rows += x.shape[0]
        return x

    def _count_zero_rows(self, squared_norms: torch.Tensor) -> None:
        self.zero_rows += int((squared_norms == 0).sum())

    def flat_state(self) -> torch.Tensor:
        """``[numel(gram) + 2]``: the Gram entries, then ``num_rows`` and ``zero_rows`` (exact in float64)."""
        counts = torch.tensor([self.num_rows, self.zero_rows], dtype=torch.float64, device=self.gram.device)
        return torch.cat([self.gram.flatten(), counts])

    def load_flat_state(self, flat: torch.Tensor) -> None:
        """Inverse of :meth:`flat_state` (after an ``all_reduce`` of it)."""
        n = self.gram.numel()
        self.gram.copy_(flat[:n].view_as(self.gram))
        self.num_rows = int(flat[n].item())
        self.zero_rows = int(flat[n + 1].item())

    def merge_(self, other: "_GramState") -> "_GramState":
        """Adds another accumulator of the same shape (another row shard or chunk of the same matrix)."""
        if type(other) is not type(self):
            raise ValueError(f"merge_: cannot add a {type(other).__name__} to a {type(self).__name__}")
        if other.gram.shape != self.gram.shape or other.row_normalized != self.row_normalized:
            raise ValueError(
                f"merge_: accumulators differ (gram {tuple(other.gram.shape)} vs {tuple(self.gram.shape)}, "
                f"row_normalized {other.row_normalized} vs {self.row_normalized})"
            )
        self.gram += other.gram.to(self.gram.device)
        self.num_rows += other.num_rows
        self.zero_rows += other.zero_rows
        return self

    def all_reduce_(self, group: Optional[dist.ProcessGroup] = None) -> "_GramState":
        """Sums the accumulators of every rank of ``group``; every rank ends with the same state."""
        flat = self.flat_state()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self.load_flat_state(flat)
        return self

    def singular_values(self) -> torch.Tensor:
        """Singular values from the accumulated Gram, float64, descending along the last dimension."""
        return singular_values_from_gram(self.gram)


class GramAccumulator(_GramState):
    """Accumulates the ``d x d`` Gram matrix ``E^T E`` of a matrix fed in row chunks, in float64.

    Feeding every row of ``E`` once (in any order, in any chunks, on any ranks followed by :meth:`all_reduce_`) gives
    exactly the singular values of ``E`` (or of ``E`` with L2-normalised rows) without holding ``E``: memory is
    ``O(d^2)``. For a matrix whose columns are split over ranks, assemble full-width row chunks first (see
    :func:`collapse_from_sharded`): cross terms between column blocks need both blocks of a row together.

    Args:
        dim: the number of columns ``d``.
        row_normalized: L2-normalise every row before accumulating (zero rows stay zero and are counted).
        device: where the Gram lives (rows are moved there chunk by chunk).

    Example::

        import torch
        from multiembed.models.collapse import GramAccumulator

        table = torch.randn(1000, 10)
        acc = GramAccumulator(dim=10)
        for chunk in table.split(256):
            acc.add(chunk)
        ia = acc.information_abundance()
    """

    def __init__(self, dim: int, row_normalized: bool = True, device: Optional[torch.device] = None) -> None:
        if dim < 1:
            raise ValueError(f"GramAccumulator: dim must be >= 1, got {dim}")
        super().__init__((dim, dim), row_normalized, device)
        self.dim = dim

    def add(self, rows: torch.Tensor) -> None:
        """Adds a chunk of rows ``[n, dim]`` (any float dtype, any device)."""
        x = self._prepare(rows, self.dim)
        squared_norms = x.square().sum(dim=1)
        self._count_zero_rows(squared_norms)
        # sum_r e_r e_r^T / |e_r|^2 as one GEMM with row weights (zero rows weigh 0): no normalised copy of the chunk.
        left = x.T * _inverse_or_zero(squared_norms) if self.row_normalized else x.T
        self.gram.addmm_(left, x)

    def information_abundance(self) -> float:
        """IA of the rows accumulated so far."""
        return information_abundance(self.singular_values())


class ProjectedGramAccumulator(_GramState):
    """Gram matrices of rows seen through ``P`` linear maps: ``G_p = sum_r (W_p e_r)(W_p e_r)^T``, in float64.

    For DCNv2 sub-embeddings: with ``W_p`` the block ``W_{i->p}`` of the first cross weight, ``G_p`` is the Gram of
    field ``i``'s table as field ``p`` sees it, ``E_i W_{i->p}^T``. Row normalisation applies to each projected row
    ``W_p e_r`` (normalising ``e_r`` first would change nothing: a per-row scale cancels).

    The state kept is the input-space Gram ``M_p = sum_r w_rp e_r e_r^T`` with ``w_rp = 1 / |W_p e_r|^2`` (1 for raw
    rows), and ``G_p = W_p M_p W_p^T``: a chunk costs two GEMMs against the ``d_in (d_in + 1) / 2`` distinct outer
    products of its rows instead of materialising all ``P`` projections (``P * d_out`` floats a row). ``gram``
    holds the upper triangles of the ``M_p``, ``[P, d_in (d_in + 1) / 2]``; memory ``O(P * d_in^2)``.

    Args:
        projections: ``[P, d_out, d_in]``.
        row_normalized: L2-normalise every projected row.
        device: where the Grams live.

    Example::

        import torch
        from multiembed.models.collapse import ProjectedGramAccumulator

        table, maps = torch.randn(500, 4), torch.randn(3, 4, 4)
        acc = ProjectedGramAccumulator(maps)
        acc.add(table)
        ias = acc.information_abundance()  # 3 values, one per map
    """

    def __init__(
        self, projections: torch.Tensor, row_normalized: bool = True, device: Optional[torch.device] = None
    ) -> None:
        if projections.dim() != 3 or min(projections.shape) < 1:
            raise ValueError(
                f"ProjectedGramAccumulator: projections must be [P, d_out, d_in], got {tuple(projections.shape)}"
            )
        num_maps, d_out, d_in = projections.shape
        # M_p is symmetric: keep its upper triangle, [P, d_in (d_in + 1) / 2], and half the GEMM work.
        self._upper = torch.triu_indices(d_in, d_in)
        super().__init__((num_maps, self._upper.shape[1]), row_normalized, device)
        self._upper = self._upper.to(self.gram.device)
        self.projections = projections.detach().to(device=self.gram.device, dtype=torch.float64)
        # |W_p e|^2 = sum_{a<=b} c_ab (W_p^T W_p)_ab e_a e_b with c = 1 on the diagonal, 2 off it: one GEMM a chunk.
        forms = (self.projections.transpose(1, 2) @ self.projections)[:, self._upper[0], self._upper[1]]
        self._norm_forms = (forms * torch.where(self._upper[0] == self._upper[1], 1.0, 2.0).to(forms)).T
        self.num_maps, self.d_out, self.d_in = num_maps, d_out, d_in

    def add(self, rows: torch.Tensor) -> None:
        """Adds a chunk of rows ``[n, d_in]``."""
        x = self._prepare(rows, self.d_in)
        self._count_zero_rows(x.square().sum(dim=1))
        outer = x[:, self._upper[0]] * x[:, self._upper[1]]  # [n, d_in (d_in + 1) / 2]
        if self.row_normalized:
            weights = _inverse_or_zero(outer @ self._norm_forms)  # [n, P]
            self.gram += weights.T @ outer
        else:
            self.gram += outer.sum(dim=0)

    def merge_(self, other: "_GramState") -> "_GramState":
        """Adds another accumulator of the same maps (another row shard or chunk of the same table)."""
        if isinstance(other, ProjectedGramAccumulator) and not torch.equal(other.projections, self.projections):
            raise ValueError("merge_: the accumulators project through different maps")
        return super().merge_(other)

    def input_grams(self) -> torch.Tensor:
        """``[P, d_in, d_in]``: the weighted input-space Grams ``M_p``."""
        full = torch.zeros(self.num_maps, self.d_in, self.d_in, dtype=torch.float64, device=self.gram.device)
        full[:, self._upper[0], self._upper[1]] = self.gram
        full[:, self._upper[1], self._upper[0]] = self.gram
        return full

    def projected_grams(self) -> torch.Tensor:
        """``[P, d_out, d_out]``: ``G_p = W_p M_p W_p^T``."""
        return self.projections @ self.input_grams() @ self.projections.transpose(1, 2)

    def singular_values(self) -> torch.Tensor:
        """``[P, d_out]`` singular values of the projected rows, descending."""
        return singular_values_from_gram(self.projected_grams())

    def information_abundance(self) -> List[float]:
        """IA of the rows seen through each map, ``[P]``."""
        return [information_abundance(s) for s in self.singular_values()]


# --------------------------------------------------------------------------------------------------------------------
# Shards and the layout of sets in tables
# --------------------------------------------------------------------------------------------------------------------


class EmbeddingSliceLike(Protocol):
    """Where one (field, set) lives: columns ``[col_start, col_stop)`` of table ``table_name`` (the model's
    ``sparse_arch.table_layout`` entries have these attributes). ``col_stop - col_start`` is the logical set width
    ``d`` (stored padding excluded)."""

    table_name: str
    field: str
    set_index: int
    col_start: int
    col_stop: int


@dataclass(frozen=True)
class LocalShard:
    """The block of an embedding table this rank holds.

    Attributes:
        table_name: the table.
        tensor: ``[rows_local, cols_local]``, rows ``[row_offset, row_offset + rows_local)`` and columns
            ``[col_offset, col_offset + cols_local)`` of the table.
        row_offset: first table row held.
        col_offset: first table column held.
    """

    table_name: str
    tensor: torch.Tensor
    row_offset: int = 0
    col_offset: int = 0

    def __post_init__(self) -> None:
        if self.tensor.dim() != 2:
            raise ValueError(
                f"LocalShard {self.table_name!r}: tensor must be 2-D, got shape {tuple(self.tensor.shape)}"
            )
        if self.row_offset < 0 or self.col_offset < 0:
            raise ValueError(
                f"LocalShard {self.table_name!r}: offsets must be >= 0, got ({self.row_offset}, {self.col_offset})"
            )


def local_shards_from_tensors(
    tables: Mapping[str, Any], rank: int = 0, replicated_owner: int = 0
) -> List[LocalShard]:
    """This rank's :class:`LocalShard` list from table weights as a (sharded) model's state dict holds them.

    Accepts, per table name: a ``ShardedTensor`` (TorchRec's row-/column-/table-wise sharded state), a ``DTensor``
    whose local tensor lists shards and offsets (TorchRec's ``LocalShardsWrapper``), or a plain tensor. A plain
    tensor is taken as the whole table replicated on every rank (data-parallel tables): only ``replicated_owner``
    contributes it, or every row would count once per rank.

    Args:
        tables: table name -> weight.
        rank: this process's rank in the group the analysis runs on.
        replicated_owner: the rank that contributes replicated (plain) tables.

    Returns:
        the local shards (empty for a rank that holds none).
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    shards: List[LocalShard] = []
    for name, weight in tables.items():
        if isinstance(weight, ShardedTensor):
            for shard in weight.local_shards():
                row_offset, col_offset = shard.metadata.shard_offsets
                shards.append(LocalShard(name, shard.tensor, int(row_offset), int(col_offset)))
        elif isinstance(weight, DTensor):
            local = weight.to_local()
            if not (hasattr(local, "local_shards") and hasattr(local, "local_offsets")):
                raise ValueError(
                    f"table {name!r}: a DTensor without per-shard offsets ({type(local).__name__}); pass its "
                    "local shards as LocalShard(table, tensor, row_offset, col_offset) instead"
                )
            for tensor, offsets in zip(local.local_shards(), local.local_offsets()):
                shards.append(LocalShard(name, tensor, int(offsets[0]), int(offsets[1])))
        elif isinstance(weight, torch.Tensor):
            if rank == replicated_owner:
                shards.append(LocalShard(name, weight))
        else:
            raise ValueError(
                f"table {name!r}: expected a tensor, ShardedTensor or DTensor, got {type(weight).__name__}"
            )
    return shards


@dataclass(frozen=True)
class _ShardInfo:
    """Where one block of a table lives (what every rank learns about every other rank's shards)."""

    rank: int
    table_name: str
    row_offset: int
    num_rows: int
    col_offset: int
    num_cols: int

    @property
    def row_stop(self) -> int:
        return self.row_offset + self.num_rows

    @property
    def col_stop(self) -> int:
        return self.col_offset + self.num_cols

    def overlaps(self, rows: Tuple[int, int], cols: Tuple[int, int]) -> bool:
        rows_meet = self.row_offset < rows[1] and rows[0] < self.row_stop
        return rows_meet and self.col_offset < cols[1] and cols[0] < self.col_stop


@dataclass(frozen=True)
class _TableGeometry:
    num_rows: int
    num_cols: int
    shards: List[_ShardInfo]


@dataclass(frozen=True)
class _Piece:
    """Columns ``[col_start, col_stop)`` of a table, placed at ``unit_col`` in an analysed unit."""

    table_name: str
    col_start: int
    col_stop: int
    unit_col: int = 0


@dataclass
class _Unit:
    """One analysed matrix (a field's set, or its sets concatenated) and the accumulators fed from it."""

    pieces: List[_Piece]
    num_rows: int
    width: int
    sinks: List[_GramState]


class _Collectives:
    """The few collectives the analysis needs; a world of one when no process group is used."""

    def __init__(self, group: Optional[dist.ProcessGroup], distributed: bool) -> None:
        self.group = group
        self.distributed = distributed
        self.rank = dist.get_rank(group) if distributed else 0
        self.world_size = dist.get_world_size(group) if distributed else 1

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def reduce_sum_(self, tensor: torch.Tensor, dst_group_rank: int) -> None:
        if self.distributed:
            dst = dist.get_global_rank(self.group, dst_group_rank) if self.group is not None else dst_group_rank
            dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM, group=self.group)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)


def _table_geometry(infos: Sequence[_ShardInfo]) -> Dict[str, _TableGeometry]:
    """Table extents from every rank's shards; raises when shards overlap or leave holes."""
    by_table: Dict[str, List[_ShardInfo]] = {}
    for info in infos:
        by_table.setdefault(info.table_name, []).append(info)
    geometry = {}
    for name, shards in by_table.items():
        rows = max(s.row_stop for s in shards)
        cols = max(s.col_stop for s in shards)
        for index, a in enumerate(shards):
            for b in shards[index + 1 :]:
                if a.overlaps((b.row_offset, b.row_stop), (b.col_offset, b.col_stop)):
                    raise ValueError(
                        f"table {name!r}: shards on ranks {a.rank} and {b.rank} overlap (rows "
                        f"{a.row_offset}:{a.row_stop} x cols {a.col_offset}:{a.col_stop} and rows "
                        f"{b.row_offset}:{b.row_stop} x cols {b.col_offset}:{b.col_stop}); "
                        "pass a replicated table from one rank only"
                    )
        covered = sum(s.num_rows * s.num_cols for s in shards)
        if covered != rows * cols:
            raise ValueError(
                f"table {name!r}: shards cover {covered} of its {rows} x {cols} = {rows * cols} entries; "
                "every rank must pass all of its shards of the table"
            )
        geometry[name] = _TableGeometry(rows, cols, shards)
    return geometry


def _row_chunks(unit: _Unit, geometry: Mapping[str, _TableGeometry], chunk_rows: int) -> List[Tuple[int, int]]:
    """Row chunks ``[start, stop)`` that never straddle a shard's row boundary (so each has fixed holders)."""
    boundaries = {0, unit.num_rows}
    for table in {p.table_name for p in unit.pieces}:
        for shard in geometry[table].shards:
            boundaries.update((shard.row_offset, shard.row_stop))
    edges = sorted(boundaries)
    chunks = []
    for start, stop in zip(edges[:-1], edges[1:]):
        chunks.extend((r, min(stop, r + chunk_rows)) for r in range(start, stop, chunk_rows))
    return chunks


def _holders(unit: _Unit, rows: Tuple[int, int], geometry: Mapping[str, _TableGeometry]) -> List[int]:
    """Ranks holding some of the unit's entries in ``rows``."""
    ranks = set()
    for piece in unit.pieces:
        for shard in geometry[piece.table_name].shards:
            if shard.overlaps(rows, (piece.col_start, piece.col_stop)):
                ranks.add(shard.rank)
    return sorted(ranks)


def _fill_chunk(buffer: torch.Tensor, unit: _Unit, rows: Tuple[int, int], local: Sequence[LocalShard]) -> None:
    """Copies this rank's part of the unit's rows ``[rows[0], rows[1])`` into ``buffer`` ``[rows, width]``."""
    for piece in unit.pieces:
        for shard in local:
            if shard.table_name != piece.table_name:
                continue
            r0 = max(rows[0], shard.row_offset)
            r1 = min(rows[1], shard.row_offset + shard.tensor.shape[0])
            c0 = max(piece.col_start, shard.col_offset)
            c1 = min(piece.col_stop, shard.col_offset + shard.tensor.shape[1])
            if r0 >= r1 or c0 >= c1:
                continue
            block = shard.tensor[
                r0 - shard.row_offset : r1 - shard.row_offset, c0 - shard.col_offset : c1 - shard.col_offset
            ]
            u0 = piece.unit_col + c0 - piece.col_start
            buffer[r0 - rows[0] : r1 - rows[0], u0 : u0 + c1 - c0].copy_(block.detach())  # converts dtype and device


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CollapseResult:
    """Collapse metrics of one model's embedding tables.

    Attributes:
        row_normalized: whether rows were L2-normalised before the spectra.
        dim: one set's logical width ``d`` (e.g. 10 for ``dcnv2-me-4x``, 40 for ``dcnv2-se-4x``).
        fields: field names in the model's order.
        vocab_sizes: field -> rows of its table ``D_i``.
        sets: one ``{field: IA}`` per set (``K`` entries; SE has one).
        spectra: one ``{field: [s_1/s_1, ..., s_d/s_1]}`` per set (descending, normalised by the largest).
        concat: ``{field: IA}`` of the field's ``K`` sets concatenated ``[D_i, K*d]`` (rows normalised after the
            concatenation); None for SE (``K == 1``) or when not requested.
        concat_spectra: normalised spectra of the concatenations, like ``spectra``; None with ``concat``.
        random_init: ``{field: IA}`` of a random table of shape ``[D_i, d]`` (uniform initialiser, fixed seed);
            None when not requested.
        random_init_seed: the seed behind ``random_init``.
        sub_embedding: DCNv2 only, one ``{"fields": [...], "ia": [[...]]}`` per set, ``ia[i][j]`` the IA of field
            ``i``'s table as field ``j`` sees it through the first cross layer, ``E_i W_{i->j}^T``; else None.
        zero_rows: one ``{field: count}`` per set of all-zero rows (they add nothing to any spectrum).
    """

    row_normalized: bool
    dim: int
    fields: List[str]
    vocab_sizes: Dict[str, int]
    sets: List[Dict[str, float]]
    spectra: List[Dict[str, List[float]]]
    concat: Optional[Dict[str, float]] = None
    concat_spectra: Optional[Dict[str, List[float]]] = None
    random_init: Optional[Dict[str, float]] = None
    random_init_seed: Optional[int] = None
    sub_embedding: Optional[List[Dict[str, Any]]] = None
    zero_rows: Optional[List[Dict[str, int]]] = None

    @property
    def num_sets(self) -> int:
        return len(self.sets)

    def whole_field(self) -> Dict[str, float]:
        """IA of each field's whole embedding, the figure comparable across SE and ME of one size: SE's one table,
        ME's sets concatenated.

        Raises:
            ValueError: an ME result analysed without ``concat``.
        """
        if self.num_sets == 1:
            return dict(self.sets[0])
        if self.concat is None:
            raise ValueError(f"this result has {self.num_sets} sets but no concatenated IA (analyse with concat=True)")
        return dict(self.concat)

    def set_summary(self) -> List[Dict[str, float]]:
        """Per set: ``{"mean": ..., "min": ...}`` of the IA over fields (what training logs)."""
        return summarize_sets(self.sets)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CollapseResult":
        """Inverse of :meth:`to_dict` (derived keys such as ``set_summary`` are recomputed, not read)."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (the content of ``collapse.json``)."""
        return {
            "row_normalized": self.row_normalized,
            "dim": self.dim,
            "num_sets": self.num_sets,
            "fields": list(self.fields),
            "vocab_sizes": dict(self.vocab_sizes),
            "sets": [dict(s) for s in self.sets],
            "set_summary": self.set_summary(),
            "spectra": [dict(s) for s in self.spectra],
            "concat": None if self.concat is None else dict(self.concat),
            "concat_spectra": None if self.concat_spectra is None else dict(self.concat_spectra),
            "random_init": None if self.random_init is None else dict(self.random_init),
            "random_init_seed": self.random_init_seed,
            "sub_embedding": self.sub_embedding,
            "zero_rows": self.zero_rows,
        }


def summarize_sets(sets: Sequence[Mapping[str, float]]) -> List[Dict[str, float]]:
    """Per set, the mean and min of the IA over fields.

    Args:
        sets: one ``{field: IA}`` per set.

    Returns:
        one ``{"mean": float, "min": float}`` per set.
    """
    return [{"mean": float(np.mean(list(s.values()))), "min": float(min(s.values()))} for s in sets]


# --------------------------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """The validated table layout: fields in model order, ``K`` sets of width ``d``, (field, set) -> columns."""

    fields: List[str]
    num_sets: int
    dim: int
    slots: Dict[Tuple[str, int], _Piece]

    def key(self) -> Tuple[Any, ...]:
        return tuple(sorted((f, k, p.table_name, p.col_start, p.col_stop) for (f, k), p in self.slots.items()))


def _parse_layout(table_layout: Sequence[EmbeddingSliceLike]) -> _Layout:
    if not table_layout:
        raise ValueError("table_layout is empty")
    fields: List[str] = []
    slots: Dict[Tuple[str, int], _Piece] = {}
    widths = set()
    for s in table_layout:
        if s.col_stop <= s.col_start or s.col_start < 0:
            raise ValueError(
                f"table_layout: field {s.field!r} set {s.set_index}: bad columns [{s.col_start}, {s.col_stop})"
            )
        key = (s.field, int(s.set_index))
        if key in slots:
            raise ValueError(f"table_layout: field {s.field!r} set {s.set_index} appears twice")
        slots[key] = _Piece(s.table_name, int(s.col_start), int(s.col_stop))
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


def _vocab_sizes(layout: _Layout, geometry: Mapping[str, _TableGeometry]) -> Dict[str, int]:
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


def _random_table_chunk(
    seed: int, field_index: int, chunk_index: int, rows: int, dim: int, bound: float
) -> torch.Tensor:
    # One generator per (seed, field, chunk): the random table is the same whatever the number of ranks.
    state = np.random.SeedSequence([seed, field_index, chunk_index]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state >> 1))
    return torch.empty(rows, dim, dtype=torch.float64).uniform_(-bound, bound, generator=generator)


def _stream_unit(
    unit: _Unit,
    comm: _Collectives,
    local_shards: Sequence[LocalShard],
    geometry: Mapping[str, _TableGeometry],
    chunk_rows: int,
    device: torch.device,
    bar: tqdm,
) -> None:
    """Feeds every row of the unit, once, to the unit's accumulators on exactly one rank."""
    for rows in _row_chunks(unit, geometry, chunk_rows):
        holders = _holders(unit, rows, geometry)
        bar.update(rows[1] - rows[0])
        if len(holders) == 1 and holders[0] != comm.rank:
            continue
        shape = (rows[1] - rows[0], unit.width)
        if len(holders) == 1:
            # The one holder's shards cover these rows completely (checked with the geometry), so no zeroing.
            buffer = torch.empty(shape, dtype=torch.float64, device=device)
            _fill_chunk(buffer, unit, rows, local_shards)
        else:
            # The columns of these rows sit on several ranks, and the Gram's cross terms need them side by side:
            # one holder assembles the rows (a collective, so every rank takes part; the others send zeros).
            owner = holders[(rows[0] // chunk_rows) % len(holders)]
            buffer = torch.zeros(shape, dtype=torch.float64, device=device)
            if comm.rank in holders:
                _fill_chunk(buffer, unit, rows, local_shards)
            comm.reduce_sum_(buffer, owner)
            if comm.rank != owner:
                continue
        for sink in unit.sinks:
            sink.add(buffer)


def _all_reduce_accumulators(accumulators: Sequence[_GramState], comm: _Collectives) -> None:
    """Sums every accumulator over the ranks with one float64 ``all_reduce``."""
    if not accumulators:
        return
    flat = torch.cat([a.flat_state() for a in accumulators])
    comm.all_reduce_sum_(flat)
    offset = 0
    for acc in accumulators:
        size = acc.gram.numel() + 2
        acc.load_flat_state(flat[offset : offset + size])
        offset += size


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
        _Collectives(group, distributed), local_shards, table_layout, row_normalized=row_normalized, concat=concat,
        random_init_seed=random_init_seed, cross_weights=cross_weights, cross_fields=cross_fields,
        chunk_rows=chunk_rows, device=device, progress=progress,
    )


def _analyze(
    comm: _Collectives,
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
        _ShardInfo(comm.rank, s.table_name, s.row_offset, s.tensor.shape[0], s.col_offset, s.tensor.shape[1])
        for s in local_shards
    ]
    gathered = comm.all_gather_object(((*options_key, tuple(cross_fields)), infos))
    for other_rank, (other_key, _) in enumerate(gathered):
        if other_key != gathered[comm.rank][0]:
            raise ValueError(
                f"collapse_from_sharded: rank {other_rank} passed a different table_layout or options than rank "
                f"{comm.rank}"
            )
    geometry = _table_geometry([info for _, rank_infos in gathered for info in rank_infos])
    vocab_sizes = _vocab_sizes(layout, geometry)
    maps = _cross_maps(layout, cross_weights, cross_fields, device) if cross_weights is not None else {}

    units: List[_Unit] = []
    set_acc: Dict[Tuple[str, int], GramAccumulator] = {}
    sub_acc: Dict[Tuple[str, int], ProjectedGramAccumulator] = {}
    concat_acc: Dict[str, GramAccumulator] = {}
    for field in fields:
        for k in range(num_sets):
            set_acc[(field, k)] = GramAccumulator(dim, row_normalized, device)
            sinks: List[_GramState] = [set_acc[(field, k)]]
            if (field, k) in maps:
                sub_acc[(field, k)] = ProjectedGramAccumulator(maps[(field, k)], row_normalized, device)
                sinks.append(sub_acc[(field, k)])
            units.append(_Unit([layout.slots[(field, k)]], vocab_sizes[field], dim, sinks))
        if concat and num_sets > 1:
            concat_acc[field] = GramAccumulator(num_sets * dim, row_normalized, device)
            pieces = [dataclasses.replace(layout.slots[(field, k)], unit_col=k * dim) for k in range(num_sets)]
            units.append(_Unit(pieces, vocab_sizes[field], num_sets * dim, [concat_acc[field]]))
    random_acc: Dict[str, GramAccumulator] = {}
    if random_init_seed is not None:
        random_acc = {field: GramAccumulator(dim, row_normalized, device) for field in fields}

    total_rows = sum(u.num_rows for u in units) + (sum(vocab_sizes.values()) if random_acc else 0)
    with tqdm(total=total_rows, desc="collapse analysis", unit="row", unit_scale=True, disable=not progress) as bar:
        for unit in units:
            _stream_unit(unit, comm, local_shards, geometry, chunk_rows, device, bar)
        # xavier-uniform bound of the paper's code; IA is scale invariant, so only the uniform shape matters.
        bound = math.sqrt(6.0 / (sum(vocab_sizes.values()) + dim))
        for field_index, (field, acc) in enumerate(random_acc.items()):
            for chunk_index, start in enumerate(range(0, vocab_sizes[field], chunk_rows)):
                rows = min(chunk_rows, vocab_sizes[field] - start)
                if chunk_index % comm.world_size == comm.rank:  # chunks dealt round-robin over the ranks
                    acc.add(_random_table_chunk(random_init_seed, field_index, chunk_index, rows, dim, bound))
                bar.update(rows)
    _all_reduce_accumulators([*set_acc.values(), *sub_acc.values(), *concat_acc.values(), *random_acc.values()], comm)

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

        import torch
        from types import SimpleNamespace
        from multiembed.models.collapse import collapse_from_tables

        tables = {"t_a": torch.randn(100, 24), "t_b": torch.randn(50, 24)}  # fused: 2 sets of d=10 stored as 12
        layout = [SimpleNamespace(table_name=t, field=f, set_index=k, col_start=12 * k, col_stop=12 * k + 10)
                  for t, f in (("t_a", "a"), ("t_b", "b")) for k in range(2)]
        result = collapse_from_tables(tables, layout)
        result.sets[0]["a"], result.concat["a"]
    """
    if "group" in options:
        raise ValueError("collapse_from_tables runs in one process; use collapse_from_sharded for a process group")
    shards = [LocalShard(name, weight) for name, weight in tables.items()]
    return _analyze(_Collectives(None, distributed=False), shards, table_layout, **{**_DEFAULT_OPTIONS, **options})


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The model zoo's model inside DistributedModelParallel / DDP wrappers and ``MultiEmbeddingTrain``."""
    while not hasattr(model, "sparse_arch"):
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not hasattr(model, "sparse_arch"):
        raise ValueError(f"{type(model).__name__} has no sparse_arch: expected a MultiEmbeddingModel (or DMP of one)")
    return model


def first_cross_weights(model: nn.Module) -> Optional[torch.Tensor]:
    """The first full-rank cross layer's weight per set, ``[K, F*d, F*d]`` over the categorical fields only, or
    None for a model without one (every backbone but DCNv2; low-rank DCN has no ``W_{i->j}`` blocks).

    The dense arch's field (DLRM-style models) comes last in the cross input, so its block is cut off.
    """
    from multiembed.models.interactions import BatchedCrossNet
    from multiembed.models.set_arch import CrossSetArch

    model = _unwrap_model(model)
    set_arch = getattr(model, "set_arch", None)
    if not isinstance(set_arch, CrossSetArch) or not isinstance(set_arch.crossnet, BatchedCrossNet):
        return None
    width = model.sparse_arch.num_fields * model.sparse_arch.set_dim
    return set_arch.cross_weights(0)[:, :width, :width]


def collapse_from_model(
    model: nn.Module, *, group: Optional[dist.ProcessGroup] = None, sub_embedding: bool = True, **options: Any
) -> CollapseResult:
    """Collapse metrics of a model zoo model, unsharded or sharded by DistributedModelParallel.

    A collective when ``torch.distributed`` is initialised: every rank calls it. Sharded tables (row-, column-,
    table-wise) contribute each rank's local shards; replicated tables (unsharded model, data-parallel tables)
    count once (rank 0's copy). Sub-embedding IA is added for full-rank DCNv2.

    Args:
        model: a ``MultiEmbeddingModel`` (or a DMP / DDP wrapping one), embeddings materialised.
        group: the process group (default: the default group when initialised, else this process alone).
        sub_embedding: compute DCNv2's sub-embedding IA when the model has a full-rank cross layer.
        **options: as for :func:`collapse_from_sharded` (``row_normalized``, ``concat``, ``random_init_seed``,
            ``chunk_rows``, ``device``, ``progress``).

    Returns:
        the :class:`CollapseResult`, identical on every rank.

    Example::

        import torch
        from multiembed.models import build_model
        from multiembed.models.collapse import collapse_from_model

        model = build_model("dcnv2-me-2x", {"f1": 100, "f2": 50}, device=torch.device("cpu"), hidden=16)
        result = collapse_from_model(model)
        result.sets[0]["f1"], result.sub_embedding[0]["ia"]
    """
    if "cross_weights" in options or "cross_fields" in options:
        raise ValueError("collapse_from_model reads the cross weights from the model; use sub_embedding=False to skip")
    model = _unwrap_model(model)
    sparse_arch = model.sparse_arch
    state = sparse_arch.embedding_bag_collection.state_dict()
    tables = {}
    for name in sparse_arch.table_names:
        key = f"embedding_bags.{name}.weight"
        if key not in state:
            raise ValueError(f"table {name!r}: {key} is not in the embedding collection's state dict")
        tables[name] = state[key]
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    cross = first_cross_weights(model) if sub_embedding else None
    return collapse_from_sharded(
        local_shards_from_tensors(tables, rank=rank),
        sparse_arch.table_layout,
        group=group,
        cross_weights=None if cross is None else list(cross),
        cross_fields=None if cross is None else list(sparse_arch.field_names),
        **options,
    )
