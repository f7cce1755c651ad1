"""The ``multiembed`` command line.

Every subcommand is a module of this package exposing ``register(subparsers) -> None`` (adds its parser and sets
``func``) and keeping heavy imports (torch, torchrec, pyarrow) inside the function that runs it, so ``convert``,
``synth`` and ``inspect`` start without importing torch.

Errors that are the user's (bad input, a missing file, an inconsistent option) are ``ValueError`` / ``OSError``
subclasses raised with a message that names the file, row and field; they are printed as one line and the command
exits with status 2. Any other exception is printed as one line too (its type, its first line and
"MULTIEMBED_DEBUG=1 shows the traceback"), with exit status 1. ``MULTIEMBED_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional, Sequence

from multiembed.cli.deprecated import one_line_warnings
from multiembed.cli.errors import EXIT_USER_ERROR, report_error

# Subcommand modules, in the order `multiembed --help` lists them.
SUBCOMMANDS: List[str] = [
    "synth", "plan", "train", "days", "days_study", "evaluate", "analyze", "scale", "export", "predict", "convert",
    "inspect", "bench", "paper",
]

# Any other exception that escapes a command (a bug, or a failure nobody named yet).
EXIT_UNEXPECTED = 1
DEBUG_HINT = "MULTIEMBED_DEBUG=1 shows the traceback"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiembed",
        description="Multi-embedding CTR models on TorchRec: convert click logs, train, analyse embedding collapse.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"multiembed.cli.{name}").register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one subcommand; returns the process exit status."""
    warnings.formatwarning = one_line_warnings(warnings.formatwarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        print("multiembed: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if os.environ.get("MULTIEMBED_DEBUG"):
            raise
        message = str(e) or type(e).__name__
        # Printed, and recorded for torchrun so that a launched job ends with this line (multiembed.cli.launch).
        report_error(f"multiembed {args.command}: error: {message}", EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    except Exception as e:  # anything else that escapes a command: one line too, the traceback on request
        if os.environ.get("MULTIEMBED_DEBUG"):
            raise
        report_error(f"multiembed {args.command}: error: {unexpected_error_line(e)}", EXIT_UNEXPECTED)
        return EXIT_UNEXPECTED
    return int(status or 0)


def unexpected_error_line(error: BaseException) -> str:
    """An unexpected exception as the text of one error line: its type, its message's first line, and how to see
    the traceback.

    Example::

        >>> unexpected_error_line(RuntimeError("CUDA error: out of memory\\nmore"))
        'RuntimeError: CUDA error: out of memory (MULTIEMBED_DEBUG=1 shows the traceback)'
    """
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
    return f"{text} ({DEBUG_HINT})"


if __name__ == "__main__":
    sys.exit(main())
