"""Where blocks of embedding tables lie over the ranks, and how one analysed matrix's rows reach a single rank.

The analysis takes plain local shards (:class:`LocalShard`: a tensor and its row/column offsets in its table), so
nothing here knows TorchRec's sharding types beyond :func:`local_shards_from_tensors`, which reads them from a state
dict. Every rank learns every other rank's shard extents (``ShardInfo``, one ``all_gather_object``); from them each
analysed matrix (a ``Unit``: a field's set, or its sets side by side) is cut into row chunks that never straddle a
shard boundary. A chunk one rank holds in full width is accumulated there without communication; a chunk whose
columns lie on several ranks is summed (``reduce``, the other ranks contributing zeros) onto one holder, which then
has the full-width rows: Gram cross terms between column blocks cannot be formed from per-rank Grams.

Example::

    >>> import torch
    >>> from multiembed.collapse import LocalShard, local_shards_from_tensors
    >>> table = torch.randn(100, 24)
    >>> row_wise = [LocalShard("t_a", table[:60]), LocalShard("t_a", table[60:], row_offset=60)]  # rank 0, rank 1
    >>> local_shards_from_tensors({"t_a": table}, rank=1)  # a plain tensor is replicated: only rank 0 passes it
    []
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from multiembed.collapse.spectrum import GramState


class EmbeddingSliceLike(Protocol):
    """Where one (field, set) lives: columns ``[col_start, col_stop)`` of table ``table_name``.

    The model's ``sparse_arch.table_layout`` entries (:class:`~multiembed.models.TableSlice`) have these attributes.
    ``col_stop - col_start`` is the logical set width ``d`` (stored padding excluded).

    Attributes:
        table_name: the table holding the set.
        field: the categorical field.
        set_index: the embedding set ``k`` in ``[0, K)``.
        col_start: first column of the set in the table.
        col_stop: one past its last logical column.

    Example::

        >>> from types import SimpleNamespace
        >>> # fused layout: set 1 of field "a", d=10 stored padded to 12, is columns [12, 22) of table "t_a"
        >>> piece = SimpleNamespace(table_name="t_a", field="a", set_index=1, col_start=12, col_stop=22)
        >>> piece.col_stop - piece.col_start
        10
    """

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

    Example::

        >>> import torch
        >>> from multiembed.collapse import LocalShard
        >>> table = torch.randn(100, 24)
        >>> column_wise = LocalShard("t_a", table[:, 12:], col_offset=12)  # a rank holding columns [12, 24)
        >>> tuple(column_wise.tensor.shape)
        (100, 12)
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

    Example::

        >>> import torch
        >>> from multiembed.collapse import local_shards_from_tensors
        >>> shards = local_shards_from_tensors({"t_a": torch.randn(100, 24)}, rank=0)
        >>> [(s.table_name, tuple(s.tensor.shape), s.row_offset, s.col_offset) for s in shards]
        [('t_a', (100, 24), 0, 0)]
    """
    from torch.distributed.tensor import DTensor

    from multiembed.runtime.stack import private_api_error

    try:  # TorchRec 1.8 still hands out sharded tables as ShardedTensor (no public import path)
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError as e:  # pragma: no cover - depends on the installed torch
        raise private_api_error("torch.distributed._shard.sharded_tensor.ShardedTensor", e) from e

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
class ShardInfo:
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
class TableGeometry:
    num_rows: int
    num_cols: int
    shards: List[ShardInfo]
@dataclass(frozen=True)
class Piece:
    """Columns ``[col_start, col_stop)`` of a table, placed at ``unit_col`` in an analysed unit."""

    table_name: str
    col_start: int
    col_stop: int
    unit_col: int = 0


@dataclass
class Unit:
    """One analysed matrix (a field's set, or its sets concatenated) and the accumulators fed from it."""

    pieces: List[Piece]
    num_rows: int
    width: int
    sinks: List[GramState]
class Collectives:
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


def table_geometry(infos: Sequence[ShardInfo]) -> Dict[str, TableGeometry]:
    """Table extents from every rank's shards; raises when shards overlap or leave holes."""
    by_table: Dict[str, List[ShardInfo]] = {}
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
        geometry[name] = TableGeometry(rows, cols, shards)
    return geometry
def _row_chunks(unit: Unit, geometry: Mapping[str, TableGeometry], chunk_rows: int) -> List[Tuple[int, int]]:
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


def _holders(unit: Unit, rows: Tuple[int, int], geometry: Mapping[str, TableGeometry]) -> List[int]:
    """Ranks holding some of the unit's entries in ``rows``."""
    ranks = set()
    for piece in unit.pieces:
        for shard in geometry[piece.table_name].shards:
            if shard.overlaps(rows, (piece.col_start, piece.col_stop)):
                ranks.add(shard.rank)
    return sorted(ranks)


def _fill_chunk(buffer: torch.Tensor, unit: Unit, rows: Tuple[int, int], local: Sequence[LocalShard]) -> None:
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


def stream_unit(
    unit: Unit,
    comm: Collectives,
    local_shards: Sequence[LocalShard],
    geometry: Mapping[str, TableGeometry],
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


def all_reduce_accumulators(accumulators: Sequence[GramState], comm: Collectives) -> None:
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
