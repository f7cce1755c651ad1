"""The process's runtime, below every other layer: the torch / fbgemm-gpu / torchrec stack check, glibc ``malloc``
tuning and the one-job-per-directory locks.

Imports nothing of the package; importing this package is cheap (standard library only).
"""
