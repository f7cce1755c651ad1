"""Distributed training on TorchRec: the trainer, metrics and checkpoints (sits on top of data, models, sharding)."""
