"""The model as the trainer uses it: fx tracing, the weighted loss, the spectral regulariser, and learning."""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.data.metrics import roc_auc
from multiembed.models import BACKBONES, MultiEmbeddingTrain, build_model, spectral_regularizer

CPU = torch.device("cpu")
VOCAB = {"f0": 13, "f1": 9, "f2": 21}
B = 16


@dataclasses.dataclass
class WeightedBatch(Batch):
    weights: torch.Tensor


def random_features(vocab: Dict[str, int], batch: int, seed: int) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    keys = list(vocab)
    lengths = torch.randint(0, 3, (len(keys) * batch,), generator=generator)
    values: List[torch.Tensor] = []
    for i, key in enumerate(keys):
        count = int(lengths[i * batch : (i + 1) * batch].sum())
        values.append(torch.randint(0, vocab[key], (count,), generator=generator))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=lengths)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fx_symbolic_trace_reproduces_the_model(backbone: str) -> None:
    from torchrec.fx import symbolic_trace

    torch.manual_seed(0)
    model = build_model(f"{backbone}-me-2x", VOCAB, 3, device=CPU, hidden=8).eval()
    traced = symbolic_trace(model)
    dense, features = torch.randn(B, 3), random_features(VOCAB, B, seed=1)
    torch.testing.assert_close(traced(dense, features), model(dense, features))


def test_train_pipeline_tracer_sees_the_collection_fed_straight_from_the_batch() -> None:
    """TrainPipelineSparseDist pipelines a sharded module only when its input is an attribute of the batch.

    The pipeline's tracer treats the sharded collection (and the modules beside it) as leaves; so does this test.
    """
    from torchrec.distributed.train_pipeline.tracing import Tracer

    model = build_model("dcnv2-me-2x", VOCAB, device=torch.device("meta"), hidden=8)
    leaves = ["model.sparse_arch.embedding_bag_collection", "model.set_arch", "model.over_arch"]
    graph = Tracer(leaf_modules=leaves).trace(MultiEmbeddingTrain(model, spectral_reg_weight=1e-4))
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target.endswith("embedding_bag_collection")]
    assert [n.target for n in calls] == ["model.sparse_arch.embedding_bag_collection"]
    (arg,) = calls[0].args
    assert arg.op == "call_function" and arg.args[1] == "sparse_features" and arg.args[0].op == "placeholder"


def test_padding_rows_contribute_nothing_to_loss_or_gradients() -> None:
    torch.manual_seed(2)
    model = build_model("dcnv2-me-2x", VOCAB, 2, device=CPU, hidden=8).eval()  # eval: BatchNorm uses running stats
    train = MultiEmbeddingTrain(model, spectral_reg_weight=1e-2)
    real = 10
    features = random_features(VOCAB, B, seed=3)
    dense, labels = torch.randn(B, 2), torch.randint(0, 2, (B,)).float()
    weights = (torch.arange(B) < real).float()
    padded = WeightedBatch(dense_features=dense, sparse_features=features, labels=labels, weights=weights)
    rows = list(range(real))
    unpadded = Batch(
        dense_features=dense[:real],
        sparse_features=KeyedJaggedTensor.from_jt_dict({k: _take_rows(v, rows) for k, v in features.to_dict().items()}),
        labels=labels[:real],
    )
    loss_padded, (_, logits, _) = train(padded)
    grads_padded = torch.autograd.grad(loss_padded, list(train.parameters()))
    loss_unpadded, _ = train(unpadded)
    grads_unpadded = torch.autograd.grad(loss_unpadded, list(train.parameters()))
    torch.testing.assert_close(loss_padded, loss_unpadded)
    for got, expected in zip(grads_padded, grads_unpadded):
        torch.testing.assert_close(got, expected)
    manual = F.binary_cross_entropy_with_logits(logits[:real], labels[:real]) + 1e-2 * _reg(model, unpadded)
    torch.testing.assert_close(loss_padded, manual)


def _take_rows(jagged, rows):
    from torchrec.sparse.jagged_tensor import JaggedTensor

    offsets = jagged.offsets()
    values = [jagged.values()[offsets[r] : offsets[r + 1]] for r in rows]
    return JaggedTensor(values=torch.cat(values), lengths=torch.tensor([len(v) for v in values]))


def _reg(model, batch) -> torch.Tensor:
    _, embeddings = model.forward_with_embeddings(batch.dense_features, batch.sparse_features)
    return spectral_regularizer(embeddings)


def test_spectral_regularizer_matches_the_papers_per_field_loop() -> None:
    torch.manual_seed(4)
    embeddings = torch.randn(32, 3, 4, 6)
    embeddings[:, 1, 2] = 0.0  # an all-zero field: contributes 0, not NaN
    expected_terms = []
    for m in range(3):
        for i in range(4):
            _, singular, _ = torch.svd(embeddings[:, m, i, :])
            expected_terms.append((singular / singular.mean()).var() if singular.sum() > 0 else torch.tensor(0.0))
    torch.testing.assert_close(spectral_regularizer(embeddings), torch.stack(expected_terms).mean())
    mask = torch.arange(32) % 3 != 0
    torch.testing.assert_close(spectral_regularizer(embeddings, mask), spectral_regularizer(embeddings[mask]))
    leaf = embeddings.clone().requires_grad_(True)
    spectral_regularizer(leaf).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_train_module_adds_the_weighted_regulariser_and_returns_detached_outputs() -> None:
    torch.manual_seed(5)
    model = build_model("dnn-me-3x", VOCAB, device=CPU, hidden=8).eval()
    batch = Batch(dense_features=torch.empty(B, 0), sparse_features=random_features(VOCAB, B, 6),
                  labels=torch.randint(0, 2, (B,)).float())
    plain, (plain_detached, logits, labels) = MultiEmbeddingTrain(model)(batch)
    regularized, _ = MultiEmbeddingTrain(model, spectral_reg_weight=0.5)(batch)
    torch.testing.assert_close(regularized - plain, 0.5 * _reg(model, batch))
    torch.testing.assert_close(plain, F.binary_cross_entropy_with_logits(model(batch.dense_features, batch.sparse_features), batch.labels))
    assert plain.requires_grad and not plain_detached.requires_grad and not logits.requires_grad
    assert torch.equal(labels, batch.labels) and logits.shape == (B,)
    with pytest.raises(ValueError, match="spectral_reg_weight"):
        MultiEmbeddingTrain(model, spectral_reg_weight=-1.0)


def planted_pairwise_data(rows: int, seed: int):
    """Two fields whose label depends only on their *pair* (sign(a) * sign(b)); two noise fields.

    Each field alone is uninformative (every value is positive half the time), so only a model that learns the
    pairwise interaction beats AUC 0.5. Returns features, labels and the generator's true click probabilities.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = {"a": 8, "b": 8, "noise1": 20, "noise2": 5}
    sign = {f: torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0) for f, n in vocab.items()}
    ids = {f: torch.randint(0, n, (rows,), generator=generator) for f, n in vocab.items()}
    probability = torch.sigmoid(2.5 * sign["a"][ids["a"]] * sign["b"][ids["b"]])
    labels = torch.bernoulli(probability, generator=generator)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=list(vocab), values=torch.cat([ids[f] for f in vocab]), lengths=torch.ones(rows * len(vocab), dtype=torch.long)
    )
    return vocab, features, labels, probability


def test_model_learns_a_planted_pairwise_interaction() -> None:
    torch.manual_seed(7)
    vocab, train_features, train_labels, _ = planted_pairwise_data(rows=128 * 150, seed=8)
    _, test_features, test_labels, test_probability = planted_pairwise_data(rows=2000, seed=9)
    model = build_model("dcnv2-me-2x4", vocab, device=CPU, hidden=16, dropout=0.0)
    train = MultiEmbeddingTrain(model)
    optimizer = torch.optim.Adam(train.parameters(), lr=3e-3)
    batch_size = 128
    by_field = train_features.to_dict()
    for step in range(150):
        rows = slice(step * batch_size, (step + 1) * batch_size)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=list(vocab), values=torch.cat([by_field[f].values()[rows] for f in vocab]),
            lengths=torch.ones(batch_size * len(vocab), dtype=torch.long),
        )
        loss, _ = train(Batch(dense_features=torch.empty(batch_size, 0), sparse_features=features, labels=train_labels[rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(torch.empty(2000, 0), test_features)
    learned = roc_auc(test_labels.numpy(), scores.numpy())
    bayes = roc_auc(test_labels.numpy(), test_probability.numpy())
    print(f"planted pairwise interaction: test AUC {learned:.4f}, Bayes-optimal {bayes:.4f}")
    assert bayes > 0.8  # the generator's signal is strong
    assert learned > 0.5 + 0.8 * (bayes - 0.5)
