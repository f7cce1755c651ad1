"""Embedding-collapse metrics: information abundance (IA), singular-value spectra and sub-embedding IA, on shards.

Information abundance of a matrix ``E`` with singular values ``s_1 >= ... >= s_d`` is ``IA(E) = sum(s) / s_1``, so
``1 <= IA <= d`` (Guo et al., ICML 2024). It is computed per field on that field's ``[D_i, d]`` table, for ME once per
embedding set, and on the field's sets concatenated ``[D_i, K*d]`` (the figure comparable with SE of the same size).
No table is ever gathered: each rank streams its own shards in row chunks into float64 ``d x d`` Gram matrices, which
are summed over the ranks.

A layer of its own between the models and the trainer (``data -> models -> sharding -> collapse -> training ->
analysis -> cli``): it reads models, never the trainer, and importing :mod:`multiembed.models` does not import it.

- :mod:`~multiembed.collapse.spectrum`: IA, singular values, row normalisation, streamed Gram accumulators.
- :mod:`~multiembed.collapse.shards`: local shards, where they lie over the ranks, row chunks reaching one rank.
- :mod:`~multiembed.collapse.streaming`: :func:`collapse_from_sharded` (a collective) and
  :func:`collapse_from_tables` (one process).
- :mod:`~multiembed.collapse.result`: :class:`CollapseResult` (``collapse.json``) and :func:`summarize_sets`.
- :mod:`~multiembed.collapse.adapters`: :func:`collapse_from_model` for a model zoo model, plain, in
  ``MultiEmbeddingTrain`` or sharded by ``DistributedModelParallel``.

Example::

    >>> import torch
    >>> from multiembed.collapse import information_abundance, singular_values
    >>> table = torch.randn(1000, 10)  # [D, d]
    >>> 8.0 < information_abundance(singular_values(table)) <= 10.0  # close to d = 10 for a random table
    True
"""

import multiembed.runtime.stack_check  # noqa: F401  (checks the TorchRec stack before any torchrec import)

from multiembed.collapse.adapters import collapse_from_model, field_pair_maps, first_cross_weights, unwrap_model
from multiembed.collapse.result import CollapseResult, summarize_sets
from multiembed.collapse.shards import EmbeddingSliceLike, LocalShard, local_shards_from_tensors
from multiembed.collapse.spectrum import (
    GramAccumulator,
    ProjectedGramAccumulator,
    information_abundance,
    normalize_rows,
    singular_values,
    singular_values_from_gram,
)
from multiembed.collapse.streaming import (
    DEFAULT_CHUNK_ROWS,
    collapse_from_sharded,
    collapse_from_tables,
)

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "CollapseResult",
    "EmbeddingSliceLike",
    "GramAccumulator",
    "LocalShard",
    "ProjectedGramAccumulator",
    "collapse_from_model",
    "collapse_from_sharded",
    "collapse_from_tables",
    "field_pair_maps",
    "first_cross_weights",
    "information_abundance",
    "local_shards_from_tensors",
    "normalize_rows",
    "singular_values",
    "singular_values_from_gram",
    "summarize_sets",
    "unwrap_model",
]
