"""Collapse analysis reports and the scaling study (the last stage of the data flow)."""

import multiembed.runtime.stack_check  # noqa: F401  (checks the TorchRec stack before any torchrec import)
