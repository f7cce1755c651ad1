"""The multi-embedding sparse arch: K embedding sets over one TorchRec ``EmbeddingBagCollection``.

Storage and padding
    FBGEMM's kernels need table widths divisible by 4 (a width-10 table fails in the fused CPU kernel and in DMP's
    table-wise and row-wise sharding), and the paper's width is 10. Each set's slice is therefore stored padded to
    the next multiple of 4 (``stored_set_dim``) and the padding is sliced off right after the lookup: it never
    enters the model, its gradient is exactly zero, and it is initialised to zero, so with SGD, Adagrad or Adam
    (weight decay included) it stays zero and the model is exactly the paper's. Parameters are counted logically
    (``embedding_params``, the paper's numbers) and physical bytes separately (``embedding_bytes``). Row-wise
    Adagrad is the exception: its per-row accumulator is the mean of ``g^2`` over the stored width, padding
    included, which rescales its step by ``sqrt(stored / logical)`` relative to an unpadded table.

Layouts (same model given the same weights)
    * ``fused``: one table per field of width ``K * stored_set_dim``; one TBE call looks up every field and set,
      and column-wise sharding with shard width ``stored_set_dim`` puts different sets on different ranks. With
      row-wise Adagrad the K sets of a row share one accumulator; with SGD, Adagrad or Adam the layouts are the
      same model.
    * ``per_set``: ``K * F`` tables of width ``stored_set_dim``; TorchRec names the outputs of a feature shared by
      several tables ``feature@table``.

Initialisation (``init``)
    * ``xavier_set`` (default, the paper's code): each set is one ``[sum_i D_i, d]`` table initialised
      xavier-uniform, i.e. every field's rows of set ``m`` are uniform in ``+-sqrt(6 / (sum_i D_i + d))``;
    * ``xavier_field``: xavier-uniform per field table, ``+-sqrt(6 / (D_i + d))``;
    * ``torchrec``: TorchRec's default, ``+-sqrt(1 / D_i)``.

    The bound is computed here from the full table sizes and carried by the table's ``init_fn``, because with
    ``meta`` + DMP the initialiser runs per shard. How TorchRec calls ``init_fn`` (torchrec 1.8,
    ``ShardedEmbeddingBagCollection.reset_parameters``): once per table on this rank's ``embedding_bags[t].weight``,
    which is the whole table (unsharded, data-parallel, table-wise), this rank's rows at full width (row-wise), an
    empty tensor where the rank holds nothing of the table, or, for column-wise sharding, a
    ``TableBatchedEmbeddingSlice`` of this rank's column shards of that table stacked *row-wise*
    (``[n_shards * rows, shard_width]``, ``_gen_named_parameters_by_table_fused``). The column offset is not passed.
    :class:`PaddedUniformInit` therefore zeroes columns by their position modulo ``stored_set_dim``, which is
    correct for every one of these views as long as column shards start and end on set boundaries (shard widths a
    multiple of ``stored_set_dim``); any other width raises instead of leaving padding non-zero.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, DataType, EmbeddingBagConfig, PoolingType
from torchrec.distributed.types import LazyAwaitable
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from multiembed.config.choices import InitScheme, Layout
from multiembed.models.managed import ManagedSpec, managed_collection, table_collection
from multiembed.models.precision import table_data_type

LAYOUTS: Tuple[str, ...] = Layout.values()
INIT_SCHEMES: Tuple[str, ...] = InitScheme.values()
FBGEMM_WIDTH_MULTIPLE = 4


def padded_set_dim(set_dim: int, multiple: int = FBGEMM_WIDTH_MULTIPLE) -> int:
    """The stored width of a set of logical width ``set_dim``: the next multiple of ``multiple`` (4 for FBGEMM)."""
    if set_dim < 1 or multiple < 1:
        raise ValueError(f"set_dim and multiple must be >= 1, got {set_dim}, {multiple}")
    return -(-set_dim // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class TableSlice:
    """Where one (field, set) lives: columns ``[col_start, col_stop)`` of table ``table_name``.

    ``col_stop - col_start`` is the logical set width ``d``; the stored padding (``[col_stop, col_start +
    stored_set_dim)``) is excluded. Column-wise shards map back to sets through these ranges.

    Example::

        >>> arch = build_sparse_arch({"f1": 10}, num_sets=2, set_dim=10, device=torch.device("meta"))
        >>> arch.table_layout[1]
        TableSlice(table_name='t_f1', field='f1', set_index=1, col_start=12, col_stop=22)
    """

    table_name: str
    field: str
    set_index: int
    col_start: int
    col_stop: int


@dataclasses.dataclass(frozen=True)
class PaddedUniformInit:
    """``init_fn`` of a stored table: uniform in ``+-bound`` on the logical columns, zero on the padding columns.

    Works on any view TorchRec passes (see the module docstring): the padding is found by column position modulo
    ``stored_set_dim``.

    Args:
        bound: the uniform bound, computed from the full table sizes.
        set_dim: d, logical columns per set.
        stored_set_dim: stored columns per set (``>= d``).
        table_name: for error messages.

    Raises (when called):
        ValueError: the view's width is not a multiple of ``stored_set_dim`` (a column shard that cuts a set).

    Example::

        >>> init = PaddedUniformInit(bound=0.1, set_dim=10, stored_set_dim=12, table_name="t_C1")
        >>> weight = init(torch.empty(100, 24))
        >>> bool((weight[:, 10:12] == 0).all() and (weight[:, 22:24] == 0).all())
        True
    """

    bound: float
    set_dim: int
    stored_set_dim: int
    table_name: str

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.numel() == 0:
            return weight
        width = weight.shape[-1]
        if width % self.stored_set_dim:
            raise ValueError(
                f"table {self.table_name}: a shard of width {width} cuts a stored set of width "
                f"{self.stored_set_dim}; shard column-wise in multiples of {self.stored_set_dim} so every shard holds "
                f"whole sets"
            )
        with torch.no_grad():
            weight.uniform_(-self.bound, self.bound)
            if self.stored_set_dim > self.set_dim:
                weight.unflatten(-1, (width // self.stored_set_dim, self.stored_set_dim))[..., self.set_dim :].zero_()
        return weight


def init_bound(init: str, vocab_sizes: Mapping[str, int], field: str, set_dim: int) -> float:
    """The uniform bound of ``field``'s rows under scheme ``init`` (see the module docstring)."""
    scheme = InitScheme.parse(init, "init", noun="init")
    if scheme is InitScheme.XAVIER_SET:
        return math.sqrt(6.0 / (sum(vocab_sizes.values()) + set_dim))
    if scheme is InitScheme.XAVIER_FIELD:
        return math.sqrt(6.0 / (vocab_sizes[field] + set_dim))
    return math.sqrt(1.0 / vocab_sizes[field])


def multi_embedding_tables(
    vocab_sizes: Mapping[str, int],
    num_sets: int,
    set_dim: int,
    layout: str = "fused",
    init: str = "xavier_set",
    stored_set_dim: Optional[int] = None,
    table_dtype: str = "fp32",
) -> List[EmbeddingBagConfig]:
    """The ``EmbeddingBagConfig``s of K sets over the fields of ``vocab_sizes`` (SUM pooling).

    Tables are named ``t_{field}`` (fused) or ``t_{field}_s{m}`` (per set), in field order then set order.

    Args:
        vocab_sizes: ``{field: rows}`` in schema order (the KJT keys).
        num_sets: K.
        set_dim: d, the logical width.
        layout: ``fused`` or ``per_set``.
        init: an entry of :data:`INIT_SCHEMES`.
        stored_set_dim: stored width per set (default: ``d`` padded to a multiple of 4; ``d`` itself gives the
            unpadded reference, usable unsharded only).
        table_dtype: storage dtype, ``fp32`` or ``fp16`` (``EmbeddingBagConfig.data_type``; FBGEMM's kernels return
            fp32 pooled embeddings from fp16 tables, and an fp16 table has no fp32 master copy).

    Raises:
        ValueError: no fields, a non-positive size, an unknown layout, init or table dtype,
            ``stored_set_dim < set_dim``.

    Example::

        >>> [(t.name, t.embedding_dim) for t in multi_embedding_tables({"a": 5, "b": 7}, 4, 10)]
        [('t_a', 48), ('t_b', 48)]
    """
    if not vocab_sizes:
        raise ValueError("vocab_sizes is empty: a model needs at least one categorical field")
    for field, rows in vocab_sizes.items():
        if int(rows) < 1:
            raise ValueError(f"field {field!r}: vocabulary size must be >= 1, got {rows}")
    if num_sets < 1 or set_dim < 1:
        raise ValueError(f"num_sets and set_dim must be >= 1, got {num_sets}, {set_dim}")
    Layout.parse(layout, "layout", noun="layout")
    InitScheme.parse(init, "init", noun="init")
    data_type = table_data_type(table_dtype)
    stored = padded_set_dim(set_dim) if stored_set_dim is None else stored_set_dim
    if stored < set_dim:
        raise ValueError(f"stored_set_dim ({stored}) must be >= set_dim ({set_dim})")
    tables: List[EmbeddingBagConfig] = []
    for field, rows in vocab_sizes.items():
        bound = init_bound(init, vocab_sizes, field, set_dim)
        names = [f"t_{field}"] if layout == "fused" else [f"t_{field}_s{m}" for m in range(num_sets)]
        width = num_sets * stored if layout == "fused" else stored
        for name in names:
            tables.append(
                EmbeddingBagConfig(
                    num_embeddings=int(rows),
                    embedding_dim=width,
                    name=name,
                    feature_names=[field],
                    pooling=PoolingType.SUM,
                    data_type=data_type,
                    weight_init_min=-bound,
                    weight_init_max=bound,
                    init_fn=PaddedUniformInit(bound, set_dim, stored, name),
                )
            )
    return tables


@torch.fx.wrap
def pooled_values_in_key_order(pooled: KeyedTensor, keys: List[str]) -> torch.Tensor:
    """The ``[B, sum of widths]`` values of ``pooled`` with the keys' column blocks in ``keys`` order.

    An unsharded (or one-rank) collection returns its keys in table order, which is the order the fused layout
    reads, so its values are used as they are; otherwise (sharded outputs are in shard order; the per-set layout
    reads sets before fields) TorchRec's ``KeyedTensor.regroup`` reorders them in one permute kernel. Wrapped for
    fx: the key comparison is plain Python and stays out of the traced graph. A lookup still in flight (a sharded
    managed collection's ``LazyAwaitable``) is waited for first.

    Example::

        >>> pooled = KeyedTensor(keys=["a", "b"], length_per_key=[1, 2], values=torch.tensor([[1.0, 2.0, 3.0]]))
        >>> pooled_values_in_key_order(pooled, ["b", "a"]).tolist()
        [[2.0, 3.0, 1.0]]
    """
    if isinstance(pooled, LazyAwaitable):
        pooled = pooled.wait()
    if pooled.keys() == keys:
        return pooled.values()
    return KeyedTensor.regroup([pooled], [keys])[0]


def _set_major_view(values: torch.Tensor, layout: str, num_sets: int, num_fields: int, stored: int) -> torch.Tensor:
    """The ``[K, B, F, stored]`` view of the lookup's ``[B, F * K * stored]`` (``fused``: fields, then sets) or
    ``[B, K * F * stored]`` (``per_set``: sets, then fields) values."""
    if layout == "fused":
        return values.reshape(-1, num_fields, num_sets, stored).permute(2, 0, 1, 3)
    return values.reshape(-1, num_sets, num_fields, stored).transpose(0, 1)


class _SetMajorGather(torch.autograd.Function):
    """``[B, F*K*stored]`` lookup values -> contiguous ``[K, B, F, d]``, the padding dropped, in one copy each way.

    Autograd's backward of the same view-slice-copy chain runs three passes over the padded gradient (zeros, the
    slice's copy, the reshape's copy out of the permuted layout); this one writes the lookup's gradient once, in its
    own layout, and zeroes only the padding columns.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, layout: str, num_sets: int, num_fields: int, stored: int,
                set_dim: int) -> torch.Tensor:
        ctx.layout, ctx.shape = layout, (num_sets, num_fields, stored, set_dim)
        view = _set_major_view(values, layout, num_sets, num_fields, stored)[..., :set_dim]
        return view.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        num_sets, num_fields, stored, set_dim = ctx.shape
        grad_values = grad.new_empty(grad.shape[1], num_fields * num_sets * stored)
        view = _set_major_view(grad_values, ctx.layout, num_sets, num_fields, stored)
        view[..., :set_dim] = grad
        if stored > set_dim:
            view[..., set_dim:] = 0.0
        return grad_values, None, None, None, None, None


@torch.fx.wrap
def gather_set_major(values: torch.Tensor, layout: str, num_sets: int, num_fields: int, stored: int,
                     set_dim: int) -> torch.Tensor:
    """The lookup's ``[B, F*K*stored]`` values (``layout`` order, see :class:`MultiEmbeddingSparseArch`) as
    contiguous ``[K, B, F, d]``: one copy gathers every field and set into set-major storage and drops the padding
    (per-field slices would cost 2F kernels forward and backward, which dominated the lookup on CPU); its backward
    writes the padded gradient once (:class:`_SetMajorGather`). Wrapped for fx: the layout arguments are Python
    values.

    Example::

        >>> values = torch.arange(24.0).view(1, 24)  # B = 1, fused: 2 fields x 3 sets x 4 stored (d = 2)
        >>> out = gather_set_major(values, "fused", 3, 2, 4, 2)
        >>> out.shape, out[1, 0].tolist()  # set 1: field 0 at columns 4-5, field 1 at 16-17
        (torch.Size([3, 1, 2, 2]), [[4.0, 5.0], [16.0, 17.0]])
    """
    return _SetMajorGather.apply(values, layout, num_sets, num_fields, stored, set_dim)


class MultiEmbeddingSparseArch(nn.Module):
    """K embedding sets over one ``EmbeddingBagCollection``: KJT -> ``[B, K, F, d]``.

    The collection is the module DMP shards; the KJT goes to it unmodified (the TorchRec train pipeline needs
    that). The output is a ``[B, K, F, d]`` view of set-major storage (``[K, B, F, d]`` contiguous): the set
    arches read each set's ``[B, F*d]`` block without a copy. The padding is removed in the same single copy that
    gathers the fields.

    Args:
        embedding_bag_collection: tables as built by :func:`multi_embedding_tables`: for ``fused`` one table per
            field of width ``K * stored_set_dim``; for ``per_set`` K tables per field of width ``stored_set_dim``
            (the field's tables in collection order are sets 0..K-1). One feature per table. Or such a collection
            behind TorchRec's managed-collision modules (:mod:`multiembed.models.managed`), which map raw ids to
            rows before the lookup.
        num_sets: K.
        set_dim: d, the logical width (``<=`` the stored width).
        layout: ``fused`` or ``per_set``.

    Raises:
        ValueError: the collection's tables do not match the layout, K or d.

    Example::

        >>> tables = multi_embedding_tables({"f1": 10, "f2": 20}, num_sets=2, set_dim=10)
        >>> arch = MultiEmbeddingSparseArch(EmbeddingBagCollection(tables), num_sets=2, set_dim=10)
        >>> features = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f1", "f2"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]))
        >>> arch(features).shape
        torch.Size([2, 2, 2, 10])
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        num_sets: int,
        set_dim: int,
        layout: str = "fused",
    ) -> None:
        super().__init__()
        Layout.parse(layout, "layout", noun="layout")
        if num_sets < 1 or set_dim < 1:
            raise ValueError(f"num_sets and set_dim must be >= 1, got {num_sets}, {set_dim}")
        # A managed collection returns (pooled, remapped features); the flag is fixed here because the sharded
        # module DMP substitutes keeps the contract and fx tracing cannot test the output's type.
        self.managed = isinstance(embedding_bag_collection, ManagedCollisionEmbeddingBagCollection)
        configs = table_collection(embedding_bag_collection).embedding_bag_configs()
        if not configs:
            raise ValueError("the embedding bag collection has no tables")
        self.embedding_bag_collection = embedding_bag_collection
        self.num_sets = num_sets
        self.set_dim = set_dim
        self.layout = layout
        self._tables: List[EmbeddingBagConfig] = list(configs)
        # Tables stored below fp32: an unsharded collection returns their dtype, so the lookup is cast to fp32 (a
        # sharded one already returns fp32, FBGEMM's output_dtype, and the cast is then a no-op).
        self._cast_to_fp32 = any(t.data_type != DataType.FP32 for t in self._tables)
        self.field_names: List[str] = []
        self.vocab_sizes: Dict[str, int] = {}
        self.table_layout: List[TableSlice] = []
        self._slice_of: Dict[str, TableSlice] = {}  # table -> its first (field, set)
        self.stored_set_dim = self._read_tables(self._tables)
        output_names = [name for names in get_embedding_names_by_table(self._tables) for name in names]
        # Output keys in the order the forward gathers them: fused by field; per_set by (set, field).
        if layout == "fused":
            self._output_keys: List[str] = output_names
        else:
            by_slot: Dict[Tuple[int, str], str] = {}
            for table, key in zip(self._tables, output_names):
                by_slot[(self._slice_of[table.name].set_index, self._slice_of[table.name].field)] = key
            self._output_keys = [by_slot[(m, f)] for m in range(num_sets) for f in self.field_names]

    def _read_tables(self, tables: Sequence[EmbeddingBagConfig]) -> int:
        """Validates the tables against the layout; fills field names, vocab sizes and the table layout."""
        sets_seen: Dict[str, int] = {}
        stored_widths = set()
        for table in tables:
            if len(table.feature_names) != 1:
                raise ValueError(f"table {table.name}: expected exactly one feature, got {table.feature_names}")
            field = table.feature_names[0]
            if field not in self.vocab_sizes:
                self.field_names.append(field)
                self.vocab_sizes[field] = table.num_embeddings
            elif table.num_embeddings != self.vocab_sizes[field]:
                raise ValueError(
                    f"table {table.name}: field {field!r} has {table.num_embeddings} rows here but "
                    f"{self.vocab_sizes[field]} in another set"
                )
            if self.layout == "fused":
                if table.embedding_dim % self.num_sets:
                    raise ValueError(
                        f"table {table.name}: width {table.embedding_dim} is not num_sets ({self.num_sets}) x a set width"
                    )
                stored = table.embedding_dim // self.num_sets
                slots = [(m, m * stored) for m in range(self.num_sets)]
                if field in sets_seen:
                    raise ValueError(f"table {table.name}: the fused layout needs one table per field, {field!r} has two")
                sets_seen[field] = self.num_sets
            else:
                stored = table.embedding_dim
                m = sets_seen.get(field, 0)
                if m >= self.num_sets:
                    raise ValueError(f"table {table.name}: field {field!r} has more than num_sets ({self.num_sets}) tables")
                sets_seen[field] = m + 1
                slots = [(m, 0)]
            if stored < self.set_dim:
                raise ValueError(f"table {table.name}: stored set width {stored} is below set_dim {self.set_dim}")
            stored_widths.add(stored)
            for set_index, start in slots:
                piece = TableSlice(table.name, field, set_index, start, start + self.set_dim)
                self.table_layout.append(piece)
                self._slice_of.setdefault(table.name, piece)
        missing = {f: n for f, n in sets_seen.items() if n != self.num_sets}
        if missing:
            raise ValueError(f"fields with fewer than num_sets ({self.num_sets}) tables: {missing}")
        if len(stored_widths) != 1:
            raise ValueError(f"every set must be stored at one width, got {sorted(stored_widths)}")
        return stored_widths.pop()

    @property
    def num_fields(self) -> int:
        """F, the number of categorical fields."""
        return len(self.field_names)

    def use_managed_collision(self, spec: ManagedSpec) -> None:
        """Puts TorchRec's managed-collision modules in front of the tables (:mod:`multiembed.models.managed`): the
        features then carry raw 63-bit ids, mapped to rows of the ``spec.table_rows``-row tables. Call it before DMP
        shards the module.

        Raises:
            ValueError: already managed, a ``per_set`` layout (one remapping per field needs one table per field),
                or tables of another size than ``spec.table_rows``.
        """
        if self.managed:
            raise ValueError("the sparse arch's tables are already managed")
        if self.layout != "fused":
            raise ValueError(f"managed collision needs the fused layout (one table per field), got {self.layout}")
        collection = self.embedding_bag_collection
        if not isinstance(collection, EmbeddingBagCollection):
            raise ValueError("managed collision is set up before sharding, on an EmbeddingBagCollection")
        self.embedding_bag_collection = managed_collection(collection, spec)
        self.managed = True

    @property
    def table_collection(self) -> nn.Module:
        """The module holding the table weights (the EBC, or the one inside a managed collection; sharded or not):
        its ``state_dict`` keys are ``embedding_bags.<table>.weight``."""
        return table_collection(self.embedding_bag_collection)

    @property
    def table_names(self) -> List[str]:
        """The collection's table names, in collection order."""
        return [t.name for t in self._tables]

    @property
    def embedding_params(self) -> int:
        """Logical embedding parameters: ``sum_i D_i * d * K`` (the paper's count; padding excluded)."""
        return sum(self.vocab_sizes.values()) * self.set_dim * self.num_sets

    @property
    def embedding_bytes(self) -> int:
        """Physical bytes of the stored tables (padding included)."""
        return sum(t.num_embeddings * t.embedding_dim * DATA_TYPE_NUM_BITS[t.data_type] // 8 for t in self._tables)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            features: KJT with one key per field (any key order; extra keys are ignored by the collection).

        Returns:
            ``[B, K, F, d]``, a view of contiguous ``[K, B, F, d]`` storage.
        """
        pooled = self.embedding_bag_collection(features)
        if self.managed:
            pooled = pooled[0]
        values = pooled_values_in_key_order(pooled, self._output_keys)
        if self._cast_to_fp32:
            values = values.float()
        gathered = gather_set_major(values, self.layout, self.num_sets, self.num_fields, self.stored_set_dim,
                                    self.set_dim)
        return gathered.transpose(0, 1)

    def weight_views_per_set(self, table_weights: Mapping[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """Per set, ``{field: [D_i, d]}`` views of full (unsharded) table weights, padding removed.

        Args:
            table_weights: ``{table name: [rows, stored width]}``, e.g. from a gathered state dict.

        Returns:
            K dicts (set order), fields in schema order.

        Raises:
            ValueError: a table is missing or has the wrong shape.
        """
        widths = {t.name: t.embedding_dim for t in self._tables}
        views: List[Dict[str, torch.Tensor]] = [{} for _ in range(self.num_sets)]
        for piece in self.table_layout:
            if piece.table_name not in table_weights:
                raise ValueError(f"table {piece.table_name} (field {piece.field!r}) is missing from table_weights")
            weight = table_weights[piece.table_name]
            expected = (self.vocab_sizes[piece.field], widths[piece.table_name])
            if tuple(weight.shape) != expected:
                raise ValueError(f"table {piece.table_name}: shape {tuple(weight.shape)}, expected {expected}")
            views[piece.set_index][piece.field] = weight[:, piece.col_start : piece.col_stop]
        return [{f: v[f] for f in self.field_names} for v in views]

    def weights_per_set(self) -> List[Dict[str, torch.Tensor]]:
        """:meth:`weight_views_per_set` of this (unsharded) collection's own weights, detached.

        Returns:
            K dicts (set order) of ``{field: [D_i, d]}``, fields in schema order.

        Example::

            >>> arch = build_sparse_arch({"f1": 10, "f2": 20}, num_sets=2, set_dim=10, device=torch.device("cpu"))
            >>> [tuple(w.shape) for w in arch.weights_per_set()[1].values()]  # set 1: d = 10, padding (12) removed
            [(10, 10), (20, 10)]

        Raises:
            ValueError: the collection is sharded (gather the tables and call :meth:`weight_views_per_set`).
        """
        if not isinstance(self.table_collection, EmbeddingBagCollection):
            raise ValueError("the collection is sharded: gather its tables and call weight_views_per_set")
        bags = self.table_collection.embedding_bags
        return self.weight_views_per_set({name: bags[name].weight.detach() for name in self.table_names})


def build_sparse_arch(
    vocab_sizes: Mapping[str, int],
    num_sets: int,
    set_dim: int,
    layout: str = "fused",
    init: str = "xavier_set",
    device: Optional[torch.device] = None,
    stored_set_dim: Optional[int] = None,
    table_dtype: str = "fp32",
) -> MultiEmbeddingSparseArch:
    """Builds the tables (:func:`multi_embedding_tables`), their collection on ``device`` (``meta`` for DMP) and
    the sparse arch.

    Example::

        >>> arch = build_sparse_arch({"f1": 10, "f2": 20}, num_sets=4, set_dim=10, device=torch.device("cpu"))
        >>> arch.stored_set_dim, arch.embedding_params, arch.embedding_bytes
        (12, 1200, 5760)
    """
    tables = multi_embedding_tables(vocab_sizes, num_sets, set_dim, layout, init, stored_set_dim, table_dtype)
    collection = EmbeddingBagCollection(tables=tables, device=device)
    return MultiEmbeddingSparseArch(collection, num_sets=num_sets, set_dim=set_dim, layout=layout)
