"""Information abundance: known matrices, numpy's SVD, the streamed Gram route, sharded == single process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch

from multiembed.collapse import (
    CollapseResult,
    GramAccumulator,
    LocalShard,
    ProjectedGramAccumulator,
    collapse_from_sharded,
    collapse_from_tables,
    information_abundance,
    local_shards_from_tensors,
    normalize_rows,
    singular_values,
    summarize_sets,
)

NUM_SETS, DIM, STORED_DIM = 3, 5, 8
VOCAB = {"user": 230, "item": 97, "site": 41}


@dataclass(frozen=True)
class Slice:
    """Stands in for the model zoo's TableSlice (same attributes)."""

    table_name: str
    field: str
    set_index: int
    col_start: int
    col_stop: int


def fused_layout(
    fields: Sequence[str], num_sets: int = NUM_SETS, dim: int = DIM, stored: int = STORED_DIM
) -> List[Slice]:
    return [Slice(f"t_{f}", f, k, k * stored, k * stored + dim) for f in fields for k in range(num_sets)]


def per_set_layout(fields: Sequence[str], num_sets: int = NUM_SETS, dim: int = DIM) -> List[Slice]:
    return [Slice(f"t_{f}_set{k}", f, k, 0, dim) for f in fields for k in range(num_sets)]


def fused_tables(seed: int = 0) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tables = {}
    for f, rows in VOCAB.items():
        # Low-rank-ish tables with a few zero rows, so IA is far from both 1 and d and zero rows are exercised.
        basis = torch.randn(3, NUM_SETS * STORED_DIM, generator=generator)
        noise = torch.randn(rows, NUM_SETS * STORED_DIM, generator=generator)
        table = torch.randn(rows, 3, generator=generator) @ basis + 0.1 * noise
        table[::17] = 0.0
        tables[f"t_{f}"] = table
    return tables


def per_set_tables(fused: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The same sets as separate ``[D, d]`` tables (the per-set layout)."""
    return {
        f"t_{f}_set{k}": fused[f"t_{f}"][:, k * STORED_DIM : k * STORED_DIM + DIM]
        for f in VOCAB
        for k in range(NUM_SETS)
    }


def numpy_spectrum(matrix: np.ndarray, normalized: bool) -> np.ndarray:
    x = np.asarray(matrix, dtype=np.float64)
    if normalized:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
    return np.linalg.svd(x, compute_uv=False)


def numpy_ia(matrix: np.ndarray, normalized: bool) -> float:
    s = numpy_spectrum(matrix, normalized)
    return float(s.sum() / s.max())


def assert_results_equal(a: CollapseResult, b: CollapseResult, rel: float = 1e-9) -> None:
    assert a.fields == b.fields and a.dim == b.dim and a.vocab_sizes == b.vocab_sizes
    for sa, sb in zip(a.sets, b.sets, strict=True):
        assert sa == pytest.approx(sb, rel=rel)
    for sa, sb in zip(a.spectra, b.spectra, strict=True):
        for f in a.fields:
            assert sa[f] == pytest.approx(sb[f], rel=rel, abs=1e-7)
    assert (a.concat is None) == (b.concat is None)
    if a.concat is not None:
        assert a.concat == pytest.approx(b.concat, rel=rel)
    assert (a.random_init is None) == (b.random_init is None)
    if a.random_init is not None:
        assert a.random_init == pytest.approx(b.random_init, rel=rel)
    assert (a.sub_embedding is None) == (b.sub_embedding is None)
    if a.sub_embedding is not None:
        for ea, eb in zip(a.sub_embedding, b.sub_embedding, strict=True):
            assert ea["fields"] == eb["fields"]
            np.testing.assert_allclose(ea["ia"], eb["ia"], rtol=rel)
    assert a.zero_rows == b.zero_rows


# ------------------------------------------------------------------------------------------------ known matrices


@pytest.mark.parametrize("use_gram", [False, True])
def test_orthonormal_columns_give_full_dimension(use_gram: bool) -> None:
    q, _ = torch.linalg.qr(torch.randn(200, 8, dtype=torch.float64))
    if use_gram:
        acc = GramAccumulator(8, row_normalized=False)
        for chunk in q.split(37):
            acc.add(chunk)
        ia = acc.information_abundance()
    else:
        ia = information_abundance(singular_values(q, row_normalized=False))
    assert ia == pytest.approx(8.0, rel=1e-10)


@pytest.mark.parametrize("use_gram", [False, True])
def test_rank_one_gives_one(use_gram: bool) -> None:
    u = torch.randn(150, 1, dtype=torch.float64)
    v = torch.randn(1, 6, dtype=torch.float64)
    matrix = u @ v
    for normalized in (False, True):
        if use_gram:
            acc = GramAccumulator(6, row_normalized=normalized)
            acc.add(matrix)
            ia = acc.information_abundance()
        else:
            ia = information_abundance(singular_values(matrix, row_normalized=normalized))
        assert ia == pytest.approx(1.0, abs=1e-6)


def test_row_normalisation_equalises_scaled_basis_rows() -> None:
    # Row r is (k + 1) * e_k with k = r mod d: orthogonal columns of different norms. Raw IA is sum/max of the column
    # norms; normalising every row makes all columns equal, so IA becomes exactly d.
    d, n = 4, 40
    matrix = torch.zeros(n, d, dtype=torch.float64)
    for r in range(n):
        matrix[r, r % d] = (r % d) + 1.0
    column_norms = np.linalg.norm(matrix.numpy(), axis=0)
    assert information_abundance(singular_values(matrix, row_normalized=False)) == pytest.approx(
        column_norms.sum() / column_norms.max(), rel=1e-12
    )
    assert information_abundance(singular_values(matrix, row_normalized=True)) == pytest.approx(d, rel=1e-12)


@pytest.mark.parametrize("shape", [(300, 10), (64, 12), (7, 10), (1000, 3)])
@pytest.mark.parametrize("normalized", [False, True])
def test_random_matrices_match_numpy_svd(shape: Tuple[int, int], normalized: bool) -> None:
    rng = np.random.default_rng(sum(shape))
    matrix = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, size=(1, shape[1]))
    expected = numpy_ia(matrix, normalized)
    direct = information_abundance(singular_values(torch.from_numpy(matrix), row_normalized=normalized))
    acc = GramAccumulator(shape[1], row_normalized=normalized)
    for chunk in torch.from_numpy(matrix).float().split(29):  # float32 chunks, as tables are stored
        acc.add(chunk)
    assert direct == pytest.approx(expected, rel=1e-12)
    # Rank-deficient shapes (n < d) leave zero eigenvalues that come back as about sqrt(eps) * s_max each.
    assert acc.information_abundance() == pytest.approx(numpy_ia(matrix.astype(np.float32), normalized), rel=1e-7)


@pytest.mark.parametrize("normalized", [False, True])
def test_streamed_gram_spectrum_equals_direct_svd(normalized: bool) -> None:
    matrix = torch.randn(513, 9, dtype=torch.float64) @ torch.randn(9, 9, dtype=torch.float64)
    acc = GramAccumulator(9, row_normalized=normalized)
    start = 0
    for size in (1, 100, 7, 300, 105):
        acc.add(matrix[start : start + size])
        start += size
    assert start == matrix.shape[0] and acc.num_rows == 513
    torch.testing.assert_close(acc.singular_values(), singular_values(matrix, normalized), rtol=1e-9, atol=1e-9)


def test_merged_halves_equal_whole() -> None:
    matrix = torch.randn(200, 6)
    whole, first, second = (GramAccumulator(6) for _ in range(3))
    whole.add(matrix)
    first.add(matrix[:120])
    second.add(matrix[120:])
    first.merge_(second)
    torch.testing.assert_close(first.gram, whole.gram)
    assert first.num_rows == 200


def test_zero_rows_are_skipped_and_counted() -> None:
    matrix = torch.randn(50, 4, dtype=torch.float64)
    with_zeros = torch.cat([matrix[:20], torch.zeros(3, 4, dtype=torch.float64), matrix[20:]])
    acc = GramAccumulator(4)
    acc.add(with_zeros)
    assert acc.zero_rows == 3 and acc.num_rows == 53
    assert acc.information_abundance() == pytest.approx(numpy_ia(matrix.numpy(), True), rel=1e-10)
    assert torch.equal(normalize_rows(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_information_abundance_rejects_undefined_inputs() -> None:
    with pytest.raises(ValueError, match="all-zero"):
        information_abundance(torch.zeros(4))
    with pytest.raises(ValueError, match=">= 0"):
        information_abundance([1.0, -0.5])
    with pytest.raises(ValueError, match="no singular values"):
        information_abundance([])
    with pytest.raises(ValueError, match="shape"):
        GramAccumulator(4).add(torch.randn(3, 5))


@pytest.mark.parametrize("normalized", [False, True])
def test_projected_gram_equals_direct_projection(normalized: bool) -> None:
    rows = torch.randn(300, 4, dtype=torch.float64)
    rows[7] = 0.0
    maps = torch.randn(3, 5, 4, dtype=torch.float64)  # d_out != d_in
    acc = ProjectedGramAccumulator(maps, row_normalized=normalized)
    for chunk in rows.split(64):
        acc.add(chunk)
    projected = [(rows @ maps[p].T).numpy() for p in range(3)]
    assert acc.information_abundance() == pytest.approx([numpy_ia(y, normalized) for y in projected], rel=1e-8)
    for p in range(3):
        expected_spectrum = numpy_spectrum(projected[p], normalized)
        np.testing.assert_allclose(acc.singular_values()[p].numpy(), expected_spectrum, rtol=1e-8, atol=1e-6)
    assert acc.zero_rows == 1
    halves = [ProjectedGramAccumulator(maps, row_normalized=normalized) for _ in range(2)]
    halves[0].add(rows[:100])
    halves[1].add(rows[100:])
    torch.testing.assert_close(halves[0].merge_(halves[1]).projected_grams(), acc.projected_grams())
    with pytest.raises(ValueError, match="different maps"):
        acc.merge_(ProjectedGramAccumulator(maps + 1.0, row_normalized=normalized))
    with pytest.raises(ValueError, match="cannot add"):
        acc.merge_(GramAccumulator(4))


# ------------------------------------------------------------------------------------------------ whole models


def test_tables_result_matches_direct_per_set_and_concat() -> None:
    tables = fused_tables()
    result = collapse_from_tables(tables, fused_layout(list(VOCAB)), chunk_rows=64)
    assert result.dim == DIM and result.num_sets == NUM_SETS and result.fields == list(VOCAB)
    assert result.vocab_sizes == VOCAB and result.row_normalized
    for f in VOCAB:
        table = tables[f"t_{f}"].numpy()
        sets = [table[:, k * STORED_DIM : k * STORED_DIM + DIM] for k in range(NUM_SETS)]
        for k, block in enumerate(sets):
            assert result.sets[k][f] == pytest.approx(numpy_ia(block, True), rel=1e-9)
            s = numpy_spectrum(block, True)
            np.testing.assert_allclose(result.spectra[k][f], s / s[0], rtol=1e-8, atol=1e-8)
            assert result.zero_rows[k][f] == len(range(0, VOCAB[f], 17))
        assert result.concat[f] == pytest.approx(numpy_ia(np.concatenate(sets, axis=1), True), rel=1e-9)
    assert summarize_sets(result.sets) == result.set_summary()
    assert result.whole_field() == result.concat
    assert result.set_summary()[1]["min"] == min(result.sets[1].values())


def test_raw_mode_differs_from_normalised_and_matches_numpy() -> None:
    tables = fused_tables()
    raw = collapse_from_tables(tables, fused_layout(list(VOCAB)), row_normalized=False, random_init_seed=None)
    block = tables["t_user"][:, STORED_DIM : STORED_DIM + DIM].numpy()
    assert not raw.row_normalized and raw.random_init is None
    assert raw.sets[1]["user"] == pytest.approx(numpy_ia(block, False), rel=1e-9)
    assert raw.sets[1]["user"] != pytest.approx(numpy_ia(block, True), rel=1e-3)


def test_single_set_has_no_concat() -> None:
    tables = {name: t[:, :STORED_DIM] for name, t in fused_tables().items()}
    result = collapse_from_tables(tables, fused_layout(list(VOCAB), num_sets=1))
    assert result.num_sets == 1 and result.concat is None and result.concat_spectra is None
    assert result.whole_field() == result.sets[0]
    with pytest.raises(ValueError, match="no concatenated IA"):
        collapse_from_tables(fused_tables(), fused_layout(list(VOCAB)), concat=False).whole_field()


def test_per_set_layout_equals_fused_layout() -> None:
    tables = fused_tables()
    assert_results_equal(
        collapse_from_tables(per_set_tables(tables), per_set_layout(list(VOCAB)), chunk_rows=50),
        collapse_from_tables(tables, fused_layout(list(VOCAB)), chunk_rows=50),
    )


def row_shards(tables: Dict[str, torch.Tensor], cuts: Sequence[float]) -> List[LocalShard]:
    shards = []
    for name, table in tables.items():
        edges = [0, *(int(c * table.shape[0]) for c in cuts), table.shape[0]]
        shards += [LocalShard(name, table[a:b], a, 0) for a, b in zip(edges[:-1], edges[1:])]
    return shards


def column_shards(tables: Dict[str, torch.Tensor], cols: Sequence[int]) -> List[LocalShard]:
    shards = []
    for name, table in tables.items():
        edges = [0, *cols, table.shape[1]]
        shards += [LocalShard(name, table[:, a:b], 0, a) for a, b in zip(edges[:-1], edges[1:])]
    return shards


def grid_shards(tables: Dict[str, torch.Tensor]) -> List[LocalShard]:
    # Column cut at 11 splits set 1 ([8, 13)); the row cut differs per column block.
    shards = []
    for name, table in tables.items():
        rows = table.shape[0]
        shards += [
            LocalShard(name, table[: rows // 3, :11], 0, 0),
            LocalShard(name, table[rows // 3 :, :11], rows // 3, 0),
            LocalShard(name, table[: rows // 2, 11:], 0, 11),
            LocalShard(name, table[rows // 2 :, 11:], rows // 2, 11),
        ]
    return shards


@pytest.mark.parametrize(
    "make_shards",
    [
        lambda t: row_shards(t, [0.25, 0.6]),
        lambda t: column_shards(t, [STORED_DIM, 2 * STORED_DIM]),  # aligned with the sets
        lambda t: column_shards(t, [3, 10, 19]),  # cutting through sets
        grid_shards,
    ],
    ids=["row_wise", "column_wise_aligned", "column_wise_unaligned", "grid"],
)
def test_simulated_shards_in_process_equal_whole_tables(make_shards) -> None:
    tables = fused_tables()
    layout = fused_layout(list(VOCAB))
    weights = cross_weights(len(VOCAB))
    options = dict(chunk_rows=40, cross_weights=weights)
    assert_results_equal(
        collapse_from_sharded(make_shards(tables), layout, **options), collapse_from_tables(tables, layout, **options)
    )


def test_bad_shards_and_layouts_are_reported() -> None:
    tables = fused_tables()
    layout = fused_layout(list(VOCAB))
    overlapping = row_shards(tables, [0.5]) + [LocalShard("t_user", tables["t_user"][:10], 0, 0)]
    with pytest.raises(ValueError, match="'t_user'.*overlap"):
        collapse_from_sharded(overlapping, layout)
    holes = [s for s in row_shards(tables, [0.5]) if not (s.table_name == "t_item" and s.row_offset == 0)]
    with pytest.raises(ValueError, match="'t_item'.*cover"):
        collapse_from_sharded(holes, layout)
    with pytest.raises(ValueError, match="'site' lacks sets \\[2\\]"):
        collapse_from_tables(tables, [s for s in layout if not (s.field == "site" and s.set_index == 2)])
    with pytest.raises(ValueError, match="no shard"):
        collapse_from_tables({k: v for k, v in tables.items() if k != "t_site"}, layout)
    with pytest.raises(ValueError, match=r"cross_weights\[0\]: expected \[15, 15\]"):
        collapse_from_tables(tables, layout, cross_weights=[torch.randn(10, 10)] * NUM_SETS)
    zero = dict(tables, t_site=torch.zeros_like(tables["t_site"]))
    with pytest.raises(ValueError, match="field 'site' set 0.*all zero"):
        collapse_from_tables(zero, layout)


def test_random_init_is_seeded_and_near_full_dimension() -> None:
    tables = {"t_big": torch.randn(4000, 8)}
    layout = [Slice("t_big", "big", 0, 0, 8)]
    first = collapse_from_tables(tables, layout, random_init_seed=3).random_init["big"]
    again = collapse_from_tables(tables, layout, random_init_seed=3).random_init["big"]
    other = collapse_from_tables(tables, layout, random_init_seed=4).random_init["big"]
    assert first == again and first != other
    # An independent uniform table of the same shape (numpy's generator) has about the same IA, close to d.
    independent = numpy_ia(np.random.default_rng(0).uniform(-1, 1, size=(4000, 8)), True)
    assert first == pytest.approx(independent, abs=0.1)
    assert 7.5 < first <= 8.0


# ------------------------------------------------------------------------------------------------ sub-embedding IA


def cross_weights(num_fields: int, seed: int = 1) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(num_fields * DIM, num_fields * DIM, generator=generator) for _ in range(NUM_SETS)]


def test_sub_embedding_ia_equals_direct_computation() -> None:
    tables = fused_tables()
    fields = ["site", "user", "item"]  # the cross input's order differs from the layout's
    weights = cross_weights(len(fields))
    result = collapse_from_tables(
        tables, fused_layout(list(VOCAB)), cross_weights=weights, cross_fields=fields, chunk_rows=30
    )
    for k in range(NUM_SETS):
        assert result.sub_embedding[k]["fields"] == fields
        w = weights[k].double().numpy()
        for i, source in enumerate(fields):
            table = tables[f"t_{source}"][:, k * STORED_DIM : k * STORED_DIM + DIM].double().numpy()
            for j in range(len(fields)):
                block = w[j * DIM : (j + 1) * DIM, i * DIM : (i + 1) * DIM]  # W_{i->j}
                assert result.sub_embedding[k]["ia"][i][j] == pytest.approx(numpy_ia(table @ block.T, True), rel=1e-8)


# ------------------------------------------------------------------------------------------------ zoo models


ZOO_VOCAB = {"c1": 60, "c2": 23, "c3": 41}


def _zoo_model(name: str, layout: str = "fused", num_dense: int = 0):
    from multiembed.models import build_model

    torch.manual_seed(0)
    return build_model(name, ZOO_VOCAB, num_dense, device=torch.device("cpu"), hidden=8, layout=layout)


@pytest.mark.parametrize("layout", ["fused", "per_set"])
def test_zoo_dcnv2_model_matches_direct_computation(layout: str) -> None:
    from multiembed.collapse import collapse_from_model

    model = _zoo_model("dcnv2-me-2x", layout, num_dense=2)  # the dense arch's field enters the cross last
    result = collapse_from_model(model, chunk_rows=16)
    sets = model.sparse_arch.weights_per_set()  # per set {field: [D, d]}, padding removed (the zoo's own view)
    d = model.sparse_arch.set_dim
    cross = model.set_arch.cross_weights(0).double().numpy()  # the zoo's accessor: [K, (F+1)*d, (F+1)*d]
    fields = list(ZOO_VOCAB)
    assert cross.shape == (2, (len(fields) + 1) * d, (len(fields) + 1) * d)  # the dense field's block is there
    assert result.dim == d and result.fields == fields and result.vocab_sizes == ZOO_VOCAB
    for k, per_field in enumerate(sets):
        for i, field in enumerate(fields):
            table = per_field[field].double().numpy()
            assert result.sets[k][field] == pytest.approx(numpy_ia(table, True), rel=1e-9)
            for j in range(len(fields)):
                block = cross[k, j * d : (j + 1) * d, i * d : (i + 1) * d]
                assert result.sub_embedding[k]["ia"][i][j] == pytest.approx(numpy_ia(table @ block.T, True), rel=1e-8)
    concat = np.concatenate([sets[k]["c1"].double().numpy() for k in range(2)], axis=1)
    assert result.concat["c1"] == pytest.approx(numpy_ia(concat, True), rel=1e-9)


def test_zoo_models_without_full_rank_cross_have_no_sub_embedding() -> None:
    from multiembed.collapse import collapse_from_model, first_cross_weights

    for name in ("dnn-me-2x", "dcnv2lr-se-1x"):
        model = _zoo_model(name)
        assert first_cross_weights(model) is None
        result = collapse_from_model(model, random_init_seed=None)
        assert result.sub_embedding is None and result.num_sets == model.sparse_arch.num_sets


# ------------------------------------------------------------------------------------------------ two gloo ranks


def _shard_cases(rank: int) -> Dict[str, CollapseResult]:
    """Hand-made shards of the test tables: every way a table can be split over the two ranks."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    tables = fused_tables()
    layout = fused_layout(list(VOCAB))
    options = dict(chunk_rows=40, cross_weights=cross_weights(len(VOCAB)))
    results = {}
    # Row-wise: rank 0 holds the first 40% of every table's rows, rank 1 the rest.
    mine = [s for s in row_shards(tables, [0.4]) if (s.row_offset == 0) == (rank == 0)]
    results["row_wise"] = collapse_from_sharded(mine, layout, **options)
    # Column-wise through set 1 ([8, 13)): its rows must be assembled across the ranks.
    mine = [s for s in column_shards(tables, [11]) if (s.col_offset == 0) == (rank == 0)]
    results["column_wise"] = collapse_from_sharded(mine, layout, **options)
    # The same column split, as TorchRec's sharded state dict hands it over (ShardedTensor).
    sharded = {}
    for name, table in tables.items():
        cols = (0, 11) if rank == 0 else (11, table.shape[1])
        metadata = ShardMetadata([0, cols[0]], [table.shape[0], cols[1] - cols[0]], f"rank:{rank}/cpu")
        local = [Shard(table[:, cols[0] : cols[1]].contiguous(), metadata)]
        sharded[name] = init_from_local_shards(local, *table.shape)
    results["sharded_tensor"] = collapse_from_sharded(local_shards_from_tensors(sharded, rank=rank), layout, **options)
    # Table-wise per-set layout: a field's sets on different ranks, so the concatenation crosses ranks.
    per_set = per_set_tables(tables)
    mine = [LocalShard(name, t) for index, (name, t) in enumerate(per_set.items()) if index % 2 == rank]
    results["table_wise_per_set"] = collapse_from_sharded(mine, per_set_layout(list(VOCAB)), **options)
    # Replicated plain tensors: only the owner contributes.
    results["replicated"] = collapse_from_sharded(local_shards_from_tensors(tables, rank=rank), layout, **options)
    return results


# Column-wise puts the two sets of each fused table on different ranks (the concatenation crosses ranks);
# row-wise splits rows, and the data-parallel table is replicated (it must count once).
DMP_CASES = [("column_wise", None), ("row_wise", {"t_c2": "data_parallel"})]


def _dmp_cases(rank: int, world_size: int) -> Tuple[Dict[str, CollapseResult], Dict[str, List[bool]]]:
    """A zoo DCNv2 sharded by DistributedModelParallel, holding the single-process model's weights."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from multiembed.collapse import collapse_from_model
    from multiembed.models import build_model
    from multiembed.sharding import make_sharders, plan_sharding

    reference = _zoo_model("dcnv2-me-2x").state_dict()
    results, split = {}, {}
    for strategy, overrides in DMP_CASES:
        model = build_model("dcnv2-me-2x", ZOO_VOCAB, device=torch.device("meta"), hidden=8)
        plan = plan_sharding(
            model, strategy, world_size=world_size, local_world_size=world_size, device_type="cpu",
            overrides=overrides, pg=dist.group.WORLD, batch_size=4,
        )
        dmp = DistributedModelParallel(
            model, device=torch.device("cpu"), plan=plan, sharders=make_sharders(None, "cpu"),
            env=ShardingEnv.from_process_group(dist.group.WORLD),
        )
        held = []  # per shard: (fewer rows than the table, fewer columns than the table)
        with torch.no_grad():  # the reference weights into this rank's shards
            for key, tensor in dmp.state_dict().items():
                if hasattr(tensor, "local_shards"):
                    for shard in tensor.local_shards():
                        (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                        shard.tensor.copy_(reference[key][r0 : r0 + nr, c0 : c0 + nc])
                        held.append((nr < reference[key].shape[0], nc < reference[key].shape[1]))
                else:
                    tensor.copy_(reference[key])
        results[strategy] = collapse_from_model(dmp, chunk_rows=16)
        split[strategy] = [any(axis) for axis in zip(*held)]
    return results, split


def _gloo_worker(rank: int, world_size: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        results = _shard_cases(rank)
        dmp_results, split = _dmp_cases(rank, world_size)
        results.update({f"dmp/{name}": r for name, r in dmp_results.items()})
        saved = {"results": {n: r.to_dict() for n, r in results.items()}, "split": split}
        torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_gloo_ranks_equal_single_process(tmp_path: Path) -> None:
    """Hand-made row/column/table shards and a DMP-sharded zoo model on 2 gloo ranks == one process."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_utils import run_ranks

    from multiembed.collapse import collapse_from_model

    run_ranks(_gloo_worker, 2, str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    expected = collapse_from_tables(
        fused_tables(), fused_layout(list(VOCAB)), chunk_rows=40, cross_weights=cross_weights(len(VOCAB))
    )
    expected_model = collapse_from_model(_zoo_model("dcnv2-me-2x"), chunk_rows=16)
    assert per_rank[0]["split"] == {"column_wise": [False, True], "row_wise": [True, False]}  # really sharded
    for name, result in per_rank[0]["results"].items():
        assert result == per_rank[1]["results"][name], f"{name}: the ranks disagree"
        assert_results_equal(CollapseResult.from_dict(result), expected_model if name.startswith("dmp/") else expected)
    assert len(per_rank[0]["results"]) == 5 + len(DMP_CASES)
