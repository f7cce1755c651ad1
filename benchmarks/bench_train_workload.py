"""The benchmark's workload: its options (:class:`BenchConfig`), vocabulary sizes scaled from a preset, and the
pre-built synthetic batches both contenders train on (see :mod:`multiembed.benchmarks.bench_train`)."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.config import TrainConfig
from multiembed.data.presets import preset
from multiembed.models import parse_model_name
from multiembed.runtime.malloc import MALLOC_MODES

DEFAULT_PRESET = "criteo-kaggle"
# The plain-PyTorch baselines, each in a process of its own: the paper's code, the savvy rewrite (with the package's
# table optimizer), and the savvy rewrite with its dense part under torch.compile.
BASELINE_KINDS = ("paper", "savvy", "savvy_compiled")


@dataclasses.dataclass
class BenchConfig:
    """Options of one benchmark run (``multiembed bench --help`` documents each). The options it shares with a
    training run (batch size, model sizes, layout, sharding, seed, device, precision) take
    :class:`~multiembed.config.TrainConfig`'s defaults, and the command line's help and choices, from there.

    ``steps`` timed steps per contender are split into blocks of ``block_steps``; ``quick`` shrinks the scaling
    sweeps (K in {1, 2}, two batch sizes) and the repetition counts for a smoke run. ``compiled_baseline`` adds the
    savvy baseline under ``torch.compile`` to the baselines (when they run).
    """

    model: str = "dcnv2-me-4x"
    batch_size: int = TrainConfig.batch_size
    rows_per_set: int = 1_100_000
    steps: int = 20
    block_steps: int = 2
    warmup_steps: int = 2
    baseline: Optional[bool] = None
    compiled_baseline: bool = True
    quick: bool = False
    layout: str = TrainConfig.layout
    compare_layouts: bool = True
    scaling: bool = True
    k_values: Tuple[int, ...] = (1, 2, 4, 10)
    batch_sizes: Tuple[int, ...] = (512, 1024, 2048, 4096)
    hidden: int = TrainConfig.hidden
    dropout: float = TrainConfig.dropout
    sharding: str = TrainConfig.sharding
    threads: int = 0
    id_exponent: float = 3.0
    batch_pool: int = 4
    seed: int = TrainConfig.seed
    device: str = TrainConfig.device
    malloc: str = "train"
    profile: Optional[str] = None
    progress: bool = True
    precision: str = TrainConfig.precision
    table_dtype: str = TrainConfig.table_dtype
    compare_precision: bool = True
    memory: bool = False
    memory_only: bool = False
    memory_rows: Tuple[int, ...] = (2_000_000, 8_000_000)
    memory_steps: int = 3
    memory_budget_gib: float = 24.0
    memory_variants: Tuple[str, ...] = ("adagrad:fp32", "rowwise_adagrad:fp32", "adagrad:fp16", "rowwise_adagrad:fp16")

    def validate(self) -> None:
        for name in ("batch_size", "rows_per_set", "steps", "block_steps", "batch_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.threads < 0:
            raise ValueError("--warmup-steps and --threads must be >= 0")
        if not self.id_exponent > 0:
            raise ValueError(f"--id-exponent: must be > 0, got {self.id_exponent}")
        if self.malloc not in MALLOC_MODES:
            raise ValueError(f"--malloc: expected one of {', '.join(MALLOC_MODES)}, got {self.malloc!r}")
        from multiembed.models.precision import PRECISIONS, TABLE_DTYPES

        if self.precision not in PRECISIONS or self.table_dtype not in TABLE_DTYPES:
            raise ValueError(f"--precision / --table-dtype: expected {PRECISIONS} / {TABLE_DTYPES}, got "
                             f"{self.precision!r} / {self.table_dtype!r}")
        if self.memory or self.memory_only:
            if len(set(self.memory_rows)) < 2 or min(self.memory_rows) < 1:
                raise ValueError("--memory-rows: needs two or more different positive sizes")
            for variant in self.memory_variants:
                optimizer, _, dtype = variant.partition(":")
                if optimizer not in ("adagrad", "rowwise_adagrad", "sgd") or dtype not in TABLE_DTYPES:
                    raise ValueError(f"--memory-variants: {variant!r} is not OPTIMIZER:TABLE_DTYPE (optimizer adagrad, "
                                     f"rowwise_adagrad or sgd; table dtype {' or '.join(TABLE_DTYPES)})")
        if not self.k_values or min(self.k_values) < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("--k-values and --batch-sizes must be non-empty lists of positive integers")
        spec = parse_model_name(self.model)
        if self.baseline and spec.backbone != "dcnv2":
            raise ValueError(
                f"--baseline: the plain-PyTorch baseline implements the paper's ME-DCNv2 only, not {spec.backbone}; "
                "pass --no-baseline"
            )
        if self.baseline and spec.mode == "mesi":
            raise ValueError("--baseline: the baseline has one interaction per set; mesi shares one (--no-baseline)")

    @property
    def with_baseline(self) -> bool:
        spec = parse_model_name(self.model)
        return bool(self.baseline) if self.baseline is not None else spec.backbone == "dcnv2" and spec.mode != "mesi"

    @property
    def baseline_kinds(self) -> Tuple[str, ...]:
        """The baselines this run trains (none without :attr:`with_baseline`)."""
        if not self.with_baseline:
            return ()
        return tuple(kind for kind in BASELINE_KINDS if self.compiled_baseline or kind != "savvy_compiled")


def scaled_vocab_sizes(rows_per_set: int, preset_name: str = DEFAULT_PRESET) -> Dict[str, int]:
    """``rows_per_set`` rows spread over the preset's fields in its proportions (each field >= 1 row).

    Example::

        >>> sizes = scaled_vocab_sizes(1_100_000)
        >>> len(sizes), abs(sum(sizes.values()) - 1_100_000) < 40
        (39, True)
    """
    if rows_per_set < 1:
        raise ValueError(f"rows_per_set must be >= 1, got {rows_per_set}")
    sizes = preset(preset_name).vocab_sizes
    total = sum(sizes.values())
    return {field: max(1, round(rows * rows_per_set / total)) for field, rows in sizes.items()}


@dataclasses.dataclass
class BenchBatch:
    """One synthetic batch in both input formats.

    Attributes:
        batch: TorchRec ``Batch`` (``dense_features [B, 0]``, KJT with one id per field and row, ``labels [B]``).
        ids: the same ids as ``[B, F]`` (the baseline's input).
    """

    batch: Batch
    ids: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


def make_batches(
    vocab_sizes: Mapping[str, int], batch_size: int, count: int, seed: int, id_exponent: float, device: torch.device
) -> List[BenchBatch]:
    """``count`` batches of ``batch_size`` rows; ids ``floor(D * u**id_exponent)``, labels Bernoulli(0.25)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor(list(vocab_sizes.values()), dtype=torch.float64)
    out: List[BenchBatch] = []
    for _ in range(count):
        uniform = torch.rand(batch_size, len(rows), generator=generator, dtype=torch.float64)
        ids = torch.minimum((rows * uniform.pow(id_exponent)).long(), rows.long() - 1)
        labels = (torch.rand(batch_size, generator=generator) < 0.25).float()
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=list(vocab_sizes),
            values=ids.t().reshape(-1),
            lengths=torch.ones(batch_size * len(rows), dtype=torch.int32),
        )
        batch = Batch(dense_features=torch.empty(batch_size, 0), sparse_features=features, labels=labels)
        out.append(BenchBatch(batch=batch.to(device), ids=ids.to(device)))
    return out
