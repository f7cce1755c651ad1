"""Distributed training on TorchRec: the trainer, metrics and checkpoints (sits on top of data, models, sharding)."""

import multiembed.runtime.stack_check  # noqa: F401  (checks the TorchRec stack before any torchrec import)
