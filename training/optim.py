"""Optimizers: a fused (in-backward) sparse optimizer for the embedding tables and a dense optimizer, combined,
each behind TorchRec's ``WarmupOptimizer`` so one LR schedule reaches both.

Defaults follow the device:

* GPU: Adam for both, lr 1e-3, weight decay 1e-6 (the paper's protocol).
* CPU: FBGEMM's CPU TBE kernels implement only SGD, Adagrad and row-wise Adagrad, so the sparse tables use
  element-wise Adagrad (lr 0.05) - element-wise state keeps the model identical whatever the table layout or
  sharding; row-wise Adagrad would keep one accumulator per row per column shard. Dense parameters keep Adam.

Dense Adam runs torch's fused (single-kernel, multi-tensor) implementation: the same update rule as the
for-loop one, without a kernel launch and temporary per parameter and per elementwise op. SGD is offered for the
dense parameters as well (``dense_optimizer="sgd"``): its update is linear in the gradient, which makes sharded
and unsharded runs comparable to the last bit of float32 summation order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from multiembed.config.choices import DenseOptimizer, SparseOptimizer
from multiembed.runtime.stack import private_api_error

try:  # torch's in-backward optimizer registration, which TorchRec's sharders read (no public equivalent)
    from torch.distributed.optim import _apply_optimizer_in_backward
except ImportError as e:  # pragma: no cover - depends on the installed torch
    raise private_api_error("torch.distributed.optim._apply_optimizer_in_backward", e) from e
from torchrec import optim as trec_optim
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.warmup import WarmupOptimizer, WarmupPolicy, WarmupStage

SPARSE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    SparseOptimizer.ADAGRAD.value: trec_optim.Adagrad,
    SparseOptimizer.ROWWISE_ADAGRAD.value: trec_optim.RowWiseAdagrad,
    SparseOptimizer.SGD.value: trec_optim.SGD,
    SparseOptimizer.ADAM.value: trec_optim.Adam,
}
# FBGEMM's CPU kernels have no fused Adam.
CPU_SPARSE_OPTIMIZERS = tuple(name for name in SparseOptimizer.values() if name != SparseOptimizer.ADAM)
DENSE_OPTIMIZERS = DenseOptimizer.values()


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer options, resolved for the device (``None`` fields take the device default).

    Attributes:
        sparse_optimizer: ``adagrad``, ``rowwise_adagrad``, ``sgd`` or ``adam`` (GPU only).
        sparse_lr: learning rate of the embedding tables.
        sparse_weight_decay: weight decay of the embedding tables (Adam only; FBGEMM's Adagrad has none here).
        lr: dense learning rate.
        weight_decay: dense weight decay.
        dense_optimizer: ``adam`` (default) or ``sgd`` for the dense parameters.
        warmup_steps: linear warm-up from 0 over this many steps (0: none).
        decay_start, decay_steps: polynomial (linear) decay to 0 from ``decay_start`` over ``decay_steps``
            steps (``decay_steps`` 0: no decay), as in TorchRec's DLRM recipes.
    """

    sparse_optimizer: str
    sparse_lr: float
    sparse_weight_decay: float
    lr: float
    weight_decay: float
    dense_optimizer: str = "adam"
    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0

    @classmethod
    def for_device(
        cls,
        device_type: str,
        sparse_optimizer: Optional[str] = None,
        sparse_lr: Optional[float] = None,
        lr: Optional[float] = None,
        weight_decay: Optional[float] = None,
        warmup_steps: int = 0,
        decay_start: int = 0,
        decay_steps: int = 0,
        dense_optimizer: str = "adam",
    ) -> "OptimizerConfig":
        """Fills unset options with the device's defaults and validates the rest.

        Raises:
            ValueError: an unknown optimizer, sparse Adam on CPU, or a negative rate / step count.
        """
        on_cpu = device_type == "cpu"
        name = sparse_optimizer or ("adagrad" if on_cpu else "adam")
        SparseOptimizer.parse(name, "--sparse-optimizer")
        if on_cpu and name not in CPU_SPARSE_OPTIMIZERS:
            raise ValueError(
                f"--sparse-optimizer {name}: FBGEMM's CPU kernels support only {', '.join(CPU_SPARSE_OPTIMIZERS)} "
                "for fused embedding updates (Adam needs a GPU)"
            )
        DenseOptimizer.parse(dense_optimizer, "--dense-optimizer")
        default_sparse_lr = 0.05 if name in ("adagrad", "rowwise_adagrad") else (1e-3 if name == "adam" else 0.1)
        config = cls(
            sparse_optimizer=name,
            sparse_lr=default_sparse_lr if sparse_lr is None else sparse_lr,
            sparse_weight_decay=1e-6 if name == "adam" else 0.0,
            lr=1e-3 if lr is None else lr,
            weight_decay=1e-6 if weight_decay is None else weight_decay,
            dense_optimizer=dense_optimizer,
            warmup_steps=warmup_steps,
            decay_start=decay_start,
            decay_steps=decay_steps,
        )
        for field in ("sparse_lr", "lr", "weight_decay", "warmup_steps", "decay_start", "decay_steps"):
            if getattr(config, field) < 0:
                raise ValueError(f"--{field.replace('_', '-')}: must be >= 0, got {getattr(config, field)}")
        if config.decay_steps and config.decay_start < config.warmup_steps:
            raise ValueError("--decay-start must not be before the end of the warm-up")
        return config

    def schedule(self) -> List[WarmupStage]:
        """The LR multiplier stages shared by the sparse and dense optimizers.

        Linear warm-up from 0 over ``warmup_steps``, constant 1 until ``decay_start``, linear decay to 0 over
        ``decay_steps``, then 0. TorchRec's stages see the global step, and after the last stage TorchRec returns to
        the full rate; hence INTERPOLATE (which knows where the decay starts) rather than POLY (which would start
        below 1 and go negative), and a closing stage that holds 0.
        """
        stages: List[WarmupStage] = []
        if self.warmup_steps:
            stages.append(WarmupStage(policy=WarmupPolicy.LINEAR, max_iters=self.warmup_steps, value=0.0))
        if self.decay_steps:
            if self.decay_start > self.warmup_steps:
                stages.append(WarmupStage(policy=WarmupPolicy.CONSTANT, max_iters=self.decay_start, value=1.0))
            end = self.decay_start + self.decay_steps
            stages.append(
                WarmupStage(
                    policy=WarmupPolicy.INTERPOLATE, max_iters=end, value=1.0, end_value=0.0,
                    start_interpolating_iters=self.decay_start,
                )
            )
            stages.append(WarmupStage(policy=WarmupPolicy.CONSTANT, max_iters=1 << 62, value=0.0))
        return stages


def attach_sparse_optimizer(embedding_module: nn.Module, config: OptimizerConfig) -> None:
    """Marks every parameter of ``embedding_module`` for the fused in-backward optimizer (before DMP).

    DMP's sharders read the marks and build FBGEMM TBE kernels that update the rows during backward; the kwargs
    dict is built fresh for every call because the API mutates it.
    """
    kwargs: Dict[str, Any] = {"lr": config.sparse_lr}
    if config.sparse_optimizer == "adam":
        kwargs["weight_decay"] = config.sparse_weight_decay
    elif config.sparse_optimizer in ("adagrad", "rowwise_adagrad"):
        kwargs["eps"] = 1e-8
    _apply_optimizer_in_backward(SPARSE_OPTIMIZERS[config.sparse_optimizer], embedding_module.parameters(), kwargs)


def split_unfused_parameters(
    model: nn.Module, fused_param_names: Sequence[str]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Trainable parameters the fused optimizer does not update, as (replicated tables, dense parameters).

    Data-parallel embedding tables are replicated weights that TorchRec silently leaves out of the in-backward
    optimizer (TorchRec 1.8 on CPU); they get the sparse optimizer's rule through a regular optimizer instead, so a table's
    update rule does not depend on its sharding.
    """
    fused = set(fused_param_names)
    tables: Dict[str, torch.Tensor] = {}
    dense: Dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        # Empty parameters are TorchRec's placeholders for tables whose shards live on other ranks: nothing to step.
        if not param.requires_grad or name in fused or param.numel() == 0:
            continue
        (tables if ".embedding_bags." in name else dense)[name] = param
    return tables, dense


# The element-wise torch optimizers that apply a fused sparse optimizer's update rule to a replicated
# (data-parallel) table, which TorchRec's in-backward optimizer leaves out.
_REPLICATED_TABLE_RULES = ("adagrad", "sgd", "adam")


def table_update_rule(config: OptimizerConfig, replicated: bool, table: str = "") -> str:
    """The optimizer that updates an embedding table: the sparse optimizer, whatever the table's sharding.

    A sharded table is updated by FBGEMM's fused kernel in backward; a replicated (data-parallel) one by a regular
    torch optimizer with the same update rule (:func:`build_optimizer`). The planner's memory account
    (``multiembed plan``) and the trainer both take a table's rule from here.

    Args:
        config: resolved options.
        replicated: the table is data-parallel.
        table: the table's name, for the error message.

    Raises:
        ValueError: a replicated table under an optimizer without an element-wise torch equivalent (row-wise
            Adagrad keeps one accumulator per row that torch's optimizers do not have).
    """
    name = config.sparse_optimizer
    if replicated and name not in _REPLICATED_TABLE_RULES:
        where = f"table {table!r} is data-parallel" if table else "data-parallel tables"
        raise ValueError(
            f"--sparse-optimizer {name}: {where}, and {name} has no element-wise torch equivalent for replicated "
            f"tables; use {', '.join(_REPLICATED_TABLE_RULES)}, or another sharding"
        )
    return name


def _regular_sparse_optimizer(params: Any, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The torch optimizer with the fused sparse optimizer's update rule (for replicated tables)."""
    name = table_update_rule(config, replicated=True)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=config.sparse_lr, eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.sparse_lr)
    return torch.optim.Adam(params, lr=config.sparse_lr, weight_decay=config.sparse_weight_decay)


def _dense_optimizer(params: Any, config: OptimizerConfig) -> torch.optim.Optimizer:
    params = list(params)
    if config.dense_optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    # The fused kernel needs every parameter on one floating-point device type (true for a built model).
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def build_optimizer(
    model: nn.Module, fused_optimizer: KeyedOptimizer, config: OptimizerConfig
) -> Tuple[CombinedOptimizer, List[WarmupOptimizer]]:
    """Combines the DMP's fused optimizer with the dense optimizer (Adam by default), both under the LR schedule.

    Args:
        model: the ``DistributedModelParallel`` module.
        fused_optimizer: ``dmp.fused_optimizer``.
        config: resolved options.

    Returns:
        The combined optimizer (its ``state_dict`` holds both optimizers and the schedule position) and the two
        schedule wrappers (sparse, dense) for inspection.
    """
    tables, dense = split_unfused_parameters(model, list(fused_optimizer.params.keys()))
    stages = config.schedule()
    sparse: KeyedOptimizer = fused_optimizer
    if tables:
        replicated = KeyedOptimizerWrapper(tables, lambda params: _regular_sparse_optimizer(params, config))
        sparse = CombinedOptimizer([("fused", fused_optimizer), ("replicated", replicated)])
    dense_optimizer = KeyedOptimizerWrapper(dense, lambda params: _dense_optimizer(params, config))
    sparse_scheduled = WarmupOptimizer(sparse, stages, lr=config.sparse_lr)
    dense_scheduled = WarmupOptimizer(dense_optimizer, stages, lr=config.lr)
    combined = CombinedOptimizer([("sparse", sparse_scheduled), ("dense", dense_scheduled)])
    return combined, [sparse_scheduled, dense_scheduled]
