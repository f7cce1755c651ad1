"""TorchRec modules for multi-embedding CTR models (sparse arch over K sets, set interaction arches, over arch).

Drops into any TorchRec pipeline: nothing here imports ``multiembed.sharding`` or the trainer.
"""
