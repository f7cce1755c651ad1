"""torchrun that ends a failed job with the failing worker's one-line error.

A ``multiembed`` command refuses bad options or input with one line (``multiembed train: error: ...``, exit status
2). Under torchrun that line scrolled away: every rank printed it, then torchrun raised ``ChildFailedError`` and
printed a 30-line traceback and failure report naming no cause ("To enable traceback see ..."). Here:

* the worker (:func:`~multiembed.cli.errors.report_error`, called where ``multiembed`` prints its one-line errors)
  records the line in torchrun's per-worker reply file (``TORCHELASTIC_ERROR_FILE``) and prints it itself only when
  no launcher of ours will;
* the launcher (``python -m multiembed.cli.launch torchrun [TORCHRUN ARGS]``, what the torchx components run) is
  torchrun in-process; when a worker failed with such a line it prints that line, once, as its last output, and
  exits with the worker's status. Any other failure (a signal, a crash) is one line too, naming the rank, the
  signal or status and, for ``train``, the newest complete checkpoint of ``--out`` (exit status 128 + signal, or
  the worker's); ``MULTIEMBED_DEBUG=1`` keeps torchrun's own report instead.

torchrun's ``@record`` also copies the root-cause reply file into its own (the file torchx's local scheduler reads),
so ``torchx`` learns the line too (``torchx_components.py`` prints it in place of the status dump).

Example (two local ranks, as ``torchx run -s local_cwd ./torchx_components.py:train`` runs them)::

    python -m multiembed.cli.launch torchrun --nproc_per_node 2 -m multiembed.cli train --data D --out RUN
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from multiembed.cli.errors import LAUNCHED_ENV, one_line_error, record_error, recorded_exit_code

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs torchrun with ``argv`` (a leading ``torchrun`` is dropped); returns the exit status.

    Raises:
        ChildFailedError: a worker failed without a one-line error and ``MULTIEMBED_DEBUG`` is set (torchrun's own
            report follows).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["torchrun"]:
        args = args[1:]
    os.environ[LAUNCHED_ENV] = "1"  # inherited by the workers torchrun starts
    try:
        torchrun_main(args)
    except ChildFailedError as e:
        rank, failure = _reported_failure(e)
        line = one_line_error(failure.error_file_data)
        if line is None:
            if os.environ.get("MULTIEMBED_DEBUG"):
                raise
            line = worker_failure_line(args, rank, failure.pid, failure.exitcode)
            status = 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode or 1
            # Recorded for torchx too (its status shows this line, see torchx_components.py), then printed.
            record_error(line, status)
            print(line, file=sys.stderr, flush=True)
            return status
        print(line, file=sys.stderr, flush=True)
        if failure.exitcode > 0:
            return failure.exitcode
        # Stopped by a signal after recording its error (torchrun ends the other workers when one exits first, and
        # every rank records a collective error such as a diverged loss): the status the worker had chosen.
        return recorded_exit_code(failure.error_file_data) or 1
    return 0


def _reported_failure(error: "ChildFailedError") -> Tuple[int, "ProcessFailure"]:
    """The failed worker whose one-line error explains the job: the lowest rank that recorded one, else torchrun's
    first failure (a rank that ended without a line, e.g. torn down by a signal, may be seen to fail first)."""
    recorded = sorted(rank for rank, f in error.failures.items() if one_line_error(f.error_file_data) is not None)
    if recorded:
        return recorded[0], error.failures[recorded[0]]
    return error.get_first_failure()


def worker_failure_line(args: Sequence[str], rank: int, pid: int, exitcode: int) -> str:
    """One line for a worker that failed without a one-line error of its own (killed by a signal, or a crash):
    which rank ended how and, for ``train``, the newest complete checkpoint of its ``--out`` (where a rerun with
    ``--resume`` continues)."""
    command = args[args.index("multiembed.cli") + 1] if "multiembed.cli" in args[:-1] else "job"
    if exitcode < 0:
        try:
            how = f"was ended by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was ended by signal {-exitcode}"
    else:
        how = f"exited with status {exitcode} (its log holds the cause)"
    line = f"multiembed {command}: error: rank {rank} (pid {pid}) {how}"
    run_dir = _option(args, "--out") if command == "train" else None
    if run_dir is not None:
        from multiembed.training.run_dir import RunDir

        kept = RunDir(run_dir).newest_checkpoint(report=lambda _: None)
        line += (f"; the last checkpoint is {kept} (rerun with --resume to continue)" if kept is not None
                 else f"; no complete checkpoint in {run_dir} yet")
    return line


def _option(args: Sequence[str], name: str) -> Optional[str]:
    """The value of ``name`` (``--out X`` or ``--out=X``) in a command line, the last one given; None without."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


if __name__ == "__main__":
    sys.exit(main())
