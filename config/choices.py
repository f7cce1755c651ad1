"""Named choices of the command line and configs: each an enum whose values are the spellings users type.

This module imports nothing heavy, so command-line parsers can list and validate the choices without torch.
"""

from __future__ import annotations

import enum
from typing import List, Tuple, TypeVar, Union

C = TypeVar("C", bound="Choice")


class Choice(str, enum.Enum):
    """An option with fixed choices: each member's value is its command-line spelling.

    Every layer checks a value through :meth:`parse`, so each choice is defined and checked in one place.

    Example::

        >>> Layout.parse("per_set", "--layout")
        <Layout.PER_SET: 'per_set'>
        >>> Layout.parse("rows", "--layout", noun="layout")
        Traceback (most recent call last):
        ...
        ValueError: --layout: unknown layout 'rows'; choose from fused, per_set
    """

    def __str__(self) -> str:
        return self.value

    @classmethod
    def choices(cls) -> List[str]:
        """The valid spellings, in documentation order."""
        return [member.value for member in cls]

    @classmethod
    def values(cls) -> Tuple[str, ...]:
        """The valid spellings as a tuple (for module constants such as ``LAYOUTS``)."""
        return tuple(cls.choices())

    @classmethod
    def normalize(cls, value: str) -> str:
        """The spelling ``value`` is looked up as (exact by default)."""
        return value

    @classmethod
    def parse(cls: "type[C]", value: Union[str, "Choice"], where: str, noun: str = "") -> C:
        """Returns the member spelled ``value``.

        Args:
            value: a member or its spelling.
            where: what to call the value in an error message (an option or a config key).
            noun: what the value is, when ``where`` does not say it (``layout`` -> "unknown layout 'x'").

        Raises:
            ValueError: an unknown spelling; the one-line message lists the valid ones.
        """
        if isinstance(value, cls):
            return value
        name = cls.normalize(str(value))
        for member in cls:
            if member.value == name:
                return member
        what = f"unknown {noun} " if noun else "unknown "
        raise ValueError(f"{where}: {what}{value!r}; choose from {', '.join(cls.choices())}")


class SparseOptimizer(Choice):
    """The embedding tables' optimizer (FBGEMM's fused in-backward kernels; Adam needs a GPU)."""

    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    SGD = "sgd"
    ADAM = "adam"


class DenseOptimizer(Choice):
    """The optimizer of the dense (non-embedding) parameters."""

    ADAM = "adam"
    SGD = "sgd"


class InitScheme(Choice):
    """How the embedding tables are initialised (see ``multiembed.models.sparse_arch``)."""

    XAVIER_SET = "xavier_set"
    XAVIER_FIELD = "xavier_field"
    TORCHREC = "torchrec"


class Layout(Choice):
    """How the K embedding sets are stored (see ``multiembed.models.sparse_arch``)."""

    FUSED = "fused"
    PER_SET = "per_set"


class Precision(Choice):
    """The dense arches' compute precision (``multiembed.models.precision``): ``bf16`` runs them under bf16 autocast
    with fp32 master weights, optimizer state, loss and metrics; refused on a CPU without native bf16."""

    FP32 = "fp32"
    BF16 = "bf16"


class TableDtype(Choice):
    """The embedding tables' storage dtype: ``fp16`` halves the table bytes (fp32 output from FBGEMM's kernels; no
    fp32 master copy, so every update is rounded to fp16)."""

    FP32 = "fp32"
    FP16 = "fp16"


class Device(Choice):
    """Where the job runs: ``auto`` picks CUDA (nccl) when a GPU is visible, else CPU (gloo)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class ShardingStrategy(Choice):
    """How the embedding tables of a model are spread over the ranks.

    * ``auto``: TorchRec's ``EmbeddingShardingPlanner`` chooses per table (table-wise, row-wise, column-wise,
      table-row-wise, data-parallel, ...) under the memory of the topology.
    * ``table_wise``: every table lives whole on one rank.
    * ``row_wise``: every table is split by rows over all ranks.
    * ``column_wise``: every table is split by columns into shards one embedding set wide, so the sets of a
      multi-embedding model land on different ranks (set-parallel).
    * ``data_parallel``: every table is replicated on every rank and its gradient all-reduced; TorchRec's fused
      in-backward optimizer does not update such tables, so the trainer steps them with the sparse optimizer's
      update rule through a regular torch optimizer (``multiembed.training.optim``).

    Example::

        >>> ShardingStrategy.parse("row_wise")
        <ShardingStrategy.ROW_WISE: 'row_wise'>
    """

    AUTO = "auto"
    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"
    COLUMN_WISE = "column_wise"
    DATA_PARALLEL = "data_parallel"

    @classmethod
    def normalize(cls, value: str) -> str:
        """``-`` and ``_`` are interchangeable, case does not matter."""
        return value.strip().lower().replace("-", "_")

    @classmethod
    def parse(  # type: ignore[override]
        cls, value: Union[str, "ShardingStrategy"], where: str = "strategy", noun: str = "sharding strategy"
    ) -> "ShardingStrategy":
        """Returns the strategy called ``value`` (``-`` and ``_`` are interchangeable).

        Args:
            value: a strategy or its name.
            where: what to call the value in an error message (an option or a config key).
            noun: what the value is, in the error message.

        Raises:
            ValueError: an unknown name; the message lists the valid ones.
        """
        return super().parse(value, where, noun)


class Combiner(Choice):
    """How the K sets' outputs are combined before the shared head (``multiembed.models.hetero``)."""

    MEAN = "mean"
    GATE = "gate"


class OutputBias(Choice):
    """The initial bias of the logit (``--output-bias``)."""

    DEFAULT = "default"
    PRIOR = "prior"


class VocabSource(Choice):
    """Where a run's table rows come from: the dataset's ids, or managed collision over raw 63-bit ids."""

    DATASET = "dataset"
    MANAGED = "managed"


class Eviction(Choice):
    """The eviction policy of managed-collision tables (TorchRec's MCH policies)."""

    LFU = "lfu"
    LRU = "lru"
