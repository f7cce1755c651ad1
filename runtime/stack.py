"""Guards the first import of torch / fbgemm_gpu / torchrec with a version check.

fbgemm_gpu is compiled against one torch minor version; a mismatch surfaces as an ``undefined symbol`` deep inside
an fbgemm ``.so``. :func:`require_torchrec_stack` runs the check once per process; importing
:mod:`multiembed.runtime.stack_check` runs it, and every package that uses torchrec does so in its ``__init__`` (the
loader at its top), so a broken environment stops with one message naming the installed versions and the pairing
that works.

This module lives in ``runtime/``, the bottom layer (it imports nothing of the package), so every layer that uses
torchrec, the data loader first, can run the check.
"""

from __future__ import annotations

import importlib.metadata
from typing import Dict, Optional, Tuple

# torch minor version -> (fbgemm-gpu[-cpu] version, torchrec version) known to work together: the two stacks that
# requirements/ pins (2.13, the default, and 2.14) and the torch 2.11 stack of the pure-torch GPU check
# (benchmarks/gpu_check.py), which runs where only torch 2.11 is installed.
SUPPORTED_STACKS: Dict[str, Tuple[str, str]] = {
    "2.13": ("1.8.0", "1.8.0"),
    "2.14": ("1.9.0", "1.9.2"),
    "2.11": ("1.6.0", "1.6.1"),
}
# The one description of the supported triples that every stack message ends with.
SUPPORTED = "; ".join(
    f"torch {t}.x + fbgemm-gpu(-cpu) {f} + torchrec {r}" for t, (f, r) in SUPPORTED_STACKS.items()
)
# How to install a supported stack (the Makefile's STACK picks a requirements file).
INSTALL_HINT = "`make venv` (torch 2.13) or `make venv STACK=cpu-2.14` / `STACK=gpu` (torch 2.14)"

_checked = False


class StackError(RuntimeError):
    """The installed torch / fbgemm_gpu / torchrec versions do not work together."""


def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def installed_versions() -> Dict[str, Optional[str]]:
    """Installed distribution versions, read from package metadata (no import of the packages themselves)."""
    return {
        "torch": _dist_version("torch"),
        "fbgemm_gpu": _dist_version("fbgemm-gpu-cpu", "fbgemm_gpu-cpu", "fbgemm-gpu", "fbgemm_gpu"),
        "torchrec": _dist_version("torchrec"),
    }


def _describe(versions: Dict[str, Optional[str]]) -> str:
    return ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items())


def describe_installed() -> str:
    """``torch X, fbgemm_gpu Y, torchrec Z`` as installed (for messages)."""
    return _describe(installed_versions())


def private_api_error(name: str, error: BaseException) -> ImportError:
    """The error for a private torch / TorchRec API this package builds on that the installed stack lacks.

    Private APIs (underscore names, internals) are used only where the public API has no equivalent; each import of
    one goes through ``try: ... except ImportError as e: raise private_api_error(...) from e`` so that a changed
    stack fails at import with the name, the installed versions and the supported ones.
    """
    return ImportError(
        f"{name}: not in the installed stack ({error}); installed: {describe_installed()}; "
        f"supported: {SUPPORTED}"
    )


def check_versions(versions: Dict[str, Optional[str]]) -> None:
    """Raises :class:`StackError` unless ``versions`` is a supported torch / fbgemm_gpu / torchrec triple."""
    missing = [k for k, v in versions.items() if v is None]
    if missing:
        raise StackError(
            f"missing {', '.join(missing)} ({_describe(versions)}); install a supported stack with {INSTALL_HINT}; "
            f"supported: {SUPPORTED}"
        )
    torch_minor = ".".join(str(versions["torch"]).split("+")[0].split(".")[:2])
    expected = SUPPORTED_STACKS.get(torch_minor)
    fbgemm = str(versions["fbgemm_gpu"]).split("+")[0]
    torchrec = str(versions["torchrec"]).split("+")[0]
    if expected is None or fbgemm != expected[0] or torchrec != expected[1]:
        raise StackError(
            f"incompatible stack: {_describe(versions)}. fbgemm_gpu must be built for the installed torch; "
            f"supported: {SUPPORTED}. Reinstall with {INSTALL_HINT} in a fresh environment."
        )


def require_torchrec_stack() -> None:
    """Checks the installed versions, then imports torch, fbgemm_gpu and torchrec once.

    Raises:
        StackError: a version mismatch, or an import failure (with the installed versions in the message).
    """
    global _checked
    if _checked:
        return
    versions = installed_versions()
    check_versions(versions)
    try:
        import fbgemm_gpu  # noqa: F401
        import torch  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError) as e:
        raise StackError(f"importing the TorchRec stack failed ({_describe(versions)}): {e}") from e
    _checked = True
