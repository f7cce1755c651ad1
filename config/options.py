"""The options of a training run, defined once: a dataclass whose fields carry their default, help and choices.

Everything that offers these options derives from :class:`TrainConfig`: ``multiembed train``'s parser
(:func:`add_arguments`), ``multiembed scale``'s (the same fields with no defaults, so a preset can fill them),
the torchx components' pass-through (:func:`to_command_line`) and the benchmark's model options. Adding an option
means adding one field here (and, where it should be a named torchx parameter, one parameter there).

This module imports nothing heavy (no torch), so command-line parsers can be built without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Type, TypeVar

from multiembed.config.choices import (
    Combiner,
    DenseOptimizer,
    Device,
    Eviction,
    Layout,
    OutputBias,
    Precision,
    ShardingStrategy,
    SparseOptimizer,
    TableDtype,
    VocabSource,
)

# The default --eviction-interval of managed tables (training steps between evictions; docs/managed.md).
DEFAULT_EVICTION_INTERVAL = 5


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Optional[Sequence[str]] = None,
    flag: Optional[str] = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that also describes its command-line option.

    Args:
        default: the default (``dataclasses.MISSING``: required).
        help: the ``--help`` text.
        choices: the valid values (an enum's :meth:`Choice.choices`).
        flag: the command-line spelling when it is not ``--`` + the field name with ``-`` for ``_``.
        cli: False for fields that are not command-line options (set by the program).
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "cli": cli})


def flag_of(field: "dataclasses.Field[Any]") -> str:
    """The command-line spelling of a field (``batch_size`` -> ``--batch-size``)."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run (``multiembed train --help`` prints each one's help).

    ``batch_size`` is the global batch (the paper's 2048); each rank gets ``batch_size / world_size`` rows.
    ``None`` optimizer fields take the device's defaults (``multiembed.training.optim.OptimizerConfig``).

    Example::

        >>> config = TrainConfig(data="runs/data/synth", model="dcnv2-me-4x", out="runs/me4x", epochs=1)
        >>> config.validate()
    """

    data: str = option(help="converted dataset directory (multiembed convert / synth)")
    model: str = option(help="model name, e.g. dcnv2-me-4x, dnn-se-10x, dcnv2-me-4x16")
    out: str = option(help="run directory (refused if it exists, unless --resume/--overwrite)")
    epochs: int = option(10, help="maximum epochs under early stopping")
    batch_size: int = option(2048, help="global batch size, split evenly over the ranks")
    sparse_optimizer: Optional[str] = option(
        None, choices=SparseOptimizer.choices(),
        help="embedding optimizer (default: adagrad on CPU, adam on GPU; adam needs a GPU)",
    )
    sparse_lr: Optional[float] = option(None, help="embedding learning rate (default 0.05 adagrad, 1e-3 adam)")
    lr: Optional[float] = option(None, help="dense learning rate (default 1e-3)")
    weight_decay: Optional[float] = option(None, help="dense weight decay (default 1e-6)")
    dense_optimizer: str = option("adam", choices=DenseOptimizer.choices(), help="dense optimizer")
    warmup_steps: int = option(0, help="linear LR warm-up steps for both optimizers")
    decay_start: int = option(0, help="step where the linear LR decay starts (both optimizers)")
    decay_steps: int = option(0, help="steps of linear LR decay to 0 (0: no decay)")
    sharding: str = option(
        "auto", choices=ShardingStrategy.choices(),
        help="embedding sharding strategy (column_wise puts different sets on different ranks)",
    )
    patience: int = option(3, help="evaluations without validation AUC gain before stopping (0: off)")
    seed: int = option(0, help="seed of initialisation, shuffling and dropout")
    resume: bool = option(False, help="continue the run in --out from its newest complete checkpoint")
    overwrite: bool = option(
        False, help="replace the run in --out (only a multiembed run directory holding nothing but the run's files)"
    )
    eval_every: int = option(0, help="evaluate every N steps (0: once per epoch)")
    checkpoint_every: int = option(0, help="also checkpoint every N steps (0: at evaluations only)")
    ia_every: int = option(
        1, help="log information abundance (mean/min per set) every N evaluations into metrics.jsonl (0: off)"
    )
    collapse_warn: float = option(
        0.5, help="collapse monitor: at every IA log, name the fields whose IA (per set, and of the sets side by side) "
        "is below this fraction of a random initialisation's of the same shape (0: off)",
    )
    max_steps: int = option(0, help="stop after N steps (0: no limit)")
    hidden: int = option(400, help="MLP width (the paper's 400)")
    dropout: float = option(0.2, help="dropout of the MLPs")
    layout: str = option("fused", choices=Layout.choices(), help="embedding table layout")
    precision: str = option(
        "fp32", choices=Precision.choices(),
        help="dense arches' compute precision: bf16 = bf16 autocast with fp32 master weights, optimizer state, loss "
        "and metrics (refused on a CPU without native bf16)",
    )
    table_dtype: str = option(
        "fp32", choices=TableDtype.choices(),
        help="embedding table storage: fp16 halves the table bytes (fp32 lookups out; no fp32 master copy: updates "
        "are rounded to fp16)",
    )
    dense_features: bool = option(False, help="feed the raw dense features through a dense arch")
    experts: str = option(
        "dcnv2,ipnn,nfwfm,dnn",
        help="hetero-me-{K}x models only: comma-separated interaction experts (of dcnv2, dcnv2lr, ipnn, nfwfm, dnn) "
        "cycled over the K sets; sets of one kind run as one batched arch",
    )
    combiner: str = option(
        "mean", choices=Combiner.choices(),
        help="how the sets' outputs are combined: mean (the paper) or gate (softmax weights over the sets from the "
        "mean over sets of the pooled embeddings)",
    )
    output_bias: str = option(
        "prior", choices=OutputBias.choices(),
        help="initial bias of the logit: prior (the log-odds of the train split's positive rate, so predictions start "
        "at the base rate instead of near 0.5) or default (torch's Linear initialisation, as the paper's code)",
    )
    spectral_reg: float = option(
        0.0, help="weight of the singular-spectrum regulariser (0: off; in multiembed scale: the weight of the se-sr "
        "mode's runs, default 1e-4, the paper's; other modes train without it)",
    )
    projection_reg: float = option(
        0.0, help="weight of the projection regulariser of DCNv2's first cross layer, sum over field pairs of "
        "||W_ij^T W_ij - lambda_ij I||_F^2 with learnable lambda_ij (0: off; in multiembed scale: the weight of the "
        "se-pr mode's runs, default 1e-4, the paper's)",
    )
    pair_scales: bool = option(
        False, help="dcnv2 models only: multiply each field-pair map W_ij of the first cross layer by a learnable "
        "scalar N_ij (initialised to 1); with --projection-reg, the paper's weighted regularised DCNv2, whose "
        "regulariser acts on the unscaled W_ij (in multiembed scale: on for the se-pwr mode's runs only)",
    )
    divergence_reg: float = option(
        0.0, help="weight of the set divergence penalty of DCNv2 ME's first cross layer, sum over field pairs of the "
        "variance over sets of ||W_ij||_F (0: off; in multiembed scale: the weight of the me-dr mode's runs, default "
        "1e-3)",
    )
    vocab: str = option(
        "dataset", choices=VocabSource.choices(),
        help="table rows: dataset (the dataset's ids are the rows) or managed (a dataset converted with --vocab "
        "managed: TorchRec's managed-collision modules map raw ids to --table-rows rows; docs/managed.md)",
    )
    table_rows: int = option(
        0, help="--vocab managed: rows of every field's table, one fallback row per rank included (a multiple of "
        "the world size)",
    )
    eviction: str = option(
        "lfu", choices=Eviction.choices(),
        help="--vocab managed: which rows new ids take at an eviction: lfu (least counted) or lru (least recent)",
    )
    eviction_interval: int = option(
        DEFAULT_EVICTION_INTERVAL,
        help="--vocab managed: training steps between evictions; ids first seen in between share the fallback row",
    )
    device: str = option("auto", choices=Device.choices(), help="auto: CUDA + nccl when a GPU is visible, else CPU")
    progress: bool = option(True, flag="--no-progress", help="no progress bar")

    def validate(self) -> None:
        """Checks every option on its own (data-dependent checks come when the run is built).

        Raises:
            ValueError: a value out of range, an unknown choice, or contradictory options.
        """
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "eval_every", "checkpoint_every", "ia_every", "max_steps", "warmup_steps",
                     "decay_start", "decay_steps", "hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.collapse_warn <= 1.0:
            raise ValueError(f"--collapse-warn: must be in [0, 1], got {self.collapse_warn}")
        for name in ("spectral_reg", "projection_reg", "divergence_reg"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout: must be in [0, 1), got {self.dropout}")
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and value is not None and str(value) not in choices:
                raise ValueError(f"{flag_of(field)}: unknown {value!r}; choose from {', '.join(choices)}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pick one")
        self._validate_vocab()

    def _validate_vocab(self) -> None:
        """The managed-vocabulary options, on their own (world size and device are checked when the run is built)."""
        if self.vocab != VocabSource.MANAGED.value:
            given = [flag for flag, value, default in (
                ("--table-rows", self.table_rows, 0), ("--eviction", self.eviction, Eviction.LFU.value),
                ("--eviction-interval", self.eviction_interval, DEFAULT_EVICTION_INTERVAL)) if value != default]
            if given:
                raise ValueError(f"{', '.join(given)}: options of managed tables; add --vocab managed")
            return
        if self.table_rows < 2:
            raise ValueError(f"--vocab managed needs --table-rows N (rows of every field's table, >= 2), got "
                             f"{self.table_rows}")
        if self.eviction_interval < 1:
            raise ValueError(f"--eviction-interval: must be >= 1 step, got {self.eviction_interval}")
        if self.layout != Layout.FUSED.value:
            raise ValueError(f"--vocab managed needs --layout fused (one remapping per field), got --layout "
                             f"{self.layout}")
        if self.sharding not in (ShardingStrategy.AUTO.value, ShardingStrategy.ROW_WISE.value):
            raise ValueError(f"--vocab managed shards its tables row-wise (TorchRec's managed-collision sharding is "
                             f"row-wise only), got --sharding {self.sharding}")
        if self.table_dtype != TableDtype.FP32.value:
            raise ValueError(f"--vocab managed keeps fp32 tables (eviction resets rows of fp32 tables only, as "
                             f"checked), got --table-dtype {self.table_dtype}")

    def local_batch_size(self, world_size: int) -> int:
        """Rows per rank and step: the global ``batch_size`` split evenly over ``world_size`` ranks.

        Raises:
            ValueError: the batch does not divide evenly over the ranks.

        Example::

            >>> TrainConfig(data="d", model="dnn-me-2x", out="r", batch_size=2048).local_batch_size(8)
            256
        """
        if world_size < 1 or self.batch_size % world_size:
            raise ValueError(
                f"--batch-size {self.batch_size} is the global batch and must divide evenly over {world_size} ranks"
            )
        return self.batch_size // world_size


# Options that decide the model's parameters: a resumed run, an evaluation and an analysis rebuild the model from
# these recorded values.
MODEL_OPTIONS = (
    "model", "hidden", "dropout", "layout", "dense_features", "spectral_reg", "projection_reg", "divergence_reg",
    "table_dtype", "experts", "combiner", "pair_scales", "vocab", "table_rows", "eviction", "eviction_interval",
)

# Options of a run that a scaling study sets for all its runs (the grid sets model and seed; the study sets data,
# out, resume and progress).
STUDY_OPTIONS = (
    "epochs", "batch_size", "hidden", "dropout", "patience", "eval_every", "max_steps", "lr", "sparse_lr",
    "sparse_optimizer", "dense_optimizer", "weight_decay", "ia_every", "collapse_warn", "spectral_reg",
    "projection_reg", "divergence_reg", "device",
    "experts", "combiner", "output_bias",
)

# The value an option had in effect in runs written before config.json recorded it, where that differs from today's
# default (``output_bias`` became "prior" after runs had trained with torch's initialisation of the logit).
BEFORE_RECORDED: Dict[str, Any] = {"output_bias": "default"}


def recorded_option(options: Mapping[str, Any], name: str) -> Any:
    """An option as a run's ``config.json`` recorded it; for a run written before the option existed, the behaviour
    that run had (:data:`BEFORE_RECORDED`, else the :class:`TrainConfig` default).

    Example::

        >>> recorded_option({"model": "dcnv2-me-4x"}, "combiner")
        'mean'
        >>> recorded_option({"model": "dcnv2-me-4x"}, "output_bias")
        'default'
    """
    if name in options:
        return options[name]
    return BEFORE_RECORDED[name] if name in BEFORE_RECORDED else default_of(name)


def default_of(name: str) -> Any:
    """The :class:`TrainConfig` default of option ``name``.

    Example::

        >>> default_of("experts")
        'dcnv2,ipnn,nfwfm,dnn'
    """
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]

C = TypeVar("C")


def cli_fields(config_class: Type[Any], names: Optional[Iterable[str]] = None) -> List["dataclasses.Field[Any]"]:
    """The command-line fields of ``config_class`` (only ``names``, in that order, when given)."""
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.metadata.get("cli", False)}
    if names is None:
        return list(fields.values())
    missing = [n for n in names if n not in fields]
    if missing:
        raise KeyError(f"{config_class.__name__} has no command-line option {missing}")
    return [fields[n] for n in names]


def _default_text(field: "dataclasses.Field[Any]") -> str:
    if field.default is dataclasses.MISSING or field.default is None or isinstance(field.default, bool):
        return ""
    return f" (default {field.default})"


def add_arguments(
    parser: argparse.ArgumentParser,
    config_class: Type[Any],
    names: Optional[Iterable[str]] = None,
    *,
    unset_defaults: bool = False,
    exclusive: Sequence[Sequence[str]] = (),
) -> None:
    """Adds one argparse option per field of ``config_class``.

    Args:
        parser: the parser (or group) to add to.
        config_class: a dataclass built with :func:`option` fields.
        names: only these fields (default: every command-line field).
        unset_defaults: every option defaults to None (the caller fills unset ones, e.g. from a preset); help
            texts still name the dataclass default.
        exclusive: groups of boolean field names that are mutually exclusive.
    """
    fields = cli_fields(config_class, names)
    groups: Dict[str, Any] = {}
    for group_names in exclusive:
        group = parser.add_mutually_exclusive_group()
        for name in group_names:
            groups[name] = group
    for field in fields:
        target = groups.get(field.name, parser)
        flag = flag_of(field)
        help_text = field.metadata["help"] + _default_text(field)
        required = field.default is dataclasses.MISSING and not unset_defaults
        if isinstance(field.default, bool):
            # A True default is turned off by its flag (``--no-progress``), a False one on (``--resume``).
            action = "store_false" if field.default else "store_true"
            target.add_argument(flag, dest=field.name, action=action, help=help_text,
                                **({"default": None} if unset_defaults else {}))
            continue
        kind = _scalar_type(config_class, field)
        kwargs: Dict[str, Any] = {"dest": field.name, "help": help_text, "type": kind}
        if field.metadata.get("choices"):
            kwargs["choices"] = list(field.metadata["choices"])
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = None if unset_defaults else field.default
        target.add_argument(flag, **kwargs)


def _scalar_type(config_class: Type[Any], field: "dataclasses.Field[Any]") -> Any:
    """The argparse ``type`` of a field: its annotation resolved (``Optional[X]`` is ``X``)."""
    annotation = typing.get_type_hints(config_class)[field.name]
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if len(kinds) == 1 and kinds[0] in (float, int, str):
        return kinds[0]
    raise TypeError(f"option {field.name}: unsupported type {field.type!r}")


def from_arguments(config_class: Type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """Builds ``config_class`` from parsed arguments (fields the namespace lacks keep their defaults)."""
    names = {f.name for f in dataclasses.fields(config_class)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return config_class(**values)


def to_command_line(config_class: Type[Any], values: Mapping[str, Any]) -> List[str]:
    """The command-line words that set ``values`` (None values are left out; booleans become their flag).

    Raises:
        KeyError: a name that is not an option of ``config_class``.
    """
    fields = {f.name: f for f in cli_fields(config_class)}
    words: List[str] = []
    for name, value in values.items():
        if name not in fields:
            raise KeyError(f"{config_class.__name__} has no command-line option {name!r}")
        field = fields[name]
        if value is None:
            continue
        if isinstance(field.default, bool):
            if bool(value) != field.default:
                words.append(flag_of(field))
            continue
        words += [flag_of(field), str(value)]
    return words
