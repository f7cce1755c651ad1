"""The result of a collapse analysis (:class:`CollapseResult`, the content of ``collapse.json``) and per-set summaries.

Example::

    >>> from multiembed.collapse import summarize_sets
    >>> summarize_sets([{"a": 4.0, "b": 6.0}, {"a": 3.0, "b": 5.0}])  # K = 2 sets, IA per field
    [{'mean': 5.0, 'min': 4.0}, {'mean': 4.0, 'min': 3.0}]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np


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

    Example::

        >>> import torch
        >>> from types import SimpleNamespace
        >>> from multiembed.collapse import CollapseResult, collapse_from_tables
        >>> tables = {"t_a": torch.randn(100, 24)}  # fused: K=2 sets of d=10 stored as 12, [D, K * 12]
        >>> layout = [SimpleNamespace(table_name="t_a", field="a", set_index=k, col_start=12 * k, col_stop=12 * k + 10)
        ...           for k in range(2)]
        >>> result = collapse_from_tables(tables, layout)
        >>> result.num_sets, result.dim, result.vocab_sizes, len(result.spectra[0]["a"])
        (2, 10, {'a': 100}, 10)
        >>> list(result.whole_field())  # IA of the sets concatenated, [D, K * d]
        ['a']
        >>> CollapseResult.from_dict(result.to_dict()) == result
        True
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
        """The number of embedding sets ``K`` (1 for SE)."""
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
