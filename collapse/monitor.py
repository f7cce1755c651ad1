"""The collapse monitor: fields whose information abundance fell below a fraction of a random initialisation's.

A freshly initialised table of shape ``[D_i, w]`` has an IA close to ``min(D_i, w)``; a collapsed one is far below.
The reference is the IA of a random uniform table of the *same shape* (:func:`random_init_ia`): ``[D_i, d]`` for a
set, ``[D_i, K*d]`` for the sets side by side. For ``w = d`` it is exactly ``collapse.json``'s ``random_init`` (same
seed, same tables, same bound). A field counts as collapsed in a set (or in the concatenation) when its IA is below
``fraction`` times that reference (``--collapse-warn``, 0.5 by default; 0 turns the monitor off).

Used by the trainer every ``--ia-every`` evaluations (the fields named in its progress line and in
``metrics.jsonl``), by ``multiembed analyze`` (marked in its summary and ``collapse.json``) and by the scaling study
(the random-init IA of each run's whole embedding).

Example::

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from multiembed.collapse import collapse_from_tables
    >>> from multiembed.collapse.monitor import CollapseMonitor
    >>> healthy = torch.randn(500, 24)
    >>> collapsed = torch.randn(500, 1) * torch.randn(1, 24)  # rank one: IA 1
    >>> tables = {"t_a": healthy, "t_b": collapsed}  # fused: K=2 sets of d=10 stored as 12
    >>> layout = [SimpleNamespace(table_name=t, field=f, set_index=k, col_start=12 * k, col_stop=12 * k + 10)
    ...           for t, f in (("t_a", "a"), ("t_b", "b")) for k in range(2)]
    >>> result = collapse_from_tables(tables, layout, random_init_seed=None)
    >>> [(c.field, c.where) for c in CollapseMonitor(0.5).check(result)]
    [('b', 'set 0'), ('b', 'set 1'), ('b', 'concat')]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from multiembed.collapse.result import CollapseResult
from multiembed.collapse.shards import all_reduce_accumulators, Collectives
from multiembed.collapse.spectrum import GramAccumulator, information_abundance
from multiembed.collapse.streaming import DEFAULT_CHUNK_ROWS, random_table_chunk


def random_init_ia(
    vocab_sizes: Mapping[str, int],
    width: int,
    *,
    seed: int = 0,
    row_normalized: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    group: Optional[dist.ProcessGroup] = None,
) -> Dict[str, float]:
    """IA of a uniform random ``[D_i, width]`` table per field: the reference of a fresh initialisation.

    The tables are those of :func:`~multiembed.collapse.collapse_from_sharded`'s ``random_init`` (one generator per
    (seed, field index, chunk), bound ``sqrt(6 / (sum_i D_i + width))``; IA is scale invariant), so with ``width`` =
    one set's ``d`` and the layout's field order the values equal ``collapse.json``'s ``random_init``. A collective
    when ``torch.distributed`` is initialised (chunks are dealt round-robin over the ranks, Grams summed).

    Args:
        vocab_sizes: field -> rows, in the model's field order.
        width: the table width (``d`` for a set, ``K * d`` for the sets side by side).
        seed: the random tables' seed.
        row_normalized: L2-normalise rows first (as the analysis compared with).
        chunk_rows: rows per generated chunk.
        group: the process group (default: the default group when initialised).

    Returns:
        field -> IA, in ``vocab_sizes``' order.

    Example::

        >>> ia = random_init_ia({"a": 1000, "tiny": 3}, 10)
        >>> 8.0 < ia["a"] <= 10.0, ia["tiny"] <= 3.0  # at most min(D, width)
        (True, True)
    """
    if width < 1:
        raise ValueError(f"random_init_ia: width must be >= 1, got {width}")
    distributed = dist.is_available() and dist.is_initialized()
    comm = Collectives(group, distributed)
    bound = math.sqrt(6.0 / (sum(vocab_sizes.values()) + width))
    accs: Dict[str, GramAccumulator] = {}
    for field_index, (field, rows_total) in enumerate(vocab_sizes.items()):
        acc = accs[field] = GramAccumulator(width, row_normalized, torch.device("cpu"))
        for chunk_index, start in enumerate(range(0, rows_total, chunk_rows)):
            if chunk_index % comm.world_size == comm.rank:
                rows = min(chunk_rows, rows_total - start)
                acc.add(random_table_chunk(seed, field_index, chunk_index, rows, width, bound))
    all_reduce_accumulators(list(accs.values()), comm)
    return {field: information_abundance(acc.singular_values()) for field, acc in accs.items()}


@dataclass(frozen=True)
class CollapsedField:
    """A field whose IA is below ``fraction`` x the random-init IA of the same shape.

    Attributes:
        field: the field.
        where: ``set k`` or ``concat`` (the sets side by side).
        ia: its IA.
        random_ia: the random-init IA of the same shape.
    """

    field: str
    where: str
    ia: float
    random_ia: float

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready (``metrics.jsonl``, ``collapse.json``)."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.field} ({self.where}: {self.ia:.2f} vs {self.random_ia:.2f})"


class CollapseMonitor:
    """Checks collapse results against the random-init IA of the same shapes (references computed once per width).

    Args:
        fraction: a field is collapsed when its IA is below ``fraction`` x the reference (0: the monitor is off).
        seed: the reference tables' seed (``collapse.json``'s ``random_init_seed`` is 0).
        group: the process group for the references (see :func:`random_init_ia`).
    """

    def __init__(self, fraction: float, seed: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"--collapse-warn: must be in [0, 1], got {fraction}")
        self.fraction = float(fraction)
        self.seed = seed
        self.group = group
        self._references: Dict[Tuple[Tuple[Tuple[str, int], ...], int, bool], Dict[str, float]] = {}

    @property
    def enabled(self) -> bool:
        """False for ``fraction`` 0."""
        return self.fraction > 0.0

    def reference(self, vocab_sizes: Mapping[str, int], width: int, row_normalized: bool = True) -> Dict[str, float]:
        """The random-init IA per field of ``[D_i, width]`` tables (cached; a collective on first use)."""
        key = (tuple(vocab_sizes.items()), int(width), bool(row_normalized))
        if key not in self._references:
            self._references[key] = random_init_ia(
                vocab_sizes, width, seed=self.seed, row_normalized=row_normalized, group=self.group
            )
        return self._references[key]

    def references(self, result: CollapseResult) -> Dict[str, Optional[Dict[str, float]]]:
        """``{"set": field -> IA of [D_i, d], "concat": field -> IA of [D_i, K*d] or None for one set}``."""
        vocab = {f: result.vocab_sizes[f] for f in result.fields}
        per_set = self.reference(vocab, result.dim, result.row_normalized)
        concat = None
        if result.num_sets > 1:
            concat = self.reference(vocab, result.num_sets * result.dim, result.row_normalized)
        return {"set": per_set, "concat": concat}

    def check(self, result: CollapseResult) -> List[CollapsedField]:
        """The collapsed (field, set) and (field, concatenation) entries of ``result``; empty when off.

        The concatenation is checked when ``result.concat`` is present (analyse with ``concat=True``).
        """
        if not self.enabled:
            return []
        refs = self.references(result)
        return collapsed_fields(result, self.fraction, refs["set"], refs["concat"])  # type: ignore[arg-type]


def collapsed_fields(
    result: CollapseResult,
    fraction: float,
    set_reference: Mapping[str, float],
    concat_reference: Optional[Mapping[str, float]] = None,
) -> List[CollapsedField]:
    """The entries of ``result`` below ``fraction`` x their reference, by field (model order), sets before concat.

    Args:
        result: the collapse metrics.
        fraction: the threshold as a fraction of the reference.
        set_reference: field -> random-init IA of one set's shape.
        concat_reference: field -> random-init IA of the concatenation's shape (None: the concatenation is not
            checked).
    """
    out: List[CollapsedField] = []
    for field in result.fields:
        for k, per_set in enumerate(result.sets):
            if per_set[field] < fraction * set_reference[field]:
                out.append(CollapsedField(field, f"set {k}", float(per_set[field]), float(set_reference[field])))
        if result.concat is not None and concat_reference is not None:
            value = result.concat[field]
            if value < fraction * concat_reference[field]:
                out.append(CollapsedField(field, "concat", float(value), float(concat_reference[field])))
    return out


def format_collapsed(entries: Sequence[CollapsedField], fraction: float, limit: int = 8) -> str:
    """One line naming the collapsed fields (at most ``limit``, then a count), e.g. for the trainer's progress."""
    if not entries:
        return ""
    shown = ", ".join(str(e) for e in entries[:limit])
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"collapsed (IA < {fraction:g} x random init): {shown}{more}"
