"""``multiembed train``: the training worker (one process, or one rank under torchrun / torchx)."""

from __future__ import annotations

import argparse
import os

from multiembed.cli.errors import report_error
from multiembed.config import TrainConfig, add_arguments, from_arguments

# Exit status when the loss became NaN or infinite: distinct from a user error (2) so that schedulers and scripts
# can tell "fix the options" from "the run diverged; the last good checkpoint is kept".
EXIT_DIVERGED = 3


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a converted dataset (one rank under torchrun / torchx)",
        description=(
            "Trains a multi-embedding model with TorchRec (DMP + sparse-dist pipeline), early-stopping on validation "
            "AUC, and writes config.json, metrics.jsonl, summary.json and checkpoints/ into --out. Started alone it "
            "is a one-process job; under torchrun / torchx each process is one rank."
        ),
        epilog=(
            f"Exit status: 0 done, 2 bad options or input, {EXIT_DIVERGED} the training loss became NaN or infinite "
            "(one error line; the last good checkpoint stays in --out/checkpoints)."
        ),
    )
    add_arguments(p, TrainConfig, exclusive=[("resume", "overwrite")])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.runtime.malloc import tune_allocator
    from multiembed.training.distributed import destroy
    from multiembed.training.trainer import Trainer, TrainingDiverged, format_summary

    tune_allocator()  # speed only: a step's temporaries stay in the heap between steps
    try:
        trainer = Trainer(from_arguments(TrainConfig, args))
        try:
            summary = trainer.fit()
        except TrainingDiverged as e:
            return diverged("train", e, trainer.ctx.is_main)
        if trainer.ctx.is_main:
            print(format_summary(summary, trainer.run_dir))
    finally:
        destroy()
    return 0


def diverged(command: str, error: BaseException, is_main: bool) -> int:
    """Ends a command whose training diverged: one line from rank 0 and :data:`EXIT_DIVERGED` on every rank.

    Every rank raises (the check is collective); one line from rank 0 is the whole story, as for the user errors
    cli.main prints. MULTIEMBED_DEBUG=1 shows the traceback instead.
    """
    from multiembed.training.distributed import barrier

    if os.environ.get("MULTIEMBED_DEBUG"):
        raise error
    if is_main:
        report_error(f"multiembed {command}: error: {error}", EXIT_DIVERGED)
    # No rank leaves before rank 0 has recorded the line (torchrun reports only the first worker to exit), and the
    # barrier runs after the pipeline's collectives still in flight, so none is torn down mid-way.
    barrier()
    return EXIT_DIVERGED
