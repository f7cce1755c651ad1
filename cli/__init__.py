"""The ``multiembed`` command line.

Every subcommand is a module of this package exposing ``register(subparsers) -> None`` (adds its parser and sets
``func``) and keeping heavy imports (torch, torchrec, pyarrow) inside the function that runs it, so ``convert``,
``synth`` and ``inspect`` start without importing torch.

Errors that are the user's (bad input, a missing file, an inconsistent option) are ``ValueError`` / ``OSError``
subclasses raised with a message that names the file, row and field; they are printed as one line and the command
exits with status 2. ``MULTIEMBED_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional, Sequence

from multiembed.cli.deprecated import one_line_warnings
from multiembed.cli.errors import report_error

# Subcommand modules, in the order `multiembed --help` lists them.
SUBCOMMANDS: List[str] = [
    "synth", "plan", "train", "evaluate", "analyze", "scale", "export", "predict", "convert", "inspect", "bench",
    "paper",
]

EXIT_USER_ERROR = 2


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
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
