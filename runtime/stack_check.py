"""Importing this module checks the torch / fbgemm-gpu / torchrec stack, once per process.

Every package that uses torchrec imports it first in its ``__init__`` (``models``, ``sharding``, ``collapse``,
``training``, ``analysis``, ``serving``, ``benchmarks``), and so does the data loader (the rest of ``data`` stays
torch-free):
a mismatched or broken install stops with one :class:`~multiembed.runtime.stack.StackError` naming the installed
versions and the pairings that work, instead of an ``undefined symbol`` from an fbgemm ``.so``.
"""

from multiembed.runtime.stack import require_torchrec_stack

require_torchrec_stack()
