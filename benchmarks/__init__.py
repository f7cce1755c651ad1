"""Benchmarks of the package, installed as ``multiembed.benchmarks``: training throughput against plain-PyTorch
baselines (``bench_train``, behind ``multiembed bench``), the set arch, the loader and conversion.

They sit on top of the package (they import it; nothing in the package imports them except the ``bench``
command). Results and how they were measured: ``benchmarks/README.md``.
"""

import multiembed.runtime.stack_check  # noqa: F401  (checks the TorchRec stack before any torchrec import)
