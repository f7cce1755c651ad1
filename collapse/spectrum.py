"""Spectrum maths: information abundance (IA), singular values, row normalisation and streamed Gram accumulators.

Information abundance of a matrix ``E`` with singular values ``s_1 >= ... >= s_d`` is ``IA(E) = sum(s) / s_1``, so
``1 <= IA <= d`` (Guo et al., ICML 2024).

Row normalisation: the authors' analysis code L2-normalises every row before the SVD; every function and accumulator
here takes ``row_normalized`` (the analysis defaults to True). Zero rows (all entries 0) cannot be normalised: they
are left at zero, so they add nothing to the spectrum in either mode (as they add nothing to the raw SVD), and the
accumulators count them (``zero_rows``).

Exact without holding a table: the singular values of ``E`` are the square roots of the eigenvalues of the ``d x d``
Gram matrix ``E^T E = sum_r e_r e_r^T``, a sum over rows. :class:`GramAccumulator` adds row chunks in float64, so a
table is streamed chunk by chunk and row shards on different ranks simply add their Grams (one ``all_reduce``).

Example::

    >>> import torch
    >>> from multiembed.collapse import information_abundance, singular_values
    >>> table = torch.randn(1000, 10)
    >>> ia = information_abundance(singular_values(table))  # close to 10 for a random table
    >>> 8.0 < ia <= 10.0
    True
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist


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


def _inverse_or_zero(values: torch.Tensor) -> torch.Tensor:
    """``1 / v`` where ``v > 0``, else 0 (zero rows stay zero instead of becoming NaN)."""
    return torch.where(values > 0, values.reciprocal(), torch.zeros((), dtype=values.dtype, device=values.device))


class GramState:
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

    def merge_(self, other: "GramState") -> "GramState":
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

    def all_reduce_(self, group: Optional[dist.ProcessGroup] = None) -> "GramState":
        """Sums the accumulators of every rank of ``group``; every rank ends with the same state."""
        flat = self.flat_state()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self.load_flat_state(flat)
        return self

    def singular_values(self) -> torch.Tensor:
        """Singular values from the accumulated Gram, float64, descending along the last dimension."""
        return singular_values_from_gram(self.gram)


class GramAccumulator(GramState):
    """Accumulates the ``d x d`` Gram matrix ``E^T E`` of a matrix fed in row chunks, in float64.

    Feeding every row of ``E`` once (in any order, in any chunks, on any ranks followed by :meth:`all_reduce_`) gives
    exactly the singular values of ``E`` (or of ``E`` with L2-normalised rows) without holding ``E``: memory is
    ``O(d^2)``. For a matrix whose columns are split over ranks, assemble full-width row chunks first (see
    :func:`~multiembed.collapse.collapse_from_sharded`): cross terms between column blocks need both blocks of a
    row together.

    Args:
        dim: the number of columns ``d``.
        row_normalized: L2-normalise every row before accumulating (zero rows stay zero and are counted).
        device: where the Gram lives (rows are moved there chunk by chunk).

    Example::

        >>> import torch
        >>> from multiembed.collapse import GramAccumulator, information_abundance, singular_values
        >>> table = torch.randn(1000, 10)
        >>> acc = GramAccumulator(dim=10)
        >>> for chunk in table.split(256):
        ...     acc.add(chunk)
        >>> acc.gram.shape, acc.num_rows
        (torch.Size([10, 10]), 1000)
        >>> abs(acc.information_abundance() - information_abundance(singular_values(table))) < 1e-9
        True
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


class ProjectedGramAccumulator(GramState):
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

        >>> import torch
        >>> from multiembed.collapse import ProjectedGramAccumulator
        >>> table, maps = torch.randn(500, 4), torch.randn(3, 4, 4)  # [n, d_in], [P, d_out, d_in]
        >>> acc = ProjectedGramAccumulator(maps)
        >>> acc.add(table)
        >>> acc.projected_grams().shape  # [P, d_out, d_out]
        torch.Size([3, 4, 4])
        >>> len(acc.information_abundance())  # one IA per map
        3
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

    def merge_(self, other: "GramState") -> "GramState":
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
