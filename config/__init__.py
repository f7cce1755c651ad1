"""Options and named choices, defined once and importable without torch.

Every command-line option of a run is a field of :class:`TrainConfig` (with its default, help and choices), and
every fixed set of choices is an enum in :mod:`multiembed.config.choices`; the CLI parsers, the torchx components'
pass-through and the benchmark derive from them. ``config`` sits at the bottom of the package's flow beside ``data``:
it imports nothing else of the package.
"""

from multiembed.config.choices import (
    Choice,
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
from multiembed.config.options import (
    MODEL_OPTIONS,
    STUDY_OPTIONS,
    TrainConfig,
    add_arguments,
    cli_fields,
    default_of,
    flag_of,
    from_arguments,
    option,
    recorded_option,
    to_command_line,
)

__all__ = [
    "MODEL_OPTIONS",
    "STUDY_OPTIONS",
    "Choice",
    "Combiner",
    "DenseOptimizer",
    "Device",
    "Eviction",
    "Layout",
    "OutputBias",
    "Precision",
    "ShardingStrategy",
    "SparseOptimizer",
    "TableDtype",
    "TrainConfig",
    "VocabSource",
    "add_arguments",
    "cli_fields",
    "default_of",
    "flag_of",
    "from_arguments",
    "option",
    "recorded_option",
    "to_command_line",
]
