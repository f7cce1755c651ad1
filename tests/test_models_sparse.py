"""The multi-embedding sparse arch: layouts, padded storage, initialisation, weight views, degenerate batches."""

from __future__ import annotations

import math
from typing import Dict, List

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.models import (
    BACKBONES,
    MultiEmbeddingModel,
    MultiEmbeddingSparseArch,
    MultiEmbeddingTrain,
    TableSlice,
    build_model,
    multi_embedding_tables,
)

CPU = torch.device("cpu")
VOCAB = {"f0": 30, "f1": 7, "f2": 50, "f3": 11}
B = 24


def random_features(vocab: Dict[str, int], batch: int, seed: int, max_len: int = 3) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    keys = list(vocab)
    lengths = torch.randint(0, max_len + 1, (len(keys) * batch,), generator=generator)
    values: List[torch.Tensor] = []
    for i, key in enumerate(keys):
        count = int(lengths[i * batch : (i + 1) * batch].sum())
        values.append(torch.randint(0, vocab[key], (count,), generator=generator))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=lengths)


def tables_of(model: MultiEmbeddingModel) -> Dict[str, torch.nn.Parameter]:
    bags = model.sparse_arch.embedding_bag_collection.embedding_bags
    return {name: bags[name].weight for name in model.sparse_arch.table_names}


def copy_dense_state(source: MultiEmbeddingModel, target: MultiEmbeddingModel) -> None:
    for name in ("set_arch", "over_arch"):
        getattr(target, name).load_state_dict(getattr(source, name).state_dict(), strict=True)


def logical_copy(source: MultiEmbeddingModel, target: MultiEmbeddingModel) -> None:
    """Copies every (field, set)'s logical columns from ``source``'s tables to ``target``'s (any layout/padding)."""
    source_views = source.sparse_arch.weights_per_set()
    target_tables = tables_of(target)
    with torch.no_grad():
        for piece in target.sparse_arch.table_layout:
            target_tables[piece.table_name][:, piece.col_start : piece.col_stop] = source_views[piece.set_index][piece.field]


def forward_and_table_grads(model: MultiEmbeddingModel, features: KeyedJaggedTensor):
    model.train()
    model.zero_grad()
    logits = model(torch.empty(B, 0), features)
    (logits * torch.linspace(-1, 1, B)).sum().backward()
    grads = {name: w.grad.clone() for name, w in tables_of(model).items()}
    return logits.detach(), model.sparse_arch.weight_views_per_set(grads)


@pytest.mark.parametrize("name", ["dcnv2-me-3x", "ipnn-me-2x", "xdeepfm-mesi-2x"])
def test_fused_layout_equals_per_set_layout(name: str) -> None:
    torch.manual_seed(0)
    fused = build_model(name, VOCAB, device=CPU, hidden=16, dropout=0.0, layout="fused")
    per_set = build_model(name, VOCAB, device=CPU, hidden=16, dropout=0.0, layout="per_set")
    assert len(per_set.sparse_arch.table_names) == len(VOCAB) * fused.sparse_arch.num_sets
    logical_copy(fused, per_set)
    copy_dense_state(fused, per_set)
    features = random_features(VOCAB, B, seed=1)
    logits_fused, grads_fused = forward_and_table_grads(fused, features)
    logits_per_set, grads_per_set = forward_and_table_grads(per_set, features)
    torch.testing.assert_close(logits_per_set, logits_fused)
    for got, expected in zip(grads_per_set, grads_fused):
        for field in VOCAB:
            torch.testing.assert_close(got[field], expected[field])


@pytest.mark.parametrize("layout", ["fused", "per_set"])
def test_padded_storage_equals_unpadded_reference(layout: str) -> None:
    torch.manual_seed(1)
    padded = build_model("dcnv2-me-2x", VOCAB, device=CPU, hidden=16, dropout=0.0, layout=layout)
    unpadded = build_model("dcnv2-me-2x", VOCAB, device=CPU, hidden=16, dropout=0.0, layout=layout, stored_set_dim=10)
    assert padded.sparse_arch.stored_set_dim == 12 and unpadded.sparse_arch.stored_set_dim == 10
    logical_copy(unpadded, padded)
    copy_dense_state(unpadded, padded)
    features = random_features(VOCAB, B, seed=2)
    logits_padded, grads_padded = forward_and_table_grads(padded, features)
    logits_unpadded, grads_unpadded = forward_and_table_grads(unpadded, features)
    torch.testing.assert_close(logits_padded, logits_unpadded)
    for got, expected in zip(grads_padded, grads_unpadded):
        for field in VOCAB:
            torch.testing.assert_close(got[field], expected[field])
    # The padding columns get exactly zero gradient.
    for name, weight in tables_of(padded).items():
        stored = weight.grad.unflatten(1, (-1, 12))
        assert stored[:, :, :10].abs().sum() > 0, name
        assert torch.equal(stored[:, :, 10:], torch.zeros_like(stored[:, :, 10:])), name


@pytest.mark.parametrize("layout", ["fused", "per_set"])
@pytest.mark.parametrize("init", ["xavier_set", "xavier_field", "torchrec"])
def test_init_bound_per_set_table_and_zero_padding(layout: str, init: str) -> None:
    torch.manual_seed(2)
    vocab = {"a": 3000, "b": 1000, "c": 5}
    model = build_model("dnn-me-3x", vocab, device=CPU, hidden=8, layout=layout, init=init)
    total = sum(vocab.values())
    expected = {
        "xavier_set": {f: math.sqrt(6.0 / (total + 10)) for f in vocab},  # one [sum D_i, d] table per set
        "xavier_field": {f: math.sqrt(6.0 / (rows + 10)) for f, rows in vocab.items()},
        "torchrec": {f: math.sqrt(1.0 / rows) for f, rows in vocab.items()},
    }[init]
    for set_index, views in enumerate(model.sparse_arch.weights_per_set()):
        for field, view in views.items():
            bound = expected[field]
            assert view.shape == (vocab[field], 10)
            assert view.abs().max() <= bound, (set_index, field)
            if vocab[field] >= 1000:  # enough draws to reach the bound and show a uniform's spread
                assert view.abs().max() > 0.99 * bound
                assert abs(view.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    for name, weight in tables_of(model).items():
        padding = weight.detach().unflatten(1, (-1, 12))[:, :, 10:]
        assert torch.equal(padding, torch.zeros_like(padding)), name


def test_init_fn_zeroes_padding_in_every_shard_view_torchrec_passes() -> None:
    """TorchRec calls ``init_fn`` per rank on: the whole table, a row shard, column shards stacked row-wise
    (``[n_shards * rows, shard_width]``), or an empty tensor (see the sparse arch's docstring)."""
    (table,) = multi_embedding_tables({"a": 40}, num_sets=4, set_dim=10)
    assert table.embedding_dim == 48
    views = {
        "whole": torch.empty(40, 48),
        "row shard": torch.empty(13, 48),
        "one set per column shard": torch.empty(40, 12),
        "two column shards stacked": torch.empty(80, 12),
        "two sets per column shard": torch.empty(40, 24),
    }
    for what, weight in views.items():
        weight.fill_(float("nan"))
        out = table.init_fn(weight)
        assert out is weight
        per_set = weight.unflatten(1, (-1, 12))
        assert torch.equal(per_set[:, :, 10:], torch.zeros_like(per_set[:, :, 10:])), what
        assert per_set[:, :, :10].abs().max() <= table.weight_init_max and per_set[:, :, :10].abs().min() > 0, what
    assert table.init_fn(torch.empty(0)).numel() == 0
    with pytest.raises(ValueError, match="cuts a stored set of width 12"):
        table.init_fn(torch.empty(40, 16))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.Adagrad(ps, lr=0.5),
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=1e-2),
    ],
    ids=["adagrad", "sgd-momentum-wd", "adam-wd", "adamw"],
)
def test_padding_stays_zero_while_training(make_optimizer) -> None:
    torch.manual_seed(3)
    model = build_model("dcnv2-me-2x", VOCAB, device=CPU, hidden=16)
    train = MultiEmbeddingTrain(model, spectral_reg_weight=1e-2)
    optimizer = make_optimizer(train.parameters())
    before = {name: w.detach().clone() for name, w in tables_of(model).items()}
    from torchrec.datasets.utils import Batch

    for step in range(5):
        batch = Batch(
            dense_features=torch.empty(B, 0),
            sparse_features=random_features(VOCAB, B, seed=10 + step),
            labels=torch.randint(0, 2, (B,)).float(),
        )
        loss, _ = train(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, weight in tables_of(model).items():
        stored = weight.detach().unflatten(1, (-1, 12))
        assert torch.equal(stored[:, :, 10:], torch.zeros_like(stored[:, :, 10:])), name
        assert not torch.equal(weight.detach(), before[name]), f"{name} did not train"


@pytest.mark.parametrize("layout", ["fused", "per_set"])
def test_table_layout_and_weight_views_per_set(layout: str) -> None:
    model = build_model("dnn-me-3x", VOCAB, device=CPU, hidden=8, layout=layout)
    arch = model.sparse_arch
    assert arch.field_names == list(VOCAB) and arch.num_sets == 3 and arch.set_dim == 10 and arch.layout == layout
    pieces = {(p.field, p.set_index): p for p in arch.table_layout}
    assert len(pieces) == len(VOCAB) * 3 == len(arch.table_layout)
    for field in VOCAB:
        for m in range(3):
            piece = pieces[(field, m)]
            if layout == "fused":
                assert piece == TableSlice(f"t_{field}", field, m, 12 * m, 12 * m + 10)
            else:
                assert piece == TableSlice(f"t_{field}_s{m}", field, m, 0, 10)
    tables = tables_of(model)
    views = arch.weight_views_per_set({name: w.detach() for name, w in tables.items()})
    for (field, m), piece in pieces.items():
        expected = tables[piece.table_name].detach()[:, piece.col_start : piece.col_stop]
        assert views[m][field].shape == (VOCAB[field], 10)
        assert torch.equal(views[m][field], expected)
    missing = {name: w for name, w in tables.items() if name != arch.table_layout[0].table_name}
    with pytest.raises(ValueError, match="missing"):
        arch.weight_views_per_set(missing)
    wrong = dict(tables)
    wrong[arch.table_layout[0].table_name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        arch.weight_views_per_set(wrong)


def test_sparse_output_is_set_major_and_matches_a_plain_lookup() -> None:
    torch.manual_seed(4)
    model = build_model("dnn-me-3x", VOCAB, device=CPU, hidden=8)
    features = random_features(VOCAB, B, seed=5)
    out = model.sparse_arch(features)
    assert out.shape == (B, 3, len(VOCAB), 10)
    assert out.transpose(0, 1).is_contiguous()
    views = model.sparse_arch.weights_per_set()
    for f_index, (field, jagged) in enumerate(features.to_dict().items()):
        offsets = jagged.offsets()
        for row in range(B):
            ids = jagged.values()[offsets[row] : offsets[row + 1]]
            for m in range(3):
                torch.testing.assert_close(out[row, m, f_index], views[m][field][ids].sum(0))


def test_sparse_arch_rejects_inconsistent_tables() -> None:
    fused = multi_embedding_tables(VOCAB, num_sets=2, set_dim=10)
    with pytest.raises(ValueError, match="stored set width 4 is below set_dim 10"):
        MultiEmbeddingSparseArch(EmbeddingBagCollection(fused, device=torch.device("meta")), num_sets=6, set_dim=10)
    per_set = multi_embedding_tables(VOCAB, num_sets=2, set_dim=10, layout="per_set")
    with pytest.raises(ValueError, match="fewer than num_sets"):
        MultiEmbeddingSparseArch(EmbeddingBagCollection(per_set[:-1], device=torch.device("meta")), 2, 10, "per_set")
    with pytest.raises(ValueError, match="one table per field"):
        MultiEmbeddingSparseArch(EmbeddingBagCollection(per_set, device=torch.device("meta")), 1, 10, "fused")
    with pytest.raises(ValueError, match="unknown layout"):
        multi_embedding_tables(VOCAB, 2, 10, layout="striped")
    with pytest.raises(ValueError, match="unknown init"):
        multi_embedding_tables(VOCAB, 2, 10, init="kaiming")
    with pytest.raises(ValueError, match="field 'f1': vocabulary size must be >= 1"):
        multi_embedding_tables({"f0": 3, "f1": 0}, 2, 10)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_empty_bags_and_all_oov_batches_give_finite_outputs(backbone: str) -> None:
    torch.manual_seed(5)
    vocab = {"f0": 5, "f1": 3, "f2": 4}
    model = build_model(f"{backbone}-me-2x", vocab, 2, device=CPU, hidden=8)
    train = MultiEmbeddingTrain(model, spectral_reg_weight=1e-3)
    from torchrec.datasets.utils import Batch

    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=list(vocab), values=torch.empty(0, dtype=torch.long), lengths=torch.zeros(3 * B, dtype=torch.long)
    )
    oov_ids = torch.cat([torch.full((B,), rows - 1) for rows in vocab.values()])  # the last id of every field
    all_oov = KeyedJaggedTensor.from_lengths_sync(keys=list(vocab), values=oov_ids, lengths=torch.ones(3 * B, dtype=torch.long))
    for features in (empty, all_oov):
        batch = Batch(dense_features=torch.zeros(B, 2), sparse_features=features, labels=torch.ones(B))
        train.train()
        train.zero_grad()
        loss, (_, logits, _) = train(batch)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits).all()
        assert all(torch.isfinite(p.grad).all() for p in train.parameters() if p.grad is not None)
        train.eval()
        assert torch.isfinite(model(batch.dense_features, features)).all()
