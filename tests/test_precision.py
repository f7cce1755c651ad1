"""``--precision bf16`` and ``--table-dtype fp16``: the bf16 model within bf16 tolerance of fp32 (forward and
gradients, at small shapes: CPU autocast runs on any CPU, slowly where bf16 is not native), the one-line refusal on a
CPU without native bf16, and fp16 tables training a few steps through the one build path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.cli import main as cli_main
from multiembed.config import TrainConfig
from multiembed.models import build_model
from multiembed.models import precision as precision_module
from multiembed.models.layers import UniformMaskDropout

VOCAB = {"a": 13, "b": 7, "c": 21, "d": 5}
BATCH = 64
# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); the logits after a few layers of bf16 GEMMs are
# measured about 0.6% off fp32 here. Gradients pass the bf16 GEMMs again backward and BatchNorm's mean subtraction
# (which cancels, so relative errors grow): measured 0.1-9% per parameter at batch 64. A parameter whose exact
# gradient is 0 (a bias right before train-mode BatchNorm) is judged against 1% of the largest gradient instead.
BF16_RTOL = 3e-2
GRAD_RTOL = 0.15


def _features(generator: torch.Generator) -> Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    ids = torch.stack([torch.randint(0, v, (BATCH,), generator=generator) for v in VOCAB.values()], dim=1)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=list(VOCAB), values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )
    labels = (torch.rand(BATCH, generator=generator) < 0.3).float()
    return ids, features, labels


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in float64 (Frobenius norms)."""
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _logits_and_grads(name: str, precision: str, state: Dict[str, torch.Tensor]):
    model = build_model(name, VOCAB, device=torch.device("cpu"), hidden=32, precision=precision)
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, (torch.nn.Dropout, UniformMaskDropout)):
            module.p = 0.0  # no random masks: the two precisions must see the same function
    model.train()
    _, features, labels = _features(torch.Generator().manual_seed(1))
    logits = model(torch.empty(BATCH, 0), features)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("name", ["dcnv2-me-2x", "dnn-me-2x", "dcnv2-se-2x"])
def test_bf16_forward_and_gradients_within_bf16_tolerance_of_fp32(name: str) -> None:
    torch.manual_seed(0)
    state = build_model(name, VOCAB, device=torch.device("cpu"), hidden=32).state_dict()
    logits32, loss32, grads32 = _logits_and_grads(name, "fp32", state)
    logits16, loss16, grads16 = _logits_and_grads(name, "bf16", state)
    # fp32 out (the loss and metrics are fp32), bf16 inside.
    assert logits16.dtype == torch.float32 and loss16.dtype == torch.float32
    assert _relative_error(logits16, logits32) < BF16_RTOL
    assert float(loss16) == pytest.approx(float(loss32), rel=BF16_RTOL)
    assert set(grads16) == set(grads32) and len(grads32) > 4
    largest = max(float(g.norm()) for g in grads32.values())
    for key, want in grads32.items():
        assert grads16[key].dtype == torch.float32, key  # master weights and their gradients stay fp32
        error = float((grads16[key].double() - want.double()).norm())
        assert error < GRAD_RTOL * max(float(want.norm()), 0.01 * largest), key
    # bf16 really ran: the two are not bit-identical.
    assert not torch.equal(logits16, logits32)


def test_bf16_parameters_stay_fp32() -> None:
    model = build_model("dcnv2-me-2x", VOCAB, device=torch.device("cpu"), hidden=16, precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.precision == "bf16"


def test_bf16_is_refused_in_one_line_on_a_cpu_without_native_bf16(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_supported", lambda: False)
    monkeypatch.setattr(precision_module, "cpu_capability", lambda: "AVX2")
    with pytest.raises(ValueError, match="no native bf16 .*capability AVX2"):
        precision_module.check_precision("bf16", "cpu")
    precision_module.check_precision("fp32", "cpu")  # fp32 is never refused
    precision_module.check_precision("bf16", "cuda")  # GPUs run bf16 natively
    status = cli_main(["bench", "--json", str(tmp_path / "b.json"), "--precision", "bf16", "--no-progress",
                       "--rows-per-set", "200", "--batch-size", "8", "--steps", "1", "--no-baseline"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("multiembed bench: error: --precision bf16: this CPU has no native bf16")
    assert "AVX2" in err[0]
    assert not (tmp_path / "b.json").exists()


def test_precision_and_table_dtype_are_train_options_with_choices() -> None:
    from multiembed.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--model", "dcnv2-me-2x", "--out", "o", "--precision", "bf16",
                              "--table-dtype", "fp16"])
    assert (args.precision, args.table_dtype) == ("bf16", "fp16")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--model", "m", "--out", "o", "--table-dtype", "bf16"])
    assert TrainConfig(data="", model="dcnv2-me-2x", out="").precision == "fp32"


def _local_tables(dmp: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's table weights (the local shards of the sharded state), by state key."""
    tables = {}
    for key, value in dmp.state_dict().items():
        if ".embedding_bags." in key:
            tables[key] = torch.cat([s.tensor for s in value.local_shards()]) if hasattr(value, "local_shards") else value
    return tables


def test_fp16_tables_train_a_few_steps_through_the_build_path() -> None:
    from torchrec.datasets.utils import Batch

    from multiembed.training.build import build_training
    from multiembed.training.distributed import destroy, init_distributed

    config = TrainConfig(data="", model="dcnv2-me-2x", out="", hidden=16, table_dtype="fp16", device="cpu",
                         batch_size=BATCH)
    config.validate()
    ctx = init_distributed("cpu")
    try:
        built = build_training(config, VOCAB, num_dense=0, ctx=ctx, local_batch=BATCH)
        assert built.model.sparse_arch.embedding_bytes == 2 * sum(VOCAB.values()) * 2 * 12  # fp16: 2 bytes a weight
        weights = _local_tables(built.dmp)
        assert weights and all(v.dtype == torch.float16 for v in weights.values())
        before = {k: v.clone() for k, v in weights.items()}
        generator = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(4):
            _, features, labels = _features(generator)
            batches.append(Batch(dense_features=torch.empty(BATCH, 0), sparse_features=features, labels=labels))
        feed = iter(batches)
        losses = []
        while True:
            try:
                loss, logits, _, _ = built.pipeline.progress(feed)
            except StopIteration:
                break
            assert logits.dtype == torch.float32
            losses.append(float(loss))
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
        after = _local_tables(built.dmp)
        assert all(v.dtype == torch.float16 for v in after.values())  # updated in place, no fp32 master copy
        assert any(not torch.equal(after[k], before[k]) for k in before)
    finally:
        destroy()


def test_plan_counts_fp16_tables_at_two_bytes_a_weight(capsys) -> None:
    """``multiembed plan --table-dtype fp16``: the plan's table bytes halve; Adagrad's per-weight state stays fp32."""
    from multiembed.training.build import plan_model

    tables = {}
    for dtype in ("fp32", "fp16"):
        config = TrainConfig(data="", model="dcnv2-me-2x", out="", hidden=16, table_dtype=dtype, device="cpu")
        planned = plan_model(config, VOCAB, num_dense=0, world_size=1, local_world_size=1, device_type="cpu",
                             batch_size=BATCH)
        tables[dtype] = planned.summary["tables"]
    for fp32, fp16 in zip(tables["fp32"], tables["fp16"]):
        assert fp16["weight_bytes"] * 2 == fp32["weight_bytes"] > 0
        assert fp16["optimizer_bytes"] == fp32["optimizer_bytes"] > 0
    assert cli_main(["plan", "--model", "dcnv2-me-2x", "--data", "criteo-kaggle", "--world-size", "1", "--device",
                     "cpu", "--table-dtype", "fp16"]) == 0
