"""Known third-party warnings silenced at their source, in one place, each with the reason it says nothing to a user.

Every rank of a ``make train`` run printed the same dozen warnings from torch, TorchRec and FBGEMM (twice each with
two ranks, prefixed by torchx) before the first step, none about anything the user can change. Each filter below
matches one message from one library by module and message pattern, so every other warning, ours
(``multiembed.*``) included, still shows. :func:`silence_known_warnings` is called where every job starts
(:func:`~multiembed.training.distributed.init_distributed`) and is idempotent.

Example::

    >>> import warnings
    >>> silence_known_warnings()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     silence_known_warnings()  # filters installed inside catch_warnings apply there
    ...     warnings.warn_explicit("Please use DTensor instead and we are deprecating ShardedTensor.",
    ...                            FutureWarning, "x.py", 1, module="torch.distributed.checkpoint.planner_helpers")
    >>> caught
    []
"""

from __future__ import annotations

import logging
import warnings
from typing import List, Tuple, Type

# (category, module regex, message regex, why it is silenced). ``module`` is the module that issues the warning
# (``warnings.warn``'s caller after ``stacklevel``), matched from its start.
KNOWN_WARNINGS: List[Tuple[Type[Warning], str, str, str]] = [
    (
        FutureWarning, r"torch\.nn\.parallel\.distributed|torchrec\.", r".*`broadcast_buffers` is deprecated",
        # TorchRec 1.8 builds its DDP wrappers with the deprecated argument; nothing a user sets.
        "TorchRec's own DistributedDataParallel call",
    ),
    (
        FutureWarning, r"torch\.distributed\.", r"Please use DTensor instead and we are deprecating ShardedTensor",
        # TorchRec's sharded tables are ShardedTensors; DCP warns at every checkpoint save and load.
        "TorchRec's table format, warned at every checkpoint",
    ),
    (
        UserWarning, r"torch\.autograd\.graph", r"fbgemm::\w+: an autograd kernel was not registered",
        # FBGEMM's CPU lookup for data-parallel (dense-kernel) tables lacks an autograd registration; its backward
        # falls through correctly (tests compare sharded with unsharded training).
        "FBGEMM's CPU dense lookup, correct through the fallthrough",
    ),
    (
        FutureWarning, r"copyreg", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        # torch 2.13's own pytree specs, copied while AOTInductor compiles an exported program (predict --compile).
        "torch's pytree internals during an AOTInductor compile",
    ),
]

# (logger, message substring, why). These come through ``logging``, not ``warnings``.
KNOWN_LOG_RECORDS: List[Tuple[str, str, str]] = [
    (
        "torchrec.distributed.utils", "caching params will be ignored",
        # Logged for every data-parallel or dense-kernel table of the plan: a cache option nobody set.
        "a cache option that was never set",
    ),
    (
        "torch.fx._symbolic_trace", "is_fx_tracing will return true",
        # TorchRec's pipeline calls the deprecated is_fx_tracing while tracing the model, once per rank.
        "TorchRec's pipeline tracing, not the model",
    ),
]


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of the given substrings."""

    def __init__(self, substrings: List[str]) -> None:
        super().__init__()
        self.substrings = list(substrings)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self.substrings)


def silence_known_warnings() -> None:
    """Installs the filters of :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_RECORDS` (idempotent)."""
    for category, module, message, _why in KNOWN_WARNINGS:
        # filterwarnings removes an identical filter before inserting it, so repeated calls keep one copy.
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    by_logger: dict = {}
    for name, substring, _why in KNOWN_LOG_RECORDS:
        by_logger.setdefault(name, []).append(substring)
    for name, substrings in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(substrings))
